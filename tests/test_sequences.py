"""Training windows: every training target learned once per epoch, with its true history."""

import pytest
import torch
from recbole.data import create_dataset, data_preparation

from atspeed_rec.models.sequences import TrainingWindows, pack
from atspeed_rec.recbole_glue.runner import build_config


def test_every_training_target_appears_once_with_its_own_history(synth_root, in_tmp_dir):
    history, stride = 4, 2  # short windows, so long users are cut into several
    config = build_config("SASRec", "synth", [str(synth_root / "synth.yaml")],
                          {"data_path": str(synth_root), "MAX_ITEM_LIST_LENGTH": history})
    train = data_preparation(config, create_dataset(config))[0]._dataset
    windows = TrainingWindows(train, history, stride)

    users = torch.arange(1, train.user_num)
    items, loss_from = windows.windows(users)
    win_users = torch.repeat_interleave(users, windows.user_ptr[users + 1] - windows.user_ptr[users])
    learned = {}
    for u, row, start in zip(win_users.tolist(), items.tolist(), loss_from.tolist()):
        for slot in range(start, len(row)):
            context = [i for i in row[:slot] if i > 0]
            key = (u, row[slot])
            assert key not in learned, f"target {key} learned twice"
            learned[key] = context

    inter = train.inter_feat
    assert len(learned) == len(inter)  # one RecBole training row per target
    for u, t, seq, n in zip(inter["user_id"].tolist(), inter["item_id"].tolist(),
                            inter["item_id_list"].tolist(), inter["item_length"].tolist()):
        truth = seq[:n]  # RecBole's history of this target (already cut to `history` items)
        context = learned[(u, t)]
        k = min(len(context), len(truth))
        assert context[len(context) - k:] == truth[len(truth) - k:]
        assert k >= min(len(truth), history - stride)  # enough context survives the cut


def test_exactly_one_row_per_user_stands_for_the_whole_sequence(synth_root, in_tmp_dir):
    config = build_config("SASRec", "synth", [str(synth_root / "synth.yaml")], {"data_path": str(synth_root)})
    train = data_preparation(config, create_dataset(config))[0]._dataset
    windows = TrainingWindows(train, 10, 5)
    final = windows.is_final_row(train.inter_feat["user_id"], train.inter_feat["item_id"])
    assert torch.equal(torch.unique(train.inter_feat["user_id"][final]),
                       torch.unique(train.inter_feat["user_id"]))
    assert int(final.sum()) == len(torch.unique(train.inter_feat["user_id"]))


def test_packed_rows_hold_every_sequence_once_side_by_side_within_the_capacity():
    lengths = torch.randint(1, 30, (200,), generator=torch.Generator().manual_seed(0))
    row, start = pack(lengths, 40)
    taken = {}
    for i, (r, s, n) in enumerate(zip(row.tolist(), start.tolist(), lengths.tolist())):
        assert 0 <= s and s + n <= 40
        for slot in range(s, s + n):
            assert (r, slot) not in taken, f"sequences {taken[(r, slot)]} and {i} overlap"
            taken[(r, slot)] = i
    rows = int(row.max()) + 1
    assert rows * 40 < 1.1 * int(lengths.sum())  # few pad slots: first fit, longest first
    assert torch.equal(pack(lengths, 40)[0], row)  # deterministic


def test_a_sequence_longer_than_a_row_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        pack(torch.tensor([3, 9]), 8)
