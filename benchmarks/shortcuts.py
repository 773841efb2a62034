"""Strict speculative decoding with and without one of its lossless shortcuts: what each one buys.

`--shortcut=bound` (the default): strict verification stops a round at the first level where one of the
target's top-K pairs is not a drafted node. With the bound (`drop_unreachable`), a level also passes when
those pairs provably cannot reach the next top K: each child of a pair scores at most the pair itself, so
when the K-th best child of the drafted pairs scores above every undrafted pair, beam search drops them too.

`--shortcut=trie_fill`: when every valid (parent, code) pair of a tree's last level fits in its N nodes,
the level is filled from the trie instead of a draft pass (`draft_tree`): it always passes, and a tree
drafting only a late code (`draft_start`), which the trie nearly decides, often needs no draft call.

`--shortcut=skip_decided`: a target pass does not feed the tree nodes (or, at the last code, the beams) whose
next code is the ID's last and the only one the trie allows: its log-prob is 0 whatever the target says. The
target's own `beam_search` skips them too, so each row is timed against the search with the same setting.

For each K (`--ks`) on its tree (`--trees`, else --draft_beams/--gamma/--draft_start, else the config's),
batch 1, the target's own `beam_search`, strict speculative decoding without the shortcut and with it run
interleaved on every sampled test user (the other shortcut on, as served); both speculative outputs are
checked item for item against `beam_search`.

    python benchmarks/shortcuts.py --dataset=amazon-beauty --data_path=DIR [--shortcut=trie_fill]

writes docs/results/speculative_<shortcut>.md. Weights: the trained AtSpeedS checkpoint of the same arguments
(AtSpeedR's draft stands in when there is none); options as in `benchmarks/speculative.py`.
"""

from __future__ import annotations

import sys

import torch

import common
import decoders

SHORTCUTS = {"bound": ("plain", "bound"), "trie_fill": ("draft pass", "trie fill"),  # names of off and on
             "skip_decided": ("every token fed", "decided ones skipped")}
IN_BEAM_SEARCH = {"skip_decided"}  # shortcuts the target-only search takes too: each row has its own baseline


def parse_args(argv=None):
    p = common.parser(__file__, __doc__, output="speculative_{shortcut}.md")
    p.add_argument("--ks", type=common.int_list, default=[1, 3, 5, 10, 20], help="beam widths K, e.g. 1,10,20")
    p.add_argument("--shortcut", choices=tuple(SHORTCUTS), default="bound", help="the shortcut turned off and on")
    decoders.add_options(p)
    args = common.parse(p, argv, tuple(decoders.MODEL_OF_MODE.values()))
    if args.output == args.default_output:
        args.output = args.output.with_name(f"speculative_{args.shortcut}.md")
    args.modes = ["strict"]  # both shortcuts are measured where the output must not change
    return args


def measure(s, requests, k: int, tree, warmup: int, shortcut: str) -> dict:
    """`beam_search` and strict speculative decoding without and with `shortcut`, interleaved: one row."""
    names = SHORTCUTS[shortcut]
    fns = {"ours": decoders.baseline_fn(s.model, "strict", k, None)}
    baseline = dict.fromkeys(names, "ours")
    if shortcut in IN_BEAM_SEARCH:
        fns["ours, off"] = decoders.baseline_fn(s.model, "strict", k, None, **{shortcut: False})
        baseline[names[0]] = "ours, off"
    for name, on in zip(names, (False, True)):
        fns[name] = decoders.spec_fn(s.model, "strict", k, tree, None, **{shortcut: on})
    res = common.interleaved(fns, requests, warmup)
    target = res["ours"].outputs
    row = {"k": k, "tree": tree}
    for name in names:
        ours_t = res[baseline[name]].seconds
        seconds, out, _ = res[name]
        stats = [st for _, st in out]
        accepted, calls, _ = decoders.acceptance(stats)
        per_request = {field: sum(float(getattr(st, field).sum()) for st in stats) / len(requests)
                       for field in ("bounded_steps", "filled_levels")}
        row[name] = {"ours_ms": 1000 * ours_t, "ms": 1000 * seconds, "speedup": ours_t / seconds,
                     "accepted": accepted, "calls": calls,
                     "draft_calls": sum(st.draft_calls for st in stats) / len(requests), **per_request,
                     "by_code": decoders.acceptance_by_code(stats),
                     "identical": sum(bool(torch.equal(b.items, r.items)) for (b, _), r in zip(out, target))}
    return row


def benchmark(args) -> None:
    served, test = decoders.load(args)
    s = served["strict"]
    requests = decoders.requests(args, served, test, 1)
    names = SHORTCUTS[args.shortcut]
    rows = []
    for k in args.ks:
        tree = decoders.tree_for(args, s, k)
        r = measure(s, requests, k, tree, args.warmup, args.shortcut)
        rows.append(r)
        off, on = r[names[0]], r[names[1]]
        print(f"K={k} {tree.name}: {off['speedup']:.2f}x -> {on['speedup']:.2f}x, accepted {off['accepted']:.2f} -> "
              f"{on['accepted']:.2f}, draft calls {off['draft_calls']:.2f} -> {on['draft_calls']:.2f}", flush=True)
    users = len(requests)
    lines = decoders.header(args, f"Strict speculative decoding with and without `{args.shortcut}` (batch 1)",
                            served)
    lines += [f"{users} test users decoded alone; per request: median latency, speedup over `beam_search` (the "
              "target's own search, interleaved), accepted drafted levels (those accepted only thanks to the bound; "
              "the levels filled from the trie), target and draft calls (means), and how many requests return "
              "exactly `beam_search`'s items.", "",
              *common.table(["K", "N", "gamma", "draft start", "target-only ms", "rule", "SD ms", "speedup",
                             "accepted steps", "of which by the bound", "filled from the trie", "target calls",
                             "draft calls", "acceptance by code", f"identical (of {users})"],
                            [[r["k"], r["tree"].n, r["tree"].gamma, r["tree"].start, f"{m['ours_ms']:.1f}", name,
                              f"{m['ms']:.1f}", f"{m['speedup']:.2f}x", f"{m['accepted']:.2f}",
                              f"{m['bounded_steps']:.2f}", f"{m['filled_levels']:.2f}", f"{m['calls']:.2f}",
                              f"{m['draft_calls']:.2f}", m["by_code"], m["identical"]]
                             for r in rows for name, m in ((n, r[n]) for n in names)])]
    common.write(lines, args.output)


def main(argv=None) -> int:
    return common.main(parse_args(argv), benchmark)


if __name__ == "__main__":
    sys.exit(main())
