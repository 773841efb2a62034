"""AtSpeedS / AtSpeedR: a GenRec target served by speculative beam search with a small draft.

The models hold the target (frozen), the draft and the decoding settings; how they are trained
(target, teacher data, draft) is the pipeline's job (`pipeline.py`). Evaluation decodes with
speculative beam search (strict top-K verification for AtSpeedS, relaxed sampling verification
for AtSpeedR) on the serving tree (`draft_beams`, `gamma`, `draft_start`; or, with `tree_candidates`,
the fastest of those trees timed on the first test requests) and reports beside Recall and NDCG the speedup over
the target's own beam search and the acceptance statistics (`SpecMeter`).

Speculation is served only where it was measured to pay (`serve_target_if_faster`), as LLM servers turn it
off at batch sizes where it loses: when the tuning finds no tree faster than the target's own search on
requests decoded alone, or when the test pass's first `speedup_batches` batches, decoded both ways, were
faster target-only, the test pass decodes by the target's own search instead: beam search for AtSpeedS
(strict verification returns its lists anyway), beam sampling at the served temperature for AtSpeedR (the
coupled rule's output distribution; the paper's ratio rule has no target-only twin and keeps speculating).
"""

from __future__ import annotations

import logging
import statistics
from functools import partial

import torch
import torch.distributed as dist
from recbole.data.dataloader import FullSortEvalDataLoader as FullSortLoader
from recbole.utils import InputType

from atspeed_rec.alignment.objective import AlignConfig, draft_loss
from atspeed_rec.alignment.teacher import SampleIndex
from atspeed_rec.decoding.beam_search import beam_search
from atspeed_rec.decoding.sampling import beam_sample
from atspeed_rec.decoding.speculative import Tree, speculative_beam_search
from atspeed_rec.errors import ConfigError
from atspeed_rec.models.draft import build_draft
from atspeed_rec.models.prefix_cache import register_prefix
from atspeed_rec.recbole_glue.base import ProjectModel
from atspeed_rec.recbole_glue.genrec import GenRec, beams_to_scores, by_length, trim_left
from atspeed_rec.recbole_glue.metrics import SpecMeter, timed

DRAFT_KEYS = ("draft_n_layers", "draft_hidden_size", "draft_n_heads", "draft_inner_size",
              "draft_dropout_prob", "draft_tie_embeddings", "draft_learning_rate", "draft_weight_decay",
              "draft_epochs", "draft_eval_step", "draft_checkpoint",
              "draft_valid_beams", "draft_valid_requests", "draft_valid_width",
              "draft_valid_gamma")  # the last four: the validation that picks the best epoch
# Not in the key: the serving tree (draft_beams, gamma, draft_start) and relaxed sampling's temperature. The
# draft is validated on a tree of its own (strict, draft_valid_*), so serving settings are tuned without retraining.
TEACHER_KEYS = ("K_train", "teacher_per_user", "teacher_users")  # which samples, how many beams
ALIGN_KEYS = ("align_loss", "alpha", "tau", "beta", "distillspec_divergence", "first_code_kl", *TEACHER_KEYS)


def parse_trees(value, draft_start: int = 0) -> list[Tree]:
    """`tree_candidates` as (N, gamma, draft_start, budget) trees; a candidate [N, gamma] takes the configured
    `draft_start`, and one without a budget verifies all its nodes. Whether a tree serves the run's K is the
    tuning's business (`Tree.serves`): one list of candidates can hold trees for every K."""
    trees = []
    try:
        for tree in value or []:
            if not 2 <= len(tree) <= 4:
                raise ValueError(tree)
            n, gamma, *rest = (int(x) for x in tree)
            trees.append(Tree(n, gamma, *(rest or [int(draft_start)])))
    except (TypeError, ValueError):
        raise ConfigError(f"tree_candidates={value!r} is not a list of [N, gamma], [N, gamma, draft_start] or "
                          "[N, gamma, draft_start, budget] trees; fix: e.g. --tree_candidates='[[20,1],[40,1],"
                          "[20,1,2],[40,2,0,50]]', or [] to serve draft_beams, gamma and draft_start") from None
    bad = [tree.written for tree in trees if tree.n < 1 or tree.gamma < 1 or tree.start < 0 or tree.budget < 0]
    if bad:
        raise ConfigError(f"tree_candidates {bad}: every tree needs N >= 1, gamma >= 1, draft_start >= 0 and a "
                          "budget >= 0 (0: every node); fix: drop them or correct them")
    return trees


