"""AdamW with float32 master weights (`recbole_glue/optimizer.py`): torch's AdamW on float32 weights,
updates that bf16 alone would round away kept on bf16 weights, and a resume that keeps the masters."""

import copy

import pytest
import torch

from atspeed_rec.recbole_glue.optimizer import MasterWeightAdamW, has_low_precision


def weights(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(5, 3, generator=g) + 2).to(dtype)), torch.nn.Parameter(
        torch.randn(4, generator=g).to(dtype))]


def steps(params, opt, n, seed=1, start=0, drift=0.0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(start):
        [torch.randn(p.shape, generator=g) for p in params]
    for _ in range(n):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=g) + drift).bfloat16().to(p.dtype)  # bf16-exact for all
        opt.step()
        opt.zero_grad()


def test_on_float32_weights_it_updates_exactly_as_torch_adamw():
    ours, theirs = weights(torch.float32), weights(torch.float32)
    steps(ours, MasterWeightAdamW(ours, lr=0.01, weight_decay=0.1), 20)
    steps(theirs, torch.optim.AdamW(theirs, lr=0.01, weight_decay=0.1), 20)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_on_bf16_weights_it_keeps_the_small_updates_that_bf16_adamw_rounds_away():
    lr = 1e-4  # an update of ~1e-4 on weights near 2: bf16 steps there are 2 ** -6
    plain, ours = weights(torch.bfloat16), weights(torch.bfloat16)
    exact = [torch.nn.Parameter(p.detach().float()) for p in weights(torch.bfloat16)]  # the same start
    opt = MasterWeightAdamW(ours, lr=lr, weight_decay=0.0)
    steps(plain, torch.optim.AdamW(plain, lr=lr, weight_decay=0.0), 300, drift=2.0)
    steps(ours, opt, 300, drift=2.0)
    steps(exact, torch.optim.AdamW(exact, lr=lr, weight_decay=0.0), 300, drift=2.0)
    start = weights(torch.bfloat16)[0]
    moved_exact = (exact[0] - start.float()).abs().mean()
    assert moved_exact > 0.02  # 300 steps of ~1e-4 the same way
    assert torch.equal(plain[0], start)  # bf16 AdamW: every update rounded away
    master = opt.state[ours[0]]["master"]
    assert master.dtype == torch.float32
    torch.testing.assert_close(master, exact[0], rtol=0, atol=1e-3)  # the masters follow float32 AdamW
    assert torch.equal(ours[0], master.to(torch.bfloat16))  # the weight is its master, rounded


def test_a_resumed_optimizer_goes_on_from_its_float32_masters_and_moments():
    a = weights(torch.bfloat16)
    opt_a = MasterWeightAdamW(a, lr=1e-3)
    steps(a, opt_a, 10)
    saved = copy.deepcopy(opt_a.state_dict())  # as read back from a file: no tensor shared with opt_a
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_b = MasterWeightAdamW(b, lr=1e-3)
    opt_b.load_state_dict(saved)
    assert all(v.dtype == torch.float32 for k, v in opt_b.state[b[0]].items() if k != "step")
    steps(a, opt_a, 5, start=10)
    steps(b, opt_b, 5, start=10)
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        assert torch.equal(opt_a.state[p]["master"], opt_b.state[q]["master"])


def test_a_state_saved_by_float32_adamw_resumes_on_bf16_weights_with_masters_from_them():
    f32 = weights(torch.float32)  # a run begun with float32 weights (adapters before they took the backbone's dtype)
    opt_f32 = torch.optim.AdamW(f32, lr=1e-4, weight_decay=0.0)
    steps(f32, opt_f32, 3)
    b = [torch.nn.Parameter(p.detach().bfloat16()) for p in f32]
    opt_b = MasterWeightAdamW(b, lr=1e-4, weight_decay=0.0)
    opt_b.load_state_dict(copy.deepcopy(opt_f32.state_dict()))
    start = b[0].detach().clone()
    steps(b, opt_b, 300, start=3, drift=2.0)
    assert opt_b.state[b[0]]["master"].dtype == torch.float32
    assert not torch.equal(b[0], start)  # updates of ~1e-4 on weights near 2 land through the master


@pytest.mark.parametrize("dtype, low", [(torch.float32, False), (torch.bfloat16, True)])
def test_low_precision_is_found_among_trainable_weights_only(dtype, low):
    frozen = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16), requires_grad=False)
    assert has_low_precision([frozen, *weights(dtype)]) is low
