"""GenRec's beam search: ours (KV cache, prompt once, trie gather) vs Hugging Face `generate`.

Real requests: sampled test users' histories, through the GenRec model (the small from-scratch
target or a pretrained LLM, whichever the properties name) with its trained checkpoint. Latency is
per request at batch 1 (`--requests` users), throughput at `--batch` (`--batches` timed batches
after one warm-up batch). Both searches run on the same requests, interleaved, after warm-up;
medians are reported, and every request batch's top-K items are compared between the two.

    python benchmarks/beam_search.py --dataset=amazon-beauty --data_path=DIR

prints the table (`--output` also writes it). `--allow_untrained` times random weights when no
checkpoint exists (the cost of a forward pass does not depend on the weights; the output says so).
"""

from __future__ import annotations

import sys

import torch

import common
from atspeed_rec.decoding.beam_search import beam_search
from atspeed_rec.decoding.hf_generate import hf_beam_search


def parse_args(argv=None):
    p = common.parser(__file__, __doc__, requests=100)
    p.add_argument("--k", type=int, default=10, help="beams = items returned")
    p.add_argument("--batch", type=int, default=64, help="batch size of the throughput run")
    p.add_argument("--batches", type=int, default=5, help="timed batches in the throughput run")
    return common.parse(p, argv, ("GenRec",))


def compare(model, requests, k: int, warmup: int):
    """Median seconds per batch for ours and generate, and how many batches agree exactly."""
    fns = {"ours": lambda ids, mask: beam_search(model.lm, model.trie, model.vocab, ids, mask, k),
           "hf": lambda ids, mask: hf_beam_search(model.lm, model.trie, model.vocab, ids, mask, k)}
    res = common.interleaved(fns, requests, warmup)
    same = sum(bool(torch.equal(a.items, b.items)) for a, b in zip(res["ours"][1], res["hf"][1]))
    return res["ours"][0], res["hf"][0], same


def benchmark(args) -> None:
    name, config, path = common.find_checkpoint(args, ("GenRec",))
    _, train, _, test = common.load_data(config)
    model = common.instantiate(name, config, train, path)

    def sample(n, batch):
        return common.sample_requests(test, model.prompt, n, batch, config["seed"], config["device"])

    single = sample(args.requests, 1)
    ours1, hf1, same1 = compare(model, single, args.k, args.warmup)
    batched = sample(args.batch * (args.batches + 1), args.batch)
    ours_b, hf_b, same_b = compare(model, batched, args.k, 1)
    lines = common.header(args, "GenRec beam search: ours vs HF generate", config, [
        f"GenRec: {common.n_params(model.lm) / 1e6:.2f} M parameters ({next(model.lm.parameters()).dtype}), "
        f"weights {common.weights_label(path)}, K = {args.k}"])
    lines += common.table(["measure", "ours", "HF generate", "ours faster by", "identical top-K"], [
        ["latency, batch 1 (ms / request)", f"{1000 * ours1:.1f}", f"{1000 * hf1:.1f}", f"{hf1 / ours1:.2f}x",
         f"{same1}/{len(single)}"],
        [f"throughput, batch {batched[0].users} (requests / s)", f"{batched[0].users / ours_b:.1f}",
         f"{batched[0].users / hf_b:.1f}", f"{hf_b / ours_b:.2f}x", f"{same_b}/{len(batched)} batches"]])
    common.write(lines, args.output)


def main(argv=None) -> int:
    return common.main(parse_args(argv), benchmark)


if __name__ == "__main__":
    sys.exit(main())
