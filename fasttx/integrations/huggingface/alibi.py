"""ALiBi attention modules that do not dispatch through transformers' AttentionInterface (BLOOM, MPT):
the module's core (scores + ALiBi bias + mask, softmax, dropout, @ V) computed by fasttx, the
projections, cache and residual as the module has them. Each class is swapped only after probe()
saw its forward and this one agree, on a padded batch and on an unpadded one.

Two paths. The model was called without an attention_mask, and with no cache or one that only
appends (training, or a decoding loop without a mask): fasttx.flash with the kernel's ALiBi
(`alibi_slopes`, causal), no (L, S) tensor at all. The kernel adds -slope (i - j) for j <= i;
BLOOM adds slope * j and MPT slope * (j - S + 1): the same up to a constant per query row, which
softmax ignores. Otherwise the
bias goes to fasttx's scaled_dot_product_attention as an additive (B, H, L, S) mask: these modules
receive a dense 4-D mask (padding and causality, built by the model) and, in BLOOM, a bias whose
key positions count only the non-padded tokens of each row (`(cumsum(mask) - 1) * mask`), which
the kernel's raw positions match only for rows padded on one side; telling those apart needs a
host sync on the mask per call, the additive form is exact for every mask (and a cache). Calls
that ask for the attention weights (output_attentions) run the module's own forward.
"""
from __future__ import annotations

import contextlib
import contextvars
import inspect
import sys
from typing import Optional

import torch
from torch import Tensor, nn

import fasttx.functional as FF


# Whether the running model call asked for the attention weights (set by the patched model forward,
# loss.py): MPT's blocks do not pass output_attentions down to the attention module.
_WEIGHTS_WANTED = contextvars.ContextVar("fasttx_alibi_weights_wanted", default=False)


@contextlib.contextmanager
def weights_wanted(wanted: bool):
    token = _WEIGHTS_WANTED.set(bool(wanted) or _WEIGHTS_WANTED.get())  # an inner model keeps the outer's ask
    try:
        yield
    finally:
        _WEIGHTS_WANTED.reset(token)


# Whether the running model call has no attention_mask (set by the patched model forward): the
# model then builds a purely causal mask and BLOOM's positions are the raw ones.
_UNPADDED = contextvars.ContextVar("fasttx_alibi_unpadded", default=False)


@contextlib.contextmanager
def unpadded(flag: bool):
    token = _UNPADDED.set(bool(flag))
    try:
        yield
    finally:
        _UNPADDED.reset(token)


def _appends(cache, layer_idx) -> bool:
    """No cache, or a cache whose layer holds exactly the keys seen so far (transformers'
    DynamicLayer: no empty slots, no window): the keys are positions 0..S-1, the kernel's causal
    alignment (queries are the last L of them) is the model's mask."""
    if cache is None:
        return True
    try:
        from transformers.cache_utils import DynamicLayer

        return type(cache.layers[layer_idx]) is DynamicLayer
    except (ImportError, AttributeError, IndexError, TypeError):
        return False


def _flash(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor, dropout: float, scale: float) -> Tensor:
    """Causal attention with the kernel's ALiBi: q, k, v (B, H, *, E) -> (B, L, H, E)."""
    from fasttx import flash

    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, L, H, E)
    return flash.flash_attn_func(q, k, v, dropout_p=dropout, softmax_scale=scale, causal=True, alibi_slopes=slopes)


def _params(m: nn.Module) -> list:
    try:
        return list(inspect.signature(type(m).forward).parameters)
    except (TypeError, ValueError):
        return []


def layout(m: nn.Module) -> Optional[str]:
    """"bloom" / "mpt" when the module has that layout (fused qkv projection, output projection,
    an ALiBi tensor among its forward's inputs), else None. Only a candidate: the probe decides."""
    lin = lambda n: isinstance(getattr(m, n, None), nn.Linear)  # noqa: E731
    params = _params(m)
    if (lin("query_key_value") and lin("dense") and "alibi" in params and "residual" in params
            and isinstance(getattr(m, "num_heads", None), int) and hasattr(m, "inv_norm_factor")):
        return "bloom"
    if (lin("Wqkv") and lin("out_proj") and "position_bias" in params
            and isinstance(getattr(m, "n_heads", None), int) and hasattr(m, "softmax_scale")):
        return "mpt"
    return None


