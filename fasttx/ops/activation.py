"""Triton path of gelu, bias_gelu and bias_relu: one custom op pair (forward, backward) for
y = act(x + bias), act in {exact GELU, tanh GELU, ReLU}, bias optional.

The public functions check arguments (torch's rules and exception types) and call the op; the op
calls the launchers in fasttx.kernels.gelu. Autograd saves x and bias (not y): the backward
recomputes z = x + bias, which also gives dbias.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fasttx.kernels import gelu as K
from ._common import keep_layout

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _out_dtype(x: Tensor, bias: Optional[Tensor]) -> torch.dtype:
    # x + bias promotes like torch (e.g. bf16 input with an fp32 bias gives fp32)
    return x.dtype if bias is None else torch.promote_types(x.dtype, bias.dtype)


@torch.library.custom_op("fasttx::bias_act", mutates_args=())
def _bias_act(x: Tensor, bias: Optional[Tensor], activation: str) -> Tensor:
    return K.bias_act_forward(x, bias, activation, _out_dtype(x, bias))


@_bias_act.register_fake
def _(x, bias, activation):
    return x.new_empty(x.shape, dtype=_out_dtype(x, bias))


@torch.library.custom_op("fasttx::bias_act_backward", mutates_args=())
def _bias_act_backward(
    grad: Tensor, x: Tensor, bias: Optional[Tensor], activation: str
) -> Tuple[Tensor, Tensor]:
    dx, db = K.bias_act_backward(grad, x, bias, activation)
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
    return _bias_act(input, bias, act)


# DTensor sharding rules for the ops above, when DTensor is in use (fasttx/distributed.py)
from fasttx.distributed import register_if_dtensor_loaded  # noqa: E402

register_if_dtensor_loaded()
