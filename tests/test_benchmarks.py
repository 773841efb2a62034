"""Every benchmark script runs end to end on the synthetic dataset (tiny settings) and writes its report."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from atspeed_rec.decoding.beam_search import beam_search as target_beam_search
from atspeed_rec.recbole_glue.cli import main as run_recbole
from test_atspeed import SMALL
from test_genrec_pretrained import TINY, save_tiny_lm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import accuracy  # noqa: E402
import alignment  # noqa: E402
import beam_search  # noqa: E402
import breakdown  # noqa: E402
import ceiling  # noqa: E402
import common  # noqa: E402
import decoders  # noqa: E402
import early_exit  # noqa: E402
import frontier  # noqa: E402
import fused  # noqa: E402
import length_groups  # noqa: E402
import precision  # noqa: E402
import prefix  # noqa: E402
import relaxed_inclusion  # noqa: E402
import semantic_ids  # noqa: E402
import shortcuts  # noqa: E402
import speculative  # noqa: E402
import tuning  # noqa: E402


def run_args(root, tmp, *extra):
    """run_recbole.py's arguments for the synthetic dataset, tiny requests, the report in `tmp`."""
    return ["--dataset=synth", f"--data_path={root}", f"--config_files={root / 'synth.yaml'}",
            *[f"--{k}={v}" for k, v in SMALL.items()], f"--output={tmp / 'table.md'}", *extra]


def tables(path: Path) -> list[list[dict]]:
    """The markdown tables of a report, each a list of {column: cell} rows."""
    out, rows = [], None
    for line in path.read_text().splitlines():
        if not line.startswith("|"):
            rows = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if rows is None:
            header, rows = cells, []
            out.append(rows)
        elif set("".join(cells)) != {"-"}:
            rows.append(dict(zip(header, cells)))
    return out


def number(cell: str) -> float:
    return float(cell.rstrip("x"))


def test_speculative_times_every_mode_k_and_batch_and_scores_them_with_recbole(synth_root, in_tmp_dir):
    argv = run_args(synth_root, in_tmp_dir, f"--plot={in_tmp_dir / 'plot.png'}", "--allow_untrained",
                    "--ks=1,3", "--batches=1,2", "--requests=4", "--warmup=1")
    assert speculative.main(argv) == 0
    speed, accuracy = tables(in_tmp_dir / "table.md")
    assert sorted((r["mode"], r["K"], r["batch"]) for r in speed) == sorted(
        (m, k, b) for m in ("strict", "relaxed") for k in ("1", "3") for b in ("1", "2"))
    for r in speed:
        assert number(r["speedup vs ours"]) > 0 and number(r["speedup vs HF"]) > 0
        assert number(r["mean ratio vs ours"]) > 0
        assert number(r["speedup vs beam search"]) > 0
        assert 0 <= number(r["accepted steps"]) <= 3
        if r["mode"] == "strict":  # the baseline is the beam search itself
            assert r["beam search ms"] == r["ours ms"]
    for r in speed:  # strict speculative decoding returns exactly the target's beams
        if r["mode"] == "strict":
            done, total = r["identical"].split("/")
            assert done == total
    by_key = {(r["mode"], r["K"], r["batch"], r["decoding"]): r for r in accuracy}
    assert len(by_key) == len(accuracy) == 4 * (2 + 3)  # strict: SD, beam_search; relaxed: + beam_sample
    for k in ("1", "3"):  # synth's topk is 5, 10, 20: a top-1 or top-3 list is scored at K itself
        row = by_key["strict", k, "1", "speculative"]
        assert 0 <= float(row[f"recall@{k}"]) <= 1 and 0 <= float(row[f"ndcg@{k}"]) <= 1
        other = {"1": "3", "3": "1"}[k]
        assert row[f"recall@{other}"] == "–" and "recall@5" not in row
        for batch in ("1", "2"):
            target = by_key["strict", k, batch, "beam_search"]
            assert by_key["strict", k, batch, "speculative"][f"recall@{k}"] == target[f"recall@{k}"]
    assert (in_tmp_dir / "plot.png").stat().st_size > 0


def test_a_relaxed_temperature_is_a_decoding_setting_of_the_benchmark(synth_root, in_tmp_dir):
    argv = run_args(synth_root, in_tmp_dir, f"--plot={in_tmp_dir / 'plot.png'}", "--allow_untrained", "--ks=3",
                    "--batches=1", "--requests=2", "--warmup=1", "--skip_hf", "--modes=relaxed", "--temperature=0.25")
    assert speculative.main(argv) == 0
    assert "sample_temperature: 0.25" in (in_tmp_dir / "table.md").read_text()
    with pytest.raises(SystemExit, match="--temperature=0"):
        speculative.main([*argv[:-1], "--temperature=0"])


