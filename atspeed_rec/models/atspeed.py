"""AtSpeedS / AtSpeedR: a GenRec target served by speculative beam search with a small draft.

Stages (`AtSpeedTrainer`), each logged and cached so that a rerun, or a run interrupted, goes on
where it stopped:
1. target: the GenRec model of the same dataset and configuration, reused from its checkpoint,
   resumed, or trained once; then frozen;
2. teacher data: the target's top-K_train beams and distributions for the alignment samples
   (`alignment/teacher.py`; only for losses evaluated along the target's beams);
3. draft: trained by RecBole's trainer with (1 - alpha) CE + alpha L_align (`alignment/objective.py`;
   `align_loss` atspeed_s for AtSpeedS, atspeed_r for AtSpeedR), early-stopped on the accepted
   steps of speculative decoding on validation requests at K = `draft_valid_beams` (at K = N
   nothing is accepted, whatever the draft);
4. evaluation: speculative decoding (strict top-K verification for AtSpeedS, relaxed sampling
   verification for AtSpeedR), reporting beside Recall and NDCG the speedup over the target's
   own beam search and the acceptance statistics (`SpecMeter`).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType, set_color

from atspeed_rec.alignment.objective import AlignConfig, draft_loss
from atspeed_rec.alignment.teacher import FORMAT as TEACHER_FORMAT
from atspeed_rec.alignment.teacher import SampleIndex, load_or_generate, select_samples
from atspeed_rec.decoding.beam_search import beam_search
from atspeed_rec.decoding.speculative import speculative_beam_search
from atspeed_rec.errors import ConfigError
from atspeed_rec.models.genrec import GenRec, beams_to_scores
from atspeed_rec.models.lm import build_lm
from atspeed_rec.recbole_glue.checkpoint import config_key, load_checkpoint
from atspeed_rec.recbole_glue.metrics import SpecMeter
from atspeed_rec.recbole_glue.trainer import SafeCheckpointTrainer

DRAFT_KEYS = ("draft_n_layers", "draft_hidden_size", "draft_n_heads", "draft_inner_size",
              "draft_dropout_prob", "draft_tie_embeddings", "draft_learning_rate", "draft_weight_decay",
              "draft_epochs", "draft_eval_step", "draft_checkpoint",
              "draft_valid_beams", "draft_valid_requests", "draft_beams", "gamma",
              "sample_temperature")  # the last five decide the validation that picks the best epoch
TEACHER_KEYS = ("K_train", "teacher_per_user")  # which samples, how many beams
ALIGN_KEYS = ("align_loss", "alpha", "tau", "beta", "distillspec_divergence", *TEACHER_KEYS)


class AtSpeedS(SequentialRecommender):
    """Strict top-K verification: exactly the target's beam search output, faster."""

    input_type = InputType.POINTWISE
    property_parents = ("GenRec",)  # the target's properties, then this model's
    verification = "strict"
    checkpoint_keys = (*GenRec.checkpoint_keys, *DRAFT_KEYS, *ALIGN_KEYS, "num_beams")

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.target = GenRec(config, dataset)
        for p in self.target.parameters():
            p.requires_grad_(False)  # the target is trained by GenRec's recipe, never here
        self.draft = build_lm(config, self.target.vocab, prefix="draft_")
        if config["draft_checkpoint"]:  # a draft trained elsewhere: its vocabulary must be the target's
            load_draft(self.draft, Path(config["draft_checkpoint"]), self.target.lm.config.vocab_size)
        check_same_vocab(self.target.lm, self.draft)
        self.num_beams = self.target.num_beams
        self.draft_beams, self.gamma = int(config["draft_beams"]), int(config["gamma"])
        if self.draft_beams < self.num_beams:
            raise ConfigError(f"draft_beams={self.draft_beams} < num_beams={self.num_beams}: the draft "
                              f"must propose at least the K target beams; fix: --draft_beams={self.num_beams}")
        if self.gamma < 1:
            raise ConfigError(f"gamma={self.gamma}: the draft must propose at least one level; fix: --gamma=1")
        self.temperature = float(config["sample_temperature"])
        if not self.temperature > 0:
            raise ConfigError(f"sample_temperature={self.temperature}: relaxed sampling divides scores by it; "
                              "fix: a value > 0 (1 = plain beam sampling, smaller = closer to beam search)")
        self.timed_batches = int(config["speedup_batches"])  # batches also decoded target-only
        self.seed = int(config["seed"])
        self.generator: torch.Generator | None = None  # relaxed sampling; made on the requests' device
        self.spec_meter = SpecMeter()
        self.align = AlignConfig.from_config(config, self.num_beams)
        self.samples: SampleIndex | None = None  # alignment samples, set by the trainer's teacher stage

    def calculate_loss(self, interaction):
        """(1 - alpha) * the draft's next-code CE on the training windows + alpha * L_align."""
        return draft_loss(self.align, self.target, self.draft, interaction, self.samples)

    def start_evaluation(self) -> None:
        """Called by the trainer before each evaluation: the same sampling draws whatever ran before."""
        self.generator = None  # reseeded at the next batch

    def decoding(self) -> str:
        temperature = f", temperature={self.temperature:g}" if self.verification == "relaxed" else ""
        return (f"{self.verification} speculative beam search: K={self.num_beams}, N={self.draft_beams}, "
                f"gamma={self.gamma}{temperature}")

    def speculative(self, input_ids, mask):
        if self.generator is None or self.generator.device != input_ids.device:
            self.generator = torch.Generator(input_ids.device).manual_seed(self.seed)
        return speculative_beam_search(
            self.target.lm, self.draft, self.target.trie, self.target.vocab, input_ids, mask,
            self.num_beams, self.draft_beams, self.gamma, mode=self.verification, generator=self.generator,
            temperature=self.temperature)

    def full_sort_predict(self, interaction):
        input_ids, mask = self.target.prompt(interaction)
        (beams, stats), spec_seconds = timed(lambda: self.speculative(input_ids, mask), input_ids.device)
        target_seconds = None
        if self.spec_meter.timed_batches < self.timed_batches:  # the same batch, target only
            _, target_seconds = timed(lambda: beam_search(self.target.lm, self.target.trie, self.target.vocab,
                                                          input_ids, mask, self.num_beams), input_ids.device)
        self.spec_meter.add(len(input_ids), float(stats.accepted_steps.sum()), float(stats.drafted_levels.sum()),
                            float(stats.target_calls.sum()), spec_seconds, target_seconds)
        return beams_to_scores(beams, self.n_items)  # [B, n_items]

    def predict(self, interaction):
        return self.target.predict(interaction)


