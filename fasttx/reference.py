"""The oracle: plain, readable PyTorch math for every fasttx op, which the tests check both
paths (the Triton kernels and torch's own ops) against. No library code calls it.
It imports no kernel code: an oracle must not share code with what it checks.

Every function takes an optional `upcast` dtype (torch.float32 or torch.float64): when given, the
inputs are converted to it first and the result is returned in it, which is how the tests build a
high-precision oracle from low-precision inputs.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

_Shape = Union[int, Sequence[int], torch.Size]


def _up(t: Optional[torch.Tensor], upcast: Optional[torch.dtype]) -> Optional[torch.Tensor]:
    if t is None or upcast is None or not t.is_floating_point():
        return t
    return t.to(upcast)


# ----------------------------------------------------------------------------------------------
# LayerNorm
# ----------------------------------------------------------------------------------------------
def layer_norm(
    input: torch.Tensor,
    normalized_shape: _Shape,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    upcast: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the trailing `normalized_shape` dims.
    Biased variance, computed from centred values. input (*, *normalized_shape)."""
    x, w, b = _up(input, upcast), _up(weight, upcast), _up(bias, upcast)
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    dims = tuple(range(-len(normalized_shape), 0))
    mean = x.mean(dim=dims, keepdim=True)
    xc = x - mean
    var = (xc * xc).mean(dim=dims, keepdim=True)
    y = xc * torch.rsqrt(var + eps)
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    return y


def residual_dropout_layer_norm(
    input: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float = 1e-5,
    keep_mask: Optional[torch.Tensor] = None,
    p: float = 0.0,
    upcast: Optional[torch.dtype] = None,
):
    """The fused sub-layer `h = residual + dropout(input); y = LayerNorm(h)` over the last dim.

    Returns (y, h): y is the post-norm output `LN(x + drop(y))`; h is the updated residual stream
    that a pre-norm block carries on. `keep_mask` (bool, like input) replays a dropout mask;
    kept elements are scaled by 1/(1-p). `residual=None` means h = dropout(input).
    """
    x = _up(input, upcast)
    if keep_mask is not None:
        x = dropout(x, p, keep_mask=keep_mask)
    h = x if residual is None else _up(residual, upcast) + x
    y = layer_norm(h, (h.shape[-1],), _up(weight, upcast), _up(bias, upcast), eps)
    return y, h


# ----------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------
def gelu(input: torch.Tensor, approximate: str = "none", upcast: Optional[torch.dtype] = None):
    """Exact GELU x * Phi(x) via erf, or the tanh approximation."""
    x = _up(input, upcast)
    if approximate == "none":
        return 0.5 * x * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
    if approximate == "tanh":
        inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)
        return 0.5 * x * (1.0 + torch.tanh(inner))
    raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")


def relu(input: torch.Tensor, upcast: Optional[torch.dtype] = None) -> torch.Tensor:
    """max(x, 0) (NaN stays NaN)."""
    x = _up(input, upcast)
    return torch.where(x > 0, x, torch.where(torch.isnan(x), x, torch.zeros_like(x)))


def bias_gelu(input, bias, approximate: str = "none", upcast: Optional[torch.dtype] = None):
    """gelu(input + bias), bias (hidden,) broadcast over the last dim."""
    return gelu(_up(input, upcast) + _up(bias, upcast), approximate)


def bias_relu(input, bias, upcast: Optional[torch.dtype] = None):
    """relu(input + bias), bias (hidden,) broadcast over the last dim."""
    return torch.relu(_up(input, upcast) + _up(bias, upcast))


