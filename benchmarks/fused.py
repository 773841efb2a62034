"""Decoding through each block's modules against fused inference weights (`models/fused.py`).

For the sampled test users at batch 1, the target-only beam search and strict speculative decoding
(AtSpeedS's draft, the tree of `--trees` or the config's) at each K (`--ks`), each run twice: with
the target's and the draft's blocks calling their modules (q, k, v, o, gate, up, down and the LoRA
adapters one by one) and with their fused weights (LoRA merged, q/k/v and gate/up concatenated,
prepacked for oneDNN), all four interleaved per request (median ms after `--warmup` requests). Also
counts the requests whose top-K items and order are the same both ways (merging rounds the weights
to the backbone's dtype once: in bf16 near-tied beams may swap, as they do between batch sizes).

    python benchmarks/fused.py --dataset=amazon-beauty --data_path=DIR

prints the table (`--output` also writes it).
"""

from __future__ import annotations

import contextlib
import sys

import torch

import common
import decoders
from atspeed_rec.models.fast_forward import llama_parts
from atspeed_rec.models.fused import modules_only


def parse_args(argv=None):
    p = common.parser(__file__, __doc__, requests=40)
    p.add_argument("--ks", type=common.int_list, default=[1, 10], help="beam widths K, e.g. 1,10")
    decoders.add_options(p)
    args = common.parse(p, argv, ("AtSpeedS",))
    args.modes = ["strict"]
    return args


def with_modules(lms, fused: bool, fn):
    """`fn` run with the blocks of `lms` on their fused weights (`fused`) or calling their modules."""
    def run(ids, mask):
        with contextlib.ExitStack() as stack:
            if not fused:
                for lm in lms:
                    stack.enter_context(modules_only(llama_parts(lm)[0]))
            return fn(ids, mask)
    return run


@torch.no_grad()
def benchmark(args) -> None:
    served, test = decoders.load(args)
    s = served["strict"]
    lms = [s.model.target.lm, s.model.draft]
    requests = decoders.requests(args, served, test, 1)
    rows = []
    for k in args.ks:
        tree = decoders.tree_for(args, s, k)
        fns = {}
        for how in ("modules", "fused"):
            fns[f"search {how}"] = with_modules(lms, how == "fused", decoders.baseline_fn(s.model, "strict", k, None))
            spec = decoders.spec_fn(s.model, "strict", k, tree, None)
            fns[f"speculative {how}"] = with_modules(lms, how == "fused", lambda ids, mask, f=spec: f(ids, mask)[0])
        res = common.interleaved(fns, requests, args.warmup)
        ms = {name: 1e3 * seconds for name, (seconds, _) in res.items()}
        for what in ("search", "speculative"):
            same = sum(torch.equal(a.items, b.items) for a, b in zip(res[f"{what} modules"][1], res[f"{what} fused"][1]))
            name = f" (N {tree.n}, gamma {tree.gamma}, draft start {tree.start})" if what == "speculative" else ""
            rows.append([k, what + name,
                         f"{ms[f'{what} modules']:.1f}", f"{ms[f'{what} fused']:.1f}",
                         f"{ms[f'{what} modules'] / ms[f'{what} fused']:.2f}x", f"{same}/{len(requests)}"])
        rows.append([k, "speedup (search / speculative)", f"{ms['search modules'] / ms['speculative modules']:.2f}x",
                     f"{ms['search fused'] / ms['speculative fused']:.2f}x", "", ""])
        print(rows[-3:], flush=True)
    lines = decoders.header(args, "Each block's modules against fused inference weights", served)
    lines += [f"Batch 1, {len(requests)} test users, median ms after {args.warmup} warm-up requests, all interleaved; "
              "same top-K: requests with identical items and order both ways.", "",
              *common.table(["K", "decoder", "modules ms", "fused ms", "faster", "same top-K"], rows)]
    common.write(lines, args.output)


def main(argv=None) -> int:
    return common.main(parse_args(argv), benchmark)


if __name__ == "__main__":
    sys.exit(main())
