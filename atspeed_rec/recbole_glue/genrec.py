"""GenRec: the target LLM recommender, a decoder-only LM over semantic-ID tokens.

A user's history is the concatenation of its items' L-code IDs; the model generates the next
item's codes, and a trie-constrained beam search turns that into a top-K list. This is the
model whose inference AtSpeed accelerates: its beam search is the speed baseline and the
verifier. Contract as RecBole's sasrec.py: `calculate_loss`, `predict`, `full_sort_predict`.

Two kinds of LM: a small Llama trained from scratch over the code tokens only (the default), or,
with the property `pretrained_path`, a pretrained causal LM with the codes added as new tokens,
fine-tuned with LoRA and given the history inside a text prompt (LC-Rec style; see
`atspeed_rec/models/pretrained.py`).
"""

from __future__ import annotations

import torch
from recbole.utils import InputType

from atspeed_rec.decoding.beam_search import BeamResult, beam_search, masked_log_softmax
from atspeed_rec.decoding.tree import prompt_positions
from atspeed_rec.errors import ConfigError
from atspeed_rec.models.compiled import CompiledBlocks
from atspeed_rec.models.fast_forward import hidden_code_logits
from atspeed_rec.models.item_embedding import ItemTokenEmbedding
from atspeed_rec.models.lm import build_lm
from atspeed_rec.models.precision import resolve_dtype
from atspeed_rec.models.prefix_cache import register_prefix
from atspeed_rec.models.pretrained import build_pretrained, save_trained_part_only
from atspeed_rec.models.sequences import TrainingWindows, pack
from atspeed_rec.models.vocab import CodeVocab
from atspeed_rec.recbole_glue.base import ProjectModel
from atspeed_rec.recbole_glue.checkpoint import DATA_KEYS, TRAIN_KEYS
from atspeed_rec.recbole_glue.validation import topk_cutoffs
from atspeed_rec.semantic_ids.builder import build_semantic_ids
from atspeed_rec.semantic_ids.trie import CodeTrie

FILL_SCORE = -1e9  # score of items outside the beams: finite, below every beam score


def check_beam_width(config) -> int:
    """The beam width K; RecBole ranks by score, so every top-k cut-off needs k beams."""
    topk = topk_cutoffs(config)
    num_beams = int(config["num_beams"])
    if num_beams < max(topk):
        raise ConfigError(
            f"num_beams={num_beams} is smaller than the largest topk cut-off {max(topk)}: the "
            f"ranking beyond the beams would be arbitrary; fix: set --num_beams={max(topk)} or more")
    return num_beams


SID_KEYS = ("sid_source", "sid_levels", "sid_codebook_size", "sid_collab_dim", "sid_text_fields")
LM_KEYS = ("n_layers", "hidden_size", "n_heads", "inner_size", "dropout_prob", "window_stride", "item_embedding",
           "num_beams")  # num_beams: the validation's beam width, which picks the kept epoch
PRETRAINED_KEYS = ("pretrained_path", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "prompt_prefix",
                   "dtype", "backbone_learning_rate")


