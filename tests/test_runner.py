"""The RecBole runner: baselines, result files, clear errors, distributed runs."""

import json
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from atspeed_rec.recbole_glue.cli import main, parse_args
from atspeed_rec.recbole_glue.runner import _free_port, build_config, spawn_ranks


def run_cli(root, *args):
    return main(["--dataset=synth", f"--data_path={root}", f"--config_files={root / 'synth.yaml'}",
                 "--epochs=1", *args])


@pytest.mark.parametrize("model", ["SASRec", "GRU4Rec", "BERT4Rec"])
def test_each_baseline_trains_one_epoch_and_writes_its_metrics(model, synth_root, in_tmp_dir):
    out = in_tmp_dir / "result.json"
    assert run_cli(synth_root, f"--model={model}", f"--result_file={out}") == 0
    result = json.loads(out.read_text())
    assert result["model"] == model and result["dataset"] == "synth"
    for split in ("best_valid", "test"):
        assert set(result[split]) == {f"{m}@{k}" for m in ("recall", "ndcg") for k in (5, 10, 20)}
        assert all(0.0 <= v <= 1.0 for v in result[split].values())
    assert result["test"]["recall@20"] >= result["test"]["recall@5"]
    assert result["wall_time_s"] > 0
    assert result["config"]["eval_args"]["split"] == {"LS": "valid_and_test"}
    assert result["config"]["valid_metric"] == "NDCG@10"


def test_overrides_are_parsed_as_recbole_reads_them():
    args, overrides = parse_args(["--model=SASRec", "--epochs=3", "--learning_rate=1e-4",
                                  "--topk=[5,10]", "--reproducibility=false", "--loss_type=CE",
                                  "--data_path=/x"])
    assert args.model == "SASRec"
    assert overrides == {"epochs": 3, "learning_rate": 1e-4, "topk": [5, 10],
                         "reproducibility": False, "loss_type": "CE", "data_path": "/x"}


def test_a_list_of_words_is_read_as_in_the_property_files():
    _, overrides = parse_args(["--lora_targets=[q_proj, v_proj]", "--tree_candidates=[[20,1,1],[40,1,1]]",
                               "--sid_text_fields=['title']", "--note=[unclosed"])
    assert overrides == {"lora_targets": ["q_proj", "v_proj"], "tree_candidates": [[20, 1, 1], [40, 1, 1]],
                         "sid_text_fields": ["title"], "note": "[unclosed"}


def test_an_unknown_model_is_refused_with_the_list_of_models(synth_root, in_tmp_dir, capsys):
    assert run_cli(synth_root, "--model=SASRek") == 2
    err = capsys.readouterr().err
    assert "unknown model 'SASRek'" in err and "Did you mean SASRec" in err
    assert "GRU4Rec" in err and "--model=" in err and "lightgbm" not in err


