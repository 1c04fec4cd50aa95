"""scaled_dot_product_attention's contract and custom ops (and fasttx.flash's custom ops).

fasttx._registry.route asks `unsupported(...)` whether the kernels cover a call (None: they do; else
the reason, and it runs torch's own op with one warning), then the Triton path applies autocast and
`check(...)` (torch's argument rules and exception types, raised here rather than inside a kernel)
and calls
`scaled_dot_product_attention`, which normalises the arguments to the kernels' layout
(q (B, Hq, L, E), k/v (B, Hkv, S, E) with a contiguous last dim, the mask expand()ed to
(B, Hq, L, S) without copying) and calls the custom op `fasttx::attention`, whose autograd calls
`fasttx::attention_backward`. Broadcasting and reshapes happen outside the custom op, so autograd sums the
gradients of broadcast (stride-0) batch and head dims by itself.

Value's head dim Ev may differ from E (DeepSeek's MLA: E = 192, Ev = 128; Ev > E too): a separate
power-of-two block in the kernels. Attention sinks (gpt-oss: a per-head logit in each row's softmax
denominator, differentiable) are the kernels' SINK flag: an optional argument of the custom ops,
reached through `sdpa_with_sinks` (SDPA's semantics; torch's own signature has no place for it) and
fasttx.flash's `learnable_sink` (FlashFeatures.sinks).

Not covered by the kernels: head dims (E or Ev) above 256, dtypes other than fp16/bf16/fp32, and a
float mask that requires grad (torch differentiates the mask; the fused kernels never materialise
the L x S gradient it would need).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fasttx import _checks
from fasttx.distributed import heads, matching, opt, placements, sharding_rule
from fasttx._registry import autocast_inputs, contract

from ._common import KERNEL_FLOATS as _KERNEL_DTYPES
from ._common import draw_seed


def _kernels():
    from fasttx.kernels import attention  # lazy: the torch path needs no triton

    return attention


# ------------------------------------------------------------------------------------------------
# Custom ops
# ------------------------------------------------------------------------------------------------
def _draw(q: Tensor, dropout_p: float) -> Tensor:
    """The dropout's Philox seed as a (1,) int64 tensor on q's device, drawn inside the op (no
    `.item()` for torch.compile to trace) and read by the kernels there, so a captured CUDA graph
    draws a new mask on every replay; (0,) without dropout."""
    return draw_seed(q.device) if dropout_p > 0.0 else q.new_empty((0,), dtype=torch.int64)


@torch.library.custom_op("fasttx::attention", mutates_args=())
def _sdpa_fwd(
    q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], dropout_p: float, is_causal: bool, scale: float,
    fp32_out: bool, causal_offset: int = 0, sinks: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev), mask (B, Hq, L, S) or None ->
    (out (B, Hq, L, Ev), lse fp32 (B, Hq, L), seed (1,) int64 on q's device ((0,) without dropout),
    out32): out32 is the fp32 output (B, Hq, L, Ev) when fp32_out (16-bit inputs that will be
    differentiated: the backward's delta comes from it), else an empty fp32 tensor. causal_offset: query i sees keys
    j <= i + causal_offset when is_causal (0 for SDPA, S - L for fasttx.flash). sinks: None or fp32
    (Hq,) attention-sink logits (AttnOptions.sinks)."""
    seed = _draw(q, dropout_p)
    K = _kernels()
    opts = K.AttnOptions(scale, is_causal, causal_offset, dropout_p, seed, return_fp32_out=fp32_out, sinks=sinks)
    res = K.attention_forward(q, k, v, mask, opts)
    out32 = res[2] if fp32_out else q.new_empty((0,), dtype=torch.float32)
    return res[0], res[1], seed, out32


@_sdpa_fwd.register_fake
def _(q, k, v, mask, dropout_p, is_causal, scale, fp32_out, causal_offset=0, sinks=None):
    B, H, L, _E = q.shape
    Ev = v.shape[-1]
    return (q.new_empty((B, H, L, Ev)), q.new_empty((B, H, L), dtype=torch.float32),
            q.new_empty((1,) if dropout_p > 0.0 else (0,), dtype=torch.int64),
            q.new_empty((B, H, L, Ev) if fp32_out else (0,), dtype=torch.float32))


