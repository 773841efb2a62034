"""RecBole's Trainer with checkpoints that cannot run code, named by the config that made them."""

from __future__ import annotations

from recbole.trainer import Trainer
from recbole.utils import set_color

from atspeed_rec.recbole_glue.checkpoint import checkpoint_path, config_key, load_checkpoint, save_checkpoint
from atspeed_rec.recbole_glue.metrics import SpecCollector


class SafeCheckpointTrainer(Trainer):
    """Best weights go to `<checkpoint_dir>/<Model>-<dataset>-<config hash>.safetensors`.

    The model class names the properties its weights depend on (`checkpoint_keys`). Evaluation
    also collects a speculative decoder's statistics (`SpecCollector`) when the model has them.
    """

    def __init__(self, config, model):
        super().__init__(config, model)
        self.eval_collector = SpecCollector(config)
        self.checkpoint_keys = type(model).checkpoint_keys
        self.saved_model_file = str(checkpoint_path(config, config["model"], self.checkpoint_keys))

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

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if eval_data and load_best_model:
            path = model_file or self.saved_model_file
            load_checkpoint(self.model, path)
            self.logger.info(f"Loading model parameters from {path}")
        return super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)
