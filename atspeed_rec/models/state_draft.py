"""A draft that reads the prompt through the target's first m blocks (`draft_source_layer`; EAGLE-style).

A small draft reads a user's history from its own token embeddings, and its weakest guess is the ID's
1st code: the user's taste, which the target reads from its whole stack over the prompt. Here the draft's
input at each prompt token is instead the target's own residual stream after its first m blocks, normalised
as its block m reads it and brought to the draft's width by a learned projection (`state_proj`, on the draft's decoder: trained and saved
with the draft); the codes after the prompt (drafted or accepted beams, which the target has not seen in
the draft's pass) keep the draft's own embeddings. A probe on amazon-beauty (docs/experiments.md) found the
target's ten best 1st codes in a draft block's top 40 for 88% of users after 2 blocks, against 75% from
token embeddings; this draft, trained by the project's objective, does not reach that yet (73%).

Those m blocks cost nothing extra when serving: the verification pass that follows runs its first m
blocks over the tree tokens only and the rest over prompt and tree from the same states (`lm_forward`'s
`early`), so the target does the same work as one pass. In training the frozen target's first m blocks
run under no_grad before each draft forward (`forward_inputs`). The target is referenced from the
draft's decoder, not registered in it: it is neither trained nor saved with the draft.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from atspeed_rec.errors import ConfigError
from atspeed_rec.models.fast_forward import additive_mask, early_states, llama_parts


class Source(NamedTuple):
    """The target whose states a draft reads, and after how many of its blocks."""
    target: nn.Module
    layers: int

    def __deepcopy__(self, memo):  # a copy of the draft reads the same target: the target is not the draft's
        return self


def attach_source(draft, target, layers: int) -> None:
    """Make `draft` read its prompts as `target`'s states after its first `layers` blocks (0: its own tokens)."""
    n = len(llama_parts(target)[0].layers)
    if not 0 <= layers < n:
        fix = f"a value from 1 to {n - 1}, or" if n > 1 else "a target of 2 or more blocks (n_layers), or leave it"
        raise ConfigError(f"draft_source_layer={layers}: the draft reads the target's states after that many of "
                          f"its {n} blocks, and the target must have blocks left after them; fix: {fix} unset (~) "
                          "for a draft over its own token embeddings")
    if layers == 0:
        return
    decoder = llama_parts(draft)[0]
    width = llama_parts(target)[0].config.hidden_size
    decoder.state_proj = nn.Linear(width, decoder.config.hidden_size, dtype=decoder.norm.weight.dtype)
    decoder.__dict__["state_source"] = Source(target, layers)  # a plain attribute: not a submodule


def source_of(model):
    """The `Source` (target, m) whose states after m blocks `model` reads at its prompt tokens, or None."""
    return decoder_source(llama_parts(model)[0])


def decoder_source(decoder):
    """`source_of` for a model's decoder."""
    return decoder.__dict__.get("state_source")


def prompt_embeds(draft, states: torch.Tensor) -> torch.Tensor:
    """`[B, F, D_draft]` the draft's inputs at prompt tokens from the target's states `[B, F, D_target]`:
    normalised as the target's block m reads them (its frozen input norm), then projected. Raw, they are
    ~100x the scale of the draft's own rows (SmolLM2 after 2 blocks: token norms 60-210, one dimension
    up to 183), and a projection of them drowned what the draft's own block adds at those positions."""
    (target, layers), proj = source_of(draft), llama_parts(draft)[0].state_proj
    with torch.no_grad():  # the target is frozen
        x = llama_parts(target)[0].layers[layers].input_layernorm(states)
    return proj(x.to(proj.weight.dtype))


def forward_inputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   position_ids: torch.Tensor | None = None, prompt_len: int | None = None) -> dict:
    """The inputs of a transformers forward of `model` over `input_ids [B, Q]` (training): the tokens
    themselves, or for an early-layer draft its input embeddings (`source_embeds`)."""
    inputs = {"attention_mask": attention_mask, "position_ids": position_ids}
    if source_of(model) is None:
        return {"input_ids": input_ids, **inputs}
    return {"inputs_embeds": source_embeds(model, input_ids, attention_mask, position_ids, prompt_len), **inputs}


def source_embeds(draft, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  position_ids: torch.Tensor | None = None, prompt_len: int | None = None) -> torch.Tensor:
    """The draft's input embeddings `[B, Q, D]` over `input_ids [B, Q]`: the target's states (no gradient)
    at the first `prompt_len` tokens (all by default), the draft's own embeddings after them.
    attention_mask: additive `[B, 1, Q, Q]`, or None for plain causal attention over right-padded rows
    (positions then count from 0)."""
    target, layers = source_of(draft)
    B, Q = input_ids.shape
    n = Q if prompt_len is None else prompt_len
    if attention_mask is None:
        i = torch.arange(n, device=input_ids.device)
        mask = additive_mask((i <= i.unsqueeze(1)).expand(B, n, n), llama_parts(target)[0].norm.weight.dtype)
        positions = i.expand(B, n)
    else:  # the caller's additive mask, rebuilt in the target's dtype
        mask = additive_mask(attention_mask[:, 0, :n, :n] == 0, llama_parts(target)[0].norm.weight.dtype)
        positions = position_ids[:, :n]
    states = early_states(target, input_ids[:, :n], positions, mask, None, layers).hidden
    own = llama_parts(draft)[0].embed_tokens(input_ids[:, n:])
    return torch.cat([prompt_embeds(draft, states), own], 1)
