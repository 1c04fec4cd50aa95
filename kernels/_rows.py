"""Row layout shared by the elementwise kernels (GELU/bias-activation, dropout, softmax): a tensor
viewed as (M, N) rows with a contiguous last dim, and the tile/grid choice for walking it."""
import torch
import triton

TILE = 4096  # elements per (BLOCK_M, BLOCK_N) tile
MAX_BLOCK_N = 1024
MAX_ROW_PROGRAMS = 65535  # CUDA's limit on grid axis 1


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """(*, N) -> (M, N) view with a contiguous last dim (a copy only when no such view exists)."""
    n = t.shape[-1] if t.dim() > 0 else 1
    t2 = t.reshape(-1, n)  # (M, N)
    if t2.stride(-1) != 1 and n > 1:
        t2 = t2.contiguous()
    return t2


def elementwise_config(M: int, N: int, max_row_programs: int = MAX_ROW_PROGRAMS):
    """Tile shape and grid for an (M, N) elementwise pass: (BLOCK_M, BLOCK_N, rows per program,
    grid). The row programs each walk ROWS_PER_PROG rows, a multiple of BLOCK_M."""
    block_n = min(triton.next_power_of_2(N), MAX_BLOCK_N)
    block_m = min(triton.next_power_of_2(M), max(1, TILE // block_n))
    m_blocks = triton.cdiv(M, block_m)
    row_programs = min(m_blocks, max_row_programs)
    rows_per_prog = triton.cdiv(m_blocks, row_programs) * block_m
    row_programs = triton.cdiv(M, rows_per_prog)
    grid = (triton.cdiv(N, block_n), row_programs)
    return block_m, block_n, rows_per_prog, grid
