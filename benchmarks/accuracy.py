"""Test accuracy of trained GenRec targets on a sample of test users: training recipes compared cheaply.

The test pass of `run_recbole.py` decodes every test user (22,363 on amazon-beauty: ~47 minutes for
the LLM target on 2 cores). To compare training recipes, this decodes a seeded sample of the same
test users (`--requests`, batches of `--batch`) with the target's own beam search at its `num_beams`
and scores them with RecBole's evaluator, as the test pass scores them. Each `--variant
LABEL:key=value,key=value` is a trained checkpoint: run_recbole.py's arguments plus those
overrides (none: the arguments alone); every variant decodes the same users. A second table gives
each metric's 95% confidence interval over those users and each variant's difference from the first,
paired user by user: on ~3,000 amazon-beauty users an NDCG@10 is uncertain by about ±0.005 (±15%), and
a paired difference hardly less (two targets hit mostly different users), so recipes that differ by
a few percent cannot be told apart on such a sample.

    python benchmarks/accuracy.py --dataset=amazon-beauty --data_path=DIR \
        --variant="lr 1e-3:epochs=1,learning_rate=0.001" --variant="lr 3e-3:epochs=1,learning_rate=0.003"

writes docs/results/target_accuracy.md. A missing checkpoint stops with the command that trains it.
"""

from __future__ import annotations

import argparse
import re
import sys

import torch

import common
from atspeed_rec.decoding.beam_search import beam_search
from atspeed_rec.recbole_glue import cli


def variant(text: str) -> tuple[str, dict]:
    """`LABEL:key=value,...` -> (label, {key: value}), values read as run_recbole.py reads them
    (a list value keeps its commas: `lora_targets=['q_proj','v_proj']`)."""
    label, _, rest = text.partition(":")
    overrides = {}
    items = re.split(r",(?![^\[]*\])", rest)  # commas inside a [list] value stay in it
    for item in filter(None, (kv.strip().lstrip("-") for kv in items)):
        key, eq, value = item.partition("=")
        if not eq or key in ("model", "dataset", "config_files", "data_path"):
            raise argparse.ArgumentTypeError(f"{item!r}: a variant is LABEL:key=value,... of property overrides "
                                             "(the dataset and data path are the command's own)")
        overrides[key] = cli.parse_value(value)
    return label.strip() or "config", overrides


def parse_args(argv=None):
    p = common.parser(__file__, __doc__, requests=3000, output="target_accuracy.md", untrained=False)
    p.add_argument("--batch", type=int, default=32, help="test users a beam-search batch")
    p.add_argument("--variant", type=variant, action="append", default=None,
                   help="LABEL:key=value,... a trained target with these overrides (repeatable)")
    args = common.parse(p, argv, ("GenRec",))
    args.variants = args.variant or [("config", {})]  # no variant: the checkpoint of the arguments alone
    return args


def evaluate(args, label: str, overrides: dict) -> dict:
    """One variant's checkpoint on the sampled test users: RecBole's metrics and decoding time."""
    sub = argparse.Namespace(**{**vars(args), "overrides": {**args.overrides, **overrides}})
    name, config, path = common.find_checkpoint(sub, ("GenRec",))
    _, train, _, test = common.load_data(config)
    model = common.instantiate(name, config, train, path)
    requests = common.sample_requests(test, model.prompt, args.requests, args.batch, config["seed"], config["device"])
    search = {"beam_search": lambda ids, mask: beam_search(model.lm, model.trie, model.vocab, ids, mask, model.num_beams)}
    with torch.no_grad():
        seconds, beams, _ = common.interleaved(search, requests, args.warmup, progress=label)["beam_search"]
    return {"config": config, "path": path, "users": sum(r.users for r in requests),
            "ms": 1000 * seconds / args.batch,
            "metrics": common.recbole_metrics(config, requests, beams, model.num_beams),
            "per_user": common.per_user_metrics(config, requests, beams, model.num_beams),
            "user_ids": torch.cat([r.batch[0][config["USER_ID_FIELD"]] for r in requests])}


def benchmark(args) -> None:
    rows = []
    for label, overrides in args.variants:
        r = evaluate(args, label, overrides)
        rows.append((label, overrides, r))
        print(f"{label}: {r['users']} users, " + ", ".join(f"{k} {v:.4f}" for k, v in r["metrics"].items()), flush=True)
    config = rows[0][2]["config"]
    metrics = list(rows[0][2]["metrics"])
    lines = common.header(args, "Target accuracy on sampled test users", config)
    lines += [f"The target's own beam search (K = {config['num_beams']}), test split, full ranking, RecBole's "
              f"evaluator; {rows[0][2]['users']} test users, the same for every row; decoding time a request "
              f"(median over batches of {args.batch}).", "",
              *common.table(["variant", "overrides", *metrics, "ms a request", "checkpoint"],
                            [[label, " ".join(f"{k}={v}" for k, v in o.items()) or "-",
                              *[f"{r['metrics'][m]:.4f}" for m in metrics], f"{r['ms']:.1f}", r["path"].name]
                             for label, o, r in rows])]
    lines += ["", *intervals(rows)]
    common.write(lines, args.output)


def intervals(rows) -> list[str]:
    """A table of each variant's per-user metrics as mean ± the half-width of its 95% interval, then each
    later variant's difference from the first, paired user by user (where they decoded the same users)."""
    metrics = [m for m in rows[0][2]["per_user"] if m in rows[0][2]["metrics"]]
    first_label, _, first = rows[0]

    def cell(values, signed=False):
        mean, half = common.mean_interval(values)
        return f"{mean:+.4f} ± {half:.4f}" if signed else f"{mean:.4f} ± {half:.4f}"

    table = [[label, *[cell(r["per_user"][m]) for m in metrics]] for label, _, r in rows]
    for label, _, r in rows[1:]:
        if torch.equal(r["user_ids"], first["user_ids"]):
            table.append([f"{label} - {first_label} (paired)",
                          *[cell(r["per_user"][m] - first["per_user"][m], signed=True) for m in metrics]])
        else:
            table.append([f"{label} - {first_label}", *["not paired: other users"] * len(metrics)])
    return ["Each metric's mean over the users with the half-width of its 95% confidence interval (normal "
            "approximation, 1.96 standard errors); the rows below the variants are differences from the first, "
            "paired user by user: an interval that excludes 0 is a difference these users show, not sampling noise.",
            "", *common.table(["variant", *metrics], table)]


def main(argv=None) -> int:
    return common.main(parse_args(argv), benchmark)


if __name__ == "__main__":
    sys.exit(main())
