"""fasttx for HuggingFace transformers models (optional extra `hf`: transformers >= 4.48).

    from transformers import LlamaForCausalLM
    from fasttx.integrations.huggingface import apply_fasttx

    model = apply_fasttx(LlamaForCausalLM.from_pretrained("path/to/local/dir"))

`apply_fasttx(model)` patches one model instance in place and returns it:
  - every `torch.nn.LayerNorm` / `torch.nn.Dropout` / `torch.nn.GELU` becomes the fasttx.nn module
    through `fasttx.convert`, which re-classes the instance: the *same* module and Parameter objects
    (state_dict, tied weights, hooks and optimizer references are unchanged);
  - the transformers activations that are exactly a GELU become `fasttx.nn.GELU` (see `_GELU_FORMS`);
  - attention runs through `fasttx.functional.scaled_dot_product_attention`: a function registered in
    transformers' `AttentionInterface` under the name "fasttx", with transformers' SDPA mask builder
    registered under the same name in `AttentionMaskInterface` (without it, transformers would build no
    mask for an unknown implementation and padding would silently be ignored), and the model's
    `config._attn_implementation` set to "fasttx".
Decoder families (Llama, Mistral, Qwen2, Qwen3, Gemma; `_DECODER_FAMILIES`), per module instance
(`module.forward` set on the instance; the classes are not touched):
  - `<Family>RMSNorm` runs `FF.add_rms_norm(x, None, ..., cast="llama")` (normalise in fp32, cast,
    then `weight *`) or, for Gemma, `cast="gemma"` (`* (1 + weight)` in fp32, then cast): the
    families' own casting orders, so 16-bit outputs match too;
  - `<Family>MLP` runs `down_proj(FF.swiglu(gate_proj(x), up_proj(x)))` (SiLU) or `FF.geglu(...,
    approximate=...)` (Gemma's tanh GELU); any other activation keeps the module's own forward;
  - `<Family>Attention` runs a forward of the same structure as transformers' (projections, Qwen3's
    q/k norms, `FF.apply_rotary_emb` on HF's (B, L, D) cos/sin tables, the KV cache, the attention
    interface, o_proj). transformers applies rotary through a module-level function
    (`apply_rotary_pos_emb`), which has no instance-level hook, so the attention module's forward is
    what gets replaced. This needs the transformers 5 attention layout (a `cache` argument); on
    older versions the attention forward is left as it is (rotary stays transformers') and a
    warning says so. Mistral's and Qwen2's sliding windows come in the mask transformers builds
    for the layer (see `fasttx_attention_forward`).
Causal LMs (`<Family>ForCausalLM`, `GPT2LMHeadModel`), when `labels` are given: the loss is
`FF.linear_cross_entropy` of the final hidden states and `lm_head.weight`, with the model's own
label shift, ignore_index (-100), `shift_labels` and `num_items_in_batch` normalisation (summed, then
divided, as transformers' `ForCausalLMLoss` does for gradient accumulation), and the (tokens, vocab)
logits are never materialised: `outputs.logits` is then None. `apply_fasttx(model,
keep_logits=True)` keeps the logits (then the loss is `FF.cross_entropy` of them, transformers'
formula otherwise). Without labels (inference, `generate`) the model's forward runs as it is, with
the patched modules inside. A model whose `loss_function` was replaced by the user, or with a logit
softcap, keeps transformers' loss.
Post-training: `hidden_states_and_head(model, input_ids=..., ...)` returns the final hidden states
and the LM head (the model run without its head), and `causal_lm_log_probs(model, input_ids, ...)`
the per-token log-probs (and entropy) of the next tokens through FF.linear_log_probs, so a
trainer's DPO / GRPO / distillation loss (fasttx.losses) never builds the logits.
No torch.nn or transformers class is modified: other models in the process are untouched. The config
object is the model's own; a second model built from that same config object inherits "fasttx".

Left alone (no exact fasttx equivalent, said once in a warning): QuickGELU, ClippedGELU and every
other activation; activations given as plain functions rather than modules; models whose attention
does not dispatch through `AttentionInterface` (BERT before transformers 4.53, for instance);
attention with a logit softcap (Gemma 2) stays on transformers' implementation.

On CPU tensors the "auto" backend runs torch's own ops, so a patched model's outputs equal the
unpatched model's to fp32 rounding; on CUDA tensors the Triton kernels run.
"""
from __future__ import annotations

