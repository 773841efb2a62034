"""Draft-alignment losses against hand computations on tiny distributions.

The running example (C = 4, code 3 disallowed but given the HIGHEST logit by both models, so a
missing mask would show): draft q = (0.5, 0.3, 0.2, 0), target p = (0.2, 0.6, 0.2, 0).
"""

import math

import pytest
import torch

from atspeed_rec.alignment.losses import (
    ALIGN_LOSSES, LOG_FLOOR, UnknownAlignLossError, atspeed_r_loss, atspeed_s_loss, atspeed_s_terms, ce_loss,
    combine, distillspec_loss, get_align_loss, masked_log_softmax, seqkd_loss, tvd_loss, wordkd_loss)
from atspeed_rec.errors import ConfigError

Q = [0.5, 0.3, 0.2]
P = [0.2, 0.6, 0.2]
ALLOWED = torch.tensor([True, True, True, False])


def logits(probs, masked_logit=9.0):
    return torch.tensor([math.log(x) for x in probs] + [masked_logit])


DRAFT, TARGET = logits(Q, 5.0), logits(P, 9.0)


def close(value, expected):
    assert float(torch.as_tensor(value).detach()) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_masked_log_softmax_gives_disallowed_codes_exactly_zero_probability():
    lp = masked_log_softmax(torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([True, False, True, True]))
    z = math.exp(1) + math.exp(3) + math.exp(0)
    assert lp[1] == float("-inf") and lp.exp()[1] == 0.0
    for code, logit in [(0, 1.0), (2, 3.0), (3, 0.0)]:
        close(lp[code], logit - math.log(z))


def test_masked_log_softmax_divides_logits_by_tau():
    lp = masked_log_softmax(torch.tensor([2.0, 0.0]), torch.tensor([True, True]), tau=2.0)
    close(lp[0].exp(), math.e / (math.e + 1.0))


def test_atspeed_s_is_top_k_reverse_kl_plus_target_weighted_entropy():
    # S = draft's top-2 allowed codes = {0, 1}; q_S = (.625, .375), p_S = (.25, .75); v_K = code 1.
    qs, ps = [0.5 / 0.8, 0.3 / 0.8], [0.2 / 0.8, 0.6 / 0.8]
    kl = qs[0] * math.log(qs[0] / ps[0]) + qs[1] * math.log(qs[1] / ps[1])
    entropy = -(qs[0] * math.log(qs[0]) + qs[1] * math.log(qs[1]))
    p_vk = 0.6  # the target's full (masked, not renormalised over S) probability of code 1
    kl_term, density = atspeed_s_terms(DRAFT, TARGET, ALLOWED, k=2)
    close(kl_term, kl)
    close(density, p_vk * entropy)
    close(atspeed_s_loss(DRAFT, TARGET, ALLOWED, k=2), kl + p_vk * entropy)
    close(atspeed_s_loss(DRAFT, TARGET, ALLOWED, k=2, beta=0.5), kl + 0.5 * p_vk * entropy)


def test_atspeed_s_clips_k_to_the_number_of_allowed_codes():
    # k = 10 > 3 allowed codes: S = all of them, v_K = the draft's worst allowed code (code 2).
    kl = sum(q * math.log(q / p) for q, p in zip(Q, P))
    entropy = -sum(q * math.log(q) for q in Q)
    close(atspeed_s_loss(DRAFT, TARGET, ALLOWED, k=10), kl + 0.2 * entropy)


def test_atspeed_r_and_tvd_are_half_the_l1_distance():
    expected = 0.5 * (abs(0.5 - 0.2) + abs(0.3 - 0.6) + abs(0.2 - 0.2))  # 0.3
    close(atspeed_r_loss(DRAFT, TARGET, ALLOWED), expected)
    close(tvd_loss(DRAFT, TARGET, ALLOWED), expected)


def test_wordkd_is_forward_kl_from_target_to_draft():
    expected = 0.2 * math.log(0.2 / 0.5) + 0.6 * math.log(0.6 / 0.3) + 0.2 * math.log(0.2 / 0.2)
    close(wordkd_loss(DRAFT, TARGET, ALLOWED), expected)