def test_each_k_is_decoded_on_the_tree_trees_names_for_it(synth_root, in_tmp_dir):
    argv = run_args(synth_root, in_tmp_dir, "--allow_untrained", "--ks=1,3,5", "--batches=1", "--requests=2",
                    "--warmup=1", "--skip_hf", "--modes=strict", "--trees=1:2:3,5:6:1:2", "--draft_beams=6",
                    "--gamma=2")
    assert speculative.main(argv) == 0
    speed, _ = tables(in_tmp_dir / "table.md")
    assert [(r["K"], r["N"], r["gamma"], r["draft start"]) for r in speed] == [
        ("1", "2", "3", "0"), ("3", "6", "2", "0"), ("5", "6", "1", "2")]
    assert speed[2]["acceptance by code"].startswith("- / - / ")  # codes 1 and 2: the target's own steps
    assert (in_tmp_dir / "table.png").stat().st_size > 0  # the plot goes beside a custom --output
    with pytest.raises(SystemExit):
        speculative.main([*argv, "--trees=3:2:1"])  # N < K


def test_frontier_times_every_draft_tree(synth_root, in_tmp_dir):
    argv = run_args(synth_root, in_tmp_dir, f"--plot={in_tmp_dir / 'plot.png'}", "--allow_untrained",
                    "--k=3", "--n=2,3,6", "--gamma=1,2", "--start=0,1", "--requests=4", "--warmup=1")
    assert frontier.main(argv) == 0
    (rows,) = tables(in_tmp_dir / "table.md")
    assert sorted((r["mode"], r["N"], r["gamma"], r["draft start"]) for r in rows) == sorted(  # N < K is skipped
        (m, n, g, s) for m in ("strict", "relaxed") for n in ("3", "6") for g in ("1", "2") for s in ("0", "1"))
    assert all(r["K"] == "3" and number(r["speedup"]) > 0 and number(r["mean ratio"]) > 0 for r in rows)
    for r in rows:  # accepted / verified at the 1st-3rd code: rates, or "-" where no round got that far
        assert all(v == "-" or 0 <= float(v) <= 1 for v in r["acceptance by code"].split(" / "))
        assert len(r["acceptance by code"].split(" / ")) == 3
    assert (in_tmp_dir / "plot.png").stat().st_size > 0


def test_frontier_times_each_tree_pruned_to_each_budget_it_can_take(synth_root, in_tmp_dir):
    argv = run_args(synth_root, in_tmp_dir, "--allow_untrained", "--modes=strict", "--k=3", "--n=4", "--gamma=2",
                    "--budget=0,2,3,6,8", "--requests=4", "--warmup=1")
    assert frontier.main(argv) == 0
    (rows,) = tables(in_tmp_dir / "table.md")
    assert [r["nodes per round (<=)"] for r in rows] == ["8", "3", "6"]  # 2 < K; 8 is every node: skipped
    assert all(number(r["target calls"]) >= 1 for r in rows)


def test_tuning_times_at_each_k_only_the_candidate_trees_that_can_serve_it(synth_root, in_tmp_dir):
    argv = run_args(synth_root, in_tmp_dir, "--allow_untrained", "--modes=strict", "--ks=2,8", "--users=3",
                    "--tree_candidates=[[2,2,0],[4,1,0],[8,1,0,4]]", "--draft_beams=20", "--gamma=1")
    assert tuning.main(argv) == 0
    (rows,) = tables(in_tmp_dir / "table.md")
    assert [r["K"] for r in rows] == ["2", "8"]
    k2, k8 = (r["trees timed (mean ms)"] for r in rows)
    assert "N 2 gamma 2" in k2 and "N 4 gamma 1" in k2 and "best 4 nodes" in k2 and "N 20 gamma 1" in k2  # all serve
    assert k8.startswith("N 20 gamma 1: ") and k8.count(":") == 1  # the configured tree only: the others are narrow
    assert all(number(r["best tree's speedup"]) > 0 for r in rows)


