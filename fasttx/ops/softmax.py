"""softmax: its contract (checks, the torch path, the Triton path; fasttx._registry.route) and a
custom op pair over the last dim around fasttx.kernels.softmax.
Other dims are moved last (and back) in Python, so autograd and torch.compile see the moves as
ordinary ops. The backward saves the output, not the input: dx = y * (dy - sum(dy * y))."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fasttx import _checks
from fasttx.distributed import placements, sharding_rule
from fasttx._registry import autocast_inputs, contract

from ._common import FLOATS as _FLOAT_DTYPES


def _kernels():
    from fasttx.kernels import softmax  # lazy: the torch path needs no triton

    return softmax


@torch.library.custom_op("fasttx::softmax", mutates_args=())
def _softmax_lastdim(x: Tensor) -> Tensor:
    return _kernels().softmax_forward(x)


@_softmax_lastdim.register_fake
def _(x):
    return x.new_empty(x.shape)


@torch.library.custom_op("fasttx::softmax_backward", mutates_args=())
def _softmax_lastdim_backward(grad: Tensor, y: Tensor) -> Tensor:
    return _kernels().softmax_backward(grad, y)


@_softmax_lastdim_backward.register_fake
def _(grad, y):
    return y.new_empty(y.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output)


def _backward(ctx, grad):
    (y,) = ctx.saved_tensors
    return _softmax_lastdim_backward(grad, y)


_softmax_lastdim.register_autograd(_backward, setup_context=_setup_context)


def softmax(input: Tensor, dim: int, dtype: Optional[torch.dtype] = None) -> Tensor:
    """torch.nn.functional.softmax along `dim`. input (*) -> (*). With `dtype`, input is cast to
    it first and the result is in it (its gradient flows back in input's dtype)."""
    if dtype is not None:
        input = input.to(dtype)
    if input.dtype not in _FLOAT_DTYPES:
        raise NotImplementedError(
            f"fasttx softmax: input must be a floating-point tensor (float16, bfloat16, float32 "
            f"or float64), got {input.dtype}; pass dtype= to cast it"
        )
    ndim = max(input.dim(), 1)  # a 0-d tensor takes dim 0 or -1, like torch
    if not -ndim <= dim < ndim:
        raise IndexError(
            f"Dimension out of range (expected to be in range of [{-ndim}, {ndim - 1}], but got {dim})"
        )
    if input.dim() == 0:
        return _softmax_lastdim(input.reshape(1)).reshape(())
    dim = dim % ndim
    if dim == input.dim() - 1:
        return _softmax_lastdim(input)
    y = _softmax_lastdim(input.movedim(dim, -1))  # (..., N) with the softmax dim last
    # back to input's dim order, laid out contiguously as torch's result is for a contiguous input
    return y.movedim(-1, dim).contiguous()


def _triton(input, dim, _stacklevel, dtype):
    dim = _checks.check_int("softmax", "dim", 1, dim)
    _checks.check_dtype("softmax", "dtype", None, dtype)
    if dtype is None:
        (input,) = autocast_inputs("softmax", input)
    return softmax(input, dim, dtype)


def _torch(input, dim, _stacklevel, dtype):
    # dim=None: torch's legacy implicit-dim rule, its deprecation warning pointing at the caller of
    # fasttx.functional.softmax (three frames more than F.softmax's own: entry, route, this)
    return F.softmax(input, dim=dim, _stacklevel=_stacklevel + 3, dtype=dtype)


contract("softmax", tensors=lambda input, dim, _stacklevel, dtype: (input,) if dim is not None else None,
         unsupported=lambda *a: None, triton=_triton, torch=_torch)


# ----------------------------------------------------------------------------------------------
# DTensor sharding rules of the custom ops above (fasttx/distributed.py registers them). Each takes
# the op's arguments (tensors as DTensor's specs: .ndim, .shape, .placements; None when absent) and
# returns [(output placements, input placements), ...], one per output and per schema argument.
# ----------------------------------------------------------------------------------------------
@sharding_rule(_softmax_lastdim)
def _softmax_rule(x):  # over the last dim
    R, S, _ = placements()
    return [([R], [R])] + [([S(d)], [S(d)]) for d in range(x.ndim - 1)]


@sharding_rule(_softmax_lastdim_backward)
def _softmax_backward_rule(grad, y):
    R, S, _ = placements()
    return [([R], [R, R])] + [([S(d)], [S(d), S(d)]) for d in range(y.ndim - 1)]
