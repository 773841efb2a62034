"""Beam paths + a tree after a prompt, in ONE forward pass: the only way decoding feeds code tokens.

The input (per request) is [the prompt, unless it is cached] + the H current beams' code paths
(H chains of `cur` tokens) + the N*d tree tokens (level j, node n at index j*N + n). Every token
sees the request's non-pad prompt, its own ancestors and itself; its position id is the prompt's
last position + 1 + its depth. A plain path is a tree without branches: beam search feeds its K
beams with an empty tree, the draft re-feeds the beams + the levels it has grown so far, the
target verifies beams + the whole draft tree. The mask is built in full for the lean forward
(`models/fast_forward.py`): additive float, shape [G, 1, q, cache + q], 0 where visible and
dtype-min elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from atspeed_rec.models.fast_forward import KV, additive_mask, lm_dtype, lm_forward
from atspeed_rec.models.vocab import CodeVocab


@dataclass
class DraftTree:
    parents: torch.Tensor  # [G, d, N] level 0: index of a current beam; level j > 0: a node of level j-1
    codes: torch.Tensor  # [G, d, N] code of each node (level j is depth cur + j)
    alive: torch.Tensor  # [G, d, N] False for padding nodes (fewer than N valid pairs)
    logq: list[torch.Tensor]  # relaxed only: level j's draft distribution over (parent, code), [G, n_parents, C]

    @staticmethod
    def empty(groups: int, width: int = 0, device=None) -> "DraftTree":
        z = torch.zeros(groups, 0, width, dtype=torch.long, device=device)
        return DraftTree(z, z.clone(), z.bool(), [])

    @property
    def depth(self) -> int:
        return self.codes.shape[1]

    def grow(self, parents: torch.Tensor, codes: torch.Tensor, alive: torch.Tensor, logq=None) -> "DraftTree":
        """The tree with one more level of nodes `[G, N]` (and its q `[G, n_parents, C]` in relaxed mode)."""
        def cat(old, new):
            return torch.cat([old, new.unsqueeze(1)], 1)  # [G, d + 1, N]
        return DraftTree(cat(self.parents, parents), cat(self.codes, codes), cat(self.alive, alive),
                         self.logq + ([] if logq is None else [logq]))

    def level(self, j: int):
        """Level j's parents, codes, alive `[G, N]` and q_j `[G, n_parents, C]` (None in strict mode)."""
        return self.parents[:, j], self.codes[:, j], self.alive[:, j], self.logq[j] if self.logq else None


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
                prompt_ids: torch.Tensor | None = None, dtype=torch.float32):
    """Tokens `[G, q]`, position ids `[G, q]`, additive 4-D mask `[G, 1, q, P + q]` (prompt in the cache,
    or in the input when `prompt_ids` is given) and the indices `[H + dN]` of the outputs we need:
    the last token of each beam (the prompt's last token when cur == 0), then every tree node."""
    G, H, cur = beam_codes.shape
    _, d, N = tree.codes.shape
    dev, C = prompt_mask.device, vocab.codebook_size
    n_real = prompt_mask.long().sum(-1, keepdim=True)  # [G, 1] first free position
    path_tok = vocab.tokens(beam_codes).flatten(1)  # [G, H*cur]
    tree_tok = (tree.codes + vocab.offset + (cur + torch.arange(d, device=dev)).view(1, d, 1) * C).flatten(1)
    beam_of = torch.arange(H, device=dev).repeat_interleave(cur)  # [H*cur] beam of each path token
    t_of = torch.arange(cur, device=dev).repeat(H)  # [H*cur] depth of each path token
    path_pos = n_real + t_of  # [G, H*cur]
    tree_pos = (n_real + cur + torch.arange(d, device=dev).repeat_interleave(N)).expand(G, d * N)
    roots, tt = tree_ancestry(tree.parents)
    pp = (beam_of.unsqueeze(1) == beam_of) & (t_of <= t_of.unsqueeze(1))  # [H*cur, H*cur] own path, causal
    tp = roots.flatten(1).unsqueeze(-1) == beam_of  # [G, dN, H*cur] a node sees its root beam's path
    pt = torch.zeros(G, H * cur, d * N, dtype=torch.bool, device=dev)
    new_vis = torch.cat([torch.cat([pp.expand(G, -1, -1), pt], -1), torch.cat([tp, tt], -1)], 1)  # [G, Q, Q]
    Q, P = new_vis.shape[1], prompt_mask.shape[1]
    prompt_vis = prompt_mask.bool().unsqueeze(1).expand(G, Q, P)  # new tokens see the non-pad prompt
    tokens = torch.cat([path_tok, tree_tok], 1)
    positions = torch.cat([path_pos, tree_pos], 1)
    if cur == 0:
        last = torch.full((H,), -1, device=dev)  # the prompt's last token (H == 1)
    else:
        last = torch.arange(H, device=dev) * cur + cur - 1
    keep = torch.cat([last, H * cur + torch.arange(d * N, device=dev)])
    if prompt_ids is None:
        vis = torch.cat([prompt_vis, new_vis], -1)  # [G, Q, P + Q]
    else:
        i = torch.arange(P, device=dev)
        causal = (i <= i.unsqueeze(1)) & prompt_mask.bool().unsqueeze(1) | (i == i.unsqueeze(1))  # [G, P, P]
        top = torch.cat([causal, prompt_vis.new_zeros(G, P, Q)], -1)
        vis = torch.cat([top, torch.cat([prompt_vis, new_vis], -1)], 1)  # [G, P + Q, P + Q]
        tokens = torch.cat([prompt_ids, tokens], 1)
        positions = torch.cat([prompt_positions(prompt_mask), positions], 1)
        keep = keep + P
    return tokens, positions, additive_mask(vis, dtype), keep


def cache_rows(kv: KV, rows: torch.Tensor) -> KV:
    """The cache `kv` (one (keys, values) `[B, ...]` per layer) of `rows` only."""
    return [(k[rows], v[rows]) for k, v in kv]


def tree_forward(model, vocab: CodeVocab, prompt_mask: torch.Tensor, beam_codes: torch.Tensor,
                 tree: DraftTree, kv: KV | None = None, prompt_ids: torch.Tensor | None = None):
    """ONE pass of `model` over beam paths `[G, H, cur]` + tree after the cached prompt `kv`, or after
    the prompt `prompt_ids [G, P]` fed in the same pass (kv None; cur == 0 then, H == 1).

    Returns code log-probs after each beam `[G, H, L * C]` (after the prompt when cur == 0), after each
    tree node `[G, d, N, L * C]`, and the prompt's KV alone (`kv` itself, or the new prompt's): what
    the next pass after the same prompt reuses.
    """
    G, H, _ = beam_codes.shape
    _, d, N = tree.codes.shape
    tokens, positions, mask, keep = tree_inputs(vocab, prompt_mask, beam_codes, tree, prompt_ids,
                                                dtype=lm_dtype(model))
    logits, grown = lm_forward(model, vocab, tokens, positions, mask, kv, keep)
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [G, H + dN, L * C]
    if kv is None:
        P = prompt_mask.shape[1]
        kv = [(k[:, :, :P], v[:, :, :P]) for k, v in grown]  # cut back to the prompt
    return logprobs[:, :H], logprobs[:, H:].view(G, d, N, logprobs.shape[-1]), kv
