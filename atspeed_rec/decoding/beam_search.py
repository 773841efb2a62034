"""Trie-constrained beam search over semantic IDs, KV-cached, B requests x K beams per batch.

Scores follow Hugging Face `generate(num_beams=K, prefix_allowed_tokens_fn=...)` with a
renormalising logits processor after the trie mask (`hf_generate.py`): a beam's score is the sum
of its codes' log-probabilities renormalised over the codes the trie allows, i.e. the log-prob of
the item under the constrained model, which is what GenRec is trained on. Differences from `generate`: the prompt is encoded
once per request and its KV cache is SHARED by the request's K beams (never copied per beam,
never reordered): each step feeds the K short beam paths (<= L - 1 codes each) after the
request's cached prompt in one pass, with an attention mask that keeps beams apart. With a
history of ~80 tokens and 4-code IDs, copying the cache per beam cost more than the model
itself. Codes are scored over their level's C tokens only, and the trie walk is one gather per
step. This search is both the speed baseline and the verifier that speculative decoding must
reproduce.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.profiler import record_function

from atspeed_rec.models.fast_forward import KV, additive_mask, causal_prompt_mask, lm_dtype, lm_forward
from atspeed_rec.models.vocab import CodeVocab
from atspeed_rec.semantic_ids.trie import CodeTrie

NEG_INF = float("-inf")
# torch.profiler labels of a search's stages (benchmarks/breakdown.py sums them); ~7 us per stage when not
# profiling on these CPUs, under 0.5% of a search, paid alike by speculative and target-only decoding
STAGES = {"target": "atspeed::target_pass", "draft": "atspeed::draft", "verify": "atspeed::verify_or_select"}


@dataclass
class BeamResult:
    items: torch.Tensor  # [B, K] item ids, best first; -1 where fewer than K items exist
    codes: torch.Tensor  # [B, K, L]
    scores: torch.Tensor  # [B, K] cumulative log-probabilities (-inf for missing beams)
    forward_calls: int  # target forward passes for the whole batch


def prompt_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded prompts, as `generate` makes them: pos = cumsum(mask) - 1."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def prefill(model, vocab: CodeVocab, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, KV]:
    """Encode the left-padded prompts `[B, P]`; code log-probs `[B, L * C]` of the next token and their KV."""
    mask = causal_prompt_mask(attention_mask, lm_dtype(model))
    logits, kv = lm_forward(model, vocab, input_ids, prompt_positions(attention_mask), mask, keep=1)
    return torch.log_softmax(logits[:, -1].float(), dim=-1), kv


def decode_one_token(model, vocab: CodeVocab, tokens: torch.Tensor, attention_mask: torch.Tensor, kv: KV):
    """Feed one token per row `[N]` after its cache; `attention_mask [N, T]` already includes it.
    Code log-probs `[N, L * C]` and the grown KV."""
    positions = attention_mask.long().sum(-1, keepdim=True) - 1  # [N, 1]
    mask = additive_mask(attention_mask.bool().unsqueeze(1), lm_dtype(model))  # [N, 1, 1, T]
    logits, kv = lm_forward(model, vocab, tokens.unsqueeze(-1), positions, mask, kv)
    return torch.log_softmax(logits[:, -1].float(), dim=-1), kv


def masked_log_softmax(logits: torch.Tensor, allowed: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """log softmax(logits / tau) over the allowed codes; -inf (probability exactly 0) elsewhere.

    logits [..., C] (any float dtype; computed in float32), allowed [..., C] bool -> [..., C].
    A row with no allowed finite logit is all -inf, never NaN.
    """
    x = logits.float() / tau  # [..., C]
    support = allowed & (x > NEG_INF)  # [..., C]; -inf logits carry no mass
    x = x.masked_fill(~support, torch.finfo(x.dtype).min)  # finite fill: no -inf - -inf in the softmax
    return torch.log_softmax(x, dim=-1).masked_fill(~support, NEG_INF)


def masked_code_logprobs(logprobs, vocab: CodeVocab, trie: CodeTrie, nodes, level: int):
    """`[..., C]` log-probs of the codes of `level` given the prefixes `nodes`, renormalised over the
    codes the trie allows (-inf elsewhere): the model's distribution over valid continuations, as
    it was trained (`GenRec.code_nll`). A beam's score is then log p(item | history)."""
    return masked_log_softmax(vocab.level_logits(logprobs, level), trie.allowed(nodes, level))


