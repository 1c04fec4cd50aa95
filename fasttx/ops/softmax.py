"""Triton path of softmax: a custom op pair over the last dim around fasttx.kernels.softmax.
Other dims are moved last (and back) in Python, so autograd and torch.compile see the moves as
ordinary ops. The backward saves the output, not the input: dx = y * (dy - sum(dy * y))."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fasttx.kernels import softmax as K

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@torch.library.custom_op("fasttx::softmax", mutates_args=())
def _softmax_lastdim(x: Tensor) -> Tensor:
    return K.softmax_forward(x)


@_softmax_lastdim.register_fake
def _(x):
    return x.new_empty(x.shape)


@torch.library.custom_op("fasttx::softmax_backward", mutates_args=())
def _softmax_lastdim_backward(grad: Tensor, y: Tensor) -> Tensor:
    return K.softmax_backward(grad, y)


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


# DTensor sharding rules for the ops above, when DTensor is in use (fasttx/distributed.py)
from fasttx.distributed import register_if_dtensor_loaded  # noqa: E402

register_if_dtensor_loaded()
