"""The shared prompt prefix, encoded once per model: decoding over it is decoding over the whole prompt."""

import copy

import pytest
import torch

from atspeed_rec.decoding.beam_search import beam_search
from atspeed_rec.decoding.speculative import speculative_beam_search
from atspeed_rec.models.prefix_cache import register_prefix, registered_prefix, split_prefix
from atspeed_rec.models.vocab import CodeVocab
from atspeed_rec.semantic_ids.trie import CodeTrie
from random_models import random_ids, random_lm, random_prompts

VOCAB = CodeVocab(levels=4, codebook_size=8)
PREFIX = torch.tensor([VOCAB.offset + 3, VOCAB.offset + 12, VOCAB.offset + 30])  # any 3 tokens of the vocabulary


pytestmark = pytest.mark.usefixtures("one_thread")


def with_prefix(ids, mask, prefix=PREFIX):
    """`[pads][prefix][history]` rows from left-padded history rows, as `TextPrompt` builds them."""
    pre = prefix.expand(ids.shape[0], -1)
    tokens, full = torch.cat([pre, ids], 1), torch.cat([torch.ones_like(pre), mask], 1)
    order = full.argsort(dim=1, stable=True)  # padding first
    return tokens.gather(1, order), full.gather(1, order)


def world(seed, batch=4):
    codes = random_ids(300, 4, 8, seed)
    target, draft = random_lm(VOCAB.size, seed), random_lm(VOCAB.size, seed + 1000, layers=1)
    ids, mask = random_prompts(torch.cat([torch.full((1, 4), -1), codes]), VOCAB, batch=batch, max_hist=5, seed=seed)
    return CodeTrie(codes, 8, item_offset=1), target, draft, *with_prefix(ids, mask)


def cached(model):
    """A copy of `model` whose prompts are declared to start with PREFIX."""
    model = copy.deepcopy(model)
    register_prefix(model, PREFIX)
    return model


def assert_same_search(a, b):
    assert torch.equal(a.items, b.items)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=2e-6)  # float32 noise on |S| ~ 10


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("k", [1, 5])
def test_beam_search_over_a_cached_prefix_finds_the_items_of_feeding_the_whole_prompt(seed, k):
    trie, target, _, ids, mask = world(seed)
    fast = cached(target)
    _, _, kv = split_prefix([fast], VOCAB, ids, mask)
    assert kv is not None and kv[0][0][0].shape[-2] == len(PREFIX)  # the prefix really is cached
    assert_same_search(beam_search(fast, trie, VOCAB, ids, mask, k), beam_search(target, trie, VOCAB, ids, mask, k))


@pytest.mark.parametrize("k,n,gamma,start", [(1, 2, 3, 0), (3, 8, 2, 1), (5, 10, 1, 2), (10, 20, 3, 0)])
def test_strict_speculative_decoding_over_cached_prefixes_returns_the_targets_beam_search(k, n, gamma, start):
    trie, target, draft, ids, mask = world(k)
    spec, _ = speculative_beam_search(cached(target), cached(draft), trie, VOCAB, ids, mask, num_beams=k,
                                      draft_beams=n, gamma=gamma, draft_start=start)
    assert_same_search(spec, beam_search(target, trie, VOCAB, ids, mask, k))


def test_the_cached_prefix_is_rebuilt_when_a_weight_changes():
    trie, target, _, ids, mask = world(2)
    fast = cached(target)
    beam_search(fast, trie, VOCAB, ids, mask, 5)  # builds the prefix's KV
    with torch.no_grad():
        for model in (fast, target):  # the same in-place step on both (an optimizer's)
            for p in model.parameters():
                p.mul_(0.7)
    assert_same_search(beam_search(fast, trie, VOCAB, ids, mask, 5), beam_search(target, trie, VOCAB, ids, mask, 5))


def test_prompts_that_are_not_the_prefix_and_more_are_fed_whole():
    _, target, draft, ids, mask = world(3)
    fast = cached(target)
    other = ids.clone()
    other[-1, int((mask[-1] == 0).sum())] += 1  # the last row's first real token differs
    assert split_prefix([fast], VOCAB, other, mask)[2] is None
    only_prefix, only_mask = with_prefix(ids[:, :0], mask[:, :0])  # nothing after the prefix
    assert split_prefix([fast], VOCAB, only_prefix, only_mask)[2] is None
    assert split_prefix([fast, draft], VOCAB, ids, mask)[2] is None  # the draft does not share it
    assert split_prefix([fast, cached(draft)], VOCAB, ids, mask)[2] is not None
    register_prefix(fast, None)
    assert registered_prefix(fast) == () and split_prefix([fast], VOCAB, ids, mask)[2] is None


def test_the_split_keeps_every_tokens_position_and_the_rows_padding():
    _, target, _, ids, mask = world(4)
    rest, cache_mask, _ = split_prefix([cached(target)], VOCAB, ids, mask)
    p = len(PREFIX)
    assert cache_mask.shape == mask.shape and cache_mask[:, :p].all()
    for row in range(len(ids)):  # the cache will hold [prefix][pads][history]: the same real tokens, in order
        real = torch.cat([PREFIX, rest[row][cache_mask[row, p:].bool()]])
        assert torch.equal(real, ids[row][mask[row].bool()])
