"""Which serving tree the test pass's tuning picks at each K, from the config's `tree_candidates`.

The main command decodes at one K (`num_beams`), and with `tree_candidates` set its test pass first times
every candidate tree that can serve that K (N, and a node budget, >= K) and the configured tree against the
target's own search, on its first requests decoded alone, and serves the fastest (`AtSpeedS.tune_tree`).
This script runs that tuning at each K of `--ks` on sampled test users (the first request warms up), as the
test pass of a run with `num_beams` = K would, without retraining anything: every tree's mean time per
request, the target's own search's, and the choice.

    python benchmarks/tuning.py --dataset=amazon-beauty --data_path=DIR --ks=1,3,5

writes docs/results/tree_tuning.md. Weights and options as in `benchmarks/speculative.py`; `--users` (test users
sampled with the config's seed) defaults to the config's `tree_tuning_requests` + 1.
"""

from __future__ import annotations

import sys

import torch

import common
import decoders
from atspeed_rec.recbole_glue.atspeed import parse_trees


def parse_args(argv=None):
    p = common.parser(__file__, __doc__, requests=None, output="tree_tuning.md")
    p.add_argument("--ks", type=common.int_list, default=[1, 3, 5, 10, 20], help="beam widths K, e.g. 1,3,5")
    p.add_argument("--users", type=int, default=None,
                   help="test users the tuning decodes, the first a warm-up (default: tree_tuning_requests + 1)")
    decoders.add_options(p, tree=False)
    args = common.parse(p, argv, tuple(decoders.MODEL_OF_MODE.values()))
    decoders.check_modes(p, args)
    return args


def tune_at(model, configured, trees, k: int, requests) -> dict:
    """The model's tuning as a test pass at K = `k` runs it: the `trees` that serve K beside the `configured` one."""
    model.num_beams = model.eval_beams = k
    model.tree = configured  # the tuning replaces it with its choice
    model.tree_candidates = [tree for tree in trees if tree.serves(k)]
    model.tree_tuned = model.serve_target = False
    with torch.no_grad():
        ms, target_ms = model.tune_tree(requests.ids, requests.mask)
    return {"k": k, "ms": ms, "target_ms": target_ms, "tree": model.tree, "serve_target": model.serve_target}


def benchmark(args) -> None:
    served, test = decoders.load(args)
    s0 = next(iter(served.values()))
    n = args.users or int(s0.config["tree_tuning_requests"]) + 1
    for s in served.values():
        s.model.tree_tuning_requests = n - 1
    (requests,) = common.sample_requests(test, s0.model.target.prompt, n, n, s0.config["seed"],  # one batch: the
                                         s0.config["device"])  # tuning decodes each of its requests alone
    rows = []
    for mode, s in served.items():
        if int(s.config["draft_beams"]) < max(args.ks):
            raise SystemExit(f"--ks: draft_beams={s.config['draft_beams']} < K={max(args.ks)}; pass --draft_beams="
                             f"{max(args.ks)} (a decoding setting: the checkpoint stays the same)")
        configured, trees = s.model.tree, parse_trees(s.config["tree_candidates"], s.model.tree.start)
        for k in args.ks:
            r = tune_at(s.model, configured, trees, k, requests)
            rows.append([mode, k, ", ".join(f"{tree.name}: {t:.1f}" for tree, t in r["ms"].items()),
                         f"{r['target_ms']:.1f}", "the target's own search" if r["serve_target"] else r["tree"].name,
                         f"{r['target_ms'] / min(r['ms'].values()):.2f}x"])
            print(f"{mode} K={k}: {rows[-1][4]}", flush=True)
    lines = decoders.header(args, "The serving tree the test pass's tuning picks, by K", served)
    lines += [f"Each K: the config's tree and its `tree_candidates` that can serve K (N, and a node budget, >= K), "
              f"decoded alone on {n - 1} test users (sampled with the config's seed) after one warm-up, "
              "interleaved with the target's own search; mean ms per request. The fastest tree is served, or "
              "the target's own search where it is faster (`serve_target_if_faster`).", "",
              *common.table(["mode", "K", "trees timed (mean ms)", "target's own search ms", "served",
                             "best tree's speedup"], rows)]
    common.write(lines, args.output)


def main(argv=None) -> int:
    return common.main(parse_args(argv), benchmark)


if __name__ == "__main__":
    sys.exit(main())