class GenRec(ProjectModel):
    input_type = InputType.POINTWISE
    checkpoint_keys = (*DATA_KEYS, *TRAIN_KEYS, *SID_KEYS, *LM_KEYS, *PRETRAINED_KEYS)

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.num_beams = check_beam_width(config)
        sids = build_semantic_ids(config, dataset, dataset)  # `dataset` is the training split
        self.register_buffer("item_codes", sids.codes)  # [n_items, L], row 0 (PAD) = -1
        self.sid_source = sids.source
        self.pretrained = bool(config["pretrained_path"])
        self.dtype = resolve_dtype(config["dtype"], config["device"], self.pretrained)
        if self.pretrained:  # LoRA on a pretrained LM, history inside a text prompt
            parts = build_pretrained(config, sids.levels, sids.codebook_size, self.dtype)
            self.vocab, self.lm, self.text_prompt = parts.vocab, parts.lm, parts.text_prompt
            register_prefix(self.lm, self.text_prompt.prefix)  # decoding encodes it once (prefix_cache.py)
        else:
            self.vocab = CodeVocab(sids.levels, sids.codebook_size)
            self.lm = build_lm(config, self.vocab).to(self.dtype)
            if config["item_embedding"]:  # an item's own vector on its last code token (item_embedding.py)
                self.lm.set_input_embeddings(ItemTokenEmbedding(
                    self.lm.get_input_embeddings(), self.vocab, self.item_codes, self.lm.config.initializer_range))
            self.text_prompt = None
        # Each user's whole training sequence, in windows (see calculate_loss); data, not weights.
        self.windows = TrainingWindows(dataset, self.max_seq_length, int(config["window_stride"]))
        self._trie: CodeTrie | None = None
        self.register_buffer("prefix_nodes", self._prefix_nodes(), persistent=False)  # [n_items, L]
        self.eval_length_buckets = int(config["eval_length_buckets"])  # decoded groups per evaluation batch
        self.compiled = CompiledBlocks(self.lm, bool(config["train_compile"]))  # training steps only
        self.backbone_learning_rate = config["backbone_learning_rate"]  # full fine-tuning: the blocks' own rate
        if self.pretrained:  # checkpoints hold LoRA, new-token rows and buffers, not the backbone
            save_trained_part_only(self)

    def _prefix_nodes(self) -> torch.Tensor:
        """`[n_items, L]` the trie node of each item's first l codes (l = 0: the root); PAD row 0."""
        codes = self.item_codes.clamp(min=0)
        nodes = torch.zeros_like(codes)
        for level in range(1, codes.shape[1]):
            nodes[:, level] = self.trie.step(nodes[:, level - 1], codes[:, level - 1], level - 1).clamp(min=0)
        return nodes

    @property
    def trie(self) -> CodeTrie:
        device = self.item_codes.device
        if self._trie is None or self._trie.device != device:
            self._trie = CodeTrie(self.item_codes[1:].cpu(), self.vocab.codebook_size, item_offset=1).to(device)
        return self._trie

    # ---- prompts -------------------------------------------------------------------------
    def right_aligned(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor, width: int) -> torch.Tensor:
        """`[B, width]` the last `width` items of each RecBole sequence, left-padded with 0."""
        idx = torch.arange(width, device=item_seq.device) - width + item_seq_len.unsqueeze(1)  # [B, width]
        items = item_seq.gather(1, idx.clamp(min=0, max=item_seq.shape[1] - 1))
        return items.masked_fill(idx < 0, 0)

    def prompt(self, interaction) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded history tokens `[B, H * L]` and their attention mask.

        With a pretrained LM each row is `[pads][prefix text][history codes]`.
        """
        items = self.right_aligned(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN],
                                   self.max_seq_length)
        tokens = self.vocab.history_tokens(self.item_codes, items)
        if self.text_prompt is None:
            return trim_left(tokens, tokens != self.vocab.pad_id)
        # the pad id may be a text token (eos): the mask comes from the items, not the tokens
        tokens, mask = self.text_prompt(tokens, (items > 0).repeat_interleave(self.vocab.levels, dim=1))
        return trim_left(tokens, mask)

    # ---- training ------------------------------------------------------------------------
    def optimizer_groups(self) -> list[dict]:
        """The trainable weights as optimizer parameter groups: one, or with `backbone_learning_rate` (full
        fine-tuning) the pretrained weights at that rate beside the code rows, which start from scratch."""
        named = [(name, p) for name, p in self.named_parameters() if p.requires_grad]
        if self.backbone_learning_rate is None:
            return [{"params": [p for _, p in named]}]
        return [{"params": [p for name, p in named if name.endswith("code_rows")], "name": "code rows"},
                {"params": [p for name, p in named if not name.endswith("code_rows")], "name": "backbone",
                 "lr": float(self.backbone_learning_rate)}]

    def calculate_loss(self, interaction):
        """Next-item code cross-entropy over the user's whole training sequence.

        RecBole gives one row per training prefix. A causal LM scores every next item of a
        sequence in one pass, so the row holding a user's last training target stands for the
        user's whole training sequence (`TrainingWindows`), with the loss on every target:
        each target is learned once per epoch, at the cost of one forward pass per user (a few
        for long users) instead of one per prefix. With a pretrained LM each window is preceded
        by the prompt's text, as at inference.
        """
        return self.compiled.run(lambda: self.window_loss(self.lm, interaction))

    def window_loss(self, lm, interaction):
        """Mean next-code cross-entropy of `lm` (the target, or a draft) over the batch's windows.

        Each window is `[prefix text][window codes]`; the windows are packed end to end in rows as long
        as the longest (`sequences.pack`), each with its own positions from 0, which transformers turns into
        attention within each window only: one pass a batch, and few pad tokens computed (padding each
        window to its bucket's longest computed ~24% more tokens than real, and four passes).
        """
        final = self.windows.is_final_row(interaction[self.USER_ID], interaction[self.POS_ITEM_ID])
        if not final.any():
            return sum(p.sum() for p in lm.parameters() if p.requires_grad) * 0.0  # nothing to learn here
        items, loss_from = self.windows.windows(interaction[self.USER_ID][final])  # [n, W] left-padded, [n]
        order = (items == 0).long().argsort(dim=1, stable=True)  # real items first, in order
        slot = order  # each item's slot in the left-padded window (loss_from counts in those slots)
        items = items.gather(1, order)  # [n, W] right-padded
        learn = (slot >= loss_from.unsqueeze(1)) & (items > 0)  # [n, W] targets of this window
        L = self.vocab.levels
        tokens = self.vocab.history_tokens(self.item_codes, items)  # [n, W * L]
        labels = tokens.masked_fill(~learn.repeat_interleave(L, 1), -100)
        token_items = items.repeat_interleave(L, 1)  # [n, W * L] the item each token belongs to
        if self.text_prompt is not None:  # the prompt's text before the codes, as at inference
            prefix = self.text_prompt.prefix.expand(len(items), -1)
            tokens = torch.cat([prefix, tokens], 1)
            labels = torch.cat([torch.full_like(prefix, -100), labels], 1)
            token_items = torch.cat([torch.zeros_like(prefix), token_items], 1)
        P = tokens.shape[1] - items.shape[1] * L  # prefix tokens
        n_real = P + (items > 0).sum(1) * L  # [n] tokens before the padding
        level_of = (torch.arange(tokens.shape[1], device=tokens.device) - P) % L  # [P + W*L] (prefix: unused)
        # Each window's tokens but its last are fed to predict the next: packed end to end, few pads computed
        fed = n_real - 1  # [n]
        T = int(fed.max())  # row length: the longest window fed
        row, start = pack(fed.cpu(), T)
        R = int(row.max()) + 1
        col = torch.arange(tokens.shape[1] - 1, device=tokens.device)
        real = col < fed.unsqueeze(1)  # [n, P + W*L - 1]
        dest = ((row * T + start).to(tokens.device).unsqueeze(1) + col)[real]  # flat slot in the [R, T] rows

        def packed(src, fill):  # [n, P + W*L - 1] -> [R, T]
            return src.new_full((R * T,), fill).index_put_((dest,), src[real]).view(R, T)

        inputs = packed(tokens[:, :-1], self.vocab.pad_id)
        positions = packed(col.expand(len(items), -1), 0)  # restart at 0 in each window: its own sequence
        # transformers reads a packed row from the restarting positions: attention stays inside each window
        logits = hidden_code_logits(lm, self.vocab, input_ids=inputs, position_ids=positions)  # [R, T, L*C]
        loss = self.code_nll(logits, packed(labels[:, 1:], -100), packed(token_items[:, 1:], 0),
                             packed(level_of[1:].expand(len(items), -1), 0))
        return loss / (labels[:, 1:] >= 0).sum()

    def code_nll(self, logits, labels, label_items, level_of):
        """Summed -log p(code | prefix) over the labelled positions, p renormalised over the codes the
        trie allows after the item's earlier codes (as beam search scores them): the model spends
        nothing on learning which codes exist, only on ranking the valid ones.

        logits `[n, T, L*C]`; labels `[n, T]` code tokens or -100; label_items `[n, T]` their items;
        level_of `[n, T]` (or `[T]`, one per column) the code level of each label.
        """
        L = self.vocab.levels
        total = logits.new_zeros((), dtype=torch.float)
        for level in range(L):
            at = (labels >= 0) & (level_of == level)  # [n, T]
            if not at.any():
                continue
            nodes = self.prefix_nodes[label_items[at], level]  # [m] trie node of each item's prefix
            code_lp = masked_log_softmax(self.vocab.level_logits(logits[at], level),
                                         self.trie.allowed(nodes, level))  # [m, C]
            code = (labels[at] - self.vocab.level_start(level)).unsqueeze(1)
            total = total - code_lp.gather(1, code).sum()
        return total

    def _code_logits(self, input_ids, mask, target):
        """`[B, L, L*C]` code logits for the target codes `[B, L]` after the prompts (teacher forcing)."""
        tokens = torch.cat([input_ids, target], dim=1)
        full_mask = torch.cat([mask, torch.ones_like(target, dtype=torch.bool)], dim=1)
        return hidden_code_logits(self.lm, self.vocab, self.vocab.levels, input_ids=tokens[:, :-1],
                                  attention_mask=full_mask[:, :-1], position_ids=prompt_positions(full_mask[:, :-1]))

    # ---- inference -----------------------------------------------------------------------
    def generate(self, interaction, num_beams: int | None = None) -> BeamResult:
        """Top-K items of each request by trie-constrained beam search."""
        input_ids, mask = self.prompt(interaction)
        return beam_search(self.lm, self.trie, self.vocab, input_ids, mask, num_beams or self.num_beams)

    def full_sort_predict(self, interaction):
        input_ids, mask = self.prompt(interaction)
        scores = torch.empty(len(input_ids), self.n_items, device=input_ids.device)  # [B, n_items]
        for rows, ids, m in by_length(input_ids, mask, self.eval_length_buckets):  # fewer pad tokens
            scores[rows] = beams_to_scores(beam_search(self.lm, self.trie, self.vocab, ids, m, self.num_beams),
                                           self.n_items)
        return scores

    def predict(self, interaction):
        """log p(item's codes | history) for the (history, item) pairs of `interaction`."""
        input_ids, mask = self.prompt(interaction)
        items = interaction[self.ITEM_ID]
        target = self.vocab.tokens(self.item_codes[items])  # [B, L]
        logits = self._code_logits(input_ids, mask, target)  # [B, L, L*C]
        nodes = self.prefix_nodes[items]  # [B, L]
        score = logits.new_zeros(len(items), dtype=torch.float)
        for level in range(self.vocab.levels):
            code_lp = masked_log_softmax(self.vocab.level_logits(logits[:, level], level),
                                         self.trie.allowed(nodes[:, level], level))  # [B, C]
            score = score + code_lp.gather(1, (target[:, level] - self.vocab.level_start(level)).unsqueeze(1))[:, 0]
        return score  # log p(item | history), as beam search scores it


def beams_to_scores(beams: BeamResult, n_items: int) -> torch.Tensor:
    """`[B, n_items]` scores: beam scores on the beam items, FILL_SCORE elsewhere."""
    B = beams.items.shape[0]
    scores = torch.full((B, n_items), FILL_SCORE, device=beams.scores.device)
    found = beams.items > 0
    rows = torch.arange(B, device=scores.device).unsqueeze(1).expand_as(beams.items)
    scores[rows[found], beams.items[found]] = beams.scores[found]
    return scores


def length_groups(mask: torch.Tensor, groups: int) -> tuple[torch.Tensor, ...]:
    """Row indices of a left-padded batch `mask [B, P]` in at most `groups` groups of similar prompt length,
    each to be decoded alone, trimmed to its own longest prompt: a batch padded to its longest prompt computes
    pad tokens (in random batches of 64 amazon-beauty users 64% of the history tokens; in 4 groups 24%)."""
    return torch.argsort(mask.sum(1), stable=True).chunk(groups)


def by_length(input_ids: torch.Tensor, mask: torch.Tensor, groups: int):
    """Each length group of a left-padded batch (`length_groups`): its rows and its prompts and mask, trimmed."""
    for rows in length_groups(mask, groups):
        yield (rows, *trim_left(input_ids[rows], mask[rows]))


def trim_left(tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the leading columns that are padding in every row (left-padded batches)."""
    start = int((~mask).all(dim=0).long().cumprod(0).sum())
    return tokens[:, start:], mask[:, start:]
