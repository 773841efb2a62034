"""RecBole's Trainer with checkpoints that cannot run code, named by the config that made them."""

from __future__ import annotations

import math
from pathlib import Path

from recbole.trainer import Trainer
from recbole.utils import set_color

from atspeed_rec.errors import ConfigError
from atspeed_rec.recbole_glue.base import ProjectModel
from atspeed_rec.recbole_glue.checkpoint import (checkpoint_path, config_key, load_checkpoint, load_training_state, read_sidecar,
                                                 save_checkpoint, save_training_state, write_sidecar)
from atspeed_rec.recbole_glue.metrics import SpecCollector
from atspeed_rec.recbole_glue.optimizer import MasterWeightAdamW, has_low_precision

LR_SCHEDULES = ("constant", "cosine")


class SafeCheckpointTrainer(Trainer):
    """Best weights go to `<checkpoint_dir>/<Model>-<dataset>-<config hash>.safetensors`.

    The model class names the properties its weights depend on (`checkpoint_keys`). Evaluation
    also collects a speculative decoder's statistics (`SpecCollector`) when the model has them.
    """

    def __init__(self, config, model):
        super().__init__(config, model)
        self.eval_collector = SpecCollector(config)
        self._phase = "test"  # what `evaluate` is called for: "valid" inside `_valid_epoch`, "test" otherwise
        self.checkpoint_keys = type(model).checkpoint_keys
        self.saved_model_file = str(checkpoint_path(config, config["model"], self.checkpoint_keys))
        self.lr_schedule = config["lr_schedule"] or "constant"
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule={self.lr_schedule!r} is unknown; fix: choose one of {LR_SCHEDULES}")

    def _build_optimizer(self, **kwargs):
        """RecBole's optimizer over the model's parameter groups (`optimizer_groups`, where it has them);
        AdamW with float32 master weights (`optimizer.py`) where some trainable weight is bf16 (the
        LoRA adapters of a bf16 pretrained LM, or all its weights with `lora_r: 0`). Each group keeps its
        configured rate as `base_lr`."""
        params = kwargs.pop("params", None)
        if params is None:
            groups = getattr(self.model, "optimizer_groups", None)
            params = groups() if groups else self.model.parameters()
        params = list(params)
        learner = kwargs.get("learner", self.learner)
        if has_low_precision(params):
            if str(learner).lower() != "adamw":
                raise ConfigError(f"learner={learner} would update bf16 weights in bf16, which rounds most updates "
                                  "away; fix: --learner=adamw (float32 master weights), or --dtype=float32")
            optimizer = MasterWeightAdamW(params, lr=kwargs.get("learning_rate", self.learning_rate),
                                          weight_decay=kwargs.get("weight_decay", self.weight_decay))
        else:
            optimizer = super()._build_optimizer(params=params, **kwargs)
        for group in optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])  # what the schedule starts from (a resumed run too)
        if len(optimizer.param_groups) > 1:
            self.logger.info("learning rates: " + ", ".join(f"{g.get('name', i)} {g['lr']}"
                                                            for i, g in enumerate(optimizer.param_groups)))
        return optimizer

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        if not self.config["single_spec"] and self.config["local_rank"] != 0:
            return
        path = kwargs.pop("saved_model_file", self.saved_model_file)
        meta = {"model": self.config["model"], "dataset": self.config["dataset"], "epoch": epoch,
                "best_valid_score": self.best_valid_score,
                "config_key": config_key(self.config, self.checkpoint_keys),
                "config": {k: self.config[k] for k in sorted(set(self.checkpoint_keys))}}
        save_checkpoint(self.model, path, meta)
        if verbose:
            self.logger.info(set_color("Saving current", "blue") + f": {path}")

    @property
    def resume_file(self) -> Path:
        """Where the state after the last finished epoch is kept (weights and optimizer)."""
        return Path(self.saved_model_file).with_suffix(".resume.safetensors")

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        loss = super()._train_epoch(train_data, epoch_idx, loss_func, show_progress)
        self.save_resume_state(epoch_idx)
        return loss

    def save_resume_state(self, epoch_idx: int) -> None:
        """After every epoch: weights, optimizer moments and counters, so that a killed run goes on
        from the next epoch (a long CPU epoch is never lost)."""
        if not self.config["single_spec"] and self.config["local_rank"] != 0:
            return
        meta = {"epoch": epoch_idx, "best_valid_score": self.best_valid_score, "cur_step": self.cur_step,
                "best_valid_result": {k: float(v) for k, v in (self.best_valid_result or {}).items()},
                "config_key": config_key(self.config, self.checkpoint_keys)}
        save_training_state(self.model, self.optimizer, self.resume_file, meta)

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        self.schedule_learning_rate(len(train_data))
        result = super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)
        if saved and not Path(self.saved_model_file).is_file():  # fewer epochs than eval_step: keep the last
            self._save_checkpoint(self.epochs - 1, verbose=verbose)
        if saved:
            self.mark_complete(result)
        if self.config["single_spec"] or self.config["local_rank"] == 0:
            self.resume_file.unlink(missing_ok=True)
            Path(f"{self.resume_file}.json").unlink(missing_ok=True)
        return result

    def schedule_learning_rate(self, steps_per_epoch: int) -> None:
        """`lr_schedule: cosine`: the learning rate follows `cosine_schedule` over all epochs' steps."""
        if self.lr_schedule == "cosine":
            cosine_schedule(self.optimizer, steps_per_epoch * self.epochs, steps_per_epoch * self.start_epoch)

    def fit_or_resume(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False,
                      callback_fn=None):
        """`fit`, unless this configuration's checkpoint is complete (reused as it is) or partial
        (an interrupted run: training goes on from its last saved epoch)."""
        meta = self.checkpoint_meta()
        if meta.get("complete"):
            load_checkpoint(self.model, self.saved_model_file)
            self.logger.info(set_color("reusing", "blue") + f" the trained {meta['model']} {self.saved_model_file}")
            return meta["best_valid_score"], meta.get("best_valid_result")
        state = load_training_state(self.model, self.optimizer, self.resume_file)
        if state:  # an interrupted run: weights and optimizer after its last finished epoch
            for group in self.optimizer.param_groups:
                group["lr"] = group.get("base_lr", self.learning_rate)  # the schedule restarts from the configured rate
            self.start_epoch, self.cur_step = int(state["epoch"]) + 1, int(state["cur_step"])
            self.best_valid_score = float(state["best_valid_score"])
            self.best_valid_result = state["best_valid_result"] or None
            self.logger.info(set_color("resuming", "blue") + f" {self.config['model']} from epoch {self.start_epoch} "
                             f"with its optimizer state ({self.resume_file})")
        elif meta:
            load_checkpoint(self.model, self.saved_model_file)
            self.start_epoch, self.best_valid_score = int(meta["epoch"]) + 1, float(meta["best_valid_score"])
            self.logger.info(set_color("resuming", "blue") + f" {meta['model']} from epoch {self.start_epoch} "
                             f"({self.saved_model_file})")
        # this class's fit, not a subclass's stage orchestration that calls us
        return SafeCheckpointTrainer.fit(self, train_data, valid_data, verbose, saved, show_progress, callback_fn)

    def checkpoint_meta(self) -> dict:
        return read_sidecar(self.saved_model_file) if Path(self.saved_model_file).is_file() else {}

    def mark_complete(self, result) -> None:
        """Record in the sidecar that training finished (a later run reuses, not resumes, it)."""
        if not self.config["single_spec"] and self.config["local_rank"] != 0:
            return
        meta = self.checkpoint_meta()
        if meta:
            meta.update(complete=True, best_valid_score=float(result[0]),
                        best_valid_result={k: float(v) for k, v in (result[1] or {}).items()})
            write_sidecar(Path(self.saved_model_file), meta)

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if eval_data and load_best_model:
            path = model_file or self.saved_model_file
            load_checkpoint(self.model, path)
            self.logger.info(f"Loading model parameters from {path}")
        if isinstance(self.model, ProjectModel):
            self.model.start_evaluation(self._phase, eval_data)
        return super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)

    def _valid_epoch(self, valid_data, show_progress=False):
        self._phase = "valid"
        try:
            return super()._valid_epoch(valid_data, show_progress)
        finally:
            self._phase = "test"


def cosine_schedule(optimizer, total_steps: int, steps_done: int = 0) -> None:
    """After every `optimizer.step()` set each group's lr to lr0 * (1 + cos(pi * t / T)) / 2, with t the
    steps taken (`steps_done` of them before, for a resumed run) and T = `total_steps`: 0 at the end."""
    total, base = max(1, total_steps), [group["lr"] for group in optimizer.param_groups]
    taken = steps_done

    def set_lr(*_):
        factor = 0.5 * (1 + math.cos(math.pi * min(taken, total) / total))
        for group, lr in zip(optimizer.param_groups, base):
            group["lr"] = lr * factor

    def after_step(*_):
        nonlocal taken
        taken += 1
        set_lr()

    set_lr()
    optimizer.register_step_post_hook(after_step)
