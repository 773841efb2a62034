"""Speculative beam search vs target-only decoding, by verification mode, K and batch size.

For each setting (mode x K x batch) the same request batches (`--requests` test users sampled with
the config's seed) are decoded by speculative beam search, by our target-only baseline (strict:
`beam_search`; relaxed: `beam_sample`) and by Hugging Face `generate` beam search (both modes),
interleaved per request batch. The first `--warmup` batches of a setting are not timed; speedup =
median baseline time / median speculative time, and beside it the paper's mean of per-request ratios.
Recall/NDCG come from RecBole's evaluator (the config's metrics, at its topk cut-offs up to K, K itself
when none is), for the speculative output, the target's `beam_search` and, in relaxed mode, `beam_sample`.

    python benchmarks/speculative.py --dataset=amazon-beauty --data_path=DIR

writes docs/results/speculative_benchmark.md and docs/results/speculative_speedup.png. Weights: the trained
AtSpeedS (strict) and AtSpeedR (relaxed) checkpoints of the same arguments, made by
`python run_recbole.py --model=AtSpeedS ...` (the error message gives the exact command);
`--allow_untrained` times random weights instead (timings hold, acceptance and accuracy mean nothing).
"""

from __future__ import annotations

import sys

import common
import decoders


def parse_args(argv=None):
    p = common.parser(__file__, __doc__, output="speculative_benchmark.md", plot="speculative_speedup.png")
    p.add_argument("--ks", type=common.int_list, default=[1, 3, 5, 10, 20], help="beam widths K, e.g. 1,3,5,10,20")
    p.add_argument("--batches", type=common.int_list, default=[1, 16], help="batch sizes, e.g. 1,16")
    p.add_argument("--skip_hf", action="store_true", help="do not time HF generate")
    decoders.add_options(p)
    args = common.parse(p, argv, tuple(decoders.MODEL_OF_MODE.values()))
    decoders.check_modes(p, args)
    return args


def benchmark(args) -> None:
    served, test = decoders.load(args)
    rows = []
    for batch in args.batches:
        requests = decoders.requests(args, served, test, batch)
        for mode in args.modes:
            s = served[mode]
            for k in args.ks:
                tree = decoders.tree_for(args, s, k)
                r = decoders.measure(s, mode, requests, k, tree, args.warmup, not args.skip_hf)
                rows.append(r)
                print(f"{mode} K={k} batch={batch}: {r['speedup']:.2f}x vs ours, "
                      f"{common.fmt(r['speedup_hf'], '{:.2f}x')} vs HF, {r['accepted']:.2f} accepted steps", flush=True)
    lines = decoders.header(args, "Speculative beam search vs target-only decoding", served) + tables(rows)
    label = lambda r: f"{r['mode']}, batch {r['batch']}"  # noqa: E731
    common.plot_lines(args.plot, [("speedup vs ours", common.series(rows, label, "k", "speedup")),
                                  ("speedup vs HF generate", common.series(rows, label, "k", "speedup_hf"))],
                      "K (beams = items returned)", f"{args.dataset}, N >= K, {decoders.weights(served)}")
    common.write(lines, args.output, args.plot)


def tables(rows) -> list[str]:
    speed = [[r["mode"], r["k"], r["batch"], r["n"], r["gamma"], r["start"], f"{r['spec_ms']:.1f}",
              f"{r['ours_ms']:.1f}", f"{r['search_ms']:.1f}", f"{r['speedup_search']:.2f}x",
              common.fmt(r["hf_ms"], "{:.1f}"), f"{r['speedup']:.2f}x", f"{r['speedup_mean']:.2f}x",
              common.fmt(r["speedup_hf"], "{:.2f}x"),
              f"{r['accepted']:.2f}", f"{r['calls']:.2f}", f"{r['rate']:.2f}", r["by_code"],
              f"{r['identical']}/{r['users'] // r['batch']}"] for r in rows]
    accuracy = [([r["mode"], r["k"], r["batch"], decoding, r["users"]], values)
                for r in rows for decoding, values in r["metrics"].items()]
    return ["Speedup = median time of a request batch, baseline / speculative, same run, interleaved; 'mean "
            "ratio' = each request batch's baseline time / its speculative time, averaged (the paper's measure: "
            "unlike the medians it counts the minority of requests that take an extra target call). "
            "Baseline 'ours': strict = our `beam_search`, relaxed = our `beam_sample` (target-only beam "
            "sampling); 'beam search' = our `beam_search` in both modes (the target-only search a server runs "
            "today; the same as 'ours' in strict mode); 'HF' = `generate` beam search in BOTH modes (it has no "
            "trie-constrained beam sampling). "
            "Accepted steps and target calls are per request; acceptance by code = accepted / verified drafted "
            "levels at the ID's 1st, 2nd, ... code; 'identical' = request batches whose speculative "
            "top-K items equal `beam_search`'s exactly.", "",
            *common.table(["mode", "K", "batch", "N", "gamma", "draft start", "SD ms", "ours ms", "beam search ms",
                           "speedup vs beam search", "HF ms", "speedup vs ours", "mean ratio vs ours",
                           "speedup vs HF", "accepted steps", "target calls", "acceptance", "acceptance by code",
                           "identical"], speed),
            "", "RecBole's metrics against each user's held-out test item (the trainer's full-sort protocol; "
            "cut-offs: the config's topk up to K, or K): the speculative output, the target's own "
            "`beam_search` and, relaxed, `beam_sample`, on the same users.", "",
            *common.metric_table(["mode", "K", "batch", "decoding", "users"], accuracy)]


def main(argv=None) -> int:
    return common.main(parse_args(argv), benchmark)


if __name__ == "__main__":
    sys.exit(main())
