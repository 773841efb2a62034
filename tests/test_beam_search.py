"""Our constrained beam search against Hugging Face `generate` on the same model."""

import pytest
import torch

import atspeed_rec.decoding.beam_search as search
import atspeed_rec.decoding.tree as tree_module
from atspeed_rec.decoding.beam_search import beam_search
from atspeed_rec.decoding.hf_generate import hf_beam_search
from atspeed_rec.models.item_embedding import ItemTokenEmbedding
from atspeed_rec.models.vocab import CodeVocab
from atspeed_rec.semantic_ids.trie import CodeTrie
from random_models import dedup_ids, random_ids, random_lm, random_prompts


@pytest.mark.parametrize("k,seed,item_vectors", [(1, 0, False), (3, 1, False), (10, 2, False), (10, 3, False),
                                                 (10, 4, True), (3, 5, True)])
def test_beam_search_returns_what_generate_returns(k, seed, item_vectors):
    vocab = CodeVocab(levels=4, codebook_size=8)
    codes = random_ids(300, 4, 8, seed)
    item_codes = torch.cat([torch.full((1, 4), -1), codes])  # row 0 = PAD
    trie = CodeTrie(codes, 8, item_offset=1)
    model = random_lm(vocab.size, seed)
    if item_vectors:  # history items also carry their own vector (GenRec's default)
        model.set_input_embeddings(ItemTokenEmbedding(model.get_input_embeddings(), vocab, item_codes, init_std=1.0))
    input_ids, mask = random_prompts(item_codes, vocab, batch=4, max_hist=5, seed=seed)
    ours = beam_search(model, trie, vocab, input_ids, mask, num_beams=k)
    hf = hf_beam_search(model, trie, vocab, input_ids, mask, k)
    assert torch.equal(ours.items, hf.items)
    torch.testing.assert_close(ours.scores, hf.scores, atol=1e-4, rtol=1e-4)
    assert (ours.items > 0).all() and torch.equal(trie.codes_of(ours.items), ours.codes)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_steps_the_trie_decides_for_every_beam_skip_the_model_and_change_nothing(k):
    vocab = CodeVocab(levels=4, codebook_size=16)
    codes = dedup_ids(300, 16, seed=k)
    item_codes = torch.cat([torch.full((1, 4), -1), codes])
    trie = CodeTrie(codes, 16, item_offset=1)
    model = random_lm(vocab.size, k)
    input_ids, mask = random_prompts(item_codes, vocab, batch=2, max_hist=5, seed=k)
    ours = beam_search(model, trie, vocab, input_ids, mask, num_beams=k)
    hf = hf_beam_search(model, trie, vocab, input_ids, mask, k)  # a model call at every step
    assert torch.equal(ours.items, hf.items)
    torch.testing.assert_close(ours.scores, hf.scores, atol=1e-4, rtol=1e-4)
    if k == 1:  # one beam per request: at least its last code is the trie's (these prefixes have one item)
        assert ours.forward_calls < 4


def test_the_last_step_feeds_only_the_beams_left_a_choice_of_last_code_and_changes_nothing(monkeypatch):
    vocab = CodeVocab(levels=4, codebook_size=8)
    codes = random_ids(300, 4, 8, 6)
    item_codes = torch.cat([torch.full((1, 4), -1), codes])
    trie = CodeTrie(codes, 8, item_offset=1)
    model = random_lm(vocab.size, 6)
    input_ids, mask = random_prompts(item_codes, vocab, batch=1, max_hist=5, seed=6)
    fed, last = [], []
    real_forward, real_beams = tree_module.lm_forward, search.last_code_beams
    monkeypatch.setattr(tree_module, "lm_forward", lambda m, v, tokens, *a: fed.append(tokens.shape[1])
                        or real_forward(m, v, tokens, *a))
    monkeypatch.setattr(search, "last_code_beams", lambda t, beams, level: last.append(beams)
                        or real_beams(t, beams, level))
    ours = beam_search(model, trie, vocab, input_ids, mask, num_beams=10)
    choice = (trie.only_code(last[-1].nodes, 3) < 0) & (last[-1].scores > float("-inf"))  # [1, 10]
    assert 0 < fed[-1] == int(choice.sum()) < 10  # 3 codes of 300 IDs over 8: many prefixes have one item
    every = beam_search(model, trie, vocab, input_ids, mask, num_beams=10, skip_decided=False)
    assert fed[-1] == 10 and torch.equal(every.items, ours.items)
    torch.testing.assert_close(every.scores, ours.scores, atol=1e-5, rtol=1e-6)
    hf = hf_beam_search(model, trie, vocab, input_ids, mask, 10)  # a model call at every step, every beam fed
    assert torch.equal(ours.items, hf.items)
    torch.testing.assert_close(ours.scores, hf.scores, atol=1e-4, rtol=1e-4)


def test_the_trie_names_the_one_code_a_prefix_allows():
    trie = CodeTrie(torch.tensor([[0, 1], [0, 2], [1, 3]]), 4)
    roots = trie.root_nodes(1)
    assert trie.only_code(roots, 0).tolist() == [-1]  # 0 or 1
    after = [trie.step(roots, torch.tensor([c]), 0) for c in (0, 1)]
    assert trie.only_code(after[0], 1).tolist() == [-1] and trie.only_code(after[1], 1).tolist() == [3]
