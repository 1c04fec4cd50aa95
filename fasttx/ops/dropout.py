"""Triton path of dropout: a custom op pair around fasttx.kernels.dropout.

The forward draws a Philox seed inside the op, as a (1,) int64 tensor on the input's device from
that device's torch generator (torch.compile traces no `.item()`; a captured CUDA graph redraws it
on every replay), and returns it; setup_context saves it and the backward regenerates the
forward's mask from it. The mask itself is never stored.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from fasttx.kernels import dropout as K
from ._common import draw_seed, keep_layout

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@torch.library.custom_op("fasttx::dropout", mutates_args=())
def _dropout(x: Tensor, p: float) -> Tuple[Tensor, Tensor]:
    seed = draw_seed(x.device)  # (1,) on x's device: graph-safe, no host sync
    return K.dropout_forward(x, p, seed), seed


@_dropout.register_fake
def _(x, p):
    return x.new_empty(x.shape), x.new_empty((1,), dtype=torch.int64)


@torch.library.custom_op("fasttx::dropout_backward", mutates_args=())
def _dropout_backward(grad: Tensor, seed: Tensor, p: float) -> Tensor:
    return K.dropout_backward(grad, p, seed)


@_dropout_backward.register_fake
def _(grad, seed, p):
    return grad.new_empty(grad.shape)


def _setup_context(ctx, inputs, output):
    _, p = inputs
    ctx.save_for_backward(output[1])
    ctx.p = p


def _backward(ctx, grad, _grad_seed):
    (seed,) = ctx.saved_tensors
    return _dropout_backward(grad, seed, ctx.p), None


_dropout.register_autograd(_backward, setup_context=_setup_context)


def dropout(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
    """torch.nn.functional.dropout. input (*) -> (*), input's dtype.

    training=False or p == 0 returns `input` itself (as torch does, inplace or not); p == 1 gives
    input * 0 (zeros, NaN/inf -> NaN). inplace=True writes the result into input and returns it;
    under autograd that follows torch's rules for in-place ops (an error on a leaf that requires
    grad), since it is a `copy_` into input. The output has input's layout as torch's does: a
    permuted-but-dense input runs in its storage order (the mask follows that order), any other
    input in its logical row-major order."""
    if not training or p == 0.0:
        return input
    if input.dtype not in _FLOAT_DTYPES:
        raise RuntimeError(
            f"fasttx dropout: input must be a floating-point tensor (float16, bfloat16, float32 "
            f"or float64) when training, got {input.dtype}"
        )
    out = keep_layout(lambda x: _dropout(x, p)[0], input)
    if inplace:
        return input.copy_(out)
    return out


# DTensor sharding rules for the ops above, when DTensor is in use (fasttx/distributed.py)
from fasttx.distributed import register_if_dtensor_loaded  # noqa: E402

register_if_dtensor_loaded()
