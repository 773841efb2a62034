"""The AtSpeed models the speculative benchmarks load, the decoders they compare, one measured
setting (speculative.py, frontier.py, alignment.py and breakdown.py), and one inference switch turned
off and on (`compare_switch`: fused.py, prefix.py).

strict mode decodes with AtSpeedS's trained draft and relaxed with AtSpeedR's (either checkpoint
serves both modes when the other is missing). The target-only baseline is our own KV-cached,
trie-constrained search: `beam_search` for strict, `beam_sample` (the target-only beam sampling that
relaxed verification approximates) for relaxed; Hugging Face `generate` beam search is the second
baseline, in both modes. K is passed to the decoders directly; the models' own beam widths are
never changed.
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass

import torch

import common
from atspeed_rec.decoding.beam_search import beam_search
from atspeed_rec.decoding.hf_generate import hf_beam_search
from atspeed_rec.decoding.sampling import beam_sample
from atspeed_rec.decoding.speculative import MODES, Tree, speculative_beam_search
from atspeed_rec.models.fast_forward import lm_dtype

MODEL_OF_MODE = {"strict": "AtSpeedS", "relaxed": "AtSpeedR"}
BASELINE_OF_MODE = {"strict": "beam_search", "relaxed": "beam_sample"}


@dataclass
class Served:
    """What one verification mode decodes with."""

    model: torch.nn.Module  # an AtSpeedS / AtSpeedR model: `.target` (GenRec) and `.draft`
    config: object  # the RecBole Config of the checkpoint's model
    weights: str  # where the weights come from, for the report


def add_options(p, tree: bool = True) -> None:
    """--modes; with `tree`, the draft tree of the decoding: --draft_beams (N), --gamma and --draft_start."""
    p.add_argument("--modes", type=lambda s: s.replace(",", " ").split(), default=list(MODES),
                   help="verification modes, e.g. strict,relaxed")
    p.add_argument("--temperature", type=float, default=None,
                   help="relaxed mode's sample_temperature for decoding (default: the config's); not a property "
                   "override: the checkpoint stays the one the config names")
    if not tree:
        return
    p.add_argument("--draft_beams", type=int, default=None,
                   help="N of the decoding (default: the config's; raised to K); not a property override: "
                   "the checkpoint stays the one the config names")
    p.add_argument("--gamma", type=int, default=None,
                   help="draft levels per round of the decoding (default: the config's); not a property override")
    p.add_argument("--draft_start", type=int, default=None,
                   help="the first code the draft proposes (default: the config's); also the config's "
                   "draft_start, which is in no checkpoint's key (with --sid_levels=3 the properties' 2 is refused)")
    p.add_argument("--trees", type=parse_trees, default={},
                   help="a tree per K, K:N:gamma, K:N:gamma:draft_start or K:N:gamma:draft_start:budget "
                   "comma-separated (e.g. 1:8:3,10:20:1:2,20:40:1,10:40:2:0:50: the budget verifies only the tree's "
                   "best nodes by draft score); other K use --draft_beams/--gamma/--draft_start or the config's")


def parse_trees(text: str) -> dict[int, Tree]:
    """`{K: Tree}` from 'K:N:gamma[:start[:budget]],...'."""
    trees = {}
    for part in text.replace(" ", ",").split(","):
        if part:
            try:
                k, *tree = (int(x) for x in part.split(":"))
                tree = Tree(*tree)
            except (ValueError, TypeError):
                raise argparse.ArgumentTypeError(f"{part!r} is not K:N:gamma, K:N:gamma:draft_start or "
                                                 "K:N:gamma:draft_start:budget (integers)") from None
            if not tree.serves(k) or tree.gamma < 1 or tree.start < 0:
                raise argparse.ArgumentTypeError(f"{part!r}: N must be >= K, gamma >= 1, draft_start >= 0 and the "
                                                 "budget 0 (every node) or >= K")
            trees[k] = tree
    return trees


def tree_for(args, served, k: int) -> Tree:
    """The tree of the decoding at K = `k`: --trees, else --draft_beams/--gamma/--draft_start, else the
    config's (N >= K)."""
    if k in args.trees:
        return args.trees[k]
    n = args.draft_beams or int(served.config["draft_beams"])
    start = args.draft_start if args.draft_start is not None else int(served.config["draft_start"])
    return Tree(max(n, k), args.gamma or int(served.config["gamma"]), start)


def check_modes(p, args) -> None:
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        p.error(f"--modes: unknown {bad}, choose from {MODES}")


def load(args):
    """({mode: Served}, test loader) for `args.modes`, each mode's own trained checkpoint first."""
    served, by_path, test = {}, {}, None
    for mode in args.modes:
        own = MODEL_OF_MODE[mode]
        other = next(name for name in MODEL_OF_MODE.values() if name != own)
        name, config, path = common.find_checkpoint(args, (own, other))
        if test is None:
            _, train, _, test = common.load_data(config)
        if path not in by_path:
            by_path[path] = common.instantiate(name, config, train, path)
        weights = common.weights_label(path) + ("" if path is None or name == own else
                                                f"; no {own} checkpoint: {name}'s draft stands in")
        served[mode] = Served(by_path[path], config, weights)
    temperature = getattr(args, "temperature", None)  # only scripts with add_options have --temperature
    if temperature is not None:
        if not temperature > 0:
            raise SystemExit(f"error: --temperature={temperature}; fix: a value > 0")
        for s in served.values():
            s.model.temperature = temperature  # a decoding setting; the weights are the config's
    return served, test