@pytest.mark.parametrize("shortcut", ["bound", "trie_fill", "skip_decided"])
def test_shortcuts_compares_strict_decoding_with_and_without_one_on_the_same_requests(synth_root, in_tmp_dir,
                                                                                      shortcut):
    argv = run_args(synth_root, in_tmp_dir, "--allow_untrained", "--ks=1,3", "--trees=3:30:1:2", "--requests=4",
                    "--warmup=1", f"--shortcut={shortcut}")
    assert shortcuts.main(argv) == 0
    (rows,) = tables(in_tmp_dir / "table.md")
    off, on = shortcuts.SHORTCUTS[shortcut]
    assert [(r["K"], r["N"], r["gamma"], r["draft start"], r["rule"]) for r in rows] == [
        ("1", "40", "1", "0", off), ("1", "40", "1", "0", on), ("3", "30", "1", "2", off), ("3", "30", "1", "2", on)]
    for r in rows:
        assert number(r["speedup"]) > 0 and r["identical (of 4)"] == "4"  # strict: beam search's items, both ways
        assert 0 <= number(r["of which by the bound"]) <= number(r["accepted steps"]) <= 3
        assert 0 <= number(r["filled from the trie"]) <= number(r["accepted steps"])
        if r["rule"] == off and shortcut != "skip_decided":  # which only changes what the passes feed
            assert number(r["of which by the bound" if shortcut == "bound" else "filled from the trie"]) == 0
        assert number(r["target-only ms"]) > 0
    if shortcut == "trie_fill":  # K = 3 drafting the 3rd code of a small catalog only: 30 nodes hold its pairs
        assert number(rows[3]["filled from the trie"]) == 1 and number(rows[3]["draft calls"]) == 0
        assert number(rows[2]["draft calls"]) == 1


def test_length_groups_times_batches_whole_and_grouped_and_strict_keeps_their_items(synth_root, in_tmp_dir):
    argv = run_args(synth_root, in_tmp_dir, "--allow_untrained", "--settings=4:1,4:2,8:4", "--requests=8",
                    "--warmup=1", "--modes=strict,relaxed")
    assert length_groups.main(argv) == 0
    (rows,) = tables(in_tmp_dir / "table.md")
    decoders_ = ["beam_search", "strict speculative", "relaxed speculative"]
    assert [(r["decoder"], r["batch"], r["groups"]) for r in rows] == [
        *[(d, "4", g) for d in decoders_ for g in ("1", "2")], *[(d, "8", "4") for d in decoders_]]
    for r in rows:
        assert number(r["ms a request"]) > 0
        assert number(r["prompt tokens computed"]) >= 1.0  # pads are computed, never fewer than the real tokens
        if r["decoder"] != "relaxed speculative":  # float32: grouping changes nothing
            assert r["items as decoded whole (of 8)"] == "8"
    whole, grouped = (number(r["prompt tokens computed"]) for r in rows[:2])
    assert grouped < whole


def test_alignment_trains_a_draft_per_loss_and_compares_it_with_none(synth_root, in_tmp_dir):
    argv = ["--losses", "none,atspeed_r"] + run_args(synth_root, in_tmp_dir, f"--plot={in_tmp_dir / 'plot.png'}",
                                                     "--ks=3", "--modes=strict", "--requests=4", "--warmup=1")
    assert alignment.main(argv) == 0
    speed, accuracy, versus = tables(in_tmp_dir / "table.md")
    assert [(r["align_loss"], r["mode"], r["K"]) for r in speed] == [("none", "strict", "3"),
                                                                     ("atspeed_r", "strict", "3")]
    assert all(number(r["speedup"]) > 0 for r in speed)
    for loss in ("none", "atspeed_r"):
        spec, target = ([r for r in accuracy if r["align_loss"] == loss and r["decoding"] == d]
                        for d in ("speculative", "beam_search"))
        assert spec[0]["recall@3"] == target[0]["recall@3"]
    assert [r["align_loss"] for r in versus] == ["atspeed_r"]
    assert len(list((in_tmp_dir / "saved").glob("AtSpeedS-synth-*.safetensors"))) == 2  # one draft per loss


def test_breakdown_splits_each_search_into_its_labelled_stages(synth_root, in_tmp_dir):
    argv = run_args(synth_root, in_tmp_dir, "--allow_untrained", "--k=3", "--draft_beams=6", "--gamma=2",
                    "--requests=4", "--warmup=1")
    assert breakdown.main(argv) == 0
    (rows,) = tables(in_tmp_dir / "table.md")
    by = {(r["mode"], r["search"]): r for r in rows}
    assert set(by) == {("strict", "speculative"), ("strict", "beam_search"),
                       ("relaxed", "speculative"), ("relaxed", "beam_sample")}
    for (mode, search), r in by.items():
        target, draft, verify, other = (float(r[f"{c} %"]) for c in ("target", "draft", "verify", "other"))
        assert target > 0 and verify > 0 and 99 <= target + draft + verify + other <= 101
        assert (draft > 0) == (search == "speculative")  # only speculative decoding runs a draft
    for mode, baseline in (("strict", "beam_search"), ("relaxed", "beam_sample")):
        assert 2 <= float(by[mode, baseline]["target calls"]) <= 4  # a pass per code level the trie leaves open
        assert 1 <= float(by[mode, "speculative"]["target calls"]) <= 4
        assert number(by[mode, "speculative"]["speedup"]) > 0


