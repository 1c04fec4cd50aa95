"""Triton path of fasttx.functional.moe_experts: the routed expert MLP, forward and backward.

    fasttx::moe_experts(x, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_bias,
                        down_bias, expert_ids, activation, alpha, limit, gate_up_interleaved,
                        transposed) -> out
    fasttx::moe_experts_backward(dout, <the same>) -> (dx, d_top_k_weights, d_gate_up_proj,
                        d_down_proj, d_gate_up_bias, d_down_bias)

Autograd saves the inputs only: the backward rebuilds the routing metadata and recomputes the
gate/up activations (kernels/moe.py says why). `unsupported(...)` names what the kernels do not
cover (fp64, zero-size hidden or intermediate dims); fasttx.functional then runs the torch path.

expert_ids (None, or the (E_local,) global ids of the experts the weights hold) is a tensor
argument so that DTensor can shard it with the weights: expert parallel is then a sharding rule
(fasttx/distributed.py), each rank computing the pairs of its own experts (kernels/moe.py).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fasttx.kernels import moe as K


def unsupported(hidden_states: Tensor, gate_up_proj: Tensor, down_proj: Tensor) -> Optional[str]:
    if hidden_states.dtype == torch.float64:
        return "fp64 inputs (the kernels' tl.dot runs fp16, bf16 and fp32)"
    if hidden_states.shape[-1] == 0 or 0 in gate_up_proj.shape[1:] or down_proj.numel() == 0:
        return "a zero-size hidden or intermediate dim"
    return None


def _cfg(activation, alpha, limit, gate_up_interleaved, transposed):
    return (activation, alpha, limit, gate_up_interleaved, transposed)


@torch.library.custom_op("fasttx::moe_experts", mutates_args=())
def _moe_experts(x: Tensor, top_k_index: Tensor, top_k_weights: Tensor, gate_up_proj: Tensor, down_proj: Tensor,
                 gate_up_bias: Optional[Tensor], down_bias: Optional[Tensor], expert_ids: Optional[Tensor],
                 activation: str, alpha: float, limit: float, gate_up_interleaved: bool, transposed: bool) -> Tensor:
    cfg = _cfg(activation, alpha, limit, gate_up_interleaved, transposed)
    return K.moe_forward(x, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_bias, down_bias, cfg,
                         expert_ids)


@_moe_experts.register_fake
def _(x, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_bias, down_bias, expert_ids, *args):
    return x.new_empty(x.shape)


@torch.library.custom_op("fasttx::moe_experts_backward", mutates_args=())
def _moe_experts_backward(dout: Tensor, x: Tensor, top_k_index: Tensor, top_k_weights: Tensor, gate_up_proj: Tensor,
                          down_proj: Tensor, gate_up_bias: Optional[Tensor], down_bias: Optional[Tensor],
                          expert_ids: Optional[Tensor], activation: str, alpha: float, limit: float,
                          gate_up_interleaved: bool, transposed: bool
                          ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    cfg = _cfg(activation, alpha, limit, gate_up_interleaved, transposed)
    dx, dw, dw1, dw2, db1, db2 = K.moe_backward(dout, x, top_k_index, top_k_weights, gate_up_proj, down_proj,
                                                gate_up_bias, down_bias, cfg, expert_ids)
    # custom ops return no None (and no output twice): a fresh empty tensor for an absent bias
    return dx, dw, dw1, dw2, (db1 if db1 is not None else x.new_empty(0)), (db2 if db2 is not None else x.new_empty(0))


@_moe_experts_backward.register_fake
def _(dout, x, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_bias, down_bias, expert_ids, *args):
    def like(t):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None else x.new_empty(0)

    return (like(x), like(top_k_weights), like(gate_up_proj), like(down_proj), like(gate_up_bias), like(down_bias))


def _setup(ctx, inputs, output):
    x, idx, w, w1, w2, b1, b2, eids, *ctx.options = inputs
    ctx.save_for_backward(x, idx, w, w1, w2, b1, b2, eids)


def _backward(ctx, dout):
    x, idx, w, w1, w2, b1, b2, eids = ctx.saved_tensors
    dx, dw, dw1, dw2, db1, db2 = _moe_experts_backward(dout.contiguous(), x, idx, w, w1, w2, b1, b2, eids,
                                                       *ctx.options)
    return (dx, None, dw, dw1, dw2, db1 if b1 is not None else None, db2 if b2 is not None else None,
            None, None, None, None, None, None)


_moe_experts.register_autograd(_backward, setup_context=_setup)


def moe_experts(x: Tensor, top_k_index: Tensor, top_k_weights: Tensor, gate_up_proj: Tensor, down_proj: Tensor,
                gate_up_bias: Optional[Tensor], down_bias: Optional[Tensor], activation: str, alpha: float,
                limit: float, gate_up_interleaved: bool, transposed: bool,
                expert_ids: Optional[Tensor] = None) -> Tensor:
    """x (T, H) -> (T, H); arguments checked by fasttx.functional.moe_experts."""
    b1 = gate_up_bias.contiguous() if gate_up_bias is not None else None
    b2 = down_bias.contiguous() if down_bias is not None else None
    eids = expert_ids.contiguous() if expert_ids is not None else None
    return _moe_experts(x.contiguous(), top_k_index.contiguous(), top_k_weights.contiguous(), gate_up_proj,
                        down_proj, b1, b2, eids, activation, float(alpha), float(limit),
                        gate_up_interleaved, transposed)


# DTensor sharding rules for the ops above, when DTensor is in use (fasttx/distributed.py)
from fasttx.distributed import register_if_dtensor_loaded  # noqa: E402

register_if_dtensor_loaded()
