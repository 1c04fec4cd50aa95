"""Host-side helpers every kernel file shares: the interpreter flag, the accumulator dtype, the SM
count and register share, the (rows, N) view, and the tile/grid choosers for row-wise and elementwise kernels.

`row_config` is the one block-size/warps chooser for kernels that reduce over a row (norms,
softmax, cross-entropy): a row fits one block up to `block_n_cap` columns, longer rows loop over
chunks, and past `max_n` it raises (the caller's `unsupported()` turns that limit into a fallback
before any launch)."""
import os

import torch
import triton
import triton.language as tl

from . import _dtypes

# Read once, like triton itself reads it when @triton.jit decorates a kernel: the kernels in this
# process are interpreted (CPU, numpy) or compiled for a GPU, whatever the variable says later.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Elements per (BLOCK_M, BLOCK_N) tile. Under the interpreter every program is a Python call, so
# large (numpy-vectorised) tiles are far faster there.
TILE = 65536 if INTERPRETING else 4096
ELEMENTWISE_MAX_BLOCK_N = 1024
MAX_ROW_PROGRAMS = 65535  # CUDA's limit on grid axes 1 and 2


# The register file of one SM (sm_80 to sm_100: 64K 32-bit registers) and one thread's ceiling.
SM_REGISTERS, THREAD_MAX_REGISTERS = 65536, 255


def register_share(num_warps: int) -> int:
    """`maxnreg` for a program that may hold the whole register file of its SM: it split over the
    program's threads (128 at 16 warps, 255 at 8 or fewer). Without it ptxas may hold a kernel at
    the count that lets one more program reside (64 at 16 warps, 128 at 8, 168 at 4) and spill
    there: triton 3.9 passes it --regAllocOptLevel=2 (tools/kernel_report.py showed 8-40 B)."""
    return min(THREAD_MAX_REGISTERS, SM_REGISTERS // (32 * num_warps))


def acc_dtype(dtype: torch.dtype):
    """Accumulator (tl) dtype: the rule of _dtypes.acc_dtype (fp64 for fp64, else fp32) as a tl dtype."""
    return _TL[stat_dtype(dtype)]


_TL = {torch.float32: tl.float32, torch.float64: tl.float64}


# torch dtype of saved statistics (mean, rstd, logsumexp): the accumulator dtype
stat_dtype = _dtypes.acc_dtype


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device. Under the interpreter programs run one after
    another, so a few long programs are fastest: 4."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def as_rows(t: torch.Tensor, N: int = None) -> torch.Tensor:
    """t (*, N) -> (M, N) view with a unit column stride (a copy only when no such view exists).
    N defaults to the last dim (1 for a 0-d tensor)."""
    if N is None:
        N = t.shape[-1] if t.dim() > 0 else 1
    t2 = t.reshape(-1, N)  # (M, N): a view whenever the leading dims merge into one stride
    if N > 1 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2


def value_words(dtype: torch.dtype) -> int:
    """32-bit registers per value of a kernel's arithmetic on `dtype` inputs (its accumulator
    dtype): 2 for fp64, else 1. The tile choosers count an fp64 element twice, so its tiles hold
    half the elements at the same warps: at the elements of 16/32-bit tiles, fp64 ones spilled
    12-540 B (norms, the bias-act backward, the cross-entropy forward; tools/kernel_report.py)."""
    return stat_dtype(dtype).itemsize // 4


def row_config(N: int, *, max_n: int, block_n_cap: int, name: str, max_block_m: int = 128, words: int = 1):
    """(BLOCK_M, BLOCK_N, num_warps, SINGLE_BLOCK) for a kernel reducing rows of N elements of
    `words` registers each (value_words).

    BLOCK_N = next_power_of_2(N) up to `block_n_cap` (SINGLE_BLOCK: the row is one block) and
    BLOCK_M rows per tile; longer rows loop over `block_n_cap`-column chunks, one row per tile.
    Raises ValueError past `max_n`, the largest size the kernel is tested at."""
    if N > max_n:
        raise ValueError(f"fasttx {name} supports rows of at most {max_n} elements, got {N}")
    block_n = triton.next_power_of_2(max(N, 1))
    single = block_n <= block_n_cap
    block_n = min(block_n, block_n_cap)
    block_m = min(max(TILE // (block_n * words), 1), max_block_m) if single else 1
    # ~8 registers per thread per live array at the largest tile; at least one warp, at most 16.
    num_warps = min(max(block_m * block_n * words // 256, 1), 16)
    return block_m, block_n, num_warps, single


def elementwise_config(M: int, N: int, max_row_programs: int = MAX_ROW_PROGRAMS, words: int = 1):
    """Tile shape and grid for an (M, N) elementwise pass of values of `words` registers each
    (value_words): (BLOCK_M, BLOCK_N, rows per program, grid). The row programs each walk
    ROWS_PER_PROG rows, a multiple of BLOCK_M."""
    block_n = min(triton.next_power_of_2(N), ELEMENTWISE_MAX_BLOCK_N)
    block_m = min(triton.next_power_of_2(M), max(1, 4096 // (block_n * words)))
    m_blocks = triton.cdiv(M, block_m)
    row_programs = min(m_blocks, max_row_programs)
    rows_per_prog = triton.cdiv(m_blocks, row_programs) * block_m
    row_programs = triton.cdiv(M, rows_per_prog)
    grid = (triton.cdiv(N, block_n), row_programs)
    return block_m, block_n, rows_per_prog, grid


def seed_tensor(seed, device) -> torch.Tensor:
    """The (1,) int64 device tensor a dropout kernel reads its Philox seed from: `seed` itself
    when it is one (the ops pass a seed drawn on the device, which a captured CUDA graph redraws
    on every replay), else a Python int copied there (tests, direct launcher calls)."""
    if isinstance(seed, torch.Tensor):
        assert seed.dtype == torch.int64 and seed.numel() == 1 and seed.device == device, seed
        return seed.reshape(1)
    return torch.tensor([seed], dtype=torch.int64, device=device)
