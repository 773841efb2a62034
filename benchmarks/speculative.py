"""Benchmark AtSpeed speculative beam search against target-only decoding, on real test users.

For each setting (mode x K x batch size) the same request batches (the prompts of the first
`--requests` test users of the dataset) are decoded by speculative beam search, by our target-only
baseline (strict: `beam_search`; relaxed: `beam_sample`, the target-only sampling that relaxed
verification approximates) and by Hugging Face `generate` beam search (both modes: HF has no
trie-constrained beam sampling), interleaved per request batch (order rotated every batch). The
first `--warmup` batches of a setting are not timed; speedup = median baseline time / median
speculative time. Acceptance statistics and Recall/NDCG@min(K, 10) against each user's held-out
test item are computed over all the setting's users.

    python benchmarks/speculative.py --dataset=amazon-beauty --data_path=../shared/datasets
    python benchmarks/speculative.py --dataset=amazon-beauty --data_path=../shared/datasets --frontier

The first writes docs/speculative_benchmark.md and docs/speculative_speedup.png; the second (fixed
K = 10 or --frontier_k, batch 1, a grid of draft widths N and draft depths gamma) docs/speculative_frontier.md and
docs/speculative_frontier.png. Weights: the trained AtSpeedS checkpoint (strict) and AtSpeedR
checkpoint (relaxed) of this dataset and configuration in saved/ (either one serves both modes when
the other is missing); train them first with

    python run_recbole.py --model=AtSpeedS --dataset=amazon-beauty --data_path=../shared/datasets
    python run_recbole.py --model=AtSpeedR --dataset=amazon-beauty --data_path=../shared/datasets

`--allow_untrained` runs on random weights instead (smoke tests: timings of a forward pass hold,
acceptance and accuracy mean nothing; the output says so). Model properties can be changed with
`--config_files` and `--override key=value ...` exactly as on run_recbole.py's command line.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
from pathlib import Path

import torch
from recbole.data import create_dataset, data_preparation
from recbole.utils import init_seed

import atspeed_rec  # noqa: F401  (RecBole compatibility patches)
from atspeed_rec.decoding.beam_search import beam_search
from atspeed_rec.decoding.hf_generate import hf_beam_search
from atspeed_rec.decoding.sampling import beam_sample
from atspeed_rec.decoding.speculative import MODES, speculative_beam_search
from atspeed_rec.errors import AtSpeedError
from atspeed_rec.recbole_glue.atspeed import AtSpeedR, AtSpeedS
from atspeed_rec.recbole_glue.metrics import timed
from atspeed_rec.recbole_glue.checkpoint import checkpoint_path, load_checkpoint
from atspeed_rec.recbole_glue.cli import parse_value
from atspeed_rec.recbole_glue.runner import build_config, check_dataset

ROOT = Path(__file__).resolve().parents[1]
MODEL_OF_MODE = {"strict": AtSpeedS, "relaxed": AtSpeedR}
BASELINE_OF_MODE = {"strict": "beam_search", "relaxed": "beam_sample"}


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.replace(",", " ").split()]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="amazon-beauty")
    p.add_argument("--data_path", default=str(ROOT.parent / "shared" / "datasets"))
    p.add_argument("--config_files", default=None, help="extra property files (as run_recbole.py)")
    p.add_argument("--override", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="property overrides, as --KEY=VALUE on run_recbole.py")
    p.add_argument("--ks", type=int_list, default=[1, 3, 5, 10, 20], help="beam widths K, e.g. 1,3,5,10,20")
    p.add_argument("--batches", type=int_list, default=[1, 16], help="batch sizes, e.g. 1,16")
    p.add_argument("--modes", type=lambda s: s.replace(",", " ").split(), default=list(MODES))
    p.add_argument("--draft_beams", type=int, default=None, help="N (default: the config's; raised to K)")
    p.add_argument("--gamma", type=int, default=None, help="draft levels per round (default: the config's)")
    p.add_argument("--frontier", action="store_true", help="one K (--frontier_k), batch 1, over N x gamma instead")
    p.add_argument("--frontier_k", type=int, default=10, help="K of --frontier")
    p.add_argument("--frontier_n", type=int_list, default=[10, 12, 15, 20, 30, 40])
    p.add_argument("--frontier_gamma", type=int_list, default=[1, 2, 3])
    p.add_argument("--requests", type=int, default=200, help="test users per setting")
    p.add_argument("--warmup", type=int, default=5, help="untimed request batches per setting (<= half)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]: where models and requests live")
    p.add_argument("--skip_hf", action="store_true", help="do not time HF generate")
    p.add_argument("--allow_untrained", action="store_true", help="random weights when no checkpoint exists")
    p.add_argument("--output", default=None, help="markdown file (default docs/speculative_{benchmark,frontier}.md)")
    p.add_argument("--plot", default=None, help="PNG (default docs/speculative_{speedup,frontier}.png)")
    args = p.parse_args(argv)
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        p.error(f"--modes: unknown {bad}, choose from {MODES}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device={args.device}: this machine has no CUDA device (use --device=cpu)")
    for item in args.override:
        if "=" not in item:
            p.error(f"--override expects KEY=VALUE, got {item!r}")
    name = "frontier" if args.frontier else "benchmark"
    args.output = Path(args.output or ROOT / "docs" / f"speculative_{name}.md")
    args.plot = Path(args.plot or ROOT / "docs" / f"speculative_{'frontier' if args.frontier else 'speedup'}.png")
    return args


# ---------------------------------------------------------------- models and requests


def overrides(args) -> dict:
    return {k: parse_value(v) for k, v in (item.split("=", 1) for item in args.override)}


def train_command(args, model_name: str) -> str:
    parts = ["python run_recbole.py", f"--model={model_name}", f"--dataset={args.dataset}",
             f"--data_path={args.data_path}"]
    if args.config_files:
        parts.append(f"--config_files={shlex.quote(args.config_files)}")
    parts += [shlex.quote(f"--{item}") for item in args.override]
    return " ".join(parts)


def build(args, model_name: str):
    files = args.config_files.replace(",", " ").split() if args.config_files else None
    extra = {"data_path": args.data_path, "show_progress": False, "eval_batch_size": 256}
    return build_config(model_name, args.dataset, files, {**overrides(args), **extra})


def find_checkpoints(args, modes) -> dict:
    """{mode: checkpoint path or None}: each mode's own model first, else the other AtSpeed model's."""
    found = {}
    for cls in (AtSpeedS, AtSpeedR):
        path = checkpoint_path(build(args, cls.__name__), cls.__name__, cls.checkpoint_keys)
        found[cls.__name__] = path if path.is_file() else None
    paths = {}
    for mode in modes:
        own = MODEL_OF_MODE[mode].__name__
        other = "AtSpeedR" if own == "AtSpeedS" else "AtSpeedS"
        paths[mode] = found[own] or found[other]
    if any(p is None for p in paths.values()) and not args.allow_untrained:
        needed = list(dict.fromkeys(MODEL_OF_MODE[m].__name__ for m in modes))
        sys.exit("error: no trained AtSpeed checkpoint for this dataset and configuration in "
                 f"{Path(build(args, 'AtSpeedS')['checkpoint_dir']).resolve()}; train one with\n\n    "
                 + "\n    ".join(train_command(args, name) for name in needed)
                 + "\n\n(strict uses AtSpeedS's draft and relaxed AtSpeedR's; either one serves both modes "
                 "when the other is missing; --allow_untrained times random weights instead)")
    return paths


def load_models(args, modes):
    """{mode: AtSpeed model}, {mode: weights label}, the test loader and the config."""
    config = build(args, "AtSpeedS")
    check_dataset(config)
    paths = find_checkpoints(args, modes)
    train, _, test = data_preparation(config, create_dataset(config))
    models, labels, by_path = {}, {}, {}
    for mode in modes:
        path = paths[mode]
        if path not in by_path:
            init_seed(config["seed"], config["reproducibility"])
            model = AtSpeedS(config, train._dataset).eval()
            if path is not None:
                load_checkpoint(model, path)
            by_path[path] = model.to(args.device)
        models[mode] = by_path[path]
        labels[mode] = weights_label(mode, path)
    return models, labels, test, config


def weights_label(mode: str, path) -> str:
    if path is None:
        return "RANDOM WEIGHTS (--allow_untrained, no checkpoint)"
    own = MODEL_OF_MODE[mode].__name__
    used = path.name.split("-")[0]
    return f"trained ({path})" + ("" if used == own else f"; no {own} checkpoint: {used}'s draft stands in")


def trim_left(ids, mask):
    start = int((~mask.bool()).all(dim=0).long().cumprod(0).sum())
    return ids[:, start:], mask[:, start:]


def make_requests(target, test, n_users: int, batch: int, device):
    """`max(1, n_users // batch)` batches of the first test users, on `device`: [(input_ids, mask, test item)]."""
    want, out = max(1, n_users // batch), []
    for interaction, *_ in test:
        ids, mask = target.prompt(interaction.to(device))
        truth = interaction[target.ITEM_ID]
        for s in range(0, ids.shape[0] - batch + 1, batch):
            out.append((*trim_left(ids[s:s + batch], mask[s:s + batch]), truth[s:s + batch]))
            if len(out) == want:
                return out
    return out


# ---------------------------------------------------------------- measuring


def interleaved(fns: dict, requests, warmup: int):
    """Run every fn on every request batch (order rotated per batch): median seconds after warm-up
    and every output, {name: (median, [outputs])}. On a GPU each timing waits for its kernels."""
    names, times, outs = list(fns), {n: [] for n in fns}, {n: [] for n in fns}
    warmup = min(warmup, len(requests) // 2)
    for i, (ids, mask, _) in enumerate(requests):
        for name in names[i % len(names):] + names[:i % len(names)]:
            out, seconds = timed(lambda: fns[name](ids, mask), ids.device)  # noqa: B023 (called at once)
            outs[name].append(out)
            if i >= warmup:
                times[name].append(seconds)
    return {n: (statistics.median(times[n]), outs[n]) for n in names}


def accuracy(results, requests, cut: int):
    """Recall@cut and NDCG@cut of BeamResults against each request's held-out test item."""
    recall = ndcg = users = 0.0
    for res, (_, _, truth) in zip(results, requests):
        hits = res.items[:, :cut] == truth.unsqueeze(1).to(res.items.device)
        found = hits.any(1)
        rank = hits.float().argmax(1)
        recall += float(found.sum())
        ndcg += float((found / torch.log2(rank.float() + 2)).sum())
        users += len(truth)
    return recall / users, ndcg / users


