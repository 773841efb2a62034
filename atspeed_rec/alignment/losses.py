"""Draft-alignment losses (AtSpeed section 3 and the paper's baselines) as pure tensor functions.

Every loss works on per-position logits over ONE level's C codes (`CodeVocab.code_logits`):
`draft_logits [..., C]` (q, the draft being trained), `target_logits [..., C]` (p, the frozen
target: always detached here) and `allowed [..., C]` (bool, the trie's allowed codes after that
position's prefix). The mask is applied to BOTH models' logits before any softmax, so a
disallowed code has probability exactly 0 under q and p; a logit of -inf counts as disallowed for
that model. `tau` divides both models' logits (temperature).

Per-position values are reduced to `sum(w * loss) / sum(w)` with w = `weight` (a bool or float
mask `[...]`, default all ones) times "the position allows at least one code"; `reduction="none"`
returns the per-position values `[...]` instead. A position with no allowed code contributes 0.

Log-probabilities that enter a product are clamped at LOG_FLOOR (log of float32's smallest normal),
so 0 * log 0 is 0, never NaN, and a code the target gives probability 0 but the draft does not
costs a large finite amount instead of inf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from atspeed_rec.decoding.beam_search import masked_log_softmax  # noqa: F401  (re-exported: the losses' building block)
from atspeed_rec.errors import ConfigError

LOG_FLOOR = math.log(torch.finfo(torch.float32).tiny)  # about -87.3
IGNORE_INDEX = -100  # label of a position without a ground-truth code (as torch's cross_entropy)


# ---- building blocks ---------------------------------------------------------------------------
def _safe(log_p: torch.Tensor) -> torch.Tensor:
    return log_p.clamp(min=LOG_FLOOR)  # finite stand-in for log 0; gradient 0 below the floor


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) = sum_v a(v) (log a(v) - log b(v)), [..., C] -> [...]; 0 log 0 = 0."""
    return (log_a.exp() * (_safe(log_a) - _safe(log_b))).sum(-1)


def _entropy(log_a: torch.Tensor) -> torch.Tensor:
    """H(a) = -sum_v a(v) log a(v), [..., C] -> [...]."""
    return -(log_a.exp() * _safe(log_a)).sum(-1)


