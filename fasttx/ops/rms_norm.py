"""rms_norm, add_rms_norm and offset_rms_norm: their contracts (checks, `unsupported`, the torch path and the Triton
path, run by fasttx._registry.route) and the Triton path's custom ops, on the LayerNorm kernels'
RMSNorm flags (kernels/layer_norm/: IS_RMS_NORM, and the Llama/Gemma casting orders).

One custom op pair serves both functions (residual None for rms_norm), each with a fake (shape)
implementation so `torch.compile(fullgraph=True)` sees opaque ops:
    fasttx::add_rms_norm(input, residual, N, weight, eps, cast) -> (y, h, rstd)
    fasttx::add_rms_norm_backward(dy, dh_out, h, N, weight, rstd, cast, store_dh, dx_dtype)
        -> (d_input, d_residual, d_weight)
N = prod(normalized_shape); h = input + residual (empty without a residual), saved with the fp32
rstd (rows,) for the backward.

`unsupported(...)` says when the kernels do not cover a call (the functional layer then falls back
to torch with one warning); `check(...)` raises torch's exceptions for bad arguments.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from fasttx import _checks
from fasttx._checks import check_residual
from fasttx._registry import autocast_inputs, autocast_to_fp32, contract
from fasttx._torch_errors import raise_as_torch, rms_norm_shapes_ok
from fasttx.distributed import opt, placements, row_dims, sharding_rule

from ._common import RMS_NORM_CASTS as CASTS
from ._common import acc_dtype

_Shape = Union[int, Sequence[int], torch.Size]
# torch's scalar type names, as its "not implemented for 'Int'" messages spell them
_TORCH_TYPE_NAMES = {torch.int8: "Char", torch.uint8: "Byte", torch.int16: "Short", torch.int32: "Int",
                     torch.int64: "Long", torch.bool: "Bool"}


def _kernels():
    from fasttx.kernels import layer_norm  # lazy: the torch path needs no triton

    return layer_norm


def _shape(normalized_shape: _Shape) -> tuple:
    return (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)


def default_eps(dtype: torch.dtype) -> float:
    """eps=None: torch's F.rms_norm takes the machine epsilon of the dtype it computes in, fp32 for
    16-bit and fp32 inputs (not bf16's 2^-7), fp64 for fp64."""
    return torch.finfo(acc_dtype(dtype)).eps


def unsupported(input: Tensor, normalized_shape: _Shape, weight=None, eps=None, residual=None,
                cast="torch") -> Optional[str]:
    """None when the kernels cover this call, else the reason (the caller runs torch's op)."""
    shape = _shape(normalized_shape)
    N = math.prod(shape) if all(isinstance(s, int) for s in shape) else 0  # bad types: check()
    limit = _kernels().MAX_HIDDEN
    if N > limit:
        return f"hidden size {N} > {limit}, the kernel's limit"
    return None


def check(input: Tensor, normalized_shape: _Shape, weight=None, eps=None, residual=None,
          cast="torch", op: str = "rms_norm") -> None:
    """torch.nn.functional.rms_norm's argument rules, with its exception types and messages; for
    add_rms_norm also the residual's (its cast is checked once, for both paths, by `_add_prepare`)."""
    shape = _shape(normalized_shape)
    if not rms_norm_shapes_ok(input, shape, weight) and not torch.compiler.is_compiling():
        # a bad call: torch's own checks, in torch's order, raise exactly what torch raises
        raise_as_torch(lambda m: F.rms_norm(m.tensor(input), m.shape(shape), m.tensor(weight), eps),
                       (*input.shape, *shape, *(() if weight is None else weight.shape)), input.shape,
                       input.device.type)
    if not input.is_floating_point():
        dtype = _TORCH_TYPE_NAMES.get(input.dtype, str(input.dtype).replace("torch.", ""))
        raise NotImplementedError(f'"rms_norm" not implemented for \'{dtype}\'')
    shape = _shape(normalized_shape)
    if len(shape) == 0:
        raise RuntimeError(
            "Expected normalized_shape to be at least 1-dimensional, i.e., containing at least "
            "one element, but got normalized_shape = []"
        )
    if input.dim() < len(shape) or tuple(input.shape[input.dim() - len(shape):]) != shape:
        raise RuntimeError(
            f"Given normalized_shape={list(shape)}, expected input with shape "
            f"[*{', '.join(str(s) for s in shape)}], but got input of size{list(input.shape)}"
        )
    if weight is not None:
        if tuple(weight.shape) != shape:
            raise RuntimeError(
                f"Expected weight to be of same shape as normalized_shape, but got weight of "
                f"shape {list(weight.shape)} and normalized_shape = {list(shape)}"
            )
        if weight.device != input.device:
            raise RuntimeError(f"{op}: expected weight on the input's device {input.device}, got {weight.device}")
    check_residual(op, input, residual)


# ----------------------------------------------------------------------------------------------
# The custom ops
# ----------------------------------------------------------------------------------------------
def _h_dtype(input: Tensor, residual: Optional[Tensor]) -> torch.dtype:
    # promote_types, not result_type: dynamo folds the former, the latter breaks the graph
    return input.dtype if residual is None else torch.promote_types(input.dtype, residual.dtype)


@torch.library.custom_op("fasttx::add_rms_norm", mutates_args=())
def _add_rms_norm(
    input: Tensor, residual: Optional[Tensor], N: int, weight: Optional[Tensor], eps: float, cast: str
) -> Tuple[Tensor, Tensor, Tensor]:
    y, h, rstd = _kernels().rms_norm_forward(input, N, weight, eps, residual, cast)
    return y, (h if h is not None else input.new_empty(0)), rstd


@_add_rms_norm.register_fake
def _(input, residual, N, weight, eps, cast):
    h_dtype = _h_dtype(input, residual)
    rows = input.numel() // N if N > 0 else 0
    rstd = input.new_empty(rows, dtype=acc_dtype(h_dtype))
    y = input.new_empty(input.shape, dtype=_kernels().rms_norm_out_dtype(h_dtype, weight, cast))
    h = input.new_empty(input.shape, dtype=h_dtype) if residual is not None else input.new_empty(0)
    return y, h, rstd


@torch.library.custom_op("fasttx::add_rms_norm_backward", mutates_args=())
def _add_rms_norm_backward(
    dy: Tensor, dh_out: Optional[Tensor], h: Tensor, N: int, weight: Optional[Tensor], rstd: Tensor,
    cast: str, store_dh: bool, dx_dtype: torch.dtype,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(d_input, d_residual, d_weight); absent ones as empty tensors (custom ops return no None)."""
    dx, dh, dw = _kernels().rms_norm_backward(dy, h, N, weight, rstd, dh_out, cast, store_dh, dx_dtype)
    return dx, (dh if dh is not None else h.new_empty(0)), (dw if dw is not None else h.new_empty(0))


@_add_rms_norm_backward.register_fake
def _(dy, dh_out, h, N, weight, rstd, cast, store_dh, dx_dtype):
    return (
        h.new_empty(h.shape, dtype=dx_dtype),
        h.new_empty(h.shape) if store_dh else h.new_empty(0),
        weight.new_empty(weight.shape) if weight is not None else h.new_empty(0),
    )


def _setup(ctx, inputs, output):
    input, residual, ctx.N, weight, _, ctx.cast = inputs
    y, h, rstd = output
    ctx.y_dtype = y.dtype
    ctx.input_dtype = input.dtype
    ctx.residual_dtype = residual.dtype if residual is not None else None
    ctx.save_for_backward(h if residual is not None else input, weight, rstd)


def _backward(ctx, dy, dh_out, _drstd):
    h, weight, rstd = ctx.saved_tensors
    has_res = ctx.residual_dtype is not None
    if dy is None:  # only h was used: the norm contributes nothing
        dy = torch.zeros(h.shape, dtype=ctx.y_dtype, device=h.device)
    dx, dres, dw = _add_rms_norm_backward(
        dy, dh_out if has_res else None, h, ctx.N, weight, rstd, ctx.cast, has_res, ctx.input_dtype
    )
    return (
        dx,
        dres.to(ctx.residual_dtype) if has_res else None,
        None,
        dw if weight is not None else None,
        None,
        None,
    )


_add_rms_norm.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------------------------
# Public-shaped functions (arguments already checked by `check`)
# ----------------------------------------------------------------------------------------------
def rms_norm(input: Tensor, normalized_shape: _Shape, weight: Optional[Tensor] = None,
             eps: Optional[float] = None) -> Tensor:
    """torch.nn.functional.rms_norm on the Triton kernels: input (*, *normalized_shape) -> same
    shape and dtype; fp32 statistics and math, cast at the store (torch's order)."""
    N = math.prod(_shape(normalized_shape))
    eps = default_eps(input.dtype) if eps is None else float(eps)
    return _add_rms_norm(input, None, N, weight, eps, "torch")[0]


def add_rms_norm(input: Tensor, residual: Optional[Tensor], normalized_shape: _Shape,
                 weight: Optional[Tensor] = None, eps: Optional[float] = None,
                 cast: str = "torch") -> Tuple[Tensor, Tensor]:
    """(rms_norm(h) in the `cast` order, h = input + residual) in one kernel; residual None: h is
    input (returned as is)."""
    N = math.prod(_shape(normalized_shape))
    h_dtype = _h_dtype(input, residual)
    eps = default_eps(h_dtype) if eps is None else float(eps)
    y, h, _ = _add_rms_norm(input, residual, N, weight, eps, cast)
    return y, (h if residual is not None else input)


# ----------------------------------------------------------------------------------------------
# Contracts (fasttx._registry.route)
# ----------------------------------------------------------------------------------------------
def _rms_prepare(input, normalized_shape, weight, eps):
    if isinstance(normalized_shape, int):  # as torch.nn.functional.rms_norm does
        raise TypeError(
            "rms_norm(): argument 'normalized_shape' (position 2) must be tuple of ints, not int"
        )
    return input, normalized_shape, weight, eps


def _rms_triton(input, normalized_shape, weight, eps):
    shape = _checks.check_shape("rms_norm", "normalized_shape", 2, normalized_shape)
    if eps is not None:
        eps = _checks.check_float("rms_norm", "eps", 4, eps)
    check(input, shape, weight, eps)
    input, weight = autocast_inputs("rms_norm", input, weight)
    return rms_norm(input, shape, weight, eps)


contract("rms_norm", prepare=_rms_prepare, tensors=lambda input, normalized_shape, weight, eps: (input, weight),
         unsupported=unsupported, triton=_rms_triton, torch=F.rms_norm)


def rms_norm_cast(h: Tensor, normalized_shape, weight: Optional[Tensor], eps: Optional[float],
                  cast: str) -> Tensor:
    """torch ops for the three casting orders of add_rms_norm (the Triton path's semantics)."""
    if cast == "torch":
        return F.rms_norm(h, normalized_shape, weight, eps)
    if not rms_norm_shapes_ok(h, normalized_shape, weight) and not torch.compiler.is_compiling():
        # a bad call: F.rms_norm's own checks raise exactly what it raises, as for the "torch" cast
        raise_as_torch(lambda m: F.rms_norm(m.tensor(h), m.shape(normalized_shape), m.tensor(weight), eps),
                       (*h.shape, *normalized_shape, *(() if weight is None else weight.shape)), h.shape,
                       h.device.type)
    acc = acc_dtype(h.dtype)
    eps = torch.finfo(acc).eps if eps is None else eps
    dims = tuple(range(-len(normalized_shape), 0))
    x = h.to(acc)
    xhat = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
    if cast == "llama":  # HF LlamaRMSNorm: weight * hidden.to(input_dtype)
        xhat = xhat.to(h.dtype)
        return xhat if weight is None else weight * xhat
    # gemma: HF GemmaRMSNorm: (x * rsqrt) * (1 + weight.float()), then .type_as(x)
    return (xhat if weight is None else xhat * (1.0 + weight.to(acc))).to(h.dtype)


def _add_prepare(input, residual, normalized_shape, weight, eps, cast):
    for name, t in (("input", input), ("residual", residual)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"add_rms_norm(): argument '{name}' must be Tensor, not {type(t).__name__}")
    if cast not in CASTS:
        raise ValueError(f"add_rms_norm: cast must be one of {CASTS}, got {cast!r}")
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    _checks.check_residual_shape("add_rms_norm", input, residual)
    return input, residual, normalized_shape, weight, eps, cast


def _add_triton(input, residual, normalized_shape, weight, eps, cast):
    shape = _checks.check_shape("add_rms_norm", "normalized_shape", 3, normalized_shape)
    if eps is not None:
        eps = _checks.check_float("add_rms_norm", "eps", 5, eps)
    check(input, shape, weight, eps, residual, cast, op="add_rms_norm")
    if cast == "torch" and autocast_to_fp32(input.device.type):
        # as the unfused sequence under CUDA autocast: the add in the inputs' dtypes,
        # F.rms_norm (on autocast's fp32 list) of h in fp32
        h = input if residual is None else input + residual
        h32, weight = autocast_inputs("add_rms_norm", h, weight)
        return rms_norm(h32, shape, weight, eps), h
    return add_rms_norm(input, residual, shape, weight, eps, cast)


def _add_torch(input, residual, normalized_shape, weight, eps, cast):
    h = input if residual is None else input + residual
    return rms_norm_cast(h, tuple(normalized_shape), weight, eps, cast), h


def _offset_prepare(input, normalized_shape, weight, eps):
    # fasttx's own op: F.rms_norm's argument rules for both paths (the torch path is plain math)
    _rms_prepare(input, normalized_shape, weight, eps)
    shape = _checks.check_shape("offset_rms_norm", "normalized_shape", 2, normalized_shape)
    if eps is not None:
        eps = _checks.check_float("offset_rms_norm", "eps", 4, eps)
    check(input, shape, weight, eps, op="offset_rms_norm")
    return input, shape, weight, eps


def _offset_triton(input, shape, weight, eps):
    return add_rms_norm(input, None, shape, weight, eps, "gemma")[0]


# offset_rms_norm: x / rms(x) * (1 + weight), the "gemma" casting order of add_rms_norm without a
# residual (the kernels' WEIGHT_PLUS_ONE flag); no autocast policy: the output has input's dtype
contract("offset_rms_norm", prepare=_offset_prepare,
         tensors=lambda input, normalized_shape, weight, eps: (input, weight),
         unsupported=unsupported, triton=_offset_triton,
         torch=lambda input, normalized_shape, weight, eps: rms_norm_cast(
             input, tuple(normalized_shape), weight, eps, "gemma"))


contract("add_rms_norm", prepare=_add_prepare,
         tensors=lambda input, residual, normalized_shape, weight, eps, cast: (input, residual, weight),
         unsupported=lambda input, residual, normalized_shape, weight, eps, cast: unsupported(
             input, normalized_shape, weight, eps, residual, cast),
         triton=_add_triton, torch=_add_torch)


# ----------------------------------------------------------------------------------------------
# DTensor sharding rules of the custom ops above (fasttx/distributed.py registers them). Each takes
# the op's arguments (tensors as DTensor's specs: .ndim, .shape, .placements; None when absent) and
# returns [(output placements, input placements), ...], one per output and per schema argument.
# ----------------------------------------------------------------------------------------------
@sharding_rule(_add_rms_norm)
def _add_rms_norm_rule(input, residual, N, weight, eps, cast):
    R, S, _ = placements()
    out = [([R, R, R], [R, opt(residual, R), None, opt(weight, R), None, None])]
    for d in row_dims(input, N):
        out.append(([S(d), S(d), S(0)], [S(d), opt(residual, S(d)), None, opt(weight, R), None, None]))
    return out


@sharding_rule(_add_rms_norm_backward)
def _add_rms_norm_backward_rule(dy, dh_out, h, N, weight, rstd, cast, store_dh, dx_dtype):
    R, S, P = placements()
    tail = [None, None, None]  # cast, store_dh, dx_dtype
    out = [([R, R, R], [R, opt(dh_out, R), R, None, opt(weight, R), R, *tail])]
    for d in row_dims(h, N):
        outs = [S(d), S(d) if store_dh else R, P if weight is not None else R]
        out.append((outs, [S(d), opt(dh_out, S(d)), S(d), None, opt(weight, R), S(0), *tail]))
    return out
