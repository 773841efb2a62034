"""What the runner and the trainers read from this project's RecBole models, declared once.

RecBole's own models have none of this; the runner falls back to RecBole's behaviour for them.
"""

from __future__ import annotations

from recbole.model.abstract_recommender import SequentialRecommender


class ProjectModel(SequentialRecommender):
    """A sequential recommender of this project (`GenRec`, `AtSpeedS`, `AtSpeedR`)."""

    # Models whose property files (`properties/model/<Name>.yaml`) load before this model's own.
    property_parents: tuple[str, ...] = ()
    # Properties the trained weights depend on: they name the checkpoint (`checkpoint.config_key`).
    checkpoint_keys: tuple[str, ...] = ()
    # Speculative-decoding statistics gathered during an evaluation (`metrics.SpecMeter`), or None.
    spec_meter = None

    def start_evaluation(self, phase: str, eval_data=None) -> None:
        """Called by the trainer before each evaluation; `phase` is "valid" or "test", `eval_data` its dataloader."""

    def decoding(self) -> str | None:
        """How the test split is decoded, for the log (None: nothing to say)."""
        return None