import functools
import inspect
import logging
import sys
import types
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor, nn

try:
    import transformers
    from transformers import activations as _hf_act
except ImportError as exc:
    if isinstance(exc, ModuleNotFoundError) and exc.name == "transformers":
        raise ImportError(
            "fasttx.integrations.huggingface needs transformers>=4.48: pip install 'fasttx[hf]'"
        ) from exc
    # transformers is installed but failed to import (a broken or shadowed dependency, a version
    # mismatch): say what failed instead of sending the user to reinstall.
    raise ImportError(
        f"fasttx.integrations.huggingface: importing transformers failed: {type(exc).__name__}: {exc}"
    ) from exc

import fasttx.functional as FF
import fasttx.nn as fnn
from fasttx._convert import convert as _convert_torch_modules
from fasttx._registry import OPS as _OPS

from . import hf_experts  # noqa: F401  (registers "fasttx" in transformers' ExpertsInterface)


def _has(op: str) -> bool:
    """Whether this fasttx declares `op` (fasttx.functional passes every other name to torch)."""
    return op in _OPS

__all__ = [
    "apply_fasttx", "fasttx_attention_forward", "fasttx_causal_lm_loss", "register", "ATTN_IMPLEMENTATION",
]

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "fasttx"

# transformers activation class name -> the torch `approximate` form it computes exactly.
#   GELUActivation            FF.gelu (or its erf formula with use_gelu_python)        -> "none"
#   NewGELUActivation         0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3)))  (GPT-2)    -> "tanh"
#   GELUTanh / PytorchGELUTanh  FF.gelu(approximate="tanh") or its formula             -> "tanh"
#   FastGELUActivation        the tanh form with sqrt(2/pi) rounded to 0.7978845608
#                             (relative difference 3e-12, far below fp32 rounding)     -> "tanh"
#   AccurateGELUActivation    the tanh form                                            -> "tanh"
# Matched by exact class (not isinstance), so a subclass with another forward is left alone.
_GELU_FORMS = {
    "GELUActivation": "none",
    "NewGELUActivation": "tanh",
    "GELUTanh": "tanh",
    "PytorchGELUTanh": "tanh",
    "FastGELUActivation": "tanh",
    "AccurateGELUActivation": "tanh",
}
_HF_GELU_CLASSES = {
    cls: form
    for name, form in _GELU_FORMS.items()
    if isinstance(cls := getattr(_hf_act, name, None), type)
}
# Activations with no exact fasttx counterpart: left as they are, and named in a warning.
_UNSUPPORTED_ACTIVATIONS = tuple(
    cls
    for name in ("QuickGELUActivation", "ClippedGELUActivation", "LaplaceActivation", "MishActivation")
    if isinstance(cls := getattr(_hf_act, name, None), type)
)

