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

import warnings
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
    "rms_norm",
    "add_rms_norm",
    "swiglu",
    "geglu",
    "apply_rotary_emb",
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
# RMSNorm
# ----------------------------------------------------------------------------------------------
_warned_fallbacks = set()


def _warn_fallback(op: str, reason: str) -> None:
    # One warning per (op, reason). (To become fasttx._backend.warn_fallback.)
    if (op, reason) not in _warned_fallbacks:
        _warned_fallbacks.add((op, reason))
        warnings.warn(f"fasttx {op}: {reason}; running torch's implementation instead", stacklevel=3)


RMS_NORM_CASTS = ("torch", "llama", "gemma")


def rms_norm(
    input: Tensor,
    normalized_shape: List[int],
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
) -> Tensor:
    """torch.nn.functional.rms_norm. input (*, *normalized_shape) -> same shape and dtype.

    y = x / sqrt(mean(x^2) + eps) * weight over the trailing normalized_shape dims, computed in
    fp32 (fp64 for fp64) and cast at the end; eps=None is torch.finfo(float32).eps (float64's for
    float64 input), as torch's own op. Past the kernel's hidden-size limit (65536) torch's op runs,
    with one warning."""
    if isinstance(normalized_shape, int):  # as torch.nn.functional.rms_norm does
        raise TypeError(
            "rms_norm(): argument 'normalized_shape' (position 2) must be tuple of ints, not int"
        )
    if (_backend._backend == "triton" or input.is_cuda) and use_triton(input, weight):
        from .ops import rms_norm as op

        reason = op.unsupported(input, normalized_shape, weight, eps)
        if reason is None:
            op.check(input, normalized_shape, weight, eps)
            if _autocast_to_fp32(input.device.type):
                input, weight = _fp32(input), _fp32(weight)
            return op.rms_norm(input, normalized_shape, weight, eps)
        _warn_fallback("rms_norm", reason)
    return F.rms_norm(input, normalized_shape, weight, eps)


def _rms_norm_cast(h: Tensor, normalized_shape, weight: Optional[Tensor], eps: Optional[float],
                   cast: str) -> Tensor:
    """torch ops for the three casting orders of add_rms_norm (the Triton path's semantics)."""
    if cast == "torch":
        return F.rms_norm(h, normalized_shape, weight, eps)
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    eps = torch.finfo(acc).eps if eps is None else eps
    dims = tuple(range(-len(normalized_shape), 0))
    x = h.to(acc)
    xhat = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
    if cast == "llama":  # HF LlamaRMSNorm: weight * hidden.to(input_dtype)
        xhat = xhat.to(h.dtype)
        return xhat if weight is None else weight * xhat
    # gemma: HF GemmaRMSNorm: (x * rsqrt) * (1 + weight.float()), then .type_as(x)
    return (xhat if weight is None else xhat * (1.0 + weight.to(acc))).to(h.dtype)


def add_rms_norm(
    input: Tensor,
    residual: Optional[Tensor],
    normalized_shape: Union[int, Sequence[int], torch.Size],
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
    *,
    cast: str = "torch",
) -> Tuple[Tensor, Tensor]:
    """h = input + residual; returns (rms_norm(h), h): the pre-norm block's fused residual add
    and norm (vLLM's and Liger's fused add-RMSNorm), in one kernel on the Triton path.

    input, residual (*, *normalized_shape), residual None: h = input. h in the promoted dtype of
    input and residual, rounded to it before the norm (as the unfused add). `cast` picks the
    model family's casting order, so a patched model matches its own module in 16-bit too:
      "torch": F.rms_norm(h): fp32 math, `* weight` in fp32, cast to h's dtype;
      "llama": normalize in fp32, cast to h's dtype, then `weight *` (HF Llama, Mistral, Qwen):
               the output takes promote(h, weight)'s dtype;
      "gemma": `* (1 + weight)` in fp32, then cast to h's dtype (HF Gemma).
    eps=None: torch.finfo(float32).eps (float64's for float64), as F.rms_norm."""
    if cast not in RMS_NORM_CASTS:
        raise ValueError(f"add_rms_norm: cast must be one of {RMS_NORM_CASTS}, got {cast!r}")
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    if residual is not None and residual.shape != input.shape:
        raise RuntimeError(
            f"add_rms_norm: expected residual of the input's shape {list(input.shape)}, got "
            f"{list(residual.shape)}"
        )
    if (_backend._backend == "triton" or input.is_cuda) and use_triton(input, residual, weight):
        from .ops import rms_norm as op

        reason = op.unsupported(input, normalized_shape, weight, eps, residual, cast)
        if reason is None:
            op.check(input, normalized_shape, weight, eps, residual, cast, op="add_rms_norm")
            if cast == "torch" and _autocast_to_fp32(input.device.type):
                # as the unfused sequence under CUDA autocast: the add in the inputs' dtypes,
                # F.rms_norm (autocast's fp32 list) of h in fp32
                h = input if residual is None else input + residual
                return op.rms_norm(_fp32(h), normalized_shape, _fp32(weight), eps), h
            return op.add_rms_norm(input, residual, normalized_shape, weight, eps, cast)
        _warn_fallback("add_rms_norm", reason)
    h = input if residual is None else input + residual
    return _rms_norm_cast(h, tuple(normalized_shape), weight, eps, cast), h


