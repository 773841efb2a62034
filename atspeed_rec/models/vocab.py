"""The token layout shared by the target LM, the draft LM and every decoder.

Token 0 is PAD; the code c of level l is token 1 + l * C + c. A history of items is the
concatenation of their L-code IDs; the next item's codes follow it directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CodeVocab:
    levels: int  # L, codes per item
    codebook_size: int  # C, codes per level
    pad_id: int = 0
    offset: int = 1  # first code token (after PAD)

    @property
    def size(self) -> int:
        return self.offset + self.levels * self.codebook_size

    def level_start(self, level: int) -> int:
        return self.offset + level * self.codebook_size

    def tokens(self, codes: torch.Tensor, level: int | None = None) -> torch.Tensor:
        """Token ids of codes: `codes [..., L]` of whole IDs, or `codes [...]` at one `level`."""
        if level is not None:
            return codes + self.level_start(level)
        levels = torch.arange(codes.shape[-1], device=codes.device)
        return codes + self.offset + levels * self.codebook_size

    def level_logits(self, logits: torch.Tensor, level: int) -> torch.Tensor:
        """`[..., C]` slice of code logits `[..., L * C]` (the models' outputs: column j is token
        `offset + j`) for the codes of `level`."""
        start = level * self.codebook_size
        return logits[..., start:start + self.codebook_size]

    def history_tokens(self, item_codes: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Left-padded prompt tokens `[B, H * L]` for right-aligned item ids `items [B, H]` (0 = PAD).

        item_codes: `[n_items, L]` codes per internal item id (row 0, PAD, is ignored).
        """
        codes = item_codes[items]  # [B, H, L]
        tokens = self.tokens(codes.clamp(min=0))
        tokens = tokens.masked_fill((items == 0).unsqueeze(-1), self.pad_id)
        return tokens.flatten(1)
