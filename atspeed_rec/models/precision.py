"""The float dtype a model computes in: bfloat16 where the hardware runs it fast, float32 elsewhere.

Property `dtype`: `auto` (default), `float32` or `bfloat16`. `auto` picks bfloat16 for a pretrained
LLM target (`pretrained_path`) on a CUDA GPU with bf16 or a CPU with AMX-BF16 / AVX512-BF16
(measured on such a CPU: 1.45x faster decoding than float32 at SmolLM2-135M's size), and float32
for the small from-scratch models, whose passes are per-call overhead that bf16 does not shorten.
LoRA adapters take the backbone's dtype and train through float32 master copies; code-token rows stay float32.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from atspeed_rec.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@lru_cache(maxsize=None)
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.split(":", 1)[-1].split())


def bf16_is_fast(device) -> bool:
    """True where bf16 matmuls run in hardware: CUDA with bf16, or a CPU with AMX-BF16 / AVX512-BF16."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool({"amx_bf16", "avx512_bf16"} & _cpu_flags())


def resolve_dtype(value, device, pretrained: bool) -> torch.dtype:
    """The dtype for property `dtype` = `value` (auto | float32 | bfloat16) on `device`."""
    name = "auto" if value is None else str(value).lower()
    if name == "auto":
        return torch.bfloat16 if pretrained and bf16_is_fast(device) else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"dtype={value!r} is unknown; fix: --dtype=auto, --dtype=float32 or --dtype=bfloat16")
    return DTYPES[name]
