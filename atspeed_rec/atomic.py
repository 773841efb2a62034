"""The one way this project writes a file: to a temporary name beside it, then `os.replace`.

A crash or a kill mid-write never leaves half a file under the real name; readers see the old
file or the new one. Every artefact (checkpoints and their JSON sidecars, semantic IDs, teacher
data, text embeddings, result files, RecBole's own trainer checkpoints) goes through here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable


def atomic_write(path, write: Callable[[str], object]) -> None:
    """Call `write(tmp)` to fill a temporary file, then move it over `path` (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path, data) -> None:
    """`data` as indented JSON at `path`, atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1, default=str)))
