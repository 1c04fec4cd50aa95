"""Triton path of fasttx.functional.scaled_dot_product_attention.

The public function checks the arguments with torch's rules, normalises them to the kernels'
layout (q (B, Hq, L, E), k/v (B, Hkv, S, E) with a contiguous last dim, the mask expand()ed to
(B, Hq, L, S) without copying) and calls the custom op `fasttx::sdpa_fwd`, whose autograd calls
`fasttx::sdpa_bwd`. Broadcasting and reshapes happen outside the custom op, so autograd sums the
gradients of broadcast (stride-0) batch and head dims by itself.

Cases the kernels do not cover go to torch's own F.scaled_dot_product_attention (same semantics)
with a one-time warning: E != Ev, head dims above 256, float64 inputs, and a float mask that
requires grad (torch differentiates the mask; the fused kernels never materialise the L x S
gradient it would need).
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fasttx.kernels import attention as K

from fasttx._checks import check_dropout_p

from ._common import draw_philox_seed

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_warned: set = set()


def _fallback(reason: str, *args, **kwargs) -> Tensor:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"fasttx scaled_dot_product_attention: {reason}; using torch's "
                      "F.scaled_dot_product_attention instead of the fused kernel", stacklevel=3)
    return F.scaled_dot_product_attention(*args, **kwargs)


# ------------------------------------------------------------------------------------------------
# Custom ops
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("fasttx::sdpa_fwd", mutates_args=())
def _sdpa_fwd(
    q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], dropout_p: float, is_causal: bool, scale: float
) -> Tuple[Tensor, Tensor, Tensor]:
    """q (B, Hq, L, E), k/v (B, Hkv, S, E), mask (B, Hq, L, S) or None ->
    (out (B, Hq, L, E), lse fp32 (B, Hq, L), seed int64 () on the CPU)."""
    seed = draw_philox_seed() if dropout_p > 0.0 else 0  # drawn here: torch.compile traces no .item()
    out, lse = K.attention_forward(q, k, v, mask, scale=scale, is_causal=is_causal, dropout_p=dropout_p, seed=seed)
    return out, lse, torch.tensor(seed, dtype=torch.int64)


@_sdpa_fwd.register_fake
def _(q, k, v, mask, dropout_p, is_causal, scale):
    B, H, L, E = q.shape
    return (q.new_empty((B, H, L, E)), q.new_empty((B, H, L), dtype=torch.float32),
            torch.empty((), dtype=torch.int64, device="cpu"))


@torch.library.custom_op("fasttx::sdpa_bwd", mutates_args=())
def _sdpa_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], out: Tensor, lse: Tensor,
    seed: Tensor, dropout_p: float, is_causal: bool, scale: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq like q, dk and dv like k) from the forward's out, lse and dropout seed."""
    return K.attention_backward(dout, q, k, v, mask, out, lse, scale=scale, is_causal=is_causal,
                                dropout_p=dropout_p, seed=int(seed.item()))


