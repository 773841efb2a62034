"""The prefix trie against a brute-force answer on random ID sets."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from atspeed_rec.semantic_ids.trie import CodeTrie


@st.composite
def id_sets(draw):
    levels = draw(st.integers(1, 4))
    codebook = draw(st.integers(1, 5))
    tuples = draw(st.sets(st.tuples(*[st.integers(0, codebook - 1)] * levels), min_size=1, max_size=40))
    return torch.tensor(sorted(tuples, key=lambda _: draw(st.randoms()).random())), codebook


@settings(max_examples=150, deadline=None)
@given(id_sets(), st.data())
def test_allowed_codes_equal_the_brute_force_answer(ids, data):
    codes, C = ids
    n, L = codes.shape
    trie = CodeTrie(codes, C, item_offset=1)
    depth = data.draw(st.integers(0, L - 1))
    drawn = data.draw(st.lists(st.tuples(*[st.integers(0, C - 1)] * depth), min_size=1, max_size=12))
    prefixes = torch.tensor(drawn, dtype=torch.long).reshape(len(drawn), depth)
    batched = prefixes.shape[0] % 3 == 0  # also as a [B, K, depth] batch
    shaped = prefixes.reshape(len(drawn) // 3, 3, depth) if batched else prefixes
    mask = trie.allowed_after(shaped).reshape(-1, C)
    for row, prefix in enumerate(prefixes.tolist()):
        expected = {tuple(c)[depth] for c in codes.tolist() if list(c[:depth]) == prefix}
        assert set(torch.nonzero(mask[row]).flatten().tolist()) == expected


@settings(max_examples=100, deadline=None)
@given(id_sets())
def test_item_ids_and_codes_round_trip(ids):
    codes, C = ids
    trie = CodeTrie(codes, C, item_offset=1)
    items = trie.item_of(codes)
    assert torch.equal(items, torch.arange(1, codes.shape[0] + 1))
    assert torch.equal(trie.codes_of(items), codes)


def test_a_code_sequence_that_is_no_item_maps_to_minus_one():
    trie = CodeTrie(torch.tensor([[0, 1], [1, 0]]), 2)
    assert trie.item_of(torch.tensor([[0, 0], [1, 1], [0, 1]])).tolist() == [-1, -1, 0]


def test_duplicate_ids_are_refused():
    with pytest.raises(ValueError, match="not unique"):
        CodeTrie(torch.tensor([[0, 1], [0, 1]]), 2)


def test_walking_nodes_step_by_step_equals_masking_whole_prefixes():
    g = torch.Generator().manual_seed(0)
    codes = torch.unique(torch.randint(0, 6, (200, 3), generator=g), dim=0)
    trie = CodeTrie(codes, 6)
    nodes = trie.root_nodes(len(codes))
    for depth in range(3):
        assert torch.equal(trie.allowed(nodes, depth), trie.allowed_after(codes[:, :depth]))
        nodes = trie.step(nodes, codes[:, depth], depth)
    assert torch.equal(nodes, torch.arange(len(codes)))
