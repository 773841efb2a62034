"""`torch.compile` of an LM's transformer blocks for training, falling back to eager mode.

A LoRA training step of SmolLM2-135M on 2 CPU cores spends about a third of its time outside the
matmuls: norms, rotary embeddings, activations, casts and residual adds, each a separate eager op
over the whole batch. Compiling each block (inductor) fuses them: 18% shorter steps on an AMD EPYC
(docs/experiments.md). The first steps pay the compilation (about a minute; later runs reuse
inductor's on-disk cache). Inductor needs a C++ compiler on CPU: where compiling fails, a warning
says so and training goes on in eager mode. Only the training loss runs compiled: teacher forcing
keeps the eager blocks, and decoding never calls them (`fast_forward.py` runs their modules directly).
"""

from __future__ import annotations

import logging

import torch

from atspeed_rec.models.fast_forward import llama_parts


def compile_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a failed compilation raises: dynamo's, and inductor's own where torch has one."""
    try:
        from torch._inductor.exc import InductorError
    except ImportError:
        return (torch._dynamo.exc.TorchDynamoException,)
    return torch._dynamo.exc.TorchDynamoException, InductorError


class CompiledBlocks:
    """Runs training computations with the LM's blocks compiled (`enabled`), or eagerly after a failure.

    The compiled forwards are switched on for `run` only: teacher forcing and decoding elsewhere keep
    the eager blocks (the backward of a compiled forward needs nothing switched on)."""

    def __init__(self, lm, enabled: bool):
        self.blocks = list(llama_parts(lm)[0].layers)
        self.enabled = enabled
        self.forwards = None  # the blocks' compiled forwards, made at the first `run`

    def run(self, fn):
        """`fn()` (a forward pass through the blocks) with the blocks compiled; on a compilation
        failure, a warning, and `fn` again in eager mode (and eager from then on)."""
        if not self.enabled:
            return fn()
        if self.forwards is None:
            for block in self.blocks:
                block.compile(dynamic=True)  # window lengths and counts vary from batch to batch
            self.forwards = [block._compiled_call_impl for block in self.blocks]
        self._switch(self.forwards)
        try:
            return fn()
        except compile_errors() as err:
            first_line = (str(err).splitlines() or [""])[0][:200]
            logging.getLogger().warning(
                f"torch.compile of the LM's blocks failed ({type(err).__name__}: {first_line}); "
                "training goes on in eager mode (slower). Fix: install a C++ compiler (inductor needs one on "
                "CPU), or set --train_compile=False to skip compiling")
            self.enabled = False
            self._switch(None)
            return fn()
        finally:
            self._switch(None)

    def _switch(self, forwards) -> None:
        """Set (or, with None, clear) the compiled forward nn.Module.compile gave each block."""
        for i, block in enumerate(self.blocks):
            block._compiled_call_impl = None if forwards is None else forwards[i]