# ----------------------------------------------------------------------------------------------
# Gated MLP activations (fasttx's own; the argument rules are checked here, for both backends)
# ----------------------------------------------------------------------------------------------
_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_gated(op: str, gate: Tensor, up: Optional[Tensor]) -> None:
    for name, t in (("gate", gate), ("up", up)):
        if t is not None and t.dtype not in _FLOAT:
            # NotImplementedError, as torch's activations raise for integer tensors
            raise NotImplementedError(f"fasttx {op}: {name} must be a floating-point tensor, got {t.dtype}")
    if up is None:
        if gate.dim() == 0 or gate.shape[-1] % 2:
            raise RuntimeError(
                f"fasttx {op}: with up=None, gate is the concatenated (gate|up) tensor and its last "
                f"dim must be even, got shape {list(gate.shape)}"
            )
    elif gate.shape != up.shape:
        raise RuntimeError(
            f"fasttx {op}: gate and up must have the same shape, got {list(gate.shape)} and {list(up.shape)}"
        )
    elif gate.dtype != up.dtype or gate.device != up.device:
        raise RuntimeError(
            f"fasttx {op}: gate and up must have the same dtype and device, got {gate.dtype} on "
            f"{gate.device} and {up.dtype} on {up.device}"
        )


def swiglu(gate: Tensor, up: Optional[Tensor] = None) -> Tensor:
    """SwiGLU's activation, silu(gate) * up (Llama's MLP: down(silu(gate_proj(x)) * up_proj(x))).

    gate, up (*, N) of one dtype -> (*, N); up=None: gate is the concatenated (*, 2N) tensor
    (gate|up) on its last dim (one fused gate_up projection), split in the middle. One pass
    forward and backward on the Triton path, fp32 math, one rounding."""
    _check_gated("swiglu", gate, up)
    if (_backend._backend == "triton" or gate.is_cuda) and use_triton(gate, up):
        from .ops import gated as op

        if op.unsupported(gate, up, "silu") is None:
            return op.swiglu(gate, up)
    if up is None:
        gate, up = gate.chunk(2, dim=-1)
    return F.silu(gate) * up


def geglu(gate: Tensor, up: Optional[Tensor] = None, approximate: str = "none") -> Tensor:
    """GeGLU's activation, gelu(gate, approximate) * up; approximate "none" (erf) or "tanh"
    (Gemma's gelu_pytorch_tanh). Shapes and layouts as swiglu."""
    if approximate not in ("none", "tanh"):
        raise RuntimeError(f"approximate argument must be either none or tanh, got {approximate!r}")
    _check_gated("geglu", gate, up)
    if (_backend._backend == "triton" or gate.is_cuda) and use_triton(gate, up):
        from .ops import gated as op

        if op.unsupported(gate, up, approximate) is None:
            return op.geglu(gate, up, approximate)
    if up is None:
        gate, up = gate.chunk(2, dim=-1)
    return F.gelu(gate, approximate=approximate) * up


