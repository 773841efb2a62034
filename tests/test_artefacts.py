"""Trained artefacts: never reused on other data, never used when damaged, loadable by their users."""

import json

import pytest


from test_atspeed import run


def saved_files(root, prefix):
    return sorted(p for p in (root / "saved").glob(f"{prefix}-*.safetensors") if ".resume" not in p.name)


def test_a_draft_written_by_an_atspeed_run_loads_as_draft_checkpoint(synth_root, in_tmp_dir):
    assert run(synth_root, "AtSpeedS", in_tmp_dir / "a.json") == 0  # tied draft embeddings (the default)
    checkpoint = saved_files(in_tmp_dir, "AtSpeedS")[0]
    assert run(synth_root, "AtSpeedS", in_tmp_dir / "b.json", draft_checkpoint=checkpoint, draft_epochs=0) == 0
    a, b = (json.loads((in_tmp_dir / f).read_text())["test"] for f in ("a.json", "b.json"))
    assert a["recall@10"] == b["recall@10"] and a["accepted_steps"] == b["accepted_steps"]


def test_a_text_file_as_draft_checkpoint_is_refused_with_the_fix(synth_root, in_tmp_dir, capsys):
    (in_tmp_dir / "notes.txt").write_text("not weights")
    assert run(synth_root, "AtSpeedS", in_tmp_dir / "x.json", draft_checkpoint=in_tmp_dir / "notes.txt") == 2
    err = capsys.readouterr().err
    assert "not a readable safetensors file" in err and "fix:" in err and "Traceback" not in err


def test_a_truncated_target_is_named_with_the_fix_never_used(synth_root, in_tmp_dir, capsys):
    assert run(synth_root, "GenRec", in_tmp_dir / "a.json") == 0
    target = saved_files(in_tmp_dir, "GenRec")[0]
    target.write_bytes(target.read_bytes()[:-100])
    assert run(synth_root, "GenRec", in_tmp_dir / "b.json") == 2
    err = capsys.readouterr().err
    assert "truncated or corrupted" in err and target.name in err and "fix: delete it" in err


def test_edited_interactions_train_a_new_target_instead_of_reusing_the_old_one(tmp_path, in_tmp_dir):
    from synthetic import make_dataset
    root = make_dataset(tmp_path / "data")
    assert run(root, "GenRec", in_tmp_dir / "a.json") == 0
    inter = root / "synth" / "synth.inter"
    lines = inter.read_text().splitlines()
    inter.write_text("\n".join(lines[:-1]) + "\n")  # the last interaction removed: same items
    assert run(root, "GenRec", in_tmp_dir / "b.json") == 0
    assert len(saved_files(in_tmp_dir, "GenRec")) == 2  # a second target, keyed by the new data


def test_a_rerun_never_overwrites_a_finished_target_it_reuses_it(synth_root, in_tmp_dir, monkeypatch):
    from atspeed_rec.recbole_glue import trainer as trainer_module
    assert run(synth_root, "GenRec", in_tmp_dir / "a.json") == 0
    target = saved_files(in_tmp_dir, "GenRec")[0]
    before = target.stat().st_mtime_ns, target.read_bytes()
    monkeypatch.setattr(trainer_module.SafeCheckpointTrainer, "_train_epoch",
                        lambda *a, **k: pytest.fail("a finished target was trained again"))
    assert run(synth_root, "GenRec", in_tmp_dir / "b.json") == 0  # the same command: reused, then tested
    assert (target.stat().st_mtime_ns, target.read_bytes()) == before
    a, b = (json.loads((in_tmp_dir / f).read_text())["test"] for f in ("a.json", "b.json"))
    assert a == b
