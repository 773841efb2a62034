"""Teacher data: the target's top-K_train beams for training samples, and its distributions along them.

For each selected training sample (a RecBole training row: a user's history -> next item), the
frozen target's trie-constrained beam search gives its K_train best items and the masked next-code
log-probabilities it computed at every position along those beams (the search's own: no second
pass over the prompts), so the draft stage never runs the target again. Cached as safetensors,
keyed by the target checkpoint and the properties that select the samples; generated in batches
with a progress bar, each rank of a `--nproc` run generating its share.

Storage: the log-probs of the ALLOWED codes only (the trie allows few codes below level 0),
flat in float16, in row-major order of the mask `allowed & stored_positions`; level 0 is the same
for all K beams of a sample and is stored once. The mask is rebuilt from the trie on load.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from recbole.utils import set_color
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from atspeed_rec.atomic import atomic_write, atomic_write_json, file_sha256, verified
from atspeed_rec.alignment.positions import allowed_along
from atspeed_rec.decoding.beam_search import beam_search
from atspeed_rec.semantic_ids.trie import CodeTrie

FORMAT = 2  # bump when the file layout changes (2: rows keyed by user, target item and length)


@dataclass
class TeacherBatch:
    codes: torch.Tensor  # [n, K, L] the target's top-K beams (invalid beams repeat beam 0)
    weight: torch.Tensor  # [n, K] 1 for real beams, 0 where fewer than K items exist
    target_logp: torch.Tensor  # [n, K, L, C] target log-probs (-inf outside the trie)
    allowed: torch.Tensor  # [n, K, L, C] bool


def row_keys(users: torch.Tensor, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """One int64 key per RecBole training row: (user, target item, history length). The length alone
    is not enough: histories are cut at MAX_ITEM_LIST_LENGTH, so a long user's rows share it."""
    return (users.long() * (1 << 24) + items.long()) * (1 << 12) + lengths.long()


