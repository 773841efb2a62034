"""Where the alignment losses are evaluated: the code positions along given beams after a prompt.

Every alignment loss compares the draft's and the target's next-code distributions at the same
positions: after the prompt (level 0) and after each of the first L-1 codes of some beams
(levels 1..L-1). The beams are the target's top-K (teacher data), the true next item, or the
draft's own top-K (on-policy). One forward pass per model scores all K beams of a request: the
beams are laid out as a tree after the prompt (`decoding/tree.py`), so the prompt is encoded once.
"""

from __future__ import annotations

import torch

from atspeed_rec.decoding.tree import DraftTree, tree_inputs
from atspeed_rec.models.fast_forward import hidden_code_logits, lm_dtype
from atspeed_rec.models.vocab import CodeVocab
from atspeed_rec.semantic_ids.trie import CodeTrie


def beam_tree(codes: torch.Tensor) -> DraftTree:
    """The K beams `[G, K, L]` as a tree of depth L-1 (node k of level j is beam k's j-th code)."""
    G, K, L = codes.shape
    parents = torch.arange(K, device=codes.device).expand(G, L - 1, K).clone()  # level j: beam k's level j-1
    parents[:, 0] = 0  # level 0 hangs from the prompt (the single empty beam)
    return DraftTree(parents=parents, codes=codes[..., :L - 1].transpose(1, 2),
                     alive=torch.ones(G, L - 1, K, dtype=torch.bool, device=codes.device), logq=[])


def beam_code_logits(model, vocab: CodeVocab, input_ids: torch.Tensor, mask: torch.Tensor,
                     codes: torch.Tensor) -> torch.Tensor:
    """`[G, K, L, C]` logits of `model` for the code of level l after the prompt and codes[:, k, :l].

    input_ids, mask: left-padded prompts `[G, P]`; codes: `[G, K, L]` valid code sequences.
    Gradients flow when the caller enables them (draft training); wrap in no_grad for the target.
    """
    G, K, L = codes.shape
    empty = codes.new_zeros(G, 1, 0)  # no current beam: the tree grows from the prompt
    tokens, positions, attn, keep = tree_inputs(vocab, mask, empty, beam_tree(codes), prompt_ids=input_ids,
                                                dtype=lm_dtype(model))
    logits = hidden_code_logits(model, vocab, keep, input_ids=tokens, attention_mask=attn,
                                position_ids=positions)  # [G, 1 + (L-1)K, L*C]: after the prompt, then every node
    root = logits[:, :1].expand(G, K, -1).unsqueeze(2)  # [G, K, 1, L*C]
    nodes = logits[:, 1:].view(G, L - 1, K, -1).transpose(1, 2)  # [G, K, L-1, L*C]
    per_level = torch.cat([root, nodes], dim=2)  # [G, K, L, L*C]
    return torch.stack([vocab.level_logits(per_level[:, :, l], l) for l in range(L)], dim=2)  # [G, K, L, C]


def allowed_along(trie: CodeTrie, codes: torch.Tensor) -> torch.Tensor:
    """`[G, K, L, C]` the trie's allowed codes after each prefix codes[:, k, :l]."""
    nodes = trie.root_nodes(*codes.shape[:2])  # [G, K]
    allowed = []
    for level in range(codes.shape[-1]):
        allowed.append(trie.allowed(nodes, level))
        if level < codes.shape[-1] - 1:
            nodes = trie.step(nodes, codes[..., level], level).clamp(min=0)
    return torch.stack(allowed, dim=2)
