"""What the benchmark scripts share: the command line, models and checkpoints, seeded test requests,
interleaved timing, RecBole's metrics, and markdown tables and plots.

A script is run as `python benchmarks/<name>.py` (its folder is then on sys.path: `import common`).
It reads its own options first, then run_recbole.py's arguments exactly as run_recbole.py does
(`atspeed_rec.recbole_glue.cli.parse_args`): `--dataset`, `--data_path`, `--config_files`,
`--model` and any `--key=value` property override, so the config, the data split and the trained
checkpoint it names are the ones `python run_recbole.py` with the same arguments made.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import inspect
import os
import platform
import shlex
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from recbole.data import create_dataset, data_preparation
from recbole.evaluator import Collector, Evaluator
from recbole.evaluator.base_metric import TopkMetric
from recbole.evaluator.register import metrics_dict
from recbole.utils import init_seed
from tqdm import tqdm

import atspeed_rec  # noqa: F401  (RecBole compatibility patches, before any Config)
from atspeed_rec.errors import AtSpeedError
from atspeed_rec.recbole_glue import cli
from atspeed_rec.recbole_glue.checkpoint import checkpoint_path, load_checkpoint
from atspeed_rec.recbole_glue.genrec import beams_to_scores
from atspeed_rec.recbole_glue.metrics import SPEC_METRICS, timed
from atspeed_rec.recbole_glue.registry import get_model_class
from atspeed_rec.recbole_glue.runner import build_config, check_dataset
from atspeed_rec.recbole_glue.validation import topk_cutoffs

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


# ---------------------------------------------------------------- command line


def parser(script: str, doc: str, requests: int | None = 200, output: str | None = None, plot: str | None = None,
           untrained: bool = True) -> argparse.ArgumentParser:
    """The options every benchmark has (a script adds its own): `requests` (None: no requests, no
    --warmup), `output`/`plot` (default file names in docs/results/; no output: print only), `untrained`
    (--allow_untrained). No abbreviations: an option the script lacks is a property override."""
    p = argparse.ArgumentParser(prog=f"benchmarks/{Path(script).name}", description=doc.split("\n\n")[0],
                                allow_abbrev=False, epilog="Then run_recbole.py's arguments: --dataset, --data_path, "
                                "--config_files, --model and --key=value property overrides.")
    if requests is not None:
        p.add_argument("--requests", type=int, default=requests, help="test users, sampled with the config's seed")
        p.add_argument("--warmup", type=int, default=5, help="untimed request batches per setting (at most half)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    p.add_argument("--output", type=Path, default=None,
                   help=f"markdown file (default: docs/results/{output})" if output else "markdown file")
    p.set_defaults(default_output=RESULTS / output if output else None)
    if plot:
        p.add_argument("--plot", type=Path, default=None,
                       help=f"PNG file (default: --output's name with .png, or docs/results/{plot})")
        p.set_defaults(default_plot=RESULTS / plot)
    if untrained:
        p.add_argument("--allow_untrained", action="store_true",
                       help="random weights when no trained checkpoint exists (timing smoke tests only)")
    return p


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.replace(",", " ").split()]


def parse(p: argparse.ArgumentParser, argv, models: tuple[str, ...]) -> argparse.Namespace:
    """`p`'s options, then run_recbole.py's arguments; `--model`, when given, must be one of `models`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = p.parse_known_args(argv)
    run, overrides = cli.parse_args(rest)
    if getattr(args, "draft_start", None) is not None:  # decoders.add_options's: not in any checkpoint's key,
        overrides.setdefault("draft_start", args.draft_start)  # so the config checks it too (against sid_levels)
    given = any(a.split("=")[0] in ("--model", "-m") for a in rest)
    if given and run.model not in models:
        p.error(f"--model={run.model}: this benchmark runs {' and '.join(models)}")
    args.model = run.model if given else None
    if run.result_file or run.nproc != 1:
        p.error("--result_file and --nproc are run_recbole.py's: a benchmark writes --output, in one process")
    if "default_plot" in args and args.plot is None:  # beside a custom --output, never over docs' own plot
        args.plot = args.output.with_suffix(".png") if args.output else args.default_plot
    args.output = args.output or args.default_output
    args.dataset, args.overrides = run.dataset, overrides
    args.config_files = run.config_files.replace(",", " ").split() if run.config_files else None
    args.command = " ".join(["python", p.prog, *map(shlex.quote, argv)])
    return args


