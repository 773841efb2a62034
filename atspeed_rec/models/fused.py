"""Inference weights for the lean forward: LoRA merged, projections concatenated, prepacked on CPU.

A decoding pass of a Llama block through its modules makes 11 matmul calls when q and v carry LoRA
adapters (q, k, v, o, gate, up, down, and an A and a B per adapter), and each adapter adds its product
to the base layer's. At batch 1 most of those calls are a few rows, so the call, not the
arithmetic, is what costs. Here each block's projections become 4 matmuls on weights built once:

    W_qkv = [W_q + s_q B_q A_q ; W_k ; W_v + s_v B_v A_v]    (LoRA merged in float32, then the dtype)
    W_gu  = [W_gate ; W_up]        h += W_down (act(g) * u), (g, u) = split(W_gu x)

and on a CPU with oneDNN each is reordered once into oneDNN's blocked layout (what inductor's freezing
pass does), so no call re-reads a row-major weight. On the LLM target (SmolLM2-135M + LoRA, bf16, AMD
EPYC, 2 cores, batch 1, 100 test users) the target-only beam search ran 1.60x (K = 1) and 1.77x
(K = 10) faster than through the modules, strict speculative decoding 1.50x and 1.58x
(`benchmarks/fused.py`, docs/benchmarks.md).

Merging rounds W + s B A to the backbone's dtype once, where the modules add the adapters' own bf16
product to the base layer's: logits move by bf16 noise (on that target no farther from a float32 forward
than the modules' are), and near-tied beams may swap, as they do between batch sizes. Target-only
and speculative decoding both run this forward, so strict speculative output stays identical to the
target's beam search. Training never uses it (`lm_forward` is inference only): the weights are
built again whenever a source weight changes (an optimizer step, a loaded checkpoint: the tensors'
version counters). CPU only: on a GPU the copies would double the memory of the weights, and
decoding calls the modules.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

PACKED_DTYPES = (torch.float32, torch.bfloat16)


def packing_available() -> bool:
    """True where this torch build has oneDNN's CPU linear ops."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@dataclass
class Matmul:
    """y = x W^T + b, with W prepacked for oneDNN where possible."""

    weight: torch.Tensor  # [out, in], or oneDNN's opaque packed tensor
    bias: torch.Tensor | None
    packed: bool
    out_features: int

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> "Matmul":
        weight = weight.detach().contiguous()
        bias = None if bias is None else bias.detach().to(weight.dtype).contiguous()
        out = weight.shape[0]
        if weight.device.type == "cpu" and weight.dtype in PACKED_DTYPES and packing_available():
            return cls(torch.ops.mkldnn._reorder_linear_weight(weight, 16), bias, True, out)  # 16: a row-count hint
        return cls(weight, bias, False, out)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:  # no rows: oneDNN refuses an empty input
            return x.new_zeros(*x.shape[:-1], self.out_features)
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


@dataclass
class FusedBlock:
    """One decoder block's projections as 4 matmuls."""

    qkv: Matmul
    split: tuple[int, int, int]  # output widths of q, k, v in `qkv`
    o: Matmul
    gate_up: Matmul
    down: Matmul
    act: nn.Module

    def project_qkv(self, x: torch.Tensor):
        """x `[B, Q, D]` -> q `[B, Q, heads * hd]`, k and v `[B, Q, kv_heads * hd]`."""
        return self.qkv(x).split(self.split, dim=-1)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.act(gate) * up)


# ---- what a projection computes, as one weight -----------------------------------------------------
def _is_lora(module: nn.Module) -> bool:
    return type(module) is LoraLinear  # not its subclasses (quantized bases merge differently)


def _mergeable(module: nn.Module) -> bool:
    """A plain linear layer, or a peft LoRA linear layer whose active adapters are plain LoRA
    (no DoRA, no bias on B: what `get_delta_weight` fully describes)."""
    if _is_lora(module):
        return isinstance(module.base_layer, nn.Linear) and not any(
            module.use_dora.get(name, False) or getattr(module, "lora_bias", {}).get(name, False)
            for name in module.active_adapters)
    return isinstance(module, nn.Linear)


