"""AtSpeedS / AtSpeedR through RecBole: target reuse, strict equivalence, speed metrics."""

import json
import logging
import math
import time

import pytest
import torch
from recbole.data import create_dataset, data_preparation

from atspeed_rec.decoding.beam_search import beam_search
from atspeed_rec.decoding.speculative import speculative_beam_search
from atspeed_rec.errors import ConfigError
from atspeed_rec.recbole_glue import atspeed
from atspeed_rec.recbole_glue.atspeed import AtSpeedR, AtSpeedS
from atspeed_rec.recbole_glue.checkpoint import load_checkpoint
from atspeed_rec.recbole_glue.genrec import beams_to_scores
from atspeed_rec.recbole_glue.cli import main
from atspeed_rec.recbole_glue.runner import build_config

SMALL = {"n_layers": 1, "hidden_size": 32, "n_heads": 2, "inner_size": 64, "sid_codebook_size": 8,
         "sid_source": "collaborative", "draft_hidden_size": 16, "draft_inner_size": 32,
         "epochs": 2, "draft_epochs": 1, "speedup_batches": 2}
SPEC_METRICS = {"speedup", "accepted_steps", "target_calls", "acceptance_rate", "latency_ms"}


def run(root, model, out, **extra):
    args = [f"--{k}={v}" for k, v in {**SMALL, **extra}.items()]
    return main([f"--model={model}", "--dataset=synth", f"--data_path={root}",
                 f"--config_files={root / 'synth.yaml'}", f"--result_file={out}", *args])


def test_atspeed_s_reports_speed_metrics_and_reuses_its_target(synth_root, in_tmp_dir):
    assert run(synth_root, "AtSpeedS", in_tmp_dir / "s.json") == 0
    result = json.loads((in_tmp_dir / "s.json").read_text())
    assert SPEC_METRICS <= set(result["test"]) and SPEC_METRICS <= set(result["best_valid"])
    test = result["test"]
    assert test["speedup"] > 0 and test["speedup_median"] > 0 and test["latency_ms"] > 0  # batch 1, test split only
    assert test["speedup_batch"] > 0 and test["latency_b1_ms"] > 0 and test["target_latency_b1_ms"] > 0
    assert math.isnan(result["best_valid"]["speedup"])  # validation times no single requests
    assert 1 <= test["target_calls"] <= 4  # L = 4 codes: at most one target call per code
    assert 0 <= test["acceptance_rate"] <= 1
    target = list((in_tmp_dir / "saved").glob("GenRec-synth-*.safetensors"))
    assert len(target) == 1
    stamp = target[0].stat().st_mtime_ns

    # AtSpeedR with the same target properties trains no new target.
    assert run(synth_root, "AtSpeedR", in_tmp_dir / "r.json") == 0
    assert target[0].stat().st_mtime_ns == stamp
    assert len(list((in_tmp_dir / "saved").glob("GenRec-synth-*.safetensors"))) == 1
    relaxed = json.loads((in_tmp_dir / "r.json").read_text())["test"]
    assert SPEC_METRICS <= set(relaxed) and 0 <= relaxed["ndcg@10"] <= 1


