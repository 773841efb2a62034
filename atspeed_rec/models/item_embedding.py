"""Code-token embeddings plus an embedding of each history item, on the item's last code token.

A history item is L code tokens. Codes are shared by many items, so from codes alone a small LM
must compose what one item means; SASRec-style models instead learn one vector per item, which is
what makes them strong on sparse data. This embedding gives the LM both: each code token keeps its
code embedding, and the LAST code token of every complete item in the input also gets that item's
own vector. The model still generates codes only, and it never sees the vector of an item it is
generating: generation feeds at most the first L-1 codes of the next item (its last code is
predicted, never fed), so the item vector appears only on items of the prompt.

It replaces `LlamaModel.embed_tokens`, so every forward (training, our beam search, the lean
decoding forward, Hugging Face `generate`) uses it unchanged. The item of a last-level token is
found from the L tokens that end there (prompts and training windows hold whole items).
"""

from __future__ import annotations

import torch
from torch import nn

from atspeed_rec.models.vocab import CodeVocab


class ItemTokenEmbedding(nn.Module):
    def __init__(self, code_embedding: nn.Embedding, vocab: CodeVocab, item_codes: torch.Tensor,
                 init_std: float = 0.02):
        super().__init__()
        self.code_embedding = code_embedding  # [V, D]: the LM's token embeddings
        self.vocab = vocab
        n_items = item_codes.shape[0]
        self.item_embedding = nn.Embedding(n_items, code_embedding.embedding_dim, padding_idx=0)  # [n_items, D]
        nn.init.normal_(self.item_embedding.weight, std=init_std)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()  # PAD
        keys = self._keys(item_codes[1:].clamp(min=0))  # items 1.. by their code tuple
        order = keys.argsort()
        self.register_buffer("sorted_keys", keys[order], persistent=False)  # [n_items - 1]
        self.register_buffer("sorted_items", order + 1, persistent=False)

    @property
    def weight(self) -> torch.Tensor:  # transformers reads the token embedding's weight (dtype, size)
        return self.code_embedding.weight

    def _keys(self, codes: torch.Tensor) -> torch.Tensor:
        """One integer per code tuple `[..., L]` (C ** L fits in int64 for every usual C and L)."""
        C = self.vocab.codebook_size
        key = torch.zeros(codes.shape[:-1], dtype=torch.long, device=codes.device)
        for level in range(codes.shape[-1]):
            key = key * C + codes[..., level]
        return key

    def items_ending_at(self, tokens: torch.Tensor) -> torch.Tensor:
        """`[B, T]` the item whose L-token ID ends at each position, 0 where none does."""
        L, C = self.vocab.levels, self.vocab.codebook_size
        items = torch.zeros_like(tokens)
        if tokens.shape[1] < L:
            return items
        window = tokens.unfold(1, L, 1)  # [B, T-L+1, L]: the L tokens ending at position j + L - 1
        codes = window - (self.vocab.offset + C * torch.arange(L, device=tokens.device))
        is_id = ((codes >= 0) & (codes < C)).all(-1)  # each token is a code of its own level
        key = self._keys(codes.clamp(0, C - 1))
        at = torch.searchsorted(self.sorted_keys, key).clamp(max=self.sorted_keys.numel() - 1)
        found = is_id & (self.sorted_keys[at] == key)
        items[:, L - 1:] = torch.where(found, self.sorted_items[at], 0)
        return items

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """`[B, T, D]` code embeddings, plus the item's embedding on each item's last code token."""
        return self.code_embedding(tokens) + self.item_embedding(self.items_ending_at(tokens))