# ----------------------------------------------------------------------------------------------
# Dropout
# ----------------------------------------------------------------------------------------------
def dropout(
    input: torch.Tensor,
    p: float = 0.5,
    keep_mask: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    upcast: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """input * keep / (1 - p). `keep_mask` (bool, True = kept) replays a given mask; without one a
    mask is drawn from `generator` (torch's default when None). p == 1 gives zeros."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    x = _up(input, upcast)
    if p == 1.0:
        return x * 0.0  # zeros, NaN kept as NaN like torch
    if keep_mask is None:
        keep_mask = torch.rand(x.shape, generator=generator, device=x.device) >= p
    return x * keep_mask.to(x.dtype) * (1.0 / (1.0 - p))


# ----------------------------------------------------------------------------------------------
# Softmax
# ----------------------------------------------------------------------------------------------
def softmax(input: torch.Tensor, dim: int, dtype: Optional[torch.dtype] = None,
            upcast: Optional[torch.dtype] = None) -> torch.Tensor:
    """exp(x - max) / sum(exp(x - max)) along `dim` (a row of -inf gives NaN, like torch)."""
    x = input if dtype is None else input.to(dtype)
    x = _up(x, upcast)
    e = torch.exp(x - x.amax(dim=dim, keepdim=True))
    return e / e.sum(dim=dim, keepdim=True)


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------
def attention_bias(
    L: int,
    S: int,
    attn_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """The additive score bias of torch SDPA's semantics, broadcastable to (N, H, L, S):
    causal = lower-triangular aligned to the top-left (query i sees keys j <= i);
    a bool mask is True = attend (False -> -inf); a float mask is added."""
    bias = torch.zeros(L, S, dtype=dtype, device=device)
    if is_causal:
        keep = torch.ones(L, S, dtype=torch.bool, device=device).tril()
        bias = bias.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            bias = bias.masked_fill(~attn_mask, float("-inf"))
        else:
            bias = bias + attn_mask.to(dtype)
    return bias


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    dropout_mask: Optional[torch.Tensor] = None,
    upcast: Optional[torch.dtype] = None,
    sinks: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """softmax(Q K^T * scale + bias) V with torch SDPA's semantics.

    query (N, ..., Hq, L, E), key (N, ..., H, S, E), value (N, ..., H, S, Ev) -> (N, ..., Hq, L, Ev).
    With enable_gqa, each group of Hq // H query heads shares one key/value head.
    Rows whose scores are all -inf (fully masked) give zeros, not NaN, as torch does.
    `dropout_mask` (bool, broadcastable to (N, ..., Hq, L, S), True = kept) replays a mask;
    without one a mask is drawn from torch's generator when dropout_p > 0.
    `sinks` (Hq,): attention sinks, see `_sink_softmax` (not a torch argument: fasttx's extension).
    """
    q, k, v = _up(query, upcast), _up(key, upcast), _up(value, upcast)
    L, S, E = q.size(-2), k.size(-2), q.size(-1)
    scale = 1.0 / math.sqrt(E) if scale is None else scale
    if enable_gqa and q.dim() >= 3 and k.size(-3) != q.size(-3):
        groups = q.size(-3) // k.size(-3)
        k = k.repeat_interleave(groups, dim=-3)  # (N, Hq, S, E)
        v = v.repeat_interleave(groups, dim=-3)
    scores = (q @ k.transpose(-2, -1)) * scale  # (N, Hq, L, S)
    bias = attention_bias(L, S, attn_mask, is_causal, dtype=scores.dtype, device=scores.device)
    scores = scores + bias
    if sinks is not None:
        probs = _sink_softmax(scores, _up(sinks, upcast or scores.dtype).to(scores.dtype))[0]
    else:
        # A row with every score -inf (fully masked) attends to nothing: zeros out, zero gradients.
        # Its scores are replaced before the softmax so that neither pass produces NaN there.
        fully_masked = scores.amax(dim=-1, keepdim=True) == float("-inf")
        probs = torch.softmax(scores.masked_fill(fully_masked, 0.0), dim=-1)
        probs = probs.masked_fill(fully_masked, 0.0)
    if dropout_p > 0.0:
        probs = dropout(probs, dropout_p, keep_mask=dropout_mask)
    return probs @ v  # (N, Hq, L, Ev)


def _sink_softmax(scores: torch.Tensor, sinks: torch.Tensor):
    """Attention sinks (gpt-oss): a per-head logit s_h (sinks (H,), heads at dim -3 of scores
    (..., H, L, S)) joins each row's softmax denominator and has no value row:
        lse_i = log(sum_j exp(S_ij) + exp(s_h)),   P_ij = exp(S_ij - lse_i).
    A row whose scores are all -inf gives P = 0 and lse = s_h. Returns (P, lse)."""
    s_h = sinks.reshape(-1, 1, 1).expand(*scores.shape[:-1], 1)  # (..., H, L, 1)
    lse = torch.logsumexp(torch.cat((scores, s_h), dim=-1), dim=-1)  # (..., H, L)
    return torch.exp(scores - lse[..., None]), lse


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size=(-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    dropout_mask: Optional[torch.Tensor] = None,
    upcast: Optional[torch.dtype] = None,
    sinks: Optional[torch.Tensor] = None,
):
    """flash-attn 2's semantics in plain math: q (B, Lq, H, D), k (B, Lk, Hk, D), v (B, Lk, Hk, Dv),
    H % Hk == 0. Returns (out (B, Lq, H, Dv), lse (B, H, Lq)). sinks (H,): attention sinks
    (flash-attn's learnable_sink), see `_sink_softmax`.

    Query i and key j are aligned at the bottom-right corner: with d = i + Lk - Lq - j, key j is
    visible when d <= left (if left >= 0) and -d <= right (if right >= 0); causal sets right = 0.
    Scores: s = scale q.k, then softcap * tanh(s / softcap)
    if softcap > 0, then - slope_h |d| with ALiBi slopes (H,) or (B, H). A row without a visible key
    gives zeros (and lse -inf). dropout_mask (B, H, Lq, Lk) bool replays a keep-mask."""
    q, k, v = _up(q, upcast), _up(k, upcast), _up(v, upcast)
    B, Lq, H, D = q.shape
    Lk, Hk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    qh = q.transpose(1, 2)  # (B, H, Lq, D)
    kh = k.transpose(1, 2).repeat_interleave(H // Hk, dim=1)  # (B, H, Lk, D)
    vh = v.transpose(1, 2).repeat_interleave(H // Hk, dim=1)
    s = (qh @ kh.transpose(-2, -1)) * scale  # (B, H, Lq, Lk)
    if softcap > 0.0:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(Lq, device=q.device)[:, None]
    j = torch.arange(Lk, device=q.device)[None, :]
    d = i + Lk - Lq - j  # (Lq, Lk)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(s.dtype)
        slopes = slopes[None, :, None, None] if slopes.dim() == 1 else slopes[:, :, None, None]
        s = s - slopes * d.abs().to(s.dtype)
    left, right = window_size
    if causal:
        right = 0
    visible = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device)
    if left >= 0:
        visible &= d <= left
    if right >= 0:
        visible &= -d <= right
    s = s.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        p, lse = _sink_softmax(s, _up(sinks, upcast or s.dtype).to(s.dtype))
    else:
        lse = torch.logsumexp(s, dim=-1)  # (B, H, Lq); -inf for rows without a visible key
        empty = ~visible.any(-1)[:, None]  # (Lq, 1)
        p = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    if dropout_p > 0.0:
        p = dropout(p, dropout_p, keep_mask=dropout_mask)
    return (p @ vh).transpose(1, 2), lse  # (B, Lq, H, Dv), (B, H, Lq)


# ----------------------------------------------------------------------------------------------
# RMSNorm (+ the fused residual add), in the model families' casting orders
# ----------------------------------------------------------------------------------------------
def rms_norm(
    input: torch.Tensor,
    normalized_shape: _Shape,
    weight: Optional[torch.Tensor] = None,
    eps: Optional[float] = None,
    cast: str = "torch",
    upcast: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) [* weight] over the trailing `normalized_shape` dims.

    The statistics are taken in float32 at least (float64 input, or upcast, keeps float64), and
    the result is cast back to x's dtype at the point the casting order says:
      "torch": (xhat * weight).to(dtype)                  torch.nn.functional.rms_norm
      "llama": weight * xhat.to(dtype)                    HF LlamaRMSNorm (promotes with weight)
      "gemma": (xhat * (1 + weight)).to(dtype)            HF GemmaRMSNorm
    Without upcast this is the model's own formula, rounding included; with upcast=float64 the
    casts vanish and all orders but gemma's are the same exact math. eps=None: float32's machine
    epsilon (float64's for float64), as torch's."""
    x, w = _up(input, upcast), _up(weight, upcast)
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    dims = tuple(range(-len(shape), 0))
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    eps = torch.finfo(acc).eps if eps is None else eps
    xf = x.to(acc)
    xhat = xf * torch.rsqrt(xf.pow(2).mean(dim=dims, keepdim=True) + eps)
    if cast == "llama":
        xhat = xhat.to(x.dtype)
        return xhat if w is None else w * xhat
    if w is not None:
        xhat = xhat * ((1.0 + w.to(acc)) if cast == "gemma" else w.to(acc))
    return xhat.to(x.dtype)


def add_rms_norm(
    input: torch.Tensor,
    residual: Optional[torch.Tensor],
    normalized_shape: _Shape,
    weight: Optional[torch.Tensor] = None,
    eps: Optional[float] = None,
    cast: str = "torch",
    upcast: Optional[torch.dtype] = None,
):
    """(rms_norm(h), h) with h = input + residual (input when residual is None), h rounded to
    its dtype as an unfused add stores it."""
    h = _up(input, upcast) if residual is None else _up(input, upcast) + _up(residual, upcast)
    return rms_norm(h, normalized_shape, weight, eps, cast, upcast), h


# ----------------------------------------------------------------------------------------------
# Gated MLP activations
# ----------------------------------------------------------------------------------------------
def silu(input: torch.Tensor, upcast: Optional[torch.dtype] = None) -> torch.Tensor:
    """x * sigmoid(x) = x / (1 + exp(-x))."""
    x = _up(input, upcast)
    return x / (1.0 + torch.exp(-x))


def gated(gate: torch.Tensor, up: Optional[torch.Tensor] = None, activation: str = "silu",
          upcast: Optional[torch.dtype] = None) -> torch.Tensor:
    """act(gate) * up, act "silu", "gelu" (erf) or "gelu_tanh". up None: gate is (gate|up) on its
    last dim, split in the middle."""
    g = _up(gate, upcast)
    if up is None:
        n = g.shape[-1] // 2
        g, u = g[..., :n], g[..., n:]
    else:
        u = _up(up, upcast)
    if activation == "silu":
        return silu(g) * u
    return gelu(g, "tanh" if activation == "gelu_tanh" else "none") * u


# ----------------------------------------------------------------------------------------------
# Rotary position embedding
# ----------------------------------------------------------------------------------------------
def rotary(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool = False,
    upcast: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """x * cos + rotate(x) * sin on the first R = cos.shape[-1] dims of x, the rest unchanged;
    cos, sin broadcast against x[..., :R]. rotate: (x1, x2) -> (-x2, x1) on the halves (HF's
    rotate_half), or on each pair (x_2i, x_2i+1) when interleaved (GPT-J's rotate_every_two)."""
    x, cos, sin = _up(x, upcast), _up(cos, upcast), _up(sin, upcast)
    R = cos.shape[-1]
    xr = x[..., :R]
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rotated = torch.stack((-x2, x1), dim=-1).reshape(xr.shape)
    else:
        x1, x2 = xr[..., : R // 2], xr[..., R // 2:]
        rotated = torch.cat((-x2, x1), dim=-1)
    return torch.cat((xr * cos + rotated * sin, x[..., R:]), dim=-1)


# ----------------------------------------------------------------------------------------------
# Cross-entropy
# ----------------------------------------------------------------------------------------------
def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    upcast: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """torch.nn.functional.cross_entropy's semantics written out. input (C,), (N, C) or
    (N, C, d1, ...); target: class indices of input's shape without the class dim, or class
    probabilities of input's shape. With smoothing eps the target becomes (1 - eps) * target +
    eps / C (class indices: eps / C on every class, 1 - eps + eps / C on the true one).

    Class indices:   l_n = (1 - eps) w_y (lse - x_y) + eps / C * sum_c w_c (lse - x_c), 0 if ignored;
                     'mean' divides the sum by sum_n w_{y_n} over the rows not ignored.
    Probabilities:   l_n = -sum_c w_c t'_c (x_c - lse);  'mean' divides by the number of rows.
    """
    x = _up(input, upcast)
    t = _up(target, upcast) if target.is_floating_point() else target
    w = _up(weight, upcast)
    if x.dim() == 1:  # (C,) -> (1, C)
        x, t = x.unsqueeze(0), t.unsqueeze(0)
    C = x.size(1)
    logp = x - torch.logsumexp(x, dim=1, keepdim=True)  # (N, C, d1, ...)
    shape = [1, C] + [1] * (x.dim() - 2)  # class weights broadcast over the class dim
    wc = torch.ones(C, dtype=x.dtype, device=x.device) if w is None else w.to(x.dtype)
    wc = wc.reshape(shape)
    eps = label_smoothing
    if t.is_floating_point():  # class probabilities, same shape as x
        tt = t.to(x.dtype) * (1 - eps) + eps / C
        loss = -(wc * tt * logp).sum(dim=1)  # (N, d1, ...)
        denom = torch.tensor(float(loss.numel()), dtype=x.dtype, device=x.device)
    else:
        valid = t != ignore_index
        tc = torch.where(valid, t, torch.zeros_like(t))
        w_y = wc.flatten()[tc] * valid  # (N, d1, ...)
        nll = -logp.gather(1, tc.unsqueeze(1)).squeeze(1)
        smooth = -(wc * logp).sum(dim=1)
        loss = (1 - eps) * w_y * nll + torch.where(valid, eps / C * smooth, torch.zeros_like(nll))
        denom = w_y.sum()
    if reduction == "none":
        out = loss
    elif reduction == "sum":
        out = loss.sum()
    else:
        out = loss.sum() / denom
    return out if input.dim() > 1 or reduction != "none" else out.squeeze(0)


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    linear_bias: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    upcast: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """cross_entropy(linear(input, linear_weight, linear_bias), target): torch 2.13's
    linear_cross_entropy, the logits materialised (this is the oracle, not the fast path).
    input (H,) or (N, H); linear_weight (C, *out_features, H); linear_bias (C, *out_features);
    ignore_index None means -100."""
    x, W, b = _up(input, upcast), _up(linear_weight, upcast), _up(linear_bias, upcast)
    logits = torch.einsum("...h,kh->...k", x, W.reshape(-1, W.size(-1)))  # (N, C * prod(out))
    if b is not None:
        logits = logits + b.reshape(-1)
    logits = logits.reshape(*x.shape[:-1], *W.shape[:-1])  # (N, C, *out_features)
    return cross_entropy(logits, target, weight, -100 if ignore_index is None else ignore_index,
                         reduction, label_smoothing, upcast=upcast)


# ----------------------------------------------------------------------------------------------
# Post-training: token log-probabilities, entropy, distillation divergences (logits materialised)
# ----------------------------------------------------------------------------------------------
def linear_log_probs(
    input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    upcast: Optional[torch.dtype] = None,
):
    """(logp, ent) per token: logp = log_softmax(z)[target], ent = -sum_v p_v log p_v for the
    logits z = linear(input, weight, bias) / temperature, both 0 where target == ignore_index.
    input (*, H), weight (V, H), bias (V,), target (*)."""
    x, W, b = _up(input, upcast), _up(weight, upcast), _up(bias, upcast)
    z = x @ W.t()
    if b is not None:
        z = z + b
    logp_all = torch.log_softmax(z / temperature, dim=-1)  # (*, V)
    valid = target != ignore_index
    tc = torch.where(valid, target, torch.zeros_like(target))
    logp = logp_all.gather(-1, tc.unsqueeze(-1)).squeeze(-1)
    plogp = logp_all.exp() * logp_all  # p log p; 0 for p = 0 (an -inf logit), not 0 * -inf
    ent = -torch.where(logp_all == float("-inf"), torch.zeros_like(plogp), plogp).sum(-1)
    zero = torch.zeros_like(logp)
    return torch.where(valid, logp, zero), torch.where(valid, ent, zero)


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
):
    """Per-token generalised JSD of the two next-token distributions (the vocabulary summed),
    0 where labels == ignore_index: beta = 0 KL(T || S), beta = 1 KL(S || T), otherwise
    beta KL(T || M) + (1 - beta) KL(S || M), M = (1 - beta) S + beta T."""
    S = torch.softmax(student_logits / temperature, dim=-1)
    T = torch.softmax(teacher_logits / temperature, dim=-1)
    ls, lt = S.log(), T.log()
    if beta == 0:
        d = (T * (lt - ls)).sum(-1)
    elif beta == 1:
        d = (S * (ls - lt)).sum(-1)
    else:
        lm = ((1 - beta) * S + beta * T).log()
        d = beta * (T * (lt - lm)).sum(-1) + (1 - beta) * (S * (ls - lm)).sum(-1)
    if labels is not None:
        d = torch.where(labels != ignore_index, d, torch.zeros_like(d))
    return d


# ----------------------------------------------------------------------------------------------
# Mixture-of-experts MLP
# ----------------------------------------------------------------------------------------------
def moe_experts(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, *, activation="silu",
                gate_up_bias=None, down_bias=None, gate_up_interleaved=False, transposed=False,
                alpha=1.702, limit=7.0, upcast: Optional[torch.dtype] = None, expert_ids=None) -> torch.Tensor:
    """out[t] = sum_j w[t, j] * (act(gate_e x_t, up_e x_t) down_e^T + down_bias[e]), e = top_k_index[t, j],
    one token and one slot at a time (the plainest loop there is). expert_ids: the global id of each
    weight slot; a pair whose expert is not among them adds nothing."""
    slot = None if expert_ids is None else {int(g): i for i, g in enumerate(expert_ids.tolist())}
    x, w, w1, w2 = (_up(t, upcast) for t in (hidden_states, top_k_weights, gate_up_proj, down_proj))
    b1, b2 = _up(gate_up_bias, upcast), _up(down_bias, upcast)
    if transposed:  # (E, H, 2I), (E, I, H) -> (E, 2I, H), (E, H, I)
        w1, w2 = w1.transpose(1, 2), w2.transpose(1, 2)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(top_k_index.shape[1]):
            e = int(top_k_index[t, j])
            if slot is not None:
                if e not in slot:
                    continue
                e = slot[e]
            gu = w1[e] @ x[t] + (b1[e] if b1 is not None else 0)
            g, u = (gu[0::2], gu[1::2]) if gate_up_interleaved else gu.chunk(2)
            if activation == "silu":
                a = g * torch.sigmoid(g) * u
            elif activation in ("gelu", "gelu_tanh"):
                a = torch.nn.functional.gelu(g, approximate="tanh" if activation == "gelu_tanh" else "none") * u
            elif activation == "clamped_swiglu":
                gc, uc = g.clamp(max=limit), u.clamp(-limit, limit)
                a = (uc + 1) * gc * torch.sigmoid(alpha * gc)
            else:
                raise ValueError(activation)
            y = w2[e] @ a + (b2[e] if b2 is not None else 0)
            out[t] = out[t] + w[t, j] * y
    return out
