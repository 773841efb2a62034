"""Make RecBole 1.2.1 run on today's numpy 2, torch >= 2.6 and CPU-only torch.distributed.

Applied once, on `import atspeed_rec`, before any RecBole `Config` is built. Every patch is
scoped to RecBole's own modules; nothing here changes torch or numpy for other code. One patch is
for safety, not compatibility: RecBole's dataset and dataloader caches (pickles in `saved/`) are
never read.
See ../shared/reference/recbole-notes.md for what breaks without each patch.
"""

from __future__ import annotations

import csv
import logging
import os
import socket
import types
import warnings

import numpy as np
import pandas as pd
import torch

from atspeed_rec.atomic import atomic_write

_APPLIED = False

# numpy 2 removed these aliases; RecBole's Config (`compatibility_settings`), dataset and metric
# code still use them, and ray uses bool8.
_NUMPY_ALIASES = {
    "float": float, "int": int, "bool": bool, "object": object, "str": str, "long": int,
    "complex": complex, "unicode": str, "float_": np.float64, "complex_": np.complex128,
    "unicode_": np.str_, "bool8": np.bool_,
}


def _numpy_aliases() -> None:
    for name, value in _NUMPY_ALIASES.items():
        if name not in np.__dict__:
            setattr(np, name, value)


def atomic_torch_save(obj, path, **kwargs) -> None:
    """torch.save through `atomic_write`: a crash never leaves half a file."""
    atomic_write(os.fspath(path), lambda tmp: torch.save(obj, tmp, **kwargs))


def _recbole_torch() -> types.ModuleType:
    """A stand-in for `torch` inside recbole.trainer.trainer only.

    RecBole pickles its whole Config into its .pth checkpoints, so they can only be read with
    weights_only=False; this allows that for RecBole's own trainer (which wrote the file in the
    same run) and nowhere else. Its saves become atomic.
    """
    proxy = types.ModuleType("torch")
    proxy.__dict__.update(torch.__dict__)
    proxy.load = lambda f, *a, **kw: torch.load(f, *a, **{"weights_only": False, **kw})
    proxy.save = atomic_torch_save
    return proxy


def _recbole_pandas() -> types.ModuleType:
    """A stand-in for `pandas` inside recbole.data.dataset.dataset only.

    Atomic files are plain tab-separated text with no quoting, but RecBole reads them with
    pandas' default quote handling, so a title that starts with a double quote (six in Amazon
    Beauty) breaks the parse or swallows the following fields. Read them with quoting off.
    """
    proxy = types.ModuleType("pandas")
    proxy.__dict__.update(pd.__dict__)
    proxy.read_csv = lambda *a, **kw: pd.read_csv(*a, **{"quoting": csv.QUOTE_NONE, **kw})
    return proxy


def _ddp(module, device_ids=None, **kwargs):
    """DistributedDataParallel that accepts RecBole's `device_ids=[rank]` for a CPU module."""
    on_cpu = next(module.parameters()).device.type == "cpu"
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=None if on_cpu else device_ids, **kwargs
    )


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _loopback_interface() -> str:
    """The name of the loopback network interface (`lo` on Linux, `lo0` on macOS)."""
    return next((name for _, name in socket.if_nameindex() if name.startswith("lo")), "lo")


def _init_device(self) -> None:
    """RecBole's Config._init_device, with gloo instead of a hard-coded nccl when there is no CUDA."""
    cfg = self.final_config_dict
    gpu_id = cfg["gpu_id"]
    cfg["gpu_id"] = ",".join(map(str, gpu_id)) if isinstance(gpu_id, tuple) else str(gpu_id)
    use_cuda = torch.cuda.is_available() and cfg.get("use_gpu", True) and len(cfg["gpu_id"]) > 0
    if "local_rank" not in cfg:  # single process
        cfg["single_spec"] = True
        cfg["local_rank"] = 0
        cfg["device"] = torch.device("cuda") if use_cuda else torch.device("cpu")
        return
    rank = cfg["local_rank"]
    if not use_cuda and cfg["ip"] in LOOPBACK:
        # Gloo binds to the address the host name resolves to; on machines where that is an
        # interface that drops traffic, the ranks never meet and the run hangs. One machine: loopback.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", _loopback_interface())
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            rank=rank + cfg["offset"],
            world_size=cfg["world_size"],
            init_method=f"tcp://{cfg['ip']}:{cfg['port']}",
        )
    if use_cuda:
        torch.cuda.set_device(rank)
    cfg["device"] = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    cfg["single_spec"] = False
    if rank != 0:  # RecBole's convention: only rank 0 logs and shows progress
        cfg["state"] = "error"
        cfg["show_progress"] = False
        cfg["verbose"] = False