def test_beam_search_compares_ours_with_hf_generate(synth_root, in_tmp_dir):
    argv = run_args(synth_root, in_tmp_dir, "--allow_untrained", "--k=3", "--requests=4", "--warmup=1",
                    "--batch=2", "--batches=1")
    assert beam_search.main(argv) == 0
    (rows,) = tables(in_tmp_dir / "table.md")
    assert len(rows) == 2  # latency at batch 1, throughput at --batch
    for r in rows:
        assert float(r["ours"]) > 0 and float(r["HF generate"]) > 0 and number(r["ours faster by"]) > 0


def test_precision_counts_the_requests_whose_top_k_survives_each_change_of_computation(synth_root, in_tmp_dir):
    argv = run_args(synth_root, in_tmp_dir, "--allow_untrained", "--ks=1,3", "--requests=4", "--batch=2")
    assert precision.main(argv) == 0
    (rows,) = tables(in_tmp_dir / "table.md")
    assert [r["K"] for r in rows] == ["1", "3"]
    for r in rows:  # the synthetic target is float32: strict speculative decoding is exact
        assert r["strict SD vs target (batch 1)"] == "4/4" and r["strict SD vs float32 target"] == "4/4"
        assert r["target float32 vs float32"] == "4/4"
        assert r["target batch 1 vs batch 2"].endswith("/4")


def test_semantic_ids_reports_each_source(synth_root, in_tmp_dir):
    argv = run_args(synth_root, in_tmp_dir, "--sources=collaborative", "--prefixes=50", "--repeats=2")
    assert semantic_ids.main(argv) == 0
    (rows,) = tables(in_tmp_dir / "table.md")
    assert [r["source"] for r in rows] == ["collaborative"]
    assert rows[0]["items"] == "60" and rows[0]["all unique"] == "yes" and rows[0]["identical when cached"] == "yes"
    assert len(rows[0]["masked step ms by depth"].split(" / ")) == 4


def test_benchmarks_read_run_recbole_arguments():
    args = speculative.parse_args(["--ks=1,3", "--dataset=synth", "--epochs=7", "--align_loss=none"])
    assert args.ks == [1, 3] and args.dataset == "synth"
    assert args.overrides == {"epochs": 7, "align_loss": "none"}  # no data_path: RecBole's own default
    with pytest.raises(SystemExit):
        speculative.parse_args(["--model=SASRec"])
    with pytest.raises(SystemExit):
        speculative.parse_args(["--epochs", "7"])  # overrides are written --key=value


def test_a_benchmarks_draft_start_is_the_configs_too_so_shorter_ids_can_be_benchmarked():
    args = speculative.parse_args(["--dataset=synth", "--sid_levels=3", "--draft_start=1"])
    assert args.draft_start == 1 and args.overrides == {"sid_levels": 3, "draft_start": 1}


def test_a_missing_checkpoint_names_the_command_that_trains_it(synth_root, in_tmp_dir):
    argv = run_args(synth_root, in_tmp_dir, "--ks=3", "--modes=strict")
    with pytest.raises(SystemExit, match="python run_recbole.py --model=AtSpeedS --dataset=synth"):
        speculative.main(argv)


