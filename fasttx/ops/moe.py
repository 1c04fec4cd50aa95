"""moe_experts: its contract (the argument rules and autocast on both paths, `unsupported`, the Triton
path here, the torch path in fasttx/_moe.py; run by fasttx._registry.route), the routed expert MLP's
custom ops, forward and backward, and their DTensor rules.

    fasttx::moe_experts(x, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_bias,
                        down_bias, expert_ids, activation, alpha, limit, gate_up_interleaved,
                        transposed) -> out
    fasttx::moe_experts_backward(dout, <the same>) -> (dx, d_top_k_weights, d_gate_up_proj,
                        d_down_proj, d_gate_up_bias, d_down_bias)

Autograd saves the inputs only: the backward rebuilds the routing metadata and recomputes the
gate/up activations (kernels/moe/ says why). `unsupported(...)` names what the kernels do not
cover (fp64, zero-size hidden or intermediate dims); route() then runs the torch path.

expert_ids (None, or the (E_local,) global ids of the experts the weights hold) is a tensor
argument so that DTensor can shard it with the weights: expert parallel is then a sharding rule
(below, registered by fasttx/distributed.py), each rank computing the pairs of its own experts (kernels/moe/).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fasttx import _moe
from fasttx._registry import autocast_inputs, contract
from fasttx.distributed import opt, placements, sharding_rule


def _kernels():
    from fasttx.kernels import moe  # lazy: the torch path needs no triton

    return moe


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
    return _kernels().moe_forward(x, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_bias, down_bias, cfg,
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
    dx, dw, dw1, dw2, db1, db2 = _kernels().moe_backward(dout, x, top_k_index, top_k_weights, gate_up_proj, down_proj,
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
    """x (T, H) -> (T, H); arguments checked by the contract's prepare (below)."""
    b1 = gate_up_bias.contiguous() if gate_up_bias is not None else None
    b2 = down_bias.contiguous() if down_bias is not None else None
    eids = expert_ids.contiguous() if expert_ids is not None else None
    return _moe_experts(x.contiguous(), top_k_index.contiguous(), top_k_weights.contiguous(), gate_up_proj,
                        down_proj, b1, b2, eids, activation, float(alpha), float(limit),
                        gate_up_interleaved, transposed)


# ----------------------------------------------------------------------------------------------
# Contract (fasttx._registry.route). Arguments in fasttx.functional.moe_experts' order.
# ----------------------------------------------------------------------------------------------
def _prepare(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, activation, gate_up_bias,
             down_bias, gate_up_interleaved, transposed, alpha, limit, expert_ids):
    if all(isinstance(t, Tensor) for t in (hidden_states, gate_up_proj, down_proj)):  # else check() says which
        hidden_states, gate_up_proj, down_proj, gate_up_bias, down_bias = autocast_inputs(
            "moe_experts", hidden_states, gate_up_proj, down_proj, gate_up_bias, down_bias)
    _moe.check(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, activation, gate_up_bias,
               down_bias, gate_up_interleaved, transposed, alpha, limit, expert_ids)
    return (hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, activation, gate_up_bias,
            down_bias, gate_up_interleaved, transposed, alpha, limit, expert_ids)


def _path(fn):
    def path(x, idx, w, w1, w2, activation, b1, b2, interleaved, transposed, alpha, limit, expert_ids):
        return fn(x, idx, w, w1, w2, b1, b2, activation, float(alpha), float(limit), interleaved, transposed,
                  expert_ids=expert_ids)

    return path


contract("moe_experts", prepare=_prepare,
         tensors=lambda x, idx, w, w1, w2, activation, b1, b2, il, tr, alpha, limit, eids: (
             x, idx, w, w1, w2, b1, b2, eids),
         unsupported=lambda x, idx, w, w1, w2, *rest: unsupported(x, w1, w2),
         triton=_path(moe_experts), torch=_path(_moe.moe_torch))


# ----------------------------------------------------------------------------------------------
# DTensor sharding rules of the custom ops above (fasttx/distributed.py registers them)
# ----------------------------------------------------------------------------------------------
@sharding_rule(_moe_experts)
def _moe_experts_rule(x, idx, w, w1, w2, b1, b2, eids, *scalars):
    # Tokens sharded (Shard(0) of hidden_states, top_k_index, top_k_weights) with the experts
    # replicated: each rank runs its tokens. Expert parallel: with expert_ids (the global ids of the
    # weights' experts) sharded like the weights, each rank's local expert_ids say which experts its
    # shard holds; the tokens replicated, each rank runs the pairs routed to its experts and the
    # output is the sum over ranks (Partial). Without expert_ids, expert-sharded weights are
    # all-gathered by DTensor (a rank could not tell which global experts its shard holds).
    R, S, P = placements()
    tail = [None] * len(scalars)
    out = [([R], [R, R, R, R, R, opt(b1, R), opt(b2, R), opt(eids, R), *tail]),
           ([S(0)], [S(0), S(0), S(0), R, R, opt(b1, R), opt(b2, R), opt(eids, R), *tail])]
    if eids is not None:
        out.append(([P], [R, R, R, S(0), S(0), opt(b1, S(0)), opt(b2, S(0)), S(0), *tail]))
    return out


@sharding_rule(_moe_experts_backward)
def _moe_experts_backward_rule(dout, x, idx, w, w1, w2, b1, b2, eids, *scalars):
    # token-sharded: d x and d top_k_weights stay sharded, the weight and bias grads are partial sums;
    # expert parallel: d x and d top_k_weights are partial sums (each rank's experts' share), the
    # weight and bias grads sharded as the weights (each rank's experts' own)
    R, S, P = placements()
    tail = [None] * len(scalars)
    rep = [R, R, R, R, R, R, opt(b1, R), opt(b2, R), opt(eids, R), *tail]
    shard = [S(0), S(0), S(0), S(0), R, R, opt(b1, R), opt(b2, R), opt(eids, R), *tail]
    out = [([R] * 6, rep), ([S(0), S(0), P, P, P if b1 is not None else R, P if b2 is not None else R], shard)]
    if eids is not None:
        ep = [R, R, R, R, S(0), S(0), opt(b1, S(0)), opt(b2, S(0)), S(0), *tail]
        out.append(([P, P, S(0), S(0), S(0) if b1 is not None else R, S(0) if b2 is not None else R], ep))
    return out
