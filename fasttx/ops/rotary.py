"""Triton path of fasttx.functional.apply_rotary_emb: q and k rotated in one launch, forward and
backward (the transposed rotation), from the caller's cos/sin tables.

    fasttx::rotary(q, k, cos, sin, position_ids, interleaved) -> (q_out, k_out)
    fasttx::rotary_backward(dq, dk, cos, sin, position_ids, interleaved) -> (dq_in, dk_in)
q, k in the logical (B, H, L, D) order (a (B, L, H, D) tensor enters as its transpose(1, 2) view:
no copy); cos, sin (Bc, L, R), or (P, R) tables with position_ids (Bp, L). cos and sin take no
gradient (`unsupported` sends a call whose tables require one to torch's path).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fasttx.kernels import rotary as K


def unsupported(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, position_ids=None, interleaved=False,
                seq_dim=-2) -> Optional[str]:
    if cos.requires_grad or sin.requires_grad:
        return "the kernel computes no gradient for cos/sin, which require one"
    if q.shape[-1] > K.MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {K.MAX_HEAD_DIM}, the kernel's limit"
    return None


def _check_ids(position_ids: Optional[Tensor], P: int) -> None:
    # Out-of-range ids raise as torch's indexing does (the kernel also clamps, so never reads out
    # of bounds). A host check: skipped while a CUDA graph is captured (it would sync).
    if position_ids is None or position_ids.numel() == 0:
        return
    if position_ids.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    lo, hi = int(position_ids.min()), int(position_ids.max())
    if lo < 0 or hi >= P:
        raise IndexError(f"apply_rotary_emb: position_ids must lie in [0, {P}) (the tables' rows), "
                         f"got values in [{lo}, {hi}]")


@torch.library.custom_op("fasttx::rotary", mutates_args=())
def _rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, position_ids: Optional[Tensor],
            interleaved: bool) -> Tuple[Tensor, Tensor]:
    _check_ids(position_ids, cos.shape[0])
    return K.rotary_forward(q, k, cos, sin, position_ids, interleaved)


@_rotary.register_fake
def _(q, k, cos, sin, position_ids, interleaved):
    return torch.empty_like(q), torch.empty_like(k)


@torch.library.custom_op("fasttx::rotary_backward", mutates_args=())
def _rotary_backward(dq: Tensor, dk: Tensor, cos: Tensor, sin: Tensor, position_ids: Optional[Tensor],
                     interleaved: bool) -> Tuple[Tensor, Tensor]:
    return K.rotary_backward(dq, dk, cos, sin, position_ids, interleaved)


@_rotary_backward.register_fake
def _(dq, dk, cos, sin, position_ids, interleaved):
    return torch.empty_like(dq), torch.empty_like(dk)


def _setup(ctx, inputs, output):
    q, k, cos, sin, position_ids, ctx.interleaved = inputs
    ctx.save_for_backward(cos, sin, position_ids)
    ctx.shapes = (tuple(q.shape), q.dtype, tuple(k.shape), k.dtype)  # zeros for an unused output


def _backward(ctx, dq, dk):
    cos, sin, position_ids = ctx.saved_tensors
    qs, qd, ks, kd = ctx.shapes
    dq = dq if dq is not None else cos.new_zeros(qs, dtype=qd)
    dk = dk if dk is not None else cos.new_zeros(ks, dtype=kd)
    dq_in, dk_in = _rotary_backward(dq, dk, cos, sin, position_ids, ctx.interleaved)
    return dq_in, dk_in, None, None, None, None


_rotary.register_autograd(_backward, setup_context=_setup)


def apply_rotary_emb(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, position_ids: Optional[Tensor],
                     interleaved: bool, seq_dim: int) -> Tuple[Tensor, Tensor]:
    """Arguments already checked and normalized by fasttx.functional: q, k 4-D, seq_dim -2 or -3;
    cos/sin (Bc, L, R) without ids, (P, R) with ids (Bp, L)."""
    if seq_dim == -3:  # (B, L, H, D) -> its (B, H, L, D) view
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    qo, ko = _rotary(q, k, cos, sin, position_ids, interleaved)
    if seq_dim == -3:
        qo, ko = qo.transpose(1, 2), ko.transpose(1, 2)
    return qo, ko


# DTensor sharding rules for the ops above, when DTensor is in use (fasttx/distributed.py)
from fasttx.distributed import register_if_dtensor_loaded  # noqa: E402

register_if_dtensor_loaded()
