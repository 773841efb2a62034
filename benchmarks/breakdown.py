"""Where a speculative request's time goes: target passes, draft, verification, everything else.

For one K (`--k`, default 10), N and gamma (default: the config's), batch 1, the sampled test users
are decoded by speculative beam search and by the target-only baseline (strict: `beam_search`,
relaxed: `beam_sample`). Both are timed without the profiler, interleaved on the same requests
(median ms per request after `--warmup` requests), then run once more under torch.profiler, whose
labelled stages (`beam_search.STAGES`: every target forward; the draft's calls and tree;
verification, or the baseline's trie-masked top-K selection) give each stage's share of the time.

    python benchmarks/breakdown.py --dataset=amazon-beauty --data_path=DIR --k=10

writes docs/results/speculative_breakdown.md. Weights and the other options as in `benchmarks/speculative.py`.
"""

from __future__ import annotations

import statistics
import sys
import time

from torch.profiler import ProfilerActivity, profile

import common
import decoders
from atspeed_rec.decoding.beam_search import STAGES


def parse_args(argv=None):
    p = common.parser(__file__, __doc__, output="speculative_breakdown.md")
    p.add_argument("--k", type=int, default=10, help="beam width K (items returned)")
    decoders.add_options(p)
    args = common.parse(p, argv, tuple(decoders.MODEL_OF_MODE.values()))
    decoders.check_modes(p, args)
    return args


def stage_shares(fn, requests) -> dict:
    """{stage: fraction of the profiled wall time}, plus "other"."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for r in requests:
            fn(r.ids, r.mask)
        total_us = 1e6 * (time.perf_counter() - start)
    spent = {e.key: e.cpu_time_total for e in prof.key_averages()}
    shares = {name: spent.get(label, 0.0) / total_us for name, label in STAGES.items()}
    shares["other"] = max(0.0, 1.0 - sum(shares.values()))
    return shares


def target_calls(out) -> float:
    """Target forward passes per request of one output (batch 1)."""
    if isinstance(out, tuple):  # speculative: (BeamResult, SpecStats)
        return out[1].target_calls.float().mean().item()
    return out.forward_calls


def rows_for(s, mode: str, k: int, tree, requests, warmup: int) -> list[dict]:
    generator = decoders.generator(s)
    fns = {"speculative": decoders.spec_fn(s.model, mode, k, tree, generator),
           decoders.BASELINE_OF_MODE[mode]: decoders.baseline_fn(s.model, mode, k, generator)}
    medians = common.interleaved(fns, requests, warmup)  # {search: Timing (median seconds, outputs, times)}
    rows = [{"mode": mode, "search": search, "ms": 1e3 * medians[search][0], **stage_shares(fn, requests),
             "calls": statistics.mean(map(target_calls, medians[search][1]))} for search, fn in fns.items()]
    rows[0]["speedup"] = rows[1]["ms"] / rows[0]["ms"]
    return rows


def table(rows) -> list[str]:
    cols = list(STAGES) + ["other"]
    return common.table(
        ["mode", "search", "ms / request", *[f"{c} %" for c in cols], "target calls", "ms per target call", "speedup"],
        [[r["mode"], r["search"], f"{r['ms']:.1f}", *[f"{100 * r[c]:.0f}" for c in cols], f"{r['calls']:.2f}",
          f"{r['ms'] * r['target'] / r['calls']:.2f}",  # the target share of the median, per pass
          f"{r['speedup']:.2f}x" if "speedup" in r else ""] for r in rows])


def benchmark(args) -> None:
    served, test = decoders.load(args)
    requests = decoders.requests(args, served, test, 1)
    rows = []
    for mode in args.modes:
        s = served[mode]
        tree = decoders.tree_for(args, s, args.k)
        rows += rows_for(s, mode, args.k, tree, requests, args.warmup)
    lines = decoders.header(args, "Where the time of one request goes", served)
    lines += [f"K = {args.k}, N = {tree.n}, gamma = {tree.gamma}, draft start = {tree.start}, batch 1. "
              "ms / request: median without the profiler; "
              "stage shares: torch.profiler over the same requests (target: every target forward; verify: "
              "verification, or the baseline's trie-masked top-K; other: Python and bookkeeping outside the "
              "labelled stages); ms per target call: the target share of the median over the target calls.", "",
              *table(rows)]
    common.write(lines, args.output)


def main(argv=None) -> int:
    return common.main(parse_args(argv), benchmark)


if __name__ == "__main__":
    sys.exit(main())
