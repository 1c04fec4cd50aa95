"""gelu, relu, relu_squared, bias_gelu and bias_relu: their contracts (checks, `unsupported`, the torch path and
the Triton path, run by fasttx._registry.route) and one custom op pair (forward, backward) for
y = act(x + bias), act in {exact GELU, tanh GELU, ReLU}, bias optional.

The public functions check arguments (torch's rules and exception types) and call the op; the op
calls the launchers in fasttx.kernels.gelu (imported on the Triton path only). Autograd saves x
and bias (not y): the backward recomputes z = x + bias, which also gives dbias.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fasttx import _checks
from fasttx.distributed import opt, placements, sharding_rule
from fasttx._registry import contract

from ._common import FLOATS as _FLOAT_DTYPES
from ._common import keep_layout


def _kernels():
    from fasttx.kernels import gelu  # lazy: the torch path needs no triton

    return gelu


def _out_dtype(x: Tensor, bias: Optional[Tensor]) -> torch.dtype:
    # x + bias promotes like torch (e.g. bf16 input with an fp32 bias gives fp32)
    return x.dtype if bias is None else torch.promote_types(x.dtype, bias.dtype)


@torch.library.custom_op("fasttx::bias_act", mutates_args=())
def _bias_act(x: Tensor, bias: Optional[Tensor], activation: str) -> Tensor:
    return _kernels().bias_act_forward(x, bias, activation, _out_dtype(x, bias))


@_bias_act.register_fake
def _(x, bias, activation):
    return x.new_empty(x.shape, dtype=_out_dtype(x, bias))


@torch.library.custom_op("fasttx::bias_act_backward", mutates_args=())
def _bias_act_backward(
    grad: Tensor, x: Tensor, bias: Optional[Tensor], activation: str
) -> Tuple[Tensor, Tensor]:
    dx, db = _kernels().bias_act_backward(grad, x, bias, activation)
    # custom ops cannot return None: an empty dbias stands for "no bias"
    return dx, (db if db is not None else x.new_empty(0))


@_bias_act_backward.register_fake
def _(grad, x, bias, activation):
    return x.new_empty(x.shape), (bias.new_empty(bias.shape) if bias is not None else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, bias, activation = inputs
    ctx.save_for_backward(x, bias)
    ctx.activation = activation


def _backward(ctx, grad):
    x, bias = ctx.saved_tensors
    dx, db = _bias_act_backward(grad, x, bias, ctx.activation)
    return dx, (db if bias is not None else None), None


_bias_act.register_autograd(_backward, setup_context=_setup_context)


def _check_input(x: Tensor, name: str) -> None:
    if x.dtype not in _FLOAT_DTYPES:
        # torch raises NotImplementedError ("GeluKernelImpl" not implemented for 'Long')
        raise NotImplementedError(
            f"fasttx {name}: input must be a floating-point tensor (float16, bfloat16, float32 "
            f"or float64), got {x.dtype}"
        )


_ACTIVATION = {"none": "gelu", "tanh": "gelu_tanh", "relu": "relu"}


def _activation(approximate: str) -> str:
    if approximate not in ("none", "tanh"):
        raise RuntimeError("approximate argument must be either none or tanh.")
    return _ACTIVATION[approximate]


def gelu(input: Tensor, approximate: str = "none") -> Tensor:
    """torch.nn.functional.gelu. input (*) -> (*), input's dtype and layout."""
    act = _activation(approximate)
    _check_input(input, "gelu")
    return keep_layout(lambda x: _bias_act(x, None, act), input)


def bias_act(input: Tensor, bias: Tensor, act: str, name: str) -> Tensor:
    """act(input + bias) in one pass, act "none"/"tanh" (GELU) or "relu". input (*, N), bias (N,)
    on input's device -> (*, N) in the promoted dtype; dbias is the fp32 column sum of the
    pre-activation gradient."""
    if act != "relu":
        act = _activation(act)
    _check_input(input, name)
    _check_input(bias, name)
    if bias.device != input.device:
        raise RuntimeError(f"fasttx {name}: expected bias on input's device {input.device}, got {bias.device}")
    # the kernels read bias[col] at unit stride: a strided bias (e.g. every other element of a
    # wider buffer) is copied, (N,) elements, instead of being read wrongly
    return _bias_act(input, bias.contiguous(), act)


