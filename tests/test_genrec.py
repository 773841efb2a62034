"""GenRec, the target LM recommender, through RecBole."""

import json

import torch
from recbole.data import create_dataset, data_preparation

from atspeed_rec.recbole_glue.genrec import GenRec, length_groups
from atspeed_rec.recbole_glue.checkpoint import load_checkpoint, save_checkpoint
from atspeed_rec.recbole_glue.cli import main
from atspeed_rec.recbole_glue.runner import build_config
from atspeed_rec.recbole_glue.trainer import cosine_schedule
from packing import packed_and_alone

SMALL = {"n_layers": 1, "hidden_size": 32, "n_heads": 2, "inner_size": 64,
         "sid_codebook_size": 8, "sid_source": "collaborative"}


def small_genrec(root, **overrides):
    config = build_config("GenRec", "synth", [str(root / "synth.yaml")],
                          {"data_path": str(root), **SMALL, **overrides})
    data = create_dataset(config)
    train, valid, test = data_preparation(config, data)
    torch.manual_seed(0)
    return GenRec(config, train._dataset).eval(), train, test


def test_genrec_trains_one_epoch_through_the_runner(synth_root, in_tmp_dir):
    out = in_tmp_dir / "genrec.json"
    args = [f"--{k}={v}" for k, v in SMALL.items()]
    code = main(["--model=GenRec", "--dataset=synth", f"--data_path={synth_root}",
                 f"--config_files={synth_root / 'synth.yaml'}", "--epochs=1", f"--result_file={out}", *args])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["model"] == "GenRec"
    assert 0.0 <= result["test"]["ndcg@10"] <= 1.0
    saved = list((in_tmp_dir / "saved").glob("GenRec-synth-*.safetensors"))
    assert len(saved) == 1 and not list((in_tmp_dir / "saved").glob("*.pth"))  # no pickles
    meta = json.loads(saved[0].with_name(saved[0].name + ".json").read_text())
    assert meta["config"]["hidden_size"] == 32


def test_the_training_loss_decreases_on_one_batch(synth_root, in_tmp_dir):
    model, train, _ = small_genrec(synth_root)
    model.train()
    assert model.lm.config.vocab_size == 1 + 4 * 8
    batch = next(iter(train))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model.calculate_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_packing_windows_into_shared_rows_changes_neither_the_loss_nor_the_gradients(synth_root, in_tmp_dir,
                                                                                     monkeypatch):
    model, train, _ = small_genrec(synth_root)  # eval mode: no dropout, so both passes compute the same
    (packed, packed_grads), (alone, alone_grads) = packed_and_alone(model, next(iter(train)), monkeypatch)
    torch.testing.assert_close(packed, alone)
    assert packed_grads.keys() == alone_grads.keys() and packed_grads
    for name, grad in alone_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-6, rtol=1e-5)


def test_full_sort_scores_rank_the_beam_items_first(synth_root, in_tmp_dir):
    model, _, test = small_genrec(synth_root)
    batch = next(iter(test))[0]
    with torch.no_grad():
        scores = model.full_sort_predict(batch)  # [B, n_items]
        beams = model.generate(batch)
    assert scores.shape == (len(batch), model.n_items)
    assert torch.isfinite(scores).all()
    top = scores.topk(model.num_beams, dim=1).indices
    assert torch.equal(top, beams.items)  # RecBole's ranking = the beam order
    assert (beams.items > 0).all()


def test_a_batch_decoded_in_length_groups_ranks_as_the_whole_batch_does(synth_root, in_tmp_dir):
    model, _, test = small_genrec(synth_root)
    batch = next(iter(test))[0]
    _, mask = model.prompt(batch)
    groups = length_groups(mask, 3)
    lengths = [mask[rows].sum(1) for rows in groups]
    assert sorted(torch.cat(groups).tolist()) == list(range(len(mask)))  # every request once
    assert all(a.max() <= b.min() for a, b in zip(lengths, lengths[1:])) and lengths[0].min() < lengths[-1].max()
    with torch.no_grad():
        model.eval_length_buckets = 1
        whole = model.full_sort_predict(batch)
        model.eval_length_buckets = 3
        grouped = model.full_sort_predict(batch)
    k = model.num_beams
    assert torch.equal(grouped.topk(k).indices, whole.topk(k).indices)  # the same lists, in order
    torch.testing.assert_close(grouped, whole, atol=1e-5, rtol=2e-6)


def test_predict_scores_the_log_probability_of_an_items_codes(synth_root, in_tmp_dir):
    model, _, test = small_genrec(synth_root)
    batch = next(iter(test))[0]
    with torch.no_grad():
        beams = model.generate(batch)
        batch.interaction["item_id"] = beams.items[:, 0]  # the best beam's item
        torch.testing.assert_close(model.predict(batch), beams.scores[:, 0], atol=1e-4, rtol=1e-4)