def test_serving_another_k_reuses_the_trained_target_and_draft(synth_root, in_tmp_dir):
    assert run(synth_root, "AtSpeedS", in_tmp_dir / "a.json") == 0
    saved = in_tmp_dir / "saved"
    (target,), (draft,) = saved.glob("GenRec-synth-*.safetensors"), saved.glob("AtSpeedS-synth-*.safetensors")
    stamps = target.stat().st_mtime_ns, draft.stat().st_mtime_ns
    # K = 1: the target is validated at target_valid_beams and the draft aligned at align_beams whatever K is
    # served, so neither is trained again
    assert run(synth_root, "AtSpeedS", in_tmp_dir / "b.json", topk="[1]", num_beams=1) == 0
    assert list(saved.glob("GenRec-synth-*.safetensors")) == [target]
    assert list(saved.glob("AtSpeedS-synth-*.safetensors")) == [draft]
    assert (target.stat().st_mtime_ns, draft.stat().st_mtime_ns) == stamps
    test = json.loads((in_tmp_dir / "b.json").read_text())["test"]
    assert {"recall@1", "ndcg@1"} <= set(test) and SPEC_METRICS <= set(test)
    # a new alignment K names a new draft; a new validation width, a new target (and so a new draft)
    assert run(synth_root, "AtSpeedS", in_tmp_dir / "c.json", topk="[1]", num_beams=1, align_beams=1) == 0
    assert len(list(saved.glob("AtSpeedS-synth-*.safetensors"))) == 2
    assert len(list(saved.glob("GenRec-synth-*.safetensors"))) == 1
    assert run(synth_root, "AtSpeedS", in_tmp_dir / "d.json", topk="[1]", num_beams=1, target_valid_beams=10) == 0
    assert len(list(saved.glob("GenRec-synth-*.safetensors"))) == 2
    assert len(list(saved.glob("AtSpeedS-synth-*.safetensors"))) == 3


def test_a_new_serving_tree_or_temperature_reuses_the_trained_draft(synth_root, in_tmp_dir):
    assert run(synth_root, "AtSpeedR", in_tmp_dir / "a.json", draft_beams=20, gamma=1) == 0
    (draft,) = (in_tmp_dir / "saved").glob("AtSpeedR-synth-*.safetensors")
    stamp = draft.stat().st_mtime_ns
    assert run(synth_root, "AtSpeedR", in_tmp_dir / "b.json", draft_beams=30, gamma=2, sample_temperature=0.25) == 0
    assert list((in_tmp_dir / "saved").glob("AtSpeedR-synth-*.safetensors")) == [draft]
    assert draft.stat().st_mtime_ns == stamp  # served with the new tree, not retrained
    # the validation tree picks the kept epoch: it names a draft of its own
    assert run(synth_root, "AtSpeedR", in_tmp_dir / "c.json", draft_valid_width=25) == 0
    assert len(list((in_tmp_dir / "saved").glob("AtSpeedR-synth-*.safetensors"))) == 2


def test_strict_decoding_equals_target_beam_search_for_every_test_user(synth_root, in_tmp_dir):
    assert run(synth_root, "AtSpeedS", in_tmp_dir / "s.json") == 0
    config = build_config("AtSpeedS", "synth", [str(synth_root / "synth.yaml")],
                          {"data_path": str(synth_root), **SMALL})
    train, _, test = data_preparation(config, create_dataset(config))
    model = AtSpeedS(config, train._dataset)
    load_checkpoint(model, next((in_tmp_dir / "saved").glob("AtSpeedS-synth-*.safetensors")))
    assert serves_the_targets_lists(model, test) == train._dataset.user_num - 1


def serves_the_targets_lists(model, test) -> int:
    """Asserts that `model` decodes every request of `test` into its target's beam-search lists; returns how many."""
    model.eval()
    users = 0
    with torch.no_grad():
        for batch, *_ in test:
            ids, mask = model.target.prompt(batch)
            spec, _ = model.speculative(ids, mask)
            ref = beam_search(model.target.lm, model.target.trie, model.target.vocab, ids, mask, model.num_beams)
            assert_same_lists_up_to_float_ties(spec, ref)
            torch.testing.assert_close(spec.scores, ref.scores, atol=1e-5, rtol=2e-6)
            users += len(ids)
    return users


def assert_same_lists_up_to_float_ties(spec, ref, tie: float = 1e-5):
    """The same items in the same order, but where two items' scores agree to float32 rounding (passes of other
    shapes sum in another order): there the tied items may swap places, and only there."""
    for b in torch.nonzero((spec.items != ref.items).any(1)).flatten().tolist():
        for j in torch.nonzero(spec.items[b] != ref.items[b]).flatten().tolist():
            item = int(spec.items[b, j])
            assert item in ref.items[b].tolist(), f"request {b}: item {item} is not in the target's list"
            own = ref.items[b].tolist().index(item)  # where the target's search put it
            gap = abs(float(ref.scores[b, own] - ref.scores[b, j]))
            assert gap <= tie, f"request {b}: item {item} moved from place {own} to {j} (scores {gap:.2g} apart)"