def _sdpa(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, dropout: float, scale: float) -> Tensor:
    """softmax(scale q k^T + bias) v: q (B, H, L, E), k, v (B, H, S, E), bias (B, H, L, S) additive."""
    return FF.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=scale)  # (B, H, L, E)


def _bloom_slopes(m: nn.Module, device) -> Optional[Tensor]:
    """(H,) fp32: the slopes BLOOM's model multiplies the positions by (its modeling file's own
    function; None without one). Cached per module and device."""
    cached = m.__dict__.get("_fasttx_alibi_slopes")
    if cached is not None and cached.device == device:
        return cached
    fn = getattr(sys.modules[type(m).__module__], "_get_alibi_slopes", None)
    if fn is None:
        return None
    slopes = fn(m.num_heads, device).float()
    m.__dict__["_fasttx_alibi_slopes"] = slopes
    return slopes


def bloom_attention_forward(self, hidden_states: Tensor, residual: Tensor, alibi: Tensor,
                            attention_mask: Optional[Tensor], layer_past=None, use_cache: bool = False,
                            output_attentions: bool = False, **kwargs):
    """BloomAttention.forward: hidden_states (B, L, hidden) -> (output (B, L, hidden), None).
    alibi (B * H, 1, S) in the model's dtype, added with beta = 1; attention_mask (B, 1, L, S)
    additive (0 / lowest) or None."""
    if output_attentions or _WEIGHTS_WANTED.get():
        return type(self).forward(self, hidden_states, residual, alibi, attention_mask, layer_past, use_cache,
                                  output_attentions, **kwargs)
    B, L, _ = hidden_states.shape
    H = self.num_heads
    query, key, value = self._reshape(self.query_key_value(hidden_states))  # (B, H, L, D) each
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)  # (B, H, S, D)
    S = key.shape[-2]
    dropout = self.attention_dropout.p if self.training else 0.0
    slopes = _bloom_slopes(self, query.device) if _UNPADDED.get() and _appends(layer_past, self.layer_idx) else None
    if slopes is not None:
        out = _flash(query, key, value, slopes, dropout, self.inv_norm_factor)  # (B, L, H, D)
    else:
        bias = alibi.view(B, H, 1, S)
        if attention_mask is not None:
            bias = bias + attention_mask  # (B, H, L, S): eager adds the mask to the biased scores
        out = _sdpa(query, key, value, bias.expand(B, H, L, S), dropout, self.inv_norm_factor)  # (B, H, L, D)
        out = out.transpose(1, 2)  # (B, L, H, D)
    out = self.dense(out.reshape(B, L, H * self.head_dim))
    dropout_add = getattr(sys.modules[type(self).__module__], "dropout_add")
    return dropout_add(out, residual, self.hidden_dropout, self.training), None


