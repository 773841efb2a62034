"""Trie-constrained beam search over semantic IDs, KV-cached, B requests x K beams per batch.

Scores follow Hugging Face `generate(num_beams=K, prefix_allowed_tokens_fn=...)` with a
renormalising logits processor after the trie mask (`hf_generate.py`): a beam's score is the sum
of its codes' log-probabilities renormalised over the codes the trie allows, i.e. the log-prob of
the item under the constrained model, which is what GenRec is trained on.
Differences from `generate`: the prompt is encoded once per request (its text prefix once per model:
`models/prefix_cache.py`) and the KV cache is SHARED by the request's K beams (never copied per
beam, never reordered): each step feeds only each beam's newest code (`tree.tree_forward`), the cache
keeps every token fed, and an attention mask lets a beam's token see the prompt and its own ancestors,
found by their cache indices. With a history of ~80 tokens and 4-code IDs, copying the cache per beam
cost more than the model itself; re-feeding each beam's whole path every step cost up to 3x the tokens.
A step where every live beam has only one valid code makes no model call (its log-prob is 0: see
`forced`), and the last step feeds only the beams with a choice left (`last_code_beams`). Codes are
scored over their level's C tokens only, and the trie walk is one gather per step. This search is both
the speed baseline and the verifier that speculative decoding must reproduce.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.profiler import record_function

from atspeed_rec.decoding.tree import DraftTree, tree_forward
from atspeed_rec.models.prefix_cache import split_prefix
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
    code_logprobs: torch.Tensor | None = None  # [B, K, L, C] with keep_logprobs: the (renormalised) distribution
    # of code l after each beam's first l codes, the step's own (teacher data needs no second pass)


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
                attention_mask: torch.Tensor, num_beams: int, select=select_top_k, last_select=None,
                keep_logprobs: bool = False, skip_decided: bool = True) -> BeamResult:
    """Top-`num_beams` valid items for each left-padded prompt `input_ids [B, P]`.

    `select(beam_scores, code_lp, k) -> (parent, code, score)` keeps k (parent, code) pairs per
    step: the top k here, k sampled without replacement for beam sampling (`sampling.py`);
    `last_select` (default: `select`) keeps the k items at the last code. `keep_logprobs`: also
    return each final beam's code distributions along its path (`BeamResult.code_logprobs`). `skip_decided`
    (lossless, the default): the last step feeds only the beams the trie leaves a choice (`last_code_beams`);
    False feeds every beam, for comparison.
    """
    B, K, L, C, dev = input_ids.shape[0], num_beams, vocab.levels, vocab.codebook_size, input_ids.device
    beams = Beams(input_ids.new_zeros(B, 1, 0), torch.zeros(B, 1, device=dev), trie.root_nodes(B, 1))
    no_tree = DraftTree.empty(B, device=dev)
    ancestors = input_ids.new_zeros(B, 1, 0)  # [B, H, c] cache index of each beam's codes fed so far
    input_ids, attention_mask, prefix = split_prefix([model], vocab, input_ids, attention_mask)
    # the shared prefix's KV (or nothing), then the prompts and every code token fed: indexed by `ancestors`
    kv = None if prefix is None else prefix[0]
    path_lp = torch.zeros(B, 1, 0, C, device=dev)  # [B, H, level, C] each beam's distributions so far
    calls = 0
    for level in range(L):
        if level and forced(trie, beams, level):  # no model call: each live beam has one valid code
            code_lp = masked_log_softmax(torch.zeros(()).expand(*beams.nodes.shape, C),
                                         trie.allowed(beams.nodes, level))  # 0 there, as the model's would be
        else:
            with record_function(STAGES["target"]):  # the prompts, then the beams' codes not yet fed
                T, H, fed = kv[0][0].shape[2] if kv else 0, beams.codes.shape[1], level - ancestors.shape[-1]
                last = skip_decided and 0 < level == L - 1
                sub = last_code_beams(trie, beams, level) if last else None  # at the last code: the
                paths, anc = gathered(sub, beams.codes, ancestors)  # beams the trie leaves a choice only
                logprobs, _, kv = tree_forward(model, vocab, attention_mask, paths, no_tree, kv,
                                               input_ids if level == 0 else None, anc)  # [B, H or m, L * C]
                logprobs = spread(sub, logprobs, H)  # [B, H, L * C]
                new = T + torch.arange(H * fed, device=dev).view(1, H, fed)  # where they went in the cache (all H
                ancestors = torch.cat([ancestors, new.expand(B, H, fed)], -1)  # fed; no pass follows the last)
            calls += 1
            code_lp = masked_code_logprobs(logprobs, vocab, trie, beams.nodes, level)  # [B, H, C]
        with record_function(STAGES["verify"]):
            pick = last_select if last_select is not None and level == L - 1 else select
            parent, code, score = pick(beams.scores, code_lp, K)
            beams = extend_beams(beams, parent, code, score, trie, level)  # [B, K, level + 1]
            ancestors = ancestors.gather(1, parent.unsqueeze(-1).expand(-1, -1, ancestors.shape[-1]))  # children's
            if keep_logprobs:  # the parent's distributions, then the one its new code was drawn from
                path_lp = torch.cat([path_lp, code_lp.unsqueeze(2)], 2)  # [B, H, level + 1, C]
                path_lp = path_lp.gather(1, parent.view(B, K, 1, 1).expand(-1, -1, level + 1, C))  # [B, K, ., C]
    items = torch.where(beams.scores > NEG_INF, beams.nodes, -1)  # the last trie step yields item ids
    return BeamResult(items=items, codes=beams.codes, scores=beams.scores, forward_calls=calls,
                      code_logprobs=path_lp if keep_logprobs else None)


def forced(trie: CodeTrie, beams: Beams, level: int) -> bool:
    """True when every live beam has exactly one valid code at `level`: its log-prob renormalised over
    the valid codes is 0 whatever the model says, so the step needs no model call. Semantic IDs whose
    last code only tells apart items sharing a prefix make many last steps so (amazon-beauty's 3-code IDs:
    64% of 2-code prefixes have one child)."""
    return bool(((trie.only_code(beams.nodes, level) >= 0) | (beams.scores == NEG_INF)).all())


def last_code_beams(trie: CodeTrie, beams: Beams, level: int) -> torch.Tensor | None:
    """At the ID's last code (`level` L - 1), the beams a pass must feed `[B, m]`: those with several valid last
    codes first, m the most any request has (< H), or None when all H need it. A beam whose last code the trie
    decides (log-prob 0 whatever the model says) or an empty one needs no model output, and after the last code
    no pass needs its KV (amazon-beauty: 64% of 2-code prefixes, those of 36% of the items, have one child)."""
    need = (trie.only_code(beams.nodes, level) < 0) & (beams.scores > NEG_INF)  # [B, H]
    m = int(need.sum(-1).max())
    if m == need.shape[1]:
        return None
    return need.long().argsort(dim=-1, descending=True, stable=True)[:, :m]


def gathered(sub: torch.Tensor | None, *per_beam: torch.Tensor):
    """Each `[B, H, ...]` tensor at the beams `sub [B, m]` (`last_code_beams`), or as is when `sub` is None."""
    if sub is None:
        return per_beam
    return tuple(t.gather(1, sub.view(*sub.shape, 1).expand(-1, -1, t.shape[-1])) for t in per_beam)


def spread(sub: torch.Tensor | None, logprobs: torch.Tensor, H: int) -> torch.Tensor:
    """Log-probs `[B, m, V]` of the beams `sub` back at their places among H `[B, H, V]`; 0 (finite, so the
    trie's mask renormalises them to log-prob 0 for the one valid code) at the beams no pass fed."""
    if sub is None:
        return logprobs
    return logprobs.new_zeros(logprobs.shape[0], H, logprobs.shape[-1]).scatter(
        1, sub.unsqueeze(-1).expand(-1, -1, logprobs.shape[-1]), logprobs)


def forced_completion(trie: CodeTrie, beams: Beams, level: int):
    """Per request `[B]`: whether the trie alone decides every live beam's codes from `level` on (one
    valid code at each level: log-prob 0 whatever a model says, so the beams, their scores and their
    order are final); with those codes `[B, H, L - level]` and the last nodes (item ids) `[B, H]`."""
    nodes, live = beams.nodes, beams.scores > NEG_INF
    done = torch.ones(nodes.shape[0], dtype=torch.bool, device=nodes.device)
    path = []
    for t in range(level, trie.levels):
        code = trie.only_code(nodes, t)  # [B, H], -1 where several codes are valid
        done &= ((code >= 0) | ~live).all(-1)
        nodes = torch.where(live & (code >= 0), trie.step(nodes, code.clamp(min=0), t), 0)
        path.append(code.clamp(min=0))
    return done, torch.stack(path, -1), nodes