def timed(fn, device: torch.device):
    """(fn(), seconds), waiting for the device's queued kernels before and after (GPU timing)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


class AtSpeedR(AtSpeedS):
    """Relaxed sampling verification: high-probability drafts accepted, fewer target calls."""

    property_parents = ("GenRec", "AtSpeedS")
    verification = "relaxed"


class AtSpeedTrainer(SafeCheckpointTrainer):
    """The stages of the module docstring. The draft has its own recipe (`draft_learning_rate`,
    `draft_weight_decay`, `draft_epochs`); every stage is reused when its cache is complete."""

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        self.ensure_target(train_data, valid_data, show_progress)
        self.model.samples = self.alignment_samples(train_data._dataset, show_progress)
        self.logger.info(set_color("stage", "green") + f": training the draft (align_loss={self.model.align.name}, "
                         f"alpha={self.model.align.alpha})")
        self.epochs = int(self.config["draft_epochs"])
        self.learning_rate = float(self.config["draft_learning_rate"])
        self.weight_decay = float(self.config["draft_weight_decay"])
        self.eval_step = int(self.config["draft_eval_step"])
        self.optimizer = self._build_optimizer(params=self.model.draft.parameters())
        some = some_requests(valid_data, int(self.config["draft_valid_requests"]), self.config["seed"])
        k_valid = min(int(self.config["draft_valid_beams"]), self.model.num_beams)
        if some is not None:
            self.logger.info(f"draft validation: accepted steps of {len(some._dataset)} of "
                             f"{len(valid_data._dataset)} requests at K={k_valid}")
        self.model.num_beams = k_valid  # validation only: the test split decodes at num_beams
        try:
            return self.fit_or_resume(train_data, some, verbose, saved, show_progress, callback_fn)
        finally:
            self.model.num_beams = self.model.target.num_beams

    def target_config(self):
        config = copy.copy(self.config)
        config.final_config_dict = {**self.config.final_config_dict, "model": "GenRec",
                                    "metrics": ["Recall", "NDCG"], "valid_metric": "NDCG@10"}
        return config

    def ensure_target(self, train_data, valid_data, show_progress) -> None:
        target = self.model.target
        for p in target.parameters():
            p.requires_grad_(True)
        trainer = SafeCheckpointTrainer(self.target_config(), target)
        self.logger.info(set_color("stage", "green") + f": the GenRec target ({trainer.saved_model_file})")
        trainer.fit_or_resume(train_data, valid_data, saved=True, show_progress=show_progress)
        if not self.config["single_spec"]:
            torch.distributed.barrier()  # only rank 0 writes the checkpoint: the others wait for it
        load_checkpoint(target, trainer.saved_model_file)  # the best epoch, not the last
        for p in target.parameters():
            p.requires_grad_(False)
        target.eval()

    def alignment_samples(self, train_dataset, show_progress) -> SampleIndex | None:
        align, target = self.model.align, self.model.target
        if not align.aligned:
            return None
        inter = train_dataset.inter_feat
        per_user = int(self.config["teacher_per_user"])
        if not align.needs_teacher:  # positions along the true item or the draft's beams: no cache
            rows = select_samples(inter[target.USER_ID], per_user)
            return SampleIndex(inter[target.USER_ID][rows], inter[target.POS_ITEM_ID][rows],
                               inter[target.ITEM_SEQ_LEN][rows])
        target_key = config_key(self.target_config(), GenRec.checkpoint_keys)
        key = config_key({**{k: self.config[k] for k in TEACHER_KEYS}, "target": target_key, "format": TEACHER_FORMAT},
                         ["target", "format", *TEACHER_KEYS])
        path = Path(self.config["checkpoint_dir"]) / f"teacher-{self.config['dataset']}-{key}.safetensors"
        distributed = not self.config["single_spec"]
        return load_or_generate(
            path, target, train_dataset, align.k_train, per_user, int(self.config["teacher_batch_size"]),
            meta={"target_checkpoint_key": target_key, **{k: self.config[k] for k in TEACHER_KEYS}},
            show_progress=show_progress, rank=self.config["local_rank"] if distributed else 0,
            world_size=self.config["world_size"] if distributed else 1)


def some_requests(loader, n: int, seed: int):
    """The evaluation `loader` cut to n requests drawn at random (seeded), or itself when n <= 0:
    early stopping on speculative decoding needs an acceptance estimate, not every user."""
    if loader is None or n <= 0 or n >= len(loader._dataset):
        return loader
    rows = torch.randperm(len(loader._dataset), generator=torch.Generator().manual_seed(seed))[:n]
    subset = loader._dataset.copy(loader._dataset.inter_feat[torch.sort(rows).values])
    return type(loader)(loader.config, subset, loader._sampler, shuffle=False)


def check_same_vocab(target_lm, draft_lm) -> None:
    """The draft proposes the target's tokens: both must have the same vocabulary."""
    t, d = target_lm.config.vocab_size, draft_lm.config.vocab_size
    if t != d:
        raise ConfigError(f"the draft's vocabulary ({d} tokens) does not match the target's ({t} tokens): "
                          "a draft must be built for the same semantic IDs (sid_levels, sid_codebook_size) "
                          "as its target; fix: retrain the draft for this target, or drop --draft_checkpoint")