def test_fewer_draft_beams_than_target_beams_is_refused(synth_root, in_tmp_dir, capsys):
    assert run(synth_root, "AtSpeedS", in_tmp_dir / "x.json", draft_beams=5) == 2
    assert "draft_beams=5 < num_beams=20" in capsys.readouterr().err


def test_a_non_positive_sampling_temperature_is_refused(synth_root, in_tmp_dir, capsys):
    assert run(synth_root, "AtSpeedR", in_tmp_dir / "x.json", sample_temperature=0) == 2
    assert "sample_temperature=0.0" in capsys.readouterr().err


def tuning_model(synth_root, in_tmp_dir, cls=AtSpeedS, loader=False, **extra) -> tuple[AtSpeedS, list]:
    """A trained AtSpeedS (served as `cls`) about to test, with candidate trees (20, 1) and (20, 3) beside its own
    (40, 1), and the test split's batches (or, with `loader`, its dataloader)."""
    assert run(synth_root, "AtSpeedS", in_tmp_dir / "s.json") == 0  # trains; the tuning decodes only
    config = build_config("AtSpeedS", "synth", [str(synth_root / "synth.yaml")],
                          {"data_path": str(synth_root), **SMALL, "tree_candidates": [[20, 1], [20, 3]],
                           "tree_tuning_requests": 3, **extra})
    train, _, test = data_preparation(config, create_dataset(config))
    model = cls(config, train._dataset)
    load_checkpoint(model, next((in_tmp_dir / "saved").glob("AtSpeedS-synth-*.safetensors")))
    model.eval()
    model.start_evaluation("test")
    return model, test if loader else [batch for batch, *_ in test]


def slow_trees(monkeypatch, delay: dict) -> list:
    """Each speculative search sleeps `delay[(N, gamma)]` seconds first (or `delay[(N, gamma)](i)` on the tree's
    i-th call); returns the trees served, in order."""
    served = []

    def slowed(*args, **kwargs):
        assert kwargs["draft_start"] == 0
        tree = args[7:9]  # (N, gamma)
        wait = delay[tree]
        time.sleep(wait(served.count(tree)) if callable(wait) else wait)
        served.append(tree)
        return speculative_beam_search(*args, **kwargs)

    monkeypatch.setattr(atspeed, "speculative_beam_search", slowed)
    return served


def test_the_test_pass_serves_the_fastest_of_the_candidate_trees_that_fit_its_k(synth_root, in_tmp_dir,
                                                                                 monkeypatch, caplog):
    with caplog.at_level(logging.INFO):  # (10, 2) and a 10-node budget are for K <= 10: not timed at K = 20
        model, batches = tuning_model(synth_root, in_tmp_dir,
                                      tree_candidates=[[20, 1], [20, 3], [10, 2], [40, 1, 0, 10]])
    assert "tree_candidates [(10, 2, 0), (40, 1, 0, 10)] cannot serve K=20" in caplog.text
    served = slow_trees(monkeypatch, {(40, 1): 0.03, (20, 1): 0.0, (20, 3): 0.06})  # (20, 1) is the fastest
    model.fallback = False  # the tiny target's own search beats every tree: here the choice among trees is tested
    with torch.no_grad():
        for batch in batches:
            model.full_sort_predict(batch)
    assert served[:12].count((20, 3)) == 4 and served[:12].count((40, 1)) == 4  # 4 requests (1 warm-up) x 3 trees
    assert model.tree == (20, 1, 0, 0) and set(served[12:]) == {(20, 1)}  # then served alone
    caplog.clear()
    with caplog.at_level(logging.INFO):  # no candidate fits K: the configured tree is served, untimed
        model, _ = tuning_model(synth_root, in_tmp_dir, tree_candidates=[[10, 2]])
    assert "cannot serve K=20 (N, and a budget, must be >= K): not timed; serving the configured tree" in caplog.text
    assert model.tree_tuned and model.tree == (40, 1, 0, 0)


