"""Linear layers on oneDNN-prepacked weights compute exactly what `F.linear` computes, and train as before."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from atspeed_rec.decoding.beam_search import beam_search
from atspeed_rec.models.fast_forward import causal_prompt_mask, lm_forward
from atspeed_rec.models.packed import PackedLinear, packing_available, prepack_linears
from atspeed_rec.models.vocab import CodeVocab
from atspeed_rec.semantic_ids.trie import CodeTrie
from random_models import random_ids, random_lm, random_prompts

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN CPU ops")


def packed_copy(layer: nn.Linear) -> nn.Linear:
    other = copy.deepcopy(layer)
    prepack_linears(other)
    return other


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 40])
@pytest.mark.parametrize("bias", [False, True])
def test_a_packed_layer_gives_the_plain_outputs_at_inference_bit_for_bit_in_bf16(dtype, rows, bias):
    torch.manual_seed(rows)
    plain = nn.Linear(48, 80, bias=bias).to(dtype)
    packed = packed_copy(plain)
    x = torch.randn(2, rows, 48, dtype=dtype)
    with torch.no_grad():
        got, want = packed(x), plain(x)
    if dtype == torch.bfloat16:
        assert torch.equal(got, want)
    else:  # float32 at a row or two: plain F.linear takes another kernel, equal up to the last bit
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert "_packed" in packed.__dict__  # the packed path ran, not the fallback


def test_a_changed_weight_is_packed_again():
    plain = nn.Linear(16, 8)
    packed = packed_copy(plain)
    x = torch.randn(3, 16)
    with torch.no_grad():
        packed(x)
        for layer in (plain, packed):
            layer.weight.mul_(2.0)  # an optimizer step, a loaded checkpoint: in place
        torch.testing.assert_close(packed(x), plain(x), atol=1e-6, rtol=1e-6)  # a stale copy would be off by 2x


def test_calls_that_record_gradients_train_the_weights_as_a_plain_layer_does():
    plain = nn.Linear(16, 8)
    packed = packed_copy(plain)
    x = torch.randn(3, 16, requires_grad=True)
    for layer in (plain, packed):
        layer(x).square().sum().backward()
    torch.testing.assert_close(packed.weight.grad, plain.weight.grad)
    assert "_packed" not in packed.__dict__


def test_a_packed_model_keeps_its_state_dict_and_can_be_copied():
    model = random_lm(40, seed=3, layers=1, hidden=32)
    keys = set(model.state_dict())
    assert prepack_linears(model) == 8  # q k v o, gate up down, lm_head
    assert set(model.state_dict()) == keys
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj(torch.randn(2, 32))  # makes a packed copy
    clone = copy.deepcopy(model)  # the opaque packed tensor is not copied; the clone packs its own
    assert all(isinstance(m, PackedLinear) for m in clone.modules() if isinstance(m, nn.Linear))


def test_the_lean_forward_of_a_packed_lora_llama_in_bf16_equals_the_plain_one():
    model = random_lm(40, seed=5, layers=2, hidden=32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).eval()
    model = model.get_base_model().to(torch.bfloat16)
    vocab = CodeVocab(levels=3, codebook_size=13)
    ids = torch.randint(1, 40, (2, 12), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    positions = torch.arange(12).expand(2, 12)
    attn = causal_prompt_mask(mask, torch.bfloat16)
    want, _ = lm_forward(model, vocab, ids, positions, attn)
    prepack_linears(model)
    got, _ = lm_forward(model, vocab, ids, positions, attn)
    assert torch.equal(got, want)


def test_beam_search_on_a_packed_target_returns_what_it_returned_before():
    vocab = CodeVocab(levels=3, codebook_size=8)
    codes = random_ids(60, 3, 8, seed=1)
    trie = CodeTrie(codes, 8, item_offset=1)
    model = random_lm(vocab.size, seed=2)
    ids, mask = random_prompts(torch.cat([codes.new_full((1, 3), -1), codes]), vocab, batch=4, max_hist=5, seed=3)
    want = beam_search(model, trie, vocab, ids, mask, num_beams=6)
    prepack_linears(model)
    got = beam_search(model, trie, vocab, ids, mask, num_beams=6)
    assert torch.equal(got.items, want.items) and torch.equal(got.scores, want.scores)


def test_inputs_in_another_dtype_than_the_weight_take_the_plain_path():
    plain = nn.Linear(16, 8).to(torch.bfloat16)
    packed = packed_copy(plain)
    with torch.no_grad(), pytest.raises(RuntimeError):
        packed(torch.randn(3, 16))  # float32 input, bf16 weight: the plain layer's own error
    assert "_packed" not in packed.__dict__