def _weight_and_bias(module: nn.Module):
    """(W, b) of y = W x + b that `module` computes at inference (LoRA merged in float32)."""
    if not _is_lora(module):
        return module.weight, module.bias
    base = module.base_layer
    weight = base.weight
    if not module.merged and not module.disable_adapters:
        delta = sum(module.get_delta_weight(name).float() for name in module.active_adapters
                    if name in module.lora_A)
        weight = (weight.float() + delta).to(weight.dtype)
    return weight, base.bias


def _concat(parts: list[tuple[torch.Tensor, torch.Tensor | None]]) -> Matmul:
    """(W, b) pairs side by side: one matmul whose output is theirs concatenated."""
    weight = torch.cat([w for w, _ in parts])
    if all(b is None for _, b in parts):
        return Matmul.of(weight, None)
    bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in parts])
    return Matmul.of(weight, bias)


def _block_modules(layer: nn.Module):
    attn, mlp = layer.self_attn, getattr(layer, "mlp", None)
    names = ("gate_proj", "up_proj", "down_proj", "act_fn")
    if mlp is None or not all(hasattr(mlp, n) for n in names):
        return None
    projections = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    return projections if all(_mergeable(m) for m in projections) else None


def _build(decoder: nn.Module) -> list[FusedBlock]:
    blocks = []
    for layer in decoder.layers:
        q, k, v, o, gate, up, down = (_weight_and_bias(m) for m in _block_modules(layer))  # each merged once
        blocks.append(FusedBlock(qkv=_concat([q, k, v]), split=tuple(int(w.shape[0]) for w, _ in (q, k, v)),
                                 o=_concat([o]), gate_up=_concat([gate, up]), down=_concat([down]),
                                 act=layer.mlp.act_fn))
    return blocks


def _sources(decoder: nn.Module) -> tuple[list[torch.Tensor], list[nn.Module]]:
    """The parameters and the LoRA layers the fused weights are built from."""
    modules = [m for layer in decoder.layers for m in _block_modules(layer)]
    return [p for m in modules for p in m.parameters()], [m for m in modules if _is_lora(m)]


def _state(params: list[torch.Tensor], loras: list[nn.Module]) -> list:
    """What the built weights depend on: each source tensor's storage and version, each adapter's
    switches (~0.2 ms for SmolLM2's 330 tensors, against ~40 ms a decode step)."""
    return [(p.data_ptr(), p._version, p.dtype) for p in params] + [
        (m.merged, m.disable_adapters, tuple(m.active_adapters), tuple(m.scaling.items())) for m in loras]


# ---- the public entry points -------------------------------------------------------------------------
_BUILT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # decoder -> (sources, state, blocks)
_OFF: weakref.WeakSet = weakref.WeakSet()  # decoders whose decoding calls the modules


def fused_blocks(decoder: nn.Module) -> list[FusedBlock] | None:
    """The decoder's blocks as fused matmuls, built on first use and again when a source weight
    changed in place (optimizer steps, loaded checkpoints, dtype casts); None where decoding should
    call the modules (not on a CPU, turned off by `modules_only`, or a block this cannot merge).

    A parameter *replaced* by another tensor object is not seen: build the model's modules first."""
    if decoder in _OFF or decoder.norm.weight.device.type != "cpu":
        return None
    built = _BUILT.get(decoder)
    if built is None:
        if any(_block_modules(layer) is None for layer in decoder.layers):
            return None
        built = (*_sources(decoder), None, None)
    params, loras, state, blocks = built
    now = _state(params, loras)
    if now != state:
        with torch.no_grad():
            blocks = _build(decoder)
        _BUILT[decoder] = (params, loras, now, blocks)
    return blocks


@contextlib.contextmanager
def modules_only(decoder: nn.Module):
    """Within the block, decoding calls the decoder's modules (benchmarks compare the two paths)."""
    before = decoder in _OFF
    _OFF.add(decoder)
    try:
        yield
    finally:
        if not before:
            _OFF.discard(decoder)
