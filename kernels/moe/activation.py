"""The gated activations act(g, u) of the MoE kernels and their gradients (see __init__.py)."""
import triton
import triton.language as tl

from .._math import gelu, gelu_grad
from .config import _GELU, _GELU_TANH, _SILU


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _glu(g, u, ACT: tl.constexpr, ALPHA, LIMIT):
    if ACT == _SILU:
        return g / (1.0 + tl.exp(-g)) * u
    elif ACT == _GELU:
        return gelu(g, False) * u
    elif ACT == _GELU_TANH:
        return gelu(g, True) * u
    else:
        gc = tl.minimum(g, LIMIT)
        uc = tl.minimum(tl.maximum(u, -LIMIT), LIMIT)
        return (uc + 1.0) * gc * _sigmoid(ALPHA * gc)


@triton.jit
def _glu_grad(da, g, u, ACT: tl.constexpr, ALPHA, LIMIT):
    """(dg, du) of a = act(g, u) for upstream da (see the module docstring)."""
    if ACT == _SILU:
        s = _sigmoid(g)
        return da * u * s * (1.0 + g * (1.0 - s)), da * g * s
    elif ACT == _GELU:
        return da * u * gelu_grad(g, False), da * gelu(g, False)
    elif ACT == _GELU_TANH:
        return da * u * gelu_grad(g, True), da * gelu(g, True)
    else:
        gc = tl.minimum(g, LIMIT)
        uc = tl.minimum(tl.maximum(u, -LIMIT), LIMIT)
        s = _sigmoid(ALPHA * gc)
        dg = da * (uc + 1.0) * (s + ALPHA * gc * s * (1.0 - s))
        du = da * gc * s
        # torch's clamp passes the gradient where min <= x <= max (ends included)
        return tl.where(g <= LIMIT, dg, 0.0), tl.where((u >= -LIMIT) & (u <= LIMIT), du, 0.0)
