"""Code tokens after a prompt in ONE forward pass (`tree_forward`): the only way decoding feeds them.

The input (per request) is [the prompt, unless it is cached] + the H current beams' code paths
(H chains of `cur` tokens, or only each beam's newest code when the cache keeps the earlier ones)
+ the N*d tree tokens (level j, node n at index j*N + n; a node dead, or `unfed`, in every request is not fed).
Every token sees the request's non-pad prompt, its own ancestors (fed now or found in the cache by
index) and itself; its position id is the prompt's last position + 1 + its depth. Beam search feeds its
beams' newest codes with an empty tree; the draft re-feeds the beams + the levels it has grown so far
after its prompt cache; the target verifies the beams' newest codes + the whole draft tree. The cache is never copied or
reordered per beam: every token fed stays in it, and masks pick each token's ancestors. The mask is
built in full for the lean forward (`models/fast_forward.py`): additive float, shape
[G, 1, q, cache + q], 0 where visible and dtype-min elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from atspeed_rec.models.fast_forward import KV, additive_mask, lm_dtype, lm_forward
from atspeed_rec.models.vocab import CodeVocab


@dataclass
class DraftTree:
    parents: torch.Tensor  # [G, d, N] level 0: index of a current beam; level j > 0: a node of level j-1
    codes: torch.Tensor  # [G, d, N] code of each node (level j is depth cur + j)
    alive: torch.Tensor  # [G, d, N] False for padding nodes (fewer than N valid pairs)
    logq: list[torch.Tensor]  # relaxed only: level j's draft distribution over (parent, code), [G, n_parents, C]
    noise: list[torch.Tensor] = field(default_factory=list)  # relaxed only: the Gumbel noise q_j was drawn with
    unfed: torch.Tensor | None = None  # [G, d, N] live nodes a pass need not feed: leaves whose next code, the ID's
    # last, the trie decides (one valid code: log-prob 0 whatever the model says; `draft_tree` marks them)

    @staticmethod
    def empty(groups: int, width: int = 0, device=None) -> "DraftTree":
        z = torch.zeros(groups, 0, width, dtype=torch.long, device=device)
        return DraftTree(z, z.clone(), z.bool(), [])

    @property
    def depth(self) -> int:
        return self.codes.shape[1]

    def grow(self, parents: torch.Tensor, codes: torch.Tensor, alive: torch.Tensor, logq=None,
             noise=None) -> "DraftTree":
        """The tree with one more level of nodes `[G, N]` (and its q and noise `[G, n_parents, C]` in relaxed mode)."""
        def cat(old, new):
            return torch.cat([old, new.unsqueeze(1)], 1)  # [G, d + 1, N]
        return DraftTree(cat(self.parents, parents), cat(self.codes, codes), cat(self.alive, alive),
                         self.logq + ([] if logq is None else [logq]), self.noise + ([] if noise is None else [noise]))

    def trimmed(self) -> "DraftTree":
        """The tree without the dead tail no level needs: the columns after the last live node of any level
        (and request); a level's nodes are drawn best first and dead ones score -inf, so they come last. Parents'
        indices stay valid. (`tree_inputs` also skips dead columns before the tail: `fed_slots`.)"""
        if self.depth == 0:
            return self
        live = self.alive.flatten(0, 1).any(0)  # [N]
        n = int(live.nonzero().max()) + 1 if live.any() else 0
        if n == self.codes.shape[-1]:
            return self
        return DraftTree(self.parents[..., :n], self.codes[..., :n], self.alive[..., :n], self.logq, self.noise,
                         None if self.unfed is None else self.unfed[..., :n])

    def fed_slots(self) -> torch.Tensor | None:
        """`[dN]` each node's index among the tree tokens a pass feeds, -1 for those it does not (`tree_inputs`
        feeds a node only if it is live and not `unfed` in some request): dead columns go unfed, so a tree pruned by
        `pruned` costs only its live nodes, and leaves the trie decides cost nothing. None when every node is fed."""
        fed = self.alive if self.unfed is None else self.alive & ~self.unfed
        live = fed.flatten(1).any(0)  # [dN]
        if bool(live.all()):
            return None
        return torch.where(live, live.long().cumsum(0) - 1, -1)

    def pruned(self, scores: torch.Tensor, budget: int) -> "DraftTree":
        """The tree with only its `budget` best nodes by `scores [G, d, N]` (each node's cumulative draft score)
        alive in each request. A child never scores above its parent (log q <= 0) and ties go to the shallower
        node, so the kept nodes hold every kept node's ancestors."""
        G, d, N = self.codes.shape
        if budget >= d * N:
            return self
        flat = scores.masked_fill(~self.alive, float("-inf")).flatten(1)  # [G, dN]
        order = flat.argsort(dim=-1, descending=True, stable=True)[:, :budget]  # ties: the lower index (level) first
        keep = torch.zeros_like(self.alive.flatten(1)).scatter_(1, order, True).view(G, d, N)
        alive = self.alive & keep
        return DraftTree(self.parents.masked_fill(~alive, 0), self.codes, alive, self.logq, self.noise,  # as padding
                         self.unfed)

    def level(self, j: int) -> "DraftLevel":
        """Level j's nodes; q_j and its noise are None in strict mode."""
        return DraftLevel(self.parents[:, j], self.codes[:, j], self.alive[:, j],
                          self.logq[j] if self.logq else None, self.noise[j] if self.noise else None)


class DraftLevel(NamedTuple):
    """One level of a `DraftTree`."""
    parents: torch.Tensor  # [G, N] index of each node's parent (a current beam at level 0, else a node)
    codes: torch.Tensor  # [G, N]
    alive: torch.Tensor  # [G, N]
    logq: torch.Tensor | None  # [G, n_parents, C] relaxed: the draft's distribution q_j over (parent, code)
    noise: torch.Tensor | None  # [G, n_parents, C] relaxed: the Gumbel noise the nodes were drawn with


def prompt_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded prompts, as `generate` makes them: pos = cumsum(mask) - 1."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def tree_ancestry(parents: torch.Tensor):
    """Roots `[G, d, N]` (the current beam each node descends from) and `sees [G, dN, dN]`:
    sees[g, a, b] iff node b is node a or one of its ancestors."""
    G, d, N = parents.shape
    sees = torch.zeros(G, d * N, d * N, dtype=torch.bool, device=parents.device)
    if d == 0:
        return parents.clone(), sees
    eye = torch.eye(N, dtype=torch.bool, device=parents.device)
    sees[:, :N, :N] = eye
    roots = [parents[:, 0]]
    for j in range(1, d):
        above = sees[:, (j - 1) * N:j * N]  # [G, N, dN] rows of level j-1
        rows = above.gather(1, parents[:, j].unsqueeze(-1).expand(-1, -1, d * N))  # parent's row
        rows[:, :, j * N:(j + 1) * N] |= eye  # + itself
        sees[:, j * N:(j + 1) * N] = rows
        roots.append(roots[-1].gather(1, parents[:, j]))
    return torch.stack(roots, 1), sees


def tree_inputs(vocab: CodeVocab, prompt_mask: torch.Tensor, beam_codes: torch.Tensor, tree: DraftTree,
                prompt_ids: torch.Tensor | None = None, dtype=torch.float32, ancestors: torch.Tensor | None = None,
                cache_len: int = 0):
    """Tokens `[G, q]`, position ids `[G, q]`, additive 4-D mask `[G, 1, q, T + q]` and the indices
    `[H + dN]` of the outputs we need: the last token of each beam (the prompt's last token when
    cur == 0), then every tree node. The cache (T tokens) holds the prompt; or the prompt is fed too
    (`prompt_ids [G, F]`: its last F tokens, after a cached shared prefix of T = P - F tokens or none,
    `models/prefix_cache.py`); or, with `ancestors [G, H, c]`, the cache of `cache_len` tokens also holds
    each beam's first c codes at those indices and only the codes after them are fed (c = cur - 1:
    the newest one)."""
    G, H, cur = beam_codes.shape
    _, d, N = tree.codes.shape
    dev, C = prompt_mask.device, vocab.codebook_size
    fed = cur - ancestors.shape[-1] if ancestors is not None else cur  # path tokens fed per beam
    n_real = prompt_mask.long().sum(-1, keepdim=True)  # [G, 1] first free position
    path_tok = vocab.tokens(beam_codes)[:, :, cur - fed:].flatten(1)  # [G, H*fed]
    tree_tok = (tree.codes + vocab.offset + (cur + torch.arange(d, device=dev)).view(1, d, 1) * C).flatten(1)
    beam_of = torch.arange(H, device=dev).repeat_interleave(fed)  # [H*fed] beam of each path token
    t_of = (cur - fed + torch.arange(fed, device=dev)).repeat(H)  # [H*fed] depth of each path token
    path_pos = n_real + t_of  # [G, H*fed]
    tree_pos = (n_real + cur + torch.arange(d, device=dev).repeat_interleave(N)).expand(G, d * N)
    roots, tt = tree_ancestry(tree.parents)
    pp = (beam_of.unsqueeze(1) == beam_of) & (t_of <= t_of.unsqueeze(1))  # [H*fed, H*fed] own path, causal
    tp = roots.flatten(1).unsqueeze(-1) == beam_of  # [G, dN, H*fed] a node sees its root beam's path
    pt = torch.zeros(G, H * fed, d * N, dtype=torch.bool, device=dev)
    new_vis = torch.cat([torch.cat([pp.expand(G, -1, -1), pt], -1), torch.cat([tp, tt], -1)], 1)  # [G, Q, Q]
    Q, P = new_vis.shape[1], prompt_mask.shape[1]
    prompt_vis = prompt_mask.bool().unsqueeze(1).expand(G, Q, P)  # new tokens see the non-pad prompt
    if ancestors is not None and prompt_ids is None:  # ... and their root beam's cached codes
        cache_vis = torch.zeros(G, Q, cache_len, dtype=torch.bool, device=dev)
        cache_vis[:, :, :P] = prompt_vis
        root = torch.cat([beam_of.expand(G, -1), roots.flatten(1)], 1)  # [G, Q] the beam each token grows
        prompt_vis = cache_vis.scatter_(2, ancestors.gather(1, root.unsqueeze(-1).expand(-1, -1, cur - fed)), True)
    tokens = torch.cat([path_tok, tree_tok], 1)
    positions = torch.cat([path_pos, tree_pos], 1)
    if cur == 0:
        last = torch.full((H,), -1, device=dev)  # the prompt's last token (H == 1)
    else:
        last = torch.arange(H, device=dev) * fed + fed - 1
    keep = torch.cat([last, H * fed + torch.arange(d * N, device=dev)])
    slots = tree.fed_slots()
    if slots is not None:  # feed no node that is dead or unfed in every request (its output row: the 1st beam's)
        n_path = H * fed
        cols = torch.cat([torch.arange(n_path, device=dev), n_path + (slots >= 0).nonzero().flatten()])
        tokens, positions = tokens[:, cols], positions[:, cols]
        new_vis = new_vis[:, cols][:, :, cols]
        prompt_vis = prompt_vis[:, cols]
        Q = len(cols)
        keep = torch.cat([last, torch.where(slots >= 0, n_path + slots, last[:1])])
    if prompt_ids is None:
        vis = torch.cat([prompt_vis, new_vis], -1)  # [G, Q, T + Q]
    else:  # the prompt's last F tokens are fed too (the first P - F, a shared prefix, are the cache)
        F = prompt_ids.shape[1]
        i, at = torch.arange(P, device=dev), torch.arange(P - F, P, device=dev).unsqueeze(1)  # [P], [F, 1]
        causal = (i <= at) & prompt_mask.bool().unsqueeze(1) | (i == at)  # [G, F, P]
        top = torch.cat([causal, prompt_vis.new_zeros(G, F, Q)], -1)
        vis = torch.cat([top, torch.cat([prompt_vis, new_vis], -1)], 1)  # [G, F + Q, P + Q]
        tokens = torch.cat([prompt_ids, tokens], 1)
        positions = torch.cat([prompt_positions(prompt_mask)[:, P - F:], positions], 1)
        keep = keep + F
    return tokens, positions, additive_mask(vis, dtype), keep


def cache_rows(kv: KV, rows: torch.Tensor) -> KV:
    """The cache `kv` (one (keys, values) `[B, ...]` per layer) of `rows` (sorted, distinct) only."""
    if len(rows) == kv[0][0].shape[0]:
        return kv  # every row: no copy
    return [(k[rows], v[rows]) for k, v in kv]


def tree_forward(model, vocab: CodeVocab, prompt_mask: torch.Tensor, beam_codes: torch.Tensor,
                 tree: DraftTree, kv: KV | None = None, prompt_ids: torch.Tensor | None = None,
                 ancestors: torch.Tensor | None = None):
    """ONE pass of `model` over beam paths `[G, H, cur]` + tree after the cache `kv`, or after the
    prompt `prompt_ids` fed in the same pass (kv None, or the prompts' shared prefix from
    `prefix_cache.split_prefix`; the whole paths follow it: the draft's first pass, in the first round it
    drafts).

    Without `ancestors`, `kv` holds the prompt only, the whole paths are fed, and the prompt's KV alone
    is returned (`kv` itself, or the new prompt's): what the next pass after the same prompt reuses.
    With `ancestors [G, H, c]`, `kv` holds every token fed before (each beam's first c codes at those
    indices), only the f = cur - c codes after them are fed (usually the newest), and the cache is
    returned grown by this pass's tokens (the prompt first if fed, then beam h's codes at h*f..h*f+f-1,
    then tree node (j, n) at H*f + jN + n, or at H*f + `tree.fed_slots()`[jN + n] when columns dead in every
    request are left out). Log-probs of the codes after each beam `[G, H, L * C]`
    (after the prompt when cur == 0) and after each tree node `[G, d, N, L * C]`.
    """
    G, H, _ = beam_codes.shape
    _, d, N = tree.codes.shape
    tokens, positions, mask, keep = tree_inputs(vocab, prompt_mask, beam_codes, tree, prompt_ids,
                                                lm_dtype(model), ancestors, kv[0][0].shape[2] if kv else 0)
    logits, grown = lm_forward(model, vocab, tokens, positions, mask, kv, keep)
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [G, H + dN, L * C]
    if ancestors is not None:
        kv = grown
    elif prompt_ids is not None:
        P = prompt_mask.shape[1]
        kv = [(k[:, :, :P], v[:, :, :P]) for k, v in grown]  # cut back to the prompt (a cached prefix included)
    return logprobs[:, :H], logprobs[:, H:].view(G, d, N, logprobs.shape[-1]), kv
