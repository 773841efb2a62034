"""Speculative beam search: strict mode is target beam search exactly, relaxed mode is valid beam sampling."""

import copy
from functools import lru_cache

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from atspeed_rec.alignment.positions import allowed_along
from atspeed_rec.decoding.beam_search import beam_search, masked_log_softmax
from atspeed_rec.decoding.sampling import beam_sample
from atspeed_rec.decoding.beam_search import Beams
from atspeed_rec.decoding.speculative import (accept_drafts, draft_tree, drop_unreachable, fill_beams,
                                              speculative_beam_search)
from atspeed_rec.decoding.tree import DraftTree, cache_rows, prompt_positions, tree_forward
from atspeed_rec.models.vocab import CodeVocab
from atspeed_rec.semantic_ids.trie import CodeTrie
from random_models import dedup_ids, random_ids, random_lm, random_prompts

VOCAB = CodeVocab(levels=4, codebook_size=8)
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


pytestmark = pytest.mark.usefixtures("one_thread")


@lru_cache(maxsize=None)
def world(seed, levels=4):
    """A catalog of ~300 random `levels`-code IDs, a 2-layer target and a 1-layer draft (both random)."""
    codes = random_ids(300, levels, 8, seed)
    size = CodeVocab(levels=levels, codebook_size=8).size
    target, draft = random_lm(size, seed), random_lm(size, seed + 1000, layers=1)
    return codes, CodeTrie(codes, 8, item_offset=1), target, draft


def level_logits(logits, level):
    """`[..., C]` logits of `level`'s codes from transformers' logits over the whole vocabulary."""
    return VOCAB.level_logits(logits[..., VOCAB.offset:], level)


def prompts(codes, batch, seed, vocab=VOCAB):
    item_codes = torch.cat([torch.full((1, codes.shape[1]), -1), codes])  # row 0 = PAD
    return random_prompts(item_codes, vocab, batch=batch, max_hist=5, seed=seed)


def assert_same_as_beam_search(spec, ref):
    assert torch.equal(spec.items, ref.items)
    live = ref.scores > float("-inf")
    assert torch.equal(spec.codes[live], ref.codes[live])
    torch.testing.assert_close(spec.scores, ref.scores, atol=1e-5, rtol=2e-6)  # float32 noise on |S| ~ 10


def target_scores(model, ids, mask, codes, trie):
    """The target's own log p(item) `[B, K]` of each full ID `codes [B, K, L]` after its prompt: each
    code's log-prob renormalised over the codes the trie allows after its prefix."""
    B, K, L = codes.shape
    ids, mask = ids.repeat_interleave(K, 0), mask.repeat_interleave(K, 0)
    tokens = torch.cat([ids, VOCAB.tokens(codes.flatten(0, 1))], 1)
    full = torch.cat([mask, mask.new_ones(B * K, L)], 1)
    with torch.no_grad():
        logits = model(input_ids=tokens, attention_mask=full, position_ids=prompt_positions(full)).logits
    per_level = torch.stack([level_logits(logits[:, -L - 1 + l], l) for l in range(L)], 1)  # [B*K, L, C]
    lp = masked_log_softmax(per_level, allowed_along(trie, codes).flatten(0, 1))
    return lp.gather(-1, codes.flatten(0, 1).unsqueeze(-1)).sum((1, 2)).view(B, K)


def assert_valid_distinct_sorted(result, trie, model, ids, mask):
    items = result.items
    assert (items > 0).all()
    assert all(row.unique().numel() == row.numel() for row in items)
    assert torch.equal(trie.codes_of(items), result.codes)
    assert (result.scores[:, :-1] >= result.scores[:, 1:]).all()
    torch.testing.assert_close(result.scores, target_scores(model, ids, mask, result.codes, trie), atol=1e-4, rtol=0)


@SETTINGS
@given(seed=st.integers(0, 3), k=st.sampled_from([1, 3, 10]), extra=st.sampled_from([0, 1, 7, 15]),
       gamma=st.integers(1, 3), batch=st.sampled_from([1, 3]), self_draft=st.booleans(), bound=st.booleans(),
       start=st.sampled_from([0, 0, 1, 2, 3]), budget=st.sampled_from([0, 0, 1, 4, 12]))
