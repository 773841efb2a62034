"""Checks of a run's data that stop it before any training, with a message that names the fix.

- `validate_files(config)` (called by the runner's `check_config`): the dataset's `.inter` file is
  one RecBole can read as the protocol needs it (header, types, numeric and present times, ids);
  repeated lines are warned about.
- `validate_dataset(config, dataset)` (called by the runner after loading): what needs the loaded
  (filtered) dataset: enough items for the top-k lists and the semantic IDs, and users with
  enough interactions for the split.

Errors are `ConfigError`s of one line, `<problem>; fix: <what to do>`, as in `validation.py`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from atspeed_rec.errors import ConfigError
from atspeed_rec.recbole_glue.validation import _model_class, _warn, topk_cutoffs

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
    topk = topk_cutoffs(config)
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
    from atspeed_rec.semantic_ids.builder import TEXT_SOURCES

    if str(config["sid_source"]) in TEXT_SOURCES:
        from atspeed_rec.semantic_ids import embeddings as emb

        fields = config["sid_text_fields"]
        if not emb.text_fields(dataset, fields):
            wanted = ", ".join(fields if isinstance(fields, (list, tuple)) else [fields] if fields else
                               emb.DEFAULT_TEXT_FIELDS)
            raise ConfigError(f"sid_source={config['sid_source']}, but {name} has none of the item text fields "
                              f"({wanted}) loaded; fix: "
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