class AtSpeedS(ProjectModel):
    """Strict top-K verification: exactly the target's beam search output, faster."""

    input_type = InputType.POINTWISE
    property_parents = ("GenRec",)  # the target's properties, then this model's
    verification = "strict"
    # The served K (num_beams) names nothing: the target is validated at target_valid_beams and the draft aligned
    # at align_beams, so one target and one draft serve every K.
    checkpoint_keys = (*(k for k in GenRec.checkpoint_keys if k != "num_beams"), "target_valid_beams",
                       *DRAFT_KEYS, *ALIGN_KEYS, "align_beams")

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.target = GenRec(config, dataset)  # trained by its own recipe (pipeline.py), read-only here
        self.draft = build_draft(config, self.target.vocab, self.target.lm)
        if self.target.text_prompt is not None:  # the draft reads the target's prompts: their prefix is cached too
            register_prefix(self.draft, self.target.text_prompt.prefix)
        self.num_beams = self.target.num_beams  # K of the test split
        align_beams = int(config["align_beams"])  # K of the alignment objective, whatever K is served
        # K of the draft's validation: at K = N nothing is accepted whatever the draft, at K = 10 drafts separate
        self.valid_beams = min(int(config["draft_valid_beams"]), align_beams)
        self.valid_tree = (max(int(config["draft_valid_width"]), self.valid_beams), int(config["draft_valid_gamma"]))
        self.eval_beams = self.num_beams  # K of the evaluation running now (`start_evaluation`)
        self.tree = Tree(int(config["draft_beams"]), int(config["gamma"]), int(config["draft_start"]))  # served
        if self.tree.n < self.num_beams:
            raise ConfigError(f"draft_beams={self.tree.n} < num_beams={self.num_beams}: the draft "
                              f"must propose at least the K target beams; fix: --draft_beams={self.num_beams}")
        if self.tree.gamma < 1 or self.tree.start < 0:
            raise ConfigError(f"gamma={self.tree.gamma}, draft_start={self.tree.start}: the draft must propose at "
                              "least one level a round, from a code position >= 0; fix: --gamma=1 --draft_start=0")
        trees = parse_trees(config["tree_candidates"], self.tree.start)
        self.tree_candidates = [tree for tree in trees if tree.serves(self.num_beams)]  # the others are for smaller K
        skipped = [tree.written for tree in trees if not tree.serves(self.num_beams)]
        if skipped:  # a warning when none is left to time
            log = logging.getLogger().info if self.tree_candidates else logging.getLogger().warning
            log(f"tree_candidates {skipped} cannot serve K={self.num_beams} (N, and a budget, must be >= K): not timed"
                + ("" if self.tree_candidates else f"; serving the configured tree, {self.tree.name}"))
        self.tree_tuning_requests = int(config["tree_tuning_requests"])
        self.tree_tuned = not self.tree_candidates  # tuned at the first test batch when there are candidates
        self.temperature = float(config["sample_temperature"])
        if not self.temperature > 0:
            raise ConfigError(f"sample_temperature={self.temperature}: relaxed sampling divides scores by it; "
                              "fix: a value > 0 (1 = plain beam sampling, smaller = closer to beam search)")
        self.last_level = str(config["relaxed_last_level"])  # relaxed: top K or K samples at the last code
        self.relaxed_rule = str(config["relaxed_rule"])  # relaxed: how a drafted level is verified
        # Where the target's own search was timed faster, serve it if its output is the speculative search's
        # (strict: the same lists; coupled relaxed rule: the same distribution, `own_search`).
        self.fallback = bool(config["serve_target_if_faster"]) and (
            self.verification == "strict" or self.relaxed_rule == "coupled")
        self.serve_target = False  # set by the tuning: the test pass decodes by the target's own search
        self.serve_target_batches = False  # set after the timed test batches: the remaining batches do
        self.timed_batches = int(config["speedup_batches"])  # batches also decoded target-only
        self.single_requests = int(config["speedup_requests"])  # test requests also timed alone, both ways
        self.phase = "test"
        self.sample, self.sampled = None, False  # the test requests decoded alone (`start_evaluation`)
        self.seed = int(config["seed"])
        self.generator: torch.Generator | None = None  # relaxed sampling; made on the requests' device
        self.spec_meter = SpecMeter()
        self.align = AlignConfig.from_config(config, align_beams)
        self.samples: SampleIndex | None = None  # alignment samples, set by the trainer's teacher stage

    def train(self, mode: bool = True):
        """Training mode is the draft's: the target keeps computing its teacher signal without dropout."""
        super().train(mode)
        self.target.eval()
        return self

    def calculate_loss(self, interaction):
        """(1 - alpha) * the draft's next-code CE on the training windows + alpha * L_align."""
        return draft_loss(self.align, self.target, self.draft, interaction, self.samples)

    def start_evaluation(self, phase: str, eval_data=None) -> None:
        """Validation decodes strictly at `valid_beams` on its own tree (`valid_tree`), the test at
        `num_beams` on the serving tree; the sampling generator is reseeded, so each evaluation
        draws the same samples whatever ran before. The test's tuning and batch-1 timing decode a seeded
        sample of its users (`sample_requests`), or, without a full-sort dataloader, its first requests."""
        self.phase = phase
        self.eval_beams = self.valid_beams if phase == "valid" else self.num_beams
        self.generator = None  # reseeded at the next batch
        self.serve_target_batches = False  # decided again after this evaluation's timed batches
        self.sample = (self.sample_requests(eval_data) if phase == "test" and isinstance(eval_data, FullSortLoader)
                       else None)
        self.sampled = self.sample is not None  # this test's requests decoded alone are a sample's

    def sample_requests(self, eval_data):
        """The test requests decoded alone, by the tuning and for `speedup`: a seeded random sample of the split's
        users. The test order is no fair sample: on amazon-beauty its first 200 users' prompts are 41% longer
        than those of 200 drawn at random, and a longer prompt leaves a tree less to save."""
        n = min(eval_data.sample_size, max(self.single_requests, self.tree_tuning_requests + 1))  # tuning: + a warm-up
        rows = torch.randperm(eval_data.sample_size, generator=torch.Generator().manual_seed(self.seed + 3))[:n]
        return eval_data.collate_fn(rows.numpy())[0]  # the interaction, as the test batches come

    def decoding(self) -> str:
        temperature = (f", rule={self.relaxed_rule}, temperature={self.temperature:g}, last code: {self.last_level}"
                       if self.verification == "relaxed" else "")
        n, gamma, start, _ = self.tree
        return (f"{self.verification} speculative beam search: K={self.num_beams}, N={n}, gamma={gamma}, "
                f"draft_start={start}{temperature}")

    def eval_generator(self, device) -> torch.Generator:
        """The evaluation's sampling generator, seeded at its first batch."""
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device).manual_seed(self.seed)
        return self.generator

    def speculative(self, input_ids, mask):
        self.eval_generator(input_ids.device)
        if self.phase == "valid":  # the draft's agreement with the target at every code, whatever the serving tree
            (n, gamma), start, budget, mode = self.valid_tree, 0, 0, "strict"
        else:
            (n, gamma, start, budget), mode = self.tree, self.verification
        return speculative_beam_search(
            self.target.lm, self.draft, self.target.trie, self.target.vocab, input_ids, mask,
            self.eval_beams, n, gamma, mode=mode, generator=self.generator, temperature=self.temperature,
            last_level=self.last_level, relaxed_rule=self.relaxed_rule, draft_start=start, budget=budget)

    def full_sort_predict(self, interaction):
        input_ids, mask = self.target.prompt(interaction)
        if self.phase == "test" and self.sample is not None:  # before the first batch: the sampled requests
            ids, m = self.target.prompt(self.sample.to(input_ids.device))
            if not self.tree_tuned:
                self.tune_tree(ids, m)
            self.time_single_requests(ids, m)
            self.sample = None
        if self.phase == "test" and not self.tree_tuned:
            self.tune_tree(input_ids, mask)
        time_target = self.spec_meter.timed_batches < self.timed_batches  # this batch target-only too
        scores = torch.empty(len(input_ids), self.n_items, device=input_ids.device)  # [B, n_items]
        totals = [0.0] * 5  # accepted levels, drafted levels, target calls, seconds, target-only seconds
        for rows, ids, m in by_length(input_ids, mask, self.target.eval_length_buckets):  # fewer pad tokens
            beams, *counts = self.decode_group(ids, m, time_target)
            scores[rows] = beams_to_scores(beams, self.n_items)
            totals = [t + c for t, c in zip(totals, counts)]
        self.spec_meter.add(len(input_ids), *totals[:4], totals[4] if time_target else None,
                            speculative=not self.serving_target())
        if self.phase == "test":
            if time_target and self.spec_meter.timed_batches == self.timed_batches:
                self.choose_batch_decoder(len(input_ids))
            if not self.sampled:  # no sample: the batches' first requests
                self.time_single_requests(input_ids, mask)
        return scores

    def serving_target(self) -> bool:
        """Whether this test batch is decoded by the target's own search (`own_search`)."""
        return self.phase == "test" and (self.serve_target or self.serve_target_batches)

    def decode_group(self, input_ids, mask, time_target: bool):
        """Beams of one group of requests as the phase decodes them, its accepted and drafted levels, target
        calls and seconds, and (if `time_target`) the seconds of the target's own search on it."""
        target = partial(beam_search, self.target.lm, self.target.trie, self.target.vocab, input_ids, mask,
                         self.eval_beams)
        if self.serving_target():  # nothing drafted
            beams, seconds = timed(partial(self.own_search, input_ids, mask, self.eval_generator(input_ids.device)),
                                   input_ids.device)
            accepted, drafted, calls = 0.0, 0.0, float(beams.forward_calls * len(input_ids))
        else:
            (beams, stats), seconds = timed(lambda: self.speculative(input_ids, mask), input_ids.device)
            accepted, drafted = float(stats.accepted_steps.sum()), float(stats.drafted_levels.sum())
            calls = float(stats.target_calls.sum())
        target_seconds = timed(target, input_ids.device)[1] if time_target else 0.0
        return beams, accepted, drafted, calls, seconds, target_seconds

    def serve_alone(self, ids, mask, tree: Tree, generator):
        """One test request `[1, P]` decoded as served (mode, K, temperature) on the tree (N, gamma, draft_start)."""
        n, gamma, start, budget = tree
        return speculative_beam_search(self.target.lm, self.draft, self.target.trie, self.target.vocab, ids, mask,
                                       self.num_beams, n, gamma, mode=self.verification, generator=generator,
                                       temperature=self.temperature, last_level=self.last_level,
                                       relaxed_rule=self.relaxed_rule, draft_start=start, budget=budget)

    def target_alone(self, ids, mask):
        """One test request `[1, P]` decoded by the target's own beam search at the served K: what
        `speedup` (and the tree tuning) compares the speculative search against."""
        return beam_search(self.target.lm, self.target.trie, self.target.vocab, ids, mask, self.num_beams)

    def own_search(self, ids, mask, generator):
        """The target's own search with the served output, for requests `[B, P]` where it is the faster:
        beam search (strict) or beam sampling at the served temperature and last level (relaxed, coupled
        rule: the distribution the speculative search samples from, `speculative.py`); it costs what beam
        search costs."""
        lm, trie, vocab = self.target.lm, self.target.trie, self.target.vocab
        if self.verification == "strict":
            return beam_search(lm, trie, vocab, ids, mask, self.num_beams)
        return beam_sample(lm, trie, vocab, ids, mask, self.num_beams, generator, self.temperature, self.last_level)

    def own_search_name(self) -> str:
        """`own_search` in words, for the logs."""
        return "beam search" if self.verification == "strict" else f"beam sampling at T {self.temperature:g}"

    def choose_batch_decoder(self, batch_size: int) -> None:
        """After the test pass's timed batches (decoded both ways): where the target's own search was the faster on
        them and `fallback` allows, the remaining batches are decoded by it, as LLM servers turn speculation off
        at batch sizes where it loses; `speedup_batch` stays the timed batches' figure. Each DDP rank decides on
        its own batches (its output is the same either way)."""
        meter = self.spec_meter
        if self.serve_target or not meter.timed_spec_seconds:
            return
        ratio = meter.target_seconds / meter.timed_spec_seconds
        self.serve_target_batches = self.fallback and ratio < 1
        head = (f"test batches of {batch_size} requests: the speculative search ran {ratio:.2f}x the speed of the "
                f"target's own search over the first {meter.timed_batches} (speedup_batch): ")
        if self.serve_target_batches:
            logging.getLogger().info(head + f"decoding the other batches by the target's own "
                                     f"{self.own_search_name()}, the same "
                                     + ("lists" if self.verification == "strict" else "distribution")
                                     + " (--serve_target_if_faster=False keeps speculating)")
        else:
            logging.getLogger().info(head + "speculating on" + ("" if ratio >= 1 else " (serve_target_if_faster "
                                     "is off, or the relaxed rule has no target-only twin)"))

    def tune_tree(self, input_ids, mask) -> tuple[dict, float]:
        """Serve the fastest tree of `tree_candidates` and the configured one: each decodes the first
        `tree_tuning_requests` of these requests alone (batch 1), the trees and the target's own search
        interleaved per request, after one warm-up request; the mean time per request decides (a tree whose
        second target call falls on a minority of requests pays for it there, which a median would not see), and
        a warning says so when no tree beats the target's search (with `fallback`, the test pass then serves the
        target's `own_search`). Under DDP rank 0's choice is every rank's. Returns each tree's mean ms and the
        target's own search's."""
        trees = list(dict.fromkeys([self.tree, *self.tree_candidates]))
        entries = [*trees, None]  # None: the target's own search, the time a tree has to beat
        device, times = input_ids.device, {entry: [] for entry in entries}
        generator = torch.Generator(device).manual_seed(self.seed + 2)  # the evaluation's samples are unchanged
        rows = min(len(input_ids), self.tree_tuning_requests + 1)
        for row in range(rows):
            ids, m = trim_left(input_ids[row:row + 1], mask[row:row + 1])
            for entry in entries[row % len(entries):] + entries[:row % len(entries)]:
                decode = (partial(self.target_alone, ids, m) if entry is None
                          else partial(self.serve_alone, ids, m, entry, generator))
                _, seconds = timed(decode, device)
                if row or rows == 1:  # the first request warms up
                    times[entry].append(seconds)
        ms = {entry: 1e3 * statistics.mean(t) for entry, t in times.items()}
        target_ms = ms.pop(None)
        best = min(ms, key=ms.get)
        choice = [best, self.fallback and ms[best] >= target_ms]
        if dist.is_available() and dist.is_initialized():
            dist.broadcast_object_list(choice, src=0)
        self.tree, self.serve_target = Tree(*choice[0]), choice[1]
        self.tree_tuned = True
        log = logging.getLogger()
        head = "serving the target's own search; fastest tree" if self.serve_target else "serving tree"
        log.info(f"{head}: {self.tree.name}, the fastest of "
                 + ", ".join(f"{tree.name}: {t:.1f} ms" for tree, t in ms.items())
                 + f" (the target's own search: {target_ms:.1f} ms; mean over {max(rows - 1, 1)} test requests"
                 " decoded alone)")
        if ms[best] >= target_ms:
            why = ("strict verification returns its lists anyway" if self.verification == "strict"
                   else "the coupled rule's output distribution")
            then = (f"serving the target's own {self.own_search_name()} instead ({why}; "
                    "--serve_target_if_faster=False serves the tree)"
                    if self.serve_target else "expect a speedup below 1x")
            log.warning(
                f"no candidate tree is faster than the target's own beam search at K={self.num_beams} on this "
                f"machine ({ms[best]:.1f} vs {target_ms:.1f} ms a request decoded alone): {then}. Speculative "
                "decoding pays where a target pass over a few dozen extra tokens costs little more than a decode "
                "step: a smaller K (topk), a CPU with AMX-BF16, a GPU, a larger target (docs/benchmarks.md)")
        return ms, target_ms

    def time_single_requests(self, input_ids, mask) -> None:
        """The paper's speedup: requests of the test split decoded alone (batch 1), target-only and
        speculatively, alternating which goes first, on a generator of their own (the evaluation's
        samples are unchanged); the first request warms both up and is not counted."""
        meter, device = self.spec_meter, input_ids.device
        if len(meter.single_spec_ms) >= self.single_requests:
            return
        generator = torch.Generator(device).manual_seed(self.seed + 1)
        for row in range(len(input_ids)):
            done = len(meter.single_spec_ms)
            if done >= self.single_requests:
                return
            ids, m = trim_left(input_ids[row:row + 1], mask[row:row + 1])
            target = (lambda: self.target_alone(ids, m))
            spec = (partial(self.own_search, ids, m, generator) if self.serve_target  # as the test pass serves it
                    else partial(self.serve_alone, ids, m, self.tree, generator))
            if done == 0 and not meter.warmed_up:
                target(), spec()
                meter.warmed_up = True
            if done % 2:
                (_, t_spec), (_, t_target) = timed(spec, device), timed(target, device)
            else:
                (_, t_target), (_, t_spec) = timed(target, device), timed(spec, device)
            meter.add_single(t_target, t_spec)

    def predict(self, interaction):
        return self.target.predict(interaction)


class AtSpeedR(AtSpeedS):
    """Relaxed sampling verification: high-probability drafts accepted, fewer target calls."""

    property_parents = ("GenRec", "AtSpeedS")
    verification = "relaxed"


