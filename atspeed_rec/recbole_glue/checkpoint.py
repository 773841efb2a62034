"""Checkpoints that cannot run code: safetensors weights plus a JSON sidecar, written atomically.

A checkpoint's name holds a hash of the properties that determine the trained weights, so a
model trained once per dataset and configuration is found again (the AtSpeed models reuse
their GenRec target this way) and a changed property never loads stale weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from atspeed_rec.atomic import atomic_write, atomic_write_json, file_sha256, verified
from atspeed_rec.errors import ConfigError

# Properties every trained model depends on: the data, its split and the training recipe.
DATA_KEYS = ("dataset", "data_fingerprint", "load_col", "USER_ID_FIELD", "ITEM_ID_FIELD", "TIME_FIELD", "RATING_FIELD",
             "train_neg_sample_args", "user_inter_num_interval", "item_inter_num_interval",
             "val_interval", "eval_args", "MAX_ITEM_LIST_LENGTH", "seed")
TRAIN_KEYS = ("epochs", "learning_rate", "weight_decay", "train_batch_size", "stopping_step",
              "valid_metric", "eval_step", "clip_grad_norm", "lr_schedule", "learner")


# Properties hashed only when set: checkpoints trained before they existed keep their names.
OPTIONAL_KEYS = ("backbone_learning_rate", "first_code_kl")


def config_key(config, keys) -> str:
    """sha256 (hex, 16 chars) of the named properties' values (an `OPTIONAL_KEYS` one only when set)."""
    values = {k: config[k] for k in sorted(set(keys)) if k not in OPTIONAL_KEYS or config[k] is not None}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def checkpoint_path(config, name: str, keys) -> Path:
    return Path(config["checkpoint_dir"]) / f"{name}-{config['dataset']}-{config_key(config, keys)}.safetensors"


def save_checkpoint(module: torch.nn.Module, path, meta: dict) -> None:
    """Weights (safetensors) and `meta` with the weights' hash (JSON sidecar `<path>.json`), each
    replaced atomically."""
    path = Path(path)
    # safetensors' save_model stores tied weights (a draft's shared embeddings) once
    atomic_write(path, lambda tmp: save_model(module, tmp))
    write_sidecar(path, {**meta, "sha256": file_sha256(path)})


def write_sidecar(path, meta: dict) -> None:
    """The JSON sidecar `<path>.json` of a checkpoint, replaced atomically."""
    atomic_write_json(f"{path}.json", meta)


def load_checkpoint(module: torch.nn.Module, path) -> dict:
    """Load weights into `module` (shapes must match exactly); return the sidecar."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    sidecar = read_sidecar(path)
    if not verified(path, sidecar):
        raise ConfigError(f"checkpoint {path} is truncated or corrupted (its hash does not match its sidecar); "
                          f"fix: delete it and {path}.json, and rerun to train it again")
    try:
        missing, unexpected = load_model(module, str(path), strict=False,
                                         device=str(next(module.parameters()).device))
    except Exception as err:  # safetensors' header or data errors
        raise ConfigError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); fix: delete it and "
                          f"{path}.json, and rerun to train it again") from None
    if missing or unexpected:
        raise ConfigError(f"checkpoint {path} does not fit this model (missing {sorted(missing)[:3]}, "
                          f"unexpected {sorted(unexpected)[:3]}): it was built with other properties")
    return sidecar


def read_sidecar(path) -> dict:
    """The JSON sidecar of an artefact, {} when there is none; a damaged one is named with the fix."""
    side = Path(f"{path}.json")
    if not side.is_file():
        return {}
    try:
        return json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{side} is damaged ({err}); fix: delete {path} and {side}, and rerun") from None


def data_fingerprint(config) -> str:
    """sha256 (16 hex) of the dataset's atomic files: artefacts keyed by it are never reused on other data."""
    folder, name = Path(config["data_path"]), config["dataset"]
    digest = hashlib.sha256()
    for suffix in ("inter", "item", "user"):
        f = folder / f"{name}.{suffix}"
        if f.is_file():
            digest.update(suffix.encode() + bytes.fromhex(file_sha256(f)))
    return digest.hexdigest()[:16]


def save_training_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, path, meta: dict) -> None:
    """Weights and optimizer state (safetensors) with `meta` and the optimizer's hyper-parameters
    (JSON sidecar), each replaced atomically: what a killed run needs to go on, nothing that runs code."""
    path = Path(path)
    tensors = {f"model.{k}": v.detach().clone().contiguous() for k, v in module.state_dict().items()}
    opt = optimizer.state_dict()
    for index, state in opt["state"].items():
        for name, value in state.items():
            tensors[f"optim.{index}.{name}"] = torch.as_tensor(value).detach().clone().contiguous()
    atomic_write(path, lambda tmp: save_file(tensors, tmp))
    write_sidecar(path, {**meta, "param_groups": opt["param_groups"], "sha256": file_sha256(path)})


def load_training_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, path) -> dict:
    """Restore what `save_training_state` wrote; returns its meta, or {} when there is none."""
    path, side = Path(path), Path(f"{path}.json")
    if not (path.is_file() and side.is_file()):
        return {}
    meta = read_sidecar(path)
    if not verified(path, meta):
        raise ConfigError(f"training state {path} is truncated or corrupted (its hash does not match its sidecar); "
                          "fix: delete it and its .json to train from the last complete checkpoint or the start")
    tensors = load_file(str(path), device=str(next(module.parameters()).device))
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    missing, unexpected = module.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ConfigError(f"training state {path} does not fit this model (missing {sorted(missing)[:3]}, "
                          f"unexpected {sorted(unexpected)[:3]}); fix: delete it to train from the start")
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta
