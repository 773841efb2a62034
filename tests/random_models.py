"""Random semantic-ID catalogs, random Llama LMs over their token layout, random left-padded prompts."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def random_ids(n_items, levels, codebook, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, codebook, (n_items * 3, levels), generator=g)
    codes = torch.unique(codes, dim=0)
    return codes[torch.randperm(codes.shape[0], generator=g)[:n_items]]


def random_lm(vocab_size, seed, layers=2, hidden=32, scale=4.0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    model = LlamaForCausalLM(config).eval()
    for p in model.parameters():  # sharper distributions than the default init, fewer near-ties
        p.data.mul_(scale)
    return model


def random_qwen(family: str, vocab_size: int, seed: int):
    """A tiny random Qwen2 (biased q/k/v projections) or Qwen3 (per-head q/k norms) causal LM: the other
    Llama-family models `pretrained_path` may name."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM
    config_class, model_class = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[family]
    torch.manual_seed(seed)
    return model_class(config_class(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    max_position_embeddings=256, pad_token_id=0)).eval()


def random_prompts(item_codes, vocab, batch, max_hist, seed):
    g = torch.Generator().manual_seed(seed)
    n = item_codes.shape[0]
    lengths = torch.randint(1, max_hist + 1, (batch,), generator=g)
    items = torch.randint(1, n, (batch, max_hist), generator=g)
    items = torch.where(torch.arange(max_hist) >= max_hist - lengths.unsqueeze(1), items, 0)
    tokens = vocab.history_tokens(item_codes, items)
    return tokens, (tokens != vocab.pad_id).long()


def dedup_ids(n_items, codebook, seed):
    """TIGER-style IDs: three random codes, then a fourth that only tells apart items sharing them."""
    prefixes = torch.randint(0, codebook, (n_items, 3), generator=torch.Generator().manual_seed(seed))
    seen: dict[tuple, int] = {}
    last = []
    for p in map(tuple, prefixes.tolist()):
        last.append(seen.get(p, 0))
        seen[p] = last[-1] + 1
    return torch.cat([prefixes, torch.tensor(last).unsqueeze(1)], 1)
