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


# ----------------------------------------------------------------------------------------------
# RMSNorm
# ----------------------------------------------------------------------------------------------
RMS_NORM_CASTS = ("torch", "llama", "gemma")


@fasttx_op(autocast="fp32")
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
    if use_triton(input, weight):
        from .ops import rms_norm as op

        reason = op.unsupported(input, normalized_shape, weight, eps)
        if reason is None:
            shape = _checks.check_shape("rms_norm", "normalized_shape", 2, normalized_shape)
            if eps is not None:
                eps = _checks.check_float("rms_norm", "eps", 4, eps)
            op.check(input, shape, weight, eps)
            input, weight = autocast_inputs("rms_norm", input, weight)
            return op.rms_norm(input, shape, weight, eps)
        warn_fallback("rms_norm", reason)
    return F.rms_norm(input, normalized_shape, weight, eps)


def _rms_norm_cast(h: Tensor, normalized_shape, weight: Optional[Tensor], eps: Optional[float],
                   cast: str) -> Tensor:
    """torch ops for the three casting orders of add_rms_norm (the Triton path's semantics)."""
    if cast == "torch":
        return F.rms_norm(h, normalized_shape, weight, eps)
    from ._torch_errors import raise_as_torch, rms_norm_shapes_ok

    if not rms_norm_shapes_ok(h, normalized_shape, weight) and not torch.compiler.is_compiling():
        # a bad call: F.rms_norm's own checks raise exactly what it raises, as for the "torch" cast
        raise_as_torch(lambda m: F.rms_norm(m.tensor(h), m.shape(normalized_shape), m.tensor(weight), eps),
                       (*h.shape, *normalized_shape, *(() if weight is None else weight.shape)), h.shape,
                       h.device.type)
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


@fasttx_op(autocast="fp32")
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
    for name, t in (("input", input), ("residual", residual)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"add_rms_norm(): argument '{name}' must be Tensor, not {type(t).__name__}")
    if cast not in RMS_NORM_CASTS:
        raise ValueError(f"add_rms_norm: cast must be one of {RMS_NORM_CASTS}, got {cast!r}")
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    if residual is not None and residual.shape != input.shape:
        raise RuntimeError(
            f"add_rms_norm: expected residual of the input's shape {list(input.shape)}, got "
            f"{list(residual.shape)}"
        )
    if use_triton(input, residual, weight):
        from .ops import rms_norm as op

        reason = op.unsupported(input, normalized_shape, weight, eps, residual, cast)
        if reason is None:
            shape = _checks.check_shape("add_rms_norm", "normalized_shape", 3, normalized_shape)
            if eps is not None:
                eps = _checks.check_float("add_rms_norm", "eps", 5, eps)
            op.check(input, shape, weight, eps, residual, cast, op="add_rms_norm")
            if cast == "torch" and autocast_to_fp32(input.device.type):
                # as the unfused sequence under CUDA autocast: the add in the inputs' dtypes,
                # F.rms_norm (on autocast's fp32 list) of h in fp32
                h = input if residual is None else input + residual
                h32, weight = autocast_inputs("add_rms_norm", h, weight)
                return op.rms_norm(h32, shape, weight, eps), h
            return op.add_rms_norm(input, residual, shape, weight, eps, cast)
        warn_fallback("add_rms_norm", reason)
    h = input if residual is None else input + residual
    return _rms_norm_cast(h, tuple(normalized_shape), weight, eps, cast), h


