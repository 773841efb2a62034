"""Plain against oneDNN-prepacked linear layers (`models/packed.py`): decoding time, same requests.

For the sampled test users at batch 1, the target-only beam search and strict speculative decoding
(AtSpeedS's draft, the tree of `--trees` or the config's) at each K (`--ks`), each run twice: with
every linear layer of the target and the draft as a plain `nn.Linear` and as a `PackedLinear`, all
four interleaved per request (median ms after `--warmup` requests). Also counts the requests whose
top-K items and order are the same both ways (bf16 matmuls are bit-identical; float32 LoRA adapters
and draft layers may round differently at one or two rows, which can swap near-tied beams).

    python benchmarks/packed.py --dataset=amazon-beauty --data_path=DIR

prints the table (`--output` also writes it).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

import common
import decoders
from atspeed_rec.models.packed import PackedLinear, packing_available


def parse_args(argv=None):
    p = common.parser(__file__, __doc__, requests=40)
    p.add_argument("--ks", type=common.int_list, default=[1, 10], help="beam widths K, e.g. 1,10")
    decoders.add_options(p)
    args = common.parse(p, argv, ("AtSpeedS",))
    args.modes = ["strict"]
    return args


def with_layers(layers: list[nn.Linear], packed: bool, fn):
    """`fn` run with every layer of `layers` as a PackedLinear (`packed`) or a plain nn.Linear."""
    def run(ids, mask):
        for layer in layers:
            layer.__class__ = PackedLinear if packed else nn.Linear
        return fn(ids, mask)
    return run


@torch.no_grad()
def benchmark(args) -> None:
    if not packing_available():
        sys.exit("error: this torch build has no oneDNN CPU ops: nothing to compare")
    served, test = decoders.load(args)
    s = served["strict"]
    layers = [m for m in s.model.modules() if isinstance(m, nn.Linear)]
    requests = decoders.requests(args, served, test, 1)
    rows = []
    for k in args.ks:
        n, gamma = decoders.tree_for(args, s, k)
        fns = {}
        for how in ("plain", "packed"):
            fns[f"search {how}"] = with_layers(layers, how == "packed", decoders.baseline_fn(s.model, "strict", k, None))
            spec = decoders.spec_fn(s.model, "strict", k, n, gamma, None)
            fns[f"speculative {how}"] = with_layers(layers, how == "packed", lambda ids, mask, f=spec: f(ids, mask)[0])
        res = common.interleaved(fns, requests, args.warmup)
        ms = {name: 1e3 * seconds for name, (seconds, _) in res.items()}
        for what in ("search", "speculative"):
            same = sum(torch.equal(a.items, b.items) for a, b in zip(res[f"{what} plain"][1], res[f"{what} packed"][1]))
            rows.append([k, what + (f" (N {n}, gamma {gamma})" if what == "speculative" else ""),
                         f"{ms[f'{what} plain']:.1f}", f"{ms[f'{what} packed']:.1f}",
                         f"{ms[f'{what} plain'] / ms[f'{what} packed']:.2f}x", f"{same}/{len(requests)}"])
        rows.append([k, "speedup (search / speculative)", f"{ms['search plain'] / ms['speculative plain']:.2f}x",
                     f"{ms['search packed'] / ms['speculative packed']:.2f}x", "", ""])
        print(rows[-3:], flush=True)
    lines = decoders.header(args, "Plain against prepacked linear layers", served)
    lines += [f"Batch 1, {len(requests)} test users, median ms after {args.warmup} warm-up requests, all interleaved; "
              "same top-K: requests with identical items and order both ways.", "",
              *common.table(["K", "decoder", "plain ms", "prepacked ms", "faster", "same top-K"], rows)]
    common.write(lines, args.output)


def main(argv=None) -> int:
    return common.main(parse_args(argv), benchmark)


if __name__ == "__main__":
    sys.exit(main())
