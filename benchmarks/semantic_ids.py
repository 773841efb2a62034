"""Benchmark semantic-ID building on a real dataset (default: amazon-beauty), both sources.

For each source it prints the build time cold (no semantic-ID cache file; text embeddings are
reused from the cache when present, and the run says whether they were), then cached, the
collision rate before resolution, the codes used per level, whether all IDs are unique, and the
time of one trie-masked decoding step for 10,000 prefixes at each depth.

    python benchmarks/semantic_ids.py --data_path ../shared/datasets

The cold build deletes exactly the cache file it is about to rebuild.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import torch

import atspeed_rec  # noqa: F401  (RecBole compatibility patches, before any Config)
from recbole.data import create_dataset, data_preparation

from atspeed_rec.recbole_glue.runner import build_config
from atspeed_rec.semantic_ids.builder import build_semantic_ids, plan_semantic_ids, text_embedding_cache_path
from atspeed_rec.semantic_ids.embeddings import item_texts

ROOT = Path(__file__).resolve().parents[1]


def load(dataset: str, data_path: str):
    """(config, dataset, training split) with the project's property files."""
    config = build_config("SASRec", dataset, None, {"data_path": data_path, "show_progress": False})
    data = create_dataset(config)
    train_data, _, _ = data_preparation(config, data)
    return config, data, train_data._dataset


def _median_ms(fn, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return 1000 * statistics.median(samples)


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

        def step():
            masked = torch.where(trie.allowed(nodes, depth), logits, float("-inf"))  # [n, C]
            return trie.step(nodes, masked.argmax(-1), depth)  # [n]

        assert (step() >= 0).all(), "a masked step left the trie"
        times.append((_median_ms(lambda: trie.allowed(nodes, depth), repeats), _median_ms(step, repeats)))
    return times


def timed_build(config: dict, data, train):
    start = time.perf_counter()
    sids = build_semantic_ids(config, data, train)
    return sids, time.perf_counter() - start


def bench_source(source: str, args, data, train, seed: int) -> None:
    config = {"sid_source": source, "sid_levels": args.levels, "sid_codebook_size": args.codebook_size,
              "sid_collab_dim": args.collab_dim, "seed": seed, "sid_cache_dir": args.cache_dir}
    plan = plan_semantic_ids(config, data, train)
    plan.path.unlink(missing_ok=True)
    if source == "text":
        warm = text_embedding_cache_path(plan.texts, plan.cache_dir).exists()
        print(f"\ntext embeddings: {'cached (not part of the cold time)' if warm else 'encoding now'}")
    sids, cold = timed_build(config, data, train)
    cached_sids, cached = timed_build(config, data, train)
    items = sids.codes[1:]
    unique = len(torch.unique(items, dim=0)) == len(items)
    print(f"\n== source: {source} ({sids.stats['reason']})")
    print(f"items: {len(items)}, levels x codebook: {sids.levels} x {sids.codebook_size}, "
          f"embedding dim: {sids.stats['embedding_dim']}")
    print(f"build time: cold {cold:.2f} s, cached {cached:.3f} s "
          f"(identical: {torch.equal(sids.codes, cached_sids.codes)})")
    print(f"collision rate before resolution: {sids.stats['collision_rate_before_resolution']:.4f} "
          f"({sids.stats['reassigned']} items moved to a free last-level code)")
    print(f"codes used per level: {sids.stats['codes_used_per_level']}")
    print(f"all items unique: {'yes' if unique else 'no'}")
    try:
        trie = sids.trie()
    except ImportError:
        print("masked step: skipped (atspeed_rec.semantic_ids.trie not available)")
        return
    times = masked_step_ms(trie, items, args.prefixes, args.repeats)
    print(f"masked step for {args.prefixes} prefixes, median of {args.repeats}, by depth "
          "(mask only / mask + argmax + advance, ms): "
          + ", ".join(f"{mask:.1f} / {step:.1f}" for mask, step in times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_path", default=str(ROOT.parent / "shared" / "datasets"))
    parser.add_argument("--dataset", default="amazon-beauty")
    parser.add_argument("--sources", nargs="+", default=["text", "collaborative"])
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--codebook_size", type=int, default=256)
    parser.add_argument("--collab_dim", type=int, default=64)
    parser.add_argument("--cache_dir", default=str(ROOT / "cache" / "semantic_ids"))
    parser.add_argument("--prefixes", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    start = time.perf_counter()
    config, data, train = load(args.dataset, args.data_path)
    texts = item_texts(data) or []
    quoted = sum(t.startswith('"') for t in texts)
    print(f"loaded {args.dataset} in {time.perf_counter() - start:.1f} s: {data.item_num - 1} items, "
          f"{len(train.inter_feat)} training rows, {quoted} item "
          f"texts begin with a double quote; item 1: {texts[1] if texts else None!r}")
    for source in args.sources:
        bench_source(source, args, data, train, config["seed"])


if __name__ == "__main__":
    main()
