"""A training batch's loss and gradients with its windows packed in shared rows, and with each window alone."""

import torch

from atspeed_rec.recbole_glue import genrec


def one_window_a_row(lengths, capacity):
    return torch.arange(len(lengths)), torch.zeros_like(lengths)


def packed_and_alone(model, batch, monkeypatch):
    """(loss, gradients) of a training batch with its windows packed in shared rows, then each in its own row."""
    results, rows = [], []
    real_pack = genrec.pack

    def spy(lengths, capacity):
        row, start = real_pack(lengths, capacity)
        rows.append((int(row.max()) + 1, len(lengths)))
        return row, start

    for packer in (spy, one_window_a_row):
        monkeypatch.setattr(genrec, "pack", packer)
        model.zero_grad()
        loss = model.calculate_loss(batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    shared_rows, windows = rows[0]
    assert shared_rows < windows  # some rows did hold several windows
    return results
