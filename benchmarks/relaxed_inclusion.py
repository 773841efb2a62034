"""Which codes one relaxed verification level keeps, against the beam sampling it stands for.

One level, one current beam, no model: a seeded target distribution p over `--codes` codes and a
draft q = softmax(log p + `--noise` x N(0, 1)) (a fair draft: close to p, not equal). Over `--draws`
rounds the draft draws N codes without replacement from q (Gumbel top-N), and each relaxed rule of
the decoder (`RELAXED_RULES`: "coupled", the default, and the paper's "ratio") keeps K codes and
says whether the round goes on; beam sampling keeps K codes drawn without replacement from p. The
report gives, for the target's most likely codes, p, q and each side's chance of keeping the code
(each column sums to K), and how often each rule lets the round go on.

    python benchmarks/relaxed_inclusion.py

writes docs/results/relaxed_inclusion.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import common
from atspeed_rec.decoding.sampling import gumbel, gumbel_top_k
from atspeed_rec.decoding.speculative import RELAXED_RULES
from atspeed_rec.decoding.tree import DraftLevel


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, default=10, help="codes kept a level (beam width K)")
    p.add_argument("--n", type=int, default=20, help="codes drafted a level (draft width N)")
    p.add_argument("--codes", type=int, default=256, help="codebook size C")
    p.add_argument("--spread", type=float, default=2.5, help="std of the target's logits (higher: more peaked)")
    p.add_argument("--noise", type=float, default=0.7, help="std of the draft's error on the log-probs")
    p.add_argument("--draws", type=int, default=4000, help="rounds simulated")
    p.add_argument("--rows", type=int, default=15, help="most likely codes reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=Path("docs/results/relaxed_inclusion.md"))
    return p.parse_args(argv)


def kept_counts(picks: torch.Tensor, valid: torch.Tensor, codes: int) -> torch.Tensor:
    """How often each code is among the kept ones: picks, valid `[R, K]` -> `[C]`."""
    return torch.zeros(codes).index_add_(0, picks[valid], torch.ones(int(valid.sum())))


def simulate(args) -> dict:
    g = torch.Generator().manual_seed(args.seed)
    C, R = args.codes, args.draws
    logp = torch.log_softmax(torch.randn(C, generator=g) * args.spread, -1)  # target p [C]
    logq = torch.log_softmax(logp + torch.randn(C, generator=g) * args.noise, -1)  # draft q [C]
    beam, _ = gumbel_top_k(logp.expand(R, C), args.k, g)  # [R, K] without replacement from p
    noise = gumbel((R, 1, C), g)  # the draft's draw: top N of log q + noise
    drafted, _ = gumbel_top_k(logq.expand(R, C), args.n, g, noise.flatten(1))  # [R, N]
    level = DraftLevel(torch.zeros(R, args.n, dtype=torch.long), drafted, torch.ones(R, args.n, dtype=torch.bool),
                       logq.expand(R, 1, C).clone(), noise)  # one current beam: parent 0 for every node
    out = {"p": logp.exp(), "q": logq.exp(), "beam sampling": kept_counts(beam, torch.ones_like(beam, dtype=torch.bool),
                                                                         C) / R}
    go_on = {}
    for name, rule in RELAXED_RULES.items():  # code log-probs [R, 1, C] after the one beam, its score 0
        _, code, score, _, held = rule(logp.expand(R, 1, C), torch.zeros(R, 1), torch.zeros(R, 1, dtype=torch.long),
                                       level, args.k, g)
        out[name] = kept_counts(code, score > float("-inf"), C) / R
        go_on[name] = float(held.all(-1).float().mean())
    return {**out, "go_on": go_on}


def report(args, r: dict, argv: list[str]) -> list[str]:
    sides = ["beam sampling", *RELAXED_RULES]
    order = r["p"].argsort(descending=True)[:args.rows]
    rows = [[i + 1, f"{r['p'][c]:.3f}", f"{r['q'][c]:.3f}", *(f"{r[side][c]:.3f}" for side in sides)]
            for i, c in enumerate(order.tolist())]
    mass = lambda kept: float((kept * r["p"]).sum())  # noqa: E731  expected p-mass of the kept codes
    return ["# Relaxed verification vs beam sampling: which codes one level keeps", "",
            " ".join(["    python benchmarks/relaxed_inclusion.py", *argv]), "",
            f"K {args.k}, N {args.n}, C {args.codes}, target logits std {args.spread}, draft error std "
            f"{args.noise}, {args.draws} rounds, seed {args.seed}.", "",
            *common.table(["side", "rounds that go on", "expected p-mass kept"],
                          [[side, "-" if side not in r["go_on"] else f"{r['go_on'][side]:.2f}",
                            f"{mass(r[side]):.3f}"] for side in sides]), "",
            *common.table(["rank under p", "p", "q", *(f"P(kept), {side}" for side in sides)], rows)]


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    common.write(report(args, simulate(args), argv), args.output)


if __name__ == "__main__":
    main()