# Attention arguments of other models that this function does not implement: refused, not ignored.
_UNSUPPORTED_ATTENTION_KWARGS = ("softcap", "s_aux", "position_bias", "cache")


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

    Returns (attn_output (B, L, Hq, Ev) contiguous, attn_weights (B, Hq, L, S) or None).
    """
    for name in _UNSUPPORTED_ATTENTION_KWARGS:
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"fasttx attention does not support `{name}` (got a value for it); use "
                "attn_implementation='sdpa' or 'eager' for this model"
            )
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(
            "fasttx attention expects query, key, value of shape (batch, heads, seq, head_dim), got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    L, S = query.shape[-2], key.shape[-2]
    causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
    attn_mask = attention_mask
    window = kwargs.get("sliding_window")
    if head_mask is None and not kwargs.get("output_attentions", False):
        out = _flash_path(query, key, value, attn_mask, dropout, scaling, causal, window, kwargs)
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

    if kwargs.get("output_attentions", False):
        out, weights = _explicit_attention(
            query, key, value, attn_mask, dropout, scaling, use_is_causal, enable_gqa
        )
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


def _flash_path(query, key, value, attn_mask, dropout, scaling, causal, window, kwargs) -> Optional[Tensor]:
    """fasttx.flash where it fits, else None: a packed batch (B == 1) runs as varlen attention, each
    sequence attending only within itself, no padding; a sliding window without a mask runs in the
    kernel (window_size=(window - 1, 0), bottom-right aligned like transformers' overlay) instead of
    a materialised (L, S) mask. Returns (B, L, Hq, E) like fasttx_attention_forward."""
    if key.shape != value.shape or query.shape[-1] != key.shape[-1] or query.shape[1] % key.shape[1]:
        return None
    from fasttx import flash

    S = key.shape[-2]
    win = (int(window) - 1, 0) if window is not None and causal else (-1, -1)
    packed = _packed_cu_seqlens(query, kwargs) if query.shape[0] == 1 and query.shape[-2] == S else None
    if packed is not None:
        cu_q, cu_k, max_q, max_k = packed
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (total, H, E)
        out = flash.flash_attn_varlen_func(q, k, v, cu_q.to(q.device), cu_k.to(q.device), max_q, max_k,
                                           dropout_p=dropout, softmax_scale=scaling, causal=causal, window_size=win)
        return out[None]  # (1, L, Hq, E)
    if window is not None and causal and attn_mask is None and S >= window:
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, L, H, E)
        return flash.flash_attn_func(q, k, v, dropout_p=dropout, softmax_scale=scaling, causal=True, window_size=win)
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


def _explicit_attention(q, k, v, mask, dropout, scaling, is_causal, enable_gqa):
    """softmax(q k^T * scale + mask) v with the probabilities materialized (output_attentions).
    Scores accumulate in fp32; masked scores use the dtype's lowest value like transformers'
    eager path, so a fully masked row stays finite."""
    if enable_gqa:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, Hq, S, *)
    scale = q.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, Hq, L, S)
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


def _set_attention(model: nn.Module) -> bool:
    """Point the model's attention at "fasttx"; False when the model cannot dispatch to it."""
    config = model.config
    if not _routes_through_interface(model):
        return False
    if getattr(config, "attn_logit_softcapping", None) is not None:  # Gemma 2: no softcap in fasttx's SDPA
        return False
    if getattr(config, "_attn_implementation", None) == ATTN_IMPLEMENTATION:
        return True
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    else:
        config._attn_implementation = ATTN_IMPLEMENTATION
    return getattr(config, "_attn_implementation", None) == ATTN_IMPLEMENTATION


# ----------------------------------------------------------------------------------------------
# Decoder families: RMSNorm, gated MLP, rotary attention (per-instance forwards)
# ----------------------------------------------------------------------------------------------
# transformers model family (its models/<family>/ directory) -> class-name prefix, RMSNorm cast.
_DECODER_FAMILIES = {
    "llama": ("Llama", "llama"),
    "mistral": ("Mistral", "llama"),
    "qwen2": ("Qwen2", "llama"),
    "qwen3": ("Qwen3", "llama"),
    "gemma": ("Gemma", "gemma"),
}


def _family_of(module: nn.Module, suffix: str) -> Optional[str]:
    """The family whose own `<Prefix><suffix>` class `module` is exactly (not a subclass, not a
    same-named class of another family), else None."""
    cls = type(module)
    for family, (prefix, _) in _DECODER_FAMILIES.items():
        if cls.__name__ == prefix + suffix and cls.__module__ == f"transformers.models.{family}.modeling_{family}":
            return family
    return None


def _set_forward(module: nn.Module, fn: Callable) -> None:
    """Give this one instance `fn` as its forward (nn.Module.__call__ looks up `self.forward`)."""
    if getattr(module.__dict__.get("forward"), "__func__", None) is not fn:
        module.forward = types.MethodType(fn, module)


def _llama_rms_norm_forward(self, hidden_states: Tensor) -> Tensor:
    # LlamaRMSNorm: weight * (x_fp32 * rsqrt(mean(x^2) + eps)).to(x.dtype)
    return FF.add_rms_norm(
        hidden_states, None, tuple(self.weight.shape), self.weight, self.variance_epsilon, cast="llama"
    )[0]


def _gemma_rms_norm_forward(self, x: Tensor) -> Tensor:
    # GemmaRMSNorm: (x_fp32 * rsqrt(mean(x^2) + eps) * (1 + weight_fp32)).type_as(x)
    return FF.add_rms_norm(x, None, tuple(self.weight.shape), self.weight, self.eps, cast="gemma")[0]


def _swiglu_mlp_forward(self, x: Tensor) -> Tensor:
    return self.down_proj(FF.swiglu(self.gate_proj(x), self.up_proj(x)))


def _geglu_mlp_forward(self, x: Tensor) -> Tensor:
    return self.down_proj(FF.geglu(self.gate_proj(x), self.up_proj(x), approximate="none"))


def _geglu_tanh_mlp_forward(self, x: Tensor) -> Tensor:
    return self.down_proj(FF.geglu(self.gate_proj(x), self.up_proj(x), approximate="tanh"))


def _gated_mlp_forward(act: nn.Module) -> Optional[Callable]:
    """The fasttx forward of a gated MLP whose activation module is `act`, None if it has none."""
    kind = type(act)
    if kind in (nn.SiLU, getattr(_hf_act, "SiLUActivation", nn.SiLU)):
        return _swiglu_mlp_forward if _has("swiglu") else None
    form = _HF_GELU_CLASSES.get(kind)
    if form is None and kind in (nn.GELU, fnn.GELU):
        form = act.approximate
    if form is None or not _has("geglu"):
        return None
    return _geglu_tanh_mlp_forward if form == "tanh" else _geglu_mlp_forward


def _rotary_attention_forward(
    self,
    hidden_states: Tensor,
    position_embeddings: Optional[Tuple[Tensor, Tensor]] = None,
    attention_mask: Optional[Tensor] = None,
    cache=None,
    past_key_values=None,
    **kwargs,
):
    """transformers 5's Llama-family attention forward with fasttx's rotary application.
    hidden_states (B, L, hidden) -> (attn_output (B, L, hidden), attn_weights or None)."""
    cache = past_key_values if cache is None else cache
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query = self.q_proj(hidden_states).view(hidden_shape)  # (B, L, Hq, D)
    key = self.k_proj(hidden_states).view(hidden_shape)  # (B, L, Hkv, D)
    if getattr(self, "q_norm", None) is not None:  # Qwen3: RMSNorm over the head dim, before rotary
        query, key = self.q_norm(query), self.k_norm(key)
    query, key = query.transpose(1, 2), key.transpose(1, 2)  # (B, H, L, D)
    value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, Hkv, L, D)

    cos, sin = position_embeddings  # (B, L, D) each, as transformers' rotary module returns them
    query, key = FF.apply_rotary_emb(query, key, cos, sin)
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)

    window = self.sliding_window if hasattr(self, "sliding_window") else getattr(self.config, "sliding_window", None)
    if window is not None:
        kwargs["sliding_window"] = window
    default = getattr(sys.modules[type(self).__module__], "eager_attention_forward", None)
    attention = transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, default
    )
    out, weights = attention(
        self, query, key, value, attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **kwargs,
    )  # (B, L, Hq, D)
    out = out.reshape(*input_shape, -1).contiguous()
    return self.o_proj(out), weights


