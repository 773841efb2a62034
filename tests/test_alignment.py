"""Draft alignment: positions along beams, teacher data, every align_loss, and the staged AtSpeed runs."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_model

from atspeed_rec.alignment.losses import ALIGN_LOSSES, masked_log_softmax
from atspeed_rec.alignment.objective import AlignConfig, align_loss
from atspeed_rec.alignment.positions import allowed_along, beam_code_logits
from atspeed_rec.alignment.teacher import SampleIndex, TeacherData, finish, select_samples, stored_positions
from atspeed_rec.decoding.beam_search import beam_search
from atspeed_rec.decoding.tree import prompt_positions
from atspeed_rec.errors import ConfigError
from atspeed_rec.models.vocab import CodeVocab
from atspeed_rec.semantic_ids.trie import CodeTrie
from random_models import random_ids, random_lm, random_prompts
from test_atspeed import run

VOCAB = CodeVocab(levels=4, codebook_size=8)


def world(seed=0):
    codes = random_ids(200, 4, 8, seed)
    trie = CodeTrie(codes, 8, item_offset=1)
    item_codes = torch.cat([torch.full((1, 4), -1), codes])  # row 0 = PAD
    ids, mask = random_prompts(item_codes, VOCAB, 3, 5, seed)
    return trie, random_lm(VOCAB.size, seed), random_lm(VOCAB.size, seed + 1, layers=1), ids, mask


def test_beam_code_logits_equal_one_forward_per_beam():
    trie, target, _, ids, mask = world()
    beams = beam_search(target, trie, VOCAB, ids, mask, 5)
    got = beam_code_logits(target, VOCAB, ids, mask, beams.codes)  # [3, 5, 4, 8]
    for b in range(3):
        for k in range(5):
            seq = torch.cat([ids[b], VOCAB.tokens(beams.codes[b, k])])
            m = torch.cat([mask[b], torch.ones(4, dtype=mask.dtype)])
            logits = target(input_ids=seq[None, :-1], attention_mask=m[None, :-1],
                            position_ids=prompt_positions(m[None, :-1])).logits[0, -4:]  # [4, V]
            want = torch.stack([VOCAB.level_logits(logits[l, VOCAB.offset:], l) for l in range(4)])
            torch.testing.assert_close(got[b, k], want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("ids_kind", ["random", "last_code_decided_by_the_trie"])
def test_beam_search_keeps_the_distributions_teacher_forcing_gives_along_its_beams(ids_kind):
    if ids_kind == "random":
        trie, target, _, ids, mask = world()
        vocab = VOCAB
    else:  # no last step calls the model: its kept distribution must still be the model's (0 on one code)
        vocab = CodeVocab(levels=4, codebook_size=16)
        prefixes = random_ids(300, 3, 16, seed=0)  # distinct: every item is alone under its first 3 codes
        codes = torch.cat([prefixes, torch.zeros(300, 1, dtype=torch.long)], 1)
        trie, target = CodeTrie(codes, 16, item_offset=1), random_lm(vocab.size, 0)
        ids, mask = random_prompts(torch.cat([torch.full((1, 4), -1), codes]), vocab, 3, 5, 0)
    beams = beam_search(target, trie, vocab, ids, mask, 6, keep_logprobs=True)
    valid = beams.items > 0
    want = masked_log_softmax(beam_code_logits(target, vocab, ids, mask, beams.codes), allowed_along(trie, beams.codes))
    got = beams.code_logprobs  # [3, 6, 4, C]
    assert valid.sum() >= 12 and torch.equal(got[valid].isinf(), want[valid].isinf())
    torch.testing.assert_close(got[valid].nan_to_num(neginf=0), want[valid].nan_to_num(neginf=0), atol=1e-4, rtol=1e-4)
    if ids_kind != "random":
        assert beams.forward_calls == 3  # the 4th code came from the trie alone


def test_teacher_data_round_trips_the_targets_distributions_through_its_packed_storage():
    trie, target, _, ids, mask = world()
    beams = beam_search(target, trie, VOCAB, ids, mask, 6)
    codes = beams.codes
    allowed = allowed_along(trie, codes)
    logp = masked_log_softmax(beam_code_logits(target, VOCAB, ids, mask, codes), allowed)
    stored = allowed & stored_positions(*codes.shape).unsqueeze(-1)
    tensors = finish({"users": torch.tensor([1, 2, 3]), "items": torch.tensor([7, 8, 9]), "lengths": torch.tensor([4, 4, 2]),
                      "codes": codes.to(torch.int16), "valid": torch.ones(3, 6, dtype=torch.uint8),
                      "counts": stored.flatten(1).sum(1), "values": logp[stored].half()})
    data = TeacherData(tensors)
    order = torch.tensor([2, 0])  # any subset, any order
    batch = data.batch(order, trie)
    assert torch.equal(batch.codes, codes[order]) and torch.equal(batch.allowed, allowed[order])
    torch.testing.assert_close(batch.target_logp, logp[order].half().float())
    found = data.lookup(torch.tensor([3, 1, 1, 1]), torch.tensor([9, 7, 7, 8]), torch.tensor([2, 4, 3, 4]))
    assert found.tolist() == [2, 0, -1, -1]  # user, target item and history length must all match


def test_alignment_samples_are_each_users_latest_rows():
    users = torch.tensor([1, 1, 1, 2, 2, 3])  # RecBole's rows: a user's prefixes in time order
    assert select_samples(users, 2).tolist() == [1, 2, 3, 4, 5]
    assert select_samples(users, 1).tolist() == [2, 4, 5]
    assert select_samples(users, 0).tolist() == list(range(6))


def test_alignment_samples_of_a_user_sample_are_those_users_latest_rows_the_same_each_run():
    users = torch.arange(50).repeat_interleave(3)  # 50 users, 3 rows each, in time order
    rows = select_samples(users, 1, max_users=10, seed=7)
    assert len(rows) == 10 and len(set(users[rows].tolist())) == 10
    assert all(int(r) % 3 == 2 for r in rows)  # each drawn user's latest row
    assert torch.equal(rows, select_samples(users, 1, max_users=10, seed=7))
    assert not torch.equal(rows, select_samples(users, 1, max_users=10, seed=8))
    assert len(select_samples(users, 0, max_users=10, seed=7)) == 30  # every row of the drawn users
    assert torch.equal(select_samples(users, 1, max_users=50, seed=7), select_samples(users, 1))


class FakeTarget:
    """The parts of GenRec that the alignment losses use, over a random LM and catalog."""
    USER_ID, ITEM_SEQ_LEN, POS_ITEM_ID = "user_id", "item_length", "item_id"

    def __init__(self, trie, lm, ids, mask):
        self.trie, self.lm, self.vocab, self._prompt = trie, lm, VOCAB, (ids, mask)
        self.item_codes = torch.cat([torch.full((1, 4), -1), trie.codes])

    def prompt(self, inter):
        return self._prompt


def teacher_world():
    """(trie, target, draft, FakeTarget, teacher data of its 3 prompts' top-4 beams, their codes)."""
    trie, target, draft, ids, mask = world()
    beams = beam_search(target, trie, VOCAB, ids, mask, 4)
    allowed = allowed_along(trie, beams.codes)
    logp = masked_log_softmax(beam_code_logits(target, VOCAB, ids, mask, beams.codes), allowed)
    stored = allowed & stored_positions(*beams.codes.shape).unsqueeze(-1)
    teacher = TeacherData(finish({"users": torch.arange(3), "items": torch.arange(3), "lengths": torch.full((3,), 5),
                                  "codes": beams.codes, "valid": torch.ones(3, 4), "counts": stored.flatten(1).sum(1),
                                  "values": logp[stored].half()}))
    return trie, target, draft, FakeTarget(trie, target, ids, mask), teacher, beams.codes


@pytest.mark.parametrize("name", [n for n in ALIGN_LOSSES if n != "none"])
def test_every_align_loss_is_finite_and_trains_the_draft_only(name):
    trie, target, draft, fake, teacher, _ = teacher_world()
    cfg = AlignConfig(name=name, alpha=0.7, tau=1.0, beta=1.0, k=4, k_train=4, divergence="tvd")
    inter = {"item_id": torch.tensor([1, 7, 30])}
    loss = align_loss(cfg, fake, draft, inter, teacher, torch.arange(3))
    assert torch.isfinite(loss) and loss > 0
    target.zero_grad(), draft.zero_grad()
    loss.backward()
    assert all(p.grad is None for p in target.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in draft.parameters())


def test_first_code_kl_adds_the_forward_kl_of_the_targets_first_code_to_l_align():
    trie, target, draft, fake, teacher, codes = teacher_world()
    cfg = AlignConfig(name="atspeed_r", alpha=0.7, tau=1.0, beta=1.0, k=4, k_train=4, divergence="tvd")
    inter = {"item_id": torch.tensor([1, 7, 30])}
    plain = align_loss(cfg, fake, draft, inter, teacher, torch.arange(3))
    with_kl = align_loss(dataclasses.replace(cfg, first_code_kl=0.5), fake, draft, inter, teacher, torch.arange(3))
    first = allowed_along(trie, codes)[:, 0, 0]  # [3, C] every 1st code the trie allows
    log_p = masked_log_softmax(teacher.batch(torch.arange(3), trie).target_logp[:, 0, 0], first)
    log_q = masked_log_softmax(beam_code_logits(draft, VOCAB, fake._prompt[0], fake._prompt[1], codes)[:, 0, 0], first)
    kl = (log_p.exp() * (log_p - log_q).nan_to_num(posinf=0.0, neginf=0.0)).sum(-1).mean()  # KL(p || q), mean over samples
    assert (with_kl - plain).item() == pytest.approx(0.5 * kl.item(), rel=1e-4)


def test_first_code_kl_is_refused_for_a_loss_without_teacher_distributions():
    config = {"align_loss": "wordkd", "alpha": 0.7, "tau": 1.0, "beta": 1.0, "K_train": 4,
              "distillspec_divergence": "tvd", "first_code_kl": 1.0}
    with pytest.raises(ConfigError, match="first_code_kl=1.0 needs .* fix: --align_loss=atspeed_r"):
        AlignConfig.from_config(config, k=4)


def test_the_draft_that_equals_the_target_has_zero_atspeed_losses():
    trie, target, _, ids, mask = world()
    fake = FakeTarget(trie, target, ids, mask)
    index = SampleIndex(torch.arange(3), torch.arange(3), torch.full((3,), 5))
    for name in ("tvd", "wordkd", "distillspec"):  # computed online from the same model: exactly 0
        loss = align_loss(AlignConfig(name=name, alpha=0.7, tau=1.0, beta=1.0, k=4, k_train=4, divergence="tvd"), fake, target, {"item_id": torch.tensor([1, 2, 3])},
                          index, torch.arange(3))
        assert loss.item() == pytest.approx(0.0, abs=1e-6), name


# ---- staged runs through the runner --------------------------------------------------------------
def stage_files(saved):
    return {p.name: p.stat().st_mtime_ns for p in saved.glob("*.safetensors")}


@pytest.fixture
def trained_epochs(monkeypatch):
    """The (model, epoch) of every training epoch that runs from here on."""
    from atspeed_rec.recbole_glue import trainer as trainer_module
    real, seen = trainer_module.SafeCheckpointTrainer._train_epoch, []

    def recorded(self, train_data, epoch_idx, *args, **kwargs):
        seen.append((self.config["model"], epoch_idx))
        return real(self, train_data, epoch_idx, *args, **kwargs)

    monkeypatch.setattr(trainer_module.SafeCheckpointTrainer, "_train_epoch", recorded)
    return seen


def test_a_rerun_reuses_every_cached_stage(synth_root, in_tmp_dir, trained_epochs):
    assert run(synth_root, "AtSpeedR", in_tmp_dir / "a.json") == 0
    first = stage_files(in_tmp_dir / "saved")
    assert {n.split("-")[0] for n in first} == {"GenRec", "teacher", "AtSpeedR"}
    assert {model for model, _ in trained_epochs} == {"GenRec", "AtSpeedR"}
    trained_epochs.clear()
    assert run(synth_root, "AtSpeedR", in_tmp_dir / "b.json") == 0
    assert stage_files(in_tmp_dir / "saved") == first  # nothing retrained, regenerated or rewritten
    assert trained_epochs == []
    a, b = (json.loads((in_tmp_dir / f).read_text())["test"] for f in ("a.json", "b.json"))
    assert a["recall@10"] == b["recall@10"]


def test_an_interrupted_draft_stage_resumes_from_its_last_epoch(synth_root, in_tmp_dir, trained_epochs):
    assert run(synth_root, "AtSpeedS", in_tmp_dir / "a.json", draft_epochs=3) == 0
    draft = next((in_tmp_dir / "saved").glob("AtSpeedS-*.safetensors"))
    meta = json.loads(draft.with_name(draft.name + ".json").read_text())
    meta.pop("complete")  # as if the run had stopped after its best epoch
    draft.with_name(draft.name + ".json").write_text(json.dumps(meta))
    trained_epochs.clear()
    assert run(synth_root, "AtSpeedS", in_tmp_dir / "b.json", draft_epochs=3) == 0
    assert trained_epochs == [("AtSpeedS", e) for e in range(meta["epoch"] + 1, 3)]  # the target is reused


def test_a_draft_whose_vocabulary_does_not_match_the_target_is_refused(synth_root, in_tmp_dir, capsys):
    other = random_lm(CodeVocab(levels=4, codebook_size=16).size, 0, layers=1)  # IDs of 16 codes, not 8
    save_model(other, str(in_tmp_dir / "draft.safetensors"))
    assert run(synth_root, "AtSpeedS", in_tmp_dir / "x.json", draft_checkpoint=in_tmp_dir / "draft.safetensors") == 2
    err = capsys.readouterr().err
    assert "vocabulary of 65 tokens, the target 33" in err and "--draft_checkpoint" in err


def test_the_draft_validates_on_the_requested_users_and_width_and_the_test_decodes_at_num_beams(
        synth_root, in_tmp_dir, monkeypatch):
    from atspeed_rec.recbole_glue.atspeed import AtSpeedS
    real, decoded = AtSpeedS.full_sort_predict, []

    def recorded(self, interaction):
        decoded.append((self.eval_beams, len(interaction)))
        return real(self, interaction)

    monkeypatch.setattr(AtSpeedS, "full_sort_predict", recorded)
    assert run(synth_root, "AtSpeedS", in_tmp_dir / "a.json", draft_valid_requests=30, draft_valid_beams=5,
               draft_epochs=1) == 0
    valid = [n for k, n in decoded if k == 5]
    test = [n for k, n in decoded if k == 20]
    assert sum(valid) == 30 and sum(test) == 120 and len(valid) + len(test) == len(decoded)

def test_an_unknown_align_loss_is_refused_with_the_valid_names(synth_root, in_tmp_dir, capsys):
    assert run(synth_root, "AtSpeedS", in_tmp_dir / "x.json", align_loss="kd") == 2
    err = capsys.readouterr().err
    assert "align_loss='kd' is unknown" in err and "atspeed_s" in err


def test_the_staged_atspeed_run_works_on_two_distributed_processes(synth_root, in_tmp_dir):
    assert run(synth_root, "AtSpeedR", in_tmp_dir / "ddp.json", nproc=2) == 0
    result = json.loads((in_tmp_dir / "ddp.json").read_text())
    assert result["nproc"] == 2 and {"speedup", "accepted_steps"} <= set(result["test"])
    assert len(list((in_tmp_dir / "saved").glob("teacher-*.safetensors"))) == 1  # both ranks' shares, one file
