"""Model lookup: this project's models first, RecBole's built-ins second.

RecBole's own `get_model` imports its `exlib_recommender` package on the way, so an unknown
name fails with "No module named 'lightgbm'"; here it fails with the list of known models.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from pathlib import Path

import recbole
from recbole.utils import get_trainer

from atspeed_rec.errors import UnknownModelError

# RecBole's model packages, without exlib_recommender (needs lightgbm / xgboost).
_RECBOLE_PACKAGES = (
    "general_recommender",
    "context_aware_recommender",
    "sequential_recommender",
    "knowledge_aware_recommender",
)
_RECBOLE_MODEL_YAMLS = Path(recbole.__file__).parent / "properties" / "model"


def project_models() -> dict[str, tuple[type, type]]:
    """Name -> (model class, trainer class) of the models this project defines (imported on first
    use: they import torch, transformers and the decoders)."""
    from atspeed_rec.recbole_glue.atspeed import AtSpeedR, AtSpeedS
    from atspeed_rec.recbole_glue.genrec import GenRec
    from atspeed_rec.recbole_glue.pipeline import AtSpeedTrainer
    from atspeed_rec.recbole_glue.trainer import SafeCheckpointTrainer

    return {"GenRec": (GenRec, SafeCheckpointTrainer), "AtSpeedS": (AtSpeedS, AtSpeedTrainer),
            "AtSpeedR": (AtSpeedR, AtSpeedTrainer)}


def recbole_models() -> dict[str, str]:
    """Name -> RecBole package of every built-in model importable without extra libraries."""
    found = {}
    for yaml_file in sorted(_RECBOLE_MODEL_YAMLS.glob("*.yaml")):
        name = yaml_file.stem
        for package in _RECBOLE_PACKAGES:
            if importlib.util.find_spec(f"recbole.model.{package}.{name.lower()}"):
                found[name] = package
                break
    return found


def available_models() -> list[str]:
    return sorted(project_models()) + sorted(recbole_models())


def get_model_class(name: str) -> type:
    """The class for `name` (case-insensitive), or an UnknownModelError listing what exists."""
    ours = project_models()
    theirs = recbole_models()
    by_lower = {n.lower(): n for n in list(theirs) + list(ours)}  # ours win on a clash
    proper = by_lower.get(str(name).lower())
    if proper in ours:
        return ours[proper][0]
    if proper in theirs:
        module = importlib.import_module(f"recbole.model.{theirs[proper]}.{proper.lower()}")
        return getattr(module, proper)
    close = difflib.get_close_matches(str(name), list(by_lower.values()), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UnknownModelError(
        f"unknown model '{name}'.{hint}\n"
        f"  this project's models: {', '.join(sorted(ours)) or '(none)'}\n"
        f"  RecBole's models: {', '.join(sorted(theirs))}\n"
        f"  fix: pass one of these names with --model=NAME"
    )


def get_trainer_class(model_class: type, config) -> type:
    """This project's trainer for its models; RecBole's choice for RecBole's."""
    trainers = {model: trainer for model, trainer in project_models().values()}
    return trainers.get(model_class) or get_trainer(config["MODEL_TYPE"], config["model"])