def _attention_layout_supported(attn: nn.Module) -> bool:
    """Whether the class's forward has transformers 5's layout that _rotary_attention_forward copies."""
    try:
        params = inspect.signature(type(attn).forward).parameters
    except (TypeError, ValueError):
        return False
    return "cache" in params and "position_embeddings" in params and hasattr(
        transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS, "get_interface"
    )


def _patch_decoder_modules(model: nn.Module, left_alone: set) -> None:
    """RMSNorm, gated MLP and rotary attention of the decoder families, per instance."""
    for module in model.modules():
        family = _family_of(module, "RMSNorm")
        if family is not None:
            if not _has("add_rms_norm"):
                left_alone.add(f"{type(module).__name__} (this fasttx has no add_rms_norm)")
                continue
            cast = _DECODER_FAMILIES[family][1]
            _set_forward(module, _gemma_rms_norm_forward if cast == "gemma" else _llama_rms_norm_forward)
            continue
        if _family_of(module, "MLP") is not None:
            forward = _gated_mlp_forward(module.act_fn)
            if forward is None:
                left_alone.add(f"{type(module).__name__} with {type(module.act_fn).__name__}"
                               + ("" if _has("swiglu") else " (this fasttx has no swiglu / geglu)"))
            else:
                _set_forward(module, forward)
            continue
        if _family_of(module, "Attention") is not None:
            if not _has("apply_rotary_emb"):
                left_alone.add(f"{type(module).__name__}'s rotary (this fasttx has no apply_rotary_emb)")
            elif not _attention_layout_supported(module):
                left_alone.add(
                    f"{type(module).__name__}'s rotary (transformers {transformers.__version__}'s "
                    "attention layout is not the one fasttx reproduces)"
                )
            else:
                _set_forward(module, _rotary_attention_forward)


