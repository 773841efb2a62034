"""The draft-alignment objectives compared: every `align_loss` x {strict, relaxed} x K.

For each alignment loss a draft is trained for the same GenRec target by the AtSpeed pipeline
(`AtSpeedTrainer`: the target, the teacher data and a draft already trained for these properties are
reused from saved/), then decoded speculatively on the sampled test users, batch 1, in both
verification modes, against our target-only baseline (strict: `beam_search`, relaxed:
`beam_sample`): accepted steps per request, speedup, and RecBole's metrics of the speculative output
beside the target's own beam search.

    python benchmarks/alignment.py --dataset=amazon-beauty --data_path=DIR

writes docs/results/alignment_benchmark.md and docs/results/alignment_accepted.png. Training options are property
overrides, as on run_recbole.py: `--draft_epochs=4 --teacher_per_user=2`.
"""

from __future__ import annotations

import sys

from recbole.utils import init_logger

import common
import decoders
from atspeed_rec.alignment.losses import ALIGN_LOSSES
from atspeed_rec.recbole_glue.pipeline import AtSpeedTrainer


def parse_args(argv=None):
    p = common.parser(__file__, __doc__, output="alignment_benchmark.md", plot="alignment_accepted.png",
                      untrained=False)
    p.add_argument("--losses", type=lambda s: s.replace(",", " ").split(), default=list(ALIGN_LOSSES),
                   help=f"align_loss values, e.g. none,atspeed_r (default: all of {', '.join(ALIGN_LOSSES)})")
    p.add_argument("--ks", type=common.int_list, default=[1, 3, 5, 10, 20], help="beam widths K, e.g. 1,3,5,10,20")
    decoders.add_options(p)
    args = common.parse(p, argv, ("AtSpeedS",))
    decoders.check_modes(p, args)
    unknown = [x for x in args.losses if x not in ALIGN_LOSSES]
    if unknown:
        p.error(f"--losses: unknown {unknown}; valid: {', '.join(ALIGN_LOSSES)}")
    return args


def draft_for(args, loss: str):
    """(Served AtSpeedS model whose draft was aligned with `loss`, test loader): trained here unless cached."""
    config = common.build(args, "AtSpeedS", align_loss=loss)
    init_logger(config)
    _, train, valid, test = common.load_data(config)
    model = common.instantiate("AtSpeedS", config, train, None)
    AtSpeedTrainer(config, model).fit(train, valid, saved=True)  # reuses every cached stage
    return decoders.Served(model.eval(), config, f"align_loss={loss}"), test


def benchmark(args) -> None:
    rows, served = [], {}
    for loss in args.losses:
        s, test = draft_for(args, loss)
        served[loss] = s
        requests = decoders.requests(args, {loss: s}, test, 1)
        for mode in args.modes:
            for k in args.ks:
                row = decoders.measure(s, mode, requests, k, decoders.tree_for(args, s, k), args.warmup, hf=False)
                rows.append({**row, "loss": loss})
                print(f"{loss} {mode} K={k}: {row['accepted']:.2f} accepted steps, {row['speedup']:.2f}x", flush=True)
    s = next(iter(served.values()))
    lines = common.header(args, "Draft alignment: accepted steps, speedup and accuracy per align_loss", s.config,
                          decoders.facts({"strict and relaxed": s})[:1])
    lines += tables(rows)
    common.plot_lines(args.plot, [(f"accepted steps ({mode})", common.series([r for r in rows if r["mode"] == mode],
                                                                             lambda r: r["loss"], "k", "accepted"))
                                  for mode in args.modes],
                      "K (beams = items returned)", f"{args.dataset}: accepted steps per align_loss, batch 1")
    common.write(lines, args.output, args.plot)


def tables(rows) -> list[str]:
    lines = ["Accepted steps = drafted levels accepted per request (at most 3 with 4-code IDs, at most 2 with "
             "gamma = 1); speedup = median target-only time / median speculative time (strict: vs `beam_search`; "
             "relaxed: vs `beam_sample`); each row's tree (N, gamma): --trees for its K, else --draft_beams / "
             "--gamma, else the config's (N >= K); batch 1.", "",
             *common.table(["align_loss", "mode", "K", "N", "gamma", "accepted steps", "target calls", "speedup"],
                           [[r["loss"], r["mode"], r["k"], r["n"], r["gamma"], f"{r['accepted']:.2f}",
                             f"{r['calls']:.2f}", f"{r['speedup']:.2f}x"] for r in rows]),
             "", "RecBole's metrics against each user's held-out test item (cut-offs: the config's topk up to K, "
             "or K) of the speculative output and of the target's own `beam_search`:", "",
             *common.metric_table(["align_loss", "mode", "K", "decoding"],
                                  [([r["loss"], r["mode"], r["k"], decoding], r["metrics"][decoding])
                                   for r in rows for decoding in ("speculative", "beam_search")])]
    base = {(r["mode"], r["k"]): r["accepted"] for r in rows if r["loss"] == "none"}
    if base:
        lines += ["", "Accepted steps relative to the plain fine-tuned draft (`none`):", "",
                  *common.table(["align_loss", "mode", "K", "accepted steps", "vs none"],
                                [[r["loss"], r["mode"], r["k"], f"{r['accepted']:.2f}",
                                  f"{r['accepted'] - base[(r['mode'], r['k'])]:+.2f}"]
                                 for r in rows if r["loss"] != "none" and (r["mode"], r["k"]) in base])]
    return lines


def main(argv=None) -> int:
    return common.main(parse_args(argv), benchmark)


if __name__ == "__main__":
    sys.exit(main())
