"""The draft LM: a small Llama over the target's tokens, built here or loaded from a checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from atspeed_rec.errors import ConfigError
from atspeed_rec.models.lm import build_lm
from atspeed_rec.models.vocab import CodeVocab


def build_draft(config, vocab: CodeVocab, target_lm):
    """The `draft_*`-sized Llama for `vocab` (the tokens of `target_lm`), with the weights of `draft_checkpoint`
    when given."""
    draft = build_lm(config, vocab, prefix="draft_")
    if config["draft_checkpoint"]:  # a draft trained elsewhere: its vocabulary must be the target's
        load_draft(draft, Path(config["draft_checkpoint"]), target_lm.config.vocab_size)
    check_same_vocab(target_lm, draft)
    return draft


def check_same_vocab(target_lm, draft_lm) -> None:
    """The draft proposes the target's tokens: both must have the same vocabulary."""
    t, d = target_lm.config.vocab_size, draft_lm.config.vocab_size
    if t != d:
        raise ConfigError(f"the draft's vocabulary ({d} tokens) does not match the target's ({t} tokens): "
                          "a draft must be built for the same semantic IDs (sid_levels, sid_codebook_size) "
                          "as its target; fix: retrain the draft for this target, or drop --draft_checkpoint")


def load_draft(draft, path: Path, target_vocab_size: int) -> None:
    """Weights for `draft` from a safetensors file (a draft alone, or a whole AtSpeed checkpoint)."""
    from safetensors import safe_open
    if not path.is_file():
        raise ConfigError(f"draft_checkpoint {path} does not exist; fix: point --draft_checkpoint at a "
                          ".safetensors file written by an AtSpeedS/AtSpeedR run, or leave it unset")
    try:
        with safe_open(str(path), framework="pt") as f:
            prefix = "draft." if any(k.startswith("draft.") for k in f.keys()) else ""
            state = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    except Exception as err:  # not a safetensors file, or a damaged one
        raise ConfigError(f"draft_checkpoint {path} is not a readable safetensors file ({type(err).__name__}: "
                          f"{err}); fix: give a .safetensors file written by an AtSpeedS/AtSpeedR run") from None
    tied = draft.config.tie_word_embeddings
    if tied and "model.embed_tokens.weight" not in state and "lm_head.weight" in state:
        state["model.embed_tokens.weight"] = state["lm_head.weight"]  # safetensors kept the shared tensor once
    rows = state.get("model.embed_tokens.weight", torch.zeros(0, 0)).shape[0]
    if rows != target_vocab_size:
        raise ConfigError(f"the draft in {path} has a vocabulary of {rows} tokens, the target {target_vocab_size}: "
                          "a draft must be built for the same semantic IDs (sid_levels, sid_codebook_size) "
                          "as its target; fix: retrain the draft for this target, or drop --draft_checkpoint")
    if tied:
        state.pop("lm_head.weight", None)  # the tie is the module's own
    missing, unexpected = draft.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not tied]
    if missing or unexpected:
        raise ConfigError(f"the draft in {path} does not fit draft_* properties (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}); fix: use the draft_* properties it was trained with")