def header(args, title: str, served: dict, more=()) -> list[str]:
    """common.header with the models' sizes and weights (the title says when they are random), then `more` facts."""
    suffix = " (RANDOM WEIGHTS: smoke test only)" if untrained(served) else ""
    return common.header(args, title + suffix, next(iter(served.values())).config, [*facts(served), *more])


def weights(served: dict) -> str:
    return "random weights" if untrained(served) else "trained weights"


def facts(served: dict) -> list[str]:
    """Model sizes and every mode's weights, for the report header."""
    s = next(iter(served.values()))
    target, draft, config = s.model.target.lm, s.model.draft, s.config
    tp, dp = common.n_params(target), common.n_params(draft)
    kind = f"pretrained {config['pretrained_path']} + LoRA" if config["pretrained_path"] else \
        f"{config['n_layers']} x {config['hidden_size']}"
    return [f"target: {tp / 1e6:.3f} M parameters ({kind}, {lm_dtype(target)}); draft: "
            f"{dp / 1e6:.3f} M ({config['draft_n_layers']} x {config['draft_hidden_size']}); target / draft = "
            f"{tp / dp:.1f}x", *[f"weights, {mode}: {s.weights}" for mode, s in served.items()],
            f"relaxed rule: {s.model.relaxed_rule}, sample_temperature: {s.model.temperature:g}, last code: "
            f"{s.model.last_level}"]


def untrained(served: dict) -> bool:
    return any("RANDOM" in s.weights for s in served.values())


def requests(args, served: dict, test, batch: int) -> list[common.Request]:
    """The sampled test users, `batch` at a time, prompted by the target (the same for every mode)."""
    s = next(iter(served.values()))
    return common.sample_requests(test, s.model.target.prompt, args.requests, batch, s.config["seed"],
                                  s.config["device"])


def spec_fn(model, mode: str, k: int, tree: Tree, generator, bound: bool = True, trie_fill: bool = True,
            skip_decided: bool = True):
    t = model.target
    return lambda ids, mask: speculative_beam_search(t.lm, model.draft, t.trie, t.vocab, ids, mask, k, tree.n,
                                                     tree.gamma, mode, generator, model.temperature, model.last_level,
                                                     bound, model.relaxed_rule, tree.start, trie_fill, tree.budget,
                                                     skip_decided)


def baseline_fn(model, mode: str, k: int, generator, skip_decided: bool = True):
    t = model.target
    if mode == "strict":
        return lambda ids, mask: beam_search(t.lm, t.trie, t.vocab, ids, mask, k, skip_decided=skip_decided)
    return lambda ids, mask: beam_sample(t.lm, t.trie, t.vocab, ids, mask, k, generator, model.temperature,
                                         model.last_level)


def generator(s: Served) -> torch.Generator:
    return torch.Generator(s.config["device"]).manual_seed(s.config["seed"])


def acceptance(stats) -> tuple[float, float, float]:
    """Per request: accepted steps and target calls; accepted / drafted levels."""
    acc = sum(float(s.accepted_steps.sum()) for s in stats)
    calls = sum(float(s.target_calls.sum()) for s in stats)
    drafted = sum(float(s.drafted_levels.sum()) for s in stats)
    users = sum(len(s.target_calls) for s in stats)
    return acc / users, calls / users, acc / max(drafted, 1.0)


def acceptance_by_code(stats) -> str:
    """Accepted / verified drafted levels at each drafted code position ("1st / 2nd / 3rd" code): where the
    draft loses the target. A position no request verified shows "-"."""
    accepted = sum(s.accepted_at.sum(0).double() for s in stats)[:-1]  # the last code is never drafted
    verified = sum(s.verified_at.sum(0).double() for s in stats)[:-1]
    return " / ".join(f"{a / v:.2f}" if v else "-" for a, v in zip(accepted.tolist(), verified.tolist()))


