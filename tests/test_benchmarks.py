"""The benchmark scripts run end to end (on the synthetic dataset, tiny settings) and write their tables."""

import sys
from pathlib import Path

import pytest

from test_atspeed import SMALL

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import alignment  # noqa: E402
import breakdown  # noqa: E402
import speculative  # noqa: E402


def common(root, tmp):
    return ["--dataset=synth", f"--data_path={root}", f"--config_files={root / 'synth.yaml'}",
            "--override", *[f"{k}={v}" for k, v in SMALL.items()], "--requests=4", "--warmup=1",
            f"--output={tmp / 'table.md'}", f"--plot={tmp / 'plot.png'}"]


def test_the_speculative_benchmark_writes_its_table_and_plot(synth_root, in_tmp_dir):
    argv = common(synth_root, in_tmp_dir) + ["--allow_untrained", "--ks=1,3", "--batches=1,2", "--skip_hf"]
    assert speculative.main(argv) == 0
    table = (in_tmp_dir / "table.md").read_text()
    assert "RANDOM WEIGHTS" in table and "| strict | 3 | 2 |" in table and "| relaxed | 1 | 1 |" in table
    assert (in_tmp_dir / "plot.png").stat().st_size > 0


def test_the_frontier_benchmark_covers_every_tree(synth_root, in_tmp_dir):
    argv = common(synth_root, in_tmp_dir) + ["--allow_untrained", "--frontier", "--frontier_k=3",
                                             "--frontier_n=3,6", "--frontier_gamma=1,2"]
    assert speculative.main(argv) == 0
    table = (in_tmp_dir / "table.md").read_text()
    assert "(K = 3, batch 1)" in table
    assert sum(line.startswith("| strict | 3 |") for line in table.splitlines()) == 4


def test_the_alignment_benchmark_trains_a_draft_per_loss_and_compares_with_none(synth_root, in_tmp_dir):
    argv = ["--losses", "none,atspeed_r"] + common(synth_root, in_tmp_dir) + ["--ks=3", "--modes=strict", "--skip_hf"]
    assert alignment.main(argv) == 0
    table = (in_tmp_dir / "table.md").read_text()
    assert "| atspeed_r | strict | 3 |" in table and "vs none" in table


def test_the_breakdown_splits_each_search_into_its_labelled_stages(synth_root, in_tmp_dir):
    argv = common(synth_root, in_tmp_dir) + ["--allow_untrained", "--ks=3", "--draft_beams=6", "--gamma=2"]
    assert breakdown.main(argv) == 0
    rows = {}
    for line in (in_tmp_dir / "table.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in ("strict", "relaxed"):
            rows[cells[0], cells[1]] = [float(c) for c in cells[3:8]]  # target, draft, verify, other %, calls
    assert set(rows) == {("strict", "speculative"), ("strict", "beam_search"),
                         ("relaxed", "speculative"), ("relaxed", "beam_sample")}
    for (mode, search), (target, draft, verify, other, calls) in rows.items():
        assert target > 0 and verify > 0 and 99 <= target + draft + verify + other <= 101
        assert (draft > 0) == (search == "speculative")  # only speculative decoding runs a draft
    for mode, baseline in (("strict", "beam_search"), ("relaxed", "beam_sample")):
        assert rows[mode, baseline][4] == 4  # one target pass per code level (sid_levels: 4)
        assert 1 <= rows[mode, "speculative"][4] <= 4  # a round advances at least one level


def test_the_breakdown_refuses_more_than_one_k():
    with pytest.raises(SystemExit, match="one K"):
        breakdown.parse_args(["--ks=3,10"])


def test_a_cuda_device_on_a_machine_without_one_is_refused(capsys):
    if speculative.torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(SystemExit):
        speculative.parse_args(["--device=cuda"])
    assert "no CUDA device" in capsys.readouterr().err