def test_the_tuning_picks_by_mean_time_so_a_slow_minority_of_requests_counts(synth_root, in_tmp_dir, monkeypatch):
    model, batches = tuning_model(synth_root, in_tmp_dir, tree_tuning_requests=4)
    model.fallback = False
    # (20, 1): fast on 3 requests of 4, then 0.4 s (a second target call, say): the best median, a mean of 0.1 s;
    # (20, 3): 0.05 s on every request; (40, 1): 0.2 s on every request
    slow_trees(monkeypatch, {(20, 1): lambda i: 0.4 if i % 4 == 3 else 0.0, (20, 3): 0.05, (40, 1): 0.2})
    with torch.no_grad():
        ms, _ = model.tune_tree(*model.target.prompt(batches[0]))
    assert model.tree == (20, 3, 0, 0)
    assert ms[(20, 1, 0, 0)] > ms[(20, 3, 0, 0)]


def test_requests_timed_alone_are_a_seeded_sample_of_the_test_users_decoded_before_the_first_batch(
        synth_root, in_tmp_dir, monkeypatch):
    model, test = tuning_model(synth_root, in_tmp_dir, loader=True, speedup_requests=10)
    def tokens(ids, mask):  # each request's prompt, without its padding
        return [tuple(row[m.bool()].tolist()) for row, m in zip(ids, mask)]

    timed_alone = []  # the prompts the target decodes alone
    monkeypatch.setattr(model, "target_alone", lambda ids, mask: timed_alone.extend(tokens(ids, mask)))
    model.start_evaluation("test", test)
    sample = tokens(*model.target.prompt(model.sample))
    assert len(sample) == 10  # the requests timed alone (the tuning's 3, after a warm-up, are the first 4)
    batches = [batch for batch, *_ in test]
    assert sample != tokens(*model.target.prompt(batches[0]))[:10]  # not the test order's first users
    with torch.no_grad():
        for batch in batches:
            model.full_sort_predict(batch)
    assert timed_alone == sample[:4] + [sample[0]] + sample  # the tuning; then a warm-up and the 10 timed
    assert len(model.spec_meter.single_spec_ms) == 10
    model.start_evaluation("test", test)  # the next test pass draws the same users
    assert tokens(*model.target.prompt(model.sample)) == sample


def test_the_tuning_warns_when_no_tree_beats_the_targets_own_search(synth_root, in_tmp_dir, monkeypatch, caplog):
    model, batches = tuning_model(synth_root, in_tmp_dir)
    batch = batches[0]
    slow_trees(monkeypatch, {(40, 1): 0.2, (20, 1): 0.2, (20, 3): 0.2})  # every tree slower than the target
    with torch.no_grad(), caplog.at_level(logging.INFO):
        model.tune_tree(*model.target.prompt(batch))
    assert "the target's own search:" in caplog.text  # the bar is in the log line of the tuning
    assert "no candidate tree is faster than the target's own beam search at K=20" in caplog.text

    model.tree_tuned, model.fallback = False, False  # --serve_target_if_faster=False (or the ratio rule)
    caplog.clear()
    with torch.no_grad(), caplog.at_level(logging.INFO):
        model.tune_tree(*model.target.prompt(batch))
    assert "expect a speedup below 1x" in caplog.text and not model.serve_target

    model.tree_tuned = False  # tune again: now the target is the slow one
    monkeypatch.setattr(model, "target_alone", lambda *a: time.sleep(0.2))
    slow_trees(monkeypatch, {(40, 1): 0.0, (20, 1): 0.0, (20, 3): 0.0})
    caplog.clear()
    with torch.no_grad(), caplog.at_level(logging.INFO):
        model.tune_tree(*model.target.prompt(batch))
    assert "serving tree" in caplog.text and "no candidate tree" not in caplog.text


