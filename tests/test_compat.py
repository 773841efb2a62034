"""RecBole on numpy 2 / torch >= 2.6, with every patch scoped to RecBole."""

import io
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import recbole.trainer.trainer as recbole_trainer
from atspeed_rec import compat


def test_numpy_aliases_recbole_needs_exist():
    # RecBole's Config rebinds some of them (np.float = np.float_), so check what they mean
    for name in ("float", "int", "bool", "object", "str", "long", "complex", "unicode"):
        assert hasattr(np, name), name
    assert np.dtype(np.float) == np.float64 and np.float_ is np.float64
    assert np.complex_ is np.complex128 and np.unicode_ is np.str_ and np.bool8 is np.bool_


def test_recbole_trainer_reads_its_own_pickled_checkpoints(tmp_path):
    path = tmp_path / "ckpt.pth"
    state = {"state_dict": {"w": torch.ones(2)}, "config": types.SimpleNamespace(a=1)}
    recbole_trainer.torch.save(state, path, pickle_protocol=4)
    loaded = recbole_trainer.torch.load(path, map_location="cpu")
    assert loaded["config"].a == 1


def test_weights_only_loading_stays_on_everywhere_else():
    buffer = io.BytesIO()
    torch.save({"config": types.SimpleNamespace(a=1)}, buffer)
    buffer.seek(0)
    with pytest.raises(Exception, match="[Ww]eights only"):
        torch.load(buffer)


def test_recbole_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    path.write_bytes(b"previous checkpoint")

    def crash(obj, f, **kwargs):
        open(f, "wb").write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(compat.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        compat.atomic_torch_save({"x": 1}, path)
    assert path.read_bytes() == b"previous checkpoint"


def test_item_titles_starting_with_a_quote_load_intact(synth_root, in_tmp_dir):
    from recbole.data import create_dataset

    from atspeed_rec.recbole_glue.runner import build_config

    config = build_config("SASRec", "synth", [str(synth_root / "synth.yaml")],
                          {"data_path": str(synth_root)})
    data = create_dataset(config)
    assert data.item_num == 61  # 60 items + PAD
    tokens = data.field2id_token["title"]
    assert '"Quoted"' in set(tokens)
    brands = set(data.field2id_token["brand"])
    assert {"brand0", "brand1", "brand2", "brand3"} <= brands


def test_recbole_does_not_leave_autograd_anomaly_detection_on():
    from atspeed_rec.recbole_glue.registry import get_model_class

    get_model_class("SASRec")  # imports RecBole's sequential models, sine.py among them
    assert not torch.is_anomaly_enabled()


def test_recboles_known_future_warnings_are_silenced_and_no_others():
    code = """import warnings
import atspeed_rec
for module in ("recbole.data.dataset.dataset", "recbole.trainer.trainer", "mylib"):
    warnings.warn_explicit("from " + module, FutureWarning, "f.py", 1, module=module)
warnings.warn_explicit("`is_gradient_checkpointing` is deprecated", FutureWarning, "g.py", 1, module="peft")
warnings.warn_explicit("from recbole", UserWarning, "h.py", 1, module="recbole.config")
"""
    err = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True,
                         check=True).stderr
    assert "from recbole.data" not in err and "from recbole.trainer" not in err and "is_gradient" not in err
    assert "FutureWarning: from mylib" in err and "UserWarning: from recbole" in err


class Payload:
    """Unpickling this runs code: it writes the file named in its argument."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_recboles_pickled_caches_in_saved_are_never_unpickled(synth_root, in_tmp_dir):
    import pickle

    from atspeed_rec.recbole_glue.cli import main
    saved = in_tmp_dir / "saved"
    saved.mkdir()
    names = ["synth-SequentialDataset.pth", "synth-Dataset.pth", "synth-for-GenRec-dataloader.pth",
             "synth-for-SASRec-dataloader.pth", "custom-dataset.pth", "custom-dataloaders.pth"]
    for name in names:
        (saved / name).write_bytes(pickle.dumps(Payload(in_tmp_dir / f"ran-{name}")))
    for model in ("GenRec", "SASRec"):
        code = main([f"--model={model}", "--dataset=synth", f"--data_path={synth_root}",
                     f"--config_files={synth_root / 'synth.yaml'}", "--epochs=1", "--n_layers=1",
                     "--hidden_size=32", "--n_heads=2", "--inner_size=64", "--sid_codebook_size=8",
                     "--sid_source=collaborative"])
        assert code == 0
    code = main(["--model=GenRec", "--dataset=synth", f"--data_path={synth_root}",
                 f"--config_files={synth_root / 'synth.yaml'}", "--epochs=1", "--sid_codebook_size=8",
                 f"--dataset_save_path={saved / 'custom-dataset.pth'}",
                 f"--dataloaders_save_path={saved / 'custom-dataloaders.pth'}"])
    assert code == 0
    assert not list(in_tmp_dir.glob("ran-*")), "a pickle in saved/ was loaded"
