"""Trie-constrained beam search over semantic IDs, KV-cached, B requests x K beams per batch.

Scores follow Hugging Face `generate(num_beams=K, prefix_allowed_tokens_fn=...)` with a
renormalising logits processor after the trie mask (`hf_generate.py`): a beam's score is the sum
of its codes' log-probabilities renormalised over the codes the trie allows, i.e. the log-prob of
the item under the constrained model, which is what GenRec is trained on. Differences from `generate`: the prompt is encoded
once per request and its KV cache is SHARED by the request's K beams (never copied per beam,
never reordered): each step feeds the K short beam paths (<= L - 1 codes each) after the
request's cached prompt in one pass (`tree.tree_forward` with an empty tree), with an attention
mask that keeps beams apart. With a history of ~80 tokens and 4-code IDs, copying the cache per
beam cost more than the model itself. Codes are scored over their level's C tokens only, and the
trie walk is one gather per step. This search is both the speed baseline and the verifier that
speculative decoding must reproduce.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.profiler import record_function

from atspeed_rec.decoding.tree import DraftTree, tree_forward
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


@dataclass
class Beams:
    codes: torch.Tensor  # [B, H, t] code paths
    scores: torch.Tensor  # [B, H] cumulative log-probs (-inf: empty beam)
    nodes: torch.Tensor  # [B, H] trie node of each path (0 for empty beams)


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


def extend_beams(beams: Beams, parent: torch.Tensor, code: torch.Tensor, score: torch.Tensor, trie: CodeTrie,
                 level: int) -> Beams:
    """The k children `[B, k]` (parent, code) with scores `score` of the beams, `level` the new code's."""
    k, t = parent.shape[1], beams.codes.shape[2]
    codes = torch.cat([beams.codes.gather(1, parent.unsqueeze(-1).expand(-1, k, t)), code.unsqueeze(-1)], -1)
    nodes = torch.where(score > NEG_INF, trie.step(beams.nodes.gather(1, parent), code, level), 0)
    return Beams(codes, score, nodes)  # codes [B, k, t + 1]


@torch.no_grad()
def beam_search(model, trie: CodeTrie, vocab: CodeVocab, input_ids: torch.Tensor,
                attention_mask: torch.Tensor, num_beams: int, select=select_top_k, last_select=None) -> BeamResult:
    """Top-`num_beams` valid items for each left-padded prompt `input_ids [B, P]`.

    `select(beam_scores, code_lp, k) -> (parent, code, score)` keeps k (parent, code) pairs per
    step: the top k here, k sampled without replacement for beam sampling (`sampling.py`);
    `last_select` (default: `select`) keeps the k items at the last code.
    """
    B, K, L = input_ids.shape[0], num_beams, vocab.levels
    beams = Beams(input_ids.new_zeros(B, 1, 0), torch.zeros(B, 1, device=input_ids.device), trie.root_nodes(B, 1))
    no_tree = DraftTree.empty(B, device=input_ids.device)
    kv = None  # the prompts' KV, shared by their beams: encoded by the first pass
    for level in range(L):
        with record_function(STAGES["target"]):
            logprobs, _, kv = tree_forward(model, vocab, attention_mask, beams.codes, no_tree, kv,
                                           input_ids if kv is None else None)  # [B, H, L * C]
        with record_function(STAGES["verify"]):
            code_lp = masked_code_logprobs(logprobs, vocab, trie, beams.nodes, level)  # [B, H, C]
            pick = last_select if last_select is not None and level == L - 1 else select
            beams = extend_beams(beams, *pick(beams.scores, code_lp, K), trie, level)  # [B, K, level + 1]
    items = torch.where(beams.scores > NEG_INF, beams.nodes, -1)  # the last trie step yields item ids
    return BeamResult(items=items, codes=beams.codes, scores=beams.scores, forward_calls=L)