def test_strict_mode_returns_exactly_what_beam_search_returns(seed, k, extra, gamma, batch, self_draft, bound, start,
                                                              budget):
    codes, trie, target, draft = world(seed)
    ids, mask = prompts(codes, batch, seed)
    spec, stats = speculative_beam_search(target, target if self_draft else draft, trie, VOCAB, ids, mask,
                                          num_beams=k, draft_beams=k + extra, gamma=gamma, bound=bound,
                                          draft_start=start, budget=budget)
    assert_same_as_beam_search(spec, beam_search(target, trie, VOCAB, ids, mask, num_beams=k))
    assert not stats.verified_at[:, :start].any()  # codes before draft_start: the target's own steps
    assert (stats.accepted_steps + stats.rounds + stats.forced_steps == 4).all()  # a round advances accepted + 1
    assert (stats.accepted_steps <= stats.drafted_levels).all()
    assert (stats.bounded_steps <= stats.accepted_steps).all() and (bound or not stats.bounded_steps.any())
    if not budget:  # a level holding every valid pair always passes (a budget may prune it)
        assert (stats.filled_levels <= stats.accepted_steps).all()
    assert_per_code_counts_add_up(stats)


@pytest.mark.parametrize("start", [0, 1])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_strict_mode_on_three_code_ids_returns_exactly_what_beam_search_returns(k, start):
    vocab = CodeVocab(levels=3, codebook_size=8)  # 3-code IDs: a tree from code 1 drafts only the middle code
    codes, trie, target, draft = world(7, levels=3)
    ids, mask = prompts(codes, 3, 7, vocab)
    for gamma, extra in ((1, 0), (2, 7)):
        spec, stats = speculative_beam_search(target, draft, trie, vocab, ids, mask, num_beams=k,
                                              draft_beams=k + extra, gamma=gamma, draft_start=start)
        assert_same_as_beam_search(spec, beam_search(target, trie, vocab, ids, mask, num_beams=k))
        assert (stats.accepted_steps + stats.rounds + stats.forced_steps == 3).all()
        assert_per_code_counts_add_up(stats)


def test_undrafted_pairs_are_dropped_only_when_the_next_top_k_provably_excludes_their_children():
    scores = torch.tensor([[-1.0, -2.0, -5.0]] * 3)  # T_i of K = 3, best first; the third pair was not drafted
    held = torch.tensor([[True, True, False]] * 3)
    code_lp = torch.full((3, 3, 4), float("-inf"))  # [G, K, C] the target's log-probs after each pair
    code_lp[0, :2, :2] = torch.tensor([-0.4, -1.1])  # 3rd best child: -2.4 > -5, the undrafted pair's score
    code_lp[1, 0, :2], code_lp[1, 1, 0] = torch.tensor([-0.1, -2.4]), -0.1  # 3rd best child: -3.4 > -5
    code_lp[2, 0, :2], code_lp[2, 1, 0] = torch.tensor([-0.1, -4.5]), -0.1  # 3rd best child: -5.5 < -5: may lose
    new, new_held, dropped = drop_unreachable(scores, held, code_lp, 3)
    assert dropped.tolist() == [True, True, False]
    assert new[:2, 2].tolist() == [float("-inf")] * 2 and new_held[:2].all()
    assert torch.equal(new[2], scores[2]) and torch.equal(new_held[2], held[2])
    tie = code_lp.clone()
    tie[1, 0, 1] = -4.0  # 3rd best child -5.0 == the undrafted pair's score: its child could tie, keep it
    assert not drop_unreachable(scores, held, tie, 3)[2][1]
    few = torch.full_like(code_lp, float("-inf"))
    few[:, 0, 0] = -0.1  # fewer than K children known: nothing can be dropped
    assert not drop_unreachable(scores, held, few, 3)[2].any()


def test_the_bound_accepts_more_levels_and_keeps_the_exact_strict_output():
    """A peaked target and a noisy copy as draft: the draft misses some of the target's weaker beams."""
    codes, trie, target, _ = world(0)
    target = copy.deepcopy(target)
    target.lm_head.weight.data.mul_(3)
    draft = copy.deepcopy(target)
    noise = torch.randn(draft.lm_head.weight.shape, generator=torch.Generator().manual_seed(0))
    draft.lm_head.weight.data.add_(noise * draft.lm_head.weight.data.std())
    ids, mask = prompts(codes, 8, 0)
    for k, n, gamma in [(3, 5, 3), (5, 6, 2)]:
        ref = beam_search(target, trie, VOCAB, ids, mask, k)
        (plain, plain_stats), (bounded, stats) = (
            speculative_beam_search(target, draft, trie, VOCAB, ids, mask, k, n, gamma, bound=b) for b in (False, True))
        for out in (plain, bounded):
            assert torch.equal(out.items, ref.items)
            torch.testing.assert_close(out.scores, ref.scores, atol=1e-4, rtol=1e-5)  # |S| ~ 30 here
        assert stats.bounded_steps.sum() > 0
        assert stats.accepted_steps.sum() > plain_stats.accepted_steps.sum()
        assert stats.target_calls.sum() < plain_stats.target_calls.sum()


