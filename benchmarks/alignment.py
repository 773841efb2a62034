"""Benchmark the draft-alignment objectives: every `align_loss` x {strict, relaxed} x K.

For each alignment loss a draft is trained for the same GenRec target (reused from its checkpoint;
teacher data reused from its cache; a draft already trained for this configuration is reused too),
then decoded speculatively on the first `--requests` test users, batch 1, in both verification
modes, against our target-only baseline (strict: `beam_search`, relaxed: `beam_sample`), with
accepted steps per request, speedup and Recall/NDCG@min(K, 10) of relaxed decoding next to the
target's own beam search.

    python benchmarks/alignment.py --dataset=amazon-beauty --data_path=../shared/datasets

writes docs/alignment_benchmark.md and docs/alignment_accepted.png. Training options are
properties, as on run_recbole.py: `--override draft_epochs=4 teacher_per_user=2`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from recbole.data import create_dataset, data_preparation
from recbole.utils import init_logger, init_seed

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speculative as sb  # noqa: E402  (the speculative benchmark's measuring and reporting helpers)

from atspeed_rec.alignment.losses import ALIGN_LOSSES  # noqa: E402
from atspeed_rec.recbole_glue.atspeed import AtSpeedS  # noqa: E402
from atspeed_rec.recbole_glue.pipeline import AtSpeedTrainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv):
    argv = list(argv)
    losses = list(ALIGN_LOSSES)
    if "--losses" in argv:
        i = argv.index("--losses")
        losses = argv[i + 1].replace(",", " ").split()
        del argv[i:i + 2]
    args = sb.parse_args(argv)
    args.losses = losses
    unknown = [x for x in losses if x not in ALIGN_LOSSES]
    if unknown:
        sys.exit(f"error: --losses: unknown {unknown}; valid: {', '.join(ALIGN_LOSSES)}")
    if "--output" not in " ".join(argv):
        args.output = ROOT / "docs" / "alignment_benchmark.md"
    if "--plot" not in " ".join(argv):
        args.plot = ROOT / "docs" / "alignment_accepted.png"
    return args


def draft_for(args, loss: str):
    """The AtSpeed model whose draft was aligned with `loss` (trained here when not cached)."""
    args.override = [o for o in args.override if not o.startswith("align_loss=")] + [f"align_loss={loss}"]
    config = sb.build(args, "AtSpeedS")
    config["show_progress"] = True
    init_logger(config)
    train, valid, test = data_preparation(config, create_dataset(config))
    init_seed(config["seed"], config["reproducibility"])
    model = AtSpeedS(config, train._dataset)
    trainer = AtSpeedTrainer(config, model)
    trainer.fit(train, valid, saved=True, show_progress=True)  # reuses every cached stage
    return model.eval(), test, config


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    rows, models, config = [], {}, None
    for loss in args.losses:
        model, test, config = draft_for(args, loss)
        models[loss] = model = model.to(args.device)
        requests = sb.make_requests(model.target, test, args.requests, 1, args.device)
        with torch.no_grad():
            for mode in args.modes:
                for k in args.ks:
                    n = max(args.draft_beams or int(config["draft_beams"]), k)
                    row = sb.run_setting(model, mode, requests, k, n, args.gamma or int(config["gamma"]), args)
                    rows.append({**row, "loss": loss})
                    print(f"{loss} {mode} K={k}: {row['accepted']:.2f} accepted steps, {row['speedup']:.2f}x",
                          flush=True)
    write(args, rows, models, config)
    return 0


def write(args, rows, models, config) -> None:
    m = next(iter(models.values()))
    tp, dp = sb.n_params(m.target.lm), sb.n_params(m.draft)
    lines = ["# Draft alignment: accepted steps, speedup and accuracy per align_loss", "",
             "    " + " ".join(["python", *sys.argv]), "",
             f"- target {tp / 1e6:.3f} M parameters, draft {dp / 1e6:.3f} M (target / draft = {tp / dp:.1f}x); "
             f"N = max(draft_beams, K), gamma = {args.gamma or config['gamma']}, batch 1, "
             f"{args.requests} test users, first {args.warmup} untimed",
             f"- properties: {' '.join(o for o in args.override if not o.startswith('align_loss='))}", "",
             "Accepted steps = drafted levels accepted per request (at most 3 with 4-code IDs, at most 2 with "
             "gamma = 1); speedup = "
             "median target-only time / median speculative time (strict: vs `beam_search`; relaxed: vs "
             "`beam_sample`); accuracy @c = min(K, 10) on the users' held-out test items.", "",
             "| align_loss | mode | K | accepted steps | target calls | speedup | SD Recall | SD NDCG "
             "| target Recall | target NDCG |", "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['loss']} | {r['mode']} | {r['k']} | {r['accepted']:.2f} | {r['calls']:.2f} "
                     f"| {r['speedup']:.2f}x | {r['spec_acc'][0]:.4f} | {r['spec_acc'][1]:.4f} "
                     f"| {r['target_acc'][0]:.4f} | {r['target_acc'][1]:.4f} |")
    base = {(r["mode"], r["k"]): r["accepted"] for r in rows if r["loss"] == "none"}
    if base:
        lines += ["", "Accepted steps relative to the plain fine-tuned draft (`none`):", "",
                  "| align_loss | mode | K | accepted steps | vs none |", "|---|---|---|---|---|"]
        for r in rows:
            if r["loss"] != "none" and (r["mode"], r["k"]) in base:
                delta = r["accepted"] - base[(r["mode"], r["k"])]
                lines.append(f"| {r['loss']} | {r['mode']} | {r['k']} | {r['accepted']:.2f} | {delta:+.2f} |")
    sb.plot_lines(args.plot, [(f"accepted steps ({mode})", sb.series([r for r in rows if r["mode"] == mode],
                                                                     lambda r: r["loss"], "k", "accepted"))
                              for mode in args.modes],
                  "K (beams = items returned)", f"{args.dataset}: accepted steps per align_loss, batch 1")
    sb.write(args, lines)


if __name__ == "__main__":
    sys.exit(main())
