"""fasttx.flash: drop-ins for flash-attn 2's attention functions, on fasttx's Triton kernels, with
a plain torch path everywhere else (CPU, the "torch" backend).

Shipped: `flash_attn_func` and `flash_attn_varlen_func` (forward and backward) and
`flash_attn_with_kvcache` (inference). Semantics are flash-attn's, not SDPA's: q (B, Lq, H, D),
k/v (B, Lk, Hk, D) with H % Hk == 0 (GQA/MQA without copies on the Triton path); causal is aligned
to the bottom-right corner (query i sees keys j <= i + Lk - Lq), a row that sees no key gives
zeros. The sliding window, softcap, ALiBi, packed sequences (cu_seqlens), per-batch cache lengths
and paged caches are features of the attention kernels themselves (constexpr flags, key blocks
outside the window or the sequence skipped; nothing materialised).

Left out of or different from flash-attn, and why:
- return_attn_probs with dropout: S_dmask (B, H, Lq and Lk rounded up to 128) in q's dtype holds
  the exact softmax probabilities before dropout, dropped entries negated, zeros in the padding and
  outside the mask; the keep-mask is the one the forward applied (the Triton path regenerates it
  from the kernel's seed; the probabilities are recomputed in torch: slow, a debugging output).
  flash-attn stores block-wise unnormalised values there ("possibly with different scaling", which
  its tests undo with its GPU's block size); ours need no rescaling. Without dropout S_dmask is an
  empty (0,) tensor, as flash-attn's.
- num_splits is a hint only: the decode path sizes its split from the SM count itself.
- deterministic is accepted and always true: the backward adds dQ in a fixed key-block order
  (FASTTX_ATTN_DQ=atomic trades that for fp32 atomics, except under
  torch.use_deterministic_algorithms(True)).
- a paged cache is forward only (varlen with block_table, and the kv-cache); together with
  cache_leftpad or cache_batch_idx it is refused (flash-attn refuses leftpad with paging too).
  Varlen with block_table accepts inputs that require grad (as flash-attn) and raises a clear
  RuntimeError only if the backward is called (flash-attn's fails on the pages' shape). With
  dropout_p > 0 it applies dropout (the Triton path runs torch's ops, with one warning), where
  flash-attn's paged kernel silently skips it.
- the kv-cache's rotary table needs only the rows it is read at: flash-attn asks for one as long
  as the cache, and with a causal q longer than the new keys reads past it; we raise ValueError
  there.
- ALiBi slopes get no gradient (as in flash-attn).
- additions from flash-attn's newer interfaces, on every function here: v's head dim may differ
  from q/k's (FA3's hdim_v, DeepSeek's MLA: D = 192, Dv = 128; out then has Dv), and the
  keyword-only `learnable_sink` (the cute interface's name): (H,) per-head attention-sink logits
  (gpt-oss) that join each row's softmax denominator with no value row, differentiable (flash-attn
  takes bf16 only; here any float dtype, computed in fp32).
- wider than flash-attn: fp32 inputs, any page size (flash-attn: multiples of 256), any rotary dim
  <= head dim (flash-attn: multiples of 16).
- cu_seqlens / cache_seqlens are validated on the host (one sync per call) so that bad input
  raises a clear ValueError instead of reading out of bounds in a kernel.
"""
from __future__ import annotations

import math
import operator
from typing import Optional, Tuple

import torch
from torch import Tensor

from ._backend import use_triton, warn_fallback
from .ops._common import KERNEL_FLOATS as _DTYPES
from .ops._common import acc_dtype

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache"]

_MAX_HEAD_DIM = 256


def _kernel_path(name, q, k, v, *others) -> bool:
    """Whether this call runs the attention kernels: the backend says so (use_triton) and no kernel
    limit (fasttx.kernels.attention.gpu_limit) applies; a limit runs the torch path, said once."""
    if not use_triton(q, k, v, *others):
        return False
    from .ops.attention import _kernels

    why = _kernels().gpu_limit(q, v)
    if why is not None:
        warn_fallback(name, why)
    return why is None