def assert_per_code_counts_add_up(stats):
    """Each code position is verified at most once a request, the last one never (it is the bonus step)."""
    assert torch.equal(stats.accepted_at.sum(1), stats.accepted_steps)
    assert ((stats.accepted_at <= stats.verified_at) & (stats.verified_at <= 1)).all()
    assert (stats.verified_at[:, -1] == 0).all()
    rejected = stats.verified_at - stats.accepted_at  # a rejection ends its round
    assert (rejected.sum(1) <= stats.rounds).all()


def test_a_draft_equal_to_the_target_is_accepted_at_every_level():
    codes, trie, target, _ = world(0)
    ids, mask = prompts(codes, 3, 0)
    for k, n in [(1, 1), (3, 3), (10, 10), (3, 8)]:
        _, stats = speculative_beam_search(target, target, trie, VOCAB, ids, mask, k, n, gamma=3)
        assert stats.target_calls.tolist() == [1, 1, 1] and stats.accepted_steps.tolist() == [3, 3, 3]
        assert stats.accepted_at.tolist() == stats.verified_at.tolist() == [[1, 1, 1, 0]] * 3
        assert stats.draft_calls == 3  # one pass per tree level (the first one encodes the prompts), whole batch
    for k in [1, 3, 10]:  # relaxed: with N == K the draft's tree is the target's beam sample, at any temperature
        for temperature in [1.0, 0.5]:
            _, stats = speculative_beam_search(target, target, trie, VOCAB, ids, mask, k, k, gamma=3, mode="relaxed",
                                               generator=torch.Generator().manual_seed(k), temperature=temperature)
            assert stats.accepted_steps.tolist() == [3, 3, 3]


def test_with_a_later_draft_start_the_first_codes_are_the_targets_own_steps():
    codes, trie, target, _ = world(0)
    ids, mask = prompts(codes, 3, 0)
    for start, calls, accepted in [(1, 2, 2), (2, 3, 1), (3, 4, 0), (9, 4, 0)]:  # a draft equal to the target
        spec, stats = speculative_beam_search(target, target, trie, VOCAB, ids, mask, 3, 3, gamma=3, draft_start=start)
        assert_same_as_beam_search(spec, beam_search(target, trie, VOCAB, ids, mask, 3))
        assert (stats.rounds + stats.forced_steps).tolist() == [calls] * 3  # a round is a target call
        assert stats.accepted_steps.tolist() == [accepted] * 3
        assert stats.draft_calls == accepted  # no draft pass before draft_start (its first one encodes the prompts)
        sampled, stats = speculative_beam_search(target, target, trie, VOCAB, ids, mask, 3, 3, gamma=3, mode="relaxed",
                                                 generator=torch.Generator().manual_seed(start), draft_start=start)
        assert_valid_distinct_sorted(sampled, trie, target, ids, mask)
        assert stats.accepted_steps.tolist() == [accepted] * 3


def test_a_last_level_whose_valid_pairs_all_fit_in_the_tree_is_filled_from_the_trie_without_a_draft_pass():
    codes, trie, target, _ = world(1)
    anti = copy.deepcopy(target)
    anti.lm_head.weight.data.neg_()  # prefers the target's least likely codes: the trie, not the draft, wins here
    ids, mask = prompts(codes, 3, 1)
    ref = beam_search(target, trie, VOCAB, ids, mask, 3)
    spec, stats = speculative_beam_search(target, anti, trie, VOCAB, ids, mask, 3, 24, gamma=1, draft_start=2)
    assert_same_as_beam_search(spec, ref)
    assert stats.draft_calls == 0 and stats.filled_levels.tolist() == stats.accepted_steps.tolist() == [1, 1, 1]
    assert stats.target_calls.tolist() == [3, 3, 3]  # codes 0 and 1, then code 2 verified with code 3 after it
    spec, stats = speculative_beam_search(target, anti, trie, VOCAB, ids, mask, 3, 24, gamma=1, draft_start=2,
                                          trie_fill=False)
    assert_same_as_beam_search(spec, ref)
    assert stats.draft_calls == 1 and not stats.filled_levels.any()
    for rule, filled in [("coupled", 1), ("ratio", 0)]:  # the ratio rule may reject a drafted node: never filled
        sampled, stats = speculative_beam_search(target, anti, trie, VOCAB, ids, mask, 3, 24, gamma=1, draft_start=2,
                                                 mode="relaxed", generator=torch.Generator().manual_seed(0),
                                                 relaxed_rule=rule)
        assert_valid_distinct_sorted(sampled, trie, target, ids, mask)
        assert stats.filled_levels.tolist() == [filled] * 3 and stats.draft_calls == 1 - filled
    spec, stats = speculative_beam_search(target, anti, trie, VOCAB, ids, mask, 3, 4, gamma=1, draft_start=2)
    assert_same_as_beam_search(spec, ref)  # 3 beams have more than 4 valid 3rd codes: the draft proposes 4
    assert stats.draft_calls == 1 and not stats.filled_levels.any()


