"""A draft that reads the prompt as the target's early-layer states: split passes, equivalence, training."""

import copy
import json

import pytest
import torch
from recbole.data import create_dataset, data_preparation
from safetensors import safe_open

from atspeed_rec.alignment.positions import beam_code_logits
from atspeed_rec.decoding.beam_search import beam_search
from atspeed_rec.decoding.speculative import speculative_beam_search
from atspeed_rec.decoding.tree import DraftTree, prompt_states, tree_forward
from atspeed_rec.models.fast_forward import causal_prompt_mask, lm_forward
from atspeed_rec.models.prefix_cache import register_prefix
from atspeed_rec.models.state_draft import attach_source, source_of
from atspeed_rec.models.vocab import CodeVocab
from atspeed_rec.recbole_glue.atspeed import AtSpeedS
from atspeed_rec.recbole_glue.checkpoint import load_checkpoint
from atspeed_rec.recbole_glue.runner import build_config
from atspeed_rec.semantic_ids.trie import CodeTrie
from random_models import random_ids, random_lm, random_prompts
from test_atspeed import SMALL, run, serves_the_targets_lists
from test_prefix_cache import PREFIX, with_prefix

VOCAB = CodeVocab(levels=4, codebook_size=8)

pytestmark = pytest.mark.usefixtures("one_thread")


def world(seed, layers=2, batch=3):
    """A catalog, a 3-block target, a 1-block draft reading its states after `layers` blocks, prompts."""
    codes = random_ids(300, 4, 8, seed)
    target, draft = random_lm(VOCAB.size, seed, layers=3), random_lm(VOCAB.size, seed + 1000, layers=1)
    attach_source(draft, target, layers)
    ids, mask = random_prompts(torch.cat([torch.full((1, 4), -1), codes]), VOCAB, batch=batch, max_hist=5, seed=seed)
    return CodeTrie(codes, 8, item_offset=1), target, draft, ids, mask


def first_code_logprobs(draft, ids, mask):
    """`[B, L * C]` the draft's log-probs after each prompt (its own forward computes the target's states)."""
    lp, _, _ = tree_forward(draft, VOCAB, mask, ids.new_zeros(len(ids), 1, 0), DraftTree.empty(len(ids)),
                            prompt_ids=ids)
    return lp[:, 0]