def load_draft(draft, path: Path, target_vocab_size: int) -> None:
    """Weights for `draft` from a safetensors file (a draft alone, or a whole AtSpeed checkpoint)."""
    from safetensors import safe_open
    if not path.is_file():
        raise ConfigError(f"draft_checkpoint {path} does not exist; fix: point --draft_checkpoint at a "
                          ".safetensors file written by an AtSpeedS/AtSpeedR run, or leave it unset")
    with safe_open(str(path), framework="pt") as f:
        prefix = "draft." if any(k.startswith("draft.") for k in f.keys()) else ""
        state = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    rows = state.get("model.embed_tokens.weight", torch.zeros(0, 0)).shape[0]
    if rows != target_vocab_size:
        raise ConfigError(f"the draft in {path} has a vocabulary of {rows} tokens, the target {target_vocab_size}: "
                          "a draft must be built for the same semantic IDs (sid_levels, sid_codebook_size) "
                          "as its target; fix: retrain the draft for this target, or drop --draft_checkpoint")
    missing, unexpected = draft.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not draft.config.tie_word_embeddings]
    if missing or unexpected:
        raise ConfigError(f"the draft in {path} does not fit draft_* properties (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}); fix: use the draft_* properties it was trained with")


AtSpeedS.trainer_class = AtSpeedTrainer