def test_the_target_is_fed_no_dead_tree_nodes():
    codes, trie, _, draft = world(0)
    ids, mask = prompts(codes, 2, 0)
    root = Beams(codes.new_zeros(2, 1, 0), torch.zeros(2, 1), trie.root_nodes(2, 1))
    for depth, width, fed in [(1, 12, 8), (1, 5, 5), (2, 12, 12)]:  # 8 first codes; then more pairs than 12
        tree, *_ = draft_tree(draft, None, mask, root, trie, VOCAB, depth, width, "strict", prompt_ids=ids)
        assert tree.codes.shape[-1] == fed and tree.alive[:, -1].all()
        assert (tree.alive[:, 0].sum(-1) == min(width, 8)).all()  # the first level keeps every live node
        if width >= 8:
            first = tree.codes[:, 0].masked_fill(~tree.alive[:, 0], 99).sort(-1).values[:, :8]
            assert (first == torch.arange(8)).all()


def node_paths(tree: DraftTree, j: int):
    """`[G, N, j + 1]` the codes from the root beam (empty) to each node of level j."""
    path, node = [tree.codes[:, j]], torch.arange(tree.codes.shape[-1]).expand(tree.codes.shape[0], -1)
    for i in range(j, 0, -1):
        node = tree.parents[:, i].gather(1, node)
        path.insert(0, tree.codes[:, i - 1].gather(1, node))
    return torch.stack(path, -1)


def test_the_target_is_not_fed_leaves_whose_last_code_the_trie_decides_and_strict_output_is_unchanged():
    codes, trie, target, draft = world(1)
    ids, mask = prompts(codes, 1, 1)
    root = Beams(codes.new_zeros(1, 1, 0), torch.zeros(1, 1), trie.root_nodes(1, 1))
    shallow, *_ = draft_tree(draft, None, mask, root, trie, VOCAB, 2, 6, "strict", prompt_ids=ids, skip_decided=True)
    assert shallow.unfed is None  # its leaves hold the 2nd code of 4: the target's output after them is needed
    tree, *_ = draft_tree(draft, None, mask, root, trie, VOCAB, 3, 6, "strict", prompt_ids=ids, skip_decided=True)
    last = trie.only_code(trie.walk(node_paths(tree, 2)), 3) >= 0  # [1, N] one valid 4th code
    assert torch.equal(tree.unfed[:, 2], tree.alive[:, 2] & last) and not tree.unfed[:, :2].any()
    assert 0 < int(tree.unfed.sum()) < int(tree.alive[:, 2].sum())  # some leaves are decided, some are not
    _, _, kv = tree_forward(target, VOCAB, mask, root.codes, tree, prompt_ids=ids,
                            ancestors=root.codes.new_zeros(1, 1, 0))
    assert kv[0][0].shape[2] == ids.shape[1] + int((tree.alive & ~tree.unfed).sum())  # the prompt + nodes fed
    ref = beam_search(target, trie, VOCAB, ids, mask, 3)
    for k_draft, start in [(6, 0), (20, 1), (3, 2)]:  # trees reaching the 3rd code from each start
        for skip in (True, False):
            spec, _ = speculative_beam_search(target, draft, trie, VOCAB, ids, mask, 3, k_draft, gamma=3,
                                              draft_start=start, skip_decided=skip)
            assert_same_as_beam_search(spec, ref)