def test_the_checkpoints_run_recbole_trained_are_the_ones_decoded_and_scored_as_run_recbole_scores(
        synth_root, in_tmp_dir):
    argv = run_args(synth_root, in_tmp_dir, f"--plot={in_tmp_dir / 'plot.png'}", "--ks=3", "--batches=1",
                    "--requests=4", "--warmup=1", "--skip_hf")
    trained = run_args(synth_root, in_tmp_dir)[:-1] + [f"--result_file={in_tmp_dir / 'run.json'}"]
    assert run_recbole(["--model=AtSpeedS", *trained]) == 0
    (path,) = (in_tmp_dir / "saved").glob("AtSpeedS-synth-*.safetensors")
    served, test = decoders.load(speculative.parse_args(argv))
    assert served["strict"].model is served["relaxed"].model  # no AtSpeedR checkpoint: AtSpeedS's stands in
    assert path.name in served["strict"].weights and "RANDOM" not in served["relaxed"].weights
    saved = load_file(str(path))
    for name, tensor in served["strict"].model.state_dict().items():
        if name in saved:
            assert (tensor.cpu() == saved[name]).all(), name
    # every test user (120 = 15 x 8) at the model's K: RecBole's evaluator gives run_recbole.py's test metrics
    s, t = served["strict"], served["strict"].model.target
    everyone = common.sample_requests(test, t.prompt, test.sample_size, 8, 0, "cpu")
    assert sum(r.users for r in everyone) == test.sample_size
    beams = [target_beam_search(t.lm, t.trie, t.vocab, r.ids, r.mask, s.model.num_beams) for r in everyone]
    ours = common.recbole_metrics(s.config, everyone, beams, s.model.num_beams)
    run = json.loads((in_tmp_dir / "run.json").read_text())["test"]
    assert ours == {k: v for k, v in run.items() if "@" in k} and len(ours) == 6
    assert speculative.main(argv) == 0
    speed, accuracy = tables(in_tmp_dir / "table.md")
    assert len(speed) == 2 and all(number(r["speedup vs ours"]) > 0 for r in speed)
    strict = {r["decoding"]: r["recall@3"] for r in accuracy if r["mode"] == "strict"}
    assert strict["speculative"] == strict["beam_search"]


def test_accuracy_scores_each_trained_recipe_as_the_test_pass_of_run_recbole_scores_it(synth_root, in_tmp_dir):
    trained = run_args(synth_root, in_tmp_dir)[:-1]
    for epochs in (1, 2):
        assert run_recbole(["--model=GenRec", *trained, f"--epochs={epochs}",
                            f"--result_file={in_tmp_dir / f'{epochs}.json'}"]) == 0
    # every test user (120), in batches of 8: the same users the test pass decodes
    argv = run_args(synth_root, in_tmp_dir, "--requests=120", "--batch=8", "--warmup=1",
                    "--variant=one epoch:epochs=1", "--variant=two epochs:epochs=2")
    assert accuracy.main(argv) == 0
    rows, intervals = tables(in_tmp_dir / "table.md")
    assert [r["variant"] for r in rows] == ["one epoch", "two epochs"]
    assert [r["variant"] for r in intervals] == ["one epoch", "two epochs", "two epochs - one epoch (paired)"]
    for row, interval in zip(rows, intervals):  # the per-user means are RecBole's figures
        assert {k: float(interval[k].split(" ± ")[0]) for k in row if "@" in k} == pytest.approx(
            {k: float(v) for k, v in row.items() if "@" in k}, abs=1e-4)
    for k in (k for k in rows[0] if "@" in k):  # a paired difference is the difference of the means
        mean, half = (float(x) for x in intervals[2][k].split(" ± "))
        assert mean == pytest.approx(float(rows[1][k]) - float(rows[0][k]), abs=2e-4) and half >= 0
    for row, epochs in zip(rows, (1, 2)):
        test = json.loads((in_tmp_dir / f"{epochs}.json").read_text())["test"]
        assert {k: float(row[k]) for k in test if "@" in k} == pytest.approx(
            {k: v for k, v in test.items() if "@" in k}, abs=1e-4)
        assert row["checkpoint"].startswith("GenRec-synth-") and number(row["ms a request"]) > 0
    assert rows[0]["checkpoint"] != rows[1]["checkpoint"]
    # no --variant: the checkpoint of the arguments alone (their epochs=2)
    assert accuracy.main(run_args(synth_root, in_tmp_dir, "--requests=16", "--batch=8")) == 0
    plain, _ = tables(in_tmp_dir / "table.md")
    assert [(r["variant"], r["overrides"], r["checkpoint"]) for r in plain] == [("config", "-", rows[1]["checkpoint"])]


def test_the_papers_speedup_averages_each_requests_ratio_so_a_slow_minority_lowers_it():
    baseline = common.Timing(1.0, [], [1.0, 1.0, 1.0, 1.0])
    spec = common.Timing(0.5, [], [0.5, 0.5, 0.5, 1.0])  # one request in four takes a second target call
    assert baseline.seconds / spec.seconds == 2.0  # the ratio of medians does not see it
    assert common.mean_ratio(baseline, spec) == 1.75


def test_a_mean_comes_with_the_half_width_of_its_95_percent_interval():
    mean, half = common.mean_interval(np.array([0.0, 1.0] * 50))
    assert mean == 0.5 and half == pytest.approx(1.96 * np.sqrt(0.25 * 100 / 99) / 10)
    assert common.mean_interval(np.zeros(30)) == (0.0, 0.0)