class SampleIndex:
    """Alignment samples, looked up by the (user, target item, history length) of RecBole's rows."""

    def __init__(self, users: torch.Tensor, items: torch.Tensor, lengths: torch.Tensor):
        self.users, self.items, self.lengths = users.long(), items.long(), lengths.long()  # [N] each
        self.keys, self.order = torch.sort(row_keys(self.users, self.items, self.lengths))

    def __len__(self) -> int:
        return len(self.users)

    def lookup(self, users: torch.Tensor, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """`[B]` sample index of each RecBole row, -1 for rows that are not alignment samples."""
        key = row_keys(users.cpu(), items.cpu(), lengths.cpu())
        at = torch.searchsorted(self.keys, key).clamp(max=len(self.keys) - 1)
        found = self.keys[at] == key if len(self.keys) else torch.zeros_like(key, dtype=torch.bool)
        return torch.where(found, self.order[at], -1).to(users.device)


class TeacherData(SampleIndex):
    """Alignment samples with the target's beams and distributions (see the module docstring)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__(tensors["users"], tensors["items"], tensors["lengths"])
        self.codes = tensors["codes"].long()  # [N, K, L]
        self.valid = tensors["valid"].bool()  # [N, K]
        self.offsets, self.values = tensors["offsets"], tensors["values"]  # [N + 1], [M] float16

    @property
    def k_train(self) -> int:
        return self.codes.shape[1]

    def batch(self, samples: torch.Tensor, trie: CodeTrie) -> TeacherBatch:
        device = trie.device
        samples = samples.cpu()
        codes = self.codes[samples].to(device)  # [n, K, L]
        allowed = allowed_along(trie, codes)  # [n, K, L, C]
        stored = allowed & stored_positions(*codes.shape, device=device).unsqueeze(-1)
        start, count = self.offsets[samples], self.offsets[samples + 1] - self.offsets[samples]
        flat = torch.repeat_interleave(start - (count.cumsum(0) - count), count) + torch.arange(int(count.sum()))
        logp = torch.full(allowed.shape, float("-inf"), device=device)
        logp[stored] = self.values[flat].to(device).float()
        logp[:, 1:, 0] = logp[:, :1, 0]  # level 0 is shared by the beams
        return TeacherBatch(codes, self.valid[samples].to(device).float(), logp, allowed)


def stored_positions(n: int, K: int, L: int, device=None) -> torch.Tensor:
    """`[n, K, L]` positions kept on disk: level 0 of beam 0, every level > 0 of every beam."""
    keep = torch.ones(K, L, dtype=torch.bool, device=device)
    keep[1:, 0] = False
    return keep.expand(n, K, L)


def select_samples(users: torch.Tensor, per_user: int, max_users: int = 0, seed: int = 0) -> torch.Tensor:
    """Row indices of the training samples with teacher data: each user's last `per_user` rows
    (RecBole keeps a user's prefixes in time order: the latest histories, closest to what is
    served), or every row when per_user <= 0; of `max_users` users drawn at random (seeded) when
    max_users > 0 (an LLM target's beam search is the cost: 22k users take ~55 minutes on 2 cores)."""
    n = len(users)
    keep = torch.ones(n, dtype=torch.bool)
    distinct = torch.unique(users)
    if 0 < max_users < len(distinct):
        drawn = distinct[torch.randperm(len(distinct), generator=torch.Generator().manual_seed(seed))[:max_users]]
        keep = torch.isin(users, drawn)
    if per_user <= 0:
        return torch.nonzero(keep).squeeze(1)
    order = torch.argsort(users.long() * n + torch.arange(n), descending=True)  # user, then latest row first
    sorted_users = users[order]
    first = torch.ones_like(sorted_users, dtype=torch.bool)
    first[1:] = sorted_users[1:] != sorted_users[:-1]
    group_start = torch.cummax(torch.where(first, torch.arange(n), 0), 0).values
    rank = torch.arange(n) - group_start  # 0 = the user's latest row
    return torch.sort(order[(rank < per_user) & keep[order]]).values


@torch.no_grad()
def generate_teacher(target, rows, k_train: int, batch_size: int, show_progress: bool = True,
                     rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
    """Beams and distributions of `target` (a GenRec) for the RecBole training `rows` (Interaction).

    With world_size > 1 this rank does every world_size-th batch; `gather_teacher` joins them.
    """
    was_training = target.training
    target.eval()
    trie, device = target.trie, target.item_codes.device
    parts = {k: [] for k in ("users", "items", "lengths", "codes", "valid", "counts", "values")}
    order = torch.argsort(rows[target.ITEM_SEQ_LEN].cpu(), stable=True)  # batches of like lengths: little padding
    starts = list(range(0, len(rows), batch_size))[rank::world_size]
    for start in tqdm(starts, desc=set_color("Teacher data", "pink"), ncols=100, disable=not show_progress):
        inter = rows[order[start:start + batch_size]].to(device)
        input_ids, mask = target.prompt(inter)
        beams = beam_search(target.lm, trie, target.vocab, input_ids, mask, k_train, keep_logprobs=True)
        valid = beams.items > 0  # [b, K]
        codes = torch.where(valid.unsqueeze(-1), beams.codes, beams.codes[:, :1])  # [b, K, L]
        logp = torch.where(valid.view(*valid.shape, 1, 1), beams.code_logprobs, beams.code_logprobs[:, :1])
        allowed = allowed_along(trie, codes)  # [b, K, L, C]; logp is -inf elsewhere
        stored = allowed & stored_positions(*codes.shape, device=device).unsqueeze(-1)
        parts["users"].append(inter[target.USER_ID].cpu())
        parts["items"].append(inter[target.POS_ITEM_ID].cpu())
        parts["lengths"].append(inter[target.ITEM_SEQ_LEN].cpu())
        parts["codes"].append(codes.to(torch.int16).cpu())
        parts["valid"].append(valid.to(torch.uint8).cpu())
        parts["counts"].append(stored.flatten(1).sum(1).cpu())
        parts["values"].append(logp[stored].half().cpu())
    target.train(was_training)
    out = {k: torch.cat(v) if v else torch.zeros(0) for k, v in parts.items()}
    return out


def finish(parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Counts -> offsets; the stored layout."""
    counts = parts.pop("counts").long()
    parts["offsets"] = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    return parts


def gather_teacher(parts: dict[str, torch.Tensor], world_size: int) -> dict[str, torch.Tensor]:
    """Every rank's share, joined (torch.distributed object gather; ranks hold disjoint samples)."""
    if world_size <= 1:
        return parts
    shares = [None] * world_size
    torch.distributed.all_gather_object(shares, parts)
    return {k: torch.cat([s[k] for s in shares]) for k in parts}


def save_teacher(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Atomically: the tensors (safetensors) and `meta` (JSON sidecar)."""
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp))
    atomic_write_json(f"{path}.json", {"format": FORMAT, **meta, "sha256": file_sha256(path)})


def _whole(path: Path) -> bool:
    """The file has the hash its sidecar recorded (a damaged or missing sidecar: not whole)."""
    try:
        return verified(path, json.loads(Path(f"{path}.json").read_text()))
    except (OSError, ValueError):
        return False


def load_or_generate(path: Path, target, samples, k_train: int, batch_size: int, meta: dict, show_progress: bool,
                     rank: int = 0, world_size: int = 1) -> TeacherData:
    """The cached teacher data at `path`, or generate it for the training rows `samples` (an Interaction;
    all ranks) and cache it (rank 0)."""
    logger = logging.getLogger()
    if path.is_file() and _whole(path):
        logger.info(set_color("stage", "green") + f": reusing the teacher data {path}")
        return TeacherData(load_file(str(path)))
    if path.is_file():
        logger.warning(f"the teacher data {path} is truncated or corrupted (hash mismatch): generating it again")
    logger.info(set_color("stage", "green") + f": teacher data: the target's top-{k_train} beams for "
                f"{len(samples)} training samples (saved to {path})")
    parts = generate_teacher(target, samples, k_train, batch_size, show_progress, rank, world_size)
    tensors = finish(gather_teacher(parts, world_size))
    if rank == 0:
        save_teacher(path, tensors, meta)
    if world_size > 1:
        torch.distributed.barrier()
    return TeacherData(tensors)