def acceptance(stats):
    """Per request: accepted steps, target calls; accepted / drafted levels."""
    acc = sum(float(s.accepted_steps.sum()) for s in stats)
    calls = sum(float(s.target_calls.sum()) for s in stats)
    drafted = sum(float(s.drafted_levels.sum()) for s in stats)
    users = sum(len(s.target_calls) for s in stats)
    return acc / users, calls / users, acc / max(drafted, 1.0)


def spec_fn(model, mode, k, n, gamma, generator):
    t = model.target
    return lambda ids, mask: speculative_beam_search(t.lm, model.draft, t.trie, t.vocab, ids, mask, k, n,
                                                     gamma, mode, generator, model.temperature)


def baseline_fn(model, mode, k, generator):
    t = model.target
    if mode == "strict":
        return lambda ids, mask: beam_search(t.lm, t.trie, t.vocab, ids, mask, k)
    return lambda ids, mask: beam_sample(t.lm, t.trie, t.vocab, ids, mask, k, generator, model.temperature)


def run_setting(model, mode, requests, k, n, gamma, args) -> dict:
    """One row: times, speedups, acceptance and accuracy of one (mode, K, batch) setting."""
    generator = torch.Generator(args.device).manual_seed(2020)
    t = model.target
    fns = {"spec": spec_fn(model, mode, k, n, gamma, generator), "ours": baseline_fn(model, mode, k, generator)}
    if not args.skip_hf:
        fns["hf"] = lambda ids, mask: hf_beam_search(t.lm, t.trie, t.vocab, ids, mask, k)
    res = interleaved(fns, requests, args.warmup)
    spec_t, spec_out = res["spec"]
    beams = [b for b, _ in spec_out]
    target = [beam_search(t.lm, t.trie, t.vocab, ids, mask, k) for ids, mask, _ in requests]
    cut = min(10, k)
    row = {"mode": mode, "k": k, "batch": len(requests[0][2]), "n": n, "gamma": gamma, "cut": cut,
           "users": sum(len(r[2]) for r in requests), "spec_ms": 1000 * spec_t,
           "ours_ms": 1000 * res["ours"][0], "speedup": res["ours"][0] / spec_t,
           "hf_ms": 1000 * res["hf"][0] if "hf" in res else None,
           "speedup_hf": res["hf"][0] / spec_t if "hf" in res else None}
    row["accepted"], row["calls"], row["rate"] = acceptance([s for _, s in spec_out])
    row["spec_acc"], row["target_acc"] = accuracy(beams, requests, cut), accuracy(target, requests, cut)
    row["sample_acc"] = accuracy(res["ours"][1], requests, cut) if mode == "relaxed" else None
    row["identical"] = sum(bool(torch.equal(b.items, r.items)) for b, r in zip(beams, target))
    return row