def test_accuracy_of_an_untrained_variant_stops_with_the_command_that_trains_it(synth_root, in_tmp_dir):
    argv = run_args(synth_root, in_tmp_dir, "--requests=8", "--variant=never trained:epochs=7")
    with pytest.raises(SystemExit) as stop:
        accuracy.main(argv)
    message = str(stop.value)
    assert "no trained GenRec checkpoint" in message and "--epochs=7" in message
    assert "allow_untrained" not in message  # an option accuracy.py does not have


def test_an_accuracy_variant_names_property_overrides_only():
    assert accuracy.variant("lr 3e-3: learning_rate=0.003, epochs=1") == ("lr 3e-3", {"learning_rate": 0.003,
                                                                                      "epochs": 1})
    assert accuracy.variant("all:lora_targets=['q_proj','v_proj'],epochs=4") == (
        "all", {"lora_targets": ["q_proj", "v_proj"], "epochs": 4})
    with pytest.raises(SystemExit):
        accuracy.parse_args(["--variant=x:dataset=ml-100k"])
    with pytest.raises(SystemExit):
        accuracy.parse_args(["--variant=x:epochs"])


def test_a_pretrained_llm_target_is_benchmarked_too(synth_root, in_tmp_dir):
    lm = save_tiny_lm(in_tmp_dir / "lm", tie=False)
    argv = run_args(synth_root, in_tmp_dir, f"--plot={in_tmp_dir / 'plot.png'}", f"--pretrained_path={lm}",
                    "--dtype=float32", "--allow_untrained", "--ks=3", "--batches=1", "--requests=4", "--warmup=1")
    assert speculative.main(argv) == 0
    speed, accuracy = tables(in_tmp_dir / "table.md")
    assert [(r["mode"], r["K"]) for r in speed] == [("strict", "3"), ("relaxed", "3")]
    assert all(number(r["speedup vs ours"]) > 0 and number(r["speedup vs HF"]) > 0 for r in speed)
    strict = {r["decoding"]: r["recall@3"] for r in accuracy if r["mode"] == "strict"}
    assert strict["speculative"] == strict["beam_search"]


@pytest.mark.parametrize("pretrained", [False, True])  # a text prompt: its prefix is cached, as decoding does
def test_ceiling_times_every_pass_and_the_free_draft_ceiling(synth_root, in_tmp_dir, pretrained):
    lm = [f"--pretrained_path={save_tiny_lm(in_tmp_dir / 'lm', tie=False)}", "--dtype=float32"] if pretrained else []
    argv = run_args(synth_root, in_tmp_dir, "--allow_untrained", "--k=3", "--tree=4,8", "--draft_beams=6",
                    "--requests=4", "--warmup=1", *lm)
    assert ceiling.main(argv) == 0
    (rows,) = tables(in_tmp_dir / "table.md")
    by = {r["pass"]: r for r in rows}
    assert set(by) == {"target-only search", "target prefill", "target step (K beams)", "target prompt + 4",
                       "target prompt + 8", "draft prefill", "draft prompt + level (N = 6)"}
    assert all(float(r["ms"]) > 0 for r in rows)
    search = float(by["target-only search"]["ms"])
    for t in (4, 8):
        assert number(by[f"target prompt + {t}"]["ceiling"]) == pytest.approx(
            search / float(by[f"target prompt + {t}"]["ms"]), rel=0.1)  # ms rounded to 0.01


def test_fused_times_the_modules_and_the_fused_weights_on_the_same_requests(synth_root, in_tmp_dir):
    argv = run_args(synth_root, in_tmp_dir, "--allow_untrained", "--ks=1,3", "--trees=3:6:2", "--requests=4",
                    "--warmup=1")
    assert fused.main(argv) == 0
    (rows,) = tables(in_tmp_dir / "table.md")
    assert [(r["K"], r["decoder"].split(" (")[0]) for r in rows] == [
        (k, d) for k in ("1", "3") for d in ("search", "speculative", "speedup")]
    assert rows[4]["decoder"] == "speculative (N 6, gamma 2, draft start 0)"  # the tree --trees names for K = 3
    for r in rows:
        assert number(r["modules ms"]) > 0 and number(r["fused ms"]) > 0
        if r["decoder"] != "speedup (search / speculative)":
            assert r["same top-K"].endswith("/4") and int(r["same top-K"].split("/")[0]) >= 3  # float32 target


