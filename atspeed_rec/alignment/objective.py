"""The draft's training objective: (1 - alpha) * CE(ground truth) + alpha * L_align (method section 3).

CE is the draft's next-code cross-entropy over each user's training windows (as the target was
trained). L_align is the `align_loss` property's loss (`losses.ALIGN_LOSSES`), evaluated for the
batch's rows that are alignment samples (`teacher.select_samples`), at the positions it names:
- teacher: along the target's cached top-K_train beams (atspeed_s, atspeed_r, seqkd);
- ground_truth: along the true next item, the target scored online (wordkd, tvd);
- on_policy: along the draft's own top-K_train beams, the target scored online (distillspec).
With `first_code_kl: w` a teacher-data L_align also gets w * KL(p || q) at each sample's 1st code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from atspeed_rec.alignment.losses import combine, get_align_loss, wordkd_loss
from atspeed_rec.alignment.positions import allowed_along, beam_code_logits
from atspeed_rec.alignment.teacher import SampleIndex
from atspeed_rec.decoding.beam_search import beam_search
from atspeed_rec.errors import ConfigError


@dataclass(frozen=True)
class AlignConfig:
    """The draft's objective, from the properties (defaults: properties/model/AtSpeedS.yaml)."""

    name: str  # the `align_loss` property
    alpha: float  # weight of L_align against the ground-truth CE
    tau: float  # temperature of both distributions
    beta: float  # AtSpeed-S: weight of the density term
    k: int  # AtSpeed-S: the draft's top-k set S, the target's beam width K (`align_beams`)
    k_train: int  # beams per sample (teacher data, on-policy drafts)
    divergence: str  # DistillSpec's divergence
    first_code_kl: float = 0.0  # weight of a forward KL(p || q) at the 1st code, added to L_align (teacher data)

    @staticmethod
    def from_config(config, k: int) -> "AlignConfig":
        cfg = AlignConfig(name=str(config["align_loss"]), alpha=float(config["alpha"]), tau=float(config["tau"]),
                          beta=float(config["beta"]), k=k, k_train=int(config["K_train"]),
                          divergence=str(config["distillspec_divergence"]),
                          first_code_kl=float(config["first_code_kl"] or 0.0))
        spec = get_align_loss(cfg.name)  # unknown names fail here, before any training
        if cfg.first_code_kl and (spec.positions != "teacher" or spec.needs != "target_logits"):
            raise ConfigError(f"first_code_kl={cfg.first_code_kl} needs the target's 1st-code distribution from teacher "
                              f"data, which align_loss={cfg.name} does not use; fix: --align_loss=atspeed_r or "
                              "atspeed_s, or leave first_code_kl unset (~)")
        if not 0.0 <= cfg.alpha <= 1.0:
            raise ConfigError(f"alpha={cfg.alpha}: the weight of L_align must lie in [0, 1]; fix: --alpha=0.7")
        if cfg.tau <= 0 or cfg.k_train < 1:
            raise ConfigError(f"tau={cfg.tau}, K_train={cfg.k_train}: both must be positive; fix: --tau=1 --K_train=20")
        return cfg

    @property
    def needs_teacher(self) -> bool:
        return get_align_loss(self.name).positions == "teacher"

    @property
    def aligned(self) -> bool:
        return get_align_loss(self.name).fn is not None and self.alpha > 0


def draft_loss(cfg: AlignConfig, target, draft, interaction, samples: SampleIndex | None) -> torch.Tensor:
    """The draft's loss on one RecBole training batch; `target` is the frozen GenRec."""
    ce = target.window_loss(draft, interaction)
    if not cfg.aligned or samples is None:
        return ce
    idx = samples.lookup(interaction[target.USER_ID], interaction[target.POS_ITEM_ID],
                         interaction[target.ITEM_SEQ_LEN])  # [B]
    rows = torch.nonzero(idx >= 0).squeeze(1)
    if len(rows) == 0:
        return ce if cfg.alpha < 1 else ce * 0.0
    return combine(ce, align_loss(cfg, target, draft, interaction[rows], samples, idx[rows]), cfg.alpha)


def align_loss(cfg: AlignConfig, target, draft, inter, samples: SampleIndex, idx: torch.Tensor) -> torch.Tensor:
    """L_align for the sample rows `inter` (their teacher-data indices `idx`)."""
    spec = get_align_loss(cfg.name)
    trie, vocab = target.trie, target.vocab
    input_ids, mask = target.prompt(inter)
    if spec.positions == "teacher":
        batch = samples.batch(idx, trie)
        codes, weight, target_logits, allowed = batch.codes, batch.weight, batch.target_logp, batch.allowed
    else:
        with torch.no_grad():
            if spec.positions == "ground_truth":
                codes = target.item_codes[inter[target.POS_ITEM_ID]].unsqueeze(1)  # [n, 1, L]
                weight = torch.ones(codes.shape[:2], device=codes.device)
            else:  # on_policy: the draft's own beams (no dropout while drafting)
                was_training = draft.training
                draft.eval()
                beams = beam_search(draft, trie, vocab, input_ids, mask, cfg.k_train)
                draft.train(was_training)
                valid = beams.items > 0
                codes = torch.where(valid.unsqueeze(-1), beams.codes, beams.codes[:, :1])
                weight = valid.float()
            target_logits = beam_code_logits(target.lm, vocab, input_ids, mask, codes)
            allowed = allowed_along(trie, codes)
    draft_logits = beam_code_logits(draft, vocab, input_ids, mask, codes)  # [n, K, L, C]
    w = weight.unsqueeze(-1).expand(codes.shape)  # [n, K, L] every level of a real beam
    if spec.needs == "labels":  # SeqKD: CE on the target's chosen codes
        return spec.fn(draft_logits, allowed, codes, tau=cfg.tau, weight=w)
    extra = {"atspeed_s": {"k": cfg.k, "beta": cfg.beta}, "distillspec": {"divergence": cfg.divergence}}
    loss = spec.fn(draft_logits, target_logits, allowed, tau=cfg.tau, weight=w, **extra.get(cfg.name, {}))
    if cfg.first_code_kl:  # KL(p || q) at the 1st code (the same on every beam of a sample: its first beam's)
        loss = loss + cfg.first_code_kl * wordkd_loss(draft_logits[:, 0, 0], target_logits[:, 0, 0],
                                                     allowed[:, 0, 0], tau=cfg.tau)
    return loss
