"""apply_rotary_emb: its contract (the argument rules, both backends; the torch path; the Triton
path; run by fasttx._registry.route) and its custom ops: q and k rotated in one launch, forward and
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

from fasttx.distributed import opt, placements, sharding_rule
from fasttx._registry import contract

from ._common import acc_dtype


def _kernels():
    from fasttx.kernels import rotary  # lazy: the torch path needs no triton

    return rotary


def unsupported(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, position_ids=None, interleaved=False,
                seq_dim=-2) -> Optional[str]:
    if cos.requires_grad or sin.requires_grad:
        return "the kernel computes no gradient for cos/sin, which require one"
    limit = _kernels().MAX_HEAD_DIM
    if q.shape[-1] > limit:
        return f"head dim {q.shape[-1]} > {limit}, the kernel's limit"
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
    return _kernels().rotary_forward(q, k, cos, sin, position_ids, interleaved)


@_rotary.register_fake
def _(q, k, cos, sin, position_ids, interleaved):
    return torch.empty_like(q), torch.empty_like(k)


@torch.library.custom_op("fasttx::rotary_backward", mutates_args=())
def _rotary_backward(dq: Tensor, dk: Tensor, cos: Tensor, sin: Tensor, position_ids: Optional[Tensor],
                     interleaved: bool) -> Tuple[Tensor, Tensor]:
    return _kernels().rotary_backward(dq, dk, cos, sin, position_ids, interleaved)


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


# ----------------------------------------------------------------------------------------------
# Contract (fasttx._registry.route): the argument rules (both backends) and the torch path
# ----------------------------------------------------------------------------------------------
def check(q, k, cos, sin, position_ids, seq_dim):
    """Check apply_rotary_emb's arguments; return (cos, sin, position_ids, seq_dim) normalized:
    seq_dim -2 or -3; cos/sin (Bc, L, R) without ids, (P, R) with ids (Bp, L)."""
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not isinstance(t, Tensor):
            raise TypeError(f"apply_rotary_emb(): argument '{name}' must be Tensor, not {type(t).__name__}")
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 4:
            raise RuntimeError(f"apply_rotary_emb: {name} must be a 4-D tensor (B, H, L, D) or (B, L, H, D), "
                               f"got {getattr(t, 'shape', type(t).__name__)}")
        if not t.is_floating_point():
            raise NotImplementedError(f"apply_rotary_emb: {name} must be floating-point, got {t.dtype}")
    if seq_dim not in (-2, -3, 2, 1):
        raise ValueError(f"apply_rotary_emb: seq_dim must be -2 (B, H, L, D) or -3 (B, L, H, D), got {seq_dim}")
    seq_dim = seq_dim - 4 if seq_dim > 0 else seq_dim
    B, L, D = q.shape[0], q.shape[seq_dim], q.shape[-1]
    if (k.shape[0], k.shape[seq_dim], k.shape[-1]) != (B, L, D):
        raise RuntimeError(f"apply_rotary_emb: q {list(q.shape)} and k {list(k.shape)} must share batch, "
                           f"sequence and head dims (seq_dim={seq_dim}); only the heads may differ")
    if k.dtype != q.dtype or k.device != q.device:
        raise RuntimeError(f"apply_rotary_emb: q and k must share dtype and device, got {q.dtype} on "
                           f"{q.device} and {k.dtype} on {k.device}")
    if cos.shape != sin.shape or not cos.is_floating_point() or not sin.is_floating_point():
        raise RuntimeError(f"apply_rotary_emb: cos and sin must be floating-point of one shape, got "
                           f"{list(cos.shape)} {cos.dtype} and {list(sin.shape)} {sin.dtype}")
    if cos.device != q.device or sin.device != q.device:
        raise RuntimeError(f"apply_rotary_emb: cos and sin must be on q's device {q.device}")
    R = cos.shape[-1] if cos.dim() else 0
    if R % 2 or R > D or R == 0 and D > 0:
        raise RuntimeError(f"apply_rotary_emb: the rotary dim (cos.shape[-1] = {R}) must be even, > 0 "
                           f"and at most the head dim {D}")
    if position_ids is None:
        if cos.dim() == 2:
            cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
        if cos.dim() != 3 or cos.shape[1] != L or cos.shape[0] not in (1, B):
            raise RuntimeError(f"apply_rotary_emb: without position_ids, cos and sin must be (L, R), (1, L, R) "
                               f"or (B, L, R) with L = {L}, B = {B}; got {list(cos.shape)}")
    else:
        if position_ids.dtype not in (torch.int64, torch.int32) or position_ids.device != q.device:
            raise RuntimeError(f"apply_rotary_emb: position_ids must be an int64/int32 tensor on {q.device}, "
                               f"got {position_ids.dtype} on {position_ids.device}")
        if position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)
        if position_ids.dim() != 2 or position_ids.shape[1] != L or position_ids.shape[0] not in (1, B):
            raise RuntimeError(f"apply_rotary_emb: position_ids must be (L,), (1, L) or (B, L) with L = {L}, "
                               f"B = {B}; got {list(position_ids.shape)}")
        if cos.dim() != 2:
            raise RuntimeError(f"apply_rotary_emb: with position_ids, cos and sin are (P, R) tables indexed "
                               f"by the ids; got {list(cos.shape)}")
    return cos, sin, position_ids, seq_dim


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """x (..., D) rotated by cos/sin (..., R) broadcast to it, in fp32, cast back to x's dtype."""
    R = cos.shape[-1]
    acc = acc_dtype(x.dtype)
    xr, xp = x[..., :R].to(acc), x[..., R:]
    if interleaved:  # GPT-J's rotate_every_two
        rotated = torch.stack((-xr[..., 1::2], xr[..., 0::2]), dim=-1).flatten(-2)
    else:  # GPT-NeoX / Llama's rotate_half
        x1, x2 = xr.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
    y = (xr * cos.to(acc) + rotated * sin.to(acc)).to(x.dtype)
    return torch.cat((y, xp), dim=-1) if R < x.shape[-1] else y


