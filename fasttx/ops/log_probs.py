"""linear_log_probs: per-token log-probabilities (and entropy) of linear(input, weight, bias) /
temperature without the (N, V) logits, on both paths, through the linear cross-entropy machinery
(fasttx/ops/cross_entropy.py, kernels/cross_entropy/): log p_y = -cross_entropy of the scaled
logits (no class weights, no smoothing), the entropy an extra per-row accumulator of the same row
pass. Both outputs are differentiable for any upstream gradient on either.

  - Triton: custom ops over fasttx.kernels.cross_entropy
        fasttx::linear_log_probs(x, w, b, target, ignore_index, temperature, entropy) -> (logp, ent)
        fasttx::linear_log_probs_backward(grad_logp, grad_ent, x, w, b, target, ...) -> (dx, dw, db)
    (`ent` is an empty tensor when entropy is False: a custom op cannot return None)
  - torch: `_TorchLinearLogProbs`, the chunked torch loop of linear_cross_entropy with the same
    per-chunk options (`_torch_loop_forward/_backward`).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fasttx._registry import autocast_lower, contract
from fasttx.distributed import opt, placements, sharding_rule

from . import cross_entropy as ce
from ._common import acc_dtype


def check(input, weight, target, bias, temperature, ignore_index) -> None:
    """Shapes, dtypes, devices, temperature and the target range, with torch's exception types."""
    for name, t in (("input", input), ("weight", weight), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"linear_log_probs(): argument '{name}' must be Tensor, not {type(t).__name__}")
    if not input.is_floating_point():
        raise RuntimeError(f"linear_log_probs: expected a floating point input, got {input.dtype}")
    if input.dim() < 1:
        raise RuntimeError("linear_log_probs: expected input of shape (*, H), got a 0-dim tensor")
    if weight.dim() != 2:
        raise RuntimeError(f"linear_log_probs: expected weight of shape (V, H), got {tuple(weight.shape)}")
    if input.shape[-1] != weight.shape[1]:
        raise RuntimeError(
            f"linear_log_probs: input's last dim ({input.shape[-1]}) must equal weight's second dim "
            f"({weight.shape[1]})"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise RuntimeError(f"linear_log_probs: expected bias of shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if input.dtype != weight.dtype or (bias is not None and bias.dtype != input.dtype):
        raise RuntimeError(
            f"linear_log_probs: input, weight and bias must have the same dtype, got {input.dtype}, "
            f"{weight.dtype} and {None if bias is None else bias.dtype}"
        )
    if target.is_floating_point() or target.dtype == torch.bool or target.is_complex():
        raise RuntimeError(f"linear_log_probs: expected target of an integer dtype, got {target.dtype}")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise RuntimeError(
            f"linear_log_probs: expected target of shape {tuple(input.shape[:-1])} (input's without its "
            f"last dim), got {tuple(target.shape)}"
        )
    for name, t in (("weight", weight), ("bias", bias), ("target", target)):
        if t is not None and t.device != input.device:
            raise RuntimeError(
                f"linear_log_probs: expected {name} on the input's device {input.device}, got {t.device}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
        raise ValueError(f"linear_log_probs: temperature must be a number > 0, got {temperature!r}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"linear_log_probs(): argument 'ignore_index' must be int, not {type(ignore_index).__name__}")
    if not torch.compiler.is_compiling() and target.numel():
        V = weight.shape[0]
        bad = (target != ignore_index) & ((target < 0) | (target >= V))
        if bool(bad.any()):
            raise IndexError(f"Target {int(target[bad].reshape(-1)[0])} is out of bounds.")


# ----------------------------------------------------------------------------------------------
# Triton path: custom ops
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fasttx::linear_log_probs", mutates_args=())
def _llp(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor, ignore_index: int, temperature: float,
         entropy: bool) -> Tuple[Tensor, Tensor]:
    logp, ent = ce._kernels().linear_log_probs_forward(x, w, b, target, ignore_index, temperature, entropy)
    return logp, ent if ent is not None else x.new_empty(0, dtype=torch.float32)


@_llp.register_fake
def _(x, w, b, target, ignore_index, temperature, entropy):
    M = x.shape[0]
    return x.new_empty(M, dtype=torch.float32), x.new_empty(M if entropy else 0, dtype=torch.float32)


@torch.library.custom_op("fasttx::linear_log_probs_backward", mutates_args=())
def _llp_backward(grad_logp: Tensor, grad_ent: Optional[Tensor], x: Tensor, w: Tensor, b: Optional[Tensor],
                  target: Tensor, ignore_index: int, temperature: float,
                  entropy: bool) -> Tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = ce._kernels().linear_log_probs_backward(grad_logp, grad_ent, x, w, b, target, ignore_index,
                                                         temperature, entropy)
    return dx, dw, db if db is not None else x.new_empty(0)


@_llp_backward.register_fake
def _(grad_logp, grad_ent, x, w, b, target, ignore_index, temperature, entropy):
    return x.new_empty(x.shape), w.new_empty(w.shape), (b.new_empty(b.shape) if b is not None else x.new_empty(0))


def _llp_setup(ctx, inputs, output):
    x, w, b, target, ignore_index, temperature, entropy = inputs
    ctx.save_for_backward(x, w, b, target)
    ctx.options = (ignore_index, temperature, entropy)


def _llp_bwd(ctx, grad_logp, grad_ent):
    x, w, b, target = ctx.saved_tensors
    entropy = ctx.options[2]
    dx, dw, db = _llp_backward(grad_logp, grad_ent if entropy else None, x, w, b, target, *ctx.options)
    return dx, dw, (db if b is not None else None), None, None, None, None


_llp.register_autograd(_llp_bwd, setup_context=_llp_setup)


# ----------------------------------------------------------------------------------------------
# torch path: linear_cross_entropy's chunked torch loop
# ----------------------------------------------------------------------------------------------
class _TorchLinearLogProbs(torch.autograd.Function):
    """(logp, ent) per row, chunked over rows in plain torch: the forward keeps (M,) vectors only,
    the backward recomputes each chunk's logits and overwrites them with their gradient."""

    @staticmethod
    def forward(ctx, x, w, b, target, ignore_index, temperature, entropy):
        M, H = x.shape
        C = w.shape[0]
        chunk = ce._chunk(M, H, C)
        acc = acc_dtype(x.dtype)
        ent = torch.empty(M, dtype=acc, device=x.device) if entropy else x.new_empty(0, dtype=acc)
        loss = ce._torch_loop_forward(x, w, b, target, None, ignore_index, 0.0, 0.0, chunk,
                                      scale=1.0 / temperature, ent=ent if entropy else None)
        ctx.save_for_backward(x, w, b, target)
        ctx.options = (ignore_index, temperature, entropy, chunk)
        return loss.neg_().add_(0.0), ent  # + 0.0: ignored rows give 0.0, not -0.0

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        x, w, b, target = ctx.saved_tensors
        ignore_index, temperature, entropy, chunk = ctx.options
        inv_t = 1.0 / temperature
        g = grad_logp * -inv_t
        g2 = grad_ent * inv_t if entropy and grad_ent is not None else None
        dx, dw, db = ce._torch_loop_backward(g, x, w, b, target, None, ignore_index, 0.0, 0.0, chunk,
                                             scale=inv_t, entropy=entropy, grad_ent=g2)
        return dx, dw, db, None, None, None, None


def linear_log_probs(input, weight, target, bias, temperature, ignore_index, return_entropy, use_triton):
    """(arguments already checked) input (*, H), target (*) -> logp (*) and, with return_entropy,
    ent (*), both in fp32 (fp64 for fp64 inputs on the torch path)."""
    shape = tuple(input.shape[:-1])
    H = input.shape[-1]
    x = input.reshape(-1, H)
    t = target.reshape(-1).to(torch.int64)
    if use_triton:
        logp, ent = _llp(x, weight, bias, t, ignore_index, float(temperature), bool(return_entropy))
        if x.dtype == torch.float64:  # the kernels keep fp32 vectors; the torch path fp64 ones
            logp, ent = logp.double(), ent.double()
    else:
        logp, ent = _TorchLinearLogProbs.apply(x, weight, bias, t, ignore_index, float(temperature),
                                               bool(return_entropy))
    if return_entropy:
        return logp.reshape(shape), ent.reshape(shape)
    return logp.reshape(shape)


# ----------------------------------------------------------------------------------------------
# Contract (fasttx._registry.route): the checks on both paths, then either path
# ----------------------------------------------------------------------------------------------
def _prepare(input, weight, target, bias, temperature, ignore_index, return_entropy):
    check(input, weight, target, bias, temperature, ignore_index)
    return input, weight, target, bias, temperature, ignore_index, return_entropy


def _path(use_triton: bool):
    def path(input, weight, target, bias, temperature, ignore_index, return_entropy):
        # the head's matmul in the autocast dtype, as F.linear
        input, weight, bias = autocast_lower(input.device.type, input, weight, bias)
        return linear_log_probs(input, weight, target, bias, temperature, ignore_index, return_entropy, use_triton)

    return path


contract("linear_log_probs", prepare=_prepare,
         tensors=lambda input, weight, target, bias, *rest: (input, weight, target, bias),
         unsupported=lambda *a: None, triton=_path(True), torch=_path(False))


# ----------------------------------------------------------------------------------------------
# DTensor sharding rules of the custom ops above (fasttx/distributed.py registers them)
# ----------------------------------------------------------------------------------------------
@sharding_rule(_llp)
def _linear_log_probs_rule(x, w, b, target, ignore_index, temperature, entropy):
    # as linear_cross_entropy: rows (tokens) sharded with their targets, the head replicated
    # -> (logp (M,), ent (M,) or an empty stand-in)
    R, S, _ = placements()
    e = S(0) if entropy else R
    return [([R, R], [R, R, opt(b, R), R, None, None, None]),
            ([S(0), e], [S(0), R, opt(b, R), S(0), None, None, None])]


@sharding_rule(_llp_backward)
def _linear_log_probs_backward_rule(grad_logp, grad_ent, x, w, b, target, ignore_index, temperature, entropy):
    # dx follows the rows; dw and db sum over rows: partial sums (reduced by DTensor)
    R, S, P = placements()
    db = P if b is not None else R
    return [([R, R, R], [R, opt(grad_ent, R), R, R, opt(b, R), R, None, None, None]),
            ([S(0), P, db], [S(0), opt(grad_ent, S(0)), S(0), R, opt(b, R), S(0), None, None, None])]
