"""Expert parallel with the token exchange: tokens sharded over ranks, experts sharded over ranks,
(token, expert) pairs sent to the rank that holds their expert with `all_to_all` and the expert
outputs sent back, on torch.distributed (any backend with all_to_all: NCCL, gloo).

    out = moe_experts_all_to_all(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj,
                                 group=None, **moe_experts_keywords)

Each rank passes its own tokens (T_r, H), their top-k global expert ids and weights, and its own
experts: gate_up_proj / down_proj (and biases) hold experts r * E_local ... (r + 1) * E_local - 1
(the even split, E = world * E_local). The result is the rank's own tokens' output (T_r, H),
equal to `fasttx.functional.moe_experts` on all tokens and all experts, rows of this rank.

Steps: the T_r * k pairs are sorted by destination rank (stable); the per-destination counts go
to every rank (one all_to_all of W ints), then each pair's hidden row and expert id (dispatch);
each rank runs `moe_experts` on the rows it received with its local experts (expert_ids = its
global ids, routing weight 1); the outputs come back by the reverse all_to_all (combine) and are
weighted and summed per token in slot order, in fp32. The routing weights stay on the token's rank,
so d(top_k_weights) needs no exchange. Autograd runs through torch.distributed.nn.functional's
all_to_all_single (its backward is the reverse exchange): gradients reach the hidden states, the
routing weights and the rank's own experts (computed from every rank's pairs routed to them).

Costs: the split sizes of an all_to_all are host integers, so the counts are read on the host
once per call (one synchronisation, as every all_to_all dispatch has); a token routed to two
experts on one rank is sent twice (one row per pair, no deduplication).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["moe_experts_all_to_all"]


def _a2a(x: Tensor, out_splits, in_splits, group) -> Tensor:
    from torch.distributed.nn.functional import all_to_all_single

    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    return all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)


def _a2a_nograd(x: Tensor, out_splits, in_splits, group) -> Tensor:
    import torch.distributed as dist

    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


def moe_experts_all_to_all(hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor, gate_up_proj: Tensor,
                           down_proj: Tensor, *, group=None, gate_up_bias: Optional[Tensor] = None,
                           down_bias: Optional[Tensor] = None, **kwargs) -> Tensor:
    """This rank's tokens through every rank's experts (see the module docstring). kwargs:
    fasttx.functional.moe_experts' other keywords (activation, gate_up_interleaved, transposed,
    alpha, limit); expert_ids is set here."""
    import torch.distributed as dist

    from . import functional as FF

    if "expert_ids" in kwargs:
        raise TypeError("moe_experts_all_to_all(): expert_ids is set from the rank (experts split evenly)")
    if hidden_states.dim() != 2 or top_k_index.dim() != 2 or top_k_index.shape[0] != hidden_states.shape[0]:
        raise RuntimeError(f"moe_experts_all_to_all: hidden_states (T, H) and top_k_index (T, k) expected, got "
                           f"{list(hidden_states.shape)} and {list(top_k_index.shape)}")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    T, k = top_k_index.shape
    H = hidden_states.shape[1]
    e_local = gate_up_proj.shape[0]
    dev = hidden_states.device
    flat = top_k_index.reshape(-1).long()
    if flat.numel() and e_local == 0:
        raise IndexError("moe_experts_all_to_all: top_k_index selects experts, but this rank holds none")
    dest = flat // max(e_local, 1)
    ok = ((flat >= 0) & (dest < world)).all()
    if not bool(ok):  # the host already waits for the counts below
        raise IndexError(f"moe_experts_all_to_all: top_k_index must be in [0, {world * e_local}) "
                         f"(world {world} x {e_local} local experts)")
    order = torch.sort(dest, stable=True).indices  # pairs grouped by destination rank, pair order kept
    send_counts = torch.bincount(dest, minlength=world)
    recv_counts = _a2a_nograd(send_counts, [1] * world, [1] * world, group)
    counts = torch.stack([send_counts, recv_counts]).tolist()  # the one host read (split sizes)
    send, recv = counts
    x_send = hidden_states[order // k]  # (T k, H): one row per pair
    x_recv = _a2a(x_send, recv, send, group)
    ids_recv = _a2a_nograd(flat[order], recv, send, group)
    local_ids = torch.arange(rank * e_local, (rank + 1) * e_local, device=dev)
    ones = torch.ones(x_recv.shape[0], 1, device=dev, dtype=top_k_weights.dtype)
    y = FF.moe_experts(x_recv, ids_recv[:, None], ones, gate_up_proj, down_proj, gate_up_bias=gate_up_bias,
                       down_bias=down_bias, expert_ids=local_ids, **kwargs)
    y_back = _a2a(y, send, recv, group)  # (T k, H) in destination order
    inv = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=dev))
    y_pairs = y_back[inv].view(T, k, H).float()
    out = (top_k_weights.float()[:, :, None] * y_pairs).sum(1)
    return out.to(hidden_states.dtype)