def main(args, benchmark) -> int:
    """Run `benchmark(args)` on `args.threads` threads; a configuration error is one line and exit code 2."""
    torch.set_num_threads(args.threads)
    try:
        benchmark(args)
    except AtSpeedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


# ---------------------------------------------------------------- config, data, models


def build(args, model: str, **overrides):
    """`model`'s RecBole Config, as run_recbole.py builds it from the same arguments."""
    return build_config(model, args.dataset, args.config_files, {**args.overrides, "show_progress": False,
                                                                 **overrides})


def load_data(config):
    """(dataset, train, valid and test loaders), split as run_recbole.py splits them."""
    check_dataset(config)
    dataset = create_dataset(config)
    return (dataset, *data_preparation(config, dataset))


def run_command(args, model: str) -> str:
    """The run_recbole.py command that trains `model` for these arguments."""
    parts = [f"--model={model}", f"--dataset={args.dataset}"]
    if args.config_files:
        parts.append(f"--config_files={','.join(args.config_files)}")
    parts += [f"--{k}={v}" for k, v in args.overrides.items()]
    return " ".join(["python run_recbole.py", *map(shlex.quote, parts)])


def find_checkpoint(args, names: tuple[str, ...]):
    """(name, config, path) of the first of `names` with a trained checkpoint for these arguments;
    (names[0], its config, None) when none has one and --allow_untrained is given, else exit saying
    how to train it."""
    configs = {}
    for name in names:
        configs[name] = config = build(args, name)
        path = checkpoint_path(config, name, get_model_class(name).checkpoint_keys)
        if path.is_file():
            return name, config, path
    untrained = getattr(args, "allow_untrained", None)  # None: the script has no such option (accuracy.py)
    if not untrained:
        sys.exit(f"error: no trained {' or '.join(names)} checkpoint for this dataset and configuration in "
                 f"{Path(configs[names[0]]['checkpoint_dir']).resolve()}; train one with\n\n    "
                 f"{run_command(args, names[0])}"
                 + ("" if untrained is None else "\n\n(--allow_untrained times random weights instead)"))
    return names[0], configs[names[0]], None


def instantiate(name: str, config, train, path):
    """The model `name` (seeded initialisation), with the weights at `path` when given, on the config's device."""
    init_seed(config["seed"], config["reproducibility"])
    model = get_model_class(name)(config, train._dataset).eval()
    if path is not None:
        load_checkpoint(model, path)
    return model.to(config["device"])


def weights_label(path) -> str:
    return f"trained ({path})" if path is not None else "RANDOM WEIGHTS (--allow_untrained, no checkpoint)"


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- requests and timing


@dataclass
class Request:
    """A batch of test users as RecBole's full-sort test loader collates it, and their prompts."""

    ids: torch.Tensor  # [B, P] left-padded prompt tokens, on the model's device
    mask: torch.Tensor  # [B, P]
    batch: tuple  # (interaction, history_index, positive_u, positive_i): the loader's collate_fn output
    n_items: int

    @property
    def users(self) -> int:
        return len(self.ids)


