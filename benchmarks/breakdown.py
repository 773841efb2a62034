"""Where a speculative request's time goes: target passes, draft, verification, everything else.

For one K (`--ks`, default 10), N and gamma (default: the config's), batch 1, the first
`--requests` test users are decoded by speculative beam search and by the target-only baseline
(strict: `beam_search`, relaxed: `beam_sample`). Both are timed without the profiler, interleaved
on the same requests (median ms per request after `--warmup` requests, as `speculative.py` times
them), then run once more under torch.profiler, whose labelled stages (`beam_search.STAGES`: every
target forward; the draft's calls and tree; verification, or the baseline's trie-masked top-K
selection) give each stage's share of the time. Writes a markdown table (default
docs/speculative_breakdown.md).

    python benchmarks/breakdown.py --dataset=amazon-beauty --data_path=../shared/datasets --ks=10

Weights and options as in `benchmarks/speculative.py` (same checkpoints, `--override`,
`--allow_untrained`).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import speculative as bench
from atspeed_rec.decoding.beam_search import STAGES
from atspeed_rec.errors import AtSpeedError

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv):
    """speculative.py's options; `--ks` takes ONE K here (default 10)."""
    argv = list(argv)
    args = bench.parse_args(argv)
    if not any(a.startswith("--ks") for a in argv):
        args.ks = [10]
    if len(args.ks) != 1:
        sys.exit(f"error: --ks: the breakdown takes one K (got {args.ks}); e.g. --ks=10")
    if "--output" not in " ".join(argv):
        args.output = ROOT / "docs" / "speculative_breakdown.md"
    return args


def stage_shares(fn, requests) -> dict:
    """{stage: fraction of the profiled wall time}, plus "other"."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for ids, mask, _ in requests:
            fn(ids, mask)
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


def rows_for(args, model, mode, k, n, gamma, requests) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    fns = {"speculative": bench.spec_fn(model, mode, k, n, gamma, generator),
           bench.BASELINE_OF_MODE[mode]: bench.baseline_fn(model, mode, k, generator)}
    medians = bench.interleaved(fns, requests, args.warmup)  # {search: (median seconds, outputs)}
    rows = [{"mode": mode, "search": search, "ms": 1e3 * medians[search][0], **stage_shares(fn, requests),
             "calls": statistics.mean(map(target_calls, medians[search][1]))} for search, fn in fns.items()]
    rows[0]["speedup"] = rows[1]["ms"] / rows[0]["ms"]
    return rows


def table(rows) -> list[str]:
    cols = list(STAGES) + ["other"]
    out = ["| mode | search | ms / request | " + " | ".join(f"{c} %" for c in cols)
           + " | target calls | ms per target call | speedup |",
           "|---|---|---|" + "---|" * len(cols) + "---|---|---|"]
    for r in rows:
        shares = " | ".join(f"{100 * r[c]:.0f}" for c in cols)
        per_call = r["ms"] * r["target"] / r["calls"]  # the target share of the median, per pass
        speed = f"{r['speedup']:.2f}x" if "speedup" in r else ""
        out.append(f"| {r['mode']} | {r['search']} | {r['ms']:.1f} | {shares} | {r['calls']:.2f} | {per_call:.2f} "
                   f"| {speed} |")
    return out


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    try:
        models, labels, test, config = bench.load_models(args, args.modes)
    except AtSpeedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    k = args.ks[0]
    n = max(args.draft_beams or config["draft_beams"], k)
    gamma = args.gamma or config["gamma"]
    lines = bench.header(args, models, labels, config, "Where the time of one request goes")
    lines += [f"K = {k}, N = {n}, gamma = {gamma}, batch 1. ms / request: median without the profiler; "
              f"stage shares: torch.profiler over the same requests (target: every target forward; "
              f"verify: verification, or the baseline's trie-masked top-K; other: Python and "
              f"bookkeeping outside the labelled stages); ms per target call: the target share of the median "
              f"over the target calls.", ""]
    rows = []
    with torch.no_grad():
        for mode in args.modes:
            requests = bench.make_requests(models[mode].target, test, args.requests, 1, args.device)
            rows += rows_for(args, models[mode], mode, k, n, gamma, requests)
    lines += table(rows)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