def _tvd(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """TVD(a, b) = 1/2 sum_v |a(v) - b(v)|, [..., C] -> [...]."""
    return 0.5 * (log_a.exp() - log_b.exp()).abs().sum(-1)


def _reduce(loss: torch.Tensor, allowed: torch.Tensor, weight: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Weighted mean of per-position `loss [...]` (see the module docstring), or `loss` itself."""
    if reduction == "none":
        return loss
    if reduction != "mean":
        raise ValueError(f"reduction={reduction!r}: use 'mean' or 'none'")
    w = allowed.any(-1).to(loss.dtype)  # [...]; positions with no allowed code do not count
    if weight is not None:
        w = w * weight.to(loss.dtype)
    return (loss * w).sum() / w.sum().clamp(min=torch.finfo(loss.dtype).tiny)  # 0 if no position counts


def _pair(draft_logits, target_logits, allowed, tau):
    """(log q, log p) [..., C]: both masked and tempered; the target detached."""
    return masked_log_softmax(draft_logits, allowed, tau), masked_log_softmax(target_logits.detach(), allowed, tau)


# ---- AtSpeed -----------------------------------------------------------------------------------
def atspeed_s_terms(draft_logits: torch.Tensor, target_logits: torch.Tensor, allowed: torch.Tensor, k: int,
                    tau: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position (top-k reverse KL [...], density term [...]) of AtSpeed-S (see `atspeed_s_loss`)."""
    log_q, log_p = _pair(draft_logits, target_logits, allowed, tau)  # [..., C]
    k_eff = (log_q > float("-inf")).sum(-1).clamp(max=k)  # [...] k clipped to the draft's support
    top = log_q.topk(min(k, log_q.shape[-1]), dim=-1).indices  # [..., k'] draft's top codes, best first
    in_set = torch.arange(top.shape[-1], device=top.device) < k_eff.unsqueeze(-1)  # [..., k']
    log_qs = masked_log_softmax(log_q.gather(-1, top), in_set)  # [..., k'] log q_S, q renormalised over S
    log_ps = masked_log_softmax(log_p.gather(-1, top), in_set)  # [..., k'] log p_S, p renormalised over S
    kl = _kl(log_qs, log_ps)  # [...] KL(q_S || p_S)
    v_k = top.gather(-1, (k_eff - 1).clamp(min=0).unsqueeze(-1))  # [..., 1] draft's k-th code v_K
    p_vk = log_p.gather(-1, v_k).squeeze(-1).exp() * (k_eff > 0)  # [...] target's full masked p(v_K)
    return kl, p_vk * _entropy(log_qs)  # p(v_K) is constant (target detached): only H(q_S) is trained


def atspeed_s_loss(draft_logits: torch.Tensor, target_logits: torch.Tensor, allowed: torch.Tensor, k: int,
                   beta: float = 1.0, tau: float = 1.0, weight: torch.Tensor | None = None,
                   reduction: str = "mean") -> torch.Tensor:
    """AtSpeed-S (strict top-K verification): mode-seeking top-k reverse KL plus a density term.

    With q = softmax over allowed codes of draft_logits / tau, p the same for the target, and
    S = the draft's top-k allowed codes (k clipped to the number of codes q allows):
        q_S(v) = q(v) / sum_{u in S} q(u),  p_S(v) = p(v) / sum_{u in S} p(u)        for v in S
        loss   = sum_{v in S} q_S(v) log(q_S(v) / p_S(v))  +  beta * p(v_K) * H(q_S)
        H(q_S) = -sum_{v in S} q_S(v) log q_S(v)
    where v_K is the draft's k-th best code (the last one in S) and p(v_K) its probability under
    the target's FULL masked distribution (not renormalised over S), a constant weight. A
    position with a single allowed code has S = {v}, q_S = p_S = 1: loss 0. k is the number of
    target beams K. (The authors' code weights H(q_S) by p_S(v_K), p renormalised over S, and
    masks nothing.)
    draft_logits, target_logits [..., C], allowed [..., C] bool, weight [...] -> scalar.
    """
    kl, density = atspeed_s_terms(draft_logits, target_logits, allowed, k, tau)  # [...], [...]
    return _reduce(kl + beta * density, allowed, weight, reduction)


def atspeed_r_loss(draft_logits: torch.Tensor, target_logits: torch.Tensor, allowed: torch.Tensor,
                   tau: float = 1.0, weight: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """AtSpeed-R (relaxed sampling verification): TVD(q, p) = 1/2 sum_v |q(v) - p(v)| over the
    allowed codes (the acceptance probability of speculative sampling is 1 - TVD).
    draft_logits, target_logits [..., C], allowed [..., C] bool, weight [...] -> scalar."""
    log_q, log_p = _pair(draft_logits, target_logits, allowed, tau)  # [..., C]
    return _reduce(_tvd(log_q, log_p), allowed, weight, reduction)


# ---- baselines ---------------------------------------------------------------------------------
def wordkd_loss(draft_logits: torch.Tensor, target_logits: torch.Tensor, allowed: torch.Tensor,
                tau: float = 1.0, weight: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """WordKD: forward KL(p || q) = sum_v p(v) log(p(v) / q(v)) (the caller uses ground-truth positions)."""
    log_q, log_p = _pair(draft_logits, target_logits, allowed, tau)  # [..., C]
    return _reduce(_kl(log_p, log_q), allowed, weight, reduction)


def tvd_loss(draft_logits: torch.Tensor, target_logits: torch.Tensor, allowed: torch.Tensor,
             tau: float = 1.0, weight: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """TVD baseline: AtSpeed-R's 1/2 sum_v |q(v) - p(v)|, applied by the caller to ground-truth positions."""
    return atspeed_r_loss(draft_logits, target_logits, allowed, tau, weight, reduction)


def ce_loss(draft_logits: torch.Tensor, allowed: torch.Tensor, labels: torch.Tensor, tau: float = 1.0,
            weight: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """Masked cross-entropy -log q(label), q = softmax over the allowed codes of draft_logits / tau.

    labels [...] code indices in [0, C) or IGNORE_INDEX (position skipped). A label outside
    `allowed` is a caller bug: it costs the constant -LOG_FLOOR (about 87) and gives no gradient.
    draft_logits [..., C], allowed [..., C] bool, labels [...] long, weight [...] -> scalar.
    """
    log_q = masked_log_softmax(draft_logits, allowed, tau)  # [..., C]
    keep = labels != IGNORE_INDEX  # [...]
    nll = -_safe(log_q.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)) * keep  # [...]
    weight = keep if weight is None else weight * keep
    return _reduce(nll, allowed, weight, reduction)


def seqkd_loss(draft_logits: torch.Tensor, allowed: torch.Tensor, labels: torch.Tensor, tau: float = 1.0,
               weight: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """SeqKD: the draft's masked CE on the codes the TARGET chose (its top-K beam sequences)."""
    return ce_loss(draft_logits, allowed, labels, tau, weight, reduction)


DISTILLSPEC_DIVERGENCES = ("tvd", "fkl", "rkl")


def distillspec_loss(draft_logits: torch.Tensor, target_logits: torch.Tensor, allowed: torch.Tensor,
                     divergence: str = "tvd", tau: float = 1.0, weight: torch.Tensor | None = None,
                     reduction: str = "mean") -> torch.Tensor:
    """DistillSpec: a divergence between q and p at positions along sequences the DRAFT generated
    (on-policy; the caller drafts them and scores them with the target).

    divergence: "tvd" (default: DistillSpec's analysis ties the acceptance rate to 1 - TVD(p, q)),
    "fkl" (forward KL(p || q)) or "rkl" (reverse KL(q || p)).
    """
    log_q, log_p = _pair(draft_logits, target_logits, allowed, tau)  # [..., C]
    if divergence == "tvd":
        loss = _tvd(log_q, log_p)
    elif divergence == "fkl":
        loss = _kl(log_p, log_q)
    elif divergence == "rkl":
        loss = _kl(log_q, log_p)
    else:
        raise ConfigError(f"DistillSpec divergence={divergence!r}: use one of {', '.join(DISTILLSPEC_DIVERGENCES)}")
    return _reduce(loss, allowed, weight, reduction)


def combine(ce: torch.Tensor, align: torch.Tensor, alpha: float = 0.7) -> torch.Tensor:
    """The draft's training loss (1 - alpha) * CE(ground truth) + alpha * L_align."""
    return (1.0 - alpha) * ce + alpha * align


# ---- registry of the `align_loss` property -----------------------------------------------------
POSITIONS = ("teacher", "ground_truth", "on_policy")


@dataclass(frozen=True)
class AlignLoss:
    """What one `align_loss` value needs.

    fn: the loss function (None for "none": CE only, the plain SFT draft).
    positions: where it is evaluated: 'teacher' (code positions along the target's top-K beam
        sequences, teacher forcing), 'ground_truth' (along the true next item) or 'on_policy'
        (along sequences drafted by the draft itself); None for "none".
    needs: 'target_logits' (fn(draft_logits, target_logits, allowed, ...)) or 'labels'
        (fn(draft_logits, allowed, labels, ...), the target's chosen codes).
    """

    name: str
    fn: Callable[..., torch.Tensor] | None
    positions: str | None
    needs: str | None = "target_logits"


class UnknownAlignLossError(ConfigError, ValueError):
    """An `align_loss` value that is not in ALIGN_LOSSES."""


class _Registry(dict):
    def __missing__(self, name):
        raise UnknownAlignLossError(f"align_loss={name!r} is unknown; valid values: {', '.join(self)}")


ALIGN_LOSSES: dict[str, AlignLoss] = _Registry({
    "none": AlignLoss("none", None, None, None),
    "atspeed_s": AlignLoss("atspeed_s", atspeed_s_loss, "teacher"),
    "atspeed_r": AlignLoss("atspeed_r", atspeed_r_loss, "teacher"),
    "wordkd": AlignLoss("wordkd", wordkd_loss, "ground_truth"),
    "tvd": AlignLoss("tvd", tvd_loss, "ground_truth"),
    "seqkd": AlignLoss("seqkd", seqkd_loss, "teacher", "labels"),
    "distillspec": AlignLoss("distillspec", distillspec_loss, "on_policy"),
})


def get_align_loss(name: str) -> AlignLoss:
    """The registry entry of `name`; UnknownAlignLossError (a ValueError) listing the valid names."""
    return ALIGN_LOSSES[name]
