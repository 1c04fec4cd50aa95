"""Triton path of fasttx.functional.swiglu and geglu: y = act(gate) * up in one pass, forward and
backward, for two separate tensors or the concatenated (gate|up) layout (up None).

    fasttx::gated_act(gate, up, activation) -> y
    fasttx::gated_act_backward(dy, gate, up, activation) -> (d_gate, d_up)

Autograd saves gate and up (not y): the backward recomputes act(gate) for d_up.
`unsupported(...)` is None (the kernels cover every valid call). The argument rules are fasttx's
own (torch has no such op), so the contracts below check them for both backends before dispatch
(`prepare`, run by fasttx._registry.route).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fasttx.distributed import opt, placements, sharding_rule
from fasttx._registry import contract

from ._common import FLOATS


def _kernels():
    from fasttx.kernels import gelu  # lazy: the torch path needs no triton

    return gelu


def unsupported(gate: Tensor, up: Optional[Tensor] = None, activation: str = "silu") -> Optional[str]:
    return None


def _out_shape(gate: Tensor, up: Optional[Tensor]):
    return gate.shape if up is not None else gate.shape[:-1] + (gate.shape[-1] // 2,)


@torch.library.custom_op("fasttx::gated_act", mutates_args=())
def _gated_act(gate: Tensor, up: Optional[Tensor], activation: str) -> Tensor:
    return _kernels().gated_act_forward(gate, up, activation)


@_gated_act.register_fake
def _(gate, up, activation):
    return gate.new_empty(_out_shape(gate, up))


@torch.library.custom_op("fasttx::gated_act_backward", mutates_args=())
def _gated_act_backward(dy: Tensor, gate: Tensor, up: Optional[Tensor], activation: str) -> Tuple[Tensor, Tensor]:
    dgate, dup = _kernels().gated_act_backward(dy, gate, up, activation)
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


# ----------------------------------------------------------------------------------------------
# Contracts (fasttx._registry.route): the argument rules, both backends
# ----------------------------------------------------------------------------------------------
def check(op: str, gate: Tensor, up: Optional[Tensor]) -> None:
    for name, t in (("gate", gate), ("up", up)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{op}(): argument '{name}' must be Tensor, not {type(t).__name__}")
        if t is not None and t.dtype not in FLOATS:
            # NotImplementedError, as torch's activations raise for integer tensors
            raise NotImplementedError(f"fasttx {op}: {name} must be a floating-point tensor, got {t.dtype}")
    if up is None:
        if gate.dim() == 0 or gate.shape[-1] % 2:
            raise RuntimeError(
                f"fasttx {op}: with up=None, gate is the concatenated (gate|up) tensor and its last "
                f"dim must be even, got shape {list(gate.shape)}"
            )
    elif gate.shape != up.shape:
        raise RuntimeError(
            f"fasttx {op}: gate and up must have the same shape, got {list(gate.shape)} and {list(up.shape)}"
        )
    elif gate.dtype != up.dtype or gate.device != up.device:
        raise RuntimeError(
            f"fasttx {op}: gate and up must have the same dtype and device, got {gate.dtype} on "
            f"{gate.device} and {up.dtype} on {up.device}"
        )


def _swiglu_prepare(gate, up):
    check("swiglu", gate, up)
    return gate, up


def _swiglu_torch(gate, up):
    if up is None:
        gate, up = gate.chunk(2, dim=-1)
    return F.silu(gate) * up


def _geglu_prepare(gate, up, approximate):
    if approximate not in ("none", "tanh"):
        raise RuntimeError(f"approximate argument must be either none or tanh, got {approximate!r}")
    check("geglu", gate, up)
    return gate, up, approximate


def _geglu_torch(gate, up, approximate):
    if up is None:
        gate, up = gate.chunk(2, dim=-1)
    return F.gelu(gate, approximate=approximate) * up


contract("swiglu", prepare=_swiglu_prepare, tensors=lambda gate, up: (gate, up),
         unsupported=lambda gate, up: unsupported(gate, up, "silu"), triton=swiglu, torch=_swiglu_torch)
contract("geglu", prepare=_geglu_prepare, tensors=lambda gate, up, approximate: (gate, up),
         unsupported=unsupported, triton=geglu, torch=_geglu_torch)


# ----------------------------------------------------------------------------------------------
# DTensor sharding rules of the custom ops above (fasttx/distributed.py registers them). Each takes
# the op's arguments (tensors as DTensor's specs: .ndim, .shape, .placements; None when absent) and
# returns [(output placements, input placements), ...], one per output and per schema argument.
# ----------------------------------------------------------------------------------------------
def _gated_dims(gate, up):
    # up=None: gate holds (gate | up) side by side on the last dim, which must stay whole
    return range(gate.ndim if up is not None else gate.ndim - 1)


@sharding_rule(_gated_act)
def _gated_act_rule(gate, up, activation):
    R, S, _ = placements()
    return [([R], [R, opt(up, R), None])] + [
        ([S(d)], [S(d), opt(up, S(d)), None]) for d in _gated_dims(gate, up)]


@sharding_rule(_gated_act_backward)
def _gated_act_backward_rule(dy, gate, up, activation):
    R, S, _ = placements()
    return [([R, R], [R, R, opt(up, R), None])] + [
        ([S(d), S(d) if up is not None else R], [S(d), S(d), opt(up, S(d)), None])
        for d in _gated_dims(gate, up)]
