"""Every property that can change trained weights names the artefact it changes.

A trained artefact is cached under a hash of the properties it depends on (`checkpoint_keys`). A
property missing from that list would let a changed setting reuse stale weights silently. Each
property of the project's property files is therefore either part of the key of every artefact
it can change, or listed below with the reason it cannot change weights.
"""

from pathlib import Path

import pytest
import yaml

from atspeed_rec.recbole_glue.atspeed import TEACHER_KEYS, AtSpeedS
from atspeed_rec.recbole_glue.genrec import GenRec

PROPERTIES = Path(__file__).resolve().parents[1] / "properties"

NOT_WEIGHTS = {
    "eval_batch_size": "requests per evaluation batch: the same outputs",
    "eval_length_buckets": "groups of like history length an evaluation batch is decoded in: the same outputs",
    "teacher_batch_size": "requests per teacher beam-search batch: the same beams",
    "speedup_batches": "test batches also decoded target-only, for the speedup's timing",
    "speedup_requests": "test requests also decoded alone both ways, for the batch-1 speedup",
    "sid_cache_dir": "where semantic IDs are cached, not what they are",
    "metrics": "what is reported; the stopping rule reads valid_metric, which is in the key",
    "topk": "report cut-offs; valid_metric names its own",
    "metric_decimal_place": "printing",
    "show_progress": "progress bars",
    "reproducibility": "deterministic kernels: float noise only",
    "train_compile": "how the same training steps run (fused kernels): float noise only",
    "draft_beams": "the serving tree's width: the draft is validated on its own tree (draft_valid_width)",
    "gamma": "the serving tree's depth: the draft is validated on its own tree (draft_valid_gamma)",
    "draft_start": "where the serving tree starts: the draft is validated on its own tree, from the first code",
    "tree_candidates": "serving trees timed before the test pass: the draft is validated on its own tree",
    "tree_tuning_requests": "how many test requests time the serving trees",
    "serve_target_if_faster": "whether the test pass may serve the target's own search where it was faster: "
                              "the draft is not used",
    "sample_temperature": "relaxed serving only: draft validation decodes strictly",
    "relaxed_last_level": "relaxed serving only: draft validation decodes strictly",
    "relaxed_rule": "relaxed serving only: draft validation decodes strictly",
}


# Properties that change the target's weights but not the draft's: the draft names the target by the others.
TARGET_ONLY = {"num_beams": "the served K: AtSpeed validates its target at target_valid_beams and aligns its draft at "
                            "align_beams, so one target and one draft serve every K"}


def properties(*files) -> set[str]:
    keys = set()
    for f in files:
        keys |= set(yaml.safe_load(f.read_text()) or {})
    return keys


SHARED = [PROPERTIES / "overall.yaml", PROPERTIES / "paper_protocol.yaml", *sorted((PROPERTIES / "dataset").glob("*.yaml"))]


@pytest.mark.parametrize("model,files", [
    (GenRec, [*SHARED, PROPERTIES / "model" / "GenRec.yaml", *sorted((PROPERTIES / "dataset").glob("*/GenRec.yaml"))]),
    (AtSpeedS, [*SHARED, *sorted((PROPERTIES / "model").glob("*.yaml")), *sorted((PROPERTIES / "dataset").glob("*/*.yaml"))]),
], ids=["GenRec target", "AtSpeed draft"])
def test_every_property_is_in_the_cache_key_or_cannot_change_weights(model, files):
    # AtSpeed's own properties (set in a dataset file for the quick start, say) do not reach the target
    atspeed_only = properties(PROPERTIES / "model" / "AtSpeedS.yaml", PROPERTIES / "model" / "AtSpeedR.yaml") - \
        properties(PROPERTIES / "model" / "GenRec.yaml")
    exempt = atspeed_only if model is GenRec else set(TARGET_ONLY)
    unclassified = properties(*files) - set(model.checkpoint_keys) - set(NOT_WEIGHTS) - exempt
    assert not unclassified, f"add {sorted(unclassified)} to {model.__name__}.checkpoint_keys or NOT_WEIGHTS"


def test_the_teacher_data_is_keyed_by_its_own_properties_and_the_target():
    assert set(TEACHER_KEYS) <= set(AtSpeedS.checkpoint_keys)
    # a draft names its target's recipe
    assert set(GenRec.checkpoint_keys) - set(TARGET_ONLY) <= set(AtSpeedS.checkpoint_keys)
    assert {"target_valid_beams", "align_beams"} <= set(AtSpeedS.checkpoint_keys)


def test_no_property_is_both_in_a_key_and_declared_weightless():
    assert not set(NOT_WEIGHTS) & set(AtSpeedS.checkpoint_keys)
