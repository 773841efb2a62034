"""How exact is "the target's output" in bfloat16? The target's beam search against itself.

Strict speculative decoding returns the target's top-K exactly when both run in float32 (tests).
In bfloat16 every pass rounds differently when its shapes differ, so near-tied beams can swap. This
script measures how often the TARGET ITSELF changes its top-K (items and order) between two ways of
computing the same request, on sampled test users at each K (`--ks`):

- batch 1 vs the same users decoded in batches of `--batch` (same dtype);
- its dtype (bfloat16 on AMX CPUs) vs float32 (the same weights, upcast), both at batch 1;
- strict speculative decoding (AtSpeedS's draft) vs the target's beam search, both at batch 1.

    python benchmarks/precision.py --dataset=amazon-beauty --data_path=DIR

prints the table (`--output` also writes it).
"""

from __future__ import annotations

import copy
import sys

import torch

import common
import decoders
from atspeed_rec.decoding.beam_search import beam_search
from atspeed_rec.models.fast_forward import lm_dtype


def parse_args(argv=None):
    p = common.parser(__file__, __doc__, requests=64)
    p.add_argument("--ks", type=common.int_list, default=[1, 10, 20], help="beam widths K, e.g. 1,10,20")
    p.add_argument("--batch", type=int, default=16, help="batch size of the batched decoding")
    args = common.parse(p, argv, ("AtSpeedS",))
    args.modes = ["strict"]
    return args


def same_items(a, b) -> list[bool]:
    """Per request: identical top-K items in the same order."""
    return [bool(torch.equal(x, y)) for x, y in zip(a, b)]


def benchmark(args) -> None:
    served, test = decoders.load(args)
    s = served["strict"]
    t = s.model.target
    single = decoders.requests(args, served, test, 1)
    batched = decoders.requests(args, served, test, args.batch)
    users = sum(r.users for r in batched)
    single = single[:users]  # the same users, in the same order
    lm32 = torch.nn.Module.float(copy.deepcopy(t.lm))  # transformers refuses .float() on GGUF-loaded models
    rows = []
    for k in args.ks:
        tree = decoders.Tree(max(int(s.config["draft_beams"]), k), int(s.config["gamma"]), int(s.config["draft_start"]))
        spec_k = decoders.spec_fn(s.model, "strict", k, tree, None)
        b1 = [beam_search(t.lm, t.trie, t.vocab, r.ids, r.mask, k).items[0] for r in single]
        bb = [row for r in batched for row in beam_search(t.lm, t.trie, t.vocab, r.ids, r.mask, k).items]
        f32 = [beam_search(lm32, t.trie, t.vocab, r.ids, r.mask, k).items[0] for r in single]
        spec = [spec_k(r.ids, r.mask)[0].items[0] for r in single]
        rows.append([k, f"{sum(same_items(b1, bb))}/{users}", f"{sum(same_items(b1, f32))}/{users}",
                     f"{sum(same_items(spec, b1))}/{users}", f"{sum(same_items(spec, f32))}/{users}"])
        print(f"K={k}: {rows[-1]}", flush=True)
    lines = decoders.header(args, "Is the target's top-K reproducible? bfloat16 vs float32, batch 1 vs batched",
                            served)
    dtype = str(lm_dtype(t.lm)).removeprefix("torch.")
    lines += [f"Requests whose top-K items (and order) are identical between two computations, {users} test users; "
              f"target dtype {dtype}.", "",
              *common.table(["K", f"target batch 1 vs batch {args.batch}", f"target {dtype} vs float32",
                             "strict SD vs target (batch 1)", "strict SD vs float32 target"], rows)]
    common.write(lines, args.output)


def main(argv=None) -> int:
    return common.main(parse_args(argv), benchmark)


if __name__ == "__main__":
    sys.exit(main())