# ----------------------------------------------------------------------------------------------
# Gated MLP activations (fasttx's own; the argument rules are checked here, for both backends)
# ----------------------------------------------------------------------------------------------
_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_gated(op: str, gate: Tensor, up: Optional[Tensor]) -> None:
    for name, t in (("gate", gate), ("up", up)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{op}(): argument '{name}' must be Tensor, not {type(t).__name__}")
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


@fasttx_op()
def swiglu(gate: Tensor, up: Optional[Tensor] = None) -> Tensor:
    """SwiGLU's activation, silu(gate) * up (Llama's MLP: down(silu(gate_proj(x)) * up_proj(x))).

    gate, up (*, N) of one dtype -> (*, N); up=None: gate is the concatenated (*, 2N) tensor
    (gate|up) on its last dim (one fused gate_up projection), split in the middle. One pass
    forward and backward on the Triton path, fp32 math, one rounding."""
    _check_gated("swiglu", gate, up)
    if use_triton(gate, up):
        from .ops import gated as op

        if op.unsupported(gate, up, "silu") is None:
            return op.swiglu(gate, up)
    if up is None:
        gate, up = gate.chunk(2, dim=-1)
    return F.silu(gate) * up


@fasttx_op()
def geglu(gate: Tensor, up: Optional[Tensor] = None, approximate: str = "none") -> Tensor:
    """GeGLU's activation, gelu(gate, approximate) * up; approximate "none" (erf) or "tanh"
    (Gemma's gelu_pytorch_tanh). Shapes and layouts as swiglu."""
    if approximate not in ("none", "tanh"):
        raise RuntimeError(f"approximate argument must be either none or tanh, got {approximate!r}")
    _check_gated("geglu", gate, up)
    if use_triton(gate, up):
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
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not isinstance(t, Tensor):
            raise TypeError(f"apply_rotary_emb(): argument '{name}' must be Tensor, not {type(t).__name__}")
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 4:
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


@fasttx_op()
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
    if use_triton(q, k, cos, sin, position_ids):
        from .ops import rotary as op

        reason = op.unsupported(q, k, cos, sin, position_ids, interleaved, seq_dim)
        if reason is None:
            return op.apply_rotary_emb(q, k, cos, sin, position_ids, interleaved, seq_dim)
        warn_fallback("apply_rotary_emb", reason)
    if position_ids is not None:
        cos, sin = cos[position_ids], sin[position_ids]  # (Bp, L, R)
    cos, sin = cos.unsqueeze(-3 if seq_dim == -2 else -2), sin.unsqueeze(-3 if seq_dim == -2 else -2)
    return _rotate(q, cos, sin, interleaved), _rotate(k, cos, sin, interleaved)


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------
@fasttx_op(autocast="fp32")
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
            input, weight = autocast_inputs("cross_entropy", input, weight)
            if target.is_floating_point():
                (target,) = autocast_inputs("cross_entropy", target)
            return op.cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing)
        warn_fallback("cross_entropy", reason)
    return F.cross_entropy(input, target, weight, None, ignore_index, None, reduction, label_smoothing)


@fasttx_op()
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
            warn_fallback("linear_cross_entropy", reason)
            triton = False
    if torch.is_autocast_enabled(input.device.type):
        # as torch's composite under autocast: the linear in the autocast dtype (the loss math is
        # fp32 inside either way; under CUDA autocast torch's loss comes out in fp32)
        low = torch.get_autocast_dtype(input.device.type)
        input, linear_weight, linear_bias = (
            t.to(low) if t is not None and t.dtype != torch.float64 else t
            for t in (input, linear_weight, linear_bias)
        )
    out = op.linear_cross_entropy(input, linear_weight, target, linear_bias, weight, reduction,
                                  ignore_index, label_smoothing, use_triton=triton)
    return out.float() if autocast_to_fp32(input.device.type) else out


