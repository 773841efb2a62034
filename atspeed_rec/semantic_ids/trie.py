"""The prefix-trie constraint over semantic IDs, as dense tensors.

Every item is a code tuple (c_0, ..., c_{L-1}), each code in [0, C). The trie is stored level
by level as a child table: `children[t][node, c]` is the id of the node reached from `node` at
depth t by code c, or -1 when no item continues that way. A beam never re-walks its prefix:
it carries its node id, so the mask of allowed next codes is one gather,
`children[t][nodes] >= 0`, for any batch shape (B requests x K beams x ...), with no Python
loop over beams. At depth L-1 the child table holds item ids instead of node ids.
"""

from __future__ import annotations

import torch


class CodeTrie:
    """Dense per-level child tables for a set of unique code tuples.

    Args:
        codes: `[n_items, L]` long tensor, one unique code tuple per item.
        codebook_size: C, the number of codes per level.
        item_offset: item id of row 0 of `codes` (RecBole's internal ids start at 1; 0 is PAD).
    """

    def __init__(self, codes: torch.Tensor, codebook_size: int, item_offset: int = 0):
        codes = torch.as_tensor(codes, dtype=torch.long).cpu()
        if codes.dim() != 2 or codes.shape[0] == 0:
            raise ValueError(f"codes must be a non-empty [n_items, L] tensor, got {tuple(codes.shape)}")
        if codes.min() < 0 or codes.max() >= codebook_size:
            raise ValueError(f"codes must lie in [0, {codebook_size}); got [{codes.min()}, {codes.max()}]")
        if torch.unique(codes, dim=0).shape[0] != codes.shape[0]:
            raise ValueError("semantic IDs are not unique: two items share one code tuple")
        self.codes = codes
        self.levels = codes.shape[1]
        self.codebook_size = codebook_size
        self.item_offset = item_offset
        self.children = self._build_children(codes, codebook_size, item_offset)
        # per depth, each node's only allowed code, or -1 where it has several (or none)
        self.only_child = [torch.where((c >= 0).sum(1) == 1, (c >= 0).int().argmax(1), -1) for c in self.children]

    @staticmethod
    def _build_children(codes: torch.Tensor, C: int, item_offset: int) -> list[torch.Tensor]:
        n, L = codes.shape
        children = []
        parent = torch.zeros(n, dtype=torch.long)  # node id of each item's prefix at depth t
        n_parents = 1
        for t in range(L):
            key = parent * C + codes[:, t]  # one key per (parent node, code) edge
            if t == L - 1:
                child = torch.arange(n) + item_offset  # leaves are items
            else:
                uniq, child = torch.unique(key, return_inverse=True)  # child node ids 0..m-1
            table = torch.full((n_parents * C,), -1, dtype=torch.long)
            table[key] = child
            children.append(table.view(n_parents, C))
            if t < L - 1:
                parent, n_parents = child, uniq.numel()
        return children

    def to(self, device) -> "CodeTrie":
        self.children = [c.to(device) for c in self.children]
        self.only_child = [c.to(device) for c in self.only_child]
        self.codes = self.codes.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.children[0].device

    def root_nodes(self, *shape: int) -> torch.Tensor:
        """Node ids of empty prefixes, `[*shape]` zeros."""
        return torch.zeros(shape, dtype=torch.long, device=self.device)

    def allowed(self, nodes: torch.Tensor, depth: int) -> torch.Tensor:
        """`[..., C]` bool mask of the codes allowed after prefixes at `depth` with node ids `nodes`."""
        return self.children[depth][nodes] >= 0

    def only_code(self, nodes: torch.Tensor, depth: int) -> torch.Tensor:
        """`[...]` the one code allowed after prefixes at `depth` with node ids `nodes`, -1 where there
        are several: there the prefix decides the code, whatever a model would say."""
        return self.only_child[depth][nodes]

    def step(self, nodes: torch.Tensor, codes: torch.Tensor, depth: int) -> torch.Tensor:
        """Child node ids (item ids at the last depth) after appending `codes`; -1 where invalid."""
        return self.children[depth][nodes, codes]

    def walk(self, prefixes: torch.Tensor) -> torch.Tensor:
        """Node ids `[...]` of prefixes `[..., t]` (t < L), -1 for a prefix that is no item's."""
        nodes = self.root_nodes(*prefixes.shape[:-1])
        for t in range(prefixes.shape[-1]):
            valid = nodes >= 0
            nxt = self.children[t][nodes.clamp(min=0), prefixes[..., t]]
            nodes = torch.where(valid, nxt, nodes)
        return nodes

    def allowed_after(self, prefixes: torch.Tensor) -> torch.Tensor:
        """`[..., C]` mask of the codes allowed after each prefix `[..., t]`; all False if invalid."""
        depth = prefixes.shape[-1]
        if depth >= self.levels:
            raise ValueError(f"a prefix of length {depth} is already a full ID (L = {self.levels})")
        nodes = self.walk(prefixes)
        mask = self.allowed(nodes.clamp(min=0), depth)
        return mask & (nodes >= 0).unsqueeze(-1)

    def item_of(self, codes: torch.Tensor) -> torch.Tensor:
        """Item ids `[...]` of full code sequences `[..., L]`; -1 where no item has that ID."""
        if codes.shape[-1] != self.levels:
            raise ValueError(f"a full ID has {self.levels} codes, got {codes.shape[-1]}")
        return self.walk(codes)

    def codes_of(self, items: torch.Tensor) -> torch.Tensor:
        """Code tuples `[..., L]` of item ids `[...]`."""
        return self.codes.to(items.device)[items - self.item_offset]
