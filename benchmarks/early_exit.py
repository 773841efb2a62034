"""How well could the target's own first layers draft the 1st code? A probe for an early-exit draft.

At K >= 3 the trees draft from the 2nd code on: the 1-layer draft too rarely holds all K of the target's
best 1st codes, so a request always takes >= 2 target calls. A draft made of the target's first m
layers and a trained exit head would share the prompt's KV with the target (its prompt pass is then
free), so the question is how often its top-N 1st codes hold the target's top K. For sampled test
users (batch 32) this takes the target's hidden state at the prompt's last token after every layer,
trains two exit heads per m (RMSNorm + linear, started from the target's final norm and code rows:
the "logit lens"; and the same after a residual MLP) on the target's own 1st-code distribution (KL)
of the first `--train_users`, and reports, on the other `--eval_users`, the share of users whose
target top-K 1st codes all lie in the head's top N, beside the untrained logit lens and the served
1-layer draft (AtSpeedS's; `--model=AtSpeedR` measures AtSpeedR's). Findings: docs/experiments.md, "An
early-exit draft from the target's first layers".

    python benchmarks/early_exit.py --dataset=amazon-beauty --data_path=DIR

writes docs/early_exit_probe.md.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import common
import decoders
from atspeed_rec.decoding.beam_search import masked_code_logprobs
from atspeed_rec.decoding.tree import DraftTree, prompt_positions, tree_forward
from atspeed_rec.models.fast_forward import causal_prompt_mask, code_weight, llama_parts
from atspeed_rec.models.fused import fused_blocks
from atspeed_rec.models.prefix_cache import split_prefix
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


def parse_args(argv=None):
    p = common.parser(__file__, __doc__, requests=None, output="early_exit_probe.md")
    p.add_argument("--train_users", type=int, default=4000, help="users whose states train the heads")
    p.add_argument("--eval_users", type=int, default=1000, help="other users the coverage is measured on")
    p.add_argument("--layers", type=common.int_list, default=[1, 2, 4, 8],
                   help="exit after m layers (empty: the served draft alone)")
    p.add_argument("--pairs", type=lambda t: [tuple(map(int, x.split(":"))) for x in t.split(",")],
                   default=[(1, 1), (1, 2), (1, 6), (3, 10), (3, 20), (10, 20), (10, 40), (10, 60)],
                   help="K:N pairs: the target's top K 1st codes, all in the draft's top N")
    p.add_argument("--steps", type=int, default=400, help="full-batch AdamW steps per head")
    args = common.parse(p, argv, tuple(decoders.MODEL_OF_MODE.values()))  # whose draft: AtSpeedS's unless --model
    mode = next((m for m, name in decoders.MODEL_OF_MODE.items() if name == args.model), "strict")
    args.modes, args.requests, args.temperature = [mode], args.train_users + args.eval_users, None
    args.warmup = 0  # nothing is timed
    return args


@torch.no_grad()
def layer_states(lm, ids, mask) -> torch.Tensor:
    """`[B, n_layers + 1, D]` the hidden state at each left-padded prompt's last token: after the
    embedding and after every block. The loop of `fast_forward.lm_forward` (whole prompts, no cache),
    written out here to keep every state (a shared block function slowed K = 1 requests by ~3%)."""
    decoder, _ = llama_parts(lm)
    fused = fused_blocks(decoder)
    B, Q = ids.shape
    h = decoder.embed_tokens(ids)
    cos, sin = decoder.rotary_emb(h, prompt_positions(mask))
    am = causal_prompt_mask(mask, h.dtype)
    out = [h[:, -1].float()]
    for i, layer in enumerate(decoder.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q, k, v = fused[i].project_qkv(x) if fused else (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x))
        q, k = q.view(B, Q, -1, attn.head_dim), k.view(B, Q, -1, attn.head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3 and kin (as `lm_forward`)
            q, k = attn.q_norm(q), attn.k_norm(k)
        v = v.view(B, Q, -1, attn.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=am, scale=attn.scaling,
                                           enable_gqa=attn.num_key_value_groups > 1).transpose(1, 2).reshape(B, Q, -1)
        h = h + (fused[i].o(o) if fused else attn.o_proj(o))
        x = layer.post_attention_layernorm(h)
        h = h + (fused[i].mlp(x) if fused else layer.mlp(x))
        out.append(h[:, -1].float())
    return torch.stack(out, 1)


class ExitHead(torch.nn.Module):
    """RMSNorm + the 1st-code rows, started from the target's final norm and code rows (the logit lens);
    with `hidden` > 0 a residual MLP of that width first (zero-initialised output: the lens at step 0)."""

    def __init__(self, norm_weight, rows, eps: float, hidden: int = 0):
        super().__init__()
        D = rows.shape[1]
        self.mlp = None
        if hidden:
            self.mlp = torch.nn.Sequential(torch.nn.LayerNorm(D), torch.nn.Linear(D, hidden), torch.nn.GELU(),
                                           torch.nn.Linear(hidden, D))
            torch.nn.init.zeros_(self.mlp[-1].weight)
            torch.nn.init.zeros_(self.mlp[-1].bias)
        self.norm = torch.nn.Parameter(norm_weight.float().clone())
        self.rows = torch.nn.Parameter(rows.float().clone())  # [C, D]
        self.eps = eps

    def forward(self, x):  # [B, D] -> [B, C]
        if self.mlp is not None:
            x = x + self.mlp(x)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm
        return x @ self.rows.T


def train_head(head, x, target_lp, valid, steps: int):
    """Full-batch AdamW on KL(p || q) over the valid 1st codes; returns the last loss."""
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=0.01)
    p = target_lp.exp()
    for _ in range(steps):
        logq = torch.log_softmax(head(x).masked_fill(~valid, -1e9), -1)
        loss = (p * (target_lp.clamp(min=-1e9) - logq)).sum(-1).mean()  # KL(p || q)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def coverage(target_lp, draft_lp, pairs) -> dict:
    """{(K, N): share of rows whose target top-K codes all lie in the draft's top N}."""
    out = {}
    for k, n in pairs:
        top = target_lp.topk(k, -1).indices  # [B, K]
        mine = torch.zeros_like(draft_lp, dtype=torch.bool).scatter_(1, draft_lp.topk(n, -1).indices, True)
        out[k, n] = float(mine.gather(1, top).all(-1).float().mean())
    return out


def first_code_logprobs(model, vocab, trie, ids, mask):
    """`[B, C]` the model's 1st-code log-probs over the valid codes, by decoding's own prompt pass."""
    ids, mask, prefix = split_prefix([model], vocab, ids, mask)
    empty = ids.new_zeros(len(ids), 1, 0)
    lp, _, _ = tree_forward(model, vocab, mask, empty, DraftTree.empty(len(ids)), None if prefix is None
                            else prefix[0], ids)
    return masked_code_logprobs(lp, vocab, trie, trie.root_nodes(len(ids), 1), 0)[:, 0]


@torch.no_grad()
def target_states(lm, draft, vocab, trie, requests, with_states: bool = True):
    """(hidden states `[U, n_layers + 1, D]` at each prompt's last token, or None without `with_states`;
    the target's and the draft's 1st-code log-probs `[U, C]`) of the users of `requests`."""
    states, target_lp, draft_lp = [], [], []
    for i, r in enumerate(requests):
        print(f"\rstates: batch {i + 1}/{len(requests)}", end="", file=sys.stderr)
        if with_states:
            states.append(layer_states(lm, r.ids, r.mask))  # [B, n_layers + 1, D]
        target_lp.append(first_code_logprobs(lm, vocab, trie, r.ids, r.mask))
        draft_lp.append(first_code_logprobs(draft, vocab, trie, r.ids, r.mask))
    print(file=sys.stderr)
    return torch.cat(states) if states else None, torch.cat(target_lp), torch.cat(draft_lp)


def probe(args) -> None:
    served, test = decoders.load(args)
    s = served[args.modes[0]]
    t, draft = s.model.target, s.model.draft
    vocab, trie, lm = t.vocab, t.trie, t.lm
    valid = trie.allowed(trie.root_nodes(1), 0)[0]  # [C] codes an ID may start with
    states, target_lp, draft_lp = target_states(lm, draft, vocab, trie, decoders.requests(args, served, test, 32),
                                                bool(args.layers))
    C, (decoder, _) = vocab.codebook_size, llama_parts(lm)
    n = args.train_users
    rows = code_weight(lm, vocab)[:C].detach()
    size = f"{draft.config.num_hidden_layers} x {draft.config.hidden_size}"
    results = {f"served draft ({size}, own prompt pass)": coverage(target_lp[n:], draft_lp[n:], args.pairs)}
    for m in args.layers:
        for hidden in (0, rows.shape[1]):
            head = ExitHead(decoder.norm.weight, rows, decoder.norm.variance_epsilon, hidden)
            name = f"after {m} layers: " + ("linear" if not hidden else f"MLP {hidden}")
            if not hidden:
                with torch.no_grad():
                    lens = head(states[n:, m]).masked_fill(~valid, float("-inf"))
                results[f"after {m} layers: logit lens"] = coverage(target_lp[n:], lens, args.pairs)
            loss = train_head(head, states[:n, m], target_lp[:n], valid, args.steps)
            with torch.no_grad():
                q = head(states[n:, m]).masked_fill(~valid, float("-inf"))
            key = f"{name} (train KL {loss:.2f})"
            results[key] = coverage(target_lp[n:], q, args.pairs)
            print(f"{key}: {results[key]}", file=sys.stderr)
    keys = args.pairs
    cols = ["draft"] + [f"top-{k} in top-{w}" for k, w in keys]
    lines = decoders.header(args, "Early-exit probe: the target's top-K 1st codes in a draft's top N", served,
                            [f"{n} users train the heads, {args.eval_users} others measured; "
                             f"{len(decoder.layers)} target layers"])
    lines += common.table(cols, [[name] + [f"{r[key]:.2f}" for key in keys] for name, r in results.items()])
    common.write(lines, args.output)


def main(argv=None) -> int:
    return common.main(parse_args(argv), probe)


if __name__ == "__main__":
    sys.exit(main())