@pytest.mark.parametrize("m", [1, 2])
def test_a_pass_split_after_m_blocks_equals_the_whole_pass(m):
    _, target, _, ids, mask = world(0)
    B, P = ids.shape
    prompt, (tokens, positions) = P - 4, (ids, (mask.cumsum(-1) - 1).clamp(min=0))
    attn = causal_prompt_mask(mask, torch.float32)
    whole, whole_kv = lm_forward(target, VOCAB, tokens, positions, attn)
    early = prompt_states(target, VOCAB, mask[:, :prompt], ids[:, :prompt], None, m)
    split, split_kv = lm_forward(target, VOCAB, tokens, positions, attn, early=early)
    torch.testing.assert_close(split, whole, atol=1e-5, rtol=1e-5)
    for (k, v), (k2, v2) in zip(split_kv, whole_kv):
        torch.testing.assert_close(k, k2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, v2, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("k,n,gamma,start", [(1, 2, 3, 0), (3, 8, 2, 1), (5, 10, 1, 0), (10, 20, 2, 0), (10, 12, 1, 2)])
def test_strict_decoding_with_an_early_layer_draft_returns_exactly_the_targets_beam_search(m, k, n, gamma, start):
    for prefix in (False, True):
        trie, target, draft, ids, mask = world(m, m)
        if prefix:  # the shared text prefix cached for both models, as for an LLM target
            ids, mask = with_prefix(ids, mask)
            register_prefix(target, PREFIX)
            register_prefix(draft, PREFIX)
        spec, stats = speculative_beam_search(target, draft, trie, VOCAB, ids, mask, k, n, gamma, draft_start=start)
        ref = beam_search(target, trie, VOCAB, ids, mask, k)
        assert torch.equal(spec.items, ref.items)
        torch.testing.assert_close(spec.scores, ref.scores, atol=1e-5, rtol=2e-6)
        assert (stats.accepted_steps + stats.rounds + stats.forced_steps == 4).all()


def test_the_draft_reads_the_targets_states_not_its_own_prompt_embeddings():
    _, target, draft, ids, mask = world(3)
    before = first_code_logprobs(draft, ids, mask)
    own = copy.deepcopy(draft)
    own.model.embed_tokens.weight.data.normal_()  # the draft's own rows of every token: unused at the prompt
    attach_source(own, target, 2)
    own.model.state_proj.load_state_dict(draft.model.state_proj.state_dict())
    torch.testing.assert_close(first_code_logprobs(own, ids, mask), before)
    with torch.no_grad():  # (in place, so the fused weights see the change, as after an optimizer step)
        target.model.layers[0].mlp.down_proj.weight.mul_(2.0)  # the target's first block: the draft sees it
    changed = first_code_logprobs(draft, ids, mask)
    assert not torch.allclose(changed, before, atol=1e-3)
    with torch.no_grad():
        target.model.layers[2].mlp.down_proj.weight.mul_(2.0)  # a block after the source layer: it does not
    torch.testing.assert_close(first_code_logprobs(draft, ids, mask), changed)


def test_the_training_forward_scores_each_code_as_the_serving_forward_does():
    trie, target, draft, ids, mask = world(4)
    codes = trie.codes_of(torch.tensor([[5, 17, 40], [1, 2, 3], [250, 100, 7]]))  # [B, K, L] valid IDs
    trained = beam_code_logits(draft, VOCAB, ids, mask, codes)  # [B, K, L, C] (transformers' forward)
    B, K, L = codes.shape
    rows = codes.reshape(B * K, L)  # the serving pass: each beam a chain of its first L - 1 codes after its prompt
    chain = DraftTree(parents=torch.zeros(B * K, L - 1, 1, dtype=torch.long), codes=rows[:, :L - 1].unsqueeze(-1),
                      alive=torch.ones(B * K, L - 1, 1, dtype=torch.bool), logq=[])
    root, nodes, _ = tree_forward(draft, VOCAB, mask.repeat_interleave(K, 0), rows.new_zeros(B * K, 1, 0), chain,
                                  prompt_ids=ids.repeat_interleave(K, 0))
    per_level = torch.cat([root, nodes[:, :, 0]], 1)  # [B * K, L, L * C]
    served = torch.stack([VOCAB.level_logits(per_level[:, lv], lv).log_softmax(-1) for lv in range(L)], 1)
    torch.testing.assert_close(trained.log_softmax(-1), served.view_as(trained), atol=1e-5, rtol=1e-5)


def test_an_early_layer_draft_trains_is_saved_with_its_projection_and_serves_the_targets_lists(synth_root,
                                                                                                in_tmp_dir):
    extra = {"n_layers": 2, "draft_source_layer": 1}
    assert run(synth_root, "AtSpeedS", in_tmp_dir / "s.json", **extra) == 0
    assert json.loads((in_tmp_dir / "s.json").read_text())["test"]["accepted_steps"] >= 0
    (path,) = (in_tmp_dir / "saved").glob("AtSpeedS-synth-*.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert "draft.model.state_proj.weight" in f.keys()
    config = build_config("AtSpeedS", "synth", [str(synth_root / "synth.yaml")],
                          {"data_path": str(synth_root), **SMALL, **extra})
    train, _, test = data_preparation(config, create_dataset(config))
    model = AtSpeedS(config, train._dataset)
    load_checkpoint(model, path)
    assert source_of(model.draft) == (model.target.lm, 1)
    assert serves_the_targets_lists(model, test) == train._dataset.user_num - 1
    batch = next(iter(train))
    first, every = (model.target.window_loss(model.draft, batch, first_codes_only=only) for only in (True, False))
    with torch.no_grad():  # the output rows of every code but the 1st: the 1st-codes-only loss never reads them
        model.draft.lm_head.weight[model.target.vocab.level_start(1):].mul_(3.0)
    assert model.target.window_loss(model.draft, batch, first_codes_only=True).item() == pytest.approx(first.item())
    assert model.target.window_loss(model.draft, batch).item() != pytest.approx(every.item())


@pytest.mark.parametrize("n_layers,fix", [(2, "a value from 1 to 1"), (1, "a target of 2 or more blocks")])
def test_a_source_layer_outside_the_targets_blocks_is_refused(synth_root, in_tmp_dir, capsys, n_layers, fix):
    assert run(synth_root, "AtSpeedS", in_tmp_dir / "s.json", n_layers=n_layers, draft_source_layer=2) != 0
    err = capsys.readouterr().err
    assert "draft_source_layer=2" in err and fix in err