def test_a_budget_keeps_the_best_nodes_by_draft_score_with_their_ancestors_and_the_target_feeds_only_them():
    codes, trie, target, draft = world(2)
    ids, mask = prompts(codes, 3, 2)
    root = Beams(codes.new_zeros(3, 1, 0), torch.zeros(3, 1), trie.root_nodes(3, 1))
    full, *_ = draft_tree(draft, None, mask, root, trie, VOCAB, 3, 6, "strict", prompt_ids=ids)
    tree, *_ = draft_tree(draft, None, mask, root, trie, VOCAB, 3, 6, "strict", prompt_ids=ids, budget=7,
                          skip_decided=True)
    assert (tree.alive.sum((1, 2)) == 7).all() and torch.equal(tree.codes, full.codes[..., :tree.codes.shape[-1]])
    for j in range(1, 3):  # a kept node's parent is kept
        parent_alive = tree.alive[:, j - 1].gather(1, tree.parents[:, j])
        assert (parent_alive | ~tree.alive[:, j]).all()
    slots = tree.fed_slots()
    fed = tree.alive & ~tree.unfed  # the last level holds the 3rd code of 4: leaves with one valid 4th go unfed
    assert slots is not None and int((slots >= 0).sum()) == int(fed.flatten(1).any(0).sum())
    _, _, kv = tree_forward(target, VOCAB, mask, root.codes, tree, prompt_ids=ids,
                            ancestors=root.codes.new_zeros(3, 1, 0))
    assert kv[0][0].shape[2] == ids.shape[1] + int((slots >= 0).sum())  # the prompt + the nodes live somewhere


def test_an_adversarial_draft_still_gives_the_exact_strict_output():
    codes, trie, target, _ = world(1)
    anti = copy.deepcopy(target)
    anti.lm_head.weight.data.neg_()  # prefers the target's least likely codes
    ids, mask = prompts(codes, 3, 1)
    for k in [1, 3, 10]:
        spec, stats = speculative_beam_search(target, anti, trie, VOCAB, ids, mask, k, k, gamma=3)
        assert_same_as_beam_search(spec, beam_search(target, trie, VOCAB, ids, mask, k))
        if k < 8:  # (with K >= 8 the draft keeps all 8 first codes, whatever it prefers)
            assert stats.accepted_steps.sum() * 4 < stats.drafted_levels.sum()  # mostly rejected


def test_codes_the_trie_decides_end_a_request_without_a_round():
    codes = dedup_ids(300, 16, seed=0)  # the 4th code only tells apart items sharing 3 codes
    vocab = CodeVocab(levels=4, codebook_size=16)
    trie = CodeTrie(codes, 16, item_offset=1)
    target = random_lm(vocab.size, 0)
    anti = copy.deepcopy(target)
    anti.lm_head.weight.data.neg_()  # rejected at once: every round advances one code
    ids, mask = random_prompts(torch.cat([torch.full((1, 4), -1), codes]), vocab, batch=4, max_hist=5, seed=0)
    spec, stats = speculative_beam_search(target, anti, trie, vocab, ids, mask, num_beams=1, draft_beams=1, gamma=3)
    assert_same_as_beam_search(spec, beam_search(target, trie, vocab, ids, mask, num_beams=1))
    assert (stats.forced_steps >= 1).all() and torch.equal(stats.target_calls, stats.rounds)
    assert (stats.accepted_steps + stats.rounds + stats.forced_steps == 4).all()


def test_items_sharing_long_prefixes_are_found_like_beam_search_finds_them():
    g = torch.Generator().manual_seed(5)
    shared = torch.tensor([[a, b, c, x] for a, b, c in [(0, 0, 0), (1, 2, 3), (1, 2, 4)] for x in range(8)])
    codes = torch.unique(torch.cat([shared, torch.randint(0, 8, (40, 4), generator=g)]), dim=0)
    trie = CodeTrie(codes, 8, item_offset=1)
    _, _, target, draft = world(2)
    ids, mask = prompts(codes, 3, 5)
    for d, k, n, gamma in [(draft, 10, 10, 3), (draft, 10, 20, 2), (target, 10, 10, 3), (draft, 3, 5, 1)]:
        spec, _ = speculative_beam_search(target, d, trie, VOCAB, ids, mask, k, n, gamma)
        assert_same_as_beam_search(spec, beam_search(target, trie, VOCAB, ids, mask, k))
        sampled, _ = speculative_beam_search(target, d, trie, VOCAB, ids, mask, k, n, gamma, mode="relaxed",
                                             generator=torch.Generator().manual_seed(k))
        assert_valid_distinct_sorted(sampled, trie, target, ids, mask)


def test_relaxed_acceptance_frequency_is_min_of_one_and_p_over_q():
    p = torch.tensor([0.05, 0.30, 0.20, 0.45, 1e-4])
    q = torch.tensor([0.10, 0.15, 0.20, 0.50, 0.05])
    trials = 20_000
    g = torch.Generator().manual_seed(0)
    accepted = accept_drafts(p.log().expand(trials, -1), q.log().expand(trials, -1), g).float().mean(0)
    torch.testing.assert_close(accepted, (p / q).clamp(max=1), atol=0.02, rtol=0)  # 4+ sigma at 20k trials


