"""Attention: transformers' AttentionInterface entry "fasttx", the attention-implementation policy,
and the rotary attention forward (fasttx's rotary application inside transformers' attention layout).
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import sys
from typing import Callable, Optional, Tuple

import torch
import transformers
from torch import Tensor, nn

import fasttx.functional as FF

logger = logging.getLogger("fasttx.integrations.huggingface")

ATTN_IMPLEMENTATION = "fasttx"

# Attention arguments of other models that this function does not implement: the call goes to the
# model's own eager attention (with one warning naming why), never ignored.
_DELEGATED_KWARGS = {
    "position_bias": "a position bias is not implemented",
    "cache": "an attention-level cache is not implemented",
}
_warned = set()


def _warn_once(module: nn.Module, why: str) -> None:
    key = (type(module).__name__, why)
    if key not in _warned:
        _warned.add(key)
        logger.warning("fasttx attention: %s keeps transformers' eager attention (%s)", key[0], why)


def _delegate_reason(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, kwargs) -> Optional[str]:
    for name, why in _DELEGATED_KWARGS.items():
        if kwargs.get(name) is not None:
            return why
    sinks = kwargs.get("s_aux")  # attention sinks (gpt-oss, granite_swa): the kernels' SINK flag
    if sinks is not None:
        if not isinstance(sinks, Tensor) or sinks.shape != (query.shape[1],):
            return "attention sinks of a shape other than (heads,)"
        if kwargs.get("softcap"):
            return "attention sinks together with a logit softcap"
        if kwargs.get("output_attentions"):
            return "attention weights with sinks (the model's own eager attention defines them)"
    mask = kwargs.get("_mask")
    if isinstance(mask, Tensor) and mask.requires_grad:
        return "a learned attention mask (its gradient)"
    return None


def _additive_mask(module, mask, query, key, is_causal, window) -> Optional[Tensor]:
    """The float (0 / lowest) mask transformers' eager functions add to the scores, from what the
    "fasttx" mask builder gave (sdpa's: bool, or None where causality or nothing suffices)."""
    L, S = query.shape[-2], key.shape[-2]
    causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
    if mask is None:
        if window is not None and S >= int(window):
            mask = _window_mask(L, S, int(window), query.device)
        elif causal and L > 1:
            mask = torch.ones(L, S, dtype=torch.bool, device=query.device).tril(diagonal=S - L)
        else:
            return None
        mask = mask[None, None]
    if mask.dtype == torch.bool:
        lowest = torch.finfo(query.dtype).min
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill(~mask, lowest)
    return mask


def _eager_of(module: nn.Module) -> Optional[Callable]:
    """The eager attention function of the module's own modeling file."""
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------
def fasttx_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    head_mask: Optional[Tensor] = None,
    **kwargs,
) -> Tuple[Tensor, Optional[Tensor]]:
    """transformers' attention-function contract, computed by fasttx's scaled_dot_product_attention.

    query (B, Hq, L, E), key (B, Hkv, S, E), value (B, Hkv, S, Ev); Hq a multiple of Hkv (GQA).
    attention_mask: None, bool (True = attend) or float (added to the scores), broadcastable to
        (B, Hq, L, S) -- what transformers' mask builders give.
    dropout: attention-probability dropout (transformers passes 0.0 outside training).
    scaling: multiplies q.k (None: E ** -0.5). GPT-2's inverse-layer-index scaling arrives here.
    is_causal: None -> `module.is_causal` (True when the module does not say, like transformers).
        The causal mask is applied only when no mask was built (a built mask already contains it).
    head_mask: None or (B or 1, Hq, 1, 1) per-head multipliers of the attention probabilities.
    sliding_window (in kwargs, Mistral / Qwen2): query i sees keys j with i - window < j <= i. The
        mask transformers builds for a sliding layer already holds the window (it builds none only
        when the window cuts nothing); without a mask and with S >= window it is built here.
    output_attentions=True (in kwargs): computed explicitly so the probabilities can be returned.
    s_aux (in kwargs, gpt-oss / granite_swa): (Hq,) attention-sink logits, one more softmax-denominator
        logit per head without a value row (the kernels' SINK flag; differentiable).
    value's head dim Ev may differ from E (DeepSeek's MLA): the kernels take it as it is.

    Returns (attn_output (B, L, Hq, Ev) contiguous, attn_weights (B, Hq, L, S) or None).
    """
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(
            "fasttx attention expects query, key, value of shape (batch, heads, seq, head_dim), got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    why = _delegate_reason(module, query, key, value, dict(kwargs, _mask=attention_mask))
    if why is not None:
        eager = _eager_of(module)
        if eager is None:
            raise NotImplementedError(
                f"fasttx attention: {why}, and {type(module).__name__}'s modeling file has no eager attention "
                "to fall back to; use attn_implementation='sdpa' or 'eager' for this model"
            )
        _warn_once(module, why)
        if head_mask is not None:
            kwargs["head_mask"] = head_mask
        mask = _additive_mask(module, attention_mask, query, key, is_causal, kwargs.get("sliding_window"))
        return eager(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    sinks = kwargs.pop("s_aux", None)
    softcap = kwargs.get("softcap")
    softcap = float(softcap) if softcap else 0.0
    L, S = query.shape[-2], key.shape[-2]
    causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
    attn_mask = attention_mask
    window = kwargs.get("sliding_window")
    if head_mask is None and not kwargs.get("output_attentions", False):
        out = _flash_path(query, key, value, attn_mask, dropout, scaling, causal, window, kwargs, softcap, sinks)
        if out is not None:
            return out, None
    if window is not None and attn_mask is None and S >= window:
        attn_mask = _window_mask(L, S, int(window), query.device)  # (L, S) bool
    if attn_mask is not None and causal and L > 1 and attn_mask.shape[-2] == 1:
        # A padding-only (B, 1, 1, S) mask for a causal module (transformers < 4.53 built these and
        # applied causality inside its own attention code): add the causal part, bottom-right
        # aligned so that queries are the last L of S positions when a cache holds earlier ones.
        attn_mask = _with_causal(attn_mask, L, S, query.dtype)
    # A built mask already carries causality; without one, the causal flag does it (top-left
    # aligned like torch, which also covers an empty static cache: keys past L are never seen).
    use_is_causal = attn_mask is None and causal and L > 1
    enable_gqa = key.shape[1] != query.shape[1]

    if sinks is not None:  # (softcap and output_attentions with sinks were delegated above)
        from fasttx.ops.attention import sdpa_with_sinks

        out = sdpa_with_sinks(query, key, value, attn_mask=attn_mask, dropout_p=dropout, is_causal=use_is_causal,
                              scale=scaling, enable_gqa=enable_gqa, sinks=sinks)  # (B, Hq, L, Ev)
        weights = None
    elif kwargs.get("output_attentions", False) or softcap:
        out, weights = _explicit_attention(
            query, key, value, attn_mask, dropout, scaling, use_is_causal, enable_gqa, softcap
        )
        if not kwargs.get("output_attentions", False):
            weights = None
    else:
        out = FF.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout, is_causal=use_is_causal,
            scale=scaling, enable_gqa=enable_gqa,
        )  # (B, Hq, L, Ev)
        weights = None
    if head_mask is not None:
        # (P * h) @ V == h * (P @ V) when h is constant over (L, S): one multiplier per head.
        if head_mask.dim() != 4 or head_mask.shape[-2:] != (1, 1):
            raise ValueError(
                "fasttx attention supports head_mask only as per-head multipliers of shape "
                f"(batch or 1, heads, 1, 1), got {tuple(head_mask.shape)}"
            )
        out = out * head_mask
        if weights is not None:
            weights = weights * head_mask
    return out.transpose(1, 2).contiguous(), weights  # (B, L, Hq, Ev)


def _packed_cu_seqlens(query: Tensor, kwargs) -> Optional[Tuple[Tensor, Tensor, int, int]]:
    """(cu_q, cu_k, max_q, max_k) of a packed batch, or None: transformers' flash kwargs
    (cu_seq_lens_q/k, max_length_q/k), or position_ids (1, L) that restart at 0 (what
    DataCollatorWithFlattening gives) without a kv-cache (S == L)."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:
        max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
        lens = lambda cu: int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0  # noqa: E731
        return (cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q) if max_q is not None else lens(cu_q),
                int(max_k) if max_k is not None else lens(cu_k))
    pos = kwargs.get("position_ids")
    if not isinstance(pos, Tensor) or pos.dim() != 2 or pos.shape[0] != 1 or pos.shape[1] != query.shape[-2]:
        return None
    starts = (pos[0] == 0).nonzero().flatten()
    if starts.numel() < 2 or int(starts[0]) != 0:  # one sequence (or no restart): not packed
        return None
    L = pos.shape[1]
    cu = torch.cat([starts, starts.new_tensor([L])]).to(torch.int32)
    m = int((cu[1:] - cu[:-1]).max())
    return cu, cu, m, m


def _flash_path(query, key, value, attn_mask, dropout, scaling, causal, window, kwargs,
                softcap=0.0, sinks=None) -> Optional[Tensor]:
    """fasttx.flash where it fits, else None: a packed batch (B == 1) runs as varlen attention, each
    sequence attending only within itself, no padding; a sliding window without a mask runs in the
    kernel (window_size=(window - 1, 0), bottom-right aligned like transformers' overlay) instead of
    a materialised (L, S) mask; a logit softcap (Gemma 2/3) without a mask runs in the kernel too
    (softcap * tanh(s / softcap), the window per layer as the layer passes it). sinks: (Hq,)
    attention sinks (flash's learnable_sink), on every one of these paths.
    Returns (B, L, Hq, Ev) like fasttx_attention_forward."""
    if key.shape[:3] != value.shape[:3] or query.shape[-1] != key.shape[-1] or query.shape[1] % key.shape[1]:
        return None
    from fasttx import flash

    S = key.shape[-2]
    win = (int(window) - 1, 0) if window is not None and causal else (-1, -1)
    packed = _packed_cu_seqlens(query, kwargs) if query.shape[0] == 1 and query.shape[-2] == S else None
    if packed is not None:
        cu_q, cu_k, max_q, max_k = packed
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (total, H, E)
        out = flash.flash_attn_varlen_func(q, k, v, cu_q.to(q.device), cu_k.to(q.device), max_q, max_k,
                                           dropout_p=dropout, softmax_scale=scaling, causal=causal, window_size=win,
                                           softcap=softcap, learnable_sink=sinks)
        return out[None]  # (1, L, Hq, Ev)
    if attn_mask is None and ((window is not None and causal and S >= window) or softcap):
        if not causal and query.shape[-2] != S:
            return None
        if window is None or S < window:
            win = (-1, -1)  # the window cuts nothing
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, L, H, E)
        if causal and query.shape[-2] > S:
            return None
        return flash.flash_attn_func(q, k, v, dropout_p=dropout, softmax_scale=scaling, causal=causal,
                                     window_size=win, softcap=softcap, learnable_sink=sinks)
    return None


def _with_causal(mask: Tensor, L: int, S: int, dtype: torch.dtype) -> Tensor:
    """mask (*, 1, S) bool or additive float -> (*, L, S) with the causal part added."""
    keep = torch.ones(L, S, dtype=torch.bool, device=mask.device).tril(diagonal=S - L)  # (L, S)
    if mask.dtype == torch.bool:
        return mask & keep
    return mask.masked_fill(~keep, torch.finfo(mask.dtype).min)


def _window_mask(L: int, S: int, window: int, device) -> Tensor:
    """(L, S) bool: causal, bottom-right aligned (queries are the last L of S positions), and
    key j visible from query i only when i - window < j (transformers' sliding_window_overlay)."""
    i = torch.arange(L, device=device)[:, None] + (S - L)  # absolute query positions
    j = torch.arange(S, device=device)[None, :]
    return (j <= i) & (j > i - window)


def _explicit_attention(q, k, v, mask, dropout, scaling, is_causal, enable_gqa, softcap=0.0):
    """softmax(q k^T * scale + mask) v with the probabilities materialized (output_attentions).
    Scores accumulate in fp32; masked scores use the dtype's lowest value like transformers'
    eager path, so a fully masked row stays finite."""
    if enable_gqa:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, Hq, S, *)
    scale = q.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, Hq, L, S)
    if softcap:  # Gemma 2/3: softcap * tanh(scores / softcap) before the mask
        scores = torch.tanh(scores / softcap) * softcap
    lowest = torch.finfo(scores.dtype).min
    if is_causal:
        L, S = scores.shape[-2:]
        keep = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, lowest)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, lowest)
        else:
            scores = (scores + mask.float()).clamp_min(lowest)
    probs = FF.softmax(scores, dim=-1).to(q.dtype)
    if dropout > 0.0:
        probs = FF.dropout(probs, p=dropout, training=True)
    return torch.matmul(probs, v), probs


