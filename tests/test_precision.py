"""bfloat16: chosen where the hardware runs it fast; strict speculative decoding stays exact in it."""

import pytest
import torch

from atspeed_rec.decoding.beam_search import beam_search
from atspeed_rec.decoding.speculative import speculative_beam_search
from atspeed_rec.errors import ConfigError
from atspeed_rec.models import precision
from atspeed_rec.models.vocab import CodeVocab
from atspeed_rec.semantic_ids.trie import CodeTrie
from random_models import random_ids, random_lm, random_prompts

VOCAB = CodeVocab(levels=4, codebook_size=8)


@pytest.mark.parametrize("flags,pretrained,expected", [
    ({"amx_bf16", "avx512f"}, True, torch.bfloat16),
    ({"avx512_bf16"}, True, torch.bfloat16),
    ({"avx2"}, True, torch.float32),  # no bf16 in hardware: float32
    ({"amx_bf16"}, False, torch.float32),  # small from-scratch models: per-call overhead, float32
])
def test_auto_picks_bfloat16_for_a_pretrained_lm_on_bf16_hardware_only(monkeypatch, flags, pretrained, expected):
    monkeypatch.setattr(precision, "_cpu_flags", lambda: frozenset(flags))
    assert precision.resolve_dtype("auto", "cpu", pretrained) == expected


def test_an_explicit_dtype_wins_and_an_unknown_one_is_refused():
    assert precision.resolve_dtype("float32", "cpu", True) == torch.float32
    assert precision.resolve_dtype("bfloat16", "cpu", False) == torch.bfloat16
    with pytest.raises(ConfigError, match="fix: --dtype=auto"):
        precision.resolve_dtype("fp8", "cpu", True)


def test_strict_speculative_output_equals_the_bf16_targets_own_beam_search_up_to_rounding_ties():
    """In float32 strict mode is exact (tests/test_speculative.py). In bfloat16 the verification pass and
    the target-only search multiply differently shaped batches, so their logits differ by bf16 rounding
    (~0.01 on a cumulative score), and candidates closer than that may swap: the lists agree rank by
    rank in score, and are identical for the great majority of requests."""
    same = total = 0
    for seed in range(3):
        codes = random_ids(300, 4, 8, seed)
        trie = CodeTrie(codes, 8, item_offset=1)
        target = random_lm(VOCAB.size, seed).to(torch.bfloat16)  # grouped-query attention: 4 heads, 2 KV heads
        draft = random_lm(VOCAB.size, seed + 1000, layers=1).to(torch.bfloat16)
        item_codes = torch.cat([torch.full((1, 4), -1), codes])
        ids, mask = random_prompts(item_codes, VOCAB, batch=8, max_hist=5, seed=seed)
        for k, extra, gamma in [(1, 3, 3), (5, 5, 1), (10, 10, 3), (20, 20, 1)]:
            spec, _ = speculative_beam_search(target, draft, trie, VOCAB, ids, mask, num_beams=k,
                                              draft_beams=k + extra, gamma=gamma)
            ref = beam_search(target, trie, VOCAB, ids, mask, num_beams=k)
            torch.testing.assert_close(spec.scores, ref.scores, atol=0.15, rtol=0)  # rank by rank
            assert (spec.items > 0).all() and all(row.unique().numel() == k for row in spec.items)
            same += int((spec.items == ref.items).all(1).sum())
            total += len(ids)
    assert same >= 0.85 * total, f"{same} of {total} requests identical"