# ----------------------------------------------------------------------------------------------
# Causal LM loss: linear_cross_entropy on the final hidden states, no logits
# ----------------------------------------------------------------------------------------------
def _shifted(labels: Tensor, shift_labels: Optional[Tensor], ignore_index: int) -> Tensor:
    if shift_labels is None:  # tokens < n predict n; the last position predicts nothing
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.reshape(-1)


def _normalise(loss: Tensor, num_items_in_batch) -> Tensor:
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def fasttx_causal_lm_loss(
    logits: Tensor,
    labels: Tensor,
    vocab_size: int,
    num_items_in_batch=None,
    ignore_index: int = -100,
    shift_labels: Optional[Tensor] = None,
    **kwargs,
) -> Tensor:
    """transformers' ForCausalLMLoss computed by FF.cross_entropy: logits (B, L, V) in fp32,
    labels (B, L) shifted left by one (or `shift_labels` (B, L) as given), ignore_index skipped;
    mean over the counted tokens, or sum / num_items_in_batch when that is given (gradient
    accumulation over micro-batches). The loss of a patched causal LM with keep_logits=True."""
    target = _shifted(labels, shift_labels, ignore_index).to(logits.device)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = FF.cross_entropy(logits.float().reshape(-1, vocab_size), target, ignore_index=ignore_index,
                            reduction=reduction)
    return loss if num_items_in_batch is None else _normalise(loss, num_items_in_batch)


def _linear_causal_lm_loss(hidden: Tensor, head: nn.Linear, labels: Tensor, num_items_in_batch=None,
                           ignore_index: int = -100, shift_labels: Optional[Tensor] = None) -> Tensor:
    """The same loss as fasttx_causal_lm_loss(head(hidden), labels, ...) from hidden (B, L, H) and
    the head's (V, H) weight, without the (B * L, V) logits."""
    target = _shifted(labels, shift_labels, ignore_index).to(hidden.device)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = FF.linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), head.weight, target, linear_bias=head.bias,
        reduction=reduction, ignore_index=ignore_index,
    ).float()  # transformers computes this loss in fp32 whatever the model's dtype
    return loss if num_items_in_batch is None else _normalise(loss, num_items_in_batch)


def _causal_lm_class(model: nn.Module) -> bool:
    cls = type(model)
    if cls.__name__ == "GPT2LMHeadModel" and cls.__module__ == "transformers.models.gpt2.modeling_gpt2":
        return True
    return _family_of(model, "ForCausalLM") is not None


