"""fasttx for HuggingFace transformers models (optional extra `hf`: transformers >= 4.48).

    from transformers import BertForSequenceClassification
    from fasttx.integrations.huggingface import apply_fasttx

    model = apply_fasttx(BertForSequenceClassification.from_pretrained("path/to/local/dir"))

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
No torch.nn or transformers class is modified: other models in the process are untouched. The config
object is the model's own; a second model built from that same config object inherits "fasttx".

Left alone (no exact fasttx equivalent, said once in a warning): QuickGELU, ClippedGELU and every
other activation; activations given as plain functions rather than modules; models whose attention
does not dispatch through `AttentionInterface` (BERT before transformers 4.53, for instance).

On CPU tensors the "auto" backend runs the reference path (torch's own ops), so a patched model's
outputs equal the unpatched model's to fp32 rounding; on CUDA tensors the Triton kernels run.
"""
from __future__ import annotations

import inspect
import logging
import sys
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

try:
    import transformers
    from transformers import activations as _hf_act
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "fasttx.integrations.huggingface needs transformers>=4.48: pip install 'fasttx[hf]'"
    ) from exc

import fasttx.functional as FF
import fasttx.nn as fnn
from fasttx._convert import convert as _convert_torch_modules

__all__ = ["apply_fasttx", "fasttx_attention_forward", "register", "ATTN_IMPLEMENTATION"]

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
_UNSUPPORTED_ATTENTION_KWARGS = ("softcap", "sliding_window", "s_aux", "position_bias", "cache")


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


def _with_causal(mask: Tensor, L: int, S: int, dtype: torch.dtype) -> Tensor:
    """mask (*, 1, S) bool or additive float -> (*, L, S) with the causal part added."""
    keep = torch.ones(L, S, dtype=torch.bool, device=mask.device).tril(diagonal=S - L)  # (L, S)
    if mask.dtype == torch.bool:
        return mask & keep
    return mask.masked_fill(~keep, torch.finfo(mask.dtype).min)


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
    if getattr(config, "_attn_implementation", None) == ATTN_IMPLEMENTATION:
        return True
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    else:
        config._attn_implementation = ATTN_IMPLEMENTATION
    return getattr(config, "_attn_implementation", None) == ATTN_IMPLEMENTATION


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


def apply_fasttx(model: nn.Module) -> nn.Module:
    """Patch a transformers model instance (BERT, GPT-2 and other models built from the same parts)
    in place to run fasttx's LayerNorm, GELU, dropout and attention; returns the model.

    Idempotent. Parameters, buffers and state_dict are unchanged (the swapped modules hold the same
    Parameter objects), so a patched model saves and loads exactly like the unpatched one. Works on
    a model built from a config as on one loaded with `from_pretrained` (a local directory), on CPU
    (the reference path) and on CUDA (the Triton kernels).
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
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = _hf_activation_replacement(child)
            if new is not None:
                setattr(parent, name, new)
            elif isinstance(child, _UNSUPPORTED_ACTIVATIONS):
                left_alone.add(type(child).__name__)
    if left_alone:
        logger.warning(
            "apply_fasttx: no exact fasttx equivalent for %s; left unpatched", ", ".join(sorted(left_alone))
        )
    if not _set_attention(model):
        logger.warning(
            "apply_fasttx: %s does not dispatch attention through transformers' AttentionInterface "
            "(transformers %s); its attention is left unpatched",
            type(model).__name__, transformers.__version__,
        )
    return model
