"""Row softmax over the last dim: y = exp(x - max) / sum(exp(x - max)), forward and backward.

x is viewed as (M, N) rows (last dim contiguous, rows at any stride). Rows up to
SINGLE_BLOCK_MAX elements are held in registers in one tile of BLOCK_M rows; longer rows take the
LOOPED path: an online (max, sum) pass over BLOCK_N chunks, then a second pass that writes
exp(x - max) / sum. Statistics and sums in fp32 (fp64 for fp64 inputs); cast at the store.

Backward math, y = softmax(x), dy = dL/dy:
    dx_j = sum_i dy_i dy_i/dx_j = sum_i dy_i y_i (delta_ij - y_j) = y_j (dy_j - sum_i dy_i y_i)
so dx = y * (dy - rowsum(dy * y)): the saved output, not the input, is all it needs.

Online pass (per lane, then merged): keeping a running max m and a sum s of exp(x - m),
    m' = max(m, x),  s' = s * exp(m - m') + exp(x - m').
A lane that has seen only -inf has m = m' = -inf and exp(-inf - -inf) = NaN, so the -inf cases
are special-cased (rescale by 1 when the max does not move, add 0 for x = -inf); a row of all -inf
still ends with max = -inf and gives NaN like torch. NaN is never masked away: tl.maximum may drop
a NaN (GPU max.f32 does), but exp(NaN - m) still poisons the lane's sum, hence the row, as torch.
"""
import torch
import triton
import triton.language as tl

from ._common import acc_dtype, as_rows, value_words

SINGLE_BLOCK_MAX = 4096  # longest row held in one tile; longer rows loop over chunks
_LOOP_BLOCK_N = 2048  # chunk size of the looped path
_TILE = 4096  # elements per tile in the single-block path (several short rows per program)