def test_rejected_slots_are_refilled_from_the_residual_first():
    p = torch.tensor([0.4, 0.3, 0.2, 0.1, 0.0])
    q = torch.tensor([0.1, 0.1, 0.4, 0.4, 0.0])
    residual = (p - q).clamp(min=0)  # [0.3, 0.2, 0, 0, 0]
    accepted = torch.tensor([False, False, True, False, False])
    trials = 20_000
    flat, valid = fill_beams(accepted.expand(trials, -1), residual.expand(trials, -1), p.log().expand(trials, -1),
                             k=5, generator=torch.Generator().manual_seed(0))
    assert (flat[:, 0] == 2).all()  # the accepted pair first
    first = torch.bincount(flat[:, 1], minlength=5).float() / trials  # then the residual, ∝ max(p - q, 0)
    torch.testing.assert_close(first, residual / residual.sum(), atol=0.02, rtol=0)
    assert (flat[:, 3] == 3).all() and valid[:, :4].all() and not valid[:, 4].any()  # then p; p = 0 stays empty


def test_with_more_than_k_accepted_the_kept_ones_are_drawn_from_p():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    accepted = torch.ones(4, dtype=torch.bool)  # a wide tree: every drafted node accepted, K = 1 kept
    trials = 20_000
    flat, valid = fill_beams(accepted.expand(trials, -1), torch.zeros(trials, 4), p.log().expand(trials, -1),
                             k=1, generator=torch.Generator().manual_seed(0))
    kept = torch.bincount(flat[:, 0], minlength=4).float() / trials  # ∝ p, not uniform over the accepted
    torch.testing.assert_close(kept, p, atol=0.02, rtol=0)
    assert valid.all()


def random_tree(batch, beams, depth, width, seed):
    g = torch.Generator().manual_seed(seed)
    if depth == 0:
        return DraftTree.empty(batch, width)
    parents = torch.stack([torch.randint(0, beams if j == 0 else width, (batch, width), generator=g)
                           for j in range(depth)], 1)
    codes = torch.randint(0, 8, (batch, depth, width), generator=g)
    return DraftTree(parents, codes, torch.ones_like(codes, dtype=torch.bool), [])


def path_logprobs(model, ids, mask, tokens):
    """Log-probs after the last of `tokens [B, t]` appended to each prompt, by a plain causal forward."""
    full = torch.cat([mask, mask.new_ones(tokens.shape)], 1)
    with torch.no_grad():
        logits = model(input_ids=torch.cat([ids, tokens], 1), attention_mask=full,
                       position_ids=prompt_positions(full)).logits
    return torch.log_softmax(logits[:, -1, VOCAB.offset:].float(), -1)  # over the code tokens, as decoding does


def cache_of_earlier_codes(target, ids, mask, beam_codes, n_cached):
    """The cache beam search leaves before feeding the codes after the first `n_cached` of
    `beam_codes [G, H, cur]`: the prompt, then level by level each beam's code plus a decoy token
    nobody descends from; and the beams' cache indices `[G, H, n_cached]`."""
    G, H, cur = beam_codes.shape
    no_tree = DraftTree.empty(G)
    ancestors = beam_codes.new_zeros(G, 1, 0)
    _, _, cache = tree_forward(target, VOCAB, mask, ancestors, no_tree, prompt_ids=ids, ancestors=ancestors)
    ancestors = beam_codes.new_zeros(G, H, 0)
    for t in range(n_cached):
        T = cache[0][0].shape[2]
        decoy = torch.randint(0, 8, (G, 1, t + 1), generator=torch.Generator().manual_seed(t))
        fed = torch.cat([beam_codes[:, :, :t + 1], decoy], 1)  # [G, H + 1, t + 1]
        _, _, cache = tree_forward(target, VOCAB, mask, fed, no_tree, cache,
                                   ancestors=torch.cat([ancestors, ancestors[:, :1]], 1))
        ancestors = torch.cat([ancestors, (T + torch.arange(H)).view(1, H, 1).expand(G, H, 1)], -1)
    return cache, ancestors


