"""History items carry their own vector on their last code token, and only items of the prompt do."""

import torch
from torch import nn

from atspeed_rec.models.item_embedding import ItemTokenEmbedding
from atspeed_rec.models.vocab import CodeVocab
from random_models import random_ids

VOCAB = CodeVocab(levels=3, codebook_size=5)


def embedding(seed=0):
    codes = random_ids(40, 3, 5, seed)
    item_codes = torch.cat([torch.full((1, 3), -1), codes])  # row 0 = PAD
    torch.manual_seed(seed)
    return ItemTokenEmbedding(nn.Embedding(VOCAB.size, 8), VOCAB, item_codes, init_std=1.0), item_codes


def test_each_whole_item_is_found_on_its_last_code_token_and_nowhere_else():
    emb, item_codes = embedding()
    items = torch.tensor([[0, 7, 3], [12, 40, 1]])  # left-padded histories
    tokens = VOCAB.history_tokens(item_codes, items)  # [2, 9]
    found = emb.items_ending_at(tokens)
    want = torch.zeros_like(tokens)
    want[:, 2::3] = items  # the last code of each item slot (0 for the pad slot)
    assert torch.equal(found, want)


def test_a_partial_item_gets_no_item_vector():
    emb, item_codes = embedding(1)
    tokens = VOCAB.history_tokens(item_codes, torch.tensor([[5, 9]]))
    generated = VOCAB.tokens(item_codes[9, :2]).unsqueeze(0)  # the first L-1 codes of an item being generated
    with_partial = torch.cat([tokens, generated], 1)
    assert torch.equal(emb.items_ending_at(with_partial)[0, -2:], torch.zeros(2, dtype=torch.long))
    assert torch.equal(emb(generated), emb.code_embedding(generated))  # fed alone (decoding steps): codes only


def test_item_vectors_are_added_to_the_code_embeddings():
    emb, item_codes = embedding(2)
    tokens = VOCAB.history_tokens(item_codes, torch.tensor([[4, 6]]))
    diff = emb(tokens) - emb.code_embedding(tokens)  # [1, 6, 8]
    torch.testing.assert_close(diff[0, 2], emb.item_embedding.weight[4])
    torch.testing.assert_close(diff[0, 5], emb.item_embedding.weight[6])
    assert diff[0, [0, 1, 3, 4]].abs().max() == 0