def test_distillspec_defaults_to_tvd_and_offers_both_kl_directions():
    close(distillspec_loss(DRAFT, TARGET, ALLOWED), 0.3)
    close(distillspec_loss(DRAFT, TARGET, ALLOWED, divergence="fkl"),
          0.2 * math.log(0.2 / 0.5) + 0.6 * math.log(0.6 / 0.3))
    close(distillspec_loss(DRAFT, TARGET, ALLOWED, divergence="rkl"),
          0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(0.3 / 0.6))
    with pytest.raises(ConfigError, match="tvd, fkl, rkl"):
        distillspec_loss(DRAFT, TARGET, ALLOWED, divergence="jsd")


def test_seqkd_is_masked_cross_entropy_on_the_targets_codes_skipping_ignored_labels():
    draft, allowed = torch.stack([DRAFT, DRAFT]), torch.stack([ALLOWED, ALLOWED])
    close(seqkd_loss(draft, allowed, torch.tensor([1, -100])), -math.log(0.3))
    close(ce_loss(draft, allowed, torch.tensor([1, 0])), -(math.log(0.3) + math.log(0.5)) / 2)


def test_losses_average_over_the_weighted_positions_only():
    # Position 2 swaps the roles: TVD is 0.3 again; position 3 (weight 0) would give 0.
    draft = torch.stack([DRAFT, TARGET, DRAFT])
    target = torch.stack([TARGET, DRAFT, DRAFT])
    allowed = ALLOWED.expand(3, 4)
    per_position = atspeed_r_loss(draft, target, allowed, reduction="none")
    assert per_position.tolist() == pytest.approx([0.3, 0.3, 0.0], abs=1e-6)
    close(atspeed_r_loss(draft, target, allowed), 0.2)
    close(atspeed_r_loss(draft, target, allowed, weight=torch.tensor([True, True, False])), 0.3)
    # A position with no allowed code does not count either.
    allowed = torch.stack([ALLOWED, ALLOWED, torch.zeros(4, dtype=torch.bool)])
    close(atspeed_r_loss(draft, target, allowed), 0.3)


def test_tau_flattens_both_distributions_before_the_loss():
    # tau = 2 turns log-probs into half log-probs: q ~ sqrt(Q), p ~ sqrt(P).
    zq, zp = sum(math.sqrt(x) for x in Q), sum(math.sqrt(x) for x in P)
    q, p = [math.sqrt(x) / zq for x in Q], [math.sqrt(x) / zp for x in P]
    close(atspeed_r_loss(DRAFT, TARGET, ALLOWED, tau=2.0), 0.5 * sum(abs(a - b) for a, b in zip(q, p)))
    close(wordkd_loss(DRAFT, TARGET, ALLOWED, tau=2.0), sum(b * math.log(b / a) for a, b in zip(q, p)))
    assert float(atspeed_r_loss(DRAFT, TARGET, ALLOWED, tau=2.0)) < 0.3  # flatter: closer


def test_identical_draft_and_target_give_zero_divergence():
    torch.manual_seed(0)
    x = torch.randn(5, 3, 8)
    allowed = torch.rand(5, 3, 8) < 0.6
    allowed[..., 0] = True
    for loss in (atspeed_r_loss, tvd_loss, wordkd_loss, distillspec_loss):
        close(loss(x, x.clone(), allowed), 0.0)
    close(distillspec_loss(x, x.clone(), allowed, divergence="rkl"), 0.0)
    kl_term, density = atspeed_s_terms(x, x.clone(), allowed, k=3)
    assert kl_term.abs().max() < 1e-5 and (density > 0).any()
    close(atspeed_s_loss(x, x.clone(), allowed, k=3, beta=0.0), 0.0)


def every_loss(draft, target, allowed, labels):
    return {
        "atspeed_s": atspeed_s_loss(draft, target, allowed, k=2),
        "atspeed_r": atspeed_r_loss(draft, target, allowed),
        "wordkd": wordkd_loss(draft, target, allowed),
        "tvd": tvd_loss(draft, target, allowed),
        "seqkd": seqkd_loss(draft, allowed, labels),
        "distillspec": distillspec_loss(draft, target, allowed),
        "distillspec_fkl": distillspec_loss(draft, target, allowed, divergence="fkl"),
    }