@pytest.mark.parametrize("unfed", [None, 1, 2], ids=["prompt_cached", "newest_code_fed", "two_codes_fed"])
def test_the_one_pass_tree_forward_equals_a_forward_per_root_to_node_path(unfed):
    codes, _, target, _ = world(3)
    ids, mask = prompts(codes, 2, 3)  # left-padded, different lengths
    width = 4
    for cur, beams, depth in [(0, 1, 3), (1, 3, 2), (2, 3, 1), (3, 2, 0)]:
        beam_codes = torch.randint(0, 8, (2, beams, cur), generator=torch.Generator().manual_seed(cur))
        tree = random_tree(2, beams, depth, width, seed=cur)
        with torch.no_grad():
            _, _, cache = tree_forward(target, VOCAB, mask, beam_codes[:, :1, :0], DraftTree.empty(2, width),
                                       prompt_ids=ids)  # the prompt alone, as the first round leaves it
            assert all(k.shape[2] == v.shape[2] == ids.shape[1] for k, v in cache)
            if cur == 0:
                lp_beams, lp_tree, _ = tree_forward(target, VOCAB, mask, beam_codes, tree, prompt_ids=ids)
            elif unfed:  # only the last `unfed` codes are fed; the earlier ones (and decoys) are in the cache
                fed = min(unfed, cur)
                cache, ancestors = cache_of_earlier_codes(target, ids, mask, beam_codes, cur - fed)
                T = cache[0][0].shape[2]
                lp_beams, lp_tree, grown = tree_forward(target, VOCAB, mask, beam_codes, tree, cache,
                                                        ancestors=ancestors)
                assert grown[0][0].shape[2] == T + beams * fed + depth * width  # grown by what was fed
            else:
                cache = cache_rows(cache, torch.arange(2))  # the prompt's KV, as later rounds use it
                lp_beams, lp_tree, _ = tree_forward(target, VOCAB, mask, beam_codes, tree, cache)
        for b in range(2):
            for h in range(beams):
                path = VOCAB.tokens(beam_codes[b, h]).unsqueeze(0)  # [1, cur]; cur == 0: after the prompt
                ref = path_logprobs(target, ids[b:b + 1], mask[b:b + 1], path)
                torch.testing.assert_close(lp_beams[b, h], ref[0], atol=1e-5, rtol=0)
            for j in range(depth):
                for n in range(width):
                    chain, node = [], n
                    for level in range(j, -1, -1):  # walk up to the root beam
                        chain.insert(0, VOCAB.tokens(tree.codes[b, level, node], cur + level))
                        node = tree.parents[b, level, node]
                    tokens = torch.cat([VOCAB.tokens(beam_codes[b, node]), torch.stack(chain)]).unsqueeze(0)
                    ref = path_logprobs(target, ids[b:b + 1], mask[b:b + 1], tokens)
                    torch.testing.assert_close(lp_tree[b, j, n], ref[0], atol=1e-5, rtol=0)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(seed=st.integers(0, 3), k=st.sampled_from([1, 3, 10]), extra=st.sampled_from([0, 5, 15]),
       gamma=st.integers(1, 3), batch=st.sampled_from([1, 3]), self_draft=st.booleans(),
       budget=st.sampled_from([0, 0, 4, 12]))
def test_relaxed_items_are_always_valid_distinct_and_sorted_by_target_score(seed, k, extra, gamma, batch,
                                                                            self_draft, budget):
    codes, trie, target, draft = world(seed)
    ids, mask = prompts(codes, batch, seed)
    result, stats = speculative_beam_search(target, target if self_draft else draft, trie, VOCAB, ids, mask,
                                            num_beams=k, draft_beams=k + extra, gamma=gamma, mode="relaxed",
                                            generator=torch.Generator().manual_seed(seed), budget=budget)
    assert_valid_distinct_sorted(result, trie, target, ids, mask)
    assert (stats.accepted_steps + stats.rounds + stats.forced_steps == 4).all()
    assert_per_code_counts_add_up(stats)


def test_beam_sampling_returns_valid_distinct_items_sorted_by_target_score():
    codes, trie, target, _ = world(0)
    ids, mask = prompts(codes, 3, 0)
    for k in [1, 10]:
        result = beam_sample(target, trie, VOCAB, ids, mask, k, torch.Generator().manual_seed(k))
        assert_valid_distinct_sorted(result, trie, target, ids, mask)


def test_beam_sampling_at_a_tiny_temperature_is_beam_search():
    codes, trie, target, _ = world(2)
    ids, mask = prompts(codes, 3, 2)
    for k in [1, 10]:
        sampled = beam_sample(target, trie, VOCAB, ids, mask, k, torch.Generator().manual_seed(k), temperature=1e-6)
        assert_same_as_beam_search(sampled, beam_search(target, trie, VOCAB, ids, mask, k))


def test_requests_that_finish_in_different_rounds_each_get_their_own_result():
    codes, trie, target, draft = world(0)
    ids, mask = prompts(codes, 3, 0)
    spec, stats = speculative_beam_search(target, draft, trie, VOCAB, ids, mask, num_beams=1, draft_beams=1,
                                          gamma=1)
    assert stats.target_calls.unique().numel() > 1
    assert_same_as_beam_search(spec, beam_search(target, trie, VOCAB, ids, mask, num_beams=1))


