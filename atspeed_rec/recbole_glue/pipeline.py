"""The AtSpeed pipeline: the stages that make an AtSpeedS / AtSpeedR model, each logged and cached.

1. target: the GenRec model of the same dataset and configuration, reused from its checkpoint,
   resumed, or trained once (its own recipe, validated by NDCG@10 at `target_valid_beams` beams whatever
   K is served, so one target serves every K); then frozen;
2. teacher data: the target's top-K_train beams and distributions for the alignment samples
   (`alignment/teacher.py`; only for losses evaluated along the target's beams);
3. draft: trained by RecBole's trainer with (1 - alpha) CE + alpha L_align (`alignment/objective.py`;
   `align_loss` atspeed_s for AtSpeedS, atspeed_r for AtSpeedR) and its own recipe
   (`draft_learning_rate`, `draft_weight_decay`, `draft_epochs`), early-stopped on the accepted
   steps of speculative decoding on validation requests at K = `draft_valid_beams` (at K = N
   nothing is accepted, whatever the draft);
4. evaluation: the runner's test pass (the model's speculative `full_sort_predict`).

Every stage is reused when its cache is complete, and resumed when a run was interrupted.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from recbole.utils import set_color

from atspeed_rec.alignment.teacher import FORMAT as TEACHER_FORMAT
from atspeed_rec.alignment.teacher import SampleIndex, load_or_generate, select_samples
from atspeed_rec.recbole_glue.atspeed import TEACHER_KEYS
from atspeed_rec.recbole_glue.checkpoint import config_key, load_checkpoint
from atspeed_rec.recbole_glue.genrec import GenRec
from atspeed_rec.recbole_glue.trainer import SafeCheckpointTrainer
from atspeed_rec.recbole_glue.validation import topk_cutoffs


class AtSpeedTrainer(SafeCheckpointTrainer):
    """The stages of the module docstring. The draft has its own recipe (`draft_learning_rate`,
    `draft_weight_decay`, `draft_epochs`); every stage is reused when its cache is complete."""

    def fit_or_resume(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False,
                      callback_fn=None):
        """Target, teacher data, then the draft: each reused, resumed or made."""
        self.ensure_target(train_data, valid_data, show_progress)
        self.model.samples = self.alignment_samples(train_data._dataset, show_progress)
        self.logger.info(set_color("stage", "green") + f": the draft (align_loss={self.model.align.name}, "
                         f"alpha={self.model.align.alpha}, aligned at K={self.model.align.k})")
        self.epochs = int(self.config["draft_epochs"])
        self.learning_rate = float(self.config["draft_learning_rate"])
        self.weight_decay = float(self.config["draft_weight_decay"])
        self.eval_step = int(self.config["draft_eval_step"])
        self.optimizer = self._build_optimizer(params=self.model.draft.parameters())
        some = some_requests(valid_data, int(self.config["draft_valid_requests"]), self.config["seed"])
        if some is not None:
            self.logger.info(f"draft validation: accepted steps of {len(some._dataset)} of "
                             f"{len(valid_data._dataset)} requests at K={self.model.valid_beams}")
        return super().fit_or_resume(train_data, some, verbose, saved, show_progress, callback_fn)

    fit = fit_or_resume  # RecBole's entry point runs the same stages

    def target_config(self):
        """The target's own protocol: validated by NDCG@10 at `target_valid_beams` beams whatever K is served,
        so one trained target serves every K (its checkpoint is named by this config)."""
        config = copy.copy(self.config)
        beams = int(self.config["target_valid_beams"])
        config.final_config_dict = {**self.config.final_config_dict, "model": "GenRec", "num_beams": beams,
                                    "topk": sorted({k for k in topk_cutoffs(self.config) if k <= beams} | {10}),
                                    "metrics": ["Recall", "NDCG"], "valid_metric": "NDCG@10"}
        return config

    def ensure_target(self, train_data, valid_data, show_progress) -> None:
        target, config = self.model.target, self.target_config()
        trainer = SafeCheckpointTrainer(config, target)
        self.logger.info(set_color("stage", "green") + f": the GenRec target ({trainer.saved_model_file})")
        served, target.num_beams = target.num_beams, int(config["num_beams"])  # its validation's beam width
        try:
            trainer.fit_or_resume(train_data, valid_data, saved=True, show_progress=show_progress)
        finally:
            target.num_beams = served
        if not self.config["single_spec"]:
            torch.distributed.barrier()  # only rank 0 writes the checkpoint: the others wait for it
        load_checkpoint(target, trainer.saved_model_file)  # the best epoch, not the last

    def alignment_samples(self, train_dataset, show_progress) -> SampleIndex | None:
        align, target = self.model.align, self.model.target
        if not align.aligned:
            return None
        inter = train_dataset.inter_feat
        rows = select_samples(inter[target.USER_ID], int(self.config["teacher_per_user"]),
                              int(self.config["teacher_users"]), self.config["seed"])
        if not align.needs_teacher:  # positions along the true item or the draft's beams: no cache
            return SampleIndex(inter[target.USER_ID][rows], inter[target.POS_ITEM_ID][rows],
                               inter[target.ITEM_SEQ_LEN][rows])
        target_key = config_key(self.target_config(), GenRec.checkpoint_keys)
        key = config_key({**{k: self.config[k] for k in TEACHER_KEYS}, "target": target_key, "format": TEACHER_FORMAT},
                         ["target", "format", *TEACHER_KEYS])
        path = Path(self.config["checkpoint_dir"]) / f"teacher-{self.config['dataset']}-{key}.safetensors"
        distributed = not self.config["single_spec"]
        return load_or_generate(
            path, target, inter[rows], align.k_train, int(self.config["teacher_batch_size"]),
            meta={"target_checkpoint_key": target_key, **{k: self.config[k] for k in TEACHER_KEYS}},
            show_progress=show_progress, rank=self.config["local_rank"] if distributed else 0,
            world_size=self.config["world_size"] if distributed else 1)


def some_requests(loader, n: int, seed: int):
    """The evaluation `loader` cut to n requests drawn at random (seeded), or itself when n <= 0:
    early stopping on speculative decoding needs an acceptance estimate, not every user."""
    if loader is None or n <= 0 or n >= len(loader._dataset):
        return loader
    rows = torch.randperm(len(loader._dataset), generator=torch.Generator().manual_seed(seed))[:n]
    subset = loader._dataset.copy(loader._dataset.inter_feat[torch.sort(rows).values])
    return type(loader)(loader.config, subset, loader._sampler, shuffle=False)