def test_prefix_times_whole_prompts_and_the_cached_prefix_on_the_same_requests(synth_root, in_tmp_dir):
    lm = save_tiny_lm(in_tmp_dir / "lm", tie=False)
    argv = run_args(synth_root, in_tmp_dir, f"--pretrained_path={lm}", "--dtype=float32", "--allow_untrained",
                    "--ks=1,3", "--trees=3:6:2", "--requests=4", "--warmup=1")
    assert prefix.main(argv) == 0
    assert "- prompt prefix: 5 tokens" in (in_tmp_dir / "table.md").read_text()  # "The user has purchased :"
    (rows,) = tables(in_tmp_dir / "table.md")
    assert [(r["K"], r["decoder"].split(" (")[0]) for r in rows] == [
        (k, d) for k in ("1", "3") for d in ("search", "speculative", "speedup")]
    for r in rows:
        assert number(r["whole prompt ms"]) > 0 and number(r["cached prefix ms"]) > 0
        if r["decoder"] != "speedup (search / speculative)":
            assert r["same top-K"] == "4/4"  # float32: the same items and order both ways


def test_relaxed_inclusion_keeps_k_codes_a_round_on_each_side_and_the_coupled_rule_keeps_beam_samplings(tmp_path):
    argv = ["--k=4", "--n=8", "--codes=32", "--draws=2000", "--rows=5", f"--output={tmp_path / 'inclusion.md'}"]
    r = relaxed_inclusion.simulate(relaxed_inclusion.parse_args(argv))
    for side in ("beam sampling", "coupled", "ratio"):
        assert float(r[side].sum()) == pytest.approx(4)
    assert float(r["beam sampling"][r["p"].argmax()]) > 0.8  # beam sampling nearly always keeps the likeliest code
    torch.testing.assert_close(r["coupled"], r["beam sampling"], atol=0.06, rtol=0)  # difference std <= 0.016
    assert 0 < r["go_on"]["coupled"] < 1 and 0 < r["go_on"]["ratio"] < 1
    relaxed_inclusion.main(argv)
    rows = [line for line in (tmp_path / "inclusion.md").read_text().splitlines() if line.startswith("| ")]
    assert len(rows) == (1 + 3) + (1 + 5)


@pytest.mark.parametrize("pretrained", [False, True])  # a text prompt, grouped-query attention
def test_early_exit_probe_sees_the_target_itself_in_the_logit_lens_of_its_last_layer(synth_root, in_tmp_dir,
                                                                                    pretrained):
    lm = [f"--pretrained_path={save_tiny_lm(in_tmp_dir / 'lm', tie=False)}", "--dtype=float32"] if pretrained else []
    layers, width = (TINY["layers"], TINY["hidden"]) if pretrained else (SMALL["n_layers"], SMALL["hidden_size"])
    argv = run_args(synth_root, in_tmp_dir, "--allow_untrained", "--train_users=24", "--eval_users=16",
                    f"--layers={layers}", "--pairs=1:1,3:3,3:5", "--steps=5", *lm)
    assert early_exit.main(argv) == 0
    (rows,) = tables(in_tmp_dir / "table.md")
    by = {r["draft"].split(" (")[0]: r for r in rows}
    assert set(by) == {"served draft", f"after {layers} layers: logit lens", f"after {layers} layers: linear",
                       f"after {layers} layers: MLP {width}"}
    lens = by[f"after {layers} layers: logit lens"]  # the last layer's lens is the target's own distribution
    assert [lens[c] for c in ("top-1 in top-1", "top-3 in top-3", "top-3 in top-5")] == ["1.00"] * 3
    assert all(0 <= float(r["top-3 in top-5"]) <= 1 for r in rows)
    assert rows[0]["draft"].startswith(f"served draft (1 x {SMALL['draft_hidden_size']},")


def test_early_exit_probe_trains_draft_blocks_over_embeddings_and_early_layer_states(synth_root, in_tmp_dir):
    argv = run_args(synth_root, in_tmp_dir, "--allow_untrained", "--train_users=48", "--eval_users=16", "--layers=",
                    "--block_layers=0,1", "--block_width=32", "--block_epochs=2", "--pairs=1:1,3:5",
                    "--time_requests=12")
    assert early_exit.main(argv) == 0
    rows, times = tables(in_tmp_dir / "table.md")
    assert [r["draft"].split(" (train")[0] for r in rows[1:]] == ["draft block (32) over token embeddings",
                                                                 "draft block (32) over states after 1 layers"]
    assert all(0 <= float(r[c]) <= 1 for r in rows for c in ("top-1 in top-1", "top-3 in top-5"))
    assert [r["pass"] for r in times] == ["served draft: 1st-code prompt pass", "target: 1st-code prompt pass",
                                          "draft block (32) over the prompt's states",
                                          "target: first 1 layers over the prompt"]
    assert all(float(r["ms"]) > 0 for r in times)


