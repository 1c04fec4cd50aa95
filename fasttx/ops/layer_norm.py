"""layer_norm and dropout_add_layer_norm: their contracts (checks, `unsupported`, the torch path and
the Triton path, run by fasttx._registry.route) and the Triton path's custom ops.

Three `torch.library` custom ops, each with a fake (shape) implementation, so that
`torch.compile(fullgraph=True)` sees opaque ops:
    fasttx::layer_norm(input, N, weight, bias, eps) -> (y, mean, rstd)
    fasttx::dropout_add_layer_norm(input, residual, N, weight, bias, eps, p)
        -> (y, h, mean, rstd, seed)
    fasttx::layer_norm_backward(...) -> (d_input, d_residual, d_weight, d_bias)  (both forwards' backward)
N = prod(normalized_shape); mean/rstd (rows,) fp32 are saved for the backward; `seed` is the
dropout's Philox seed ((1,) int64 on the input's device, (0,) without dropout), drawn inside the
op and saved so the backward
regenerates the mask instead of storing it.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from fasttx import _checks
from fasttx._checks import check_residual
from fasttx.distributed import matching, opt, placements, row_dims, sharding_rule
from fasttx._registry import autocast_inputs, autocast_to_fp32, contract

from ._common import LOW as _LOW
from ._common import acc_dtype as _stat_dtype
from ._common import draw_seed


def _kernels():
    from fasttx.kernels import layer_norm  # lazy: the torch path needs no triton

    return layer_norm


def _rows(t: Tensor, N: int) -> int:
    return t.numel() // N if N > 0 else 0


def _empty(like: Tensor) -> Tensor:
    # Stand-in for an absent gradient (custom ops cannot return None); mapped back to None.
    return like.new_empty(0)


# ----------------------------------------------------------------------------------------------
# Argument checks: torch's rules and (for shapes) torch's messages, raised before any launch
# ----------------------------------------------------------------------------------------------
def check(op: str, input: Tensor, normalized_shape, weight, bias, dtype=None) -> int:
    """Validate like torch.nn.functional.layer_norm; return N = prod(normalized_shape).
    `dtype`: of the tensor being normalized (default input's; the fused op's promoted h)."""
    dtype = dtype or input.dtype
    if not input.is_floating_point():
        raise NotImplementedError(f"{op}: input must be a floating-point tensor, got {input.dtype}")
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if len(shape) == 0:
        raise RuntimeError(
            "Expected normalized_shape to be at least 1-dimensional, i.e., containing at least "
            "one element, but got normalized_shape = []"
        )
    if input.dim() < len(shape) or tuple(input.shape[input.dim() - len(shape):]) != shape:
        raise RuntimeError(
            f"Given normalized_shape={list(shape)}, expected input with shape "
            f"[*, {', '.join(str(s) for s in shape)}], but got input of size{list(input.shape)}"
        )
    params = [(name, t) for name, t in (("weight", weight), ("bias", bias)) if t is not None]
    for name, t in params:
        if tuple(t.shape) != shape:
            raise RuntimeError(
                f"Expected {name} to be of same shape as normalized_shape, but got {name} of "
                f"shape {list(t.shape)} and normalized_shape = {list(shape)}"
            )
        if t.device != input.device:
            raise RuntimeError(
                f"{op}: expected {name} on the input's device {input.device}, got {t.device}"
            )
    # torch's rule: parameters share the input's dtype, or are all float32 for a 16-bit input.
    dtypes = {t.dtype for _, t in params}
    if dtypes and dtypes != {dtype} and not (dtype in _LOW and dtypes == {torch.float32}):
        got = ", ".join(f"{name} {t.dtype}" for name, t in params)
        raise RuntimeError(
            f"{op}: weight and bias must have the input's dtype ({dtype}), or all be "
            f"torch.float32 for a float16/bfloat16 input; got {got}"
        )
    return math.prod(shape)


def unsupported(input: Tensor, normalized_shape) -> Optional[str]:
    """Why the kernels cannot serve this call (None when they can): rows longer than the
    largest hidden size they are tested at."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
    n = math.prod(shape) if all(isinstance(s, int) for s in shape) else 0
    limit = _kernels().MAX_HIDDEN
    if n > limit:
        return f"rows of {n} elements exceed the kernel's limit of {limit}"
    return None