@fasttx_op()
def linear_log_probs(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Per-token log-probabilities of `target` under linear(input, weight, bias) / temperature,
    without the (N, V) logits: log_softmax(F.linear(input, weight, bias) / temperature, -1)
    .gather(-1, target[..., None])[..., 0] (TRL's selective_log_softmax of those logits), and with
    return_entropy=True also the per-token entropy -sum_v p_v log p_v (TRL's entropy_from_logits).

    input (*, H) final hidden states; weight (V, H) the LM head; bias (V,) or None; target (*)
    integer token ids. Returns logp (*) (and ent (*)) in fp32 (fp64 for fp64 inputs); both are 0
    where target == ignore_index, with zero gradient there. Differentiable in input, weight and
    bias for any upstream gradient on either output. Chunked over rows (and the vocabulary inside
    the row kernel) as linear_cross_entropy is: the forward keeps (N,) vectors only, the backward
    recomputes each chunk's logits; fp32 accumulation, no atomics (deterministic)."""
    from .ops import log_probs as op  # plain torch + lazily loaded kernels

    op.check(input, weight, target, bias, temperature, ignore_index)
    triton = use_triton(input, weight, target, bias)
    if torch.is_autocast_enabled(input.device.type):  # the head's matmul in the autocast dtype, as F.linear
        low = torch.get_autocast_dtype(input.device.type)
        input, weight, bias = (t.to(low) if t is not None and t.dtype != torch.float64 else t
                               for t in (input, weight, bias))
    return op.linear_log_probs(input, weight, target, bias, temperature, ignore_index, return_entropy, triton)


@fasttx_op()
def linear_jsd(
    student_input: Tensor,
    student_weight: Tensor,
    teacher_input: Tensor,
    teacher_weight: Tensor,
    target: Optional[Tensor] = None,
    *,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    num_items_in_batch=None,
) -> Tensor:
    """Generalised Jensen-Shannon divergence between the student's and the teacher's next-token
    distributions, softmax(linear(input, weight, bias) / temperature) of each, without the logits
    of either (TRL's GKDTrainer.generalized_jsd_loss on those logits): beta = 0 is KL(teacher ||
    student) (forward KL), beta = 1 is KL(student || teacher) (reverse KL), in between
    beta KL(teacher || mix) + (1 - beta) KL(student || mix), mix = (1 - beta) student + beta teacher.

    student_input (*, Hs), student_weight (V, Hs); teacher_input (*, Ht), teacher_weight (V, Ht)
    (the same vocabulary; the hidden sizes and dtypes may differ); target (*) labels or None:
    tokens where target == ignore_index are left out. reduction: 'batchmean' (sum / kept tokens,
    or / input.shape[0] without target, as TRL), 'sum', 'mean' (sum / (kept tokens * V), as TRL's
    mean over the (tokens, V) elements), 'none' (per token, (*), 0 where ignored: the vocabulary
    summed); num_items_in_batch: sum / num_items_in_batch (gradient accumulation), as TRL.
    Result in fp32 (fp64 for fp64 inputs). Gradients reach the student; a teacher tensor that
    requires grad gets its exact gradient too (run the teacher under torch.no_grad() or freeze its
    head to skip that work). Chunked over rows on every backend (fasttx/ops/distill.py)."""
    from .ops import distill as op

    op.check("linear_jsd", student_input, student_weight, student_bias, teacher_input, teacher_weight,
             teacher_bias, target, beta, temperature, ignore_index, reduction)
    return op.divergence(student_input, student_weight, student_bias, teacher_input, teacher_weight,
                         teacher_bias, target, beta, temperature, ignore_index, reduction, num_items_in_batch)


@fasttx_op()
def linear_kl_div(
    student_input: Tensor,
    student_weight: Tensor,
    teacher_input: Tensor,
    teacher_weight: Tensor,
    target: Optional[Tensor] = None,
    *,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    num_items_in_batch=None,
) -> Tensor:
    """KL(teacher || student) per token, the distillation loss of F.kl_div(student_log_probs,
    teacher_log_probs, log_target=True) summed over the vocabulary (named after F.kl_div, whose
    argument roles it keeps: the student is the input, the teacher the target), without the logits
    of either model. Exactly linear_jsd(..., beta=0); reverse KL is linear_jsd(..., beta=1).
    Arguments, reductions and gradients as linear_jsd."""
    return linear_jsd(student_input, student_weight, teacher_input, teacher_weight, target,
                      student_bias=student_bias, teacher_bias=teacher_bias, beta=0.0, temperature=temperature,
                      ignore_index=ignore_index, reduction=reduction, num_items_in_batch=num_items_in_batch)


# ----------------------------------------------------------------------------------------------
# Mixture-of-experts MLP (fasttx's own; the argument rules are checked here, for both backends)
# ----------------------------------------------------------------------------------------------
@fasttx_op(autocast="lower")
def moe_experts(
    hidden_states: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    gate_up_proj: Tensor,
    down_proj: Tensor,
    *,
    activation: str = "silu",
    gate_up_bias: Optional[Tensor] = None,
    down_bias: Optional[Tensor] = None,
    gate_up_interleaved: bool = False,
    transposed: bool = False,
    alpha: float = 1.702,
    limit: float = 7.0,
    expert_ids: Optional[Tensor] = None,
) -> Tensor:
    """The routed experts of a mixture-of-experts MLP (transformers' experts layout):

        out[t] = sum_j top_k_weights[t, j] * down[e](act(gate[e] x_t, up[e] x_t)),  e = top_k_index[t, j]

    hidden_states (T, H); top_k_index (T, k) integer in [0, E); top_k_weights (T, k);
    gate_up_proj (E, 2I, H), rows [gate; up] (gate_up_interleaved: gate0, up0, gate1, up1, ...);
    down_proj (E, H, I); transposed=True: gate_up_proj (E, H, 2I) and down_proj (E, I, H) (gpt-oss);
    gate_up_bias (E, 2I), down_bias (E, H) (added before the routing weight). activation: "silu"
    (silu(g) u), "gelu", "gelu_tanh" (gelu(g) u), "clamped_swiglu" (gpt-oss:
    (clamp(u, -limit, limit) + 1) * gc * sigmoid(alpha gc), gc = min(g, limit)). Returns (T, H).
    Gradients flow to hidden_states, top_k_weights (the router) and every weight and bias.
    expert_ids (E,) integer (expert parallel; default None = arange(E)): the global ids of the
    experts the weights hold (slot i is expert expert_ids[i]); top_k_index then holds global ids and
    pairs routed to experts not in expert_ids contribute zero, so the sum of the outputs over shards
    that split the experts is the full result. With DTensors, weights, biases and expert_ids
    Shard(0) and the rest Replicate run expert parallel (fasttx/distributed.py).
    Triton path: grouped GEMMs over the pairs sorted by expert, no host synchronisation
    (kernels/moe.py); torch path: per-expert F.linear (fasttx/_moe.py)."""
    from . import _moe

    if all(isinstance(t, Tensor) for t in (hidden_states, gate_up_proj, down_proj)):  # else check() says which
        hidden_states, gate_up_proj, down_proj, gate_up_bias, down_bias = autocast_inputs(
            "moe_experts", hidden_states, gate_up_proj, down_proj, gate_up_bias, down_bias)
    _moe.check(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, activation, gate_up_bias,
               down_bias, gate_up_interleaved, transposed, alpha, limit, expert_ids)
    args = (hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_bias, down_bias,
            activation, float(alpha), float(limit), gate_up_interleaved, transposed)
    if use_triton(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_bias, down_bias,
                  expert_ids):
        from .ops import moe as op

        reason = op.unsupported(hidden_states, gate_up_proj, down_proj)
        if reason is None:
            return op.moe_experts(*args, expert_ids=expert_ids)
        warn_fallback("moe_experts", reason)
    return _moe.moe_torch(*args, expert_ids=expert_ids)


__all__ = list(OPS)


def __getattr__(name: str):
    # Every other torch.nn.functional name is torch's own, so `import fasttx.functional as FF`
    # can stand in for `import torch.nn.functional as F` (and fasttx.nn.functional is this module).
    try:
        return getattr(F, name)
    except AttributeError:
        raise AttributeError(f"module 'fasttx.functional' has no attribute {name!r}") from None
