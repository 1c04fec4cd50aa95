"""ALiBi attention modules that do not dispatch through transformers' AttentionInterface (BLOOM, MPT):
the module's core (scores + ALiBi bias + mask, softmax, dropout, @ V) computed by fasttx's
scaled_dot_product_attention, the projections, cache and residual as the module has them. Each
class is swapped only after recognition.probe_alibi saw its forward and this one agree.

Why the bias is handed to the attention as an additive mask and not as the kernel's
`alibi_slopes`: these modules receive a dense 4-D mask (padding and causality, built by the model)
and, in BLOOM, a bias whose key positions count only the non-padded tokens of each row
(`(cumsum(mask) - 1) * mask`). The kernel's ALiBi (-slope |i - j| on raw positions) equals that
bias up to a per-row constant (which softmax ignores) only when every row is padding-free or
padded on one side, and telling that apart needs a host sync on the mask per call; the additive
form is exact for every mask, and the fused kernel still never materialises the probabilities.
Calls that ask for the attention weights (output_attentions) run the module's own forward.
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
    bias = alibi.view(B, H, 1, S)
    if attention_mask is not None:
        bias = bias + attention_mask  # (B, H, L, S): eager adds the mask to the biased scores
    dropout = self.attention_dropout.p if self.training else 0.0
    out = _sdpa(query, key, value, bias.expand(B, H, L, S), dropout, self.inv_norm_factor)  # (B, H, L, D)
    out = self.dense(out.transpose(1, 2).reshape(B, L, H * self.head_dim))
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
    dropout = self.attn_dropout_p if self.training else 0.0
    out = _sdpa(query, key, value, bias, dropout, self.softmax_scale)  # (B, H, L, D)
    return self.out_proj(out.transpose(1, 2).reshape(B, L, -1)), None


FORWARDS = {"bloom": bloom_attention_forward, "mpt": mpt_attention_forward}


_VERDICTS = {}  # class -> (form or None, why not): the random-parameter check runs once per class


def probe(m: nn.Module, captured: tuple):
    """(form, why not): the module's own forward and FORWARDS[form] on the inputs it received in the
    model's probe forward (a padded batch), then on a copy with random parameters (once per class)."""
    from .recognition import _close, _original, _randomized

    form = layout(m)
    if form == "bloom" and getattr(m, "beta", None) != 1.0:
        return None, "its ALiBi scale beta is not 1"
    if form == "bloom" and getattr(m, "pretraining_tp", 1) > 1 and getattr(m, "slow_but_exact", False):
        return None, "slow_but_exact: its output projection runs in pretraining_tp slices"
    args, kwargs = captured
    ours = FORWARDS[form]
    try:
        with torch.no_grad():
            ref = _original(m, *args, **kwargs)[0]
            if not _close(ours(m, *args, **dict(kwargs))[0], ref, ref.dtype, scaled=True):
                return None, f"its forward differs from the {form} ALiBi form"
            if type(m) not in _VERDICTS:
                c = _randomized(m)
                ok = _close(ours(c, *args, **dict(kwargs))[0], _original(c, *args, **kwargs)[0], ref.dtype, scaled=True)
                _VERDICTS[type(m)] = (form, "") if ok else (None, f"its forward differs from the {form} ALiBi form")
                del c
    except Exception as exc:
        return None, f"probe failed ({type(exc).__name__}: {str(exc)[:60]})"
    return _VERDICTS[type(m)]