def run_frontier(model, mode, requests, k, grid, args) -> list[dict]:
    """K fixed, batch 1: the baseline and every (N, gamma) tree on each request, interleaved."""
    generator = torch.Generator(args.device).manual_seed(2020)
    fns = {"ours": baseline_fn(model, mode, k, generator)}
    fns.update({(n, g): spec_fn(model, mode, k, n, g, generator) for n, g in grid})
    res = interleaved(fns, requests, args.warmup)
    rows = []
    for n, g in grid:
        spec_t, out = res[(n, g)]
        accepted, calls, rate = acceptance([s for _, s in out])
        rows.append({"mode": mode, "k": k, "n": n, "gamma": g, "spec_ms": 1000 * spec_t,
                     "ours_ms": 1000 * res["ours"][0], "speedup": res["ours"][0] / spec_t,
                     "accepted": accepted, "calls": calls, "rate": rate})
    return rows


# ---------------------------------------------------------------- reporting


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def header(args, models, labels, config, title: str) -> list[str]:
    m = next(iter(models.values()))
    tp, dp = n_params(m.target.lm), n_params(m.draft)
    untrained = weights(labels) == "random weights"
    lines = [f"# {title}" + (" (RANDOM WEIGHTS: smoke test only)" if untrained else ""), "",
             "    " + " ".join(["python", *map(shlex.quote, sys.argv)]), "",
             f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
             f"- machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
             f"torch threads {torch.get_num_threads()}, torch {torch.__version__}, "
             f"load average {', '.join(f'{x:.1f}' for x in os.getloadavg())} at the end",
             f"- device: {device_name(args.device)}",
             f"- dataset: {args.dataset} ({args.data_path}), {args.requests} test users per setting, "
             f"first {args.warmup} request batches of a setting untimed (at most half)",
             f"- target: {tp / 1e6:.3f} M parameters ({config['n_layers']} x {config['hidden_size']}); "
             f"draft: {dp / 1e6:.3f} M ({config['draft_n_layers']} x {config['draft_hidden_size']}); "
             f"target / draft = {tp / dp:.1f}x",
             *[f"- weights, {mode}: {label}" for mode, label in labels.items()], ""]
    return lines


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(device)}), float32"
    return f"{device}, float32"