@triton.jit
def _softmax_fwd_kernel(
    X,  # (M, N) input, row stride stride_xm, last dim contiguous
    Y,  # (M, N) output, row stride stride_ym
    M, N,
    stride_xm, stride_ym,
    ACC_DTYPE: tl.constexpr,  # fp32 (fp64 for fp64 inputs)
    LOOPED: tl.constexpr,  # rows longer than one BLOCK_N chunk
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64 row offsets
    row_mask = rows < M
    x_rows = X + rows[:, None] * stride_xm
    y_rows = Y + rows[:, None] * stride_ym
    cols = tl.arange(0, BLOCK_N)
    if not LOOPED:
        mask = row_mask[:, None] & (cols < N)[None, :]
        x = tl.load(x_rows + cols[None, :], mask=mask, other=float("-inf")).to(ACC_DTYPE)
        e = tl.exp(x - tl.max(x, axis=1)[:, None])
        # padding lanes hold -inf: exp(-inf - max) = 0 for a finite max; zero them anyway so a
        # row of all -inf gets NaN only from its own elements
        e = tl.where(mask, e, 0.0)
        y = e / tl.sum(e, axis=1)[:, None]
        tl.store(y_rows + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    else:
        m = tl.full((BLOCK_M, BLOCK_N), float("-inf"), ACC_DTYPE)  # per-lane running max
        s = tl.zeros((BLOCK_M, BLOCK_N), ACC_DTYPE)  # per-lane sum of exp(x - m)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c < N)[None, :]
            x = tl.load(x_rows + c[None, :], mask=mask, other=float("-inf")).to(ACC_DTYPE)
            m_new = tl.maximum(m, x)
            # where() only on the -inf cases, never around a NaN: a NaN x must reach s
            alpha = tl.where(m == m_new, 1.0, tl.exp(m - m_new))
            s = s * alpha + tl.where(x == float("-inf"), 0.0, tl.exp(x - m_new))
            m = m_new
        row_max = tl.max(m, axis=1)
        # merge the lanes (a lane that saw only -inf has s = 0, or NaN if it saw a NaN)
        s = s * tl.where(m == row_max[:, None], 1.0, tl.exp(m - row_max[:, None]))
        row_sum = tl.sum(s, axis=1)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c < N)[None, :]
            x = tl.load(x_rows + c[None, :], mask=mask, other=float("-inf")).to(ACC_DTYPE)
            y = tl.exp(x - row_max[:, None]) / row_sum[:, None]
            tl.store(y_rows + c[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_bwd_kernel(
    DY,  # (M, N) upstream gradient, row stride stride_dym
    Y,  # (M, N) saved forward output (read only), row stride stride_ym
    DX,  # (M, N) input gradient, row stride stride_dxm
    M, N,
    stride_dym, stride_ym, stride_dxm,
    ACC_DTYPE: tl.constexpr,
    LOOPED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    dy_rows = DY + rows[:, None] * stride_dym
    y_rows = Y + rows[:, None] * stride_ym
    dx_rows = DX + rows[:, None] * stride_dxm
    cols = tl.arange(0, BLOCK_N)
    if not LOOPED:
        mask = row_mask[:, None] & (cols < N)[None, :]
        y = tl.load(y_rows + cols[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
        dy = tl.load(dy_rows + cols[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
        dot = tl.sum(y * dy, axis=1)
        dx = y * (dy - dot[:, None])
        tl.store(dx_rows + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), ACC_DTYPE)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c < N)[None, :]
            y = tl.load(y_rows + c[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
            dy = tl.load(dy_rows + c[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
            acc += y * dy
        dot = tl.sum(acc, axis=1)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c < N)[None, :]
            y = tl.load(y_rows + c[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
            dy = tl.load(dy_rows + c[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
            dx = y * (dy - dot[:, None])
            tl.store(dx_rows + c[None, :], dx.to(DX.dtype.element_ty), mask=mask)


def softmax_config(M: int, N: int, single_block_max: int = None, dtype: torch.dtype = torch.float32):
    """(BLOCK_M, BLOCK_N, LOOPED, grid) for rows of length N of `dtype`. Rows up to
    `single_block_max` (default SINGLE_BLOCK_MAX) elements take one tile, several rows per program
    when short; longer rows loop over _LOOP_BLOCK_N chunks, one row per program. fp64 rows, tiles and
    chunks hold half the elements (value_words: at the others its looped forward held 241 registers
    and its backward 164, 8-12 warps per SM on sm_90)."""
    words = value_words(dtype)
    limit = SINGLE_BLOCK_MAX // words if single_block_max is None else single_block_max
    if N <= limit:
        block_n = triton.next_power_of_2(N)
        block_m = min(triton.next_power_of_2(M), max(1, _TILE // (block_n * words)))
        looped = False
    else:
        block_n = min(_LOOP_BLOCK_N // words, triton.next_power_of_2(max(limit, 1)))
        block_m = 1
        looped = True
    return block_m, block_n, looped, (triton.cdiv(M, block_m),)


def softmax_forward(x: torch.Tensor, single_block_max: int = None) -> torch.Tensor:
    """Softmax over the last dim: x (*, N) -> y (*, N), contiguous, x's dtype."""
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return y
    x2 = as_rows(x)  # (M, N)
    y2 = y.view(x2.shape)  # (M, N)
    M, N = x2.shape
    block_m, block_n, looped, grid = softmax_config(M, N, single_block_max, x.dtype)
    _softmax_fwd_kernel[grid](
        x2, y2, M, N, x2.stride(0), y2.stride(0),
        ACC_DTYPE=acc_dtype(x.dtype), LOOPED=looped, BLOCK_M=block_m, BLOCK_N=block_n,
    )
    return y


def softmax_backward(dy: torch.Tensor, y: torch.Tensor, single_block_max: int = None) -> torch.Tensor:
    """dx = y * (dy - rowsum(dy * y)) over the last dim: dy, y (*, N) -> dx (*, N) in y's dtype.
    y (the forward's output) is only read."""
    assert dy.shape == y.shape, (dy.shape, y.shape)
    dx = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    if y.numel() == 0:
        return dx
    dy2, y2 = as_rows(dy), as_rows(y)  # (M, N)
    dx2 = dx.view(y2.shape)  # (M, N)
    M, N = y2.shape
    block_m, block_n, looped, grid = softmax_config(M, N, single_block_max, y.dtype)
    _softmax_bwd_kernel[grid](
        dy2, y2, dx2, M, N, dy2.stride(0), y2.stride(0), dx2.stride(0),
        ACC_DTYPE=acc_dtype(y.dtype), LOOPED=looped, BLOCK_M=block_m, BLOCK_N=block_n,
    )
    return dx


def compile_variants(quick: bool):
    """One-block rows (short, and the widest: one row per tile) and looped rows, forward and
    backward, per dtype."""
    dtypes = [torch.float16, torch.bfloat16] if quick else [torch.float16, torch.bfloat16, torch.float32, torch.float64]
    for dt in dtypes:
        for n in (1000, 9000) if quick else (1000, SINGLE_BLOCK_MAX, 9000):
            y = softmax_forward(torch.randn(8, n, dtype=dt))
            softmax_backward(torch.randn(8, n, dtype=dt), y)
