"""Triton GAE: one program per row scans the response backwards (see ``kernels/gae.py``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gae_kernel(REW, VAL, MASK, ADV, RET, T, gamma, gamma_lam):
    row = tl.program_id(0).to(tl.int64)
    base = row * T  # inputs are made contiguous [B, T] by the wrapper
    next_v = tl.zeros((), tl.float32)
    next_a = tl.zeros((), tl.float32)
    for i in range(0, T):
        t = T - 1 - i
        keep = tl.load(MASK + base + t) != 0
        # where, not multiply: padding may hold garbage (even nan)
        v = tl.where(keep, tl.load(VAL + base + t).to(tl.float32), 0.0)
        r = tl.where(keep, tl.load(REW + base + t).to(tl.float32), 0.0)
        a = tl.where(keep, r + gamma * next_v - v + gamma_lam * next_a, 0.0)
        tl.store(ADV + base + t, a)
        tl.store(RET + base + t, a + v)
        next_v = v
        next_a = a


def gae(rewards, values, mask, gamma: float, lam: float):
    for name, t in (("rewards", rewards), ("values", values)):
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"kernels.gae (triton backend): {name} dtype {t.dtype} not supported; "
                            "use float32/bfloat16/float16 or KERNELS_BACKEND=torch")
    B, T = rewards.shape
    rew, val = rewards.detach().contiguous(), values.detach().contiguous()
    msk = (mask != 0).to(torch.uint8).contiguous()
    adv = torch.empty(B, T, dtype=torch.float32, device=rewards.device)
    ret = torch.empty_like(adv)
    if B and T:
        _gae_kernel[(B,)](rew, val, msk, adv, ret, T, gamma, gamma * lam)
    return adv, ret