def test_a_dataset_that_is_not_on_disk_names_the_folder_and_the_fix(tmp_path, in_tmp_dir, capsys):
    assert main(["--model=SASRec", "--dataset=no-such-data", f"--data_path={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "no-such-data" / "no-such-data.inter") in err
    assert "--data_path" in err and "Traceback" not in err


def test_a_known_dataset_that_cannot_be_downloaded_fails_clearly(tmp_path, in_tmp_dir, capsys, monkeypatch):
    import urllib.request

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    assert main(["--model=SASRec", "--dataset=amazon-beauty", f"--data_path={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "download" in err and str(tmp_path / "amazon-beauty") in err and "--data_path" in err


def test_a_missing_config_file_is_named(synth_root, in_tmp_dir, capsys):
    assert main(["--model=SASRec", "--dataset=synth", "--config_files=nowhere.yaml"]) == 2
    assert "nowhere.yaml" in capsys.readouterr().err


def test_a_valid_metric_outside_topk_is_a_configuration_error(synth_root, in_tmp_dir, capsys):
    assert run_cli(synth_root, "--model=SASRec", "--valid_metric=NDCG@50") == 2
    assert "valid_metric NDCG@50 is not among topk" in capsys.readouterr().err


def test_ce_loss_with_negative_sampling_is_a_configuration_error(synth_root, in_tmp_dir, capsys):
    negs = "--train_neg_sample_args={'distribution': 'uniform', 'sample_num': 1}"
    assert run_cli(synth_root, "--model=SASRec", negs) == 2
    assert "should be None when the loss_type is CE" in capsys.readouterr().err


def test_two_process_distributed_run_on_cpu_reports_metrics(synth_root, in_tmp_dir):
    out = in_tmp_dir / "ddp.json"
    assert run_cli(synth_root, "--model=SASRec", "--nproc=2", f"--result_file={out}") == 0
    result = json.loads(out.read_text())
    assert result["nproc"] == 2
    assert result["config"]["world_size"] == 2
    assert 0.0 <= result["test"]["ndcg@10"] <= 1.0


@pytest.mark.skipif(not Path("/proc/sys/net/ipv4/ip_local_port_range").exists(), reason="Linux's port ranges")
def test_rank_zero_listens_below_the_ephemeral_ports_a_connecting_rank_may_be_given():
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {_free_port() for _ in range(20)}
    assert all(1024 <= port < low for port in ports) and len(ports) > 1


def hang(rank: int, folder: str) -> None:
    Path(folder, str(rank)).touch()
    time.sleep(3600)


def test_an_interrupted_distributed_run_prints_each_ranks_stack_and_ends_every_rank(tmp_path, capfd):
    def interrupt_once_both_ranks_run():
        deadline = time.time() + 120
        while len(list(tmp_path.iterdir())) < 2 and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C; the kernel may hand it to this thread, not the main one

    # Ctrl-C raises KeyboardInterrupt, whatever earlier tests in this process did to its handling
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    threading.Thread(target=interrupt_once_both_ranks_run, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            spawn_ranks(hang, 2, (str(tmp_path),))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert not multiprocessing.active_children()  # nothing left to hang the interpreter's exit
    assert capfd.readouterr().err.count("in hang") == 2  # each rank's stack, for the bug report


def test_a_dataset_file_sizes_the_model_budget_as_in_recbole():
    config = build_config("GenRec", "ml-100k")
    assert config["epochs"] == 4  # properties/dataset/ml-100k.yaml, over GenRec.yaml's 12
    assert config["n_layers"] == 4  # from GenRec.yaml, untouched by the dataset file
    assert build_config("AtSpeedR", "ml-100k")["align_loss"] == "atspeed_r"  # AtSpeedR.yaml over AtSpeedS.yaml


def test_a_users_own_dataset_without_a_property_file_trains_under_the_protocol(tmp_path, in_tmp_dir):
    from synthetic import make_dataset
    root = make_dataset(tmp_path / "mine", name="mydata", n_users=60)  # .inter with user, item, timestamp
    out = in_tmp_dir / "r.json"
    for model in ("SASRec", "GenRec"):
        assert main([f"--model={model}", "--dataset=mydata", f"--data_path={root}", "--epochs=1",
                     "--hidden_size=32", "--n_layers=1", "--n_heads=2", "--inner_size=64", "--sid_codebook_size=8",
                     "--show_progress=False", f"--result_file={out}"]) == 0
        result = json.loads(out.read_text())
        assert result["config"]["load_col"]["inter"] == ["user_id", "item_id", "timestamp"]
        assert 0 <= result["test"]["ndcg@10"] <= 1


def test_a_dataset_without_timestamps_is_refused_with_the_fix(tmp_path, in_tmp_dir, capsys):
    folder = tmp_path / "notime"
    folder.mkdir()
    (folder / "notime.inter").write_text("user_id:token\titem_id:token\n" +
                                         "".join(f"u{u}\ti{(u + k) % 9}\n" for u in range(20) for k in range(6)))
    assert main(["--model=SASRec", "--dataset=notime", f"--data_path={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "'timestamp' is not loaded" in err and "fix: add a 'timestamp:float' column" in err
    assert "Traceback" not in err