# ----------------------------------------------------------------------------------------------
# layer_norm
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fasttx::layer_norm", mutates_args=())
def _layer_norm_fwd(
    input: Tensor, N: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float
) -> Tuple[Tensor, Tensor, Tensor]:
    y, _, mean, rstd = _kernels().layer_norm_forward(input, N, weight, bias, eps)
    return y, mean, rstd


@_layer_norm_fwd.register_fake
def _(input, N, weight, bias, eps):
    stats = input.new_empty(_rows(input, N), dtype=_stat_dtype(input.dtype))
    return input.new_empty(input.shape), stats, torch.empty_like(stats)


def _layer_norm_setup(ctx, inputs, output):
    input, ctx.N, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(input, weight, bias, mean, rstd)


def _layer_norm_backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, _, dw, db = _layer_norm_bwd(dy, None, x, ctx.N, weight, bias, mean, rstd, None, 0.0, False, x.dtype)
    return dx, None, dw if weight is not None else None, db if bias is not None else None, None


_layer_norm_fwd.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup)


def layer_norm(
    input: Tensor,
    normalized_shape: Union[int, List[int], torch.Size],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    """torch.nn.functional.layer_norm on the Triton kernels.

    input (*, *normalized_shape); weight, bias normalized_shape or None -> y like input, in
    input's dtype. Statistics in fp32; biased variance from centred values."""
    N = check("layer_norm", input, normalized_shape, weight, bias)
    return _layer_norm_fwd(input, N, weight, bias, float(eps))[0]


# ----------------------------------------------------------------------------------------------
# dropout_add_layer_norm
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fasttx::dropout_add_layer_norm", mutates_args=())
def _dropout_add_layer_norm_fwd(
    input: Tensor, residual: Optional[Tensor], N: int, weight: Optional[Tensor],
    bias: Optional[Tensor], eps: float, p: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    # The seed is drawn here, inside the op (torch.compile traces no .item()), on the input's
    # device: the kernel reads it there, so a CUDA graph replay draws a new mask. (0,) when p == 0.
    seed = draw_seed(input.device) if p > 0.0 else input.new_empty((0,), dtype=torch.int64)
    y, h, mean, rstd = _kernels().layer_norm_forward(input, N, weight, bias, eps, residual, p, seed, store_h=True)
    return y, h, mean, rstd, seed


@_dropout_add_layer_norm_fwd.register_fake
def _(input, residual, N, weight, bias, eps, p):
    dtype = input.dtype if residual is None else torch.result_type(input, residual)
    stats = input.new_empty(_rows(input, N), dtype=_stat_dtype(dtype))
    y = input.new_empty(input.shape, dtype=dtype)
    seed = input.new_empty((1,) if p > 0.0 else (0,), dtype=torch.int64)
    return y, torch.empty_like(y), stats, torch.empty_like(stats), seed


def _fused_setup(ctx, inputs, output):
    input, residual, ctx.N, weight, bias, _, ctx.p = inputs
    _, h, mean, rstd, seed = output
    ctx.input_dtype = input.dtype
    ctx.residual_dtype = residual.dtype if residual is not None else None
    ctx.save_for_backward(h, weight, bias, mean, rstd, seed)


def _fused_backward(ctx, dy, dh_out, _dmean, _drstd, _dseed):
    h, weight, bias, mean, rstd, seed = ctx.saved_tensors
    has_res = ctx.residual_dtype is not None
    dx, dres, dw, db = _layer_norm_bwd(
        dy, dh_out, h, ctx.N, weight, bias, mean, rstd, seed, ctx.p, has_res, ctx.input_dtype
    )
    return (
        dx,
        dres.to(ctx.residual_dtype) if has_res else None,
        None,
        dw if weight is not None else None,
        db if bias is not None else None,
        None,
        None,
    )


_dropout_add_layer_norm_fwd.register_autograd(_fused_backward, setup_context=_fused_setup)


def dropout_add_layer_norm(
    input: Tensor,
    residual: Optional[Tensor],
    normalized_shape: Union[int, Sequence[int], torch.Size],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    p: float = 0.0,
    training: bool = True,
) -> Tuple[Tensor, Tensor]:
    """h = residual + dropout(input, p, training); returns (layer_norm(h), h), in one kernel.

    input (*, *normalized_shape); residual like input, or None (h = dropout(input)); weight, bias
    normalized_shape or None. Both outputs in torch.result_type(input, residual); both take
    gradients. The keep-mask is Philox(seed, flat element index of input), seed drawn from
    torch's generator (torch.manual_seed reproduces it) and regenerated in the backward."""
    check_residual("dropout_add_layer_norm", input, residual)
    # h (and y) take the promoted dtype; the parameters must suit that dtype.
    # (promote_types, not result_type: dynamo folds the former, the latter breaks the graph)
    dtype = input.dtype if residual is None else torch.promote_types(input.dtype, residual.dtype)
    N = check("dropout_add_layer_norm", input, normalized_shape, weight, bias, dtype)
    y, h, _, _, _ = _dropout_add_layer_norm_fwd(
        input, residual, N, weight, bias, float(eps), float(p) if training else 0.0
    )
    return y, h


# ----------------------------------------------------------------------------------------------
# Backward (shared)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fasttx::layer_norm_backward", mutates_args=())
def _layer_norm_bwd(
    dy: Tensor, dh_out: Optional[Tensor], h: Tensor, N: int, weight: Optional[Tensor],
    bias: Optional[Tensor], mean: Tensor, rstd: Tensor, seed: Optional[Tensor], p: float,
    store_dh: bool, dx_dtype: torch.dtype,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(d_input, d_residual, d_weight, d_bias); absent ones as empty tensors."""
    dx, dh, dw, db = _kernels().layer_norm_backward(
        dy, h, N, weight, bias, mean, rstd, dh_out, p,
        seed if seed is not None and p > 0.0 else 0, store_dh, dx_dtype,
    )
    return (
        dx,
        dh if dh is not None else _empty(h),
        dw if dw is not None else _empty(h),
        db if db is not None else _empty(h),
    )


@_layer_norm_bwd.register_fake
def _(dy, dh_out, h, N, weight, bias, mean, rstd, seed, p, store_dh, dx_dtype):
    return (
        h.new_empty(h.shape, dtype=dx_dtype),
        h.new_empty(h.shape) if store_dh else _empty(h),
        weight.new_empty(weight.shape) if weight is not None else _empty(h),
        bias.new_empty(bias.shape) if bias is not None else _empty(h),
    )


# ----------------------------------------------------------------------------------------------
# Contracts (fasttx._registry.route)
# ----------------------------------------------------------------------------------------------
def _layer_norm_prepare(input, normalized_shape, weight, bias, eps):
    if isinstance(normalized_shape, int):  # as torch.nn.functional.layer_norm does
        raise TypeError(
            "layer_norm(): argument 'normalized_shape' (position 2) must be tuple of ints, not int"
        )
    return input, normalized_shape, weight, bias, eps


def _layer_norm_triton(input, normalized_shape, weight, bias, eps):
    eps = _checks.check_float("layer_norm", "eps", 5, eps)
    shape = _checks.check_shape("layer_norm", "normalized_shape", 2, normalized_shape)
    input, weight, bias = autocast_inputs("layer_norm", input, weight, bias)
    return layer_norm(input, shape, weight, bias, eps)


contract("layer_norm", prepare=_layer_norm_prepare,
         tensors=lambda input, normalized_shape, weight, bias, eps: (input, weight, bias),
         unsupported=lambda input, normalized_shape, *rest: unsupported(input, normalized_shape),
         triton=_layer_norm_triton, torch=F.layer_norm)


def _fused_prepare(input, residual, normalized_shape, weight, bias, eps, p, training):
    p = _checks.check_dropout_p(p)
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    return input, residual, normalized_shape, weight, bias, eps, p, training


def _fused_triton(input, residual, normalized_shape, weight, bias, eps, p, training):
    eps = _checks.check_float("dropout_add_layer_norm", "eps", 6, eps)
    shape = _checks.check_shape("dropout_add_layer_norm", "normalized_shape", 3, normalized_shape)
    y, h = dropout_add_layer_norm(input, residual, shape, weight, bias, eps, p, training)
    if autocast_to_fp32(input.device.type) and y.dtype in _LOW:
        y = y.float()
    return y, h


def _fused_torch(input, residual, normalized_shape, weight, bias, eps, p, training):
    h = F.dropout(input, p, training)
    if residual is not None:
        h = residual + h
    return F.layer_norm(h, normalized_shape, weight, bias, eps), h


contract("dropout_add_layer_norm", prepare=_fused_prepare,
         tensors=lambda input, residual, normalized_shape, weight, bias, eps, p, training: (
             input, residual, weight, bias),
         unsupported=lambda input, residual, normalized_shape, *rest: unsupported(input, normalized_shape),
         triton=_fused_triton, torch=_fused_torch)


# ----------------------------------------------------------------------------------------------
# DTensor sharding rules of the custom ops above (fasttx/distributed.py registers them). Each takes
# the op's arguments (tensors as DTensor's specs: .ndim, .shape, .placements; None when absent) and
# returns [(output placements, input placements), ...], one per output and per schema argument.
# ----------------------------------------------------------------------------------------------
# The (rows,) statistics of a norm on an input sharded on a row dim are the local rows' statistics:
# labelled Shard(0) (exact for d == 0; for d > 0 only the matching backward reads them).
@sharding_rule(_layer_norm_fwd)
def _layer_norm_fwd_rule(input, N, weight, bias, eps):
    R, S, _ = placements()
    out = [([R, R, R], [R, None, opt(weight, R), opt(bias, R), None])]
    for d in row_dims(input, N):
        out.append(([S(d), S(0), S(0)], [S(d), None, opt(weight, R), opt(bias, R), None]))
    return out


@sharding_rule(_dropout_add_layer_norm_fwd)
def _dropout_add_layer_norm_fwd_rule(input, residual, N, weight, bias, eps, p):
    R, S, _ = placements()
    out = [([R, R, R, R, R], [R, opt(residual, R), None, opt(weight, R), opt(bias, R), None, None])]
    for d in row_dims(input, N):
        out.append(([S(d), S(d), S(0), S(0), R],
                    [S(d), opt(residual, S(d)), None, opt(weight, R), opt(bias, R), None, None]))
    return out


@sharding_rule(_layer_norm_bwd)
def _layer_norm_bwd_rule(dy, dh_out, h, N, weight, bias, mean, rstd, seed, p, store_dh, dx_dtype):
    R, S, P = placements()
    tail = [None, None, None]  # p, store_dh, dx_dtype
    out = [([R, R, R, R], [R, opt(dh_out, R), R, None, opt(weight, R), opt(bias, R), R, R,
                           opt(seed, R), *tail])]
    for d in row_dims(h, N):
        outs = [S(d), S(d) if store_dh else R, P if weight is not None else R, P if bias is not None else R]
        ins = [S(d), opt(dh_out, S(d)), S(d), None, opt(weight, R), opt(bias, R), S(0), S(0),
               opt(seed, R), *tail]
        out.append((outs, ins))
    return matching(out, mean, 6) if p > 0.0 else out