def _causal_lm_forward(self, *args, **kwargs):
    """The model class's forward; with labels, the loss from the hidden states (see the module
    docstring) and logits None."""
    forward = type(self).forward.__get__(self)
    if args:  # bind positionals to their names, so that `labels` is found wherever it was passed
        names = [n for n, p in inspect.signature(forward).parameters.items()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        kwargs.update(zip(names, args))
    labels = kwargs.get("labels")
    if (
        labels is None
        or self.__dict__.get("_fasttx_keep_logits", False)
        or self.loss_function not in (fasttx_causal_lm_loss, _ForCausalLMLoss)
        or getattr(self.config, "final_logit_softcapping", None) is not None
        or not isinstance(self.lm_head, nn.Linear)
    ):
        return forward(**kwargs)
    kwargs["labels"] = None
    num_items = kwargs.pop("num_items_in_batch", None)
    ignore_index = kwargs.pop("ignore_index", -100)
    shift_labels = kwargs.pop("shift_labels", None)
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    kwargs["return_dict"] = True

    head = self.lm_head
    captured = []

    def capture(hidden):  # stands in for the head: keeps its input, returns no logits
        captured.append(hidden)
        return hidden.new_empty((*hidden.shape[:-1], 0))

    had = "forward" in head.__dict__
    previous = head.__dict__.get("forward")
    head.forward = capture
    try:
        out = forward(**kwargs)
    finally:
        if had:
            head.forward = previous
        else:
            del head.forward
    (hidden,) = captured
    loss = _linear_causal_lm_loss(hidden, head, labels, num_items, ignore_index, shift_labels)
    out = type(out)(loss=loss, **{k: v for k, v in out.items() if k not in ("loss", "logits")})
    return out if return_dict else out.to_tuple()


try:
    from transformers.loss.loss_utils import ForCausalLMLoss as _ForCausalLMLoss
except ImportError:  # pragma: no cover - transformers < 4.46 has no loss module
    _ForCausalLMLoss = None


def _patch_causal_lm(model: nn.Module, keep_logits: bool, left_alone: set) -> None:
    if not _causal_lm_class(model) or _ForCausalLMLoss is None:
        return
    if not isinstance(getattr(model, "lm_head", None), nn.Linear):
        return
    if model.loss_function not in (fasttx_causal_lm_loss, _ForCausalLMLoss):
        left_alone.add(f"{type(model).__name__}'s custom loss_function")
        return
    if getattr(model.config, "final_logit_softcapping", None) is not None:
        left_alone.add(f"{type(model).__name__}'s loss (logit softcapping)")
        return
    model.loss_function = fasttx_causal_lm_loss  # instance-level (PreTrainedModel's setter)
    model.__dict__["_fasttx_keep_logits"] = bool(keep_logits)
    if not _has("linear_cross_entropy"):
        model.__dict__["_fasttx_keep_logits"] = True
        left_alone.add(f"{type(model).__name__}'s fused loss (this fasttx has no linear_cross_entropy)")
        return
    _set_forward(model, _causal_lm_forward_for(type(model)))


_CAUSAL_LM_FORWARDS = {}


def _causal_lm_forward_for(cls) -> Callable:
    """_causal_lm_forward under the class forward's name and signature (generate and Trainer
    inspect `model.forward`'s parameters), one function per class."""
    fn = _CAUSAL_LM_FORWARDS.get(cls)
    if fn is None:
        @functools.wraps(cls.forward)
        def fn(self, *args, **kwargs):
            return _causal_lm_forward(self, *args, **kwargs)

        _CAUSAL_LM_FORWARDS[cls] = fn
    return fn


# ----------------------------------------------------------------------------------------------
# Post-training: the final hidden states and the LM head, for log-probs without the logits
# ----------------------------------------------------------------------------------------------
def hidden_states_and_head(model: nn.Module, *args, **kwargs) -> Tuple[Tensor, nn.Linear]:
    """Run a causal LM (patched by apply_fasttx or not) without its LM head: returns (hidden
    (B, L, H), the head nn.Linear (V, H)) with head(hidden) equal to the model's logits, which are
    never built. Arguments are the model's forward's (input_ids, attention_mask, ...; no labels).
    Feed them to fasttx.functional.linear_log_probs / linear_jsd (see causal_lm_log_probs).

    Raises ValueError for a model whose logits are not head(hidden) (a final logit softcap or a
    logit scale in the config) or whose `lm_head` is not an nn.Linear."""
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"hidden_states_and_head: {type(model).__name__} has no nn.Linear lm_head")
    cfg = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            raise ValueError(f"hidden_states_and_head: {type(model).__name__}'s logits are not lm_head(hidden) "
                             f"(config.{attr} = {getattr(cfg, attr)})")
    if kwargs.get("labels") is not None:
        raise ValueError("hidden_states_and_head: pass no labels (the loss is the caller's)")
    captured = []

    def capture(hidden):  # stands in for the head: keeps its input, returns no logits
        captured.append(hidden)
        return hidden.new_empty((*hidden.shape[:-1], 0))

    had = "forward" in head.__dict__
    previous = head.__dict__.get("forward")
    head.forward = capture
    try:
        model(*args, **kwargs)
    finally:
        if had:
            head.forward = previous
        else:
            del head.forward
    if len(captured) != 1:
        raise RuntimeError(f"hidden_states_and_head: the LM head was called {len(captured)} times, expected once")
    return captured[0], head


