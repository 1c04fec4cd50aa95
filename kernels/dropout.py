"""Philox dropout: y = x * keep / (1 - p), keep drawn from (seed, flattened element index).

The mask is never stored: the backward regenerates it from the forward's seed. With
keep[i] = dropout_keep(seed, 0, i, p) (kernels._math, Philox on the int64 row-major index i of the
logical tensor), the same (seed, shape) gives the same mask in every kernel that uses the helper.

Backward math: y = x * keep * s with s = 1 / (1 - p)  =>  dx = dy * keep * s. It is the forward
map applied to dy with the same mask, so one kernel serves both passes.
p == 1: s is taken as 0 (no element is kept since rand < 1): y = x * 0, which keeps NaN/inf as
NaN like torch's `input * 0`.
"""
import torch
import triton
import triton.language as tl

from ._math import dropout_keep
from ._common import acc_dtype, as_rows, elementwise_config, seed_tensor

@triton.jit
def _dropout_kernel(
    X,  # (M, N) input (the forward's x or the backward's dy), row stride stride_xm
    Y,  # (M, N) output, row stride stride_ym
    MASK,  # (M, N) bool keep-mask, contiguous (written only if STORE_MASK: a test hook)
    M, N,
    stride_xm, stride_ym,
    SEED,  # (1,) int64 Philox seed drawn by the caller, read on the device (CUDA-graph safe)
    p,  # drop probability
    scale,  # 1 / (1 - p), 0 when p == 1
    ROWS_PER_PROG,  # rows walked by one program along grid axis 1 (a multiple of BLOCK_M)
    STORE_MASK: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    seed = tl.load(SEED)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    row0 = pid_m.to(tl.int64) * ROWS_PER_PROG  # int64: offsets and Philox indices can pass 2^31
    for i in range(0, ROWS_PER_PROG, BLOCK_M):
        rows = row0 + i + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & col_mask[None, :]
        x = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
        idx = rows[:, None] * N + cols[None, :]  # int64 flattened (row-major) element index
        keep = dropout_keep(seed, 0, idx, p)
        # a product, not a where(): a dropped NaN/inf stays NaN like torch's x * mask * scale
        y = x.to(ACC_DTYPE) * keep.to(ACC_DTYPE) * scale
        tl.store(Y + rows[:, None] * stride_ym + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
        if STORE_MASK:
            tl.store(MASK + idx, keep, mask=mask)


def _apply(x: torch.Tensor, p: float, seed, return_mask: bool):
    assert 0.0 <= p <= 1.0, p  # checked at the public entry (fasttx.functional)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mask = torch.empty(x.shape, dtype=torch.bool, device=x.device) if return_mask else None
    if x.numel() == 0:
        return y, mask
    x2 = as_rows(x)  # (M, N)
    y2 = y.view(x2.shape)  # (M, N)
    M, N = x2.shape
    block_m, block_n, rows_per_prog, grid = elementwise_config(M, N)
    scale = 0.0 if p == 1.0 else 1.0 / (1.0 - p)
    _dropout_kernel[grid](
        x2, y2, mask if return_mask else y2, M, N, x2.stride(0), y2.stride(0),
        seed_tensor(seed, x.device), p, scale, rows_per_prog,
        STORE_MASK=return_mask,
        ACC_DTYPE=acc_dtype(x.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n,
    )
    return y, mask


def dropout_forward(x: torch.Tensor, p: float, seed, return_mask: bool = False):
    """y = x * keep / (1 - p) for x (*), keep from (seed, element index); seed an int or a (1,)
    int64 tensor on x's device (kernels/_common.py: seed_tensor). Returns y (contiguous,
    x's dtype), or (y, keep) with keep a bool tensor like x when return_mask=True (a test hook:
    replay it through fasttx.reference.dropout(keep_mask=...))."""
    y, mask = _apply(x, p, seed, return_mask)
    return (y, mask) if return_mask else y


def dropout_backward(dy: torch.Tensor, p: float, seed) -> torch.Tensor:
    """dx = dy * keep / (1 - p) with the forward's mask, regenerated from the same seed."""
    return _apply(dy, p, seed, False)[0]


def compile_variants(quick: bool):
    """The dropout kernel per dtype (forward and backward are one kernel)."""
    dtypes = [torch.float16, torch.bfloat16] if quick else [torch.float16, torch.bfloat16, torch.float32, torch.float64]
    for dt in dtypes:
        x = torch.randn(64, 1000, dtype=dt)
        dropout_forward(x, 0.1, 1)
        dropout_backward(x, 0.1, 1)
