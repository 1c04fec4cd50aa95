"""dropout: its contract (checks, the torch path, the Triton path; fasttx._registry.route) and a
custom op pair around fasttx.kernels.dropout.

The forward draws a Philox seed inside the op, as a (1,) int64 tensor on the input's device from
that device's torch generator (torch.compile traces no `.item()`; a captured CUDA graph redraws it
on every replay), and returns it; setup_context saves it and the backward regenerates the
forward's mask from it. The mask itself is never stored.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fasttx import _checks
from fasttx.distributed import placements, sharding_rule, warn_once
from fasttx._registry import contract
from ._common import draw_seed, keep_layout

from ._common import FLOATS as _FLOAT_DTYPES


def _kernels():
    from fasttx.kernels import dropout  # lazy: the torch path needs no triton

    return dropout


@torch.library.custom_op("fasttx::dropout", mutates_args=())
def _dropout(x: Tensor, p: float) -> Tuple[Tensor, Tensor]:
    seed = draw_seed(x.device)  # (1,) on x's device: graph-safe, no host sync
    return _kernels().dropout_forward(x, p, seed), seed


@_dropout.register_fake
def _(x, p):
    return x.new_empty(x.shape), x.new_empty((1,), dtype=torch.int64)


@torch.library.custom_op("fasttx::dropout_backward", mutates_args=())
def _dropout_backward(grad: Tensor, seed: Tensor, p: float) -> Tensor:
    return _kernels().dropout_backward(grad, p, seed)


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


def _triton(input, p, training, inplace):
    p = _checks.check_dropout_p(_checks.check_float("dropout", "p", 2, p))
    _checks.check_bool("dropout", "train", 3, training)
    _checks.check_bool("dropout", "inplace", 4, inplace)
    return dropout(input, p, training, inplace)


contract("dropout", tensors=lambda input, p, training, inplace: (input,), unsupported=lambda *a: None,
         triton=_triton, torch=F.dropout)


# ----------------------------------------------------------------------------------------------
# DTensor sharding rules of the custom ops above (fasttx/distributed.py registers them). Each takes
# the op's arguments (tensors as DTensor's specs: .ndim, .shape, .placements; None when absent) and
# returns [(output placements, input placements), ...], one per output and per schema argument.
# ----------------------------------------------------------------------------------------------
@sharding_rule(_dropout)
def _dropout_rule(x, p):
    # Replicate only: the backward op sees nothing of the forward but the seed, so it could not
    # tell which placement the mask was drawn in. A sharded input is all-gathered (said once).
    R, _, _ = placements()
    if any(not pl.is_replicate() for pl in x.placements):
        warn_once("dropout", "fasttx dropout on a sharded DTensor: DTensor all-gathers the input "
                   "so that the mask is the single-process mask on every rank")
    return [([R, R], [R, None])]


@sharding_rule(_dropout_backward)
def _dropout_backward_rule(grad, seed, p):
    R, _, _ = placements()
    return [([R], [R, R, None])]
