"""Strict verification with and without the bound: what dropping unreachable undrafted pairs buys.

Strict verification stops a round at the first level where one of the target's top-K pairs is not a
drafted node. With the bound (the default, `drop_unreachable`), a level also passes when those pairs
provably cannot reach the next top K: each child of a pair scores at most the pair itself, so when the
K-th best child of the drafted pairs scores above every undrafted pair, beam search drops them too.
For each K (`--ks`) on its tree (`--trees`, else --draft_beams/--gamma/--draft_start, else the config's),
batch 1, the target's own `beam_search`, strict speculative decoding without the bound and with it run
interleaved on every sampled test user; both speculative outputs are checked item for item against
`beam_search`.

    python benchmarks/bound.py --dataset=amazon-beauty --data_path=DIR

writes docs/speculative_bound.md. Weights: the trained AtSpeedS checkpoint of the same arguments
(AtSpeedR's draft stands in when there is none); options as in `benchmarks/speculative.py`.
"""

from __future__ import annotations

import sys

import torch

import common
import decoders


def parse_args(argv=None):
    p = common.parser(__file__, __doc__, output="speculative_bound.md")
    p.add_argument("--ks", type=common.int_list, default=[1, 3, 5, 10, 20], help="beam widths K, e.g. 1,10,20")
    decoders.add_options(p)
    args = common.parse(p, argv, tuple(decoders.MODEL_OF_MODE.values()))
    args.modes = ["strict"]  # the bound is a rule of strict verification
    return args


def measure(s, requests, k: int, tree, warmup: int) -> dict:
    """`beam_search`, plain strict and bounded strict on every request, interleaved: one row."""
    fns = {"ours": decoders.baseline_fn(s.model, "strict", k, None),
           "plain": decoders.spec_fn(s.model, "strict", k, tree, None, bound=False),
           "bound": decoders.spec_fn(s.model, "strict", k, tree, None, bound=True)}
    res = common.interleaved(fns, requests, warmup)
    ours_t, target = res["ours"]
    row = {"k": k, "n": tree.n, "gamma": tree.gamma, "ours_ms": 1000 * ours_t}
    for name in ("plain", "bound"):
        seconds, out = res[name]
        stats = [st for _, st in out]
        accepted, calls, _ = decoders.acceptance(stats)
        row[name] = {"ms": 1000 * seconds, "speedup": ours_t / seconds, "accepted": accepted, "calls": calls,
                     "by_code": decoders.acceptance_by_code(stats),
                     "bounded": sum(float(st.bounded_steps.sum()) for st in stats) / len(requests),
                     "identical": sum(bool(torch.equal(b.items, r.items)) for (b, _), r in zip(out, target))}
    return row


def benchmark(args) -> None:
    served, test = decoders.load(args)
    s = served["strict"]
    requests = decoders.requests(args, served, test, 1)
    rows = []
    for k in args.ks:
        tree = decoders.tree_for(args, s, k)
        r = measure(s, requests, k, tree, args.warmup)
        rows.append(r)
        print(f"K={k} {tree}: {r['plain']['speedup']:.2f}x -> {r['bound']['speedup']:.2f}x, accepted "
              f"{r['plain']['accepted']:.2f} -> {r['bound']['accepted']:.2f}", flush=True)
    users = len(requests)
    lines = decoders.header(args, "Strict verification with and without the bound (batch 1)", served)
    lines += [f"{users} test users decoded alone; per request: median latency, speedup over `beam_search` (the "
              "target's own search, interleaved), accepted drafted levels and target calls (means), the levels "
              "accepted only thanks to the bound, and how many requests return exactly `beam_search`'s items.", "",
              *common.table(["K", "N", "gamma", "target-only ms", "rule", "SD ms", "speedup", "accepted steps",
                             "of which by the bound", "target calls", "acceptance by code",
                             f"identical (of {users})"],
                            [[r["k"], r["n"], r["gamma"], f"{r['ours_ms']:.1f}", name, f"{m['ms']:.1f}",
                              f"{m['speedup']:.2f}x", f"{m['accepted']:.2f}", f"{m['bounded']:.2f}",
                              f"{m['calls']:.2f}", m["by_code"], m["identical"]]
                             for r in rows for name, m in (("plain", r["plain"]), ("bound", r["bound"]))])]
    common.write(lines, args.output)


def main(argv=None) -> int:
    return common.main(parse_args(argv), benchmark)


if __name__ == "__main__":
    sys.exit(main())