@_sdpa_bwd.register_fake
def _(dout, q, k, v, mask, out, lse, seed, dropout_p, is_causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, dropout_p, is_causal, scale = inputs
    out, lse, seed = output
    ctx.save_for_backward(q, k, v, mask, out, lse, seed)
    ctx.opts = (dropout_p, is_causal, scale)


def _backward(ctx, dout, _dlse, _dseed):
    q, k, v, mask, out, lse, seed = ctx.saved_tensors
    dq, dk, dv = _sdpa_bwd(dout, q, k, v, mask, out, lse, seed, *ctx.opts)
    return dq, dk, dv, None, None, None, None


_sdpa_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# Public entry (called by fasttx.functional on the Triton path)
# ------------------------------------------------------------------------------------------------
def _broadcast(name: str, *shapes) -> torch.Size:
    try:
        return torch.broadcast_shapes(*shapes)
    except RuntimeError as e:
        raise RuntimeError(f"scaled_dot_product_attention: {name} of query, key and value "
                           f"{[tuple(s) for s in shapes]} are not broadcastable ({e})") from None


def _check(query, key, value, attn_mask, dropout_p, enable_gqa):
    if query.dim() < 2 or key.dim() < 2 or value.dim() < 2:
        raise RuntimeError("scaled_dot_product_attention: expected query, key and value to be at least "
                           f"2 dimensional, got query.dim()={query.dim()}, key.dim()={key.dim()}, "
                           f"value.dim()={value.dim()}")
    if not (query.dtype == key.dtype == value.dtype):
        raise RuntimeError("scaled_dot_product_attention: expected query, key and value to have the same "
                           f"dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    if not (query.device == key.device == value.device):
        raise RuntimeError("scaled_dot_product_attention: expected query, key and value on the same device, "
                           f"got {query.device}, {key.device}, {value.device}")
    if not query.is_floating_point():
        raise RuntimeError(f"scaled_dot_product_attention: query must be floating point, got {query.dtype}")
    check_dropout_p(dropout_p)
    if query.size(-1) != key.size(-1):
        raise RuntimeError("scaled_dot_product_attention: query and key must have the same head dim E, got "
                           f"{query.size(-1)} and {key.size(-1)}")
    if key.size(-2) != value.size(-2):
        raise RuntimeError("scaled_dot_product_attention: key and value must have the same sequence length S, "
                           f"got {key.size(-2)} and {value.size(-2)}")
    if attn_mask is not None:
        if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
            raise RuntimeError("scaled_dot_product_attention: attn_mask must be bool, float32 or query's "
                               f"dtype {query.dtype}, got {attn_mask.dtype}")
        if attn_mask.device != query.device:
            raise RuntimeError("scaled_dot_product_attention: attn_mask must be on query's device "
                               f"{query.device}, got {attn_mask.device}")
    if enable_gqa:
        if min(query.dim(), key.dim(), value.dim()) < 3:
            raise IndexError("scaled_dot_product_attention: enable_gqa needs query, key and value with a "
                             "heads dim (-3), i.e. at least 3 dimensions")
        hq, hk, hv = query.size(-3), key.size(-3), value.size(-3)
        if hk == 0 or hv == 0 or hq % hk or hq % hv:
            raise RuntimeError("scaled_dot_product_attention: with enable_gqa the number of heads in key and "
                               f"value must divide the number of heads in query, got Hq={hq}, "
                               f"Hk={hk}, Hv={hv}")


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention through the fused Triton kernels.

    query (N, ..., Hq, L, E), key (N, ..., H, S, E), value (N, ..., H, S, Ev) -> (N, ..., Hq, L, Ev);
    leading dims broadcast like torch's. attn_mask bool (True = attend) or float (added), broadcastable
    to (N, ..., Hq, L, S); given together with is_causal both apply (torch's CPU and fused kernels
    behave so). is_causal: query i sees keys j <= i (top-left aligned). scale defaults to 1/sqrt(E).
    enable_gqa: Hq % H == 0, query head h uses kv head h // (Hq // H) (no copy).
    """
    _check(query, key, value, attn_mask, dropout_p, enable_gqa)
    args = (query, key, value)
    kwargs = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    if query.size(-1) != value.size(-1):
        return _fallback("value's head dim Ev differs from E (the kernel needs E == Ev)", *args, **kwargs)
    if query.dtype not in _KERNEL_DTYPES:
        return _fallback(f"dtype {query.dtype} is not supported by the kernel", *args, **kwargs)
    if query.size(-1) > K.MAX_HEAD_DIM:
        return _fallback(f"head dim above {K.MAX_HEAD_DIM}", *args, **kwargs)
    if attn_mask is not None and attn_mask.requires_grad and torch.is_grad_enabled():
        return _fallback("attn_mask requires grad", *args, **kwargs)

    L, S, E = query.size(-2), key.size(-2), query.size(-1)
    scale = 1.0 / math.sqrt(E) if scale is None else float(scale)
    if enable_gqa:
        batch = _broadcast("batch dims", query.shape[:-3], key.shape[:-3], value.shape[:-3])
        hq, hk, hv = query.size(-3), key.size(-3), value.size(-3)
        if hk != hv:  # rare: k and v share the kv head count in the kernel; copy to Hq heads
            key = key.repeat_interleave(hq // hk, dim=-3)
            value = value.repeat_interleave(hq // hv, dim=-3)
            hk = hq
        out_lead = (*batch, hq)
    else:
        out_lead = _broadcast("leading dims", query.shape[:-2], key.shape[:-2], value.shape[:-2])
        batch = out_lead[:-1]
        hq = hk = out_lead[-1] if len(out_lead) else 1
    B = math.prod(batch)

    def norm(t, h, n):  # (..., h, n, E) -> (B, h, n, E), broadcast dims kept as stride 0 where possible
        t = t.expand(*batch, h, n, E).reshape(B, h, n, E)
        return t if t.stride(-1) == 1 else t.contiguous()

    q = norm(query, hq, L)  # (B, Hq, L, E)
    k = norm(key, hk, S)  # (B, Hkv, S, E)
    v = norm(value, hk, S)  # (B, Hkv, S, E)
    mask = None
    if attn_mask is not None:
        try:
            mask = attn_mask.expand(*batch, hq, L, S)
        except RuntimeError:
            raise RuntimeError(f"scaled_dot_product_attention: attn_mask of shape {tuple(attn_mask.shape)} is "
                               f"not broadcastable to (N, ..., Hq, L, S) = {(*batch, hq, L, S)}") from None
        mask = mask.reshape(B, hq, L, S)  # (B, Hq, L, S), stride-0 dims stay stride 0
    out, _, _ = _sdpa_fwd(q, k, v, mask, float(dropout_p), bool(is_causal), scale)
    return out.reshape(*out_lead, L, E)  # (N, ..., Hq, L, E)
