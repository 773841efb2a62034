"""The text every prompt starts with, encoded once per model and reused by every request (prefix caching).

An LLM target's prompt is `[pads][prefix text][history codes]` (`pretrained.TextPrompt`). The prefix
(SmolLM2: "The user has purchased: ", 6 tokens) is the same in every request and has the same position
ids (0..p-1: positions count real tokens only), so its keys and values are the same too. Encoding it
once per model saves every request's first passes those tokens, for the target-only search and
speculative decoding alike (LLM servers call this prefix caching): on 2 CPU cores, amazon-beauty's
prompts of ~34 tokens, batch 1, K = 1, 3-5 ms a request, 1.10x faster speculative requests
(`benchmarks/prefix.py`, docs/benchmarks.md).

`register_prefix(model, ids)` says which tokens a model's prompts start with. `split_prefix` turns a
batch of prompts into the tokens still to feed plus each model's cached prefix KV; the cache then
holds `[prefix][pads][history]`, and the attention mask it returns (`[ones(p)][the rest's mask]`) is
the one every later pass must use, so each token keeps its position and what it sees. The prefix's KV
is built by the lean forward on first use and again whenever a weight changes (tensor version
counters, as `fused.py` does), so a draft in training never reads a stale one.
"""

from __future__ import annotations

import contextlib
import weakref

import torch

from atspeed_rec.models.fast_forward import KV, causal_prompt_mask, llama_parts, lm_dtype, lm_forward
from atspeed_rec.models.fused import fused_blocks
from atspeed_rec.models.vocab import CodeVocab

_KV: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # decoder -> (sources, state, prefix KV [1, ...])


def register_prefix(model, prefix_ids: torch.Tensor | None) -> None:
    """Every prompt `model` is given starts (after its padding) with `prefix_ids [p]`; None or empty: no prefix."""
    decoder, _ = llama_parts(model)
    decoder.prompt_prefix_ids = tuple(prefix_ids.tolist()) if prefix_ids is not None else ()
    _KV.pop(decoder, None)


def registered_prefix(model) -> tuple[int, ...]:
    return getattr(llama_parts(model)[0], "prompt_prefix_ids", ())


@contextlib.contextmanager
def whole_prompts(model):
    """Within the block, decoding feeds `model` whole prompts, its prefix included (benchmarks compare both)."""
    decoder, _ = llama_parts(model)
    before = registered_prefix(model)
    decoder.prompt_prefix_ids = ()
    try:
        yield
    finally:
        decoder.prompt_prefix_ids = before


def _sources(decoder) -> tuple[list[torch.Tensor], list]:
    """The tensors and the LoRA layers the prefix's KV is computed from (listed once: walking the modules
    on every request cost ~3 ms on SmolLM2)."""
    loras = [m for m in decoder.modules() if hasattr(m, "active_adapters") and hasattr(m, "merged")]
    return list(decoder.parameters()), loras


def _state(decoder, params, loras) -> tuple:
    """What the prefix's KV depends on: each weight's storage, version and dtype, each adapter's switches,
    and which forward runs (fused or module by module). A parameter *replaced* by another tensor object is
    not seen: register the prefix once the model's modules are built (as for `fused.py`)."""
    weights = tuple((p.data_ptr(), p._version, p.dtype) for p in params)
    switches = tuple((m.merged, m.disable_adapters, tuple(m.active_adapters)) for m in loras)
    return weights, switches, fused_blocks(decoder) is None


def prefix_kv(model, vocab: CodeVocab) -> KV:
    """The registered prefix's KV `[1, kv_heads, p, head_dim]` per layer, built once per weights' state."""
    decoder, _ = llama_parts(model)
    params, loras, state, kv = _KV.get(decoder) or (*_sources(decoder), None, None)
    now = _state(decoder, params, loras)
    if now != state:
        device = decoder.norm.weight.device
        tokens = torch.tensor([decoder.prompt_prefix_ids], device=device)  # [1, p]
        p = tokens.shape[1]
        mask = causal_prompt_mask(torch.ones(1, p, dtype=torch.bool, device=device), lm_dtype(model))
        positions = torch.arange(p, device=device).unsqueeze(0)
        _, kv = lm_forward(model, vocab, tokens, positions, mask, None, keep=1)
        _KV[decoder] = (params, loras, now, kv)
    return kv


def split_prefix(models, vocab: CodeVocab, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Left-padded prompts `[B, P]` as (the tokens to feed `[B, P - p]`, the mask of the prompts as the cache
    will hold them `[B, P]`, each model's prefix KV as B rows `[B, ...]`, views of one) when every model in
    `models` has the same registered prefix and every prompt is that prefix and at least one more token; else
    the prompts as they are and None (everything is then fed, as before)."""
    prefix = registered_prefix(models[0])
    p, (B, P) = len(prefix), input_ids.shape
    if not p or P <= p or any(registered_prefix(m) != prefix for m in models[1:]):
        return input_ids, attention_mask, None
    mask, dev = attention_mask.bool(), input_ids.device
    start = P - mask.sum(1, keepdim=True)  # [B, 1] first real column
    cols = torch.arange(P, device=dev)
    left_padded = torch.equal(mask, cols >= start)
    if not left_padded or (start > P - p - 1).any():  # a row without a token after the prefix
        return input_ids, attention_mask, None
    if not torch.equal(input_ids.gather(1, start + cols[:p]), torch.tensor(prefix, device=dev).expand(B, p)):
        return input_ids, attention_mask, None
    rest = cols[:P - p] >= start  # [B, P - p] the history, still right-aligned
    cached = torch.cat([torch.ones(B, p, dtype=torch.bool, device=dev), rest], 1).to(attention_mask.dtype)
    rows = [[(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in prefix_kv(m, vocab)] for m in models]
    return input_ids[:, p:], cached, rows  # views: `lm_forward` concatenates the new tokens after them
