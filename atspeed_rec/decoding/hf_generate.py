"""The reference: Hugging Face `generate` beam search with the trie as `prefix_allowed_tokens_fn`.

A logits processor after the trie mask renormalises the log-probs over the allowed tokens, so
that a beam's score is log p(item | history) under the constrained model, as in our search.
Used by the equivalence tests and as the second speed baseline in the benchmarks.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from atspeed_rec.decoding.beam_search import BeamResult
from atspeed_rec.models.vocab import CodeVocab
from atspeed_rec.semantic_ids.trie import CodeTrie


def allowed_tokens_fn(trie: CodeTrie, vocab: CodeVocab, prompt_len: int):
    """`prefix_allowed_tokens_fn` for `generate`: the trie's next codes as token ids."""
    def allowed(batch_id: int, sent: torch.Tensor) -> list[int]:
        level = sent.shape[0] - prompt_len
        codes = sent[prompt_len:] - vocab.offset - torch.arange(level, device=sent.device) * vocab.codebook_size
        mask = trie.allowed_after(codes)
        return (torch.nonzero(mask).flatten() + vocab.level_start(level)).tolist()
    return allowed


class Renormalise(LogitsProcessor):
    """log_softmax again after the trie mask: log-probs over the allowed tokens only."""

    def __call__(self, input_ids, scores):
        return torch.log_softmax(scores, dim=-1)


@torch.no_grad()
def hf_beam_search(model, trie: CodeTrie, vocab: CodeVocab, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor, num_beams: int) -> BeamResult:
    """`generate(num_beams=K)` over left-padded prompts, returned as a `BeamResult`."""
    B, P, K, L = input_ids.shape[0], input_ids.shape[1], num_beams, vocab.levels
    beam_args = {"length_penalty": 0.0, "early_stopping": False} if K > 1 else {}
    out = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, num_beams=K, num_return_sequences=K,
        max_new_tokens=L, do_sample=False, prefix_allowed_tokens_fn=allowed_tokens_fn(trie, vocab, P),
        logits_processor=LogitsProcessorList([Renormalise()]), return_dict_in_generate=True, output_scores=True,
        pad_token_id=vocab.pad_id, eos_token_id=None, **beam_args)
    new = out.sequences[:, P:]  # [B*K, L]
    codes = (new - vocab.offset - torch.arange(L, device=new.device) * vocab.codebook_size).view(B, K, L)
    if K > 1:
        scores = out.sequences_scores
    else:  # greedy search keeps no sequence score: sum the chosen tokens' processed log-probs
        steps = torch.stack([s.float() for s in out.scores], 1)  # [B, L, V]
        scores = steps.gather(-1, new.unsqueeze(-1)).sum((1, 2))
    return BeamResult(items=trie.item_of(codes), codes=codes, scores=scores.view(B, K), forward_calls=L)
