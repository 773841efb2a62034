"""The language models over semantic-ID tokens: configs built from RecBole properties."""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM

from atspeed_rec.errors import ConfigError
from atspeed_rec.models.vocab import CodeVocab


def llama_config(vocab: CodeVocab, n_layers: int, hidden_size: int, n_heads: int, inner_size: int,
                 dropout: float, max_positions: int, tie_embeddings: bool = False) -> LlamaConfig:
    if hidden_size % n_heads:
        raise ConfigError(f"hidden_size={hidden_size} is not divisible by n_heads={n_heads}; "
                          "fix: choose n_heads that divides hidden_size")
    return LlamaConfig(
        vocab_size=vocab.size, hidden_size=hidden_size, intermediate_size=inner_size,
        num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_heads,
        attention_dropout=dropout, max_position_embeddings=max_positions,
        pad_token_id=vocab.pad_id, bos_token_id=None, eos_token_id=None, tie_word_embeddings=tie_embeddings,
    )


def build_lm(config, vocab: CodeVocab, prefix: str = "") -> LlamaForCausalLM:
    """A Llama LM sized by the properties `<prefix>n_layers`, `<prefix>hidden_size`, ... ."""
    max_positions = (int(config["MAX_ITEM_LIST_LENGTH"]) + 1) * vocab.levels
    return LlamaForCausalLM(llama_config(
        vocab, int(config[f"{prefix}n_layers"]), int(config[f"{prefix}hidden_size"]),
        int(config[f"{prefix}n_heads"]), int(config[f"{prefix}inner_size"]),
        float(config[f"{prefix}dropout_prob"]), max_positions, bool(config[f"{prefix}tie_embeddings"])))