def mpt_attention_forward(self, hidden_states: Tensor, position_bias: Optional[Tensor], cache=None,
                          attention_mask: Optional[Tensor] = None, past_key_values=None, **kwargs):
    """MptAttention.forward: hidden_states (B, L, hidden) -> (output (B, L, hidden), None).
    position_bias (H, 1, max_seq_len) fp32, its last S keys used; attention_mask (B, 1, L, S) bool,
    True = masked (MPT's convention)."""
    cache = past_key_values if cache is None else cache
    if kwargs.get("output_attentions") or _WEIGHTS_WANTED.get():
        return type(self).forward(self, hidden_states, position_bias, cache, attention_mask, **kwargs)
    B, L, _ = hidden_states.shape
    qkv = self.Wqkv(hidden_states)
    if self.clip_qkv:
        qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
    query, key, value = (t.reshape(B, L, self.n_heads, self.head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=2))
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)  # (B, H, S, D)
    S = key.shape[-2]
    dropout = self.attn_dropout_p if self.training else 0.0
    if (_UNPADDED.get() and _appends(cache, self.layer_idx) and position_bias is not None and position_bias.dim() == 3
            and 2 <= S <= position_bias.shape[-1]):
        slopes = -position_bias[:, 0, -2].float()  # (H,): the bias at key S - 2 is -slope
        out = _flash(query, key, value, slopes, dropout, self.softmax_scale)  # (B, L, H, D)
        return self.out_proj(out.reshape(B, L, -1)), None
    lowest = torch.finfo(query.dtype).min
    if position_bias is not None:
        if position_bias.dim() != 3:
            raise ValueError(f"Expecting position_bias shape to be 3 dimensions, got {position_bias.dim()}")
        bias = position_bias[None, :, -L:, -S:].float()  # (1, H, L or 1, S); eager adds it in fp32
    else:
        bias = query.new_zeros((1, 1, 1, S), dtype=torch.float32)
    bias = bias.expand(B, self.n_heads, L, S)
    if attention_mask is not None:
        bias = bias.masked_fill(attention_mask, lowest)
    out = _sdpa(query, key, value, bias, dropout, self.softmax_scale)  # (B, H, L, D)
    return self.out_proj(out.transpose(1, 2).reshape(B, L, -1)), None


FORWARDS = {"bloom": bloom_attention_forward, "mpt": mpt_attention_forward}


_VERDICTS = {}  # class -> (form or None, why not): the random-parameter check runs once per class


def capture_unpadded(model: nn.Module, mods) -> dict:
    """{module: (args, kwargs)}: what each module received in an eval, no-grad forward of the model
    on the probe's tokens without an attention_mask (the kernel-ALiBi path's inputs)."""
    from .recognition import _probe_inputs, _run

    inputs = _probe_inputs(model)
    if inputs is None or not mods:
        return {}
    captured, hooks = {}, []
    for m in mods:
        def pre(mod, args, kwargs):
            captured.setdefault(mod, (args, dict(kwargs)))
        hooks.append(m.register_forward_pre_hook(pre, with_kwargs=True))
    states = {m: m.training for m in model.modules()}
    model.eval()
    try:
        _run(model, {"input_ids": inputs["input_ids"]})
    except Exception:
        return {}
    finally:
        for h in hooks:
            h.remove()
        for m, t in states.items():
            m.training = t
    return captured


def _agree(m: nn.Module, ours, captured: tuple, flag: bool) -> bool:
    from .recognition import _close, _original

    args, kwargs = captured
    ref = _original(m, *args, **kwargs)[0]
    with unpadded(flag):
        return _close(ours(m, *args, **dict(kwargs))[0], ref, ref.dtype, scaled=True)


def probe(m: nn.Module, captured: tuple, captured_unpadded: Optional[tuple] = None):
    """(form, why not): the module's own forward and FORWARDS[form] on the inputs it received in the
    model's probe forward (a padded batch: the additive path) and in one without a mask (the
    kernel-ALiBi path), then the same on a copy with random parameters (once per class)."""
    from .recognition import _randomized

    form = layout(m)
    if form == "bloom" and getattr(m, "beta", None) != 1.0:
        return None, "its ALiBi scale beta is not 1"
    if form == "bloom" and getattr(m, "pretraining_tp", 1) > 1 and getattr(m, "slow_but_exact", False):
        return None, "slow_but_exact: its output projection runs in pretraining_tp slices"
    if captured_unpadded is None:
        return None, "not reached by the probe forward without a mask"
    ours = FORWARDS[form]
    trials = [(captured, False), (captured_unpadded, True)]
    why = f"its forward differs from the {form} ALiBi form"
    try:
        with torch.no_grad():
            if not all(_agree(m, ours, c, flag) for c, flag in trials):
                return None, why
            if type(m) not in _VERDICTS:
                c = _randomized(m)
                ok = all(_agree(c, ours, cap, flag) for cap, flag in trials)
                _VERDICTS[type(m)] = (form, "") if ok else (None, why)
                del c
    except Exception as exc:
        return None, f"probe failed ({type(exc).__name__}: {str(exc)[:60]})"
    return _VERDICTS[type(m)]