def select_top_k(beam_scores: torch.Tensor, code_lp: torch.Tensor, k: int):
    """Top-k (parent, code) pairs by S(h) + log p(v | h).

    beam_scores: `[B, H]`; code_lp: `[B, H, C]`. Returns parent `[B, k]`, code `[B, k]`,
    score `[B, k]`, sorted best first; -inf scores where fewer than k pairs are allowed.
    """
    C = code_lp.shape[-1]
    total = (beam_scores.unsqueeze(-1) + code_lp).flatten(1)  # [B, H * C]
    score, flat = padded_topk(total, k)
    return flat // C, flat % C, score


def padded_topk(x: torch.Tensor, k: int):
    """`topk` of `x [B, n]` that also works for k > n: missing slots get -inf and index 0."""
    k_eff = min(k, x.shape[1])
    values, index = x.topk(k_eff, dim=-1)
    if k_eff < k:
        pad = (x.shape[0], k - k_eff)
        values = torch.cat([values, values.new_full(pad, NEG_INF)], dim=1)
        index = torch.cat([index, index.new_zeros(pad)], dim=1)
    return values, index


def paths_forward(model, vocab: CodeVocab, kv: KV, prompt_mask: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Code log-probs `[B, K, L * C]` after each beam path `codes [B, K, t]`, in ONE pass over the K*t path
    tokens after each request's cached prompt (`kv`: one (keys, values) `[B, ...]` per layer).

    Token (k, j) sees the request's non-pad prompt and tokens (k, 0..j) of its own beam; its
    position is the prompt's last position + 1 + j, as in `generate`.
    """
    B, K, t = codes.shape
    dev, dtype = codes.device, lm_dtype(model)
    beam_of = torch.arange(K, device=dev).repeat_interleave(t)  # [K*t] beam of each path token
    t_of = torch.arange(t, device=dev).repeat(K)  # [K*t] depth of each path token
    own_path = (beam_of.unsqueeze(1) == beam_of) & (t_of <= t_of.unsqueeze(1))  # [K*t, K*t]
    vis = torch.cat([prompt_mask.bool().unsqueeze(1).expand(B, K * t, -1), own_path.expand(B, -1, -1)], -1)
    positions = prompt_mask.long().sum(-1, keepdim=True) + t_of  # [B, K*t]
    last = torch.arange(K, device=dev) * t + t - 1  # [K] each beam's last token
    logits, _ = lm_forward(model, vocab, vocab.tokens(codes).flatten(1), positions, additive_mask(vis, dtype), kv, last)
    return torch.log_softmax(logits.float(), dim=-1)  # [B, K, L * C]; the grown cache is dropped


@torch.no_grad()
def beam_search(model, trie: CodeTrie, vocab: CodeVocab, input_ids: torch.Tensor,
                attention_mask: torch.Tensor, num_beams: int, select=select_top_k) -> BeamResult:
    """Top-`num_beams` valid items for each left-padded prompt `input_ids [B, P]`.

    `select(beam_scores, code_lp, k) -> (parent, code, score)` keeps k (parent, code) pairs per
    step: the top k here, k sampled without replacement for beam sampling (`sampling.py`).
    """
    B, K, L = input_ids.shape[0], num_beams, vocab.levels
    with record_function(STAGES["target"]):
        logprobs, kv = prefill(model, vocab, input_ids, attention_mask)  # [B, L * C]; the prompts' KV, shared by their beams
    with record_function(STAGES["verify"]):
        nodes = trie.root_nodes(B, 1)  # [B, 1]
        code_lp = masked_code_logprobs(logprobs.unsqueeze(1), vocab, trie, nodes, 0)  # [B, 1, C]
        parent, code, scores = select(input_ids.new_zeros(B, 1, dtype=torch.float), code_lp, K)
        codes = code.unsqueeze(-1)  # [B, K, 1]
        alive = scores > NEG_INF
        nodes = torch.where(alive, trie.step(nodes.expand(B, K), code, 0), 0)  # [B, K]
    for level in range(1, L):
        with record_function(STAGES["target"]):
            logprobs = paths_forward(model, vocab, kv, attention_mask, codes)  # [B, K, L * C]
        with record_function(STAGES["verify"]):
            code_lp = masked_code_logprobs(logprobs, vocab, trie, nodes, level)
            parent, code, scores = select(scores, code_lp, K)
            codes = torch.cat([codes.gather(1, parent.unsqueeze(-1).expand(-1, -1, level)),
                               code.unsqueeze(-1)], dim=-1)  # [B, K, level + 1]
            alive = scores > NEG_INF
            nodes = torch.where(alive, trie.step(nodes.gather(1, parent), code, level), 0)
    items = torch.where(alive, nodes, -1)  # the last trie step yields item ids
    return BeamResult(items=items, codes=codes, scores=scores, forward_calls=L)
