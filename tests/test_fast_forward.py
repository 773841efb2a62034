"""The lean inference forward computes what transformers' forward computes, cache and masks included."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import DynamicCache

from atspeed_rec.models.fast_forward import additive_mask, causal_prompt_mask, lm_forward
from atspeed_rec.models.vocab import CodeVocab
from random_models import random_lm, random_qwen

VOCAB = CodeVocab(levels=3, codebook_size=13)  # 40 tokens: PAD + 39 codes


def codes_only(logits):
    """transformers' logits `[..., 40]` restricted to the code tokens, as `lm_forward` computes them."""
    return logits[..., VOCAB.offset:VOCAB.size]


def left_padded(batch=3, length=12, vocab=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, :5] = 0  # one left-padded row
    mask[2, :11] = 0  # a one-token prompt
    return ids.masked_fill(mask == 0, 0), mask


def hf_prefill(model, ids, mask):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)


def test_prompt_logits_and_cache_equal_transformers_forward_on_left_padded_prompts():
    model = random_lm(40, seed=1, layers=2, hidden=32)  # 4 heads, 2 KV heads: grouped-query attention
    ids, mask = left_padded()
    ref = hf_prefill(model, ids, mask)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits, kv = lm_forward(model, VOCAB, ids, positions, causal_prompt_mask(mask, torch.float32))
    real = mask.bool()
    torch.testing.assert_close(logits[real], codes_only(ref.logits)[real], atol=1e-5, rtol=1e-5)
    for (k, v), layer in zip(kv, ref.cache.layers):
        torch.testing.assert_close(k, layer.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, layer.values, atol=1e-5, rtol=1e-5)


def test_tokens_after_a_cache_with_a_custom_mask_equal_transformers_forward():
    model = random_lm(40, seed=2, layers=2, hidden=32)
    ids, mask = left_padded(seed=3)
    ref = hf_prefill(model, ids, mask)
    kv = [(layer.keys, layer.values) for layer in ref.cache.layers]
    new = torch.randint(1, 40, (3, 4), generator=torch.Generator().manual_seed(4))
    # two branches of two tokens each: (0, 1) and (2, 3), each sees the prompt and its own branch
    branch = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    visible = torch.cat([mask.bool().unsqueeze(1).expand(3, 4, -1), branch.expand(3, -1, -1)], -1)
    attn = additive_mask(visible, torch.float32)
    positions = mask.sum(-1, keepdim=True) + torch.tensor([0, 1, 0, 1])
    keep = torch.tensor([1, 3])
    with torch.no_grad():
        want = model(input_ids=new, attention_mask=attn, position_ids=positions,
                     cache=DynamicCache(ddp_cache_data=kv), use_cache=True, logits_to_keep=keep).logits
    got, grown = lm_forward(model, VOCAB, new, positions, attn, kv, keep)
    torch.testing.assert_close(got, codes_only(want), atol=1e-5, rtol=1e-5)
    assert grown[0][0].shape[2] == ids.shape[1] + 4  # the cache grew by the new tokens


def test_a_lora_wrapped_model_runs_through_its_adapters():
    model = random_lm(40, seed=5, layers=1, hidden=32)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            p.data.normal_()  # non-zero adapters, so that ignoring them would show
    lora.eval()
    ids, mask = left_padded(seed=6)
    ref = hf_prefill(lora, ids, mask)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits, _ = lm_forward(lora, VOCAB, ids, positions, causal_prompt_mask(mask, torch.float32))
    torch.testing.assert_close(logits[mask.bool()], codes_only(ref.logits)[mask.bool()], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_other_llama_family_models_run_through_the_lean_forward_unchanged(family):
    """Qwen2 (biased q/k/v projections) and Qwen3 (per-head q/k norms): what `pretrained_path` may name."""
    model = random_qwen(family, 40, seed=7)
    for p in model.parameters():
        p.data.mul_(4.0)  # sharper than the default init, as random_lm does
    ids, mask = left_padded(seed=8)
    ref = hf_prefill(model, ids, mask)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits, _ = lm_forward(model, VOCAB, ids, positions, causal_prompt_mask(mask, torch.float32))
    real = mask.bool()
    torch.testing.assert_close(logits[real], codes_only(ref.logits)[real], atol=1e-4, rtol=1e-4)
