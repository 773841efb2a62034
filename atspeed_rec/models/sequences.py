"""Whole training sequences for causal-LM training on RecBole's sequential data.

RecBole's training split holds one row per prefix of a user's sequence (history -> next item).
A causal LM scores every next item of a sequence in one pass, so feeding it every prefix
repeats the same work about as many times as the sequence is long. Instead, each user's whole
training sequence is cut into windows of W = history + 1 items, overlapping so that each new
window keeps at least `history - stride` items of context, and every training target is
learned exactly once per epoch: when RecBole's batch holds the user's LAST training row.
"""

from __future__ import annotations

import numpy as np
import torch


class TrainingWindows:
    def __init__(self, dataset, history: int, stride: int):
        inter = dataset.inter_feat
        users = inter[dataset.uid_field].numpy()
        targets = inter[dataset.iid_field].numpy()
        first_items = inter["item_id_list"][:, 0].numpy()  # RecBole's histories are left-aligned
        self.width = history + 1  # W, items per window (history + target)
        order = np.lexsort((np.arange(len(users)), users))  # rows are prefixes in time order
        users, targets, first_items = users[order], targets[order], first_items[order]
        starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
        ends = np.r_[starts[1:], len(users)]

        n_users = dataset.user_num
        lengths = np.zeros(n_users, dtype=np.int64)
        seqs = np.zeros((n_users, int((ends - starts).max()) + 1), dtype=np.int64)
        final_target = np.full(n_users, -1, dtype=np.int64)
        win_user, win_start, win_loss_from = [], [], []
        for s, e in zip(starts, ends):
            u = users[s]
            seq = np.r_[first_items[s], targets[s:e]]  # the first history item, then every target
            lengths[u], seqs[u, :len(seq)], final_target[u] = len(seq), seq, targets[e - 1]
            for start, loss_from in self._cut(len(seq), self.width, stride):
                win_user.append(u), win_start.append(start), win_loss_from.append(loss_from)
        self.seqs = torch.from_numpy(seqs)  # [n_users, max_len] right-padded with 0
        self.lengths = torch.from_numpy(lengths)  # [n_users]
        self.final_target = torch.from_numpy(final_target)  # [n_users]
        win_user = torch.tensor(win_user)
        self.win_start = torch.tensor(win_start)  # [n_windows]
        self.win_loss_from = torch.tensor(win_loss_from)  # [n_windows] first window slot with a loss
        counts = torch.bincount(win_user, minlength=n_users)
        self.user_ptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])  # CSR by user
        self.win_user = win_user

    @staticmethod
    def _cut(n: int, width: int, stride: int):
        """(start, first slot with a loss) of the windows covering items 1..n-1 once each."""
        start, covered = 0, 0  # items [0, covered) have been targets (or are the first item)
        while covered < n:
            yield start, max(covered - start, 1)
            covered = min(start + width, n)
            start = min(start + stride, max(n - width, 0))

    def is_final_row(self, users: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """`[B]` True for the rows that are their user's last training row (one per user)."""
        return self.final_target.to(users.device)[users] == targets

    def windows(self, users: torch.Tensor):
        """Windows of these users: items `[n, W]` left-padded with 0, and `[n]` first loss slot."""
        device = users.device
        first, count = self.user_ptr[users.cpu()], self.user_ptr[users.cpu() + 1] - self.user_ptr[users.cpu()]
        offsets = torch.arange(int(count.sum())) - torch.repeat_interleave(count.cumsum(0) - count, count)
        win = torch.repeat_interleave(first, count) + offsets  # [n] window ids
        user, start = self.win_user[win], self.win_start[win]
        real = (self.lengths[user] - start).clamp(max=self.width)  # items in each window
        slot = torch.arange(self.width)
        src = start.unsqueeze(1) + slot - (self.width - real).unsqueeze(1)  # right-align the window
        items = self.seqs[user.unsqueeze(1), src.clamp(min=0, max=self.seqs.shape[1] - 1)]
        items = items.masked_fill(slot < (self.width - real).unsqueeze(1), 0)
        loss_from = self.width - real + self.win_loss_from[win]
        return items.to(device), loss_from.to(device)


def pack(lengths: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows for sequences of `lengths [n]`, laid end to end in rows of `capacity` tokens (first fit,
    longest first): `(row [n], start [n])`, sequence i at `row[i], start[i]:start[i] + lengths[i]`.
    A batch packed this way computes few pad tokens, where padding each to the longest computes many."""
    if len(lengths) and int(lengths.max()) > capacity:
        raise ValueError(f"a sequence of {int(lengths.max())} tokens does not fit rows of {capacity}")
    row, start = torch.zeros_like(lengths), torch.zeros_like(lengths)
    free: list[int] = []  # tokens left in each row
    for i in torch.argsort(lengths, descending=True, stable=True).tolist():
        n = int(lengths[i])
        r = next((r for r, left in enumerate(free) if left >= n), len(free))
        if r == len(free):
            free.append(capacity)
        row[i], start[i] = r, capacity - free[r]
        free[r] -= n
    return row, start
