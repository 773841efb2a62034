"""Run one model on one dataset through RecBole: config, data, model, trainer, evaluation.

The project's replacement for `recbole.quick_start.run_recbole`, which can only run RecBole's
built-in models (it looks the name up again) and imports ray. Multi-process runs go through
RecBole's own DDP path (`local_rank`, `world_size`, ... in the config), on gloo without CUDA.
"""

from __future__ import annotations

import contextlib
import faulthandler
import gc
import json
import logging
import os
import random
import signal
import socket
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import recbole
import torch
import yaml
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.utils import init_logger, init_seed, set_color

from atspeed_rec.atomic import atomic_write
from atspeed_rec.errors import ConfigError, DatasetNotFoundError
from atspeed_rec.recbole_glue.checkpoint import data_fingerprint
from atspeed_rec.recbole_glue.registry import get_model_class, get_trainer_class
from atspeed_rec.recbole_glue.data_checks import validate_dataset, validate_files
from atspeed_rec.recbole_glue.validation import check_result_file, topk_cutoffs, validate

PROPERTIES = Path(__file__).resolve().parents[2] / "properties"


def property_files(model_class: type, dataset: str, extra: list[str] | None = None) -> list[str]:
    """overall.yaml, the model's (after those of the models it builds on, `property_parents`),
    the dataset's (RecBole's order: a dataset file can size any model's budget), the dataset's
    files for those models (`dataset/<name>/<Model>.yaml`: e.g. amazon-beauty's LLM target), when
    present, then the user's."""
    models = [*getattr(model_class, "property_parents", ()), model_class.__name__]
    files = [PROPERTIES / "overall.yaml", *[PROPERTIES / "model" / f"{name}.yaml" for name in models],
             PROPERTIES / "dataset" / f"{dataset}.yaml",
             *[PROPERTIES / "dataset" / dataset / f"{name}.yaml" for name in models]]
    for f in extra or []:
        if not Path(f).is_file():
            raise ConfigError(f"config file '{f}' does not exist; fix the path given to --config_files")
    return [str(f) for f in [*files, *(extra or [])] if Path(f).is_file() and _has_properties(f)]


def _has_properties(path) -> bool:
    """False for a file of comments only (RecBole cannot merge it); an error for a non-mapping."""
    try:
        content = yaml.load(Path(path).read_text(), Loader=yaml.FullLoader)  # as RecBole reads it
    except yaml.YAMLError as err:
        raise ConfigError(f"property file {path} is not valid YAML: {err}") from None
    if content is not None and not isinstance(content, dict):
        raise ConfigError(f"property file {path} must hold `key: value` lines, not {type(content).__name__}")
    return content is not None


@contextlib.contextmanager
def argv_hidden():
    """RecBole's Config parses all of sys.argv; the runner passes everything explicitly."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved


def build_config(model: str, dataset: str, config_files=None, overrides=None) -> Config:
    model_class = get_model_class(model)
    files = property_files(model_class, dataset, config_files)
    try:
        with argv_hidden():
            config = Config(model=model_class, dataset=dataset, config_file_list=files,
                            config_dict=dict(overrides or {}))
    except (ValueError, NotImplementedError) as err:  # RecBole's own checks, clear but raised raw
        raise ConfigError(f"invalid configuration: {err}") from None
    if not any("load_col" in _properties_of(f) for f in files) and "load_col" not in (overrides or {}):
        load_columns_from_header(config)
    config["data_fingerprint"] = data_fingerprint(config)  # part of every trained artefact's key
    check_config(config)
    return config


def _properties_of(path) -> dict:
    return yaml.load(Path(path).read_text(), Loader=yaml.FullLoader) or {}


def _header(path: Path) -> list[str]:
    """Field names of an atomic file's header (`name:type` columns)."""
    with open(path, encoding="utf-8") as f:
        return [column.split(":")[0] for column in f.readline().rstrip("\n").split("\t")]


def load_columns_from_header(config: Config) -> None:
    """A dataset without a property file of its own: load what the protocol needs from its files.

    RecBole's default `load_col` is only the user and item ids, so ordering by time (`order: TO`)
    fails deep inside RecBole. Here the user, item, time and rating fields that the `.inter` file
    has are loaded, and the item file's text fields (for text semantic IDs)."""
    folder, name = Path(config["data_path"]), config["dataset"]
    inter = folder / f"{name}.inter"
    if not inter.is_file():
        return  # check_dataset names the missing file
    wanted = [config[k] for k in ("USER_ID_FIELD", "ITEM_ID_FIELD", "TIME_FIELD", "RATING_FIELD") if config[k]]
    columns = {"inter": [c for c in wanted if c in _header(inter)]}
    item = folder / f"{name}.item"
    if item.is_file():
        header = _header(item)
        if config["ITEM_ID_FIELD"] in header:
            columns["item"] = header
    config["load_col"] = columns


