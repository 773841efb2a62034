"""Our constrained beam search against Hugging Face `generate` on the same model."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from atspeed_rec.decoding.beam_search import beam_search
from atspeed_rec.models.vocab import CodeVocab
from atspeed_rec.semantic_ids.trie import CodeTrie


def random_ids(n_items, levels, codebook, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, codebook, (n_items * 3, levels), generator=g)
    codes = torch.unique(codes, dim=0)
    return codes[torch.randperm(codes.shape[0], generator=g)[:n_items]]


def random_lm(vocab_size, seed, layers=2):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    model = LlamaForCausalLM(config).eval()
    for p in model.parameters():  # sharper distributions than the default init, fewer near-ties
        p.data.mul_(4.0)
    return model


def random_prompts(item_codes, vocab, batch, max_hist, seed):
    g = torch.Generator().manual_seed(seed)
    n = item_codes.shape[0]
    lengths = torch.randint(1, max_hist + 1, (batch,), generator=g)
    items = torch.randint(1, n, (batch, max_hist), generator=g)
    items = torch.where(torch.arange(max_hist) >= max_hist - lengths.unsqueeze(1), items, 0)
    tokens = vocab.history_tokens(item_codes, items)
    return tokens, (tokens != vocab.pad_id).long()


def hf_beam_search(model, trie, vocab, input_ids, attention_mask, k):
    P = input_ids.shape[1]

    def allowed(batch_id, sent):
        level = sent.shape[0] - P
        codes = (sent[P:] - vocab.offset - torch.arange(level) * vocab.codebook_size)
        mask = trie.allowed_after(codes)
        return (torch.nonzero(mask).flatten() + vocab.level_start(level)).tolist()

    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, num_beams=k,
                         num_return_sequences=k, max_new_tokens=vocab.levels, do_sample=False,
                         prefix_allowed_tokens_fn=allowed, output_scores=True, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0, eos_token_id=None,
                         **({"length_penalty": 0.0, "early_stopping": False} if k > 1 else {}))
    B = input_ids.shape[0]
    new = out.sequences[:, P:].view(B, k, vocab.levels)
    codes = new - vocab.offset - torch.arange(vocab.levels) * vocab.codebook_size
    if k > 1:
        scores = out.sequences_scores
    else:  # greedy search keeps no sequence score: sum the chosen tokens' log-probs
        steps = torch.stack([torch.log_softmax(l.float(), -1) for l in out.logits], 1)  # [B, L, V]
        scores = steps.gather(-1, out.sequences[:, P:].unsqueeze(-1)).sum((1, 2))
    return trie.item_of(codes), scores.view(B, k)


@pytest.mark.parametrize("k,seed", [(1, 0), (3, 1), (10, 2), (10, 3)])
def test_beam_search_returns_what_generate_returns(k, seed):
    vocab = CodeVocab(levels=4, codebook_size=8)
    codes = random_ids(300, 4, 8, seed)
    item_codes = torch.cat([torch.full((1, 4), -1), codes])  # row 0 = PAD
    trie = CodeTrie(codes, 8, item_offset=1)
    model = random_lm(vocab.size, seed)
    input_ids, mask = random_prompts(item_codes, vocab, batch=4, max_hist=5, seed=seed)
    ours = beam_search(model, trie, vocab, input_ids, mask, num_beams=k)
    hf_items, hf_scores = hf_beam_search(model, trie, vocab, input_ids, mask, k)
    assert torch.equal(ours.items, hf_items)
    torch.testing.assert_close(ours.scores, hf_scores, atol=1e-4, rtol=1e-4)
    assert (ours.items > 0).all() and torch.equal(trie.codes_of(ours.items), ours.codes)
