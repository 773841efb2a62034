"""AdamW for bfloat16 weights: the update runs on a float32 master copy, the weight gets it rounded.

Training a pretrained LM whose weights are bfloat16 (on AMX / AVX512-BF16 CPUs and CUDA), its LoRA adapters
(which take the backbone's dtype) or every weight (`lora_r: 0`): an
update of lr * m / sqrt(v) ~ 1e-4 * |w| is below bf16's resolution (8 bits of mantissa: steps of
|w| / 128), so plain AdamW on bf16 weights rounds most updates away. Here each bf16 weight keeps a
float32 master in the optimizer's state (`master`, beside AdamW's moments, all float32): the step
updates the master, then copies it into the weight. The forward and backward stay in bf16, the
weights' own dtype. Float32 weights are updated in
place exactly as `torch.optim.AdamW` updates them (a test). The masters are in `state_dict`, so a
resumed run goes on from them, not from their rounded copies.
"""

from __future__ import annotations

import math

import torch


class MasterWeightAdamW(torch.optim.AdamW):
    """`torch.optim.AdamW` (decoupled weight decay, bias-corrected moments) with float32 moments and,
    for low-precision weights, a float32 master weight per parameter."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, eps, (b1, b2) = group["lr"], group["weight_decay"], group["eps"], group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                if p.dtype != torch.float32 and "master" not in state:  # also a state resumed from float32 weights
                    state["master"] = p.detach().float()
                w = state.get("master", p)  # the float32 weight the update runs on
                g = p.grad.float()
                state["step"] += 1
                t = float(state["step"])
                w.mul_(1 - lr * wd)  # decoupled weight decay
                state["exp_avg"].lerp_(g, 1 - b1)  # m = b1 m + (1 - b1) g
                state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)  # v = b2 v + (1 - b2) g^2
                denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - b2 ** t)).add_(eps)
                w.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - b1 ** t))  # w -= lr m_hat / (sqrt(v_hat) + eps)
                if w is not p:
                    p.copy_(w)  # rounded to the weight's dtype
        return loss

    def load_state_dict(self, state_dict):
        """torch casts a loaded state's tensors to their parameter's dtype: the moments and masters of
        bf16 weights are put back in float32."""
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict["state"].items():
            state = self.state[params[int(index)]]
            for key, value in saved.items():
                if key != "step" and torch.is_tensor(value) and value.is_floating_point():
                    state[key] = value.to(device=state[key].device, dtype=torch.float32).clone()


def has_low_precision(params) -> bool:
    """True when some trainable parameter (of `params`: tensors or parameter groups) is not float32 (the LoRA
    adapters of a bf16 backbone, or the backbone itself fully fine-tuned)."""
    tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]  # tensors or groups
    return any(t.requires_grad and t.dtype != torch.float32 for t in tensors)