def check_config(config: Config) -> None:
    """Protocol mistakes that RecBole would otherwise report deep inside a library, or not at all."""
    validate(config)  # value ranges, choices, misspelt keys (validation.py)
    validate_files(config)  # the .inter file (data_checks.py)
    topk = topk_cutoffs(config)
    order = (config["eval_args"] or {}).get("order")
    inter_columns = (config["load_col"] or {}).get("inter") if isinstance(config["load_col"], dict) else None
    on_disk = (Path(config["data_path"]) / f"{config['dataset']}.inter").is_file()  # else check_dataset says so
    if on_disk and order == "TO" and inter_columns is not None and config["TIME_FIELD"] not in inter_columns:
        raise ConfigError(
            f"the protocol orders each user's interactions by time (eval_args order: TO, which RecBole requires "
            f"for sequential models), but the time field '{config['TIME_FIELD']}' is not loaded from "
            f"{config['dataset']}.inter; fix: add a '{config['TIME_FIELD']}:float' column to the file (the row "
            "number will do when the file lists each user's items in order), name your time column with "
            "--TIME_FIELD=NAME, or load it with --load_col=\"{'inter': [...]}\"")
    valid_metric = str(config["valid_metric"]).lower()
    if "@" in valid_metric and int(valid_metric.split("@")[1]) not in topk:
        raise ConfigError(f"valid_metric {config['valid_metric']} is not among topk={topk}; "
                          "fix: add its cut-off to topk or pick another valid_metric")


def _download_url(dataset: str) -> str | None:
    with open(Path(recbole.__file__).parent / "properties" / "dataset" / "url.yaml") as f:
        return yaml.safe_load(f).get(dataset)


def check_dataset(config: Config) -> None:
    """Fail clearly when the dataset is neither on disk nor downloadable."""
    folder, name = Path(config["data_path"]), config["dataset"]
    if (folder / f"{name}.inter").is_file():
        return
    url = _download_url(name)
    where = (f"looked for {folder / (name + '.inter')}; fix: put the RecBole atomic files there, "
             f"or pass --data_path=DIR where DIR/{name}/{name}.inter exists")
    if url is None:
        raise DatasetNotFoundError(f"dataset '{name}' was not found and RecBole cannot download it: {where}")
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10).close()
    except Exception as err:  # offline: DNS failure, refused connection, timeout...
        raise DatasetNotFoundError(
            f"dataset '{name}' is not on disk and its download ({url}) failed: {err}. {where}"
        ) from None


