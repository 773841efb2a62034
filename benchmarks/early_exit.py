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
1-layer draft (AtSpeedS's; `--model=AtSpeedR` measures AtSpeedR's). `--block_layers` adds a draft block
over the target's states after m layers at every prompt token (EAGLE / PAD-Rec style: a down-projection,
one transformer block of the draft's width, the 1st code read at the last token), trained the same way
(m = 0: the target's token embeddings, the control); `--second_code` measures the 2nd code after the
target's best 1st code too (the blocks read that code's own learned row, as a draft reads a code it drafted).
Findings: docs/experiments.md, "An early-exit draft from the target's first layers" and the next section.

    python benchmarks/early_exit.py --dataset=amazon-beauty --data_path=DIR

writes docs/results/early_exit_probe.md.
"""

from __future__ import annotations

import sys

import torch

import common
import decoders
from atspeed_rec.alignment.losses import wordkd_loss
from atspeed_rec.decoding.beam_search import masked_code_logprobs
from atspeed_rec.decoding.tree import DraftTree, prompt_positions, tree_forward
from atspeed_rec.models.fast_forward import causal_prompt_mask, code_weight, llama_parts, run_blocks
from atspeed_rec.models.fused import fused_blocks
from atspeed_rec.models.prefix_cache import split_prefix


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
    p.add_argument("--block_layers", type=common.int_list, default=[],
                   help="draft blocks over the target's states after m layers at every prompt token (0: embeddings)")
    p.add_argument("--block_width", type=int, default=256, help="the draft block's width (the served draft's)")
    p.add_argument("--block_epochs", type=int, default=20, help="AdamW epochs of 32-user batches per draft block")
    p.add_argument("--second_code", action="store_true",
                   help="also the 2nd code after the target's best 1st code (the blocks read that code's own row)")
    p.add_argument("--time_requests", type=int, default=0,
                   help="also time, at batch 1 on this many users, the passes a draft block adds or replaces")
    args = common.parse(p, argv, tuple(decoders.MODEL_OF_MODE.values()))  # whose draft: AtSpeedS's unless --model
    mode = next((m for m, name in decoders.MODEL_OF_MODE.items() if name == args.model), "strict")
    args.modes, args.requests, args.temperature = [mode], args.train_users + args.eval_users, None
    args.warmup = 0  # nothing is timed
    return args


@torch.no_grad()
def layer_states(lm, ids, mask, upto: int, keep=()) -> tuple[torch.Tensor, dict]:
    """(`[B, upto + 1, D]` the hidden state at each left-padded prompt's last token after the embedding and
    after each of the first `upto` blocks; {m: `[B, Q, D]` every token's state after m blocks, m in `keep`}):
    the blocks of `fast_forward.lm_forward` (whole prompts, no cache), one at a time to keep every state."""
    decoder, _ = llama_parts(lm)
    fused = fused_blocks(decoder)
    h = decoder.embed_tokens(ids)
    cos, sin = decoder.rotary_emb(h, prompt_positions(mask))
    am = causal_prompt_mask(mask, h.dtype)
    out, full = [h[:, -1].float()], {0: h} if 0 in keep else {}
    for i in range(min(upto, len(decoder.layers))):
        h, _ = run_blocks(decoder, fused, range(i, i + 1), h, cos, sin, am, None)
        out.append(h[:, -1].float())
        if i + 1 in keep:
            full[i + 1] = h
    return torch.stack(out, 1), full


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


class BlockHead(torch.nn.Module):
    """A draft block over the target's states at every prompt token: a down-projection to `width`, the codes
    after the prompt (`prev`, drafted: the target has not seen them) by their own learned rows, a learned
    position counted from the end, one pre-norm transformer block (4 heads, MLP 4 x width), and the next
    code read at the last position."""

    def __init__(self, dim: int, codes: int, width: int, max_len: int = 1024):
        super().__init__()
        self.code = torch.nn.Embedding(codes, width)  # a drafted code's own row (the target has not seen it)
        self.down = torch.nn.Linear(dim, width)
        self.pos = torch.nn.Embedding(max_len, width)
        self.block = torch.nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, activation="gelu",
                                                      batch_first=True, norm_first=True)
        self.norm = torch.nn.LayerNorm(width)
        self.out = torch.nn.Linear(width, codes)

    def forward(self, x, mask, prev=None):  # [B, Q, D], [B, Q] left-padded, codes after the prompt [B, t] -> [B, C]
        h = self.down(x.float())  # [B, Q, W]
        if prev is not None:
            h, mask = torch.cat([h, self.code(prev)], 1), torch.cat([mask.bool(), torch.ones_like(prev, dtype=bool)], 1)
        Q = h.shape[1]
        h = h + self.pos(torch.arange(Q - 1, -1, -1, device=x.device))
        h = self.block(h, src_key_padding_mask=~mask.bool())
        return self.out(self.norm(h[:, -1]))


def kl(logits, target_lp, valid):
    """KL(p || q) over the valid codes (`[C]` or `[B, C]`), q = softmax(logits), mean over rows: WordKD's loss."""
    return wordkd_loss(logits, target_lp, valid.expand_as(target_lp))


def train_head(head, x, target_lp, valid, steps: int):
    """Full-batch AdamW on KL(p || q) over the valid 1st codes; returns the last loss."""
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=0.01)
    for _ in range(steps):
        loss = kl(head(x), target_lp, valid)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def train_block(head, batches, epochs: int, seed: int):
    """AdamW (cosine decay) on KL(p || q) over `batches` of (states, mask, target log-probs, valid codes,
    codes after the prompt or None), shuffled each epoch; returns the last epoch's mean loss."""
    steps = max(1, epochs * len(batches))
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g, losses = torch.Generator().manual_seed(seed), []
    for epoch in range(epochs):
        losses = []
        for i in torch.randperm(len(batches), generator=g).tolist():
            x, mask, lp, valid, prev = batches[i]
            loss = kl(head(x, mask, prev), lp, valid)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        print(f"\rblock: epoch {epoch + 1}/{epochs}, KL {sum(losses) / len(losses):.3f}", end="", file=sys.stderr)
    print(file=sys.stderr)
    return sum(losses) / max(len(losses), 1)


@torch.no_grad()
def block_logits(head, batches) -> torch.Tensor:
    return torch.cat([head(x, mask, prev) for x, mask, _, _, prev in batches]) if batches else torch.zeros(0)


def coverage(target_lp, draft_lp, pairs) -> dict:
    """{(K, N): share of rows whose target top-K codes all lie in the draft's top N}."""
    out = {}
    for k, n in pairs:
        top = target_lp.topk(k, -1).indices  # [B, K]
        mine = torch.zeros_like(draft_lp, dtype=torch.bool).scatter_(1, draft_lp.topk(n, -1).indices, True)
        out[k, n] = float(mine.gather(1, top).all(-1).float().mean())
    return out


def code_logprobs(model, vocab, trie, ids, mask, prev=None):
    """`[B, C]` the model's log-probs over the valid codes after the prompt and the codes `prev [B, t]` (none:
    the 1st code), by decoding's own prompt pass."""
    ids, mask, prefix = split_prefix([model], vocab, ids, mask)
    prev = ids.new_zeros(len(ids), 0) if prev is None else prev
    lp, _, _ = tree_forward(model, vocab, mask, prev.unsqueeze(1), DraftTree.empty(len(ids)), None if prefix is None
                            else prefix[0], ids)
    return masked_code_logprobs(lp, vocab, trie, trie.walk(prev).unsqueeze(1), prev.shape[1])[:, 0]


@torch.no_grad()
def target_states(lm, draft, vocab, trie, requests, upto: int, keep=(), second: bool = False):
    """(hidden states `[U, upto + 1, D]` at each prompt's last token; {m: [(every token's state after m
    layers `[B, Q, D]`, mask `[B, Q]`) per request batch]} for m in `keep`; per code probed (the 1st; with
    `second` the 2nd after the target's best 1st code): {"target", "draft": log-probs `[U, C]`, "valid": the
    codes the trie allows `[U, C]`, "prev": the codes before it `[U, t]` or None}) of the users of `requests`."""
    states, full, codes = [], {m: [] for m in keep}, [{"target": [], "draft": [], "valid": [], "prev": []}
                                                       for _ in range(1 + second)]
    for i, r in enumerate(requests):
        print(f"\rstates: batch {i + 1}/{len(requests)}", end="", file=sys.stderr)
        last, every = layer_states(lm, r.ids, r.mask, upto, keep)  # [B, upto + 1, D]
        states.append(last)
        for m in keep:
            full[m].append((every[m], r.mask))
        prev = None
        for c in codes:
            c["target"].append(code_logprobs(lm, vocab, trie, r.ids, r.mask, prev))
            c["draft"].append(code_logprobs(draft, vocab, trie, r.ids, r.mask, prev))
            c["valid"].append(c["target"][-1] > float("-inf"))
            c["prev"].append(prev)
            prev = c["target"][-1].argmax(-1, keepdim=True)  # [B, 1] the target's best 1st code
    print(file=sys.stderr)
    return torch.cat(states), full, [{k: None if v[0] is None else torch.cat(v) for k, v in c.items()} for c in codes]


def split_batches(full, code: dict, n: int) -> tuple[list, list]:
    """Request batches of (states, mask, target log-probs, valid codes, codes before or None) cut at user `n`:
    (the first n users', the rest)."""
    train, rest, start = [], [], 0
    for x, mask in full:
        B = len(x)
        rows = [code[k] if code[k] is None else code[k][start:start + B] for k in ("target", "valid", "prev")]
        cut = min(max(n - start, 0), B)
        if cut:
            train.append((x[:cut], mask[:cut], *[v if v is None else v[:cut] for v in rows]))
        if cut < B:
            rest.append((x[cut:], mask[cut:], *[v if v is None else v[cut:] for v in rows]))
        start += B
    return train, rest


@torch.no_grad()
def pass_times(args, s, test, width: int) -> list[list[str]]:
    """Rows (pass, median ms at batch 1 after 5 warm-up requests): the served draft's and the target's 1st-code
    prompt passes, the target's first m layers over the prompt (m in `--block_layers`) and a draft block."""
    t, draft = s.model.target, s.model.draft
    requests = common.sample_requests(test, t.prompt, args.time_requests, 1, s.config["seed"], s.config["device"])
    head = BlockHead(code_weight(t.lm, t.vocab).shape[1], t.vocab.codebook_size, width).eval()
    embed = llama_parts(t.lm)[0].embed_tokens
    states = {id(r.ids): embed(r.ids) for r in requests}  # [1, Q, D] token embeddings (any m costs the same)
    fns = {"served draft: 1st-code prompt pass": lambda ids, mask: code_logprobs(draft, t.vocab, t.trie, ids, mask),
           "target: 1st-code prompt pass": lambda ids, mask: code_logprobs(t.lm, t.vocab, t.trie, ids, mask),
           f"draft block ({width}) over the prompt's states": lambda ids, mask: head(states[id(ids)], mask)}
    for m in [m for m in args.block_layers if m]:
        fns[f"target: first {m} layers over the prompt"] = (
            lambda ids, mask, m=m: layer_states(t.lm, ids, mask, m, (m,)))
    res = common.interleaved(fns, requests, warmup=5)
    return [[name, f"{1000 * res[name][0]:.2f}"] for name in fns]


def block_rows(args, s, full, code: dict, n: int, dim: int) -> dict:
    """{row name: coverage on the users after n} of a draft block per m in `--block_layers`, for one code."""
    out = {}
    for m in args.block_layers if n else ():  # no users to train on: the passes are only timed
        torch.manual_seed(s.config["seed"])
        head = BlockHead(dim, code["target"].shape[1], args.block_width)
        train, rest = split_batches(full[m], code, n)
        loss = train_block(head, train, args.block_epochs, s.config["seed"])
        q = block_logits(head, rest).masked_fill(~code["valid"][n:], float("-inf"))
        source = "token embeddings" if m == 0 else f"states after {m} layers"
        key = f"draft block ({args.block_width}) over {source} (train KL {loss:.2f})"
        out[key] = coverage(code["target"][n:], q, args.pairs)
        print(f"{key}: {out[key]}", file=sys.stderr)
    return out


def probe(args) -> None:
    served, test = decoders.load(args)
    s = served[args.modes[0]]
    t, draft = s.model.target, s.model.draft
    vocab, trie, lm = t.vocab, t.trie, t.lm
    valid = trie.allowed(trie.root_nodes(1), 0)[0]  # [C] codes an ID may start with
    upto = max(args.layers + args.block_layers, default=0)
    states, full, codes = target_states(lm, draft, vocab, trie, decoders.requests(args, served, test, 32), upto,
                                        tuple(args.block_layers), args.second_code)
    target_lp, draft_lp = codes[0]["target"], codes[0]["draft"]
    C, (decoder, _) = vocab.codebook_size, llama_parts(lm)
    n = args.train_users
    rows = code_weight(lm, vocab)[:C].detach()
    size = f"{draft.config.num_hidden_layers} x {draft.config.hidden_size}"
    served_row = f"served draft ({size}, own prompt pass)"
    results = {served_row: coverage(target_lp[n:], draft_lp[n:], args.pairs)}
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
    results.update(block_rows(args, s, full, codes[0], n, rows.shape[1]))
    keys = args.pairs
    cols = ["draft"] + [f"top-{k} in top-{w}" for k, w in keys]
    lines = decoders.header(args, "Early-exit probe: the target's top-K 1st codes in a draft's top N", served,
                            [f"{n} users train the heads, {len(target_lp) - n} others measured; "
                             f"{len(decoder.layers)} target layers"])
    lines += common.table(cols, [[name] + [f"{r[key]:.2f}" for key in keys] for name, r in results.items()])
    if args.second_code:
        second = codes[1]
        results = {served_row: coverage(second["target"][n:], second["draft"][n:], args.pairs)}
        results.update(block_rows(args, s, full, second, n, rows.shape[1]))
        several = int((second["valid"][n:].sum(-1) > 1).sum())
        lines += ["", f"The 2nd code after the target's best 1st code: the target's top-K 2nd codes in a draft's top N "
                  f"(the same users; {several} of them have more than one 2nd code to choose from)."]
        lines += [""] + common.table(cols, [[name] + [f"{r[key]:.2f}" for key in keys] for name, r in results.items()])
    if args.time_requests:
        lines += ["", f"Batch 1, {args.time_requests} test users: median ms of a pass (the target's first layers by "
                  "this probe's plain loop over the whole prompt; the block's time does not depend on its weights)."]
        lines += [""] + common.table(["pass", "ms"], pass_times(args, s, test, args.block_width))
    common.write(lines, args.output)


def main(argv=None) -> int:
    return common.main(parse_args(argv), probe)


if __name__ == "__main__":
    sys.exit(main())
