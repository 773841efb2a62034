"""Semantic-ID building on a dataset, per source: build time, collisions, uniqueness, trie step.

The options are GenRec's properties (`sid_levels`, `sid_codebook_size`, `sid_collab_dim`,
`sid_cache_dir`, ... as `--key=value`, with the seed). For each source (`--sources`) it reports the
build time cold (no semantic-ID cache file; text embeddings are reused from the cache when present,
and the row says whether they were), then cached, the collision rate before resolution, the codes
used per level, whether all IDs are unique, and the time of one trie-masked decoding step for
`--prefixes` random prefixes at each depth.

    python benchmarks/semantic_ids.py --dataset=amazon-beauty --data_path=DIR

prints the table (`--output` also writes it). The cold build deletes exactly the cache file it is
about to rebuild.
"""

from __future__ import annotations

import logging
import statistics
import sys
import time

import torch

import common
from atspeed_rec.recbole_glue.genrec import SID_KEYS
from atspeed_rec.recbole_glue.metrics import timed
from atspeed_rec.semantic_ids.builder import build_semantic_ids, plan_semantic_ids, text_embedding_cache_path
from atspeed_rec.semantic_ids.embeddings import item_texts

CPU = torch.device("cpu")


def parse_args(argv=None):
    p = common.parser(__file__, __doc__, requests=None, untrained=False)
    p.add_argument("--sources", type=lambda s: s.replace(",", " ").split(), default=["text", "collaborative"],
                   help="sid_source values, e.g. text,collaborative")
    p.add_argument("--prefixes", type=int, default=10_000, help="prefixes of the timed trie step")
    p.add_argument("--repeats", type=int, default=20, help="timings per median")
    return common.parse(p, argv, ("GenRec",))


def median_ms(fn, repeats: int) -> float:
    return 1000 * statistics.median(timed(fn, CPU)[1] for _ in range(repeats))


def masked_step_ms(trie, codes: torch.Tensor, n: int, repeats: int) -> list[tuple[float, float]]:
    """Per depth, median ms of (the trie mask alone, one whole constrained greedy step).

    A step masks the logits, takes the argmax and advances the nodes. codes: `[n_items, L]` of
    real items; the `n` prefixes are random items' prefixes.
    """
    gen = torch.Generator().manual_seed(0)
    prefixes = codes[torch.randint(len(codes), (n,), generator=gen)]  # [n, L]
    logits = torch.randn(n, trie.codebook_size, generator=gen)  # [n, C]
    times = []
    for depth in range(trie.levels):
        nodes = trie.walk(prefixes[:, :depth])  # [n]

        def mask(nodes=nodes, depth=depth):
            return trie.allowed(nodes, depth)  # [n, C]

        def step(nodes=nodes, depth=depth):
            masked = torch.where(trie.allowed(nodes, depth), logits, float("-inf"))  # [n, C]
            return trie.step(nodes, masked.argmax(-1), depth)  # [n]

        assert (step() >= 0).all(), "a masked step left the trie"
        times.append((median_ms(mask, repeats), median_ms(step, repeats)))
    return times


def source_row(source: str, args, config, data, train) -> list:
    options = {**{k: config[k] for k in (*SID_KEYS, "sid_cache_dir", "seed")}, "sid_source": source}
    plan = plan_semantic_ids(options, data, train)
    plan.path.unlink(missing_ok=True)
    embeddings = ""
    if plan.source == "text":
        cached = text_embedding_cache_path(plan.texts, plan.cache_dir).exists()
        embeddings = " (text embeddings cached)" if cached else " (text encoded now)"
    sids, cold = timed(lambda: build_semantic_ids(options, data, train), CPU)
    again, cached = timed(lambda: build_semantic_ids(options, data, train), CPU)
    items, stats = sids.codes[1:], sids.stats
    times = masked_step_ms(sids.trie(), items, args.prefixes, args.repeats)
    return [source, stats["reason"], len(items), f"{sids.levels} x {sids.codebook_size}", stats["embedding_dim"],
            f"{cold:.2f}{embeddings}", f"{cached:.3f}", "yes" if torch.equal(sids.codes, again.codes) else "NO",
            f"{stats['collision_rate_before_resolution']:.4f}", stats["reassigned"],
            " / ".join(map(str, stats["codes_used_per_level"])),
            "yes" if len(torch.unique(items, dim=0)) == len(items) else "NO",
            " / ".join(f"{mask:.1f}" for mask, _ in times), " / ".join(f"{step:.1f}" for _, step in times)]


def benchmark(args) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = common.build(args, "GenRec")
    start = time.perf_counter()
    data, train, _, _ = common.load_data(config)
    texts = item_texts(data) or []
    quoted = sum(t.startswith('"') for t in texts)
    facts = [f"loaded in {time.perf_counter() - start:.1f} s: {data.item_num - 1} items, "
             f"{len(train._dataset.inter_feat)} training rows, {quoted} item "
             f"texts begin with a double quote; item 1: {texts[1] if texts else None!r}",
             f"trie step: {args.prefixes} random prefixes, median of {args.repeats}, per depth"]
    rows = [source_row(source, args, config, data, train._dataset) for source in args.sources]
    lines = common.header(args, "Semantic IDs: build time, collisions and the trie step", config, facts)
    lines += common.table(["source", "why", "items", "levels x codes", "embedding dim", "cold build s",
                           "cached load s", "identical when cached", "collision rate before resolution",
                           "items moved", "codes used per level", "all unique", "mask ms by depth",
                           "masked step ms by depth"], rows)
    common.write(lines, args.output)


def main(argv=None) -> int:
    return common.main(parse_args(argv), benchmark)


if __name__ == "__main__":
    sys.exit(main())
