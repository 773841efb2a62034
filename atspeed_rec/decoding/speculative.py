"""Speculative beam search (AtSpeed): a small draft proposes a tree of beams, the target verifies it in one pass.

One round, for the requests at depth `cur` with H current beams (codes and TARGET scores):
1. Draft: d = min(gamma, L - cur - 1) steps of width-N beam search from the current beams, starting
   from their target scores (strict: top-N of S + log q; relaxed: N sampled without replacement
   from softmax(S + log q), keeping that distribution q_j). A tree of d levels x N nodes.
2. Target: ONE forward over the H beam paths + the N*d tree tokens (first round: the prompt as
   well) with a tree attention mask (`tree.py`): its log-probs after every beam and tree node.
3. Verify level i = 0..d. Strict: T_i = the top K of S_p(h) + log p(v | h), exactly what
   `beam_search` keeps; the level is accepted if every live pair of T_i is a drafted node, else
   (or at i == d, the bonus step) T_i is emitted and the round stops: lossless. Relaxed: each
   drafted node is accepted with prob min(1, p/q); with >= K accepted keep K at random and go on,
   else keep them, fill up from the residual max(p - q, 0) and stop. p and q are the softmax of
   cumulative scores divided by a temperature T (`beam_sample`'s), 1 by default.
A round advances (accepted levels + 1) codes. Requests at the same depth share the round's calls;
deeper ones wait (the shallowest depth goes first), finished ones leave the batch. Both models keep
only their prompt KV between rounds: the beam paths (<= K * (L - 1) tokens) are re-fed each round.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.profiler import record_function

from atspeed_rec.decoding.beam_search import (NEG_INF, STAGES, BeamResult, decode_one_token,
                                              masked_code_logprobs, prefill, select_top_k)
from atspeed_rec.decoding.sampling import gumbel, gumbel_top_k, sample_top_k, sort_beams
from atspeed_rec.decoding.tree import DraftTree, cache_rows, tree_forward
from atspeed_rec.models.fast_forward import additive_mask, lm_dtype, lm_forward
from atspeed_rec.models.vocab import CodeVocab
from atspeed_rec.semantic_ids.trie import CodeTrie

MODES = ("strict", "relaxed")


@dataclass
class SpecStats:  # totals for the batch; per-request tensors where noted
    target_calls: torch.Tensor  # [B] target forward passes each request took part in
    draft_calls: int  # draft forward passes (batched calls) for the whole batch
    accepted_steps: torch.Tensor  # [B] drafted levels accepted (sum over rounds)
    drafted_levels: torch.Tensor  # [B] drafted levels offered for verification
    rounds: torch.Tensor  # [B]


@dataclass
class Beams:
    codes: torch.Tensor  # [G, H, cur]
    scores: torch.Tensor  # [G, H] target cumulative log-probs (-inf: empty beam)
    nodes: torch.Tensor  # [G, H] trie node of each prefix (0 for empty beams)


# ---------------------------------------------------------------- draft


def draft_paths(draft, kv, rows, prompt_mask, beams: Beams, vocab: CodeVocab):
    """Feed the beam paths after the draft's cached prompt: log-probs `[G, H, V]` and the KV of the
    G*H rows (prompt + path), one row per beam."""
    G, H, cur = beams.codes.shape
    kv = [(k.repeat_interleave(H, 0), v.repeat_interleave(H, 0)) for k, v in cache_rows(kv, rows)]
    mask = prompt_mask.repeat_interleave(H, dim=0)  # [G*H, P]
    positions = mask.long().sum(-1, keepdim=True) + torch.arange(cur, device=mask.device)  # [G*H, cur]
    causal = torch.ones(cur, cur, dtype=torch.bool, device=mask.device).tril()  # the path, causally
    visible = torch.cat([mask.bool().unsqueeze(1).expand(-1, cur, -1), causal.expand(G * H, -1, -1)], -1)
    tokens = vocab.tokens(beams.codes).flatten(0, 1)  # [G*H, cur]
    logits, kv = lm_forward(draft, vocab, tokens, positions, additive_mask(visible, lm_dtype(draft)), kv, keep=1)
    return torch.log_softmax(logits[:, -1].float(), dim=-1).view(G, H, -1), kv


def draft_tree(draft, cache, logprobs, beams: Beams, trie: CodeTrie, vocab: CodeVocab, prompt_mask,
               depth: int, width: int, mode: str, generator=None, temperature: float = 1.0):
    """`depth` levels of width-`width` beam search from the current beams.

    logprobs: `[G, H, V]` draft log-probs after each current beam; `cache` rows G*H hold their paths.
    Returns the tree and the number of draft forward passes it took.
    """
    G, N, cur = logprobs.shape[0], width, beams.codes.shape[2]
    scores, nodes = beams.scores, beams.nodes  # cumulative scores start from the TARGET's
    parents, codes, alive, logq = [], [], [], []
    for j in range(depth):
        code_lp = masked_code_logprobs(logprobs, vocab, trie, nodes, cur + j)  # [G, h, C]
        if mode == "strict":
            parent, code, scores = select_top_k(scores, code_lp, N)  # top-N of S + log q
        else:
            q = torch.log_softmax((scores.unsqueeze(-1) + code_lp).flatten(1) / temperature, -1)  # q_j: (parent, code)
            logq.append(q.view_as(code_lp))
            parent, code, scores = sample_top_k(scores, code_lp, N, generator, temperature)
        live = scores > NEG_INF
        nodes = torch.where(live, trie.step(nodes.gather(1, parent), code, cur + j), 0)  # [G, N]
        parents.append(parent), codes.append(code), alive.append(live)
        if j < depth - 1:
            h = logprobs.shape[1]
            rows = (torch.arange(G, device=parent.device).unsqueeze(-1) * h + parent).flatten()  # [G*N]
            cache = cache_rows(cache, rows)  # each node continues its parent's row
            mask = prompt_mask.repeat_interleave(N, dim=0)
            mask = torch.cat([mask, mask.new_ones(G * N, cur + j + 1)], dim=1)  # prompt + path + tree levels
            logprobs, cache = decode_one_token(draft, vocab, vocab.tokens(code, cur + j).flatten(), mask, cache)
            logprobs = logprobs.view(G, N, -1)
    tree = DraftTree(torch.stack(parents, 1), torch.stack(codes, 1), torch.stack(alive, 1), logq)
    return tree, max(depth - 1, 0)


# ---------------------------------------------------------------- verification


def _emit(out, rows, beams: Beams, level: int):
    """Write the beams of the `rows` that stop at verification `level` into `out`."""
    out_codes, out_scores, out_nodes, out_adv = out
    out_codes[rows, :, :beams.codes.shape[-1]] = beams.codes[rows]
    out_scores[rows], out_nodes[rows], out_adv[rows] = beams.scores[rows], beams.nodes[rows], level + 1


def _empty_out(beams: Beams, K: int, d: int):
    G, _, cur = beams.codes.shape
    codes = beams.codes.new_zeros(G, K, cur + d + 1)
    return codes, beams.scores.new_full((G, K), NEG_INF), beams.nodes.new_zeros(G, K), beams.nodes.new_zeros(G)


def _gather_beams(beams: Beams, parent, code, score, trie: CodeTrie, depth: int) -> Beams:
    """Children (parent, code) of the beams, as `beam_search` builds them."""
    K, cur = parent.shape[1], beams.codes.shape[2]
    codes = torch.cat([beams.codes.gather(1, parent.unsqueeze(-1).expand(-1, K, cur)), code.unsqueeze(-1)], -1)
    alive = score > NEG_INF
    nodes = torch.where(alive, trie.step(beams.nodes.gather(1, parent), code, depth), 0)
    return Beams(codes, score, nodes)


def _node_logprobs(lp_tree, level: int, node):
    """Target log-probs `[G, K, V]` after the tree nodes `node [G, K]` of `level`."""
    lp = lp_tree[:, level]  # [G, N, V]
    return lp.gather(1, node.unsqueeze(-1).expand(-1, -1, lp.shape[-1]))


def verify_strict(lp_beams, lp_tree, tree: DraftTree, beams: Beams, K: int, trie: CodeTrie, vocab: CodeVocab):
    """Strict top-K verification of one tree per request.

    Returns the new beams `[G, K, cur + d + 1]` (codes past a row's new depth are 0) and the number
    of codes each request advanced `[G]` (accepted levels + 1).
    """
    G, H, cur = beams.codes.shape
    d = tree.depth
    out = _empty_out(beams, K, d)
    running = torch.ones(G, dtype=torch.bool, device=lp_beams.device)
    where = torch.arange(H, device=lp_beams.device).expand(G, H)  # beams' indices in the parent space of level 0
    lp = lp_beams
    for i in range(d + 1):
        code_lp = masked_code_logprobs(lp, vocab, trie, beams.nodes, cur + i)  # [G, h, C]
        parent, code, score = select_top_k(beams.scores, code_lp, K)  # T_i, exactly as beam_search
        new = _gather_beams(beams, parent, code, score, trie, cur + i)
        accept = torch.zeros_like(running)
        if i < d:
            parent_node = where.gather(1, parent)  # [G, K] tree index of each T_i pair's parent
            same = ((parent_node.unsqueeze(-1) == tree.parents[:, i].unsqueeze(1))
                    & (code.unsqueeze(-1) == tree.codes[:, i].unsqueeze(1))
                    & tree.alive[:, i].unsqueeze(1))  # [G, K, N]
            found = same.any(-1) | (score == NEG_INF)  # empty beams need no node
            accept = running & found.all(-1)
            where = same.long().argmax(-1)  # [G, K] node of each accepted pair
        stop = running & ~accept
        _emit(out, stop, new, i)
        running = accept
        if not running.any():
            break
        beams, lp = new, _node_logprobs(lp_tree, i, where)
    codes, scores, nodes, advanced = out
    return Beams(codes, scores, nodes), advanced


def accept_drafts(logp: torch.Tensor, logq: torch.Tensor, generator=None) -> torch.Tensor:
    """Accept each drafted candidate independently with probability min(1, p / q)."""
    u = torch.rand(logp.shape, generator=generator, device=logp.device)
    return u < (logp - logq).clamp(max=0).exp()


def fill_beams(accepted: torch.Tensor, residual: torch.Tensor, logp: torch.Tensor, k: int, generator=None):
    """k pairs `[G, k]` over `[G, n]` candidates: the accepted ones first (in random order), then draws
    without replacement from the residual, then (where the residual runs out) from p itself.
    `valid [G, k]` is False for slots left empty (fewer than k pairs with p > 0)."""
    g = gumbel(logp.shape, generator, logp.device)
    has_res = residual > 0
    tier = torch.where(accepted, 3, torch.where(has_res, 2, torch.where(logp > NEG_INF, 1, 0)))
    key = torch.where(accepted, g, torch.where(has_res, residual.clamp(min=1e-38).log() + g, logp + g))
    order = key.argsort(dim=-1, descending=True, stable=True)  # Gumbel keys: sampling without replacement
    order = order.gather(1, tier.gather(1, order).argsort(dim=-1, descending=True, stable=True))  # then by tier
    k_eff = min(k, order.shape[1])
    flat = torch.cat([order[:, :k_eff], order.new_zeros(order.shape[0], k - k_eff)], 1)
    valid = torch.cat([tier.gather(1, order[:, :k_eff]) > 0, accepted.new_zeros(order.shape[0], k - k_eff)], 1)
    return flat, valid


def relaxed_level(logp, logq, parents, codes, alive, where, beam_alive, K: int, generator=None):
    """Relaxed verification of one tree level.

    logp: `[G, h*C]` target p_i over (current beam, code); logq: `[G, n_par, C]` the draft's q_i over
    (parent node, code); parents, codes, alive: `[G, N]` the drafted nodes; where: `[G, h]` each current
    beam's index in the parent space. Returns pairs `[G, K]` (flat beam*C + code), their validity,
    their tree node (for accepted ones) and whether each request may continue `[G]`.
    """
    G, N = codes.shape
    n_par, C = logq.shape[1:]
    h = where.shape[1]
    ar = torch.arange(max(h, N), device=codes.device)
    slot = torch.where(beam_alive, where, n_par)  # empty beams go to a spare column
    beam_of = torch.full((G, n_par + 1), -1, device=codes.device).scatter(1, slot, ar[:h].expand(G, h))
    beam = beam_of[:, :n_par].gather(1, parents)  # [G, N] current beam of each node's parent, -1 if none
    ok = alive & (beam >= 0)
    pair = beam.clamp(min=0) * C + codes  # [G, N]
    lp_y = logp.gather(1, pair).masked_fill(~ok, NEG_INF)  # log p_i(y)
    lq_y = logq.flatten(1).gather(1, parents * C + codes)  # log q_i(y)
    acc = ok & accept_drafts(lp_y, lq_y, generator)  # [G, N]
    slot = torch.where(acc, pair, h * C)
    accepted = torch.zeros(G, h * C + 1, dtype=torch.bool, device=codes.device).scatter(1, slot, True)[:, :-1]
    node_of = torch.zeros(G, h * C + 1, dtype=torch.long, device=codes.device).scatter(
        1, slot, ar[:N].expand(G, N))[:, :-1]
    k_eff = (logp > NEG_INF).sum(-1).clamp(max=K)
    go_on = acc.sum(-1) >= k_eff
    q_beams = logq.gather(1, where.unsqueeze(-1).expand(-1, -1, C)).flatten(1)  # [G, h*C] q_i on the beams' pairs
    residual = (logp.exp() - q_beams.exp()).clamp(min=0)  # r ∝ max(p - q, 0)
    flat, valid = fill_beams(accepted, residual, logp, K, generator)
    return flat, valid, node_of.gather(1, flat), go_on


def verify_relaxed(lp_beams, lp_tree, tree: DraftTree, beams: Beams, K: int, trie: CodeTrie, vocab: CodeVocab,
                   generator=None, temperature: float = 1.0):
    """Relaxed sampling verification of one tree per request; same returns as `verify_strict`
    (beams in draw order, not sorted)."""
    G, H, cur = beams.codes.shape
    C, d = vocab.codebook_size, tree.depth
    out = _empty_out(beams, K, d)
    running = torch.ones(G, dtype=torch.bool, device=lp_beams.device)
    where = torch.arange(H, device=lp_beams.device).expand(G, H)
    lp = lp_beams
    for i in range(d + 1):
        code_lp = masked_code_logprobs(lp, vocab, trie, beams.nodes, cur + i)  # [G, h, C]
        total = (beams.scores.unsqueeze(-1) + code_lp).flatten(1)  # [G, h*C] S_p(h) + log p(v | h)
        logp = torch.log_softmax(total / temperature, -1)  # p_i
        if i == d:  # bonus: sample K from p_d
            flat, valid = gumbel_top_k(logp, K, generator)
            go_on = torch.zeros_like(running)
        else:
            flat, valid, node, go_on = relaxed_level(logp, tree.logq[i], tree.parents[:, i], tree.codes[:, i],
                                                     tree.alive[:, i], where, beams.scores > NEG_INF, K, generator)
        score = total.gather(1, flat).masked_fill(~valid, NEG_INF)
        new = _gather_beams(beams, flat // C, flat % C, score, trie, cur + i)
        accept = running & go_on
        _emit(out, running & ~accept, new, i)
        running = accept
        if not running.any():
            break
        where = node.masked_fill(~valid, 0)
        beams, lp = new, _node_logprobs(lp_tree, i, where)
    codes, scores, nodes, advanced = out
    return Beams(codes, scores, nodes), advanced


# ---------------------------------------------------------------- the search


@torch.no_grad()
def speculative_beam_search(target, draft, trie: CodeTrie, vocab: CodeVocab, input_ids: torch.Tensor,
                            attention_mask: torch.Tensor, num_beams: int, draft_beams: int, gamma: int,
                            mode: str = "strict", generator=None, temperature: float = 1.0
                            ) -> tuple[BeamResult, SpecStats]:
    """Top-`num_beams` valid items per left-padded prompt `input_ids [B, P]`, by speculative beam search.

    strict: the same items, order and scores (up to float noise) as `beam_search(target, ...)`.
    relaxed: an approximation of `beam_sample(target, ..., temperature)`, sorted by target score.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if draft_beams < num_beams or gamma < 1:
        raise ValueError(f"need draft_beams >= num_beams and gamma >= 1, got {draft_beams}, {num_beams}, {gamma}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    B, K, N, L = input_ids.shape[0], num_beams, draft_beams, vocab.levels
    dev = input_ids.device
    codes = input_ids.new_zeros(B, K, L)
    scores = torch.full((B, K), NEG_INF, device=dev)
    nodes = input_ids.new_zeros(B, K)
    depth = input_ids.new_zeros(B)
    stats = SpecStats(target_calls=input_ids.new_zeros(B), draft_calls=0, accepted_steps=input_ids.new_zeros(B),
                      drafted_levels=input_ids.new_zeros(B), rounds=input_ids.new_zeros(B))
    target_kv = draft_kv = None
    calls = 0
    while (depth < L).any():
        cur = int(depth[depth < L].min())
        rows = (depth == cur).nonzero().flatten()  # this round's requests
        G, mask = rows.numel(), attention_mask[rows]
        if cur == 0:  # first round: the empty beam (all requests start here together)
            beams = Beams(codes[rows, :1, :0], scores.new_zeros(G, 1), trie.root_nodes(G, 1))
        else:
            beams = Beams(codes[rows, :, :cur], scores[rows], nodes[rows])
        d = min(gamma, L - cur - 1)
        if d == 0:
            tree = DraftTree.empty(G, N, dev)
        else:
            with record_function(STAGES["draft"]):
                if cur == 0:
                    logprobs, draft_kv = prefill(draft, vocab, input_ids[rows], mask)
                    cache = draft_kv
                    logprobs = logprobs.unsqueeze(1)  # [G, 1, V]
                else:
                    logprobs, cache = draft_paths(draft, draft_kv, rows, mask, beams, vocab)
                tree, n = draft_tree(draft, cache, logprobs, beams, trie, vocab, mask, d, N, mode, generator,
                                     temperature)
            stats.draft_calls += 1 + n
        with record_function(STAGES["target"]):
            if cur == 0:
                lp_beams, lp_tree, target_kv = tree_forward(target, vocab, mask, beams.codes, tree,
                                                            prompt_ids=input_ids[rows])  # prefill + tree
            else:
                lp_beams, lp_tree, _ = tree_forward(target, vocab, mask, beams.codes, tree,
                                                    cache_rows(target_kv, rows))
        calls += 1
        with record_function(STAGES["verify"]):
            if mode == "strict":
                new, advanced = verify_strict(lp_beams, lp_tree, tree, beams, K, trie, vocab)
            else:
                new, advanced = verify_relaxed(lp_beams, lp_tree, tree, beams, K, trie, vocab, generator,
                                               temperature)
        width = new.codes.shape[-1]
        codes[rows, :, :width] = new.codes
        scores[rows], nodes[rows] = new.scores, new.nodes
        depth[rows] += advanced
        stats.target_calls[rows] += 1
        stats.rounds[rows] += 1
        stats.accepted_steps[rows] += advanced - 1
        stats.drafted_levels[rows] += d
    items = torch.where(scores > NEG_INF, nodes, -1)  # the last trie step yields item ids
    if mode == "relaxed":
        codes, scores, items = sort_beams(codes, scores, items)
    return BeamResult(items=items, codes=codes, scores=scores, forward_calls=calls), stats