def register() -> None:
    """Register "fasttx" in transformers' attention (and, where it exists, mask) interfaces.
    Idempotent; apply_fasttx calls it."""
    from .output_attentions import allow

    allow(ATTN_IMPLEMENTATION)  # config.output_attentions = True: eager for those calls, not transformers' error
    try:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTN_IMPLEMENTATION, fasttx_attention_forward)
    except ImportError:  # transformers < 4.50: a plain dict
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        ALL_ATTENTION_FUNCTIONS[ATTN_IMPLEMENTATION] = fasttx_attention_forward
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # transformers < 4.53: the models build the 4-D masks themselves
        return
    # The boolean (True = attend) masks of the SDPA path are exactly what our SDPA takes; the builder
    # returns None where `is_causal` or no mask suffices, which fasttx_attention_forward handles.
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def _routes_through_interface(model: nn.Module) -> bool:
    if hasattr(type(model), "_can_set_attn_implementation"):  # transformers >= 4.53
        return bool(type(model)._can_set_attn_implementation())
    try:  # the same source heuristic transformers itself uses
        source = inspect.getsource(sys.modules[type(model).__module__])
    except (KeyError, OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source


# The implementations transformers picks by itself when the user asks for none: replaced by "fasttx".
# Anything else (eager on a model that supports sdpa, flash_attention_*, flex_attention, a hub
# kernel) was chosen explicitly and is kept unless apply_fasttx(attention=True).
_AUTOMATIC = ("sdpa", None)


def attention_policy(model: nn.Module, attention: Optional[bool]) -> Tuple[bool, Optional[str]]:
    """(whether to set "fasttx", why not). attention: None = replace transformers' automatic choice
    only, True = always where the model dispatches through the interface, False = never."""
    config = model.config
    current = getattr(config, "_attn_implementation", None)
    if attention is False:
        return False, f"apply_fasttx(attention=False) keeps {current!r}"
    if not _routes_through_interface(model):
        return False, (f"it does not dispatch attention through transformers' AttentionInterface "
                       f"(transformers {transformers.__version__})")
    if current == ATTN_IMPLEMENTATION or attention is True:
        return True, None
    automatic = current in _AUTOMATIC or (current == "eager" and not getattr(type(model), "_supports_sdpa", False))
    if not automatic:
        return False, f"the attention implementation {current!r} was chosen explicitly (attention=True overrides)"
    return True, None


def set_attention(model: nn.Module) -> bool:
    """Point the model's attention at "fasttx"; False when transformers refuses it."""
    config = model.config
    if getattr(config, "_attn_implementation", None) == ATTN_IMPLEMENTATION:
        return True
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    else:
        config._attn_implementation = ATTN_IMPLEMENTATION
    return getattr(config, "_attn_implementation", None) == ATTN_IMPLEMENTATION


@contextlib.contextmanager
def eager_for_this_call(model: nn.Module, wants_weights: bool):
    """output_attentions=True on a model whose attention is "fasttx": this one call runs
    transformers' eager attention (the torch path), so the weights are exactly eager's and every
    model returns them (GPT-2 and BERT record them from the attention modules' outputs)."""
    config = model.config
    if not wants_weights or getattr(config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
        yield
        return
    config._attn_implementation = "eager"  # the setter also sets the sub-configs
    try:
        yield
    finally:
        config._attn_implementation = ATTN_IMPLEMENTATION


# ----------------------------------------------------------------------------------------------
# The rotary attention forward: transformers 5's layout (q/k/v or fused qkv projections, optional
# q/k norms over the head dim or the whole projection, rotary, cache, interface, o_proj).
# ----------------------------------------------------------------------------------------------
def attention_layout(module: nn.Module) -> bool:
    """Whether the module has the projections and the forward signature rotary_attention_forward reads."""
    lin = lambda n: isinstance(getattr(module, n, None), nn.Linear)  # noqa: E731
    if not (lin("o_proj") and (all(lin(n) for n in ("q_proj", "k_proj", "v_proj")) or lin("qkv_proj"))):
        return False
    if not isinstance(getattr(module, "head_dim", None), int) or not hasattr(module, "scaling"):
        return False
    if not hasattr(transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS, "get_interface"):
        return False
    try:
        params = inspect.signature(type(module).forward).parameters
    except (TypeError, ValueError):
        return False
    return "position_embeddings" in params and ("cache" in params or "past_key_values" in params)


def rotary_attention_forward(
    self,
    hidden_states: Tensor,
    position_embeddings: Optional[Tuple[Tensor, Tensor]] = None,
    attention_mask: Optional[Tensor] = None,
    cache=None,
    past_key_values=None,
    **kwargs,
):
    """hidden_states (B, L, hidden) -> (attn_output (B, L, hidden), attn_weights or None), with
    FF.apply_rotary_emb (halves or interleaved pairs, partial rotary when cos is narrower than the
    head) on transformers' (B, L, R) cos/sin tables."""
    cache = past_key_values if cache is None else cache
    input_shape = hidden_states.shape[:-1]
    D = self.head_dim
    hidden_shape = (*input_shape, -1, D)
    if hasattr(self, "qkv_proj") and not hasattr(self, "q_proj"):
        qkv = self.qkv_proj(hidden_states)
        nq = self.config.num_attention_heads * D
        nkv = (qkv.shape[-1] - nq) // 2
        query, key, value = qkv[..., :nq], qkv[..., nq:nq + nkv], qkv[..., nq + nkv:]
    else:
        query, key, value = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
    q_norm, k_norm = getattr(self, "q_norm", None), getattr(self, "k_norm", None)
    per_head = self.__dict__.get("_fasttx_qk_norm_per_head", True)
    if q_norm is not None and not per_head:  # OLMo 2: over the whole projection, before the head split
        query, key = q_norm(query), k_norm(key)
    query, key = query.view(hidden_shape), key.view(hidden_shape)  # (B, L, H, D)
    if q_norm is not None and per_head:  # Qwen 3, Gemma 3: over the head dim
        query, key = q_norm(query), k_norm(key)
    query, key = query.transpose(1, 2), key.transpose(1, 2)  # (B, H, L, D)
    value = value.view(hidden_shape).transpose(1, 2)  # (B, Hkv, L, Dv)
    if getattr(self, "use_rope", True) and position_embeddings is not None:
        cos, sin = position_embeddings  # (B, L, R) each
        tables = self.__dict__.get("_fasttx_rotary", "halves")
        if tables == "interleaved":  # tables repeat each frequency twice in halves; pairs take them in order
            half = cos.shape[-1] // 2
            cos, sin = cos[..., :half].repeat_interleave(2, -1), sin[..., :half].repeat_interleave(2, -1)
        elif tables == "half tables":  # gpt-oss: one entry per frequency, rotating the head's halves
            cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
        query, key = FF.apply_rotary_emb(query, key, cos, sin, interleaved=tables == "interleaved")
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
    for attr, name in (("sliding_window", "sliding_window"), ("attn_logit_softcapping", "softcap")):
        if name not in kwargs and getattr(self, attr, None) is not None:
            kwargs[name] = getattr(self, attr)
    if isinstance(getattr(self, "sinks", None), Tensor) and "s_aux" not in kwargs:
        kwargs["s_aux"] = self.sinks
    default = getattr(sys.modules[type(self).__module__], "eager_attention_forward", None)
    attention = transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, default
    )
    out, weights = attention(
        self, query, key, value, attention_mask,
        dropout=0.0 if not self.training else getattr(self, "attention_dropout", 0.0), scaling=self.scaling,
        **kwargs,
    )  # (B, L, Hq, Dv)
    out = out.reshape(*input_shape, -1).contiguous()
    return self.o_proj(out), weights


# form name -> how the (B, L, R) cos/sin tables are read (rotary_attention_forward)
ROTARY_FORMS = {"rotary(halves)": "halves", "rotary(interleaved pairs)": "interleaved",
                "rotary(half tables)": "half tables"}


# ----------------------------------------------------------------------------------------------
# Other attention layouts (fused qkv projections, partial rotary, GPT-J's single-tensor form):
# the modeling file's own `apply_rotary_pos_emb` is swapped for a fasttx one while the module's
# forward runs (and only then), after the probe showed the two compute the same.
# ----------------------------------------------------------------------------------------------
# The modeling files' rotary functions: apply_rotary_pos_emb, and DeepSeek's for weights laid out in
# interleaved pairs (rope_interleave), whose output is the pairs de-interleaved ([evens; odds]) and
# rotated as halves.
ROTARY_FNS = ("apply_rotary_pos_emb", "apply_rotary_pos_emb_interleave")


def _tables(cos: Tensor, sin: Tensor, tables: str):
    if tables == "interleaved":
        half = cos.shape[-1] // 2
        return cos[..., :half].repeat_interleave(2, -1), sin[..., :half].repeat_interleave(2, -1)
    if tables == "half tables":
        return torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    if tables == "pairs":  # one entry per pair (GPT-J's sincos): each entry twice, in order
        return cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)
    return cos, sin  # "halves", "deinterleaved"