def measure(s: Served, mode: str, requests, k: int, tree: Tree, warmup: int, hf: bool) -> dict:
    """One setting: speculative vs our target-only baseline (and HF generate), interleaved; acceptance;
    RecBole's metrics of every decoding ("metrics": {decoding: {metric@c: value}}) and how many request
    batches the speculative top-K items equal `beam_search`'s exactly."""
    model, gen = s.model, generator(s)
    t = model.target
    fns = {"spec": spec_fn(model, mode, k, tree, gen), "ours": baseline_fn(model, mode, k, gen)}
    if mode == "relaxed":  # the target's beam search too: the accuracy reference, and a second baseline
        fns["beam_search"] = lambda ids, mask: beam_search(t.lm, t.trie, t.vocab, ids, mask, k)
    if hf:
        fns["hf"] = lambda ids, mask: hf_beam_search(t.lm, t.trie, t.vocab, ids, mask, k)
    res = common.interleaved(fns, requests, warmup)
    spec_t, spec_out, _ = res["spec"]
    beams = [b for b, _ in spec_out]
    search_t, target, _ = res["ours" if mode == "strict" else "beam_search"]
    decoded = {"speculative": beams, "beam_search": target}
    if mode == "relaxed":
        decoded["beam_sample"] = res["ours"][1]
    n = f"{tree.n} (best {tree.budget} nodes)" if tree.budget else tree.n
    row = {"mode": mode, "k": k, "batch": requests[0].users, "n": n, "gamma": tree.gamma, "start": tree.start,
           "users": sum(r.users for r in requests), "spec_ms": 1000 * spec_t, "ours_ms": 1000 * res["ours"][0],
           "speedup": res["ours"][0] / spec_t, "speedup_mean": common.mean_ratio(res["ours"], res["spec"]),
           "search_ms": 1000 * search_t, "speedup_search": search_t / spec_t,
           "hf_ms": 1000 * res["hf"][0] if hf else None,
           "speedup_hf": res["hf"][0] / spec_t if hf else None,
           "identical": sum(bool(torch.equal(b.items, r.items)) for b, r in zip(beams, target)),
           "metrics": {name: common.recbole_metrics(s.config, requests, out, k) for name, out in decoded.items()}}
    row["accepted"], row["calls"], row["rate"] = acceptance([st for _, st in spec_out])
    row["by_code"] = acceptance_by_code([st for _, st in spec_out])
    return row


def switched(lms, on: bool, off, fn):
    """`fn(ids, mask)` run with the switch on, or inside `off(lm)` for every lm of `lms`."""
    def run(ids, mask):
        with contextlib.ExitStack() as stack:
            if not on:
                for lm in lms:
                    stack.enter_context(off(lm))
            return fn(ids, mask)
    return run


def compare_switch(args, s: Served, requests, off, names: tuple[str, str]) -> list[list]:
    """At each K of `args.ks`: the target-only beam search and strict speculative decoding (the tree
    `tree_for` picks), each with a switch off (inside `off(lm)` for the target and the draft) and on,
    all four interleaved per request. Rows: K, decoder, ms off, ms on, off / on, requests whose top-K
    items and order are the same both ways; then the speculative speedup each way."""
    lms = [s.model.target.lm, s.model.draft]
    rows = []
    for k in args.ks:
        tree = tree_for(args, s, k)
        spec = spec_fn(s.model, "strict", k, tree, None)
        fns = {}
        for how in names:
            on = how == names[1]
            fns[f"search {how}"] = switched(lms, on, off, baseline_fn(s.model, "strict", k, None))
            fns[f"speculative {how}"] = switched(lms, on, off, lambda ids, mask: spec(ids, mask)[0])
        res = common.interleaved(fns, requests, args.warmup)
        ms = {name: 1e3 * seconds for name, (seconds, *_) in res.items()}
        a, b = names
        for what in ("search", "speculative"):
            same = sum(torch.equal(x.items, y.items) for x, y in zip(res[f"{what} {a}"][1], res[f"{what} {b}"][1]))
            budget = f", best {tree.budget} nodes" if tree.budget else ""
            name = (f" (N {tree.n}, gamma {tree.gamma}, draft start {tree.start}{budget})" if what == "speculative"
                    else "")
            rows.append([k, what + name, f"{ms[f'{what} {a}']:.1f}", f"{ms[f'{what} {b}']:.1f}",
                         f"{ms[f'{what} {a}'] / ms[f'{what} {b}']:.2f}x", f"{same}/{len(requests)}"])
        rows.append([k, "speedup (search / speculative)", f"{ms[f'search {a}'] / ms[f'speculative {a}']:.2f}x",
                     f"{ms[f'search {b}'] / ms[f'speculative {b}']:.2f}x", "", ""])
        print(rows[-3:], flush=True)
    return rows


def switch_args(script: str, doc: str, argv=None):
    """The options of a switch benchmark (fused.py, prefix.py): the strict AtSpeedS model, `--ks`, trees."""
    p = common.parser(script, doc, requests=40)
    p.add_argument("--ks", type=common.int_list, default=[1, 10], help="beam widths K, e.g. 1,10")
    add_options(p)
    args = common.parse(p, argv, ("AtSpeedS",))
    args.modes = ["strict"]
    return args


def switch_report(args, title: str, served: dict, requests, rows, names: tuple[str, str], more=()) -> None:
    """`compare_switch`'s rows as a table under the usual header, printed (and written to `--output`)."""
    lines = header(args, title, served, more)
    lines += [f"Batch 1, {len(requests)} test users, median ms after {args.warmup} warm-up requests, all interleaved; "
              "same top-K: requests with identical items and order both ways.", "",
              *common.table(["K", "decoder", f"{names[0]} ms", f"{names[1]} ms", "faster", "same top-K"], rows)]
    common.write(lines, args.output)
