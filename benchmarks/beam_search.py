"""Benchmark GenRec's beam search: ours (KV cache, prompt once, trie gather) vs HF `generate`.

Real requests: the test users' histories of a dataset, through the GenRec model built by the
project's properties. Latency is per request at batch 1; throughput at a larger batch. Both
searches run on the same requests, interleaved, after warm-up; medians are reported, and every
request's top-K items are compared between the two.

    python benchmarks/beam_search.py --dataset=amazon-beauty --data_path=../shared/datasets

Weights: the trained GenRec checkpoint for this dataset and configuration when it exists
(saved/GenRec-<dataset>-<config hash>.safetensors), else random weights (the cost of a forward
pass does not depend on the weights; the run says which).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from recbole.data import create_dataset, data_preparation

import atspeed_rec  # noqa: F401  (RecBole compatibility patches)
from atspeed_rec.decoding.beam_search import beam_search
from atspeed_rec.decoding.hf_generate import hf_beam_search
from atspeed_rec.recbole_glue.genrec import GenRec
from atspeed_rec.recbole_glue.checkpoint import checkpoint_path, load_checkpoint
from atspeed_rec.recbole_glue.runner import build_config


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def load_model(args):
    config = build_config("GenRec", args.dataset, None, {"data_path": args.data_path, "show_progress": False})
    train, _, test = data_preparation(config, create_dataset(config))
    model = GenRec(config, train._dataset).eval()
    ckpt = checkpoint_path(config, "GenRec", GenRec.checkpoint_keys)
    if ckpt.is_file():
        load_checkpoint(model, ckpt)
        weights = f"trained ({ckpt})"
    else:
        weights = "random (no trained checkpoint for this configuration)"
    return model, test, weights


def requests(model, test, n: int, batch: int):
    """Prompts of the first `n` test users, `batch` at a time: [(input_ids, mask), ...]."""
    out, seen = [], 0
    for interaction, *_ in test:
        ids, mask = model.prompt(interaction)
        for start in range(0, ids.shape[0], batch):
            piece = ids[start:start + batch], mask[start:start + batch]
            if piece[0].shape[0] < batch or seen >= n:
                continue
            out.append(piece)
            seen += batch
        if seen >= n:
            break
    return out


def compare(model, prompts, k: int, warmup: int):
    """Median seconds per batch for ours and generate, and how many batches agree exactly."""
    ours_t, hf_t, same = [], [], 0
    for i, (ids, mask) in enumerate(prompts):
        ours, t_ours = timed(lambda: beam_search(model.lm, model.trie, model.vocab, ids, mask, k))
        hf, t_hf = timed(lambda: hf_beam_search(model.lm, model.trie, model.vocab, ids, mask, k))
        same += bool(torch.equal(ours.items, hf.items))
        if i >= warmup:
            ours_t.append(t_ours)
            hf_t.append(t_hf)
    return statistics.median(ours_t), statistics.median(hf_t), same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="amazon-beauty")
    parser.add_argument("--data_path", default=str(Path(__file__).resolve().parents[2] / "shared" / "datasets"))
    parser.add_argument("--k", type=int, default=10, help="beams = items returned")
    parser.add_argument("--requests", type=int, default=100, help="batch-1 requests timed")
    parser.add_argument("--batch", type=int, default=64, help="batch size of the throughput run")
    parser.add_argument("--batches", type=int, default=5, help="batches in the throughput run")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, test, weights = load_model(args)
    n_params = sum(p.numel() for p in model.lm.parameters())
    print(f"GenRec on {args.dataset}: {n_params / 1e6:.2f} M parameters, weights {weights}, "
          f"K = {args.k}, {args.threads} threads")
    with torch.no_grad():
        single = requests(model, test, args.requests + args.warmup, 1)
        ours1, hf1, same1 = compare(model, single, args.k, args.warmup)
        batched = requests(model, test, args.batch * (args.batches + 1), args.batch)
        ours_b, hf_b, same_b = compare(model, batched, args.k, 1)
    rows = [
        ("latency, batch 1 (ms / request)", 1000 * ours1, 1000 * hf1, hf1 / ours1, f"{same1}/{len(single)}"),
        (f"throughput, batch {args.batch} (requests / s)", args.batch / ours_b, args.batch / hf_b,
         hf_b / ours_b, f"{same_b}/{len(batched)}"),
    ]
    print("\n| measure | ours | HF generate | ours faster by | identical top-K |")
    print("|---|---|---|---|---|")
    for name, ours, hf, ratio, same in rows:
        print(f"| {name} | {ours:.1f} | {hf:.1f} | {ratio:.2f}x | {same} |")


if __name__ == "__main__":
    main()
