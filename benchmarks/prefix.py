"""Whole prompts against a prompt prefix encoded once per model (`models/prefix_cache.py`).

For the sampled test users at batch 1, the target-only beam search and strict speculative decoding
(AtSpeedS's draft, the tree of `--trees` or the config's) at each K (`--ks`), each run twice: feeding
every prompt whole, and feeding it after the KV of its text prefix (the same for every request,
computed once), all four interleaved per request (median ms after `--warmup` requests). Also counts
the requests whose top-K items and order are the same both ways (in bf16 the prefix's keys, computed
in a pass of their own, can round differently: near-tied beams may swap, as between batch sizes).
A target without a text prompt (`pretrained_path` unset) has no prefix: both columns then time the same.

    python benchmarks/prefix.py --dataset=amazon-beauty --data_path=DIR

prints the table (`--output` also writes it).
"""

from __future__ import annotations

import sys

import torch

import common
import decoders
from atspeed_rec.models.prefix_cache import registered_prefix, whole_prompts


def parse_args(argv=None):
    return decoders.switch_args(__file__, __doc__, argv)


@torch.no_grad()
def benchmark(args) -> None:
    served, test = decoders.load(args)
    requests = decoders.requests(args, served, test, 1)
    names = ("whole prompt", "cached prefix")
    rows = decoders.compare_switch(args, served["strict"], requests, whole_prompts, names)
    target = served["strict"].model.target
    tokens = sum(int(r.mask.sum()) for r in requests) / len(requests)
    decoders.switch_report(args, "Whole prompts against a cached prompt prefix", served, requests, rows, names,
                           [f"prompt prefix: {len(registered_prefix(target.lm))} tokens; prompts: {tokens:.1f} tokens "
                            "on average"])


def main(argv=None) -> int:
    return common.main(parse_args(argv), benchmark)


if __name__ == "__main__":
    sys.exit(main())