def test_early_exit_probe_measures_the_second_code_after_the_targets_best_first_code(synth_root, in_tmp_dir):
    argv = run_args(synth_root, in_tmp_dir, "--allow_untrained", "--train_users=48", "--eval_users=16", "--layers=",
                    "--block_layers=1", "--block_width=32", "--block_epochs=2", "--pairs=1:1,3:5", "--second_code")
    assert early_exit.main(argv) == 0
    first, second = tables(in_tmp_dir / "table.md")
    assert [r["draft"].split(" (")[0] for r in second] == ["served draft", "draft block"]
    assert all(0 <= float(r[c]) <= 1 for r in first + second for c in ("top-1 in top-1", "top-3 in top-5"))


def test_the_probes_code_log_probs_are_the_targets_own_along_a_path(synth_root, in_tmp_dir):
    from atspeed_rec.alignment.positions import beam_code_logits
    from atspeed_rec.decoding.beam_search import masked_log_softmax
    args = early_exit.parse_args(run_args(synth_root, in_tmp_dir, "--allow_untrained", "--train_users=0",
                                          "--eval_users=8"))
    served, test = early_exit.decoders.load(args)
    t = served["strict"].model.target
    (r,) = early_exit.decoders.requests(args, served, test, 8)
    with torch.no_grad():
        first = early_exit.code_logprobs(t.lm, t.vocab, t.trie, r.ids, r.mask)  # [B, C]
        prev = first.argmax(-1, keepdim=True)
        second = early_exit.code_logprobs(t.lm, t.vocab, t.trie, r.ids, r.mask, prev)
        path = torch.cat([prev, second.argmax(-1, keepdim=True)], 1)  # [B, 2] a valid ID prefix
        codes = torch.cat([path, t.trie.allowed_after(path).float().argmax(-1, keepdim=True)], 1).unsqueeze(1)
        logits = beam_code_logits(t.lm, t.vocab, r.ids, r.mask, codes)[:, 0]  # [B, L, C]
    for level, lp in enumerate((first, second)):
        allowed = t.trie.allowed_after(path[:, :level])
        torch.testing.assert_close(lp, masked_log_softmax(logits[:, level], allowed), atol=1e-4, rtol=0)


def test_a_draft_block_learns_a_first_code_distribution_that_its_prompt_states_determine():
    torch.manual_seed(0)
    C, D = 16, 24
    proj = torch.randn(D, C)
    batches = []
    for _ in range(12):
        x, mask = torch.randn(32, 6, D), torch.ones(32, 6, dtype=torch.bool)
        mask[:8, :2] = False  # left padding
        batches.append((x, mask, torch.log_softmax(2 * x[:, -1] @ proj, -1)))
    valid = torch.ones(C, dtype=torch.bool)
    batches = [(x, m, lp, valid, None) for x, m, lp in batches]
    head = early_exit.BlockHead(D, C, 32)
    with torch.no_grad():
        before = float(sum(early_exit.kl(head(x, m), lp, valid) for x, m, lp, _, _ in batches)) / len(batches)
    after = early_exit.train_block(head, batches, epochs=15, seed=0)
    assert after < 0.5 * before


def test_early_exit_probe_without_layers_measures_the_served_draft_alone(synth_root, in_tmp_dir):
    argv = run_args(synth_root, in_tmp_dir, "--allow_untrained", "--train_users=0", "--eval_users=32", "--layers=",
                    "--pairs=1:1,3:5", "--draft_n_layers=2")
    assert early_exit.main(argv) == 0
    (rows,) = tables(in_tmp_dir / "table.md")
    assert [r["draft"] for r in rows] == [f"served draft (2 x {SMALL['draft_hidden_size']}, own prompt pass)"]


def test_early_exit_probe_measures_atspeedr_draft_when_asked(synth_root, in_tmp_dir):
    argv = run_args(synth_root, in_tmp_dir, "--allow_untrained", "--train_users=0", "--eval_users=16", "--layers=",
                    "--pairs=1:1", "--model=AtSpeedR")
    assert early_exit.main(argv) == 0
    text = (in_tmp_dir / "table.md").read_text()
    assert "weights, relaxed:" in text and "weights, strict:" not in text
