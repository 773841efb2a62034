"""GenRec: the target LLM recommender, a decoder-only LM over semantic-ID tokens.

A user's history is the concatenation of its items' L-code IDs; the model generates the next
item's codes, and a trie-constrained beam search turns that into a top-K list. This is the
model whose inference AtSpeed accelerates: its beam search is the speed baseline and the
verifier. Contract as RecBole's sasrec.py: `calculate_loss`, `predict`, `full_sort_predict`.
"""

from __future__ import annotations

import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType

from atspeed_rec.decoding.beam_search import BeamResult, beam_search, prompt_positions
from atspeed_rec.errors import ConfigError
from atspeed_rec.models.lm import build_lm
from atspeed_rec.models.vocab import CodeVocab
from atspeed_rec.recbole_glue.checkpoint import DATA_KEYS, TRAIN_KEYS
from atspeed_rec.recbole_glue.trainer import SafeCheckpointTrainer
from atspeed_rec.semantic_ids.builder import build_semantic_ids
from atspeed_rec.semantic_ids.trie import CodeTrie

FILL_SCORE = -1e9  # score of items outside the beams: finite, below every beam score


def check_beam_width(config) -> int:
    """The beam width K; RecBole ranks by score, so every top-k cut-off needs k beams."""
    topk = config["topk"] if isinstance(config["topk"], list) else [config["topk"]]
    num_beams = int(config["num_beams"])
    if num_beams < max(topk):
        raise ConfigError(
            f"num_beams={num_beams} is smaller than the largest topk cut-off {max(topk)}: the "
            f"ranking beyond the beams would be arbitrary; fix: set --num_beams={max(topk)} or more")
    return num_beams


SID_KEYS = ("sid_source", "sid_levels", "sid_codebook_size", "sid_collab_dim", "sid_text_fields")
LM_KEYS = ("n_layers", "hidden_size", "n_heads", "inner_size", "dropout_prob")


class GenRec(SequentialRecommender):
    input_type = InputType.POINTWISE
    trainer_class = SafeCheckpointTrainer
    checkpoint_keys = ("model", *DATA_KEYS, *TRAIN_KEYS, *SID_KEYS, *LM_KEYS)

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.num_beams = check_beam_width(config)
        sids = build_semantic_ids(config, dataset, dataset)  # `dataset` is the training split
        self.vocab = CodeVocab(sids.levels, sids.codebook_size)
        self.register_buffer("item_codes", sids.codes)  # [n_items, L], row 0 (PAD) = -1
        self.sid_source = sids.source
        self.lm = build_lm(config, self.vocab)
        # Train each user's sequence once per epoch, next-item loss at every item (see calculate_loss).
        self.register_buffer("longest_prefix", self._longest_prefix(dataset))  # [n_users]
        self._trie: CodeTrie | None = None

    def _longest_prefix(self, dataset) -> torch.Tensor:
        users = dataset.inter_feat[dataset.uid_field]
        lengths = dataset.inter_feat[self.ITEM_SEQ_LEN]
        longest = torch.zeros(dataset.user_num, dtype=torch.long)
        return longest.scatter_reduce(0, users, lengths, reduce="amax")

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
        """Left-padded history tokens `[B, H * L]` and their attention mask."""
        items = self.right_aligned(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN],
                                   self.max_seq_length)
        tokens = self.vocab.history_tokens(self.item_codes, items)
        return _trim_left(tokens, tokens != self.vocab.pad_id)

    # ---- training ------------------------------------------------------------------------
    def calculate_loss(self, interaction):
        """Next-item code cross-entropy over the user's whole training sequence.

        RecBole gives one row per training prefix. A causal LM scores every next item of a
        sequence in one pass, so only each user's longest prefix is used, with the loss on the
        codes of every item after the first: each target is learned once per epoch, at the cost
        of one forward per user instead of one per prefix.
        """
        users = interaction[self.USER_ID]
        seq_len = interaction[self.ITEM_SEQ_LEN]
        keep = seq_len == self.longest_prefix[users]
        if not keep.any():
            return self.lm.get_output_embeddings().weight.sum() * 0.0  # nothing to learn here
        item_seq = interaction[self.ITEM_SEQ][keep]
        seq_len = seq_len[keep]
        target = interaction[self.POS_ITEM_ID][keep]
        full = torch.cat([item_seq, torch.zeros_like(item_seq[:, :1])], dim=1)  # history + target
        full.scatter_(1, seq_len.unsqueeze(1), target.unsqueeze(1))
        items = self.right_aligned(full, seq_len + 1, full.shape[1])  # [B, M + 1]
        tokens = self.vocab.history_tokens(self.item_codes, items)  # [B, (M + 1) * L]
        mask = tokens != self.vocab.pad_id
        tokens, mask = _trim_left(tokens, mask)
        L = self.vocab.levels
        first_item = mask.long().argmax(dim=1, keepdim=True) // L  # slot of the first real item
        slot = torch.arange(tokens.shape[1], device=tokens.device) // L  # [T]
        labels = tokens.masked_fill(slot <= first_item, -100)  # codes of items 2.. are targets
        logits = self.lm(input_ids=tokens[:, :-1], attention_mask=mask[:, :-1],
                         position_ids=prompt_positions(mask[:, :-1])).logits  # [B, T-1, V]
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels[:, 1:].flatten())

    # ---- inference -----------------------------------------------------------------------
    def generate(self, interaction, num_beams: int | None = None) -> BeamResult:
        """Top-K items of each request by trie-constrained beam search."""
        input_ids, mask = self.prompt(interaction)
        return beam_search(self.lm, self.trie, self.vocab, input_ids, mask, num_beams or self.num_beams)

    def full_sort_predict(self, interaction):
        beams = self.generate(interaction)
        return beams_to_scores(beams, self.n_items)  # [B, n_items]

    def predict(self, interaction):
        """log p(item's codes | history) for the (history, item) pairs of `interaction`."""
        input_ids, mask = self.prompt(interaction)
        codes = self.item_codes[interaction[self.ITEM_ID]]  # [B, L]
        target = self.vocab.tokens(codes)
        tokens = torch.cat([input_ids, target], dim=1)
        full_mask = torch.cat([mask, torch.ones_like(target, dtype=torch.bool)], dim=1)
        logits = self.lm(input_ids=tokens[:, :-1], attention_mask=full_mask[:, :-1],
                         position_ids=prompt_positions(full_mask[:, :-1])).logits
        logp = torch.log_softmax(logits[:, -self.vocab.levels:].float(), dim=-1)  # [B, L, V]
        return logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).sum(-1)


def beams_to_scores(beams: BeamResult, n_items: int) -> torch.Tensor:
    """`[B, n_items]` scores: beam scores on the beam items, FILL_SCORE elsewhere."""
    B = beams.items.shape[0]
    scores = torch.full((B, n_items), FILL_SCORE, device=beams.scores.device)
    found = beams.items > 0
    rows = torch.arange(B, device=scores.device).unsqueeze(1).expand_as(beams.items)
    scores[rows[found], beams.items[found]] = beams.scores[found]
    return scores


def _trim_left(tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the leading columns that are padding in every row (left-padded batches)."""
    start = int((~mask).all(dim=0).long().cumprod(0).sum())
    return tokens[:, start:], mask[:, start:]