def test_a_saved_and_reloaded_model_recommends_the_same_items(synth_root, in_tmp_dir):
    model, _, test = small_genrec(synth_root)
    batch = next(iter(test))[0]
    save_checkpoint(model, in_tmp_dir / "m.safetensors", {"note": "round trip"})
    torch.manual_seed(123)
    other, _, _ = small_genrec(synth_root)
    for p in other.parameters():
        p.data.normal_()
    meta = load_checkpoint(other, in_tmp_dir / "m.safetensors")
    assert meta["note"] == "round trip" and len(meta["sha256"]) == 64
    with torch.no_grad():
        a, b = model.generate(batch), other.eval().generate(batch)
    assert torch.equal(a.items, b.items) and torch.equal(a.scores, b.scores)


def test_a_beam_width_below_the_largest_topk_is_refused(synth_root, in_tmp_dir, capsys):
    code = main(["--model=GenRec", "--dataset=synth", f"--data_path={synth_root}",
                 f"--config_files={synth_root / 'synth.yaml'}", "--num_beams=10"])
    assert code == 2
    err = capsys.readouterr().err
    assert "num_beams=10" in err and "topk cut-off 20" in err and "--num_beams=20" in err


def test_heads_that_do_not_divide_the_width_are_refused(synth_root, in_tmp_dir, capsys):
    code = main(["--model=GenRec", "--dataset=synth", f"--data_path={synth_root}",
                 f"--config_files={synth_root / 'synth.yaml'}", "--hidden_size=30", "--n_heads=4"])
    assert code == 2
    assert "not divisible by n_heads" in capsys.readouterr().err


def test_the_cosine_schedule_decays_to_zero_and_resumes_where_it_stood():
    def optimizer():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)

    whole = optimizer()
    cosine_schedule(whole, total_steps=10)
    lrs = []
    for _ in range(10):
        whole.step()
        lrs.append(whole.param_groups[0]["lr"])
    assert abs(lrs[4] - 0.05) < 1e-12 and lrs[-1] < 1e-12  # half-way: half the lr; the end: 0
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    resumed = optimizer()
    cosine_schedule(resumed, total_steps=10, steps_done=6)  # an interrupted run, 6 steps in
    assert abs(resumed.param_groups[0]["lr"] - lrs[5]) < 1e-12
    resumed.step()
    assert abs(resumed.param_groups[0]["lr"] - lrs[6]) < 1e-12


def test_an_unknown_lr_schedule_is_refused(synth_root, in_tmp_dir, capsys):
    code = main(["--model=GenRec", "--dataset=synth", f"--data_path={synth_root}",
                 f"--config_files={synth_root / 'synth.yaml'}", "--lr_schedule=linear"])
    assert code == 2
    err = capsys.readouterr().err
    assert "lr_schedule='linear'" in err and "cosine" in err


def test_a_killed_run_resumes_with_its_optimizer_state_from_the_next_epoch(synth_root, in_tmp_dir, monkeypatch):
    from atspeed_rec.recbole_glue import trainer as trainer_module
    real_epoch = trainer_module.SafeCheckpointTrainer._train_epoch
    seen = []

    def killed_in_epoch_one(self, train_data, epoch_idx, *args, **kwargs):
        if epoch_idx == 1:
            raise KeyboardInterrupt  # the kernel, Ctrl-C or the end of a session, mid-epoch
        return real_epoch(self, train_data, epoch_idx, *args, **kwargs)

    def recorded(self, train_data, epoch_idx, *args, **kwargs):
        state = self.optimizer.state_dict()["state"]
        seen.append((epoch_idx, int(next(iter(state.values()))["step"]) if state else 0, len(train_data)))
        return real_epoch(self, train_data, epoch_idx, *args, **kwargs)

    args = ["--model=GenRec", "--dataset=synth", f"--data_path={synth_root}",
            f"--config_files={synth_root / 'synth.yaml'}", "--epochs=3", "--eval_step=0",
            *[f"--{k}={v}" for k, v in SMALL.items()]]
    monkeypatch.setattr(trainer_module.SafeCheckpointTrainer, "_train_epoch", killed_in_epoch_one)
    try:
        main(args)
    except KeyboardInterrupt:
        pass
    resume = list((in_tmp_dir / "saved").glob("*.resume.safetensors"))
    assert len(resume) == 1  # the state after epoch 0

    monkeypatch.setattr(trainer_module.SafeCheckpointTrainer, "_train_epoch", recorded)
    assert main(args) == 0  # the same command
    assert [epoch for epoch, _, _ in seen] == [1, 2]  # epoch 0 is not trained again
    _, adam_steps, steps_per_epoch = seen[0]
    assert adam_steps == steps_per_epoch  # AdamW's moments and step count came back
    assert not list((in_tmp_dir / "saved").glob("*.resume*"))  # finished: only the final checkpoint
    saved = next((in_tmp_dir / "saved").glob("GenRec-synth-*.safetensors"))
    assert json.loads(saved.with_name(saved.name + ".json").read_text())["complete"]