def test_gradients_reach_the_draft_logits_only():
    torch.manual_seed(1)
    draft = torch.randn(4, 6, requires_grad=True)
    target = torch.randn(4, 6, requires_grad=True)
    allowed = torch.rand(4, 6) < 0.7
    allowed[:, :2] = True
    for name, loss in every_loss(draft, target, allowed, torch.tensor([0, 1, 0, 1])).items():
        draft.grad = None
        loss.backward()
        assert target.grad is None, name
        assert torch.isfinite(draft.grad).all() and draft.grad.abs().sum() > 0, name
        assert (draft.grad[~allowed] == 0).all(), name  # disallowed codes are not trained


def test_single_allowed_code_positions_cost_zero_without_nan():
    draft = torch.tensor([[1.0, 2.0, 3.0], [0.5, float("-inf"), 0.0]], requires_grad=True)
    target = torch.tensor([[3.0, 1.0, 0.0], [float("-inf"), 2.0, 1.0]])
    allowed = torch.tensor([[False, True, False], [False, False, True]])
    for name, loss in every_loss(draft, target, allowed, torch.tensor([1, 2])).items():
        draft.grad = None
        loss.backward()
        assert float(loss.detach()) == 0.0, name
        assert torch.isfinite(draft.grad).all(), name


def test_minus_inf_logits_give_finite_losses_and_gradients():
    inf = float("-inf")
    draft = torch.tensor([[inf, 1.0, 2.0, 0.0], [inf, inf, inf, inf], [0.0, 1.0, inf, 2.0]], requires_grad=True)
    target = torch.tensor([[0.0, inf, 1.0, 2.0], [1.0, 2.0, 3.0, 4.0], [inf, inf, inf, inf]])
    allowed = torch.ones(3, 4, dtype=torch.bool)
    for name, loss in every_loss(draft, target, allowed, torch.tensor([1, -100, 3])).items():
        draft.grad = None
        loss.backward()
        assert torch.isfinite(loss), name
        assert torch.isfinite(draft.grad).all(), name
    # Row 0: the target gives 0 to code 1, which the draft keeps: log p(1) is floored, not -inf.
    zq = math.exp(1.0) + math.exp(2.0) + math.exp(0.0)  # draft: codes 1, 2, 3
    zp = math.exp(0.0) + math.exp(1.0) + math.exp(2.0)  # target: codes 0, 2, 3
    log_q = {1: 1.0 - math.log(zq), 2: 2.0 - math.log(zq), 3: 0.0 - math.log(zq)}
    log_p = {1: LOG_FLOOR, 2: 1.0 - math.log(zp), 3: 2.0 - math.log(zp)}
    expected_rkl = sum(math.exp(log_q[c]) * (log_q[c] - log_p[c]) for c in (1, 2, 3))
    close(distillspec_loss(draft[0], target[0], allowed[0], divergence="rkl"), expected_rkl)


def test_combine_weights_ce_and_alignment_by_alpha():
    close(combine(torch.tensor(2.0), torch.tensor(1.0)), 0.3 * 2.0 + 0.7 * 1.0)
    close(combine(torch.tensor(2.0), torch.tensor(1.0), alpha=0.0), 2.0)


def test_registry_says_which_function_and_positions_each_align_loss_uses():
    assert set(ALIGN_LOSSES) == {"none", "atspeed_s", "atspeed_r", "wordkd", "tvd", "seqkd", "distillspec"}
    assert ALIGN_LOSSES["none"].fn is None
    assert ALIGN_LOSSES["atspeed_s"].fn is atspeed_s_loss and ALIGN_LOSSES["atspeed_s"].positions == "teacher"
    assert ALIGN_LOSSES["atspeed_r"].positions == "teacher"
    assert ALIGN_LOSSES["wordkd"].positions == ALIGN_LOSSES["tvd"].positions == "ground_truth"
    assert ALIGN_LOSSES["seqkd"].positions == "teacher" and ALIGN_LOSSES["seqkd"].needs == "labels"
    assert ALIGN_LOSSES["distillspec"].positions == "on_policy"
    assert all(entry.name == name for name, entry in ALIGN_LOSSES.items())


def test_unknown_align_loss_is_a_value_error_listing_the_valid_names():
    for lookup in (lambda: ALIGN_LOSSES["atspeed"], lambda: get_align_loss("atspeed")):
        with pytest.raises(UnknownAlignLossError) as err:
            lookup()
        assert isinstance(err.value, ValueError) and isinstance(err.value, ConfigError)
        message = str(err.value)
        assert "'atspeed'" in message
        assert all(name in message for name in ALIGN_LOSSES)
