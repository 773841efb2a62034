"""A lean inference forward for Llama-family LMs (Llama, Mistral, Qwen2/3, SmolLM): plain tensors in and out.

Decoding here calls tiny models many times on a few tokens each. transformers' forward spends
most of such a call outside the matmuls (cache objects, mask pre-processing, output classes), so
the draft cost as much per call as the target and speculative decoding could not win. This
forward runs the same modules (embeddings, norms, attention, rotary embedding) with the KV cache as
a list of (keys, values) tensors `[B, kv_heads, T, head_dim]` per layer and an additive 4-D mask
built by the caller; on a CPU each block's projections run as 4 fused matmuls (`fused.py`: LoRA
merged, q/k/v and gate/up concatenated, prepacked), elsewhere as the modules themselves.
Equality with transformers' forward is a test (`tests/test_fast_forward.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from atspeed_rec.models.fused import fused_blocks
from atspeed_rec.models.vocab import CodeVocab

KV = list[tuple[torch.Tensor, torch.Tensor]]


def llama_parts(model):
    """(decoder, lm_head) of a `LlamaForCausalLM`-like model, through a peft wrapper if any."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model, base.lm_head


def lm_dtype(model) -> torch.dtype:
    """The dtype activations run in (the backbone's)."""
    return llama_parts(model)[0].norm.weight.dtype


def code_weight(model, vocab: CodeVocab) -> torch.Tensor:
    """`[L * C, D]` the output rows of the code tokens (row j = token `vocab.offset + j`)."""
    _, head = llama_parts(model)
    weight = getattr(head, "code_weight", None)  # a pretrained LM's own code rows (`pretrained.py`)
    return head.weight[vocab.offset:vocab.size] if weight is None else weight


def code_logits(model, vocab: CodeVocab, hidden: torch.Tensor) -> torch.Tensor:
    """`[..., L * C]` logits of the code tokens only (column j = token `vocab.offset + j`) from the
    final hidden states: a pretrained LM's text vocabulary (49k rows for SmolLM2) is never computed."""
    # [..., L*C] in float32: bf16 rounding would blur close codes
    return F.linear(hidden.float(), code_weight(model, vocab).float())


def hidden_code_logits(model, vocab: CodeVocab, keep=None, **inputs) -> torch.Tensor:
    """Code logits `[B, Q, L * C]` of a transformers forward (`input_ids`, `attention_mask`,
    `position_ids`), at query indices `keep` (a tensor, or the last `keep` if an int) or all;
    gradients flow (training)."""
    decoder, _ = llama_parts(model)
    h = decoder(use_cache=False, **inputs).last_hidden_state  # [B, Q, D]
    if keep is not None:
        h = h[:, -keep:] if isinstance(keep, int) else h[:, keep]
    return code_logits(model, vocab, h)


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool `[B, Q, T]` (True = may attend) -> additive `[B, 1, Q, T]`: 0 or dtype-min."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(
        ~visible, torch.finfo(dtype).min).unsqueeze(1)


def causal_prompt_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask `[B, 1, P, P]` for left-padded prompts: causal over real tokens; a pad token
    sees only itself (its output is never used, and no row is empty, so no NaN)."""
    i = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    causal = (i <= i.unsqueeze(1)) & attention_mask.bool().unsqueeze(1)  # [B, P, P]
    return additive_mask(causal | (i == i.unsqueeze(1)), dtype)


def run_blocks(decoder, fused, layers: range, h, cos, sin, mask, kv: KV | None):
    """The decoder blocks `layers` over `h [B, Q, D]` after the cache `kv` (one entry per block in `layers`);
    returns h and the grown cache of those blocks."""
    B, Q, _ = h.shape
    new_kv = []
    for i, j in enumerate(layers):
        layer, attn = decoder.layers[j], decoder.layers[j].self_attn
        x = layer.input_layernorm(h)
        q, k, v = fused[j].project_qkv(x) if fused else (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x))
        q = q.view(B, Q, -1, attn.head_dim)  # [B, Q, heads, hd]
        k = k.view(B, Q, -1, attn.head_dim)  # [B, Q, kv_heads, hd]
        if hasattr(attn, "q_norm"):  # Qwen3 and kin: RMSNorm of each head's query and key before RoPE
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, heads, Q, hd], [B, kv_heads, Q, hd]
        v = v.view(B, Q, -1, attn.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if kv is not None:
            k, v = torch.cat([kv[i][0], k], 2), torch.cat([kv[i][1], v], 2)
        new_kv.append((k, v))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling,
                                           enable_gqa=attn.num_key_value_groups > 1)  # [B, heads, Q, hd]
        o = o.transpose(1, 2).reshape(B, Q, -1)
        h = h + (fused[j].o(o) if fused else attn.o_proj(o))
        x = layer.post_attention_layernorm(h)
        h = h + (fused[j].mlp(x) if fused else layer.mlp(x))
    return h, new_kv


@torch.no_grad()
def lm_forward(model, vocab: CodeVocab, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
               kv: KV | None = None, keep: torch.Tensor | int | None = None):
    """Code logits after `tokens [B, Q]` (at query indices `keep`, or the last `keep` if an int) and
    the KV cache grown by the Q tokens.

    positions: `[B, Q]` position ids; mask: additive `[B, 1, Q, T + Q]` over (cache, new tokens);
    kv: the cache of T tokens, or None. Returns logits `[B, len(keep), L * C]` and the new KV.
    """
    decoder, _ = llama_parts(model)
    fused = fused_blocks(decoder)  # [n_layers] of 4 matmuls each, or None: call the modules
    h = decoder.embed_tokens(tokens)  # [B, Q, D]
    cos, sin = decoder.rotary_emb(h, positions)
    h, new_kv = run_blocks(decoder, fused, range(len(decoder.layers)), h, cos, sin, mask, kv)
    if keep is not None:
        h = h[:, -keep:] if isinstance(keep, int) else h[:, keep]
    return code_logits(model, vocab, decoder.norm(h)), new_kv
