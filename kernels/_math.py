"""Shared @triton.jit math: GELU and its derivative, tanh, and the Philox dropout keep-mask.

Every kernel that needs one of these calls it from here, so that e.g. the dropout mask drawn by the
fused residual+dropout+LayerNorm kernel is bit-identical to the stand-alone dropout kernel's for the
same (seed, offset, element index).
"""
import triton
import triton.language as tl

# Globals read inside @triton.jit code must be tl.constexpr: the compiler rejects plain Python
# floats (the interpreter does not, so only a GPU compile shows it; tools/gpu_compile_check.py).
_SQRT_1_2 = tl.constexpr(0.7071067811865476)  # 1/sqrt(2)
_SQRT_2_PI = tl.constexpr(0.7978845608028654)  # sqrt(2/pi)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1/sqrt(2*pi)


@triton.jit
def tanh(x):
    # tanh through exp: libdevice's tanh is missing under the interpreter. Written on -|x| so
    # exp never overflows: tanh(|x|) = (1 - e^{-2|x|}) / (1 + e^{-2|x|}).
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def gelu(x, APPROX_TANH: tl.constexpr):
    """GELU of fp32 x. Exact: x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)).
    Tanh form: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    if APPROX_TANH:
        inner = _SQRT_2_PI * (x + 0.044715 * x * x * x)
        y = 0.5 * x * (1.0 + tanh(inner))
    else:
        y = 0.5 * x * (1.0 + tl.math.erf(x * _SQRT_1_2))
    # the limit at -inf is 0 (-0.0, as for every x below ~-14), not -inf * 0 = NaN
    return tl.where(x == float("-inf"), -0.0, y)


@triton.jit
def gelu_grad(x, APPROX_TANH: tl.constexpr):
    """d gelu / dx of fp32 x.
    Exact:  Phi(x) + x phi(x), phi(x) = exp(-x^2/2) / sqrt(2 pi).
    Tanh:   0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2), t = tanh(inner)."""
    if APPROX_TANH:
        inner = _SQRT_2_PI * (x + 0.044715 * x * x * x)
        t = tanh(inner)
        g = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_PI * (1.0 + 0.134145 * x * x)
        return tl.where(x == float("-inf"), 0.0, tl.where(x == float("inf"), 1.0, g))
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(x * _SQRT_1_2))
        pdf = tl.exp(-0.5 * x * x) * _INV_SQRT_2PI
        g = cdf + x * pdf  # the limits at +-inf are 1 and 0, not inf * 0 = NaN
        return tl.where(x == float("-inf"), 0.0, tl.where(x == float("inf"), 1.0, g))


@triton.jit
def dropout_keep(seed, offset, idx, p):
    """Keep-mask (True = kept) for element indices `idx` (int64 or int32 tensor) of a tensor
    dropped with probability p, from the Philox stream (seed, offset). Deterministic in
    (seed, offset, idx): the backward pass regenerates the forward's mask instead of storing it."""
    return tl.rand(seed, offset + idx) >= p
