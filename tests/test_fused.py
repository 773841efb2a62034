"""Fused inference weights (LoRA merged, projections concatenated, prepacked) compute what the modules do."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from atspeed_rec.decoding.beam_search import beam_search
from atspeed_rec.models.fast_forward import causal_prompt_mask, llama_parts, lm_forward
from atspeed_rec.models.fused import fused_blocks, modules_only, packing_available
from atspeed_rec.models.vocab import CodeVocab
from atspeed_rec.semantic_ids.trie import CodeTrie
from random_models import random_ids, random_lm, random_prompts, random_qwen

VOCAB = CodeVocab(levels=3, codebook_size=13)  # 40 tokens


def lora_lm(seed: int, dtype=torch.float32, layers: int = 2):
    """A random Llama with non-zero LoRA adapters on q and v (zero B matrices would hide a missed merge)."""
    model = random_lm(40, seed=seed, layers=layers, hidden=32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(generator=torch.Generator().manual_seed(seed))
    return model.get_base_model().eval().to(dtype)


def prompt_logits(model, dtype=torch.float32, seed=6):
    ids = torch.randint(1, 40, (2, 12), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    positions = torch.arange(12).expand(2, 12)
    return lm_forward(model, VOCAB, ids, positions, causal_prompt_mask(mask, dtype))[0]


def both_ways(model, dtype=torch.float32):
    """(fused, modules) logits of the same prompts."""
    fused = prompt_logits(model, dtype)
    with modules_only(llama_parts(model)[0]):
        plain = prompt_logits(model, dtype)
    return fused, plain


def test_the_fused_forward_of_a_lora_llama_equals_its_modules_in_float32():
    model = lora_lm(seed=1)
    fused, plain = both_ways(model)
    assert fused_blocks(llama_parts(model)[0]) is not None  # the fused path ran, not the fallback
    torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-4)


def test_the_fused_forward_in_bf16_stays_within_bf16_rounding_of_the_modules():
    model = lora_lm(seed=2, dtype=torch.bfloat16)
    fused, plain = both_ways(model, torch.bfloat16)
    reference = prompt_logits(torch.nn.Module.float(copy.deepcopy(model)))
    # merging rounds W + s B A to bf16 once: no farther from float32 than the modules' own rounding
    assert (fused.float() - reference).abs().mean() <= 1.5 * (plain.float() - reference).abs().mean() + 1e-3


def test_weights_changed_in_place_are_fused_again():
    model = lora_lm(seed=3)
    decoder = llama_parts(model)[0]
    before = prompt_logits(model)
    first = fused_blocks(decoder)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "up_proj" in name:
                p.mul_(1.5)  # an optimizer step or a loaded checkpoint: in place
    fused, plain = both_ways(model)
    assert fused_blocks(decoder) is not first
    assert not torch.allclose(fused, before)  # a stale copy would still give the old logits
    torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-4)


def test_disabled_adapters_are_left_out_of_the_fused_weights():
    model = get_peft_model(random_lm(40, seed=4, layers=1, hidden=32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_()
    model.eval()
    with model.disable_adapter():
        fused, plain = both_ways(model.get_base_model())
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    with_adapters, _ = both_ways(model.get_base_model())
    assert not torch.allclose(with_adapters, fused)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_biased_and_normed_llama_family_blocks_fuse_too(family):
    """Qwen2's q/k/v biases go into the fused bias; Qwen3's per-head norms run after the split."""
    model = random_qwen(family, 40, seed=7)
    for p in model.parameters():
        p.data.normal_(0, 0.2)  # biases non-zero too
    fused, plain = both_ways(model)
    assert fused_blocks(model.model) is not None
    torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-4)


def test_beam_search_returns_the_same_items_fused_and_through_the_modules():
    vocab = CodeVocab(levels=3, codebook_size=8)
    codes = random_ids(60, 3, 8, seed=1)
    trie = CodeTrie(codes, 8, item_offset=1)
    model = random_lm(vocab.size, seed=2)
    ids, mask = random_prompts(torch.cat([codes.new_full((1, 3), -1), codes]), vocab, batch=4, max_hist=5, seed=3)
    got = beam_search(model, trie, vocab, ids, mask, num_beams=6)
    with modules_only(model.model):
        want = beam_search(model, trie, vocab, ids, mask, num_beams=6)
    assert torch.equal(got.items, want.items)
    torch.testing.assert_close(got.scores, want.scores, atol=1e-4, rtol=1e-4)


def test_fused_weights_stay_out_of_the_state_dict_and_copies():
    model = lora_lm(seed=5)
    keys = set(model.state_dict())
    prompt_logits(model)  # builds the fused weights
    assert set(model.state_dict()) == keys
    clone = copy.deepcopy(model)  # the opaque prepacked tensors are not copied; the clone builds its own
    torch.testing.assert_close(prompt_logits(clone), prompt_logits(model))


@pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN CPU ops")
def test_on_a_cpu_with_onednn_the_fused_weights_are_prepacked():
    model = lora_lm(seed=6, dtype=torch.bfloat16)
    blocks = fused_blocks(llama_parts(model)[0])
    assert all(m.packed for b in blocks for m in (b.qkv, b.o, b.gate_up, b.down))


def test_training_gradients_do_not_go_through_the_fused_weights():
    """Training calls the modules (transformers' forward); the fused copies are detached inference weights."""
    model = lora_lm(seed=7)
    prompt_logits(model)
    blocks = fused_blocks(llama_parts(model)[0])
    assert not any(m.weight.requires_grad for b in blocks for m in (b.qkv, b.o, b.gate_up, b.down))


def test_an_empty_batch_gives_empty_outputs_of_the_right_width():
    model = lora_lm(seed=8)
    block = fused_blocks(llama_parts(model)[0])[0]
    q, k, v = block.project_qkv(torch.zeros(0, 3, 32))
    assert (q.shape, k.shape, v.shape) == ((0, 3, 32), (0, 3, 16), (0, 3, 16))
    assert block.mlp(torch.zeros(2, 0, 32)).shape == (2, 0, 32)