def _dataset_class(config):
    """The dataset class RecBole's `create_dataset` picks for the model."""
    import importlib

    from recbole.utils import ModelType
    module = importlib.import_module("recbole.data.dataset")
    if hasattr(module, config["model"] + "Dataset"):
        return getattr(module, config["model"] + "Dataset")
    by_type = {ModelType.SEQUENTIAL: "SequentialDataset", ModelType.KNOWLEDGE: "KnowledgeBasedDataset"}
    return getattr(module, by_type.get(config["MODEL_TYPE"], "Dataset"))


def _ignored_pickle(path: str) -> None:
    if os.path.exists(path):
        logging.getLogger().warning(f"not reading {path}: RecBole's cache is a pickle, which can run code when "
                                    "loaded; the data is built from the atomic files instead")


def create_dataset(config):
    """RecBole's `create_dataset` without its cache: the dataset is always built from the atomic files.
    RecBole would unpickle `<checkpoint_dir>/<dataset>-<Class>.pth` (or `dataset_save_path`) whenever it
    exists, and a planted pickle runs any code it likes."""
    dataset_class = _dataset_class(config)
    default = os.path.join(config["checkpoint_dir"], f'{config["dataset"]}-{dataset_class.__name__}.pth')
    _ignored_pickle(config["dataset_save_path"] or default)
    dataset = dataset_class(config)
    if config["save_dataset"]:
        dataset.save()
    return dataset


def load_split_dataloaders(config):
    """RecBole's `load_split_dataloaders`, which never reads its pickle: the split is made afresh."""
    default = os.path.join(config["checkpoint_dir"], f'{config["dataset"]}-for-{config["model"]}-dataloader.pth')
    _ignored_pickle(config["dataloaders_save_path"] or default)
    return None


def _quiet_known_warnings() -> None:
    """RecBole 1.2.1's FutureWarnings on pandas 2.x / torch 2.x (chained assignment, `Series.agg(len)`,
    `torch.cuda.amp.GradScaler`) and the one transformers raises when peft probes its renamed
    `is_gradient_checkpointing`: printed on every run, nothing a user can act on. pandas 3, where
    RecBole's chained assignments would stop working, is excluded by the install (setup.cfg). Scoped
    to RecBole's modules and that one message; every other warning still shows."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"recbole\.")
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def apply() -> None:
    """Apply every patch once; safe to call again."""
    global _APPLIED
    if _APPLIED:
        return
    _numpy_aliases()
    _quiet_known_warnings()
    import recbole.config.configurator as configurator
    import recbole.data.dataset.dataset as dataset
    import recbole.trainer.trainer as trainer

    import recbole.model.sequential_recommender  # noqa: F401  (imports sine.py, see below)

    # RecBole's sine.py switches autograd anomaly detection on for the whole process when it is
    # imported (any sequential model imports it): every backward pass then runs several times
    # slower. Importing it here, once, and switching detection back off ends that.
    torch.autograd.set_detect_anomaly(False)
    import recbole.data
    import recbole.data.utils as data_utils

    data_utils.create_dataset = recbole.data.create_dataset = create_dataset  # no pickled caches read
    data_utils.load_split_dataloaders = load_split_dataloaders
    configurator.Config._init_device = _init_device
    dataset.pd = _recbole_pandas()
    trainer.torch = _recbole_torch()
    trainer.DistributedDataParallel = _ddp
    _APPLIED = True