def causal_lm_log_probs(model: nn.Module, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                        completion_mask: Optional[Tensor] = None, *, temperature: float = 1.0,
                        return_entropy: bool = False, **kwargs):
    """Per-token log-probs (B, L - 1) of input_ids[:, 1:] under the model (the next-token
    shift of TRL's trainers), from hidden_states_and_head and fasttx.functional.linear_log_probs:
    no (B, L, V) logits. Positions where completion_mask[:, 1:] (default: attention_mask, or all)
    is 0 are 0 (with return_entropy, the entropy too) and get no gradient."""
    hidden, head = hidden_states_and_head(model, input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    mask = completion_mask if completion_mask is not None else attention_mask
    target = input_ids[:, 1:]
    if mask is not None:
        target = torch.where(mask[:, 1:].bool(), target, torch.full_like(target, -100))
    return FF.linear_log_probs(hidden[:, :-1], head.weight, target, bias=head.bias, temperature=temperature,
                               return_entropy=return_entropy)


# ----------------------------------------------------------------------------------------------
# Module swaps
# ----------------------------------------------------------------------------------------------
def _hf_activation_replacement(child: nn.Module) -> Optional[nn.Module]:
    form = _HF_GELU_CLASSES.get(type(child))
    if form is None:
        return None
    new = fnn.GELU(approximate=form)  # like the HF activation, no parameters and no buffers
    new.train(child.training)
    return new


def apply_fasttx(model: nn.Module, *, keep_logits: bool = False) -> nn.Module:
    """Patch a transformers model instance in place to run fasttx's ops; returns the model.

    BERT, GPT-2 and models built from the same parts: LayerNorm, GELU, dropout and attention.
    Llama, Mistral, Qwen2, Qwen3, Gemma: also RMSNorm, the gated MLP and the rotary application.
    Causal LMs (those families and GPT-2): with labels, the loss comes from linear_cross_entropy
    and `outputs.logits` is None, unless `keep_logits=True` (see the module docstring).

    Idempotent (a second call only updates keep_logits). Parameters, buffers and state_dict are
    unchanged (the swapped modules hold the same Parameter objects), so a patched model saves and
    loads exactly like the unpatched one. Works on a model built from a config as on one loaded
    with `from_pretrained` (a local directory), on CPU (torch's ops) and on CUDA (the Triton
    kernels). Pieces left as they are, if any, are named in one warning.
    """
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(
            "apply_fasttx expects a transformers PreTrainedModel (e.g. BertForSequenceClassification), "
            f"got {type(model).__name__}; for a plain torch.nn model use fasttx.convert(model)"
        )
    register()
    # torch.nn LayerNorm / Dropout / GELU: fasttx.convert re-classes each instance in place, so
    # parameters (and their sharing), buffers, hooks and training mode are kept as they are.
    _convert_torch_modules(model)
    left_alone = set()
    # Gated MLPs first: their forward calls FF.swiglu / FF.geglu, whatever act_fn becomes below.
    _patch_decoder_modules(model, left_alone)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = _hf_activation_replacement(child)
            if new is not None:
                setattr(parent, name, new)
            elif isinstance(child, _UNSUPPORTED_ACTIVATIONS):
                left_alone.add(type(child).__name__)
    _patch_causal_lm(model, keep_logits, left_alone)
    from .hf_experts import set_experts

    set_experts(model)  # MoE models: their experts through fasttx's moe_experts ("fasttx" experts)
    if not _set_attention(model):
        reason = (
            "its attention has a logit softcap"
            if getattr(model.config, "attn_logit_softcapping", None) is not None
            else f"it does not dispatch attention through transformers' AttentionInterface "
            f"(transformers {transformers.__version__})"
        )
        left_alone.add(f"{type(model).__name__}'s attention ({reason})")
    if left_alone:
        logger.warning(
            "apply_fasttx: no exact fasttx equivalent for %s; left unpatched", ", ".join(sorted(left_alone))
        )
    return model
