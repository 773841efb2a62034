"""`run_recbole.py`'s argument parsing: RecBole's flags plus the project's own."""

from __future__ import annotations

import argparse
import ast
import json
import sys

import yaml

from atspeed_rec.errors import AtSpeedError


def parse_value(text: str):
    """A `--key=value` value as RecBole reads it: a Python literal when it is one, a list or mapping written
    as in the property files (`[q_proj, v_proj]`, unquoted words) when it is one, else a string."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    if text.lstrip().startswith(("[", "{")):
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            return text
        if isinstance(value, (list, dict)):
            return value
    return text


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, dict]:
    parser = argparse.ArgumentParser(
        prog="run_recbole.py",
        description="Train and evaluate a recommender (AtSpeed models or RecBole's) with RecBole.",
        epilog="Any other --key=value overrides a RecBole/model property, e.g. --epochs=5.",
    )
    parser.add_argument("--model", "-m", default="AtSpeedR", help="model name (default: AtSpeedR)")
    parser.add_argument("--dataset", "-d", default="ml-100k", help="dataset name (default: ml-100k)")
    parser.add_argument("--config_files", default=None,
                        help="extra property files, separated by spaces or commas, applied in order")
    parser.add_argument("--data_path", default=None, help="folder holding <dataset>/<dataset>.inter")
    parser.add_argument("--result_file", default=None, help="write best-valid and test metrics as JSON here")
    parser.add_argument("--nproc", type=int, default=1, help="processes for torch.distributed (gloo on CPU)")
    args, rest = parser.parse_known_args(argv)
    overrides = {}
    for item in rest:
        if not item.startswith("--") or "=" not in item:
            parser.error(f"unrecognised argument '{item}': overrides are written --key=value")
        key, value = item[2:].split("=", 1)
        overrides[key] = parse_value(value)
    if args.data_path is not None:
        overrides["data_path"] = args.data_path
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    from atspeed_rec.recbole_glue.runner import run

    config_files = args.config_files.replace(",", " ").split() if args.config_files else None
    try:
        result = run(args.model, args.dataset, config_files, overrides, nproc=args.nproc,
                     result_file=args.result_file)
    except AtSpeedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = {"model": result["model"], "dataset": result["dataset"], "test": result["test"],
               "wall_time_s": result["wall_time_s"]}
    print(json.dumps(summary, indent=2))
    return 0