def sample_requests(test, prompt, n: int, batch: int, seed: int, device) -> list[Request]:
    """`max(1, n // batch)` batches of `batch` test users drawn without replacement (seeded), each
    collated by the test loader itself and prompted by `prompt(interaction)`."""
    order = torch.randperm(test.sample_size, generator=torch.Generator().manual_seed(seed))
    out = []
    for rows in order[:max(1, n // batch) * batch].split(batch):
        if len(rows) < batch and out:
            break
        data = test.collate_fn(rows.numpy())
        ids, mask = prompt(data[0].to(device))
        out.append(Request(ids, mask, data, test._dataset.item_num))
    return out


class Timing(NamedTuple):
    seconds: float  # the median over the timed request batches
    outputs: list  # fn's output on every request batch, the untimed ones too
    times: list[float]  # seconds of each timed request batch, in request order


def interleaved(fns: dict, requests: list[Request], warmup: int, progress: str | None = None) -> dict:
    """Every fn on every request batch, the order rotated per batch: {name: Timing} over the batches after
    the first `warmup` (at most half). On a GPU each timing waits for its kernels.
    `progress`: the label of a progress bar over the batches (none by default)."""
    names, times, outs = list(fns), {n: [] for n in fns}, {n: [] for n in fns}
    warmup = min(warmup, len(requests) // 2)
    bar = tqdm(requests, desc=f"{progress or '':<11}", ncols=100, disable=progress is None)  # RecBole's style
    for i, r in enumerate(bar):
        for name in names[i % len(names):] + names[:i % len(names)]:
            out, seconds = timed(lambda: fns[name](r.ids, r.mask), r.ids.device)  # noqa: B023 (called at once)
            outs[name].append(out)
            if i >= warmup:
                times[name].append(seconds)
    return {n: Timing(statistics.median(times[n]), outs[n], times[n]) for n in names}


def mean_ratio(baseline: Timing, spec: Timing) -> float:
    """The paper's speedup: each request batch's baseline time / its speculative time, averaged. Beside the
    ratio of medians it sees the minority of requests that need a second target call."""
    return statistics.mean(b / s for b, s in zip(baseline.times, spec.times))


# ---------------------------------------------------------------- RecBole's metrics


def cutoffs(config, k: int) -> list[int]:
    """The config's topk cut-offs that a top-k list fills; [k] when none does."""
    return [c for c in topk_cutoffs(config) if c <= k] or [k]


def _collected(config, requests: list[Request], results, k: int):
    """(evaluator config, RecBole's collected data) of top-`k` BeamResults, fed as RecBole's trainer
    feeds them: the beams as full-sort scores (`beams_to_scores`), PAD and any history item masked."""
    cfg = copy.copy(config)
    cfg.final_config_dict = {**config.final_config_dict, "topk": cutoffs(config, k),
                             "metrics": [m for m in config["metrics"] if m.lower() not in SPEC_METRICS]}
    collector = Collector(cfg)
    for request, beams in zip(requests, results):
        interaction, history, positive_u, positive_i = request.batch
        scores = beams_to_scores(beams, request.n_items).float().cpu()  # [B, n_items]
        scores[:, 0] = -np.inf
        if history is not None:
            scores[history] = -np.inf
        collector.eval_batch_collect(scores, interaction, positive_u, positive_i)
    return cfg, collector.get_data_struct()


def recbole_metrics(config, requests: list[Request], results, k: int) -> dict[str, float]:
    """The config's metrics (its speculative statistics aside) of top-`k` BeamResults by RecBole's
    Collector and Evaluator, at `cutoffs(config, k)`."""
    cfg, data = _collected(config, requests, results, k)
    return {name: float(value) for name, value in Evaluator(cfg).evaluate(data).items()}


def per_user_metrics(config, requests: list[Request], results, k: int) -> dict[str, np.ndarray]:
    """`{metric@cutoff: [n_users]}`: each user's value of the config's top-k metrics (recall, ndcg, hit,
    ...), by RecBole's own metric classes; their means are `recbole_metrics`'s values (to rounding)."""
    cfg, data = _collected(config, requests, results, k)
    out = {}
    for name in cfg["metrics"]:
        metric_cls = metrics_dict[name.lower()]
        if not issubclass(metric_cls, TopkMetric):
            continue
        metric = metric_cls(cfg)
        pos_index, pos_len = metric.used_info(data)  # [n_users, max cut-off] hits, [n_users] positives
        takes_len = len(inspect.signature(metric.metric_info).parameters) == 2
        values = metric.metric_info(pos_index, pos_len) if takes_len else metric.metric_info(pos_index)
        out.update({f"{name.lower()}@{c}": values[:, c - 1] for c in cfg["topk"]})
    return out


def mean_interval(values: np.ndarray, z: float = 1.96) -> tuple[float, float]:
    """(mean, half-width of its 95% confidence interval): the normal approximation, z * sd / sqrt(n).
    Over paired per-user differences (two targets on the same users) it is the interval of the difference."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), float(z * values.std(ddof=1) / np.sqrt(len(values)))


# ---------------------------------------------------------------- reporting


def header(args, title: str, config, facts=()) -> list[str]:
    """Title, command line, machine, device, dataset and requests, then `facts` as bullets."""
    return [f"# {title}", "", f"    {args.command}", "",
            f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
            f"- machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), torch threads "
            f"{torch.get_num_threads()}, torch {torch.__version__}, load average "
            f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} at the end",
            f"- device: {device_name(config['device'])}",
            f"- dataset: {args.dataset} ({config['data_path']})" + (
                f", {args.requests} test users sampled with seed {config['seed']}, the first {args.warmup} request "
                "batches of a setting untimed (at most half)" if hasattr(args, "requests") else ""),
            *[f"- {fact}" for fact in facts], ""]


def device_name(device) -> str:
    device = torch.device(device)
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


def fmt(x, spec: str = "{:.2f}") -> str:
    return "–" if x is None else spec.format(x)


def table(columns: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *["| " + " | ".join(map(str, row)) + " |" for row in rows]]


def metric_table(lead: list[str], rows: list[tuple[list, dict]]) -> list[str]:
    """rows: (lead cells, {metric@k: value}); one column per metric of any row, by cut-off ('–': not computed)."""
    names = list(dict.fromkeys(m for _, values in rows for m in values))
    names.sort(key=lambda m: int(m.split("@")[1]) if "@" in m else 0)
    return table(lead + names, [cells + [fmt(values.get(m), "{:.4f}") for m in names] for cells, values in rows])


def series(rows, key_of, x: str, y: str) -> dict:
    """{label: ([x], [y])} of `rows` (dicts), skipping rows whose y is None."""
    out = {}
    for r in rows:
        if r[y] is not None:
            xs, ys = out.setdefault(key_of(r), ([], []))
            xs.append(r[x]), ys.append(r[y])
    return out


def plot_lines(path: Path, panels, xlabel: str, title: str) -> None:
    """panels: [(ylabel, {label: ([x], [y])})], one subplot each (empty panels left out)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(ylabel, lines) for ylabel, lines in panels if lines]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    markers = "os^Dv"  # a new marker every 10 lines, so no two series share colour and marker
    for ax, (ylabel, lines) in zip(axes[0], panels):
        for i, (label, (xs, ys)) in enumerate(lines.items()):
            ax.plot(xs, ys, color=colors[i % len(colors)], marker=markers[i // len(colors) % len(markers)],
                    label=label, linestyle="--" if "relaxed" in label else "-")
        if "speedup" in ylabel:
            ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks(sorted({x for xs, _ in lines.values() for x in xs}))
        ax.set_xlabel(xlabel), ax.set_ylabel(ylabel), ax.grid(alpha=0.3), ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(lines: list[str], output: Path | None, *others: Path) -> None:
    """Print the report; write it to `output` when given (`others`: files already written beside it)."""
    print("\n".join(lines))
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text("\n".join(lines) + "\n")
        print(f"\nwrote {', '.join(map(str, (output, *others)))}")
