import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import atspeed_rec  # noqa: E402,F401  (RecBole compatibility patches before anything else)
from synthetic import make_dataset  # noqa: E402


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A folder holding the synthetic dataset `synth` (RecBole atomic files)."""
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture
def in_tmp_dir(tmp_path, monkeypatch) -> Path:
    """Run in an empty folder: RecBole writes log/, log_tensorboard/ and saved/ into the cwd."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
