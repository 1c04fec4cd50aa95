"""Activation ids, tile sizes and dot flags of the MoE kernels (see __init__.py)."""
import torch
import triton.language as tl

from .._common import INTERPRETING


_SILU = tl.constexpr(0)
_GELU = tl.constexpr(1)
_GELU_TANH = tl.constexpr(2)
_CLAMPED = tl.constexpr(3)
ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "clamped_swiglu": 3}

# Tiles. On a GPU tl.dot needs every dim >= 16; one config (no autotune yet: bench first).
if INTERPRETING:
    BLOCK_M, BLOCK_N, BLOCK_K = 16, 32, 32
else:
    BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 64
_NUM_WARPS, _NUM_STAGES = 4, 3


def _k_and_warps(dtype: torch.dtype) -> dict:
    """BLOCK_K and num_warps of every MoE launch. fp32's "ieee" dots are scalar FMAs in which each
    thread holds BLOCK_K-long slices of both operands: at 64 x 4 warps the backward's up kernel held
    32 registers and spilled 25 KB on sm_90 (32 x 4: 1.5 KB; 32 x 8: 84 B); at 16 x 8 no kernel spills
    (<= 186 registers). The interpreter runs fp32 with the same BLOCK_K, so the tests cover it."""
    if dtype == torch.float32:
        return dict(BLOCK_K=16, num_warps=8)
    return dict(BLOCK_K=BLOCK_K, num_warps=_NUM_WARPS)


def _dot_flags(dtype: torch.dtype):
    """(UPCAST, DOT_PREC): under the interpreter 16-bit tl.dot operands are upcast to fp32 (it gives
    garbage otherwise); fp32 inputs use full-precision ("ieee") dots, as torch's matmul does."""
    return INTERPRETING and dtype != torch.float32, "ieee" if dtype == torch.float32 else "tf32"
