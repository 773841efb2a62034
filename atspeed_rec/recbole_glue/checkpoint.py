"""Checkpoints that cannot run code: safetensors weights plus a JSON sidecar, written atomically.

A checkpoint's name holds a hash of the properties that determine the trained weights, so a
model trained once per dataset and configuration is found again (the AtSpeed models reuse
their GenRec target this way) and a changed property never loads stale weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from atspeed_rec.errors import ConfigError

# Properties every trained model depends on: the data, its split and the training recipe.
DATA_KEYS = ("dataset", "load_col", "user_inter_num_interval", "item_inter_num_interval",
             "val_interval", "eval_args", "MAX_ITEM_LIST_LENGTH", "seed")
TRAIN_KEYS = ("epochs", "learning_rate", "weight_decay", "train_batch_size", "stopping_step",
              "valid_metric", "eval_step", "clip_grad_norm", "lr_schedule", "learner")


def config_key(config, keys) -> str:
    """sha256 (hex, 16 chars) of the named properties' values."""
    values = {k: config[k] for k in sorted(set(keys))}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def checkpoint_path(config, name: str, keys) -> Path:
    return Path(config["checkpoint_dir"]) / f"{name}-{config['dataset']}-{config_key(config, keys)}.safetensors"


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(module: torch.nn.Module, path, meta: dict) -> None:
    """Weights (safetensors) and `meta` (JSON sidecar `<path>.json`), each replaced atomically."""
    path = Path(path)
    # safetensors' save_model stores tied weights (a draft's shared embeddings) once
    _atomic(path, lambda tmp: save_model(module, str(tmp)))
    write_sidecar(path, meta)


def write_sidecar(path, meta: dict) -> None:
    """The JSON sidecar `<path>.json` of a checkpoint, replaced atomically."""
    _atomic(Path(f"{path}.json"), lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1, default=str)))


def load_checkpoint(module: torch.nn.Module, path) -> dict:
    """Load weights into `module` (shapes must match exactly); return the sidecar."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    missing, unexpected = load_model(module, str(path), strict=False, device=str(next(module.parameters()).device))
    if missing or unexpected:
        raise ConfigError(f"checkpoint {path} does not fit this model (missing {sorted(missing)[:3]}, "
                          f"unexpected {sorted(unexpected)[:3]}): it was built with other properties")
    sidecar = Path(f"{path}.json")
    return json.loads(sidecar.read_text()) if sidecar.is_file() else {}