# ----------------------------------------------------------------------------------------------
# Contracts (fasttx._registry.route)
# ----------------------------------------------------------------------------------------------
def _gelu_triton(input, approximate):
    _checks.check_str("gelu", "approximate", None, approximate)
    return gelu(input, approximate)


contract("gelu", tensors=lambda input, approximate: (input,), unsupported=lambda *a: None,
         triton=_gelu_triton, torch=lambda input, approximate: F.gelu(input, approximate=approximate))
# relu_squared: relu(x)^2 in one pass (torch: two kernels and a saved intermediate); an integer
# input (torch's relu takes one) runs torch's path
contract("relu_squared", tensors=lambda input: (input,),
         unsupported=lambda input: None if input.dtype in _FLOAT_DTYPES else f"an input of dtype {input.dtype}",
         triton=lambda input: keep_layout(lambda x: _bias_act(x, None, "relu2"), input),
         torch=lambda input: torch.square(F.relu(input)))
# relu: torch's own kernel on every path (there is nothing to fuse)
contract("relu", tensors=lambda *a: None, unsupported=lambda *a: None, triton=None,
         torch=lambda input, inplace: F.relu(input, inplace=inplace))


def _bias_unsupported(input, bias, *rest) -> Optional[str]:
    """The kernel takes one bias broadcast over input's last dim: (N,), or any shape of N elements
    that broadcasts to input unchanged, e.g. (1, N)."""
    shape = torch.broadcast_shapes(input.shape, bias.shape)  # torch's error when they don't
    if input.dim() == 0 or shape != input.shape or bias.numel() != input.shape[-1]:
        return (f"a bias of shape {tuple(bias.shape)} for an input of shape {tuple(input.shape)} "
                "is not a per-column bias")
    return None


def _bias_gelu_triton(input, bias, approximate):
    _checks.check_str("bias_gelu", "approximate", None, approximate)
    return bias_act(input, bias.reshape(-1), approximate, "bias_gelu")


contract("bias_gelu", tensors=lambda input, bias, approximate: (input, bias), unsupported=_bias_unsupported,
         triton=_bias_gelu_triton,
         torch=lambda input, bias, approximate: F.gelu(input + bias, approximate=approximate))
contract("bias_relu", tensors=lambda input, bias: (input, bias), unsupported=_bias_unsupported,
         triton=lambda input, bias: bias_act(input, bias.reshape(-1), "relu", "bias_relu"),
         torch=lambda input, bias: F.relu(input + bias))


# ----------------------------------------------------------------------------------------------
# DTensor sharding rules of the custom ops above (fasttx/distributed.py registers them). Each takes
# the op's arguments (tensors as DTensor's specs: .ndim, .shape, .placements; None when absent) and
# returns [(output placements, input placements), ...], one per output and per schema argument.
# ----------------------------------------------------------------------------------------------
@sharding_rule(_bias_act)
def _bias_act_rule(x, bias, activation):
    R, S, _ = placements()
    out = [([R], [R, opt(bias, R), None])]
    for d in range(x.ndim):
        b = S(0) if d == x.ndim - 1 else R  # a column-sharded input carries its bias slice
        out.append(([S(d)], [S(d), opt(bias, b), None]))
    return out


@sharding_rule(_bias_act_backward)
def _bias_act_backward_rule(grad, x, bias, activation):
    R, S, P = placements()
    out = [([R, R], [R, R, opt(bias, R), None])]
    for d in range(x.ndim):
        last = d == x.ndim - 1
        # dbias sums the rows: a partial sum per rank unless the columns are what is sharded
        db = R if bias is None else (S(0) if last else P)
        out.append(([S(d), db], [S(d), S(d), opt(bias, S(0) if last else R), None]))
    return out
