"""float32 linears on CPU through oneDNN instead of the BLAS behind ``F.linear``.

PyTorch's CPU builds run a float32 ``F.linear`` / ``matmul`` on MKL's sgemm, and bf16 ones on
oneDNN. On the CPUs measured, oneDNN's float32 kernels are faster for the
forward (``x @ W.T``, most for a wide LM head) and the input gradient (``grad_y @ W``) of a training
step's shapes, and not for the weight gradient (which stays on torch.mm); numbers in
docs/benchmarks.md. So ``linear`` below runs the forward and the input gradient of a float32 CPU linear through
``torch.ops.mkldnn._linear_pointwise`` (oneDNN's inner-product primitive on the plain, unpacked
weight: no packed copy is kept, so weights updated by the optimizer are always seen). The
numbers are float32 throughout (no down-conversion), equal to ``F.linear`` up to summation order
(relative 1e-6). Anything else (other dtypes, autocast, GPUs, builds without oneDNN) is plain
``F.linear``, so the patch is safe to leave on everywhere.

``use_onednn_linears(model)`` gives every plain ``nn.Linear`` of a model this forward (the
recipe switch is ``cpu.onednn_linear``); ``lean``'s fused MLP calls ``linear`` and
``input_grad`` directly when its projections are routed here (``is_routed``).
"""
from __future__ import annotations

import types
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def _available() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available() and callable(torch.ops.mkldnn._linear_pointwise))
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False


AVAILABLE = _available()


def _eligible(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """float32 CPU operands, outside autocast (which would run the matmul in half precision anyway)."""
    return (AVAILABLE and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.device.type == "cpu" and weight.device.type == "cpu" and not torch.is_autocast_enabled("cpu"))


def _inner_product(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [..., in] @ weight.T [in, out] (+ bias) by oneDNN; weight may be a strided view."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _Fp32Linear(torch.autograd.Function):
    """y = x @ W.T + b with the forward and dL/dx on oneDNN and dL/dW on torch.mm (see module doc)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _inner_product(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = _inner_product(grad_out, weight.t(), None) if need_x else None
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_w = g2.t() @ x.reshape(-1, x.shape[-1]) if need_w else None
        grad_b = g2.sum(0) if need_b and ctx.has_bias else None
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: x [..., in], weight [out, in], bias [out] -> [..., out];
    oneDNN for float32 CPU operands (differentiable), ``F.linear`` otherwise."""
    if _eligible(x, weight) and (bias is None or bias.dtype == torch.float32):
        return _Fp32Linear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def input_grad(grad_out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``grad_out @ weight`` (dL/dx of y = x @ W.T): grad_out [..., out], weight [out, in] -> [..., in].
    For use inside a backward (no graph is recorded)."""
    if _eligible(grad_out, weight):
        return _inner_product(grad_out, weight.t(), None)
    return torch.matmul(grad_out, weight)


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self.weight, self.bias)


def is_routed(module: nn.Module) -> bool:
    """True if `module` (an nn.Linear) was given this module's forward by ``use_onednn_linears``."""
    forward = vars(module).get("forward")
    return getattr(forward, "__func__", None) is _forward


def use_onednn_linears(model: nn.Module) -> int:
    """Route every plain ``nn.Linear`` of `model` (exact type; LoRA's inner linears included) through
    ``linear``; returns how many. ZeRO-3 partitioned layers keep DeepSpeed's own linear."""
    if not AVAILABLE:
        return 0
    n = 0
    for module in model.modules():
        if type(module) is nn.Linear and not hasattr(module.weight, "ds_id"):
            module.forward = types.MethodType(_forward, module)
            n += 1
    return n