def _check(q, k, v, dropout_p, window_size, softcap, alibi_slopes, name="flash_attn_func", batch=None,
           sinks=None) -> None:
    rank, dims = (3, "(total, heads, headdim)") if batch is not None else (4, "(batch, seqlen, heads, headdim)")
    for arg, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != rank:
            raise ValueError(f"{name}: {arg} must be a {rank}-D tensor {dims}, got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        raise ValueError(f"{name}: q, k, v must share one dtype among float16, bfloat16, float32; got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{name}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if batch is None:
        B, Lq, H, D = q.shape
        if k.shape[:3] != v.shape[:3] or k.shape[0] != B or k.shape[3] != D:
            raise ValueError(f"{name}: k and v must be (batch, seqlen_k, heads_k, headdim) = (B, Lk, Hk, {D}) and "
                             f"(B, Lk, Hk, headdim_v), got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    else:
        B, H, D = batch, q.shape[-2], q.shape[-1]
        if k.shape[:-1] != v.shape[:-1] or k.shape[-1] != D:
            raise ValueError(f"{name}: k and v must be (..., heads_k, {D}) and (..., heads_k, headdim_v) with the "
                             f"same leading dims, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    Hk = k.shape[-2]
    if Hk == 0 or H % Hk:
        raise ValueError(f"{name}: the number of query heads must be divisible by the number of key/value "
                         f"heads, got {H} and {Hk}")
    if max(D, v.shape[-1]) > _MAX_HEAD_DIM:
        raise ValueError(f"{name}: head dims {D} (q, k) and {v.shape[-1]} (v) must be at most {_MAX_HEAD_DIM}")
    if sinks is not None and (not isinstance(sinks, Tensor) or not sinks.is_floating_point()
                              or sinks.shape != (H,) or sinks.device != q.device):
        raise ValueError(f"{name}: learnable_sink must be a floating-point tensor of shape (nheads,) = ({H},) on "
                         f"q's device, got " + (f"{sinks.dtype} {tuple(sinks.shape)} on {sinks.device}"
                                                if isinstance(sinks, Tensor) else type(sinks).__name__))
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"{name}: dropout_p must be in [0, 1], got {dropout_p}")
    if not all(w >= -1 for w in window_size):
        raise ValueError(f"{name}: window_size must be (left, right), ints >= -1 (-1: unbounded), got {window_size}")
    if softcap < 0.0:
        raise ValueError(f"{name}: softcap must be >= 0 (0: off), got {softcap}")
    if alibi_slopes is not None:
        if alibi_slopes.dtype != torch.float32 or alibi_slopes.shape not in ((H,), (B, H)):
            raise ValueError(f"{name}: alibi_slopes must be float32 of shape ({H},) or ({B}, {H}), got "
                             f"{alibi_slopes.dtype} {tuple(alibi_slopes.shape)}")


def _torch_path(q, k, v, dropout_p, scale, causal, window_size, softcap, alibi_slopes, return_probs=False,
                sinks=None):
    """flash-attn's semantics in torch ops (autograd differentiates it): fp32 math for 16-bit inputs,
    the (Lq, Lk) visibility built from the bottom-right-aligned distances; sinks (H,) join each
    row's softmax as one more logit without a value row. return_probs: also the
    probabilities before dropout (B, H, Lq, Lk) and the keep-mask that was applied (None without
    dropout), both detached (for S_dmask)."""
    B, Lq, H, D = q.shape
    Lk, Hk = k.shape[1], k.shape[2]
    dt = acc_dtype(q.dtype)
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
    none_visible = ~visible.any(-1, keepdim=True)  # (Lq, 1): such rows give zeros, zero gradients
    if sinks is None:
        lse = torch.logsumexp(s, dim=-1)  # (B, H, Lq)
        p = torch.softmax(s.masked_fill(none_visible, 0.0), dim=-1)
    else:  # the sink column takes part in the softmax, then is dropped (it has no value row)
        col = sinks.to(dt).reshape(1, H, 1, 1).expand(B, H, Lq, 1)
        lse = torch.logsumexp(torch.cat((s, col), dim=-1), dim=-1)  # (B, H, Lq); the sink's logit where none is visible
        p = torch.softmax(torch.cat((s.masked_fill(none_visible, 0.0), col), dim=-1), dim=-1)[..., :-1]
    p = p.masked_fill(none_visible, 0.0)
    probs, keep = p.detach(), None
    if dropout_p > 0.0:  # F.dropout's rule (keep with probability 1 - p, scale by 1 / (1 - p)), mask kept
        keep = torch.empty(p.shape, dtype=torch.bool, device=p.device).bernoulli_(1.0 - dropout_p)
        p = p * keep * (1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0)
    out = torch.matmul(p, vh).transpose(1, 2).to(q.dtype).contiguous()  # (B, Lq, H, Dv)
    return (out, lse.detach().float(), probs, keep) if return_probs else (out, lse.detach().float())


def _window_pair(name, window_size):
    """window_size as flash-attn takes it: any two ints (a tuple, a list, or a 2-element integer
    tensor, as flash-attn's own tests pass torch.randint(0, n, (2,))) -> (left, right) ints."""
    try:
        if isinstance(window_size, Tensor):
            if window_size.dim() != 1 or window_size.is_floating_point() or window_size.is_complex():
                raise TypeError
            window_size = window_size.tolist()
        left, right = (operator.index(w) for w in window_size)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: window_size must be (left, right), two ints >= -1 (-1: unbounded), got "
                         f"{window_size!r}") from None
    return left, right


def _window(causal, window_size, seqlen_k):
    """flash-attn's effective window: a side at least seqlen_k wide is unbounded (-1), and causal
    sets right = 0 (query i sees keys j <= i + Lk - Lq)."""
    left, right = (-1 if w >= seqlen_k else w for w in window_size)
    return left, (0 if causal else right)


def _round128(n):
    return -(-int(n) // 128) * 128


def _s_dmask(probs, keep, shape):
    """flash-attn's S_dmask from the probabilities before dropout (..., Lq, Lk) and the keep-mask
    that was applied: kept entries as they are, dropped ones negated, in a zero (B, H, Lq rounded
    up to 128, Lk rounded up to 128) tensor."""
    s = torch.zeros(shape, dtype=probs.dtype, device=probs.device)
    Lq, Lk = probs.shape[-2:]
    s[..., :Lq, :Lk] = torch.where(keep, probs, -probs)
    return s


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
    *,
    learnable_sink: Optional[Tensor] = None,
):
    """flash_attn.flash_attn_func.

    q (B, Lq, H, D), k (B, Lk, Hk, D) and v (B, Lk, Hk, Dv), H % Hk == 0, one dtype (fp16, bf16 as
    flash-attn, plus fp32), D, Dv <= 256 (Dv != D as FA3's hdim_v) -> out (B, Lq, H, Dv) contiguous.
    softmax_scale defaults to 1/sqrt(D). causal:
    bottom-right aligned (query i sees keys j <= i + Lk - Lq). window_size (left, right): query i sees
    keys in [i + Lk - Lq - left, i + Lk - Lq + right], -1 unbounded. softcap > 0: scores
    softcap * tanh(scale q.k / softcap). alibi_slopes fp32 (H,) or (B, H): adds -slope |i + Lk - Lq - j|.
    A row with no visible key gives zeros. dropout_p: dropout on the probabilities (the Triton path
    regenerates its mask in the backward, never stores it). deterministic: accepted; the backward is
    always deterministic (dQ added in a fixed order; see the module's notes).
    return_attn_probs: return (out, softmax_lse (B, H, Lq) fp32, S_dmask); softmax_lse is -inf for a
    row without a visible key and carries no gradient; S_dmask (for testing, as flash-attn's): with
    dropout (B, H, Lq rounded up to 128, Lk rounded up to 128) in q's dtype, the probabilities
    before dropout with the dropped entries negated (the mask this call applied; zeros elsewhere),
    so out = (S_dmask[..., :Lq, :Lk].clamp(min=0) / (1 - dropout_p)) @ v; without dropout an empty
    (0,) tensor.
    window_size: (left, right) ints, or a 2-element integer tensor; a side >= Lk is unbounded.
    learnable_sink (keyword-only, flash-attn cute's name): None or (H,) attention-sink logits s_h
    (gpt-oss): P_ij = exp(S_ij) / (sum_j exp(S_ij) + exp(s_h)), no value row; it gets a gradient;
    softmax_lse includes it (a row without a visible key: zeros and lse = s_h).
    """
    window_size = _window_pair("flash_attn_func", window_size)
    _check(q, k, v, dropout_p, window_size, softcap, alibi_slopes, sinks=learnable_sink)
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else float(softmax_scale)
    left, right = _window(causal, window_size, k.shape[1])
    probs = return_attn_probs and dropout_p > 0.0  # flash-attn fills S_dmask only with dropout
    sinks = learnable_sink
    if _kernel_path("flash_attn_func", q, k, v, alibi_slopes, sinks):
        from .ops import attention as op

        out, lse, seed = op.flash_attention(  # (B, Lq, H, Dv), (B, H, Lq)
            q, k, v, op.FlashFeatures(scale, causal, left, right, softcap, alibi_slopes, dropout_p, sinks))
        if probs:  # the kernel's own keep-mask, regenerated from its seed; probabilities in torch
            from .ops.flash_dropout import flash_dropout_keep

            p = _torch_path(q.detach(), k.detach(), v.detach(), 0.0, scale, causal, (left, right), softcap,
                            alibi_slopes, return_probs=True, sinks=None if sinks is None else sinks.detach())[2]
            keep = flash_dropout_keep(seed, p.shape, float(dropout_p))
    else:
        out, lse, p, keep = _torch_path(q, k, v, dropout_p, scale, causal, (left, right), softcap, alibi_slopes,
                                        return_probs=True, sinks=sinks)
    if not return_attn_probs:
        return out
    if not probs:
        return out, lse, q.new_empty((0,))
    B, Lq, H, _ = q.shape
    return out, lse, _s_dmask(p, keep, (B, H, _round128(Lq), _round128(k.shape[1]))).to(q.dtype)


def _check_cu(name, arg, cu, total, batch=None):
    if not isinstance(cu, Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name}: {arg} must be a 1-D int32 tensor (batch + 1,), got "
                         f"{(cu.dtype, tuple(cu.shape)) if isinstance(cu, Tensor) else type(cu).__name__}")
    if batch is not None and cu.numel() != batch + 1:
        raise ValueError(f"{name}: {arg} must have batch + 1 = {batch + 1} entries, got {cu.numel()}")
    c = cu.cpu()
    if int(c[0]) != 0 or bool((c[1:] < c[:-1]).any()) or int(c[-1]) != total:
        raise ValueError(f"{name}: {arg} must start at 0, never decrease and end at the packed length {total}, "
                         f"got {c.tolist()}")


