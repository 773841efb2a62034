"""Speculative beam search (AtSpeed): a small draft proposes a tree of beams, the target verifies it in one pass.

One round, for the requests at depth `cur` with H current beams (codes and TARGET scores):
1. Draft: d = min(gamma, L - cur - 1) steps of width-N beam search from the current beams (d = 0 while
   cur < `draft_start`: the round is then a plain target beam-search step), starting from their target
   scores (strict: top-N of S + log q; relaxed: N sampled without replacement from softmax(S + log q),
   keeping that distribution q_j and the Gumbel noise of the draw). A tree of d levels x N nodes, less the
   dead ones (fewer than N valid pairs). If the tree's last level's valid (parent, code) pairs all fit in
   N, it is filled from the trie instead, with no draft pass (`trie_fill`; strict and the coupled rule):
   every pair is a node, so the level always passes (amazon-beauty: 10% of K = 1 requests at N 2; at K >= 10
   the target's beams sit in dense clusters, whose valid 3rd codes rarely fit in the tree). With a `budget` B,
   only the tree's B best nodes by cumulative draft score stay (EAGLE-2's choice; a node never outscores its
   parent, so they form a tree), and the target is fed only those.
2. Target: ONE forward over the H beams' newest codes + the N*d tree tokens (first round: the prompt
   and the tree) with a tree attention mask (`tree.py`): its log-probs after every beam and tree node.
   Nodes (or, at the last code, beams) whose next code is the ID's last and the only one the trie allows
   are not fed: that code's log-prob is 0 whatever the target says (amazon-beauty: 64% of 2-code prefixes).
3. Verify level i = 0..d. Strict: T_i = the top K of S_p(h) + log p(v | h), exactly what
   `beam_search` keeps; the level is accepted if every live pair of T_i is a drafted node, or if the
   pairs that are not cannot reach T_{i+1} (each child scores <= its parent's S, as log p <= 0: when
   the K-th best child of the drafted pairs scores above every undrafted pair, none of their children
   is in T_{i+1}, so they are dropped), else (or at i == d, the bonus step) T_i is emitted and the
   round stops: lossless. Relaxed, `relaxed_rule` "coupled" (the default): the draft drew its N
   nodes as the top N of (S + log q) / T + g for Gumbel noise g on each (parent, code); the target
   draws its K as the top K of (S_p + log p) / T + g with the SAME g, which is exactly beam sampling
   (the noise on the pairs it sees is i.i.d. whatever the draft did), and the level is accepted iff
   every pair drawn is a drafted node (strict's test on a sample): lossless with respect to
   `beam_sample`, and a draft close to the target draws nearly the same pairs. "ratio" (the paper's):
   each drafted node is accepted with prob min(1, p/q); with >= K accepted keep K of them, drawn
   without replacement from p, and go on, else keep them, fill up from the residual max(p - q, 0) and
   stop. It compares single-draw probabilities while both sides draw several without replacement, so
   it keeps likely codes too rarely. p and q are the softmax of cumulative scores divided by a
   temperature T (`beam_sample`'s), 1 by default. The last code is never drafted; relaxed mode keeps
   the target's top K there (`last_level` "top_k", the default) or samples K as the paper does ("sample").
A round advances (accepted levels + 1) codes. Requests at the same depth share the round's calls;
deeper ones wait (the shallowest depth goes first), finished ones leave the batch, and so does a
request whose remaining codes the trie decides for every live beam (one valid code each: log-prob 0,
no model needed; `beam_search` skips such steps too). The target's cache keeps every token it was
fed (the tree included; rows of other rounds get padding): a new beam's codes are the root beam's,
the accepted nodes' and the new one, so only the newest is fed, the others are found by cache index.
The draft keeps only its prompt KV (encoded by its first pass, in the first round it drafts) and
re-feeds the beam paths and the tree grown so far at each level: it is tiny, its cost is per call, and
a few dozen re-fed tokens cost it less than the bookkeeping.

`draft_start` skips the draft where it is weakest: a draft level pays only when it is accepted often
enough to save a target call (on 2 CPU cores a tree token costs ~1 ms of target time, a call ~40 ms),
and the draft is accepted least at the ID's first codes (they are the user's taste; the later ones
mostly narrow an item down). With draft_start = s the target decodes codes 0..s-1 by its own
beam-search steps, and the draft proposes from code s on.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from atspeed_rec.decoding.beam_search import (NEG_INF, STAGES, BeamResult, Beams, extend_beams, forced_completion,
                                              gathered, last_code_beams, masked_code_logprobs, padded_topk,
                                              select_top_k, spread)
from atspeed_rec.decoding.sampling import check_last_level, gumbel, gumbel_top_k, sample_top_k, sort_beams
from atspeed_rec.decoding.tree import DraftTree, cache_rows, tree_forward
from atspeed_rec.models.prefix_cache import split_prefix
from atspeed_rec.models.vocab import CodeVocab
from atspeed_rec.semantic_ids.trie import CodeTrie

MODES = ("strict", "relaxed")


class Tree(NamedTuple):
    """A serving tree: N draft beams a level, gamma levels a round, drafted from code `start` on."""
    n: int
    gamma: int
    start: int = 0
    budget: int = 0  # > 0: only the tree's `budget` best nodes by cumulative draft score are verified

    @property
    def name(self) -> str:
        return (f"N {self.n} gamma {self.gamma}" + (f" from code {self.start}" if self.start else "")
                + (f", best {self.budget} nodes" if self.budget else ""))

    def serves(self, k: int) -> bool:
        """Whether a K = `k` search can run on this tree: N >= K drafted beams, and a budget of every node or >= K."""
        return self.n >= k and (self.budget == 0 or self.budget >= k)

    @property
    def written(self) -> tuple:
        """(N, gamma, start), and the budget when there is one: the tree as `tree_candidates` writes it."""
        return tuple(self) if self.budget else tuple(self)[:3]


@dataclass
class SpecStats:  # totals for the batch; per-request tensors where noted
    target_calls: torch.Tensor  # [B] target forward passes each request took part in
    draft_calls: int  # draft forward passes (batched calls) for the whole batch
    accepted_steps: torch.Tensor  # [B] drafted levels accepted (sum over rounds)
    drafted_levels: torch.Tensor  # [B] drafted levels offered for verification
    rounds: torch.Tensor  # [B]
    forced_steps: torch.Tensor  # [B] codes the trie decided alone (no round): accepted + rounds + forced = L
    filled_levels: torch.Tensor  # [B] drafted levels filled from the trie (every valid pair a node, no draft pass)
    accepted_at: torch.Tensor  # [B, L] drafted levels accepted, by the code position they drafted
    verified_at: torch.Tensor  # [B, L] drafted levels verified (accepted, or the one rejected), by code position
    bounded_steps: torch.Tensor  # [B] of the accepted levels, those accepted by dropping undrafted pairs (strict)


# ---------------------------------------------------------------- draft


def draft_tree(draft, kv, prompt_mask, beams: Beams, trie: CodeTrie, vocab: CodeVocab, depth: int, width: int,
               mode: str, generator=None, temperature: float = 1.0, prompt_ids=None, trie_fill: bool = False,
               budget: int = 0, skip_decided: bool = False):
    """`depth` levels of width-`width` beam search from the current beams, starting from their TARGET scores.

    Level j is one draft pass (`tree_forward`) over the beam paths + the j levels grown so far after the
    cached prompt `kv` (or, given `prompt_ids`, the first pass encodes them too, after `kv`: None or the
    prompts' shared prefix). With `trie_fill`, the last level, if its valid (parent, code) pairs all fit in
    `width` (in every request), needs no pass: its nodes are all those pairs, so the target's choice is always
    drafted. (Only the last: a level after a filled one would rank its nodes by draft scores it lacks.)
    With `skip_decided`, where the last level holds each ID's 2nd-to-last code, its nodes with one valid last
    code are `unfed` (the target's pass need not feed them).
    Returns the tree without its dead tail (`DraftTree.trimmed`), the prompt's KV (`kv` itself while no pass
    encoded it), the draft passes made and the levels filled from the trie.
    """
    G, _, cur = beams.codes.shape
    tree = DraftTree.empty(G, width, beams.codes.device)
    scores, nodes = beams.scores, beams.nodes  # [G, h]
    calls = filled = 0
    level_scores = []  # [G, N] per level: each node's cumulative draft score
    for j in range(depth):
        valid = None
        if trie_fill and j == depth - 1:  # [G, h, C] the last level's (live parent, code) pairs the trie allows
            valid = trie.allowed(nodes, cur + j) & (scores > NEG_INF).unsqueeze(-1)
        if valid is not None and int(valid.sum((1, 2)).max()) <= width:  # all fit: no draft pass
            code_lp = torch.zeros(valid.shape, device=valid.device).masked_fill(~valid, NEG_INF)  # [G, h, C]
            filled += 1
        else:
            first = calls == 0
            lp_beams, lp_tree, kv = tree_forward(draft, vocab, prompt_mask, beams.codes, tree, kv,
                                                 prompt_ids if first else None)
            calls += 1
            logprobs = lp_tree[:, -1] if j else lp_beams  # [G, h, L * C] after the newest level's nodes
            code_lp = masked_code_logprobs(logprobs, vocab, trie, nodes, cur + j)  # [G, h, C]
        logq = noise = None
        if mode == "strict":
            parent, code, scores = select_top_k(scores, code_lp, width)  # top-N of S + log q
        else:
            logq = torch.log_softmax((scores.unsqueeze(-1) + code_lp).flatten(1) / temperature, -1)
            logq = logq.view_as(code_lp)  # [G, h, C] q_j over (parent, code)
            noise = gumbel(code_lp.shape, generator, code_lp.device)  # [G, h, C] kept: the target may share it
            parent, code, scores = sample_top_k(scores, code_lp, width, generator, temperature, noise.flatten(1))
        live = scores > NEG_INF
        nodes = torch.where(live, trie.step(nodes.gather(1, parent), code, cur + j), 0)  # [G, N]
        tree = tree.grow(parent, code, live, logq, noise)
        level_scores.append(scores)
    if skip_decided and tree.depth and cur + depth == vocab.levels - 1:  # each ID's 2nd-to-last code: where
        forced_next = trie.only_code(nodes, vocab.levels - 1) >= 0  # the trie allows one last code, the target's
        tree.unfed = F.pad((live & forced_next).unsqueeze(1), (0, 0, depth - 1, 0))  # log-prob is 0: feed none
    if budget and tree.depth:
        tree = tree.pruned(torch.stack(level_scores, 1), budget)
    return tree.trimmed(), kv, calls, filled


# ---------------------------------------------------------------- verification


def _emit(out, rows, beams: Beams, fed, level: int):
    """Write the beams of the `rows` that stop at verification `level` into `out`, with the cache
    indices `fed` of their codes but the newest (which no pass has fed yet)."""
    out_codes, out_scores, out_nodes, out_adv, out_fed = out
    out_codes[rows, :, :beams.codes.shape[-1]] = beams.codes[rows]
    out_fed[rows, :, :fed.shape[-1]] = fed[rows]
    out_scores[rows], out_nodes[rows], out_adv[rows] = beams.scores[rows], beams.nodes[rows], level + 1


def _empty_out(beams: Beams, K: int, d: int):
    G, _, cur = beams.codes.shape
    codes = beams.codes.new_zeros(G, K, cur + d + 1)
    return (codes, beams.scores.new_full((G, K), NEG_INF), beams.nodes.new_zeros(G, K), beams.nodes.new_zeros(G),
            codes.new_zeros(G, K, cur + d))


def _node_logprobs(lp_tree, level: int, node):
    """Target log-probs `[G, K, L * C]` after the tree nodes `node [G, K]` of `level`."""
    lp = lp_tree[:, level]  # [G, N, L * C]
    return lp.gather(1, node.unsqueeze(-1).expand(-1, -1, lp.shape[-1]))


def strict_level(code_lp, scores, where, drafted, K: int):
    """Strict rule of one level: T_i = the top K of S_p(h) + log p(v | h), exactly what `beam_search` keeps;
    a pair can go on iff it is a drafted node (never at the bonus level, `drafted` None).

    code_lp: `[G, h, C]`; scores, where: `[G, h]` (each current beam's index among the drafted nodes'
    parents); drafted: `DraftTree.level(i)`. Returns parent, code, score, node `[G, K]` and held `[G, K]`
    (a drafted node, or an empty pair, which needs none).
    """
    parent, code, score = select_top_k(scores, code_lp, K)  # T_i [G, K]
    return (parent, code, score) + drafted_nodes(parent, code, score, where, drafted)


def drafted_nodes(parent, code, score, where, drafted):
    """The tree node `[G, K]` of each chosen pair (parent, code, score `[G, K]`) and whether it has one
    (or is an empty pair, which needs none); no pair has one at the bonus level (`drafted` None)."""
    if drafted is None:
        return torch.zeros_like(parent), torch.zeros_like(parent, dtype=torch.bool)
    same = ((where.gather(1, parent).unsqueeze(-1) == drafted.parents.unsqueeze(1))
            & (code.unsqueeze(-1) == drafted.codes.unsqueeze(1)) & drafted.alive.unsqueeze(1))  # [G, K, N]
    held = same.any(-1) | (score == NEG_INF)  # empty beams need no node
    return same.long().argmax(-1), held


def drop_unreachable(scores, held, code_lp_next, K: int):
    """Strict: the pairs of T_i that are no drafted node (not `held`) have no target log-probs after them, but
    each of their children scores at most their own S (log p <= 0). Where the K-th best child of the held
    pairs scores above every unheld pair, no child of theirs is in T_{i+1}, the top K that `beam_search`
    keeps: drop them (score -inf) and go on. scores, held `[G, K]`; code_lp_next `[G, K, C]` the target's
    log-probs after the held pairs (anything after the others). Returns scores, held and dropped `[G]`.
    """
    unheld = ~held
    children = (scores.masked_fill(unheld, NEG_INF).unsqueeze(-1) + code_lp_next).flatten(1)  # [G, K * C]
    kth = padded_topk(children, K)[0][:, -1]  # [G] the K-th best child of the held pairs
    dropped = unheld.any(-1) & (kth > scores.masked_fill(held, NEG_INF).amax(-1))  # [G]
    drop = unheld & dropped.unsqueeze(-1)
    return scores.masked_fill(drop, NEG_INF), held | dropped.unsqueeze(-1), dropped


def accept_drafts(logp: torch.Tensor, logq: torch.Tensor, generator=None) -> torch.Tensor:
    """Accept each drafted candidate independently with probability min(1, p / q)."""
    u = torch.rand(logp.shape, generator=generator, device=logp.device)
    return u < (logp - logq).clamp(max=0).exp()


def fill_beams(accepted: torch.Tensor, residual: torch.Tensor, logp: torch.Tensor, k: int, generator=None):
    """k pairs `[G, k]` over `[G, n]` candidates: the accepted ones first (in an order drawn without
    replacement from p, so that with more than k accepted the kept ones are a p-draw among them), then
    draws without replacement from the residual, then (where the residual runs out) from p itself.
    `valid [G, k]` is False for slots left empty (fewer than k pairs with p > 0)."""
    g = gumbel(logp.shape, generator, logp.device)
    has_res = residual > 0
    tier = torch.where(accepted, 3, torch.where(has_res, 2, torch.where(logp > NEG_INF, 1, 0)))
    key = torch.where(has_res & ~accepted, residual.clamp(min=1e-38).log() + g, logp + g)
    order = key.argsort(dim=-1, descending=True, stable=True)  # Gumbel keys: sampling without replacement
    order = order.gather(1, tier.gather(1, order).argsort(dim=-1, descending=True, stable=True))  # then by tier
    k_eff = min(k, order.shape[1])
    flat = torch.cat([order[:, :k_eff], order.new_zeros(order.shape[0], k - k_eff)], 1)
    valid = torch.cat([tier.gather(1, order[:, :k_eff]) > 0, accepted.new_zeros(order.shape[0], k - k_eff)], 1)
    return flat, valid


def relaxed_draw(logp, drafted, where, beam_alive, K: int, generator=None):
    """K pairs of one drafted level: each drafted node y is accepted with prob min(1, p_i(y) / q_i(y)); with
    >= K accepted (or all of p_i's support) keep K of them (drawn without replacement from p_i) and go on,
    else keep them, fill up from the residual max(p_i - q_i, 0) and stop.

    logp: `[G, h*C]` target p_i over (current beam, code); drafted: `DraftTree.level(i)`, nodes `[G, N]`
    and q_i `[G, n_par, C]` over (parent node, code); where: `[G, h]` each current beam's index in the
    parent space; beam_alive: `[G, h]`. Returns pairs `[G, K]` (flat beam*C + code), their validity,
    their tree node (for accepted ones) and whether each request may continue `[G]`.
    """
    parents, codes, alive, logq, _ = drafted
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


def coupled_level(code_lp, scores, where, drafted, K: int, generator=None, temperature: float = 1.0):
    """Coupled relaxed rule of one level: K pairs sampled without replacement from p_i = softmax((S_p(h) +
    log p(v | h)) / T) with the Gumbel noise the draft drew its nodes with (fresh noise at the bonus level);
    the request goes on iff every pair is a drafted node. The pairs are exactly `beam_sample`'s draw (the
    noise of the pairs the target sees is i.i.d. Gumbel whatever the draft did), and a draft close to the
    target drew nearly the same pairs from nearly the same keys. Same arguments and returns as `strict_level`."""
    C = code_lp.shape[-1]
    noise = None if drafted is None else drafted.noise.gather(1, where.unsqueeze(-1).expand(-1, -1, C))  # [G, h, C]
    parent, code, score = sample_top_k(scores, code_lp, K, generator, temperature,
                                       None if noise is None else noise.flatten(1))
    return (parent, code, score) + drafted_nodes(parent, code, score, where, drafted)


def ratio_level(code_lp, scores, where, drafted, K: int, generator=None, temperature: float = 1.0):
    """The paper's relaxed rule of one level over p_i = softmax((S_p(h) + log p(v | h)) / T) on (current beam,
    code): the K pairs of `relaxed_draw`, or K sampled from p_i at the bonus level (`drafted` None), with their
    untempered scores, in draw order. Same arguments and returns as `strict_level` (held: the request goes on)."""
    C = code_lp.shape[-1]
    total = (scores.unsqueeze(-1) + code_lp).flatten(1)  # [G, h*C] S_p(h) + log p(v | h)
    logp = torch.log_softmax(total / temperature, -1)  # p_i
    if drafted is None:
        flat, valid = gumbel_top_k(logp, K, generator)  # [G, K]
        node, go_on = torch.zeros_like(flat), torch.zeros_like(valid[:, 0])
    else:
        flat, valid, node, go_on = relaxed_draw(logp, drafted, where, scores > NEG_INF, K, generator)
    score = total.gather(1, flat).masked_fill(~valid, NEG_INF)
    return flat // C, flat % C, score, node.masked_fill(~valid, 0), go_on.unsqueeze(-1).expand_as(flat)


RELAXED_RULES = {"coupled": coupled_level, "ratio": ratio_level}  # relaxed verification of one level


def verify(lp_beams, lp_tree, tree: DraftTree, beams: Beams, fed, tree_start: int, K: int, trie: CodeTrie,
           vocab: CodeVocab, mode: str = "strict", generator=None, temperature: float = 1.0,
           last_level: str = "top_k", bound: bool = True, relaxed_rule: str = "coupled"):
    """Verification of one tree per request: at level i = 0..d the mode's rule (`strict_level`, or
    `RELAXED_RULES[relaxed_rule]`) picks K pairs; the rows that stop emit them, the others go on from their tree nodes.
    Strict with `bound`: a level whose undrafted pairs cannot reach the next top K goes on without them
    (`drop_unreachable`). At the ID's last code (always the bonus level: it is never drafted) relaxed
    mode keeps the top K when `last_level` is "top_k".

    lp_beams `[G, H, L * C]`, lp_tree `[G, d, N, L * C]`: target log-probs after the beams and the nodes;
    fed `[G, H, cur]`: the cache indices of the current beams' codes; tree node (j, n) is at cache index
    tree_start + j*N + n. Returns the new beams `[G, K, cur + d + 1]` (codes past a row's new depth are 0;
    relaxed: in draw order), the number of codes each request advanced `[G]` (accepted levels + 1), the
    cache indices of the new beams' codes but the newest `[G, K, cur + d]` and the levels accepted by
    dropping undrafted pairs `[G]`.
    """
    strict = mode == "strict"
    rule = strict_level if strict else partial(RELAXED_RULES[relaxed_rule], generator=generator,
                                               temperature=temperature)
    last_rule = strict_level if last_level == "top_k" else rule  # the last code: top K (strict's bonus step)
    G, H, cur = beams.codes.shape
    out = _empty_out(beams, K, tree.depth)
    running = torch.ones(G, dtype=torch.bool, device=lp_beams.device)
    bounded = torch.zeros(G, dtype=torch.long, device=lp_beams.device)
    where = torch.arange(H, device=lp_beams.device).expand(G, H)  # [G, h] beams' indices in level 0's parent space
    slots = tree.fed_slots()  # the nodes' places among the fed tree tokens (None: node j*N + n at j*N + n)
    code_lp = masked_code_logprobs(lp_beams, vocab, trie, beams.nodes, cur)  # [G, h, C]
    for i in range(tree.depth + 1):
        drafted = tree.level(i) if i < tree.depth else None  # i == d: the bonus level
        level_rule = last_rule if cur + i == vocab.levels - 1 else rule
        parent, code, score, where, held = level_rule(code_lp, beams.scores, where, drafted, K)  # [G, K]
        beams = extend_beams(beams, parent, code, score, trie, cur + i)
        next_lp = None  # the target's log-probs after this level's nodes: the next level's, when it is verified
        if strict and bound and i < tree.depth:
            next_lp = masked_code_logprobs(_node_logprobs(lp_tree, i, where), vocab, trie, beams.nodes, cur + i + 1)
            scores, held, dropped = drop_unreachable(beams.scores, held, next_lp, K)
            beams = Beams(beams.codes, scores, beams.nodes)
            bounded += (dropped & running).long()
        go_on = held.all(-1)
        fed = fed.gather(1, parent.unsqueeze(-1).expand(-1, -1, fed.shape[-1]))  # [G, K, cur + i]
        _emit(out, running & ~go_on, beams, fed, i)
        running = running & go_on
        if not running.any():
            break
        index = i * tree.codes.shape[-1] + where  # [G, K] the accepted nodes (j, n) as j*N + n
        fed = torch.cat([fed, (tree_start + (index if slots is None else slots[index])).unsqueeze(-1)], -1)
        code_lp = next_lp if next_lp is not None else masked_code_logprobs(
            _node_logprobs(lp_tree, i, where), vocab, trie, beams.nodes, cur + i + 1)
    codes, scores, nodes, advanced, fed = out
    return Beams(codes, scores, nodes), advanced, fed, bounded


# ---------------------------------------------------------------- the search


def grow_rows(kv, grown, rows):
    """The whole batch's cache `kv` `[B, ..., T, hd]` after a pass of `rows` only grew theirs to
    `grown` `[G, ..., T + q, hd]`: the other rows get q padding entries, which nothing ever sees."""
    out = []
    for (k, v), (gk, gv) in zip(kv, grown):
        pad = (0, 0, 0, gk.shape[2] - k.shape[2])
        out.append((F.pad(k, pad).index_copy_(0, rows, gk), F.pad(v, pad).index_copy_(0, rows, gv)))
    return out


def scatter_rows(kv, rows, B: int):
    """A cache of `B` rows holding `kv` (of `rows`) at those rows; the other rows are zeros nothing reads."""
    def spread(t):
        return t.new_zeros(B, *t.shape[1:]).index_copy_(0, rows, t)
    return [(spread(k), spread(v)) for k, v in kv]


@torch.no_grad()
def speculative_beam_search(target, draft, trie: CodeTrie, vocab: CodeVocab, input_ids: torch.Tensor,
                            attention_mask: torch.Tensor, num_beams: int, draft_beams: int, gamma: int,
                            mode: str = "strict", generator=None, temperature: float = 1.0,
                            last_level: str = "top_k", bound: bool = True,
                            relaxed_rule: str = "coupled", draft_start: int = 0,
                            trie_fill: bool = True, budget: int = 0,
                            skip_decided: bool = True) -> tuple[BeamResult, SpecStats]:
    """Top-`num_beams` valid items per left-padded prompt `input_ids [B, P]`, by speculative beam search.

    strict: the same items, order and scores (up to float noise) as `beam_search(target, ...)`; with `bound`
    (the default) a level also passes when its undrafted pairs provably cannot reach the next top K
    (`drop_unreachable`); False keeps the plain rule, for comparison.
    relaxed: `beam_sample(target, ..., temperature, last_level)`'s distribution ("coupled" rule), or the
    paper's approximation of it ("ratio"), sorted by target score.
    draft_start: the first code position the draft proposes; the codes before it are plain target steps.
    trie_fill (strict and the coupled relaxed rule, where a level holding every valid pair always passes): a
    tree's last level whose valid pairs all fit in N is filled from the trie, with no draft pass (`draft_tree`).
    skip_decided (lossless): the target is not fed the nodes, or at the last code the beams, whose next code is the
    ID's last and the only one the trie allows (`last_code_beams`); False feeds them, for comparison.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if draft_beams < num_beams or gamma < 1 or draft_start < 0:
        raise ValueError(f"need draft_beams >= num_beams, gamma >= 1 and draft_start >= 0, got {draft_beams}, "
                         f"{num_beams}, {gamma}, {draft_start}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    check_last_level(last_level)
    if relaxed_rule not in RELAXED_RULES:
        raise ValueError(f"relaxed_rule must be one of {tuple(RELAXED_RULES)}, got {relaxed_rule!r}")
    B, K, N, L = input_ids.shape[0], num_beams, draft_beams, vocab.levels
    fill = trie_fill and (mode == "strict" or relaxed_rule == "coupled")
    dev = input_ids.device
    input_ids, attention_mask, prefix = split_prefix([target, draft], vocab, input_ids, attention_mask)
    codes = input_ids.new_zeros(B, K, L)
    scores = torch.full((B, K), NEG_INF, device=dev)
    nodes = input_ids.new_zeros(B, K)
    depth = input_ids.new_zeros(B)
    fed = input_ids.new_zeros(B, K, L)  # target cache index of each beam's codes (but the newest)
    stats = SpecStats(target_calls=input_ids.new_zeros(B), draft_calls=0, accepted_steps=input_ids.new_zeros(B),
                      drafted_levels=input_ids.new_zeros(B), rounds=input_ids.new_zeros(B),
                      forced_steps=input_ids.new_zeros(B), filled_levels=input_ids.new_zeros(B),
                      accepted_at=input_ids.new_zeros(B, L), verified_at=input_ids.new_zeros(B, L),
                      bounded_steps=input_ids.new_zeros(B))
    position = torch.arange(L, device=dev)  # code positions
    target_kv = draft_kv = None  # the target's: every token fed (other rounds' rows get padding); the draft's: prompts
    calls = 0
    while (depth < L).any():
        cur = int(depth[depth < L].min())
        rows = (depth == cur).nonzero().flatten()  # this round's requests
        G, mask = rows.numel(), attention_mask[rows]
        first = cur == 0  # first round, every request: the empty beam, and its first passes encode the prompts
        if first:
            beams = Beams(codes[rows, :1, :0], scores.new_zeros(G, 1), trie.root_nodes(G, 1))
        else:
            beams = Beams(codes[rows, :, :cur], scores[rows], nodes[rows])
            done, path, last = forced_completion(trie, beams, cur)  # the trie decides the rest: no round
            if done.any():
                codes[rows[done], :, cur:], nodes[rows[done]], depth[rows[done]] = path[done], last[done], L
                stats.forced_steps[rows[done]] = L - cur
                rows = rows[~done]
                if not len(rows):
                    continue
                G, mask = rows.numel(), attention_mask[rows]
                beams = Beams(codes[rows, :, :cur], scores[rows], nodes[rows])
        H, T = beams.codes.shape[1], attention_mask.shape[1] if first else target_kv[0][0].shape[2]
        ids = input_ids[rows] if first else None
        d = min(gamma, L - cur - 1) if cur >= draft_start else 0
        encode = draft_kv is None and d > 0  # the draft's first pass encodes the prompts too (after their prefix)
        if encode:
            kv = None if prefix is None else cache_rows(prefix[1], rows)
        else:
            kv = None if draft_kv is None else cache_rows(draft_kv, rows)
        with record_function(STAGES["draft"]):
            tree, kv, draft_calls, filled = draft_tree(draft, kv, mask, beams, trie, vocab, d, N, mode, generator,
                                                       temperature, input_ids[rows] if encode else None, fill, budget,
                                                       skip_decided)
        if encode and draft_calls:  # every request still decoding is in this round (each round before it
            draft_kv = kv if G == B else scatter_rows(kv, rows, B)  # advanced all its rows alike: by 1, or by 2)
        stats.draft_calls += draft_calls
        stats.filled_levels[rows] += filled
        with record_function(STAGES["target"]):  # the beams' newest codes (their earlier ones are cached) + the tree
            if first:  # nothing cached yet but the shared prefix, if any
                target_kv = None if prefix is None else prefix[0]
            last = skip_decided and 0 < cur == L - 1
            sub = last_code_beams(trie, beams, cur) if last else None  # at the last code (no tree): only
            paths, beams_at = gathered(sub, beams.codes, fed[rows, :H, :max(cur - 1, 0)])  # beams with a choice
            lp_beams, lp_tree, kv_t = tree_forward(target, vocab, mask, paths, tree,
                                                   None if target_kv is None else cache_rows(target_kv, rows), ids,
                                                   beams_at)  # [G, H or m, cur - 1] their codes' cache indices
            lp_beams = spread(sub, lp_beams, H)  # [G, H, L * C]; the cache grew by the m fed, and no pass follows
            target_kv = kv_t if G == B else grow_rows(target_kv, kv_t, rows)
        calls += 1
        with record_function(STAGES["verify"]):
            if first:  # the prompt took cache indices 0..T-1, the tree follows
                beams_fed, tree_start = fed[rows, :1, :0], T
            else:  # beam h's newest code went in at T + h, the tree after them
                newest = T + torch.arange(H, device=dev)
                beams_fed = torch.cat([fed[rows, :, :cur - 1], newest.view(1, H, 1).expand(G, H, 1)], -1)
                tree_start = T + H
            new, advanced, new_fed, bounded = verify(lp_beams, lp_tree, tree, beams, beams_fed, tree_start, K, trie,
                                                     vocab, mode, generator, temperature, last_level, bound,
                                                     relaxed_rule)
        width = new.codes.shape[-1]
        codes[rows, :, :width] = new.codes
        fed[rows, :, :width - 1] = new_fed
        scores[rows], nodes[rows] = new.scores, new.nodes
        depth[rows] += advanced
        stats.target_calls[rows] += 1
        stats.rounds[rows] += 1
        stats.accepted_steps[rows] += advanced - 1
        stats.bounded_steps[rows] += bounded
        stats.drafted_levels[rows] += d
        offset = (position - cur).unsqueeze(0)  # [1, L] level index inside this round's tree
        stats.accepted_at[rows] += ((offset >= 0) & (offset < (advanced - 1).unsqueeze(1))).long()
        stats.verified_at[rows] += ((offset >= 0) & (offset < advanced.clamp(max=d).unsqueeze(1))).long()
    items = torch.where(scores > NEG_INF, nodes, -1)  # the last trie step yields item ids
    if mode == "relaxed":
        codes, scores, items = sort_beams(codes, scores, items)
    return BeamResult(items=items, codes=codes, scores=scores, forward_calls=calls), stats