def item_distribution(model, trie, codes, ids, mask, temperature=1.0, last_level="sample"):
    """Exact probability of each item under target sampling with K = 1: the product over levels of
    p(c_t | prefix)^(1/T) renormalised over the codes the trie allows there ("sample"); with
    "top_k", the product over the first L - 1 levels, times 1 where the last code is the prefix's best."""
    n = codes.shape[0]
    tokens = torch.cat([ids.expand(n, -1), VOCAB.tokens(codes)], 1)
    full = torch.cat([mask.expand(n, -1), mask.new_ones(n, 4)], 1)
    with torch.no_grad():
        logits = model(input_ids=tokens, attention_mask=full, position_ids=prompt_positions(full)).logits
    lp = torch.log_softmax(logits[:, -5:-1].float(), -1)  # [n, L, V]
    total = torch.zeros(n)
    for t in range(4):
        code_lp = level_logits(lp[:, t], t).masked_fill(~trie.allowed_after(codes[:, :t]), float("-inf"))
        if t == 3 and last_level == "top_k":  # the item is kept iff its last code is its prefix's argmax
            best = code_lp.gather(1, codes[:, t:t + 1]).squeeze(1) == code_lp.max(-1).values
            total = total.masked_fill(~best, float("-inf"))
            break
        code_lp = code_lp / temperature
        total += code_lp.gather(1, codes[:, t:t + 1]).squeeze(1) - code_lp.logsumexp(-1)
    return total.exp()


@pytest.mark.parametrize("last_level", ["sample", "top_k"])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_relaxed_mode_with_one_beam_samples_items_exactly_as_the_target_does(temperature, last_level):
    g = torch.Generator().manual_seed(7)
    codes = torch.unique(torch.randint(0, 3, (40, 4), generator=g), dim=0)[:24]  # few items: dense probabilities
    trie = CodeTrie(codes, 8, item_offset=1)
    _, _, target, draft = world(1)
    ids, mask = prompts(codes, 1, 7)
    exact = item_distribution(target, trie, codes, ids, mask, temperature, last_level)
    if last_level == "top_k":
        assert (exact == 0).sum() > 5  # items that are not their prefix's best are never returned
    trials = 4000
    ids, mask = ids.expand(trials, -1), mask.expand(trials, -1)
    for result in [speculative_beam_search(target, draft, trie, VOCAB, ids, mask, 1, 1, gamma=3, mode="relaxed",
                                           generator=g, temperature=temperature, last_level=last_level)[0],
                   beam_sample(target, trie, VOCAB, ids, mask, 1, g, temperature, last_level)]:
        freq = torch.bincount(result.items.flatten() - 1, minlength=codes.shape[0]).float() / trials
        torch.testing.assert_close(freq, exact, atol=0.03, rtol=0)  # one item's std <= 0.008


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_coupled_relaxed_mode_keeps_each_item_as_often_as_beam_sampling_and_the_ratio_rule_does_not(temperature):
    g = torch.Generator().manual_seed(7)
    codes = torch.unique(torch.randint(0, 3, (40, 4), generator=g), dim=0)[:24]  # few items: dense probabilities
    trie = CodeTrie(codes, 8, item_offset=1)
    _, _, target, draft = world(1)
    trials = 4000
    ids, mask = (t.expand(trials, -1) for t in prompts(codes, 1, 7))

    def kept(result):  # how often each item is among the K returned
        return torch.bincount(result.items.flatten() - 1, minlength=codes.shape[0]).float() / trials

    reference = kept(beam_sample(target, trie, VOCAB, ids, mask, 3, g, temperature, "sample"))
    spec = {rule: speculative_beam_search(target, draft, trie, VOCAB, ids, mask, 3, 6, gamma=3, mode="relaxed",
                                          generator=g, temperature=temperature, last_level="sample",
                                          relaxed_rule=rule) for rule in ("coupled", "ratio")}
    torch.testing.assert_close(kept(spec["coupled"][0]), reference, atol=0.045, rtol=0)  # difference std <= 0.011
    later, _ = speculative_beam_search(target, draft, trie, VOCAB, ids, mask, 3, 6, gamma=3, mode="relaxed",
                                       generator=g, temperature=temperature, last_level="sample", draft_start=1)
    torch.testing.assert_close(kept(later), reference, atol=0.045, rtol=0)  # the first code by the target's own draw
    assert (kept(spec["ratio"][0]) - reference).abs().max() > 0.15  # min(1, p/q) on single draws: not beam sampling
    assert spec["coupled"][1].accepted_steps.sum() > spec["ratio"][1].accepted_steps.sum()