def weights(labels) -> str:
    return "random weights" if any("RANDOM" in v for v in labels.values()) else "trained weights"


def fmt(x, spec="{:.2f}"):
    return "–" if x is None else spec.format(x)


def benchmark_tables(rows) -> list[str]:
    lines = ["Speedup = median time of a request batch, baseline / speculative, same run, interleaved. "
             "Baseline 'ours': strict = our `beam_search`, relaxed = our `beam_sample` (target-only "
             "beam sampling); 'HF' = `generate` beam search in BOTH modes (it has no trie-constrained "
             "beam sampling). Accepted steps and target calls are per request.", "",
             "| mode | K | batch | N | gamma | SD ms | ours ms | HF ms | speedup vs ours | speedup vs HF "
             "| accepted steps | target calls | acceptance |", "|" + "---|" * 13]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['k']} | {r['batch']} | {r['n']} | {r['gamma']} | {r['spec_ms']:.1f} "
                     f"| {r['ours_ms']:.1f} | {fmt(r['hf_ms'], '{:.1f}')} | {r['speedup']:.2f}x "
                     f"| {fmt(r['speedup_hf'], '{:.2f}x')} | {r['accepted']:.2f} | {r['calls']:.2f} "
                     f"| {r['rate']:.2f} |")
    lines += ["", "Accuracy against each user's held-out test item (RecBole's test interaction), "
              "Recall@c and NDCG@c with c = min(K, 10) (so @K for K < 10). 'target' = the target's own "
              "`beam_search` top-K on the same users; 'sampling' = `beam_sample`; 'identical' = request "
              "batches whose SD top-K items equal the target's exactly.", "",
              "| mode | K | batch | @c | users | SD Recall | SD NDCG | target Recall | target NDCG "
              "| sampling Recall | sampling NDCG | identical |", "|" + "---|" * 12]
    for r in rows:
        sample = r["sample_acc"] or (None, None)
        lines.append(f"| {r['mode']} | {r['k']} | {r['batch']} | @{r['cut']} | {r['users']} "
                     f"| {r['spec_acc'][0]:.4f} | {r['spec_acc'][1]:.4f} | {r['target_acc'][0]:.4f} "
                     f"| {r['target_acc'][1]:.4f} | {fmt(sample[0], '{:.4f}')} | {fmt(sample[1], '{:.4f}')} "
                     f"| {r['identical']}/{-(-r['users'] // r['batch'])} |")
    return lines