def _jsonable(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def run_single(model: str, dataset: str, config_files=None, overrides=None, saved: bool = True) -> dict:
    """Train, validate and test in this process (one rank of a DDP run when `local_rank` is set)."""
    start = time.time()
    config = build_config(model, dataset, config_files, overrides)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = logging.getLogger()
    logger.info(set_color("stage", "green") + f": config ready for {config['model']} on {config['dataset']}")
    logger.info(config)
    check_dataset(config)

    logger.info(set_color("stage", "green") + ": loading and splitting the dataset")
    data = create_dataset(config)
    validate_dataset(config, data)  # enough items for the beams and cut-offs, non-empty splits
    logger.info(data)
    train_data, valid_data, test_data = data_preparation(config, data)

    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model_class = get_model_class(model)
    net = model_class(config, train_data._dataset).to(config["device"])
    logger.info(net)
    trainer = get_trainer_class(model_class, config)(config, net)
    distributed = not config["single_spec"]
    if distributed:  # every rank must read the checkpoint rank 0 writes (its name holds a timestamp)
        name = [trainer.saved_model_file]
        torch.distributed.broadcast_object_list(name, src=0)
        trainer.saved_model_file = name[0]

    logger.info(set_color("stage", "green") + ": training")
    # this project's trainers reuse a finished checkpoint of the same properties, or resume a killed run
    fit = getattr(trainer, "fit_or_resume", trainer.fit)
    best_valid_score, best_valid = fit(train_data, valid_data, saved=saved, show_progress=config["show_progress"])
    if distributed:
        torch.distributed.barrier()  # rank 0 has written the best checkpoint
    decoding = getattr(net, "decoding", None)  # e.g. AtSpeed models: how the test split is decoded
    logger.info(set_color("stage", "green") + ": testing" + (f" ({decoding()})" if decoding else ""))
    test = trainer.evaluate(test_data, load_best_model=saved, show_progress=config["show_progress"])
    logger.info(set_color("best valid ", "yellow") + f": {dict(best_valid or {})}")
    logger.info(set_color("test result", "yellow") + f": {dict(test)}")
    result = {
        "model": config["model"],
        "dataset": config["dataset"],
        "best_valid_score": float(best_valid_score),
        "best_valid": {k: float(v) for k, v in (best_valid or {}).items()},
        "test": {k: float(v) for k, v in test.items()},
        "wall_time_s": round(time.time() - start, 2),
        "config": _jsonable(dict(config.final_config_dict)),
    }
    if distributed:
        # Free the DDP model before the process group: a Reducer that outlives
        # destroy_process_group() joins gloo's worker threads in its destructor and can hang.
        torch.distributed.barrier()
        del trainer, net
        gc.collect()
        torch.distributed.destroy_process_group()
    return result


def _free_port() -> int:
    """A free port for rank 0's store, below the kernel's ephemeral range where it can: an ephemeral
    port can be handed to another rank's own socket while it retries connecting before rank 0
    listens, and TCP then connects that socket to itself, leaving both ranks waiting on each other."""
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        pick = random.Random()  # seeded by the OS, not the run's seed: two runs at once pick apart
        for port in (pick.randrange(max(1024, low // 2), low) for _ in range(50)):
            with socket.socket() as s, contextlib.suppress(OSError):
                s.bind(("127.0.0.1", port))
                return port
    with socket.socket() as s:  # no such range (not Linux) or none free: any port the kernel gives
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup quota (a container's
    `--cpus`), which `os.cpu_count()` ignores; threads beyond it spin against each other."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]  # e.g. "200000 100000"
        if quota != "max":
            cpus = min(cpus, max(1, int(quota) // int(period)))
    return cpus


def _rank_main(rank: int, nproc: int, port: int, args: tuple, result_path: str) -> None:
    torch.set_num_threads(max(1, available_cpus() // nproc))
    if "lo" in {name for _, name in socket.if_nameindex()}:
        # ranks on one machine talk over loopback: gloo otherwise picks the address the hostname
        # resolves to, which in some containers is an interface the ranks cannot reach each other on
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    model, dataset, config_files, overrides = args
    ddp = {"local_rank": rank, "world_size": nproc, "nproc": nproc, "offset": 0,
           "ip": "127.0.0.1", "port": str(port)}
    result = run_single(model, dataset, config_files, {**(overrides or {}), **ddp})
    if rank == 0:  # a file, not a queue: a result over a pipe's 64 KB would block rank 0 in put()
        Path(result_path).write_text(json.dumps(result))  # while the parent waits for it to exit


def _stacks_on_request(rank: int, fn, *args) -> None:
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the parent asks before ending a hung rank
    fn(rank, *args)


def spawn_ranks(fn, nproc: int, args: tuple) -> None:
    """Run `fn(rank, *args)` on `nproc` processes and wait for all of them. A rank that fails ends
    the others (torch's spawn); an interrupted parent (Ctrl-C, a test's timeout) prints every
    rank's stacks and ends them too, instead of leaving them to hang the interpreter's exit."""
    ranks = torch.multiprocessing.start_processes(_stacks_on_request, args=(fn, *args), nprocs=nproc,
                                                  join=False, start_method="spawn")
    try:
        while not ranks.join(timeout=1):  # wake each second: Python runs a signal's handler (Ctrl-C) only
            pass                          # in the main thread, and a wait without a timeout may never return
    except BaseException:
        alive = [p for p in ranks.processes if p.is_alive()]  # none when a rank failed: torch ended the rest
        for p in alive:  # one at a time, so the stacks do not interleave on the shared stderr
            os.kill(p.pid, signal.SIGUSR1)
            time.sleep(0.5)
        for p in alive:
            p.terminate()
            p.join(10)
            if p.is_alive():
                p.kill()
        raise


def run(model: str, dataset: str, config_files=None, overrides=None, nproc: int = 1,
        result_file: str | None = None) -> dict:
    """Run once (or on `nproc` processes) and optionally write the result as JSON."""
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")
    check_result_file(result_file)  # before training: results are never lost to a bad path
    start = time.time()
    if nproc == 1:
        result = run_single(model, dataset, config_files, overrides)
    else:
        # Validate in the parent, so a bad name fails once and clearly, not in N children.
        config = build_config(model, dataset, config_files, overrides)
        check_dataset(config)
        # RecBole's ensure_dir races when ranks create the same folders at once.
        for folder in (Path("log") / config["model"], Path(config["checkpoint_dir"])):
            folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as folder:
            result_path = str(Path(folder) / "rank0.json")
            spawn_ranks(_rank_main, nproc, (nproc, _free_port(), (model, dataset, config_files, overrides),
                                            result_path))
            result = json.loads(Path(result_path).read_text())
        result["nproc"] = nproc
        result["wall_time_s"] = round(time.time() - start, 2)
    if result_file:
        atomic_write(result_file, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))
    return result