def flash_attn_varlen_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: Optional[Tensor] = None,
    *,
    learnable_sink: Optional[Tensor] = None,
):
    """flash_attn.flash_attn_varlen_func: packed sequences, each attending only within itself.

    q (total_q, H, D), k and v (total_k, Hk, D) (or, with block_table (B, pages) int32, a paged
    cache (num_pages, page_size, Hk, D): sequence b's key j at page block_table[b, j // page_size];
    forward only), cu_seqlens_q/k int32 (B + 1,) cumulative lengths (sequence b owns rows
    [cu[b], cu[b+1])), max_seqlen_q/k their longest lengths -> out (total_q, H, D). Every option as
    in flash_attn_func, applied per sequence (causal and the window bottom-right aligned to each
    sequence's own lengths); empty sequences and length-1 ones are fine. return_attn_probs:
    (out, softmax_lse (H, total_q), S_dmask), S_dmask as in flash_attn_func with sequence b's
    entries at [b, :, :len_q[b], :len_k[b]] of (B, H, max_seqlen_q and max_seqlen_k rounded up to
    128). With block_table, inputs may require grad but the backward raises RuntimeError.
    v may have its own head dim Dv (out (total_q, H, Dv)); learnable_sink as in flash_attn_func."""
    name = "flash_attn_varlen_func"
    if not isinstance(cu_seqlens_k, Tensor):
        _check_cu(name, "cu_seqlens_k", cu_seqlens_k, 0)
    B = cu_seqlens_k.numel() - 1
    window_size = _window_pair(name, window_size)
    _check(q, k if block_table is None else k[0], v if block_table is None else v[0], dropout_p, window_size,
           softcap, alibi_slopes, name=name, batch=B, sinks=learnable_sink)
    _check_cu(name, "cu_seqlens_q", cu_seqlens_q, q.shape[0])
    if block_table is not None:
        if k.dim() != 4 or block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != B:
            raise ValueError(f"{name}: with block_table (B, pages) int32, k/v are (num_pages, page_size, Hk, D); got "
                             f"block_table {block_table.dtype} {tuple(block_table.shape)}, k {tuple(k.shape)}")
        cap = block_table.shape[1] * k.shape[1]
        _check_cu(name, "cu_seqlens_k", cu_seqlens_k, int(cu_seqlens_k[-1]), batch=B)
        if B and int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max()) > cap:
            raise ValueError(f"{name}: a sequence is longer than its block_table holds ({cap} keys)")
    else:
        _check_cu(name, "cu_seqlens_k", cu_seqlens_k, k.shape[0], batch=B)
    if cu_seqlens_q.numel() != B + 1:
        raise ValueError(f"{name}: cu_seqlens_q and cu_seqlens_k must both have batch + 1 entries, got "
                         f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
    lens_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).cpu()
    lens_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).cpu()
    if B and (int(lens_q.max()) > max_seqlen_q or int(lens_k.max()) > max_seqlen_k):
        raise ValueError(f"{name}: max_seqlen_q/max_seqlen_k ({max_seqlen_q}, {max_seqlen_k}) are below the longest "
                         f"sequence ({int(lens_q.max())}, {int(lens_k.max())})")
    D, H = q.shape[-1], q.shape[1]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else float(softmax_scale)
    left, right = _window(causal, window_size, int(max_seqlen_k))
    probs = return_attn_probs and dropout_p > 0.0  # flash-attn fills S_dmask only with dropout
    paged = block_table is not None
    sinks = learnable_sink
    triton = _kernel_path(name, q, k, v, alibi_slopes, sinks)
    if triton and paged and dropout_p > 0.0:
        warn_fallback(name, "dropout with a paged cache (block_table): the paged kernel has no dropout")
        triton = False
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    sdmask = q.new_zeros((B, H, _round128(max_seqlen_q), _round128(max_seqlen_k))) if probs else q.new_empty((0,))

    def triton_path():
        from .ops import attention as op

        cu_k = cu_seqlens_k.to(q.device)
        k_start = torch.zeros_like(cu_k[:-1]) if paged else cu_k[:-1].contiguous()
        k_len = (cu_k[1:] - cu_k[:-1]).contiguous()
        seqlens = op.SeqLens(cu_seqlens_q.to(q.device), k_start, k_len, int(max_seqlen_q), int(max_seqlen_k))
        features = op.FlashFeatures(scale, causal, left, right, softcap, alibi_slopes, dropout_p, sinks)
        if paged:
            kv = [t.reshape(-1, *t.shape[2:]) for t in (k, v)]  # (pages * page_size, Hk, D) views
            out, lse = op.flash_attention_kvcache(q, kv[0], kv[1], features, seqlens, block_table.to(q.device),
                                                  k.shape[1])
        else:
            out, lse, seed = op.flash_attention(q, k, v, features, seqlens)
            if probs:  # the kernel's own keep-mask, regenerated from its seed; probabilities in torch
                from .ops.flash_dropout import flash_dropout_keep

                keep = flash_dropout_keep(seed, (1, H, q.shape[0], int(max_seqlen_k)), float(dropout_p))
                for b in range(B):
                    kb, vb, slopes = sequence(b)
                    p = _torch_path(q[None, cq[b]:cq[b + 1]].detach(), kb[None].detach(), vb[None].detach(), 0.0,
                                    scale, causal, (left, right), softcap, slopes, return_probs=True,
                                    sinks=None if sinks is None else sinks.detach())[2]
                    lq, lk = p.shape[-2:]
                    sdmask[b, :, :lq, :lk] = torch.where(keep[0, :, cq[b]:cq[b + 1], :lk], p[0], -p[0])
        return out, lse  # (total_q, H, D), (H, total_q)

    def sequence(b):  # sequence b's keys (B, lk, Hk, D) and its ALiBi slopes
        if paged:
            n = ck[b + 1] - ck[b]
            pages = block_table[b, :_cdiv(n, k.shape[1])].long()
            kb, vb = (t[pages].reshape(-1, *t.shape[2:])[:n] for t in (k, v))
        else:
            kb, vb = k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]]
        return kb, vb, alibi_slopes[b] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes

    def torch_path():
        outs, lses = [], []
        for b in range(B):
            kb, vb, slopes = sequence(b)
            o, s, p, keep = _torch_path(q[None, cq[b]:cq[b + 1]], kb[None], vb[None], dropout_p, scale, causal,
                                        (left, right), softcap, slopes, return_probs=True, sinks=sinks)
            outs.append(o[0])
            lses.append(s[0])
            if probs:
                lq, lk = p.shape[-2:]
                sdmask[b, :, :lq, :lk] = torch.where(keep[0], p[0], -p[0])
        out = torch.cat(outs) if outs else q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = torch.cat(lses, dim=-1) if lses else q.new_empty((H, 0), dtype=torch.float32)
        return out, lse

    run = triton_path if triton else torch_path
    if paged and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        out, lse = _ForwardOnly.apply(run, q, k, v)  # flash-attn has no backward through a paged cache
    else:
        out, lse = run()
    return (out, lse, sdmask) if return_attn_probs else out


