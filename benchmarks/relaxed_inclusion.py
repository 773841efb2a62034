"""Which codes one relaxed verification level keeps, against the beam sampling it approximates.

One level, one current beam, no model: a seeded target distribution p over `--codes` codes and a
draft q = softmax(log p + `--noise` x N(0, 1)) (a fair draft: close to p, not equal). Over `--draws`
rounds, beam sampling keeps K codes drawn without replacement from p (Gumbel top-K), and relaxed
verification (`relaxed_draw`, the decoder's own function) keeps K from N codes drawn without
replacement from q. The report gives, for the target's most likely codes, p, q and each side's
chance of keeping the code; each side keeps K codes a round, so each column sums to K.

    python benchmarks/relaxed_inclusion.py

writes docs/relaxed_inclusion.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import common
from atspeed_rec.decoding.sampling import gumbel_top_k
from atspeed_rec.decoding.speculative import relaxed_draw


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
    p.add_argument("--output", type=Path, default=Path("docs/relaxed_inclusion.md"))
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
    drafted, _ = gumbel_top_k(logq.expand(R, C), args.n, g)  # [R, N] without replacement from q
    tree_level = (torch.zeros(R, args.n, dtype=torch.long), drafted, torch.ones(R, args.n, dtype=torch.bool),
                  logq.expand(R, 1, C).clone())  # one current beam: parent 0 for every node
    pairs, valid, _, go_on = relaxed_draw(logp.expand(R, C).clone(), tree_level, torch.zeros(R, 1, dtype=torch.long),
                                          torch.ones(R, 1, dtype=torch.bool), args.k, g)
    return {"p": logp.exp(), "q": logq.exp(),
            "beam": kept_counts(beam, torch.ones_like(beam, dtype=torch.bool), C) / R,
            "relaxed": kept_counts(pairs, valid, C) / R, "go_on": float(go_on.float().mean())}


def report(args, r: dict, argv: list[str]) -> list[str]:
    order = r["p"].argsort(descending=True)[:args.rows]
    rows = [[i + 1, f"{r['p'][c]:.3f}", f"{r['q'][c]:.3f}", f"{r['beam'][c]:.3f}", f"{r['relaxed'][c]:.3f}"]
            for i, c in enumerate(order.tolist())]
    mass = lambda kept: float((kept * r["p"]).sum())  # noqa: E731  expected p-mass of the kept codes
    return ["# Relaxed verification vs beam sampling: which codes one level keeps", "",
            " ".join(["    python benchmarks/relaxed_inclusion.py", *argv]), "",
            f"K {args.k}, N {args.n}, C {args.codes}, target logits std {args.spread}, draft error std "
            f"{args.noise}, {args.draws} rounds, seed {args.seed}. Relaxed rounds that go on to the next level: "
            f"{r['go_on']:.2f}. Expected p-mass of the kept codes: beam sampling {mass(r['beam']):.3f}, "
            f"relaxed {mass(r['relaxed']):.3f}.", "",
            *common.table(["rank under p", "p", "q", "P(kept), beam sampling", "P(kept), relaxed verification"],
                          rows)]


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    common.write(report(args, simulate(args), argv), args.output)


if __name__ == "__main__":
    main()
