"""Decoding through each block's modules against fused inference weights (`models/fused.py`).

For the sampled test users at batch 1, the target-only beam search and strict speculative decoding
(AtSpeedS's draft, the tree of `--trees` or the config's) at each K (`--ks`), each run twice: with
the target's and the draft's blocks calling their modules (q, k, v, o, gate, up, down and the LoRA
adapters one by one) and with their fused weights (LoRA merged, q/k/v and gate/up concatenated,
prepacked for oneDNN), all four interleaved per request (median ms after `--warmup` requests). Also
counts the requests whose top-K items and order are the same both ways (merging rounds the weights
to the backbone's dtype once: in bf16 near-tied beams may swap, as they do between batch sizes).

    python benchmarks/fused.py --dataset=amazon-beauty --data_path=DIR

prints the table (`--output` also writes it).
"""

from __future__ import annotations

import sys

import torch

import common
import decoders
from atspeed_rec.models.fast_forward import llama_parts
from atspeed_rec.models.fused import modules_only


def parse_args(argv=None):
    return decoders.switch_args(__file__, __doc__, argv)


@torch.no_grad()
def benchmark(args) -> None:
    served, test = decoders.load(args)
    requests = decoders.requests(args, served, test, 1)
    names = ("modules", "fused")
    rows = decoders.compare_switch(args, served["strict"], requests, lambda lm: modules_only(llama_parts(lm)[0]), names)
    decoders.switch_report(args, "Each block's modules against fused inference weights", served, requests, rows, names)


def main(argv=None) -> int:
    return common.main(parse_args(argv), benchmark)


if __name__ == "__main__":
    sys.exit(main())