def test_strict_serving_falls_back_to_the_targets_own_search_when_no_tree_beats_it(synth_root, in_tmp_dir,
                                                                                     monkeypatch, caplog):
    model, batches = tuning_model(synth_root, in_tmp_dir)
    served = slow_trees(monkeypatch, {(40, 1): 0.2, (20, 1): 0.2, (20, 3): 0.2})  # every tree slower than the target
    with torch.no_grad(), caplog.at_level(logging.INFO):
        model.full_sort_predict(batches[0])  # tunes first
    assert model.serve_target and "serving the target's own beam search instead" in caplog.text
    tuning = len(served)
    with torch.no_grad():
        scores = model.full_sort_predict(batches[1])
        ids, mask = model.target.prompt(batches[1])
        target = beam_search(model.target.lm, model.target.trie, model.target.vocab, ids, mask, model.num_beams)
    assert len(served) == tuning  # nothing speculative after the tuning, batch 1 included
    assert torch.equal(scores, beams_to_scores(target, model.n_items))  # the target's own lists
    summary = model.spec_meter.summary()
    assert summary["accepted_steps"] == 0 and summary["target_calls"] >= 1


def spy(monkeypatch, name: str) -> list:
    """Count the calls of `atspeed.<name>` (a decoder), which still runs."""
    calls, real = [], getattr(atspeed, name)

    def counted(*args, **kwargs):
        calls.append(len(args[3]))  # the requests decoded
        return real(*args, **kwargs)

    monkeypatch.setattr(atspeed, name, counted)
    return calls


def batches_after_timing(model, batches, caplog) -> list:
    """The test pass's scores of `batches` as served, after a tuning that kept the tree; the first batch is timed
    both ways."""
    model.tree_tuned, model.single_requests, model.timed_batches = True, 0, 1
    with torch.no_grad(), caplog.at_level(logging.INFO):
        return [model.full_sort_predict(batch) for batch in batches]


def test_batches_after_the_timed_ones_are_decoded_by_the_targets_own_search_where_it_was_faster(
        synth_root, in_tmp_dir, monkeypatch, caplog):
    model, batches = tuning_model(synth_root, in_tmp_dir)
    assert len(batches) >= 3
    served = slow_trees(monkeypatch, {(40, 1): 0.3})  # speculation loses on the timed batch
    searches = spy(monkeypatch, "beam_search")
    scores = batches_after_timing(model, batches, caplog)
    assert len(served) == 1 and model.serve_target_batches  # only the timed batch was speculative
    assert searches == [len(batch) for batch in batches]  # the timed batch's reference, then each batch as served
    assert "decoding the other batches by the target's own beam search, the same lists" in caplog.text
    with torch.no_grad():
        for batch, got in zip(batches, scores):
            ids, mask = model.target.prompt(batch)
            ref = beam_search(model.target.lm, model.target.trie, model.target.vocab, ids, mask, model.num_beams)
            assert torch.equal(got.topk(model.num_beams).indices, ref.items)
    meter = model.spec_meter
    assert meter.requests == sum(len(b) for b in batches) and meter.spec_requests == len(batches[0])
    assert model.spec_meter.summary()["speedup_batch"] < 1  # the timed batch's own figure

    model.start_evaluation("test")  # a new evaluation decides again
    assert not model.serve_target_batches