@torch.library.custom_op("fasttx::attention_backward", mutates_args=())
def _sdpa_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], out: Tensor, lse: Tensor,
    seed: Tensor, dropout_p: float, is_causal: bool, scale: float, causal_offset: int = 0,
    sinks: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dq like q, dk like k, dv like v, dsinks (Hq,) fp32 or an empty (0,) without sinks)
    from the forward's output (fp32 for 16-bit inputs), lse and dropout seed."""
    K = _kernels()
    res = K.attention_backward(dout, q, k, v, mask, out, lse,
                               K.AttnOptions(scale, is_causal, causal_offset, dropout_p, seed, sinks=sinks))
    return res if sinks is not None else (*res, q.new_empty((0,), dtype=torch.float32))


@_sdpa_bwd.register_fake
def _(dout, q, k, v, mask, out, lse, seed, dropout_p, is_causal, scale, causal_offset=0, sinks=None):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            q.new_empty(sinks.shape if sinks is not None else (0,), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    q, k, v, mask, dropout_p, is_causal, scale, fp32_out, *rest = inputs
    causal_offset = rest[0] if rest else 0
    sinks = rest[1] if len(rest) > 1 else None
    out, lse, seed, out32 = output
    ctx.save_for_backward(q, k, v, mask, out32 if fp32_out else out, lse, seed, sinks)
    ctx.opts = (dropout_p, is_causal, scale, causal_offset)


def _backward(ctx, dout, _dlse, _dseed, _dout32):
    q, k, v, mask, out, lse, seed, sinks = ctx.saved_tensors
    dq, dk, dv, dsinks = _sdpa_bwd(dout, q, k, v, mask, out, lse, seed, *ctx.opts, sinks)
    return dq, dk, dv, None, None, None, None, None, None, dsinks if sinks is not None else None


_sdpa_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# The contract with fasttx.functional: unsupported, check, the public-shaped function
# ------------------------------------------------------------------------------------------------
_NAME = "scaled_dot_product_attention"


def unsupported(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                enable_gqa=False) -> Optional[str]:
    """None when the fused kernels cover this call, else why not (functional then runs torch's own
    op). Arguments that `check` would reject are not reasons: they return None so that check raises."""
    if not all(isinstance(t, Tensor) and t.dim() >= 2 for t in (query, key, value)):
        return None
    if query.size(-1) != key.size(-1):  # bad input, not a limit
        return None
    if query.dtype not in _KERNEL_DTYPES:
        return f"dtype {query.dtype} is not supported by the kernel (float16, bfloat16, float32)"
    if max(query.size(-1), value.size(-1)) > _kernels().MAX_HEAD_DIM:
        return f"head dim (E or Ev) above {_kernels().MAX_HEAD_DIM}"
    limit = _kernels().gpu_limit(query, value)
    if limit is not None:
        return limit
    if isinstance(attn_mask, Tensor) and attn_mask.requires_grad and torch.is_grad_enabled():
        return "attn_mask requires grad (the fused kernel does not differentiate the mask)"
    return None


def _broadcast(name: str, *shapes) -> torch.Size:
    try:
        return torch.broadcast_shapes(*shapes)
    except RuntimeError as e:
        raise RuntimeError(f"{_NAME}: {name} of query, key and value "
                           f"{[tuple(s) for s in shapes]} are not broadcastable ({e})") from None


def check(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False) -> None:
    """torch's argument rules, with torch's exception types (TypeError for a wrong argument type,
    RuntimeError for a wrong value or shape), each message naming the argument and the rule."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{_NAME}(): argument '{name}' must be Tensor, not {type(t).__name__}")
    if attn_mask is not None and not isinstance(attn_mask, Tensor):
        raise TypeError(f"{_NAME}(): argument 'attn_mask' must be Tensor, not {type(attn_mask).__name__}")
    dropout_p = _checks.check_float(_NAME, "dropout_p", None, dropout_p)
    _checks.check_bool(_NAME, "is_causal", None, is_causal)
    _checks.check_bool(_NAME, "enable_gqa", None, enable_gqa)
    if scale is not None:
        _checks.check_float(_NAME, "scale", None, scale)
    if query.dim() < 2 or key.dim() < 2 or value.dim() < 2:
        raise RuntimeError(f"{_NAME}: expected query, key and value to be at least 2 dimensional, got "
                           f"query.dim()={query.dim()}, key.dim()={key.dim()}, value.dim()={value.dim()}")
    if not (query.dtype == key.dtype == value.dtype):
        raise RuntimeError(f"{_NAME}: expected query, key and value to have the same dtype, got "
                           f"{query.dtype}, {key.dtype}, {value.dtype}")
    if not (query.device == key.device == value.device):
        raise RuntimeError(f"{_NAME}: expected query, key and value on the same device, got "
                           f"{query.device}, {key.device}, {value.device}")
    if not query.is_floating_point():
        raise RuntimeError(f"{_NAME}: query must be floating point, got {query.dtype}")
    # torch raises RuntimeError above 1 and (for its fused CPU kernel, with another message) below 0;
    # NaN is rejected too (torch's math path would turn every output into NaN or zeros).
    if not 0.0 <= dropout_p <= 1.0:
        raise RuntimeError(f"dropout probability has to be between 0 and 1, but got {dropout_p}")
    if query.size(-1) != key.size(-1):
        raise RuntimeError(f"{_NAME}: query and key must have the same head dim E, got "
                           f"{query.size(-1)} and {key.size(-1)}")
    if key.size(-2) != value.size(-2):
        raise RuntimeError(f"{_NAME}: key and value must have the same sequence length S, "
                           f"got {key.size(-2)} and {value.size(-2)}")
    if attn_mask is not None:
        if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
            raise RuntimeError(f"{_NAME}: attn_mask must be bool, float32 or query's dtype {query.dtype}, "
                               f"got {attn_mask.dtype}")
        if attn_mask.device != query.device:
            raise RuntimeError(f"{_NAME}: attn_mask must be on query's device {query.device}, got {attn_mask.device}")
    if enable_gqa:
        if min(query.dim(), key.dim(), value.dim()) < 3:
            raise IndexError(f"{_NAME}: enable_gqa needs query, key and value with a heads dim (-3), "
                             "i.e. at least 3 dimensions")
        hq, hk, hv = query.size(-3), key.size(-3), value.size(-3)
        # torch returns a tensor for Hk == 0 (what it holds is undefined): rejected here
        if hk == 0 or hv == 0 or hq % hk or hq % hv:
            raise RuntimeError(f"{_NAME}: with enable_gqa the number of heads in key and value must divide "
                               f"the number of heads in query (and be > 0), got Hq={hq}, Hk={hk}, Hv={hv}")
        _broadcast("batch dims", query.shape[:-3], key.shape[:-3], value.shape[:-3])
    else:
        _broadcast("leading dims", query.shape[:-2], key.shape[:-2], value.shape[:-2])


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False, *, sinks: Optional[Tensor] = None) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention through the fused Triton kernels (after
    `check`, for calls `unsupported` lets through).

    query (N, ..., Hq, L, E), key (N, ..., H, S, E), value (N, ..., H, S, Ev) -> (N, ..., Hq, L, Ev);
    leading dims broadcast like torch's. attn_mask bool (True = attend) or float (added), broadcastable
    to (N, ..., Hq, L, S); given together with is_causal both apply (torch's CPU and fused kernels
    behave so). is_causal: query i sees keys j <= i (top-left aligned). scale defaults to 1/sqrt(E).
    enable_gqa: Hq % H == 0, query head h uses kv head h // (Hq // H) (no copy).
    sinks (keyword, fasttx's extension, see `sdpa_with_sinks`): None or (Hq,) attention-sink logits.
    """
    L, S, E, Ev = query.size(-2), key.size(-2), query.size(-1), value.size(-1)
    if scale is None:
        scale = 1.0 / math.sqrt(E) if E > 0 else math.inf  # E == 0: the output is empty anyway
    scale = float(scale)
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

    def norm(t, h, n, e):  # (..., h, n, e) -> (B, h, n, e), broadcast dims kept as stride 0 where possible
        t = t.expand(*batch, h, n, e).reshape(B, h, n, e)
        return t if t.stride(-1) == 1 else t.contiguous()

    q = norm(query, hq, L, E)  # (B, Hq, L, E)
    k = norm(key, hk, S, E)  # (B, Hkv, S, E)
    v = norm(value, hk, S, Ev)  # (B, Hkv, S, Ev)
    mask = None
    if attn_mask is not None:
        try:
            mask = attn_mask.expand(*batch, hq, L, S)
        except RuntimeError:
            raise RuntimeError(f"{_NAME}: attn_mask of shape {tuple(attn_mask.shape)} is "
                               f"not broadcastable to (N, ..., Hq, L, S) = {(*batch, hq, L, S)}") from None
        mask = mask.reshape(B, hq, L, S)  # (B, Hq, L, S), stride-0 dims stay stride 0
    # 16-bit inputs that will be differentiated: keep the fp32 output for the backward's delta.
    fp32_out = (q.dtype != torch.float32 and torch.is_grad_enabled()
                and (query.requires_grad or key.requires_grad or value.requires_grad))
    if sinks is None:
        out = _sdpa_fwd(q, k, v, mask, float(dropout_p), bool(is_causal), scale, bool(fp32_out))[0]
    else:
        fp32_out = fp32_out or (sinks.requires_grad and torch.is_grad_enabled() and q.dtype != torch.float32)
        out = _sdpa_fwd(q, k, v, mask, float(dropout_p), bool(is_causal), scale, bool(fp32_out), 0,
                        sinks.float().contiguous())[0]
    return out.reshape(*out_lead, L, Ev)  # (N, ..., Hq, L, Ev)


def _sdpa_triton(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    if torch.is_autocast_enabled(query.device.type):
        query, key, value = autocast_inputs(_NAME, query, key, value)
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            (attn_mask,) = autocast_inputs(_NAME, attn_mask)
    args = (query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    check(*args)
    return scaled_dot_product_attention(*args)


def _sdpa_torch(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    # Positional where torch allows it: its argument parser is measurably slower per keyword.
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
    )


contract(_NAME, tensors=lambda query, key, value, attn_mask, *rest: (query, key, value, attn_mask),
         unsupported=unsupported, triton=_sdpa_triton, torch=_sdpa_torch)


# ------------------------------------------------------------------------------------------------
# SDPA plus attention sinks (gpt-oss): not a torch argument, so not in fasttx.functional; the entry
# the transformers integration calls with a mask (fasttx.flash's learnable_sink covers the rest)
# ------------------------------------------------------------------------------------------------
def sdpa_with_sinks(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                    dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                    enable_gqa: bool = False, *, sinks: Tensor) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention's semantics (every argument as there, the
    same checks) with attention sinks: sinks (Hq,) (any float dtype; computed in fp32) holds one
    logit per query head that joins each row's softmax denominator and has no value row,
        P_ij = exp(S_ij) / (sum_j exp(S_ij) + exp(s_h)),   O = dropout(P) V,
    as transformers' gpt-oss eager attention computes it (a fully masked row gives 0). Both backends:
    the kernels' SINK flag on the Triton path (differentiable in q, k, v and sinks), plain torch
    ops otherwise, and for calls the kernels do not cover (with one warning)."""
    from fasttx._backend import use_triton, warn_fallback

    check(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    hq = query.size(-3) if query.dim() >= 3 else 1
    if not isinstance(sinks, Tensor) or not sinks.is_floating_point() or sinks.shape != (hq,) \
            or sinks.device != query.device:
        raise RuntimeError(f"{_NAME}: sinks must be a floating-point tensor of shape (Hq,) = ({hq},) on query's "
                           f"device, got " + (f"{sinks.dtype} {tuple(sinks.shape)} on {sinks.device}"
                                              if isinstance(sinks, Tensor) else type(sinks).__name__))
    args = (query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if use_triton(query, key, value, attn_mask, sinks):
        why = unsupported(*args) or (None if query.dim() >= 3 else "inputs without a heads dim")
        if why is None:
            if torch.is_autocast_enabled(query.device.type):
                query, key, value = autocast_inputs(_NAME, query, key, value)
                if attn_mask is not None and attn_mask.dtype != torch.bool:
                    (attn_mask,) = autocast_inputs(_NAME, attn_mask)
            return scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                                enable_gqa, sinks=sinks)
        warn_fallback(_NAME + " with sinks", why)
    return _sdpa_sinks_torch(*args, sinks)


def _sdpa_sinks_torch(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, sinks):
    """sdpa_with_sinks in plain torch ops (autograd differentiates it): fp32 scores for 16-bit
    inputs, the sink column appended to the scores, softmax, dropped, dropout, @ V."""
    from ._common import acc_dtype

    L, S, E = query.size(-2), key.size(-2), query.size(-1)
    scale = (1.0 / math.sqrt(E) if E > 0 else math.inf) if scale is None else float(scale)
    if enable_gqa and key.size(-3) != query.size(-3):
        key = key.repeat_interleave(query.size(-3) // key.size(-3), dim=-3)
        value = value.repeat_interleave(query.size(-3) // value.size(-3), dim=-3)
    dt = acc_dtype(query.dtype)
    s = torch.matmul(query.to(dt), key.to(dt).transpose(-2, -1)) * scale  # (..., Hq, L, S)
    if is_causal:
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=s.device).tril(), float("-inf"))
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask.to(dt)
    col = sinks.to(dt).reshape(-1, 1, 1).expand(*s.shape[:-1], 1)  # (..., Hq, L, 1)
    p = torch.softmax(torch.cat((s, col), dim=-1), dim=-1)[..., :-1]
    if dropout_p > 0.0:
        p = F.dropout(p, dropout_p)
    return torch.matmul(p, value.to(dt)).to(query.dtype)  # (..., Hq, L, Ev)


# ------------------------------------------------------------------------------------------------
# fasttx.flash: flash-attn's semantics (bottom-right alignment, window, softcap, ALiBi, varlen)
# ------------------------------------------------------------------------------------------------
def _flash_opts(q, k, seqlens, causal, left, right, softcap, alibi):
    """The launchers' keyword arguments for flash-attn's (causal, window (left, right), softcap,
    ALiBi). Dense inputs get absolute offsets from Lk - Lq; with seqlens the kernels add each
    sequence's own Sb - Lb."""
    base = 0 if seqlens is not None else k.shape[2] - q.shape[2]
    has_right = causal or right >= 0
    return dict(is_causal=has_right, causal_offset=base + (0 if causal else right),
                window_offset=base - left if left >= 0 else None, softcap=softcap,
                alibi_slopes=alibi, alibi_offset=base)


def _seqlens(cu_q, k_start, k_len, max_q, max_k):
    return None if k_len is None else _kernels().Seqlens(cu_q, k_start, k_len, max_q, max_k)


@torch.library.custom_op("fasttx::flash_attention", mutates_args=())
def _flash_fwd(
    q: Tensor, k: Tensor, v: Tensor, cu_q: Optional[Tensor], k_start: Optional[Tensor], k_len: Optional[Tensor],
    alibi: Optional[Tensor], dropout_p: float, scale: float, causal: bool, left: int, right: int, softcap: float,
    max_q: int, max_k: int, fp32_out: bool, sinks: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """q (B, H, L, E) (or (1, H, total_q, E) with cu_q), k (B, Hkv, S, E), v (B, Hkv, S, Ev) (or
    (1, Hkv, rows, *) with k_start/k_len) -> (out (.., Ev), lse q.shape[:3] fp32, seed, out32).
    left/right: flash-attn's window sizes (-1 unbounded); causal forces right = 0. sinks: None or
    fp32 (H,) attention-sink logits (the launchers' AttnOptions.sinks)."""
    seed = _draw(q, dropout_p)
    seqlens = _seqlens(cu_q, k_start, k_len, max_q, max_k)
    K = _kernels()
    opts = K.AttnOptions(scale=scale, dropout_p=dropout_p, seed=seed, return_fp32_out=fp32_out, seqlens=seqlens,
                         decode=False if cu_q is not None else None, sinks=sinks,
                         **_flash_opts(q, k, seqlens, causal, left, right, softcap, alibi))
    res = K.attention_forward(q, k, v, None, opts)
    out32 = res[2] if fp32_out else q.new_empty((0,), dtype=torch.float32)
    return res[0], res[1], seed, out32


@_flash_fwd.register_fake
def _(q, k, v, cu_q, k_start, k_len, alibi, dropout_p, scale, causal, left, right, softcap, max_q, max_k, fp32_out,
      sinks=None):
    out_shape = (*q.shape[:3], v.shape[-1])
    return (q.new_empty(out_shape), q.new_empty(q.shape[:3], dtype=torch.float32),
            q.new_empty((1,) if dropout_p > 0.0 else (0,), dtype=torch.int64),
            q.new_empty(out_shape if fp32_out else (0,), dtype=torch.float32))


@torch.library.custom_op("fasttx::flash_attention_backward", mutates_args=())
def _flash_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, seed: Tensor,
    cu_q: Optional[Tensor], k_start: Optional[Tensor], k_len: Optional[Tensor], alibi: Optional[Tensor],
    dropout_p: float, scale: float, causal: bool, left: int, right: int, softcap: float, max_q: int, max_k: int,
    sinks: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dsinks): dsinks (H,) fp32 with sinks, else an empty (0,) fp32 tensor."""
    seqlens = _seqlens(cu_q, k_start, k_len, max_q, max_k)
    K = _kernels()
    opts = K.AttnOptions(scale=scale, dropout_p=dropout_p, seed=seed, seqlens=seqlens, sinks=sinks,
                         **_flash_opts(q, k, seqlens, causal, left, right, softcap, alibi))
    res = K.attention_backward(dout, q, k, v, None, out, lse, opts)
    return res if sinks is not None else (*res, q.new_empty((0,), dtype=torch.float32))


@_flash_bwd.register_fake
def _(dout, q, k, v, out, lse, seed, cu_q, k_start, k_len, alibi, dropout_p, scale, causal, left, right, softcap,
      max_q, max_k, sinks=None):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            q.new_empty(sinks.shape if sinks is not None else (0,), dtype=torch.float32))


def _flash_setup_context(ctx, inputs, output):
    q, k, v, cu_q, k_start, k_len, alibi, *opts = inputs
    sinks = opts[9] if len(opts) > 9 else None
    out, lse, seed, out32 = output
    fp32_out = opts[8]
    ctx.save_for_backward(q, k, v, out32 if fp32_out else out, lse, seed, cu_q, k_start, k_len, alibi, sinks)
    ctx.opts = tuple(opts[:8])  # dropout_p, scale, causal, left, right, softcap, max_q, max_k


def _flash_backward(ctx, dout, _dlse, _dseed, _dout32):
    q, k, v, out, lse, seed, cu_q, k_start, k_len, alibi, sinks = ctx.saved_tensors
    dq, dk, dv, dsinks = _flash_bwd(dout, q, k, v, out, lse, seed, cu_q, k_start, k_len, alibi, *ctx.opts, sinks)
    return (dq, dk, dv) + (None,) * 13 + (dsinks if sinks is not None else None,)


_flash_fwd.register_autograd(_flash_backward, setup_context=_flash_setup_context)


@torch.library.custom_op("fasttx::flash_attention_kvcache", mutates_args=())
def _flash_kvcache_fwd(
    q: Tensor, k: Tensor, v: Tensor, cu_q: Optional[Tensor], k_start: Tensor, k_len: Tensor,
    block_table: Optional[Tensor], page_size: int, alibi: Optional[Tensor], scale: float, causal: bool, left: int,
    right: int, softcap: float, max_q: int, max_k: int, sinks: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Inference over a kv-cache: q (B, H, L, E) dense (or (1, H, total_q, E) packed with cu_q),
    k (1, Hkv, rows, E) and v (1, Hkv, rows, Ev) views of the cache,
    sequence b's keys at rows k_start[b] + [0, k_len[b]) (or through block_table, pages of
    page_size rows) -> (out (B, H, L, Ev), lse (B, H, L)). sinks: None or fp32 (H,)."""
    K = _kernels()
    seqlens = K.Seqlens(cu_q, k_start, k_len, max_q if cu_q is not None else q.shape[2], max_k)
    opts = K.AttnOptions(scale=scale, seqlens=seqlens, block_table=block_table, page_size=page_size,
                         decode=False if cu_q is not None else None, sinks=sinks,
                         **_flash_opts(q, k, seqlens, causal, left, right, softcap, alibi))
    return K.attention_forward(q, k, v, None, opts)


@_flash_kvcache_fwd.register_fake
def _(q, k, v, cu_q, k_start, k_len, block_table, page_size, alibi, scale, causal, left, right, softcap, max_q, max_k,
      sinks=None):
    return q.new_empty((*q.shape[:3], v.shape[-1])), q.new_empty(q.shape[:3], dtype=torch.float32)


# ------------------------------------------------------------------------------------------------
# fasttx.flash's entries: flash-attn's layouts in and out, options as two small named structures
# ------------------------------------------------------------------------------------------------
class SeqLens(NamedTuple):
    """Variable-length sequences. cu_q: (B + 1,) int32 cumulative query counts (q packed as
    (total_q, H, D)), or None for dense q (B, Lq, H, D); k_start, k_len: (B,) int32 first key row and
    key count of each sequence in the k/v rows (packed keys, or cache rows; a paged cache: zeros);
    max_q, max_k: the longest sequence's query and key count."""
    cu_q: Optional[Tensor]
    k_start: Tensor
    k_len: Tensor
    max_q: int
    max_k: int


class FlashFeatures(NamedTuple):
    """flash-attn's options: the softmax scale; causal (bottom-right aligned); the window (left,
    right), -1 unbounded (causal forces right = 0); softcap (0: off); ALiBi slopes fp32 (H,) or
    (B, H), or None; dropout_p (not with a kv-cache); sinks: None or (H,) attention-sink logits
    (flash-attn's learnable_sink, gpt-oss), any float dtype (computed in fp32; their gradient comes
    back in their dtype)."""
    scale: float
    causal: bool = False
    left: int = -1
    right: int = -1
    softcap: float = 0.0
    alibi: Optional[Tensor] = None
    dropout_p: float = 0.0
    sinks: Optional[Tensor] = None


def _sinks(sinks: Optional[Tensor]) -> Optional[Tensor]:
    """The kernels' fp32 contiguous (H,) sinks; autograd carries the gradient back to any dtype."""
    return None if sinks is None else sinks.float().contiguous()


def _heads_view(t: Tensor) -> Tensor:
    """(B, L, H, D) or (total, H, D) -> the kernels' (B, H, L, D) / (1, H, total, D) view, unit last stride."""
    t = t.transpose(1, 2) if t.dim() == 4 else t.transpose(0, 1).unsqueeze(0)
    return t if t.stride(-1) == 1 else t.contiguous()


def _flash_layout(out: Tensor, lse: Tensor, packed: bool):
    """The kernels' (B, H, L, D) / (1, H, total, D) output -> q's layout; lse (B, H, L) / (H, total)."""
    if packed:
        return out[0].transpose(0, 1).contiguous(), lse[0]
    return out.transpose(1, 2).contiguous(), lse


def flash_attention(q: Tensor, k: Tensor, v: Tensor, features: FlashFeatures,
                    seqlens: Optional[SeqLens] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """flash-attn's attention on the kernels (arguments checked by fasttx.flash). q, k, v in flash-attn's
    layouts: (B, L, H, D), or (total, H, D) rows with `seqlens` (v's head dim Dv may differ from D:
    out then has Dv). Returns (out in q's layout,
    lse (B, H, Lq) or (H, total_q) fp32 without gradient, the dropout's Philox seed (for S_dmask))."""
    f, s = features, seqlens
    fp32_out = q.dtype != torch.float32 and torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, f.sinks))
    res = _flash_fwd(_heads_view(q), _heads_view(k), _heads_view(v), s.cu_q if s else None, s.k_start if s else None,
                     s.k_len if s else None, f.alibi, float(f.dropout_p), float(f.scale), bool(f.causal), int(f.left),
                     int(f.right), float(f.softcap), int(s.max_q) if s else 0, int(s.max_k) if s else 0, fp32_out,
                     _sinks(f.sinks))
    out, lse = _flash_layout(res[0], res[1].detach(), packed=q.dim() == 3)
    return out, lse, res[2]


def flash_attention_kvcache(q: Tensor, k: Tensor, v: Tensor, features: FlashFeatures, seqlens: SeqLens,
                            block_table: Optional[Tensor] = None, page_size: int = 1) -> Tuple[Tensor, Tensor]:
    """Inference attention over a kv-cache (forward only, no dropout): q (B, Lq, H, D) or packed
    (total_q, H, D) with seqlens.cu_q; k, v the cache rows (rows, Hk, D); sequence b's keys are rows
    [k_start[b], k_start[b] + k_len[b]), or through block_table (B, pages) int32 pages of page_size
    rows. Returns (out in q's layout, lse (B, H, Lq) or (H, total_q) fp32)."""
    f, s = features, seqlens
    assert f.dropout_p == 0.0, "the kv-cache path has no dropout"
    out, lse = _flash_kvcache_fwd(_heads_view(q), _heads_view(k), _heads_view(v), s.cu_q, s.k_start, s.k_len,
                                  block_table, int(page_size), f.alibi, float(f.scale), bool(f.causal), int(f.left),
                                  int(f.right), float(f.softcap), int(s.max_q), int(s.max_k), _sinks(f.sinks))
    return _flash_layout(out, lse, packed=q.dim() == 3)


# ----------------------------------------------------------------------------------------------
# DTensor sharding rules of the custom ops above (fasttx/distributed.py registers them). Each takes
# the op's arguments (tensors as DTensor's specs: .ndim, .shape, .placements; None when absent) and
# returns [(output placements, input placements), ...], one per output and per schema argument.
# ----------------------------------------------------------------------------------------------
@sharding_rule(_sdpa_fwd)
def _sdpa_fwd_rule(q, k, v, mask, dropout_p, is_causal, scale, fp32_out, *causal_offset):
    # -> (out, lse, seed, out32); out32 is the fp32 output (16-bit inputs under autograd) or empty;
    # sinks (Hq,), the last optional argument, go with the heads
    R, S, _ = placements()
    sinks = causal_offset[1] if len(causal_offset) > 1 else None
    tail = [None] * (4 + min(len(causal_offset), 1))  # dropout_p, is_causal, scale, fp32_out[, causal_offset]
    extra = len(causal_offset) > 1
    out = [([R, R, R, R], [R, R, R, opt(mask, R), *tail] + ([opt(sinks, R)] if extra else []))]
    for d in (0, 1):  # batch, heads of (B, H, L, E)
        if d == 0 and sinks is not None:
            continue  # its backward would leave each batch shard a partial dsinks (see _sdpa_bwd_rule)
        sink_pl = [opt(sinks, S(0))] if extra else []
        out.append(([S(d), S(d), R, S(d) if fp32_out else R], [S(d), S(d), S(d), opt(mask, S(d)), *tail] + sink_pl))
    return out


@sharding_rule(_sdpa_bwd)
def _sdpa_bwd_rule(dout, q, k, v, mask, out_, lse, seed, dropout_p, is_causal, scale, *causal_offset):
    # -> (dq, dk, dv, dsinks (Hq,) or empty): batch sharding leaves each shard a partial dsinks sum,
    # so with sinks only the head-sharded and replicated strategies are offered
    R, S, _ = placements()
    sinks = causal_offset[1] if len(causal_offset) > 1 else None
    extra = len(causal_offset) > 1
    tail = [None] * (3 + min(len(causal_offset), 1))  # dropout_p, is_causal, scale[, causal_offset]
    out = [([R, R, R, R], [R, R, R, R, opt(mask, R), R, R, R, *tail] + ([opt(sinks, R)] if extra else []))]
    for d in (0, 1):
        if d == 0 and sinks is not None:
            continue
        dsinks = S(0) if sinks is not None else R
        out.append(([S(d)] * 3 + [dsinks], [S(d)] * 4 + [opt(mask, S(d)), S(d), S(d), R, *tail]
                    + ([opt(sinks, S(0))] if extra else [])))
    return matching(out, lse, 6)  # dropout_p is not part of DTensor's cache key: always match


@sharding_rule(_flash_fwd)
def _flash_fwd_rule(q, k, v, cu_q, k_start, k_len, alibi, dropout_p, scale, causal, left, right, softcap,
               max_q, max_k, fp32_out, *sinks):
    # fasttx.flash: q (B, H, L, E) (packed: (1, H, total, E)), k/v likewise with Hkv heads: sharded on
    # heads, the sequence tables replicated, sinks (H,) with the heads. -> (out, lse (B, H, L), seed,
    # out32 or empty)
    R, S, _ = placements()
    tail = [None] * 9
    seq = [opt(cu_q, R), opt(k_start, R), opt(k_len, R)]
    sink = sinks[0] if sinks else None
    extra = ([opt(sink, R)], [heads(sink, S)]) if sinks else ([], [])
    return [([R, R, R, R], [R, R, R, *seq, opt(alibi, R), *tail, *extra[0]]),
            ([S(1), S(1), R, S(1) if fp32_out else R], [S(1), S(1), S(1), *seq, heads(alibi, S), *tail, *extra[1]])]


@sharding_rule(_flash_bwd)
def _flash_bwd_rule(dout, q, k, v, out_, lse, seed, cu_q, k_start, k_len, alibi, *scalars):
    # -> (dq, dk, dv, dsinks (H,) or empty): dsinks sharded with the heads (each head's sum is local)
    R, S, _ = placements()
    sink = scalars[8] if len(scalars) > 8 else None
    scalars = scalars[:8]
    tail = [None] * len(scalars)
    seq = [opt(cu_q, R), opt(k_start, R), opt(k_len, R)]
    extra = ([opt(sink, R)], [heads(sink, S)]) if sink is not None else ([], [])
    out = [([R, R, R, R], [R] * 7 + seq + [opt(alibi, R), *tail, *extra[0]]),
           ([S(1)] * 3 + [S(0) if sink is not None else R], [S(1)] * 6 + [R] + seq + [heads(alibi, S), *tail,
                                                                                   *extra[1]])]
    return matching(out, lse, 5)  # the backward keeps the forward's placement (its dropout mask)


@sharding_rule(_flash_kvcache_fwd)
def _flash_kvcache_fwd_rule(q, k, v, cu_q, k_start, k_len, block_table, page_size, alibi, *scalars):
    R, S, _ = placements()
    sink = scalars[7] if len(scalars) > 7 else None  # after scale, causal, left, right, softcap, max_q, max_k
    tail = [None] * min(len(scalars), 7)
    extra = ([opt(sink, R)], [heads(sink, S)]) if len(scalars) > 7 else ([], [])
    seq = [opt(cu_q, R), R, R, opt(block_table, R), None]
    return [([R, R], [R, R, R, *seq, opt(alibi, R), *tail, *extra[0]]),
            ([S(1), S(1)], [S(1), S(1), S(1), *seq, heads(alibi, S), *tail, *extra[1]])]