def frontier_table(rows) -> list[str]:
    lines = ["Speedup = median time per request, baseline (strict: `beam_search`, relaxed: `beam_sample`) "
             "/ speculative, batch 1, every tree and the baseline interleaved on the same requests.", "",
             "| mode | K | N | gamma | nodes per round (<=) | SD ms | ours ms | speedup | accepted steps "
             "| target calls | acceptance |", "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['k']} | {r['n']} | {r['gamma']} | {r['n'] * r['gamma']} "
                     f"| {r['spec_ms']:.1f} | {r['ours_ms']:.1f} | {r['speedup']:.2f}x | {r['accepted']:.2f} "
                     f"| {r['calls']:.2f} | {r['rate']:.2f} |")
    return lines


def plot_lines(path: Path, panels, xlabel: str, title: str) -> None:
    """panels: [(ylabel, {label: ([x], [y])})], one subplot each."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(ylabel, lines) for ylabel, lines in panels if lines]  # e.g. no HF panel with --skip_hf
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (ylabel, lines) in zip(axes[0], panels):
        for label, (xs, ys) in lines.items():
            ax.plot(xs, ys, marker="o", label=label, linestyle="--" if "relaxed" in label else "-")
        if "speedup" in ylabel:
            ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks(sorted({x for xs, _ in lines.values() for x in xs}))
        ax.set_xlabel(xlabel), ax.set_ylabel(ylabel), ax.grid(alpha=0.3), ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def series(rows, key_of, x: str, y: str) -> dict:
    out = {}
    for r in rows:
        if r[y] is not None:
            xs, ys = out.setdefault(key_of(r), ([], []))
            xs.append(r[x]), ys.append(r[y])
    return out


def write(args, lines) -> None:
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {args.output} and {args.plot}")


# ---------------------------------------------------------------- main


def benchmark(args, models, labels, test, config) -> None:
    n0 = args.draft_beams or int(config["draft_beams"])
    gamma = args.gamma or int(config["gamma"])
    rows = []
    for batch in args.batches:
        requests = make_requests(models[args.modes[0]].target, test, args.requests, batch, args.device)
        for mode in args.modes:
            for k in args.ks:
                rows.append(run_setting(models[mode], mode, requests, k, max(n0, k), gamma, args))
                r = rows[-1]
                print(f"{mode} K={k} batch={batch}: {r['speedup']:.2f}x vs ours, "
                      f"{fmt(r['speedup_hf'], '{:.2f}x')} vs HF, {r['accepted']:.2f} accepted steps", flush=True)
    title = "Speculative beam search vs target-only decoding"
    lines = header(args, models, labels, config, title) + benchmark_tables(rows)
    plot_lines(args.plot, [("speedup vs ours", series(rows, lambda r: f"{r['mode']}, batch {r['batch']}", "k",
                                                       "speedup")),
                           ("speedup vs HF generate", series(rows, lambda r: f"{r['mode']}, batch {r['batch']}",
                                                             "k", "speedup_hf"))],
               "K (beams = items returned)", f"{args.dataset}, N >= K, gamma {gamma}, {weights(labels)}")
    write(args, lines)


def frontier(args, models, labels, test, config) -> None:
    k = args.frontier_k
    grid = [(n, g) for n in args.frontier_n for g in args.frontier_gamma if n >= k]
    requests = make_requests(models[args.modes[0]].target, test, args.requests, 1, args.device)
    rows = []
    for mode in args.modes:
        rows += run_frontier(models[mode], mode, requests, k, grid, args)
        print(f"{mode}: best {max(r['speedup'] for r in rows if r['mode'] == mode):.2f}x", flush=True)
    title = f"Speculative beam search: draft tree frontier (K = {k}, batch 1)"
    lines = header(args, models, labels, config, title) + frontier_table(rows)
    label = lambda r: f"{r['mode']}, gamma {r['gamma']}"  # noqa: E731
    plot_lines(args.plot, [("speedup vs ours", series(rows, label, "n", "speedup")),
                           ("accepted steps per request", series(rows, label, "n", "accepted"))],
               "N (draft beams per level)", f"{args.dataset}, K = {k}, batch 1, {weights(labels)}")
    write(args, lines)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    try:
        models, labels, test, config = load_models(args, args.modes)
    except AtSpeedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with torch.no_grad():
        (frontier if args.frontier else benchmark)(args, models, labels, test, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