def test_relaxed_batches_fall_back_to_beam_sampling_and_only_under_the_coupled_rule(
        synth_root, in_tmp_dir, monkeypatch, caplog):
    model, batches = tuning_model(synth_root, in_tmp_dir, cls=AtSpeedR)
    served = slow_trees(monkeypatch, {(40, 1): 0.3})
    sampled = spy(monkeypatch, "beam_sample")
    batches_after_timing(model, batches, caplog)
    assert len(served) == 1 and sampled == [len(batch) for batch in batches[1:]]  # the coupled rule's twin
    assert "by the target's own beam sampling at T 0.5, the same distribution" in caplog.text

    model, batches = tuning_model(synth_root, in_tmp_dir, cls=AtSpeedR, relaxed_rule="ratio")
    served = slow_trees(monkeypatch, {(40, 1): 0.3})
    sampled = spy(monkeypatch, "beam_sample")
    batches_after_timing(model, batches, caplog)
    assert len(served) == len(batches) and not sampled and not model.serve_target_batches  # no twin: speculating on


def test_the_test_pass_keeps_speculating_where_the_timed_batches_were_faster(synth_root, in_tmp_dir, monkeypatch,
                                                                            caplog):
    model, batches = tuning_model(synth_root, in_tmp_dir)
    served = slow_trees(monkeypatch, {(40, 1): 0.0})
    real = atspeed.beam_search
    monkeypatch.setattr(atspeed, "beam_search", lambda *a, **k: (time.sleep(0.3), real(*a, **k))[1])  # slow target
    batches_after_timing(model, batches, caplog)
    assert len(served) == len(batches) and not model.serve_target_batches
    assert "speculating on" in caplog.text


def test_the_test_pass_decodes_length_groups_into_the_targets_own_lists(synth_root, in_tmp_dir):
    model, batches = tuning_model(synth_root, in_tmp_dir)
    model.tree_tuned, model.single_requests, model.eval_beams = True, 0, model.num_beams  # the batched pass only
    model.target.eval_length_buckets = 3
    with torch.no_grad():
        for batch in batches[:2]:
            scores = model.full_sort_predict(batch)  # strict, each group of like history lengths on its own
            ids, mask = model.target.prompt(batch)
            ref = beam_search(model.target.lm, model.target.trie, model.target.vocab, ids, mask, model.num_beams)
            assert torch.equal(scores.topk(model.num_beams).indices, ref.items)  # the whole batch's lists
    summary = model.spec_meter.summary()
    assert model.spec_meter.requests == sum(len(b) for b in batches[:2]) and summary["target_calls"] >= 1


def test_a_candidate_tree_without_a_draft_start_takes_the_configured_one():
    assert atspeed.parse_trees([[20, 1], [30, 2, 2], (40, 1, 0)], draft_start=1) == [(20, 1, 1, 0), (30, 2, 2, 0),
                                                                                      (40, 1, 0, 0)]


def test_a_candidate_tree_serves_a_k_up_to_its_width_and_its_node_budget():
    (tree,) = atspeed.parse_trees([[40, 2, 0, 10]])
    assert tree == (40, 2, 0, 10) and tree.serves(10) and not tree.serves(11)  # 10 nodes verified: K <= 10
    assert atspeed.Tree(6, 2).serves(6) and not atspeed.Tree(6, 2).serves(7)
    with pytest.raises(ConfigError, match=r"tree_candidates \[\(40, 2, 0, -1\)\]: .* budget >= 0"):
        atspeed.parse_trees([[40, 2, 0, -1]])


def test_malformed_candidate_trees_are_refused(synth_root, in_tmp_dir, capsys):
    assert run(synth_root, "AtSpeedS", in_tmp_dir / "x.json", tree_candidates="[[10,0]]") == 2
    assert "gamma >= 1" in capsys.readouterr().err
    assert run(synth_root, "AtSpeedS", in_tmp_dir / "y.json", tree_candidates="[20]") == 2
    assert "not a list of [N, gamma], [N, gamma, draft_start] or [N, gamma, draft_start, budget] trees" in \
        capsys.readouterr().err
    assert run(synth_root, "AtSpeedS", in_tmp_dir / "z.json", tree_candidates="[[20,1,-1]]") == 2
    assert "draft_start >= 0" in capsys.readouterr().err
