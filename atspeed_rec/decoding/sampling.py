"""Sampling without replacement (Gumbel-top-k) and trie-constrained beam SAMPLING.

`beam_sample` is the target-only baseline of relaxed speculative decoding: at every step it draws
K (beam, code) pairs without replacement from the softmax of the cumulative scores
(S(h) + log p(v | h)) / T, instead of keeping the top K. The temperature T sharpens (T < 1) or
flattens the draws; T -> 0 is beam search. Beams keep their untempered scores.

`last_level` says how the K items are chosen at the last code: "sample" (the paper's beam sampling
at every step) or "top_k": the K best items under the sampled prefixes, as beam search would rank
them. The last code is never drafted (it is always the target's own step), so the choice changes
accuracy, not speed.
"""

from __future__ import annotations

import torch

from atspeed_rec.decoding.beam_search import NEG_INF, BeamResult, beam_search, padded_topk, select_top_k
from atspeed_rec.models.vocab import CodeVocab
from atspeed_rec.semantic_ids.trie import CodeTrie

LAST_LEVELS = ("top_k", "sample")  # relaxed decoding at the last code: keep the top K, or sample K


def gumbel(shape, generator=None, device=None) -> torch.Tensor:
    """Standard Gumbel noise: -log(E), E ~ Exp(1)."""
    e = torch.empty(shape, device=device).exponential_(generator=generator)
    return -e.clamp_(min=torch.finfo(e.dtype).tiny).log()


def gumbel_top_k(logits: torch.Tensor, k: int, generator=None, noise=None):
    """k indices `[B, k]` drawn without replacement from softmax(logits `[B, n]`), in draw order.

    argtop-k of logits + Gumbel noise (fresh, or the given `noise [B, n]`: two draws that share it are
    coupled). `valid [B, k]` is False where fewer than k entries have non-zero probability (those slots
    hold arbitrary indices).
    """
    keys = logits + (gumbel(logits.shape, generator, logits.device) if noise is None else noise)
    top, flat = padded_topk(keys, k)
    return flat, top > NEG_INF


def sample_top_k(beam_scores: torch.Tensor, code_lp: torch.Tensor, k: int, generator=None, temperature: float = 1.0,
                 noise=None):
    """Like `select_top_k`, but the k (parent, code) pairs are SAMPLED without replacement from
    softmax((S(h) + log p(v | h)) / T) (with the Gumbel `noise [B, H * C]` when given). Returns parent,
    code, score `[B, k]` in draw order (untempered scores), -inf scores for empty slots."""
    C = code_lp.shape[-1]
    total = (beam_scores.unsqueeze(-1) + code_lp).flatten(1)  # [B, H * C]
    flat, valid = gumbel_top_k(total / temperature, k, generator, noise)  # softmax is shift-invariant: no normalising
    score = total.gather(1, flat).masked_fill(~valid, NEG_INF)
    return flat // C, flat % C, score


def check_last_level(last_level: str) -> None:
    if last_level not in LAST_LEVELS:
        raise ValueError(f"last_level must be one of {LAST_LEVELS}, got {last_level!r}")


def sort_beams(codes: torch.Tensor, scores: torch.Tensor, items: torch.Tensor):
    """Beams ordered by score, best first (stable)."""
    order = scores.argsort(dim=-1, descending=True, stable=True)  # [B, K]
    return codes.gather(1, order.unsqueeze(-1).expand_as(codes)), scores.gather(1, order), items.gather(1, order)


def beam_sample(model, trie: CodeTrie, vocab: CodeVocab, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                num_beams: int, generator=None, temperature: float = 1.0, last_level: str = "top_k") -> BeamResult:
    """K distinct valid items per prompt by trie-constrained beam sampling at `temperature` (at the
    last code too when `last_level` is "sample", else the top K there), sorted by score."""
    check_last_level(last_level)
    out = beam_search(model, trie, vocab, input_ids, attention_mask, num_beams,
                      select=lambda scores, code_lp, k: sample_top_k(scores, code_lp, k, generator, temperature),
                      last_select=select_top_k if last_level == "top_k" else None)
    codes, scores, items = sort_beams(out.codes, out.scores, out.items)
    return BeamResult(items=items, codes=codes, scores=scores, forward_calls=out.forward_calls)
