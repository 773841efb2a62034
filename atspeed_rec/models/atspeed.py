"""AtSpeedS / AtSpeedR: a GenRec target served by speculative beam search with a small draft.

The target is the GenRec model of the same dataset and configuration: loaded from its
checkpoint when one exists, trained once (and saved) otherwise, then frozen. RecBole's trainer
trains only the draft. Evaluation decodes speculatively (strict top-K verification for
AtSpeedS, relaxed sampling verification for AtSpeedR) and reports, beside Recall and NDCG,
the speedup over the target's own beam search and the acceptance statistics (`SpecMeter`).
"""

from __future__ import annotations

import copy
import time

import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType, set_color

from atspeed_rec.decoding.beam_search import beam_search
from atspeed_rec.decoding.speculative import speculative_beam_search
from atspeed_rec.errors import ConfigError
from atspeed_rec.models.genrec import GenRec, beams_to_scores
from atspeed_rec.models.lm import build_lm
from atspeed_rec.recbole_glue.checkpoint import checkpoint_path, load_checkpoint
from atspeed_rec.recbole_glue.metrics import SpecMeter
from atspeed_rec.recbole_glue.trainer import SafeCheckpointTrainer

DRAFT_KEYS = ("draft_n_layers", "draft_hidden_size", "draft_n_heads", "draft_inner_size",
              "draft_dropout_prob", "draft_learning_rate", "draft_weight_decay", "draft_epochs")


class AtSpeedS(SequentialRecommender):
    """Strict top-K verification: exactly the target's beam search output, faster."""

    input_type = InputType.POINTWISE
    property_parents = ("GenRec",)  # the target's properties, then this model's
    verification = "strict"
    checkpoint_keys = (*GenRec.checkpoint_keys, *DRAFT_KEYS)

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.target = GenRec(config, dataset)
        for p in self.target.parameters():
            p.requires_grad_(False)  # the target is trained by GenRec's recipe, never here
        self.draft = build_lm(config, self.target.vocab, prefix="draft_")
        self.num_beams = self.target.num_beams
        self.draft_beams, self.gamma = int(config["draft_beams"]), int(config["gamma"])
        if self.draft_beams < self.num_beams:
            raise ConfigError(f"draft_beams={self.draft_beams} < num_beams={self.num_beams}: the draft "
                              f"must propose at least the K target beams; fix: --draft_beams={self.num_beams}")
        if self.gamma < 1:
            raise ConfigError(f"gamma={self.gamma}: the draft must propose at least one level; fix: --gamma=3")
        self.timed_batches = int(config["speedup_batches"])  # batches also decoded target-only
        self.generator = torch.Generator().manual_seed(int(config["seed"]))  # relaxed sampling
        self.spec_meter = SpecMeter()

    def calculate_loss(self, interaction):
        """The draft's next-code cross-entropy on the target's training windows."""
        return self.target.window_loss(self.draft, interaction)

    def speculative(self, input_ids, mask):
        return speculative_beam_search(
            self.target.lm, self.draft, self.target.trie, self.target.vocab, input_ids, mask,
            self.num_beams, self.draft_beams, self.gamma, mode=self.verification, generator=self.generator)

    def full_sort_predict(self, interaction):
        input_ids, mask = self.target.prompt(interaction)
        start = time.perf_counter()
        beams, stats = self.speculative(input_ids, mask)
        spec_seconds = time.perf_counter() - start
        target_seconds = None
        if self.spec_meter.timed_batches < self.timed_batches:  # the same batch, target only
            start = time.perf_counter()
            beam_search(self.target.lm, self.target.trie, self.target.vocab, input_ids, mask, self.num_beams)
            target_seconds = time.perf_counter() - start
        self.spec_meter.add(len(input_ids), float(stats.accepted_steps.sum()), float(stats.drafted_levels.sum()),
                            float(stats.target_calls.sum()), spec_seconds, target_seconds)
        return beams_to_scores(beams, self.n_items)  # [B, n_items]

    def predict(self, interaction):
        return self.target.predict(interaction)


class AtSpeedR(AtSpeedS):
    """Relaxed sampling verification: high-probability drafts accepted, fewer target calls."""

    property_parents = ("GenRec", "AtSpeedS")
    verification = "relaxed"


class AtSpeedTrainer(SafeCheckpointTrainer):
    """Stage 1: the GenRec target (reused from its checkpoint, or trained and saved). Stage 2:
    the draft, with its own recipe (`draft_learning_rate`, `draft_weight_decay`, `draft_epochs`)."""

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        self.ensure_target(train_data, valid_data, show_progress)
        self.logger.info(set_color("stage", "green") + ": training the draft")
        self.epochs = int(self.config["draft_epochs"])
        self.learning_rate = float(self.config["draft_learning_rate"])
        self.weight_decay = float(self.config["draft_weight_decay"])
        self.optimizer = self._build_optimizer(params=self.model.draft.parameters())
        return super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)

    def ensure_target(self, train_data, valid_data, show_progress) -> None:
        target = self.model.target
        target_config = copy.copy(self.config)
        target_config.final_config_dict = {**self.config.final_config_dict, "model": "GenRec",
                                           "metrics": ["Recall", "NDCG"], "valid_metric": "NDCG@10"}
        path = checkpoint_path(target_config, "GenRec", GenRec.checkpoint_keys)
        if path.is_file():
            load_checkpoint(target, path)
            self.logger.info(set_color("stage", "green") + f": reusing the GenRec target {path}")
            return
        self.logger.info(set_color("stage", "green") + f": training the GenRec target (saved to {path})")
        for p in target.parameters():
            p.requires_grad_(True)
        trainer = SafeCheckpointTrainer(target_config, target)
        trainer.fit(train_data, valid_data, saved=True, show_progress=show_progress)
        load_checkpoint(target, trainer.saved_model_file)  # the best epoch, not the last
        for p in target.parameters():
            p.requires_grad_(False)


AtSpeedS.trainer_class = AtSpeedTrainer
