"""Batched decoding with the batch's requests grouped by history length: what the test pass and the
teacher data pay for padding.

A batch of prompts is left-padded to its longest, and every pad token costs a full token of compute
in the prompt pass (and its KV is attended at every step). The evaluation decodes a batch in
`eval_length_buckets` groups of similar history length, each trimmed to its own longest prompt; the
teacher data sorts all its requests by length before batching them. For each batch size (`--batches`)
the sampled test users are decoded by the target's own `beam_search` (the teacher data's and GenRec's
test pass) and by the served speculative decoder (AtSpeedS / AtSpeedR's test pass, `--modes`) at K
(`--k`, default the config's `num_beams`), each batch whole and in each number of groups (`--groups`),
(`--settings` BATCH:GROUPS, e.g. 64:1 whole, 64:4 in four groups), interleaved per batch size. A batch
of all the sampled users in groups of the teacher's batch size stands for the teacher's global sort
(256:4: sorted batches of 64). Reports the median time per request, the prompt tokens computed per real
one, and how many requests get the same items as the batch decoded whole (grouping changes only the
rounding of bf16 sums: near-tied items may swap).

    python benchmarks/length_groups.py --dataset=amazon-beauty --data_path=DIR

writes docs/results/length_groups.md. Weights: the trained AtSpeedS / AtSpeedR checkpoints of the same arguments.
"""

from __future__ import annotations

import resource
import sys

import common
import decoders
from atspeed_rec.recbole_glue.genrec import by_length, length_groups


def parse_args(argv=None):
    p = common.parser(__file__, __doc__, requests=256, output="length_groups.md")
    p.add_argument("--settings", type=settings, default=settings("32:1,32:4,64:1,64:4,256:4"),
                   help="BATCH:GROUPS comma-separated, e.g. 32:1,32:4 (GROUPS 1: the batch whole)")
    p.add_argument("--k", type=int, default=None, help="beams = items returned (default: the config's num_beams)")
    decoders.add_options(p)
    args = common.parse(p, argv, tuple(decoders.MODEL_OF_MODE.values()))
    decoders.check_modes(p, args)
    return args


def settings(text: str) -> dict[int, list[int]]:
    """`32:1,32:4,64:4` -> {32: [1, 4], 64: [4]}: group counts per batch size."""
    out: dict[int, list[int]] = {}
    for item in filter(None, text.replace(" ", "").split(",")):
        batch, _, groups = item.partition(":")
        out.setdefault(int(batch), []).append(int(groups or 1))
    return out


def grouped(fn, groups: int):
    """`fn(ids, mask)` on each length group of the batch, trimmed to the group's longest prompt."""
    return lambda ids, mask: [fn(i, m) for _, i, m in by_length(ids, mask, groups)]


def items_of(out):
    """`[B, K]` items of a decoder's output: a BeamResult, or (BeamResult, stats) for speculative decoding."""
    return out[0].items if isinstance(out, tuple) else out.items


def batch_items(parts, mask, groups: int):
    """`[B, K]` items of a batch decoded in `groups` length groups (`parts`, one output each), in batch order."""
    chunks = length_groups(mask, groups)
    items = items_of(parts[0]).new_zeros(len(mask), items_of(parts[0]).shape[1])
    for rows, part in zip(chunks, parts):
        items[rows] = items_of(part)
    return items


def computed_tokens(requests, groups: int) -> int:
    """Prompt tokens (pads included) the prompt passes of `groups` groups per batch compute."""
    return sum(len(rows) * int(r.mask[rows].sum(1).max()) for r in requests for rows in length_groups(r.mask, groups))


def benchmark(args) -> None:
    served, test = decoders.load(args)
    first = next(iter(served.values()))
    k = args.k or first.model.num_beams
    fns = {"beam_search": decoders.baseline_fn(first.model, "strict", k, None)}
    for mode, s in served.items():
        fns[f"{mode} speculative"] = decoders.spec_fn(s.model, mode, k, decoders.tree_for(args, s, k),
                                                      decoders.generator(s))
    rows = []
    for batch, groups in args.settings.items():
        requests = decoders.requests(args, served, test, batch)
        users, real = len(requests) * batch, sum(int(r.mask.sum()) for r in requests)
        timed = common.interleaved({(name, g): grouped(fn, g) for name, fn in fns.items() for g in groups},
                                   requests, args.warmup, progress=f"batch {batch}")
        whole = {}  # name -> the batches decoded whole: what grouped outputs are checked against
        for (name, g), (seconds, outs, _) in timed.items():
            same = "-"  # relaxed draws differ with the grouping: no item-for-item check
            if name == "beam_search" or name.startswith("strict"):
                if name not in whole:
                    parts = timed[(name, 1)][1] if (name, 1) in timed else \
                        [grouped(fns[name], 1)(r.ids, r.mask) for r in requests]
                    whole[name] = [batch_items(p, r.mask, 1) for p, r in zip(parts, requests)]
                same = str(sum(int(w.eq(batch_items(out, r.mask, g)).all(1).sum())
                               for w, out, r in zip(whole[name], outs, requests)))
            ms = 1000 * seconds / batch
            rows.append([name, batch, g, -(-batch // g), f"{ms:.1f}", f"{computed_tokens(requests, g) / real:.2f}",
                         same])
            print(f"{name}, batch {batch}, {g} groups: {ms:.1f} ms a request", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    trees = ", ".join(f"{mode}: {decoders.tree_for(args, s, k).name}" for mode, s in served.items())
    lines = decoders.header(args, "Batched decoding in groups of similar history length", served,
                            [f"K = {k}; speculative trees: {trees}", f"peak memory of the process: {peak:.1f} GB"])
    lines += [f"{users} test users in batches; per request: the median batch time / batch size "
              "(every decoder and group count interleaved per batch). Prompt tokens computed: per real history "
              "token (1.00 = no padding).", "",
              *common.table(["decoder", "batch", "groups", "requests a group (<=)", "ms a request",
                             "prompt tokens computed", f"items as decoded whole (of {users})"], rows)]
    common.write(lines, args.output)


def main(argv=None) -> int:
    return common.main(parse_args(argv), benchmark)


if __name__ == "__main__":
    sys.exit(main())
