"""Triton path of fasttx.functional.swiglu and geglu: y = act(gate) * up in one pass, forward and
backward, for two separate tensors or the concatenated (gate|up) layout (up None).

    fasttx::gated_act(gate, up, activation) -> y
    fasttx::gated_act_backward(dy, gate, up, activation) -> (d_gate, d_up)

Autograd saves gate and up (not y): the backward recomputes act(gate) for d_up.
`unsupported(...)` is None (the kernels cover every valid call). The argument rules are fasttx's
own (torch has no such op), so fasttx.functional checks them for both backends before dispatch.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fasttx.kernels import gelu as K

def unsupported(gate: Tensor, up: Optional[Tensor] = None, activation: str = "silu") -> Optional[str]:
    return None


def _out_shape(gate: Tensor, up: Optional[Tensor]):
    return gate.shape if up is not None else gate.shape[:-1] + (gate.shape[-1] // 2,)


@torch.library.custom_op("fasttx::gated_act", mutates_args=())
def _gated_act(gate: Tensor, up: Optional[Tensor], activation: str) -> Tensor:
    return K.gated_act_forward(gate, up, activation)


@_gated_act.register_fake
def _(gate, up, activation):
    return gate.new_empty(_out_shape(gate, up))


@torch.library.custom_op("fasttx::gated_act_backward", mutates_args=())
def _gated_act_backward(dy: Tensor, gate: Tensor, up: Optional[Tensor], activation: str) -> Tuple[Tensor, Tensor]:
    dgate, dup = K.gated_act_backward(dy, gate, up, activation)
    return dgate, (dup if dup is not None else gate.new_empty(0))  # custom ops return no None


@_gated_act_backward.register_fake
def _(dy, gate, up, activation):
    return gate.new_empty(gate.shape), (up.new_empty(up.shape) if up is not None else gate.new_empty(0))


def _setup(ctx, inputs, output):
    gate, up, ctx.activation = inputs
    ctx.save_for_backward(gate, up)


def _backward(ctx, dy):
    gate, up = ctx.saved_tensors
    dgate, dup = _gated_act_backward(dy, gate, up, ctx.activation)
    return dgate, (dup if up is not None else None), None


_gated_act.register_autograd(_backward, setup_context=_setup)


def swiglu(gate: Tensor, up: Optional[Tensor] = None) -> Tensor:
    """silu(gate) * up. gate, up (*, N) -> (*, N); up None: gate (*, 2N) = (gate|up)."""
    return _gated_act(gate, up, "silu")


def geglu(gate: Tensor, up: Optional[Tensor] = None, approximate: str = "none") -> Tensor:
    """gelu(gate, approximate) * up. Shapes as swiglu."""
    return _gated_act(gate, up, "gelu" if approximate == "none" else "gelu_tanh")


# DTensor sharding rules for the ops above, when DTensor is in use (fasttx/distributed.py)
from fasttx.distributed import register_if_dtensor_loaded  # noqa: E402

register_if_dtensor_loaded()
