"""What one pass costs: the target's and the draft's forward passes, and the free-draft ceiling.

For the sampled test users at batch 1, each timed interleaved (median ms after `--warmup` requests):
the target-only beam search at K (our KV-cached search: the speedup's baseline); the target's
prefill of the prompt (after its cached text prefix, as decoding feeds it); one target decode step
of the K beams (their newest codes after the cached prompt and earlier codes, as `beam_search` feeds
them); one target pass over the prompt plus T tree tokens (what a first speculative round costs:
`--tree` T values); the draft's prefill and one draft level of N nodes. The ceiling is target-only /
(prompt + T pass): the speedup of a draft that costs nothing and is accepted at every level, so that
one target call decodes the whole ID. Timings depend on
the models' shapes and dtype, not their weights: random weights (--allow_untrained) measure the
same costs.

    python benchmarks/ceiling.py --dataset=amazon-beauty --data_path=DIR --k=10

writes docs/results/speculative_ceiling.md.
"""

from __future__ import annotations

import sys

import torch

import common
import decoders
from atspeed_rec.decoding.beam_search import beam_search
from atspeed_rec.decoding.tree import DraftTree, tree_forward
from atspeed_rec.models.prefix_cache import split_prefix


def parse_args(argv=None):
    p = common.parser(__file__, __doc__, requests=40, output="speculative_ceiling.md")
    p.add_argument("--k", type=int, default=10, help="beam width K (items returned)")
    p.add_argument("--tree", type=common.int_list, default=[10, 20, 40, 60], help="tree tokens T of the pass")
    p.add_argument("--draft_beams", type=int, default=None, help="N of one draft level (default: the config's)")
    args = common.parse(p, argv, ("AtSpeedS",))
    args.modes = ["strict"]
    return args


def one_level_tree(codes: torch.Tensor, width: int) -> DraftTree:
    """A tree of one level of `width` nodes under the empty beam (codes of level 0: any valid shape)."""
    picks = codes[torch.arange(width) % len(codes), 0].view(1, 1, width)
    zeros = torch.zeros_like(picks)
    return DraftTree(zeros, picks, torch.ones_like(picks, dtype=torch.bool), [])


def first_pass(lm, vocab, ids, mask, beams, tree, ancestors=None):
    """A search's first pass over the prompts `ids`, as decoding makes it (after their shared prefix's
    cached KV, if the model has one: `models/prefix_cache.py`), and the prompts' mask as cached."""
    ids, mask, prefix = split_prefix([lm], vocab, ids, mask)
    kv = None if prefix is None else prefix[0]
    return tree_forward(lm, vocab, mask, beams, tree, kv, ids, ancestors), mask


def beam_cache(lm, vocab, ids, mask, beams: torch.Tensor):
    """(the prompt's mask, cache, ancestors) that beam search's last step over `beams [1, K, L-1]`
    runs after: the prompt, then each earlier level's K codes, as `beam_search` feeds them."""
    K, no_tree = beams.shape[1], DraftTree.empty(1)
    (_, _, kv), mask = first_pass(lm, vocab, ids, mask, beams[:, :1, :0], no_tree, beams[:, :1, :0])
    ancestors = beams.new_zeros(1, K, 0)
    for t in range(1, beams.shape[2]):
        T = kv[0][0].shape[2]
        _, _, kv = tree_forward(lm, vocab, mask, beams[:, :, :t], no_tree, kv, ancestors=ancestors)
        ancestors = torch.cat([ancestors, (T + torch.arange(K)).view(1, K, 1)], -1)
    return mask, kv, ancestors


def passes(model, k: int, tree_sizes: list[int], n: int, requests) -> dict:
    """{name: fn(ids, mask)} of the passes to time, for one request at batch 1."""
    target, draft, vocab, trie = model.target.lm, model.draft, model.target.vocab, model.target.trie
    codes = trie.codes  # [n_items, L]
    empty, no_tree = codes.new_zeros(1, 1, 0), DraftTree.empty(1)
    beams = codes[:k, :vocab.levels - 1].unsqueeze(0)  # [1, K, L-1]: the last step's beam paths
    # the last decode step runs after its request's cache (prompt + the beams' earlier codes), built untimed
    cache = {id(r.ids): beam_cache(target, vocab, r.ids, r.mask, beams) for r in requests}

    def prefill(lm):
        return lambda ids, mask: first_pass(lm, vocab, ids, mask, empty, no_tree)

    def prompt_and_tree(lm, t):
        return lambda ids, mask: first_pass(lm, vocab, ids, mask, empty, one_level_tree(codes, t))

    def step(mask, kv, ancestors):
        return tree_forward(target, vocab, mask, beams, no_tree, kv, ancestors=ancestors)

    return {"target-only search": lambda ids, mask: beam_search(target, trie, vocab, ids, mask, k),
            "target prefill": prefill(target),
            "target step (K beams)": lambda ids, mask: step(*cache[id(ids)]),
            **{f"target prompt + {t}": prompt_and_tree(target, t) for t in tree_sizes},
            "draft prefill": prefill(draft),
            f"draft prompt + level (N = {n})": prompt_and_tree(draft, n)}


@torch.no_grad()
def benchmark(args) -> None:
    served, test = decoders.load(args)
    s = served["strict"]
    requests = decoders.requests(args, served, test, 1)
    n = args.draft_beams or int(s.config["draft_beams"])
    timings = common.interleaved(passes(s.model, args.k, args.tree, n, requests), requests, args.warmup)
    ms = {name: 1e3 * seconds for name, (seconds, *_) in timings.items()}
    search, level = ms["target-only search"], ms[f"draft prompt + level (N = {n})"]
    rows = [[name, f"{t:.2f}", f"{search / t:.2f}x" if name.startswith("target prompt +") else ""]
            for name, t in ms.items()]
    lines = decoders.header(args, "What one pass costs, and the free-draft ceiling", served)
    lines += [f"K = {args.k}, batch 1, {len(requests)} test users (median ms after {args.warmup} warm-up requests). "
              "ceiling: target-only search / that pass (a free draft accepted at every level).", "",
              *common.table(["pass", "ms", "ceiling"], rows), "",
              f"target step (K beams) / draft level: {ms['target step (K beams)'] / level:.1f}x; "
              f"target prefill / draft prefill: {ms['target prefill'] / ms['draft prefill']:.1f}x"
              + "".join(f"; target prompt + {t} (a first round's verification pass) / draft level: "
                        f"{ms[f'target prompt + {t}'] / level:.1f}x" for t in args.tree if t == n)]
    common.write(lines, args.output)


def main(argv=None) -> int:
    return common.main(parse_args(argv), benchmark)


if __name__ == "__main__":
    sys.exit(main())
