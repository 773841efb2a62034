"""The draft tree's frontier: speculative speedup and acceptance over draft widths N x depths gamma x draft starts.

One K (`--k`, default 10), batch 1: on each sampled test user the target-only baseline (strict:
`beam_search`, relaxed: `beam_sample`) and speculative beam search with every (N, gamma, draft start, budget)
of the grid (`--n`, `--gamma`, `--start`, `--budget`; N < K is skipped, and so is a budget below K or not
below the tree's N x gamma nodes) run interleaved; speedup = median baseline time / median speculative time
per request.

    python benchmarks/frontier.py --dataset=amazon-beauty --data_path=DIR

writes docs/results/speculative_frontier.md and docs/results/speculative_frontier.png. Weights and the other
options as in `benchmarks/speculative.py`.
"""

from __future__ import annotations

import sys

import common
import decoders


def parse_args(argv=None):
    p = common.parser(__file__, __doc__, output="speculative_frontier.md", plot="speculative_frontier.png")
    p.add_argument("--k", type=int, default=10, help="beam width K (items returned)")
    p.add_argument("--n", type=common.int_list, default=[10, 12, 15, 20, 30, 40], help="draft widths N")
    p.add_argument("--gamma", type=common.int_list, default=[1, 2, 3], help="draft levels per round")
    p.add_argument("--start", type=common.int_list, default=[0],
                   help="draft_start values: the first code the draft proposes (earlier ones: target steps)")
    p.add_argument("--budget", type=common.int_list, default=[0],
                   help="tree budgets: verify only the tree's B best nodes by cumulative draft score (0: all)")
    decoders.add_options(p, tree=False)
    args = common.parse(p, argv, tuple(decoders.MODEL_OF_MODE.values()))
    decoders.check_modes(p, args)
    return args


def run_frontier(s, mode: str, requests, k: int, grid, warmup: int) -> list[dict]:
    """The baseline and every (N, gamma, start) tree on each request, interleaved: one row per tree."""
    generator = decoders.generator(s)
    fns = {"ours": decoders.baseline_fn(s.model, mode, k, generator)}
    fns.update({tree: decoders.spec_fn(s.model, mode, k, tree, generator) for tree in grid})
    res = common.interleaved(fns, requests, warmup)
    rows = []
    for n, g, start, budget in grid:
        spec = res[(n, g, start, budget)]
        spec_t, out = spec.seconds, spec.outputs
        accepted, calls, rate = decoders.acceptance([stats for _, stats in out])
        rows.append({"mode": mode, "k": k, "n": n, "gamma": g, "start": start, "budget": budget,
                     "spec_ms": 1000 * spec_t,
                     "ours_ms": 1000 * res["ours"][0], "speedup": res["ours"][0] / spec_t,
                     "speedup_mean": common.mean_ratio(res["ours"], spec),
                     "accepted": accepted, "calls": calls, "rate": rate,
                     "by_code": decoders.acceptance_by_code([stats for _, stats in out])})
    return rows


def benchmark(args) -> None:
    served, test = decoders.load(args)
    trees = [decoders.Tree(n, g, start, b)
             for start in args.start for n in args.n for g in args.gamma for b in args.budget]
    grid = [tree for tree in trees if tree.serves(args.k) and tree.budget < tree.n * tree.gamma]
    requests = decoders.requests(args, served, test, 1)
    rows = []
    for mode in args.modes:
        rows += run_frontier(served[mode], mode, requests, args.k, grid, args.warmup)
        print(f"{mode}: best {max(r['speedup'] for r in rows if r['mode'] == mode):.2f}x", flush=True)
    lines = decoders.header(args, f"Speculative beam search: draft tree frontier (K = {args.k}, batch 1)", served)
    lines += ["Speedup = median time per request, baseline (strict: `beam_search`, relaxed: `beam_sample`) / "
              "speculative, batch 1, every tree and the baseline interleaved on the same requests; mean ratio = each "
              "request's baseline time / its speculative time, averaged (the paper's measure). Acceptance by "
              "code: accepted / verified drafted levels at the 1st, 2nd, ... code of the ID (a round stops at its "
              "first rejected level).", "",
              *common.table(["mode", "K", "N", "gamma", "draft start", "nodes per round (<=)", "SD ms", "ours ms",
                             "speedup", "mean ratio", "accepted steps", "target calls", "acceptance",
                             "acceptance by code"],
                            [[r["mode"], r["k"], r["n"], r["gamma"], r["start"], r["budget"] or r["n"] * r["gamma"],
                              f"{r['spec_ms']:.1f}", f"{r['ours_ms']:.1f}", f"{r['speedup']:.2f}x",
                              f"{r['speedup_mean']:.2f}x", f"{r['accepted']:.2f}", f"{r['calls']:.2f}",
                              f"{r['rate']:.2f}", r["by_code"]]
                             for r in rows])]
    starts = "" if len(args.start) == 1 else ", start {}"
    budgets = "" if len(args.budget) == 1 else ", best {}"
    label = lambda r: (f"{r['mode']}, gamma {r['gamma']}" + starts.format(r["start"])  # noqa: E731
                       + budgets.format(r["budget"] or "all"))
    common.plot_lines(args.plot, [("speedup vs ours", common.series(rows, label, "n", "speedup")),
                                  ("accepted steps per request", common.series(rows, label, "n", "accepted"))],
                      "N (draft beams per level)", f"{args.dataset}, K = {args.k}, batch 1, {decoders.weights(served)}")
    common.write(lines, args.output, args.plot)


def main(argv=None) -> int:
    return common.main(parse_args(argv), benchmark)


if __name__ == "__main__":
    sys.exit(main())
