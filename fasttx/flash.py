"""fasttx.flash: drop-ins for flash-attn 2's attention functions, on fasttx's Triton kernels, with
a plain torch path everywhere else (CPU, the "torch" backend).

Shipped: `flash_attn_func` (forward and backward). Semantics are flash-attn's, not SDPA's:
q (B, Lq, H, D), k/v (B, Lk, Hk, D) with H % Hk == 0 (GQA/MQA without copies on the Triton path);
causal is aligned to the bottom-right corner (query i sees keys j <= i + Lk - Lq), a row that sees
no key gives zeros. The Triton path covers causal/non-causal attention with dropout; the sliding
window, softcap and ALiBi run the torch path (with one warning) until the kernels carry them.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._backend import use_triton, warn_fallback

__all__ = ["flash_attn_func"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256


def _check(q, k, v, dropout_p, window_size, softcap, alibi_slopes) -> None:
    name = "flash_attn_func"
    for arg, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: {arg} must be a 4-D tensor (batch, seqlen, heads, headdim), got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        raise ValueError(f"{name}: q, k, v must share one dtype among float16, bfloat16, float32; got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{name}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, Lq, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"{name}: k and v must be (batch, seqlen_k, heads_k, headdim) = (B, Lk, Hk, {D}) "
                         f"like each other, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    Hk = k.shape[2]
    if Hk == 0 or H % Hk:
        raise ValueError(f"{name}: the number of query heads must be divisible by the number of key/value "
                         f"heads, got {H} and {Hk}")
    if D > _MAX_HEAD_DIM:
        raise ValueError(f"{name}: head dim {D} above {_MAX_HEAD_DIM} is not supported")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"{name}: dropout_p must be in [0, 1], got {dropout_p}")
    if len(window_size) != 2 or not all(isinstance(w, int) and w >= -1 for w in window_size):
        raise ValueError(f"{name}: window_size must be (left, right), ints >= -1 (-1: unbounded), got {window_size}")
    if softcap < 0.0:
        raise ValueError(f"{name}: softcap must be >= 0 (0: off), got {softcap}")
    if alibi_slopes is not None:
        if alibi_slopes.dtype != torch.float32 or alibi_slopes.shape not in ((H,), (B, H)):
            raise ValueError(f"{name}: alibi_slopes must be float32 of shape ({H},) or ({B}, {H}), got "
                             f"{alibi_slopes.dtype} {tuple(alibi_slopes.shape)}")


def _torch_path(q, k, v, dropout_p, scale, causal, window_size, softcap, alibi_slopes):
    """flash-attn's semantics in torch ops (autograd differentiates it): fp32 math for 16-bit inputs,
    the (Lq, Lk) visibility built from the bottom-right-aligned distances."""
    B, Lq, H, D = q.shape
    Lk, Hk = k.shape[1], k.shape[2]
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qh = q.transpose(1, 2).to(dt)  # (B, H, Lq, D)
    kh = k.transpose(1, 2).to(dt).repeat_interleave(H // Hk, dim=1)  # (B, H, Lk, D)
    vh = v.transpose(1, 2).to(dt).repeat_interleave(H // Hk, dim=1)
    s = torch.matmul(qh, kh.transpose(-2, -1)) * scale  # (B, H, Lq, Lk)
    if softcap > 0.0:
        s = torch.tanh(s / softcap) * softcap
    dist = (torch.arange(Lq, device=q.device)[:, None] + (Lk - Lq)) - torch.arange(Lk, device=q.device)[None, :]
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(dt).reshape(-1 if alibi_slopes.dim() == 2 else 1, H)[:, :, None, None]
        s = s - slopes * dist.abs().to(dt)
    left, right = window_size[0], 0 if causal else window_size[1]
    visible = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device)
    if left >= 0:
        visible = visible & (dist <= left)
    if right >= 0:
        visible = visible & (dist >= -right)
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (B, H, Lq)
    none_visible = ~visible.any(-1, keepdim=True)  # (Lq, 1): such rows give zeros, zero gradients
    p = torch.softmax(s.masked_fill(none_visible, 0.0), dim=-1).masked_fill(none_visible, 0.0)
    if dropout_p > 0.0:
        p = F.dropout(p, dropout_p)
    out = torch.matmul(p, vh).transpose(1, 2).to(q.dtype).contiguous()  # (B, Lq, H, D)
    return out, lse.detach().float()


def flash_attn_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """flash_attn.flash_attn_func.

    q (B, Lq, H, D), k and v (B, Lk, Hk, D), H % Hk == 0, one dtype (fp16, bf16 as flash-attn, plus
    fp32), D <= 256 -> out (B, Lq, H, D) contiguous. softmax_scale defaults to 1/sqrt(D). causal:
    bottom-right aligned (query i sees keys j <= i + Lk - Lq). window_size (left, right): query i sees
    keys in [i + Lk - Lq - left, i + Lk - Lq + right], -1 unbounded. softcap > 0: scores
    softcap * tanh(scale q.k / softcap). alibi_slopes fp32 (H,) or (B, H): adds -slope |i + Lk - Lq - j|.
    A row with no visible key gives zeros. dropout_p: dropout on the probabilities (the Triton path
    regenerates its mask in the backward, never stores it). deterministic: accepted; the backward is
    always deterministic (no atomics).
    return_attn_probs: return (out, softmax_lse (B, H, Lq) fp32, S_dmask); softmax_lse is -inf for a
    row without a visible key and carries no gradient; S_dmask is None here (the fused kernels never
    materialise the probabilities; flash-attn returns them only for testing).
    """
    _check(q, k, v, dropout_p, window_size, softcap, alibi_slopes)
    D, Lq, Lk = q.shape[-1], q.shape[1], k.shape[1]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else float(softmax_scale)
    window_size = tuple(window_size)
    out = lse = None
    if use_triton(q, k, v, alibi_slopes):
        reason = None
        if window_size != (-1, -1) and not (causal and window_size[0] == -1):
            reason = "a sliding window is not in the kernel yet"
        elif softcap > 0.0:
            reason = "softcap is not in the kernel yet"
        elif alibi_slopes is not None:
            reason = "ALiBi is not in the kernel yet"
        if reason is None:
            from .ops import attention as op

            qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, D) views, unit last stride
            if any(t.stride(-1) != 1 for t in (qh, kh, vh)):
                qh, kh, vh = (t.contiguous() for t in (qh, kh, vh))
            fp32_out = (q.dtype != torch.float32 and torch.is_grad_enabled()
                        and (q.requires_grad or k.requires_grad or v.requires_grad))
            res = op._sdpa_fwd(qh, kh, vh, None, float(dropout_p), bool(causal), scale, bool(fp32_out), Lk - Lq)
            out, lse = res[0].transpose(1, 2).contiguous(), res[1].detach()  # (B, Lq, H, D), (B, H, Lq)
        else:
            warn_fallback("flash_attn_func", reason)
    if out is None:
        out, lse = _torch_path(q, k, v, dropout_p, scale, causal, window_size, softcap, alibi_slopes)
    return (out, lse, None) if return_attn_probs else out
