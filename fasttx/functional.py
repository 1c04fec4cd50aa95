"""fasttx.functional: drop-ins for torch.nn.functional ops, plus the fused sub-layer ops.

Every public op here has torch.nn.functional's exact signature and semantics, and is declared
once with `@fasttx_op` (fasttx/_registry.py: exports, autocast policy). Each one is the single
place that picks its path, in the same shape:

    if use_triton(<tensors>):                  # backend + device (fasttx/_backend.py)
        from .ops import <op> as op            # inline: triton stays unimported until needed,
                                               # and torch.compile traces it (importlib it cannot)
        reason = op.unsupported(...)           # None when the kernel covers this call
        if reason is None:
            <check the arguments: torch's exception types and messages>
            <apply the op's autocast policy>
            return op.<op>(...)                # the torch.library custom op (fasttx/ops/<op>.py)
        warn_fallback("<op>", reason)          # one warning per reason, then torch's op
    return F.<op>(...)                         # torch's own op, which checks its own arguments

so both paths accept the same inputs: a call the kernel cannot serve runs torch's op instead of
failing, and a bad argument raises what torch raises. `F` is torch.nn.functional throughout.
fasttx/reference.py is not a path: it is the fp64 oracle the tests check both paths against.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks
from ._backend import use_triton, warn_fallback
from ._registry import OPS, autocast_inputs, autocast_to_fp32, fasttx_op


@fasttx_op(autocast="fp32")
def layer_norm(
    input: Tensor,
    normalized_shape: Union[int, List[int], torch.Size],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    """torch.nn.functional.layer_norm. input (*, *normalized_shape)."""
    if isinstance(normalized_shape, int):  # as torch.nn.functional.layer_norm does
        raise TypeError(
            "layer_norm(): argument 'normalized_shape' (position 2) must be tuple of ints, not int"
        )
    if use_triton(input, weight, bias):
        from .ops import layer_norm as op

        reason = op.unsupported(input, normalized_shape)
        if reason is None:
            eps = _checks.check_float("layer_norm", "eps", 5, eps)
            shape = _checks.check_shape("layer_norm", "normalized_shape", 2, normalized_shape)
            input, weight, bias = autocast_inputs("layer_norm", input, weight, bias)
            return op.layer_norm(input, shape, weight, bias, eps)
        warn_fallback("layer_norm", reason)
    return F.layer_norm(input, normalized_shape, weight, bias, eps)


@fasttx_op()
def gelu(input: Tensor, approximate: str = "none") -> Tensor:
    """torch.nn.functional.gelu: exact (erf) when approximate="none", else the tanh form."""
    if use_triton(input):
        from .ops import activation as op

        _checks.check_str("gelu", "approximate", None, approximate)
        return op.gelu(input, approximate)
    return F.gelu(input, approximate=approximate)


@fasttx_op()
def relu(input: Tensor, inplace: bool = False) -> Tensor:
    """torch.nn.functional.relu (torch's own kernel on every path: there is nothing to fuse)."""
    return F.relu(input, inplace=inplace)


@fasttx_op()
def dropout(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
    """torch.nn.functional.dropout. Triton path: Philox mask regenerated in the backward, never
    stored; seeds drawn from torch's generator so torch.manual_seed reproduces a run."""
    if use_triton(input):
        from .ops import dropout as op

        p = _checks.check_dropout_p(_checks.check_float("dropout", "p", 2, p))
        _checks.check_bool("dropout", "train", 3, training)
        _checks.check_bool("dropout", "inplace", 4, inplace)
        return op.dropout(input, p, training, inplace)
    return F.dropout(input, p, training, inplace)


@fasttx_op(autocast="fp32")
def softmax(
    input: Tensor,
    dim: Optional[int] = None,
    _stacklevel: int = 3,
    dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """torch.nn.functional.softmax along `dim`, computed in `dtype` when given."""
    if dim is not None and use_triton(input):
        from .ops import softmax as op

        dim = _checks.check_int("softmax", "dim", 1, dim)
        _checks.check_dtype("softmax", "dtype", None, dtype)
        if dtype is None:
            (input,) = autocast_inputs("softmax", input)
        return op.softmax(input, dim, dtype)
    # dim=None: torch's legacy implicit-dim rule (with its deprecation warning)
    return F.softmax(input, dim=dim, _stacklevel=_stacklevel + 1, dtype=dtype)


@fasttx_op(autocast="lower")
def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention.

    query (N, ..., Hq, L, E), key (N, ..., H, S, E), value (N, ..., H, S, Ev) -> (N, ..., Hq, L, Ev).
    attn_mask: bool (True = attend) or float (added to the scores), broadcastable to (N, Hq, L, S).
    is_causal: top-left aligned causal mask. Fully masked rows give zeros.
    """
    if use_triton(query, key, value, attn_mask):
        from .ops import attention as op

        if torch.is_autocast_enabled(query.device.type):
            query, key, value = autocast_inputs("scaled_dot_product_attention", query, key, value)
            if attn_mask is not None and attn_mask.dtype != torch.bool:
                (attn_mask,) = autocast_inputs("scaled_dot_product_attention", attn_mask)
        args = (query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        reason = op.unsupported(*args)
        if reason is None:
            op.check(*args)
            return op.scaled_dot_product_attention(*args)
        warn_fallback("scaled_dot_product_attention", reason)
    # Positional where torch allows it: its argument parser is measurably slower per keyword.
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
    )


# ----------------------------------------------------------------------------------------------
# Fused sub-layer ops (fasttx's own; no torch.nn.functional counterpart)
# ----------------------------------------------------------------------------------------------
def _bias_act(name: str, input: Tensor, bias: Tensor, act: str):
    """The Triton op for act(input + bias), or None when the kernel cannot take this bias (it
    takes one broadcast over input's last dim: (N,), or any shape of N elements that broadcasts
    to input unchanged, e.g. (1, N))."""
    from .ops import activation as op

    shape = torch.broadcast_shapes(input.shape, bias.shape)  # torch's error when they don't
    if input.dim() == 0 or shape != input.shape or bias.numel() != input.shape[-1]:
        warn_fallback(name, f"a bias of shape {tuple(bias.shape)} for an input of shape "
                      f"{tuple(input.shape)} is not a per-column bias")
        return None
    return op.bias_act(input, bias.reshape(-1), act, name)


@fasttx_op()
def bias_gelu(input: Tensor, bias: Tensor, approximate: str = "none") -> Tensor:
    """gelu(input + bias) in one pass; bias (hidden,) broadcast over input's last dim."""
    if use_triton(input, bias):
        _checks.check_str("bias_gelu", "approximate", None, approximate)
        y = _bias_act("bias_gelu", input, bias, approximate)
        if y is not None:
            return y
    return F.gelu(input + bias, approximate=approximate)


@fasttx_op()
def bias_relu(input: Tensor, bias: Tensor) -> Tensor:
    """relu(input + bias) in one pass; bias (hidden,) broadcast over input's last dim."""
    if use_triton(input, bias):
        y = _bias_act("bias_relu", input, bias, "relu")
        if y is not None:
            return y
    return F.relu(input + bias)


@fasttx_op(autocast="fp32")
def dropout_add_layer_norm(
    input: Tensor,
    residual: Optional[Tensor],
    normalized_shape: Union[int, Sequence[int], torch.Size],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    p: float = 0.0,
    training: bool = True,
) -> Tuple[Tensor, Tensor]:
    """h = residual + dropout(input, p, training); returns (layer_norm(h), h).

    One kernel on the Triton path. The first output is the post-norm sub-layer `LN(x + drop(y))`;
    the second is the updated residual stream that a pre-norm block carries on.
    input, residual (*, hidden); `residual=None` means h = dropout(input).
    Under CUDA autocast it gives the unfused sequence's dtypes: h in the promoted dtype of input
    and residual, layer_norm(h) in fp32 (the norm's autocast policy applies to the norm only).
    """
    p = _checks.check_dropout_p(p)
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    if use_triton(input, residual, weight, bias):
        from .ops import layer_norm as op

        reason = op.unsupported(input, normalized_shape)
        if reason is None:
            eps = _checks.check_float("dropout_add_layer_norm", "eps", 6, eps)
            shape = _checks.check_shape("dropout_add_layer_norm", "normalized_shape", 3, normalized_shape)
            y, h = op.dropout_add_layer_norm(input, residual, shape, weight, bias, eps, p, training)
            if autocast_to_fp32(input.device.type) and y.dtype in (torch.float16, torch.bfloat16):
                y = y.float()
            return y, h
        warn_fallback("dropout_add_layer_norm", reason)
    h = F.dropout(input, p, training)
    if residual is not None:
        h = residual + h
    return F.layer_norm(h, normalized_shape, weight, bias, eps), h


__all__ = list(OPS)


def __getattr__(name: str):
    # Every other torch.nn.functional name is torch's own, so `import fasttx.functional as FF`
    # can stand in for `import torch.nn.functional as F` (and fasttx.nn.functional is this module).
    try:
        return getattr(F, name)
    except AttributeError:
        raise AttributeError(f"module 'fasttx.functional' has no attribute {name!r}") from None
