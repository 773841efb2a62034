import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import atspeed_rec  # noqa: E402,F401  (RecBole compatibility patches before anything else)
from synthetic import make_dataset  # noqa: E402


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A folder holding the synthetic dataset `synth` (RecBole atomic files)."""
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine spinning threads cost 4x
    (a module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def in_tmp_dir(tmp_path, monkeypatch) -> Path:
    """Run in an empty folder: RecBole writes log/, log_tensorboard/ and saved/ into the cwd."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