def _prepare(q, k, cos, sin, position_ids, interleaved, seq_dim):
    cos, sin, position_ids, seq_dim = check(q, k, cos, sin, position_ids, seq_dim)
    return q, k, cos, sin, position_ids, interleaved, seq_dim


def _torch(q, k, cos, sin, position_ids, interleaved, seq_dim):
    if position_ids is not None:
        cos, sin = cos[position_ids], sin[position_ids]  # (Bp, L, R)
    cos, sin = cos.unsqueeze(-3 if seq_dim == -2 else -2), sin.unsqueeze(-3 if seq_dim == -2 else -2)
    return _rotate(q, cos, sin, interleaved), _rotate(k, cos, sin, interleaved)


contract("apply_rotary_emb", prepare=_prepare,
         tensors=lambda q, k, cos, sin, position_ids, interleaved, seq_dim: (q, k, cos, sin, position_ids),
         unsupported=unsupported, triton=apply_rotary_emb, torch=_torch)


# ----------------------------------------------------------------------------------------------
# DTensor sharding rules of the custom ops above (fasttx/distributed.py registers them). Each takes
# the op's arguments (tensors as DTensor's specs: .ndim, .shape, .placements; None when absent) and
# returns [(output placements, input placements), ...], one per output and per schema argument.
# ----------------------------------------------------------------------------------------------
@sharding_rule(_rotary)
@sharding_rule(_rotary_backward)
def _rotary_rule(q, k, cos, sin, position_ids, interleaved):
    # q, k (B, H, L, D): heads sharded, the cos/sin tables (and position ids) replicated
    R, S, _ = placements()
    return [([R, R], [R, R, R, R, opt(position_ids, R), None]),
            ([S(1), S(1)], [S(1), S(1), R, R, opt(position_ids, R), None])]
