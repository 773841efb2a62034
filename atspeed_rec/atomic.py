"""The one way this project writes a file: to a temporary name beside it, then `os.replace`; and
the hash that lets a reader tell a whole artefact from a truncated or corrupted one.

A crash or a kill mid-write never leaves half a file under the real name; readers see the old
file or the new one. Every artefact (checkpoints and their JSON sidecars, semantic IDs, teacher
data, text embeddings, result files, RecBole's own trainer checkpoints) goes through here.
"""

from __future__ import annotations

import hashlib
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


def file_sha256(path) -> str:
    """Hex sha256 of a file's bytes (kept in an artefact's sidecar to detect truncation or corruption)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verified(path, sidecar: dict) -> bool:
    """True when `path` still has the hash its sidecar recorded (sidecars without one: True)."""
    expected = sidecar.get("sha256")
    return expected is None or (Path(path).is_file() and file_sha256(path) == expected)
