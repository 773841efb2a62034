"""Linear layers that run on oneDNN-prepacked weights at inference on CPU: the same model, faster.

`F.linear` on CPU gives oneDNN the weight in PyTorch's row-major layout on every call; a weight
reordered once into oneDNN's own blocked layout (what inductor's freezing pass does) skips that work.
On the LLM target (SmolLM2-135M + LoRA, bf16, AMD EPYC, 2 cores, 100 test users at batch 1,
interleaved: `benchmarks/packed.py`) the target-only beam search was 1.06x (K = 1) and 1.12x
(K = 10) faster, strict speculative decoding 1.14x and 1.11x. The matmuls compute the same
products; bf16 outputs matched `F.linear`'s bit for bit at the shapes tested, float32 ones at one or
two rows differ in the last bit (another kernel), so near-tied beams may swap, as they do between
batch sizes (docs/benchmarks.md, bf16 strictness).

`prepack_linears(model)` turns each `nn.Linear` of a model into a `PackedLinear` (the class only:
same parameters, state dict, peft wrapping and training path). Its packed copy is made on the first
call that needs no gradient and made again whenever the weight changes (an optimizer step, a loaded
checkpoint: the tensor's version counter); calls that record gradients, run under `torch.compile`,
or are not on a CPU with oneDNN take the plain `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PACKED_DTYPES = (torch.float32, torch.bfloat16)


def packing_available() -> bool:
    """True where this torch build has oneDNN's CPU linear ops."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Linear):
    """An `nn.Linear` whose inference calls on CPU read a oneDNN-prepacked copy of the weight."""

    def _packed_weight(self) -> torch.Tensor:
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype, w.shape)
        cached = self.__dict__.get("_packed")
        if cached is None or cached[0] != key:
            packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 16)  # 16: a row-count hint, any works
            cached = self.__dict__["_packed"] = (key, packed)
        return cached[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (x.device.type != "cpu" or w.device.type != "cpu" or x.dtype != w.dtype or w.dtype not in PACKED_DTYPES
                or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
                or torch.compiler.is_compiling() or x.numel() == 0
                or (self.bias is not None and self.bias.dtype != w.dtype)):
            return F.linear(x, w, self.bias)
        bias = None if self.bias is None else self.bias.detach()
        return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight(), bias, "none", [], "")

    def __getstate__(self):  # copies and pickles re-pack lazily: an opaque oneDNN tensor has no storage to copy
        state = super().__getstate__().copy()
        state.pop("_packed", None)
        return state


def prepack_linears(model: nn.Module) -> int:
    """Make every plain `nn.Linear` of `model` a `PackedLinear` (in place); the number turned. A no-op
    where oneDNN is missing."""
    if not packing_available():
        return 0
    layers = [m for m in model.modules() if type(m) is nn.Linear]
    for m in layers:
        m.__class__ = PackedLinear
    return len(layers)