# ----------------------------------------------------------------------------------------------
# Rotary position embedding (fasttx's own; argument rules checked here, for both backends)
# ----------------------------------------------------------------------------------------------
def _rotary_args(q, k, cos, sin, position_ids, seq_dim):
    """Check apply_rotary_emb's arguments; return (cos, sin, position_ids, seq_dim) normalized:
    seq_dim -2 or -3; cos/sin (Bc, L, R) without ids, (P, R) with ids (Bp, L)."""
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise RuntimeError(f"apply_rotary_emb: {name} must be a 4-D tensor (B, H, L, D) or (B, L, H, D), "
                               f"got {getattr(t, 'shape', type(t).__name__)}")
        if not t.is_floating_point():
            raise NotImplementedError(f"apply_rotary_emb: {name} must be floating-point, got {t.dtype}")
    if seq_dim not in (-2, -3, 2, 1):
        raise ValueError(f"apply_rotary_emb: seq_dim must be -2 (B, H, L, D) or -3 (B, L, H, D), got {seq_dim}")
    seq_dim = seq_dim - 4 if seq_dim > 0 else seq_dim
    B, L, D = q.shape[0], q.shape[seq_dim], q.shape[-1]
    if (k.shape[0], k.shape[seq_dim], k.shape[-1]) != (B, L, D):
        raise RuntimeError(f"apply_rotary_emb: q {list(q.shape)} and k {list(k.shape)} must share batch, "
                           f"sequence and head dims (seq_dim={seq_dim}); only the heads may differ")
    if k.dtype != q.dtype or k.device != q.device:
        raise RuntimeError(f"apply_rotary_emb: q and k must share dtype and device, got {q.dtype} on "
                           f"{q.device} and {k.dtype} on {k.device}")
    if cos.shape != sin.shape or not cos.is_floating_point() or not sin.is_floating_point():
        raise RuntimeError(f"apply_rotary_emb: cos and sin must be floating-point of one shape, got "
                           f"{list(cos.shape)} {cos.dtype} and {list(sin.shape)} {sin.dtype}")
    if cos.device != q.device or sin.device != q.device:
        raise RuntimeError(f"apply_rotary_emb: cos and sin must be on q's device {q.device}")
    R = cos.shape[-1] if cos.dim() else 0
    if R % 2 or R > D or R == 0 and D > 0:
        raise RuntimeError(f"apply_rotary_emb: the rotary dim (cos.shape[-1] = {R}) must be even, > 0 "
                           f"and at most the head dim {D}")
    if position_ids is None:
        if cos.dim() == 2:
            cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
        if cos.dim() != 3 or cos.shape[1] != L or cos.shape[0] not in (1, B):
            raise RuntimeError(f"apply_rotary_emb: without position_ids, cos and sin must be (L, R), (1, L, R) "
                               f"or (B, L, R) with L = {L}, B = {B}; got {list(cos.shape)}")
    else:
        if position_ids.dtype not in (torch.int64, torch.int32) or position_ids.device != q.device:
            raise RuntimeError(f"apply_rotary_emb: position_ids must be an int64/int32 tensor on {q.device}, "
                               f"got {position_ids.dtype} on {position_ids.device}")
        if position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)
        if position_ids.dim() != 2 or position_ids.shape[1] != L or position_ids.shape[0] not in (1, B):
            raise RuntimeError(f"apply_rotary_emb: position_ids must be (L,), (1, L) or (B, L) with L = {L}, "
                               f"B = {B}; got {list(position_ids.shape)}")
        if cos.dim() != 2:
            raise RuntimeError(f"apply_rotary_emb: with position_ids, cos and sin are (P, R) tables indexed "
                               f"by the ids; got {list(cos.shape)}")
    return cos, sin, position_ids, seq_dim


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """x (..., D) rotated by cos/sin (..., R) broadcast to it, in fp32, cast back to x's dtype."""
    R = cos.shape[-1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xr, xp = x[..., :R].to(acc), x[..., R:]
    if interleaved:  # GPT-J's rotate_every_two
        rotated = torch.stack((-xr[..., 1::2], xr[..., 0::2]), dim=-1).flatten(-2)
    else:  # GPT-NeoX / Llama's rotate_half
        x1, x2 = xr.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
    y = (xr * cos.to(acc) + rotated * sin.to(acc)).to(x.dtype)
    return torch.cat((y, xp), dim=-1) if R < x.shape[-1] else y


def apply_rotary_emb(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    *,
    position_ids: Optional[Tensor] = None,
    interleaved: bool = False,
    seq_dim: int = -2,
) -> Tuple[Tensor, Tensor]:
    """Rotary position embedding of q and k: (x * cos + rotate(x) * sin for the first R dims,
    the rest unchanged), both in one kernel launch on the Triton path, forward and backward.

    q (B, Hq, L, D) and k (B, Hk, L, D) with seq_dim=-2 (default), or (B, L, H, D) with
    seq_dim=-3; any strides (views into a fused qkv projection run without a copy); Hk may differ
    from Hq (GQA). cos, sin: the model's own tables, so every rope scaling (linear, dynamic,
    llama3, yarn) is honoured: (L, R), (1, L, R) or (B, L, R) — HF's cos/sin as its rotary
    embedding returns them, the full rotary width R (each frequency twice) — or, with
    position_ids (L,) / (B, L), (P, R) tables whose rows the ids select. R = cos.shape[-1] is the
    rotary dim: even, <= D (R < D: partial rotary, as GPT-NeoX and Phi). interleaved=False rotates
    the halves (x_i, x_{i+R/2}) (GPT-NeoX, Llama: HF's rotate_half); True the pairs (x_2i, x_2i+1)
    (GPT-J's rotate_every_two, with cos/sin repeat-interleaved). Math in fp32 (fp64 for fp64),
    outputs in q's/k's dtype; cos and sin take no gradient on the Triton path (tables that
    require one run torch's ops, with a warning)."""
    cos, sin, position_ids, seq_dim = _rotary_args(q, k, cos, sin, position_ids, seq_dim)
    if (_backend._backend == "triton" or q.is_cuda) and use_triton(q, k, cos, sin, position_ids):
        from .ops import rotary as op

        reason = op.unsupported(q, k, cos, sin, position_ids, interleaved, seq_dim)
        if reason is None:
            return op.apply_rotary_emb(q, k, cos, sin, position_ids, interleaved, seq_dim)
        _warn_fallback("apply_rotary_emb", reason)
    if position_ids is not None:
        cos, sin = cos[position_ids], sin[position_ids]  # (Bp, L, R)
    cos, sin = cos.unsqueeze(-3 if seq_dim == -2 else -2), sin.unsqueeze(-3 if seq_dim == -2 else -2)
    return _rotate(q, cos, sin, interleaved), _rotate(k, cos, sin, interleaved)