class _ForwardOnly(torch.autograd.Function):
    """Runs a paged-cache forward (under no_grad) and gives its output a grad_fn that refuses the
    backward with a clear error: flash-attn's varlen backward takes packed k/v, not pages, and so
    does ours. The forward itself is accepted with inputs that require grad, as flash-attn's is."""

    @staticmethod
    def forward(ctx, run, q, k, v):
        with torch.no_grad():
            out, lse = run()
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        raise RuntimeError("flash_attn_varlen_func: no backward through a paged KV cache (block_table): the paged "
                           "forward is inference only, as in flash-attn; pass packed k and v (no block_table) to "
                           "train")


def _cdiv(a, b):
    return -(-a // b)


def _rotary(x, cos, sin, pos, interleaved):
    """flash-attn's rotary on the first rotary_dim = 2 * cos.shape[1] features of x (B, L, H, D) at
    positions pos (B, L): pairs (2i, 2i+1) when interleaved (GPT-J), else (i, i + rotary_dim / 2)
    (GPT-NeoX); fp32 math, cast back."""
    rd = 2 * cos.shape[1]
    c, s = cos.float()[pos][:, :, None], sin.float()[pos][:, :, None]  # (B, L, 1, rd / 2)
    xr = x[..., :rd].float()
    if interleaved:
        x0, x1 = xr[..., 0::2], xr[..., 1::2]
        rot = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)
    else:
        x0, x1 = xr[..., :rd // 2], xr[..., rd // 2:]
        rot = torch.cat((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return torch.cat((rot.to(x.dtype), x[..., rd:]), dim=-1)


def _int_vec(name, arg, t, B, device):
    if t is None:
        return None
    if isinstance(t, int):
        return torch.full((B,), t, dtype=torch.int32, device=device)
    if not isinstance(t, Tensor) or t.dtype != torch.int32 or t.shape != (B,):
        raise ValueError(f"{name}: {arg} must be an int or an int32 tensor of shape ({B},), got "
                         f"{(t.dtype, tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__}")
    return t.to(device)


def flash_attn_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Optional[Tensor] = None,
    v: Optional[Tensor] = None,
    rotary_cos: Optional[Tensor] = None,
    rotary_sin: Optional[Tensor] = None,
    cache_seqlens=None,
    cache_batch_idx: Optional[Tensor] = None,
    cache_leftpad: Optional[Tensor] = None,
    block_table: Optional[Tensor] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: Optional[Tensor] = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
    *,
    learnable_sink: Optional[Tensor] = None,
):
    """flash_attn.flash_attn_with_kvcache (inference: no autograd).

    q (B, Lq, H, D); k_cache, v_cache (B_cache, S_cache, Hk, D), or with block_table (B, pages) int32
    a paged cache (num_pages, page_size, Hk, D) (any page size); k, v (B, Lnew, Hk, D) optional: written
    into the cache in place at positions cache_seqlens[b] + [0, Lnew) before attending. cache_seqlens
    int or (B,) int32: filled length of each cache row (None: the whole cache). cache_batch_idx (B,)
    int32: cache row of each batch entry (default arange). cache_leftpad (B,) int32: the cache row's
    keys start there (not with a paged cache). Batch b attends to keys [leftpad_b, cache_seqlens_b +
    Lnew) with causal / window bottom-right aligned to that length. rotary_cos/sin (seqlen_ro,
    rotary_dim / 2), with k given: k rotated at its absolute cache positions cache_seqlens +
    [0, Lnew) (also with cache_leftpad, as flash-attn), q at cache_seqlens + [0, Lq) when causal or
    local (a window side narrower than the cache), else every query at cache_seqlens; the table
    needs only the rows it is read at (a table as long as the cache always does for k);
    rotary_interleaved as flash-attn (True: pairs (0, 1), (2, 3), ...). num_splits: a hint, ignored
    (the kernel sizes its flash-decoding split itself). Returns out (B, Lq, H, D), and
    softmax_lse (B, H, Lq) fp32 when return_softmax_lse. v_cache (and v) may have their own head dim
    Dv (out (B, Lq, H, Dv)); learnable_sink as in flash_attn_func."""
    name = "flash_attn_with_kvcache"
    paged = block_table is not None
    if not isinstance(q, Tensor) or q.dim() != 4:
        raise ValueError(f"{name}: q must be a 4-D tensor (batch, seqlen, heads, headdim)")
    B, Lq, H, D = q.shape
    for arg, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: {arg} must be a 4-D tensor")
    if (k is None) != (v is None):
        raise ValueError(f"{name}: k and v must be given together")
    if paged and (block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != B):
        raise ValueError(f"{name}: block_table must be an int32 tensor (batch={B}, pages), got "
                         f"{block_table.dtype} {tuple(block_table.shape)}")
    if paged and cache_leftpad is not None:
        raise ValueError(f"{name}: cache_leftpad is not supported with a paged cache (block_table), as in flash-attn")
    if paged and cache_batch_idx is not None:
        raise ValueError(f"{name}: cache_batch_idx is not supported with a paged cache (block_table)")
    window_size = _window_pair(name, window_size)
    kb_probe = k_cache[:1].expand(B, *k_cache.shape[1:])  # shape-only stand-in for the checks
    _check(q, kb_probe, v_cache[:1].expand(B, *v_cache.shape[1:]), 0.0, window_size, softcap, alibi_slopes, name=name,
           sinks=learnable_sink)
    Dv = v_cache.shape[-1]
    Hk = k_cache.shape[2]
    S_c = k_cache.shape[1]
    cap = block_table.shape[1] * S_c if paged else S_c
    dev = q.device
    seqlens = _int_vec(name, "cache_seqlens", cache_seqlens, B, dev)
    if seqlens is None:
        seqlens = torch.full((B,), cap if k is None else cap - k.shape[1], dtype=torch.int32, device=dev)
    leftpad = _int_vec(name, "cache_leftpad", cache_leftpad, B, dev)
    if leftpad is None:
        leftpad = torch.zeros_like(seqlens)
    rows = _int_vec(name, "cache_batch_idx", cache_batch_idx, B, dev)
    if rows is None:
        rows = torch.arange(B, dtype=torch.int32, device=dev)
    elif not paged and bool(((rows < 0) | (rows >= k_cache.shape[0])).any()):
        raise ValueError(f"{name}: cache_batch_idx must index the cache's {k_cache.shape[0]} rows")
    Lnew = 0
    if k is not None:
        if (k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3] or k.shape[0] != B or k.shape[2:] != (Hk, D)
                or v.shape[3] != Dv):
            raise ValueError(f"{name}: k and v must be (batch={B}, seqlen_new, heads_k={Hk}, headdim={D} / "
                             f"headdim_v={Dv}), got {tuple(k.shape)}, {tuple(v.shape)}")
        if k.dtype != q.dtype:
            raise ValueError(f"{name}: k and v must have q's dtype {q.dtype}, got {k.dtype}")
        Lnew = k.shape[1]
    total = seqlens.long() + Lnew  # (B,) keys after the append
    if bool((total > cap).any()) or bool((leftpad.long() > seqlens.long()).any()) or bool((seqlens < 0).any()):
        raise ValueError(f"{name}: cache_seqlens + seqlen_new must fit the cache ({cap} keys) and "
                         f"0 <= cache_leftpad <= cache_seqlens; got cache_seqlens {seqlens.tolist()}, "
                         f"seqlen_new {Lnew}, cache_leftpad {leftpad.tolist()}")
    left, right = _window(causal, window_size, cap)
    if rotary_cos is not None and k is None:
        raise ValueError(f"{name}: rotary_cos/sin rotate the new k (and q): they need k and v")
    with torch.no_grad():
        if k is not None:
            if rotary_cos is not None:
                if rotary_sin is None or rotary_cos.shape != rotary_sin.shape or 2 * rotary_cos.shape[1] > D:
                    raise ValueError(f"{name}: rotary_cos and rotary_sin must both be (seqlen_ro, rotary_dim / 2) "
                                     f"with rotary_dim <= headdim {D}")
                # Absolute cache positions, as flash-attn (its kernel offsets cos/sin by the left pad):
                # new key i at cache_seqlens + i; query i there too when causal or local, else every
                # query at cache_seqlens. Only the rows read must exist (flash-attn asks for a table
                # as long as the cache, and reads past it for a causal q longer than the new keys).
                pos0 = seqlens.long()[:, None]  # (B, 1)
                kpos = pos0 + torch.arange(Lnew, device=dev)  # (B, Lnew)
                local = causal or left >= 0 or right >= 0
                qpos = pos0 + (torch.arange(Lq, device=dev) if local else torch.zeros(Lq, dtype=torch.long, device=dev))
                last = int(torch.cat((kpos, qpos), dim=1).max()) if B and Lnew + Lq else -1
                if last >= rotary_cos.shape[0]:
                    raise ValueError(f"{name}: rotary_cos/sin have {rotary_cos.shape[0]} positions, but this call "
                                     f"rotates at position {last} (k at cache_seqlens + [0, seqlen_new), q at "
                                     f"cache_seqlens{' + [0, seqlen_q)' if local else ''})")
                k = _rotary(k, rotary_cos, rotary_sin, kpos, rotary_interleaved)
                q = _rotary(q, rotary_cos, rotary_sin, qpos, rotary_interleaved)
            pos = seqlens.long()[:, None] + torch.arange(Lnew, device=dev)  # (B, Lnew) cache positions
            if paged:
                page = block_table.long().gather(1, pos // S_c)
                k_cache[page, pos % S_c] = k
                v_cache[page, pos % S_c] = v
            else:
                k_cache[rows.long()[:, None], pos] = k
                v_cache[rows.long()[:, None], pos] = v
        scale = 1.0 / math.sqrt(D) if softmax_scale is None else float(softmax_scale)
        k_len = (total - leftpad.long()).to(torch.int32)
        if _kernel_path("flash_attn_with_kvcache", q, k_cache, v_cache, alibi_slopes, learnable_sink):
            from .ops import attention as op

            k_start = (torch.zeros_like(rows) if paged else rows * S_c + leftpad).to(torch.int32)
            kv = [t.reshape(-1, Hk, t.shape[-1]) for t in (k_cache, v_cache)]  # (rows, Hk, D / Dv) views
            lens = op.SeqLens(None, k_start.contiguous(), k_len.contiguous(), Lq, max(int(k_len.max()) if B else 0, 1))
            out, lse = op.flash_attention_kvcache(  # (B, Lq, H, D), (B, H, Lq)
                q, kv[0], kv[1], op.FlashFeatures(scale, causal, left, right, softcap, alibi_slopes,
                                                  sinks=learnable_sink),
                lens, block_table.contiguous() if paged else None, S_c)
        else:
            outs, lses = [], []
            for b in range(B):
                lo, hi = int(leftpad[b]), int(total[b])
                if paged:
                    pages = block_table[b, :_cdiv(hi, S_c)].long()
                    kb, vb = (t[pages].reshape(-1, Hk, t.shape[-1])[lo:hi] for t in (k_cache, v_cache))
                else:
                    kb, vb = (t[int(rows[b]), lo:hi] for t in (k_cache, v_cache))
                slopes = alibi_slopes[b] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
                o, s = _torch_path(q[b:b + 1], kb[None], vb[None], 0.0, scale, causal, (left, right), softcap, slopes,
                                   sinks=learnable_sink)
                outs.append(o)
                lses.append(s)
            out = torch.cat(outs) if outs else q.new_empty((*q.shape[:3], Dv))
            lse = torch.cat(lses) if lses else q.new_empty((0, H, Lq), dtype=torch.float32)
    return (out, lse) if return_softmax_lse else out