def _deinterleave(x: Tensor) -> Tensor:
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)


def rotary_fn(tables: str, single: bool = False) -> Callable:
    """A drop-in for a modeling file's apply_rotary_pos_emb built on FF.apply_rotary_emb:
    (q, k, cos, sin, position_ids=None, unsqueeze_dim=1) -> (q, k) with heads at dim 1
    (unsqueeze_dim=1) or 2; or, single=True, GPT-J's (tensor (B, L, H, D), sin, cos) -> tensor."""
    interleaved = tables in ("interleaved", "pairs")
    if single:
        def apply_one(tensor, sin, cos):
            cos, sin = _tables(cos, sin, tables)
            return FF.apply_rotary_emb(tensor, tensor, cos, sin, interleaved=interleaved, seq_dim=-3)[0]
        return apply_one

    def apply(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        cos, sin = _tables(cos, sin, tables)
        if tables == "deinterleaved":
            q, k = _deinterleave(q), _deinterleave(k)
        return FF.apply_rotary_emb(q, k, cos, sin, interleaved=interleaved, seq_dim=-2 if unsqueeze_dim == 1 else -3)
    return apply


def rotary_fn_forward(self, *args, **kwargs):
    """The module's own forward with its modeling file's rotary function (one of ROTARY_FNS)
    pointing at the fasttx form the probe chose, for the duration of this call."""
    mod = sys.modules[type(self).__module__]
    name, fn = self.__dict__["_fasttx_rotary_fn"]
    previous = getattr(mod, name)
    setattr(mod, name, fn)
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        setattr(mod, name, previous)
