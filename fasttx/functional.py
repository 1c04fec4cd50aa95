"""fasttx.functional: drop-ins for torch.nn.functional ops, plus the fused sub-layer ops.

Every public op here has torch.nn.functional's exact signature and semantics. Each picks its path in
Python, from the tensors' device and `fasttx.use_backend` (see fasttx/_backend.py):
  - Triton: a `torch.library.custom_op` in fasttx/ops/<op>.py (fake + autograd registered, so
    `torch.compile(fullgraph=True)` sees one opaque op) that calls the launchers in fasttx.kernels;
  - reference: torch's own native ops, the same semantics as the plain math in fasttx/reference.py
    (the oracle the tests check both paths against), and as fast as torch.nn on CPU.
The inline `input.is_cuda` test before `use_triton(...)` is use_triton's own answer for the common
CPU case, without the call: microsecond-sized CPU ops stay as fast as torch.nn's. The
`from .ops import ...` inside each op keeps triton unimported until a Triton path is taken (and,
unlike importlib, torch.compile can trace it).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _backend
from ._backend import use_triton

__all__ = [
    "layer_norm",
    "gelu",
    "relu",
    "dropout",
    "softmax",
    "scaled_dot_product_attention",
    "bias_gelu",
    "bias_relu",
    "dropout_add_layer_norm",
    "cross_entropy",
    "linear_cross_entropy",
]


# ----------------------------------------------------------------------------------------------
# torch.autocast. torch applies a per-op policy before its own kernels; our custom ops have none,
# so the Triton branches apply torch's policy here: layer_norm and softmax run in fp32 under CUDA
# autocast (torch's fp32 list; CPU autocast leaves them alone), scaled_dot_product_attention in
# the autocast dtype (the lower-precision list, CUDA and CPU). fp64 tensors are never cast.
# ----------------------------------------------------------------------------------------------
_LOW = (torch.float16, torch.bfloat16)


def _autocast_to_fp32(device_type: str) -> bool:
    return device_type == "cuda" and torch.is_autocast_enabled("cuda")


def _fp32(t: Optional[Tensor]) -> Optional[Tensor]:
    return t.float() if t is not None and t.dtype in _LOW else t


def _lower(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    ok = t is not None and t.is_floating_point() and t.dtype != torch.float64
    return t.to(dtype) if ok else t


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
    if (_backend._backend == "triton" or input.is_cuda) and use_triton(input, weight, bias):
        from .ops import layer_norm as ops

        if _autocast_to_fp32(input.device.type):
            input, weight, bias = _fp32(input), _fp32(weight), _fp32(bias)
        return ops.layer_norm(input, normalized_shape, weight, bias, eps)
    return F.layer_norm(input, normalized_shape, weight, bias, eps)


def gelu(input: Tensor, approximate: str = "none") -> Tensor:
    """torch.nn.functional.gelu: exact (erf) when approximate="none", else the tanh form."""
    if (_backend._backend == "triton" or input.is_cuda) and use_triton(input):
        from .ops import activation as ops

        return ops.gelu(input, approximate)
    return F.gelu(input, approximate=approximate)


def relu(input: Tensor, inplace: bool = False) -> Tensor:
    """torch.nn.functional.relu (torch's own kernel on every path: there is nothing to fuse)."""
    return F.relu(input, inplace=inplace)


def dropout(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
    """torch.nn.functional.dropout. Triton path: Philox mask regenerated in the backward, never
    stored; seeds drawn from torch's generator so torch.manual_seed reproduces a run."""
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if (_backend._backend == "triton" or input.is_cuda) and use_triton(input):
        from .ops import dropout as ops

        return ops.dropout(input, p, training, inplace)
    return F.dropout(input, p, training, inplace)


def softmax(
    input: Tensor,
    dim: Optional[int] = None,
    _stacklevel: int = 3,
    dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """torch.nn.functional.softmax along `dim`, computed in `dtype` when given."""
    if dim is None:
        # torch's legacy implicit-dim rule (with its deprecation warning)
        return F.softmax(input, dim=None, _stacklevel=_stacklevel + 1, dtype=dtype)
    if (_backend._backend == "triton" or input.is_cuda) and use_triton(input):
        from .ops import softmax as ops

        if dtype is None and input.dtype in _LOW and _autocast_to_fp32(input.device.type):
            dtype = torch.float32
        return ops.softmax(input, dim, dtype)
    return F.softmax(input, dim=dim, dtype=dtype)


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
    if (_backend._backend == "triton" or query.is_cuda) and use_triton(query, key, value, attn_mask):
        from .ops import attention as ops

        if torch.is_autocast_enabled(query.device.type):
            low = torch.get_autocast_dtype(query.device.type)
            query, key, value = _lower(query, low), _lower(key, low), _lower(value, low)
            if attn_mask is not None and attn_mask.dtype != torch.bool:
                attn_mask = _lower(attn_mask, low)
        return ops.scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa
        )
    # Positional where torch allows it: its argument parser is measurably slower per keyword.
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
    )


# ----------------------------------------------------------------------------------------------
# Fused sub-layer ops (fasttx's own; no torch.nn.functional counterpart)
# ----------------------------------------------------------------------------------------------
def bias_gelu(input: Tensor, bias: Tensor, approximate: str = "none") -> Tensor:
    """gelu(input + bias) in one pass; bias (hidden,) broadcast over input's last dim."""
    if (_backend._backend == "triton" or input.is_cuda) and use_triton(input, bias):
        from .ops import activation as ops

        return ops.bias_gelu(input, bias, approximate)
    return F.gelu(input + bias, approximate=approximate)


def bias_relu(input: Tensor, bias: Tensor) -> Tensor:
    """relu(input + bias) in one pass; bias (hidden,) broadcast over input's last dim."""
    if (_backend._backend == "triton" or input.is_cuda) and use_triton(input, bias):
        from .ops import activation as ops

        return ops.bias_relu(input, bias)
    return F.relu(input + bias)


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
    """
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    if (_backend._backend == "triton" or input.is_cuda) and use_triton(input, residual, weight, bias):
        from .ops import layer_norm as ops

        y, h = ops.dropout_add_layer_norm(
            input, residual, normalized_shape, weight, bias, eps, p, training
        )
        # As the unfused torch sequence under CUDA autocast: h in the promoted dtype of input and
        # residual, y = layer_norm(h) in fp32 (a cast only when both inputs are 16-bit).
        if _autocast_to_fp32(input.device.type):
            y = _fp32(y)
        return y, h
    h = F.dropout(input, p, training)
    if residual is not None:
        h = residual + h
    return F.layer_norm(h, normalized_shape, weight, bias, eps), h


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------
def _warn_fallback(op: str, reason: str) -> None:
    # Stand-in for fasttx._backend.warn_fallback until it lands: one warning per (op, reason).
    import warnings

    if (op, reason) not in _FALLBACK_WARNED:
        _FALLBACK_WARNED.add((op, reason))
        warnings.warn(f"fasttx {op}: {reason}; running torch's implementation instead", stacklevel=3)


_FALLBACK_WARNED: set = set()


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    size_average: Optional[bool] = None,
    ignore_index: int = -100,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """torch.nn.functional.cross_entropy. input (C,), (N, C) or (N, C, d1, ...) logits; target
    class indices (), (N) or (N, d1, ...) (int64), or class probabilities of input's shape.
    Triton path: one row kernel (online logsumexp in fp32, the true-class gradient via expm1),
    per-row losses reduced as torch does; the backward recomputes the softmax from the logits."""
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    if isinstance(input, Tensor) and use_triton(input, target, weight):
        from .ops import cross_entropy as op

        reason = op.unsupported(input, target, weight)
        if reason is None:
            op.check(input, target, weight, ignore_index, reduction, label_smoothing)
            out = op.cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing)
            # torch's CUDA autocast runs cross_entropy in fp32
            return out.float() if _autocast_to_fp32(input.device.type) else out
        _warn_fallback("cross_entropy", reason)
    return F.cross_entropy(input, target, weight, None, ignore_index, None, reduction, label_smoothing)


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    options=None,
) -> Tensor:
    """torch.nn.functional.linear_cross_entropy (torch 2.13's signature; present here on any
    torch): cross_entropy(linear(input, linear_weight, linear_bias), target, ...) without the
    (N, C) logits, on every path, chunked over rows (the forward keeps per-row losses, the
    backward recomputes each chunk's logits and turns them into their gradient in place;
    the weight gradient accumulates in fp32 across chunks).

    input (H,) or (N, H); linear_weight (C, *out_features, H); linear_bias (C, *out_features);
    target (N, *out_features) class indices or (N, C, *out_features) probabilities; weight (C,).
    ignore_index None means -100 (and must be None for probability targets). `options` (torch's
    LinearCrossEntropyOptions) is accepted for compatibility and ignored: fasttx always chunks.
    """
    from .ops import cross_entropy as op  # plain torch + lazily loaded kernels

    ignore_index = op.check_linear(input, linear_weight, target, linear_bias, weight, reduction,
                                   ignore_index, label_smoothing)
    triton = use_triton(input, linear_weight, target, linear_bias, weight)
    if triton:
        reason = op.unsupported(input, target, weight)
        if reason is not None:
            _warn_fallback("linear_cross_entropy", reason)
            triton = False
    if torch.is_autocast_enabled(input.device.type):
        # as torch's composite under autocast: the linear in the autocast dtype
        low = torch.get_autocast_dtype(input.device.type)
        input, linear_weight, linear_bias = (_lower(input, low), _lower(linear_weight, low),
                                             _lower(linear_bias, low))
    out = op.linear_cross_entropy(input, linear_weight, target, linear_bias, weight, reduction,
                                  ignore_index, label_smoothing, use_triton=triton)
    return out.float() if triton and _autocast_to_fp32(input.device.type) else out
