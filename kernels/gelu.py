"""Fused bias + activation: y = act(x + bias), act one of exact GELU, tanh GELU, ReLU or SiLU; and
the gated MLP activations y = act(gate) * up (SwiGLU with SiLU, GeGLU with either GELU).

x is viewed as (M, N) rows: N is the last dim (the one bias broadcasts over), rows may sit at any
stride as long as the last dim is contiguous. One forward and one backward kernel; the activation
and HAS_BIAS are constexpr flags. Every program walks a (rows x BLOCK_N) strip of the tensor in
(BLOCK_M, BLOCK_N) tiles, so the backward can sum dbias over its rows in fp32 registers and write
one partial row per program: the partials are then summed in a fixed order (no atomics, so two
backward runs are bit-identical).

Backward math, z = x + b, y = act(z), dy = dL/dy:
    dz[m, n] = dy[m, n] * act'(z[m, n])
    dx = dz                             (same shape as x)
    db[n] = sum_m dz[m, n]              (the column sum, fp32 partials per row strip)
    act' for exact GELU:  Phi(z) + z phi(z)
         for tanh GELU:   0.5 (1 + t) + 0.5 z (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 z^2),
                          t = tanh(sqrt(2/pi) (z + 0.044715 z^3))
         for ReLU:        0 where z <= 0 else 1 (torch's threshold_backward: a NaN z passes dy)
         for SiLU:        s (1 + z (1 - s)), s = sigmoid(z)

Gated (GATED, no bias), y = act(g) * u:  dg = dy * u * act'(g),  du = dy * act(g). The same two
kernels: `up` is a second input (and its gradient a second output) read at its own row stride, so
the concatenated (gate|up) layout is just two column-offset views of one (M, 2N) buffer.

Launchers:
    bias_act_forward(x, bias, activation, out_dtype=None) -> y
    bias_act_backward(dy, x, bias, activation) -> (dx, dbias)
    gated_act_forward(gate, up, activation) -> y            (up None: gate is (gate|up) on its last dim)
    gated_act_backward(dy, gate, up, activation) -> (dgate, dup)
"""
import torch
import triton
import triton.language as tl

from ._math import gelu, gelu_grad
from ._common import MAX_ROW_PROGRAMS, acc_dtype, as_rows, elementwise_config, num_sms, stat_dtype, value_words

# Activation codes (constexpr ACT); constexpr globals so the kernels can compare against them.
_GELU = tl.constexpr(0)
_GELU_TANH = tl.constexpr(1)
_RELU = tl.constexpr(2)
_SILU = tl.constexpr(3)
_RELU2 = tl.constexpr(4)
ACTIVATIONS = {"gelu": 0, "gelu_tanh": 1, "relu": 2, "silu": 3, "relu2": 4}

# dbias partials: at most this many row strips, so the fp32 partial buffer stays (<= 256, N); and
# at most one strip per SM: each strip writes (and the reduction reads) an fp32 row of N, which at
# 4 rows per strip was 1.25x the minimum traffic of the backward (tools/traffic.py).
_MAX_DBIAS_STRIPS = 256


def _num_warps(values: int) -> int:
    """16 warps for full tiles (4096 values, 8 per thread; value_words: an fp64 element counts two):
    with 4 the gated and bias backward held up to 201 registers, 8-12 resident warps per SM on
    sm_90 (tools/kernel_report.py); with 8 ptxas held some at 48-128 and spilled 4-12 B on sm_90 /
    sm_100 (its --regAllocOptLevel=2, which triton 3.9 passes); with 16 none spills, <= 76
    registers, >= 16 warps per SM."""
    return 16 if values >= 4096 else 4


def _launch_config(M: int, N: int, max_rows: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, rows per program, grid, num_warps) of the bias-act kernels over (M, N)
    computing in `dtype`'s accumulator (fp64 tiles: half the elements at the same warps)."""
    words = value_words(dtype)
    block_m, block_n, rows_per_prog, grid = elementwise_config(M, N, max_rows, words)
    return block_m, block_n, rows_per_prog, grid, _num_warps(block_m * block_n * words)


@triton.jit
def _activate(z, ACT: tl.constexpr):
    if ACT == _RELU:
        # where(z < 0) and not maximum(): NaN stays NaN and -0.0 stays -0.0, as torch.relu.
        return tl.where(z < 0, 0.0, z)
    elif ACT == _SILU:
        # z * sigmoid(z) as z / (1 + e^-z): e^-z overflows to inf for z << 0, giving -0.0 as torch
        return z / (1.0 + tl.exp(-z))
    elif ACT == _RELU2:
        # squared ReLU, relu(z)^2 (NaN stays NaN, as torch.relu(z) ** 2)
        r = tl.where(z < 0, 0.0, z)
        return r * r
    else:
        return gelu(z, ACT == _GELU_TANH)


@triton.jit
def _activate_grad(z, ACT: tl.constexpr):
    if ACT == _RELU:
        return tl.where(z <= 0, 0.0, 1.0)
    elif ACT == _SILU:
        s = 1.0 / (1.0 + tl.exp(-z))
        return s * (1.0 + z * (1.0 - s))
    elif ACT == _RELU2:
        # d/dz relu(z)^2 = 2 relu(z): 0 at z <= 0, NaN for NaN (as torch's relu backward passes it)
        return 2.0 * tl.where(z <= 0, 0.0, z)
    else:
        return gelu_grad(z, ACT == _GELU_TANH)


@triton.jit
def _bias_act_fwd_kernel(
    X,  # (M, N) input, row stride stride_xm, last dim contiguous
    B,  # (N,) bias (unused unless HAS_BIAS)
    U,  # (M, N) up-projection of the gated activations, row stride stride_um (unused unless GATED)
    Y,  # (M, N) output, row stride stride_ym
    M, N,
    stride_xm, stride_um, stride_ym,
    ROWS_PER_PROG,  # rows walked by one program along grid axis 1 (a multiple of BLOCK_M)
    ACT: tl.constexpr,  # GELU, GELU_TANH, RELU or SILU
    HAS_BIAS: tl.constexpr,
    GATED: tl.constexpr,  # y = act(x) * up
    ACC_DTYPE: tl.constexpr,  # fp32 (fp64 for fp64 inputs)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if HAS_BIAS:
        b = tl.load(B + cols, mask=col_mask, other=0.0).to(ACC_DTYPE)
    row0 = pid_m.to(tl.int64) * ROWS_PER_PROG  # int64: row * stride can pass 2^31
    for i in range(0, ROWS_PER_PROG, BLOCK_M):
        rows = row0 + i + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & col_mask[None, :]
        z = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
        z = z.to(ACC_DTYPE)
        if HAS_BIAS:
            z = z + b[None, :]
        y = _activate(z, ACT)
        if GATED:
            u = tl.load(U + rows[:, None] * stride_um + cols[None, :], mask=mask, other=0.0)
            y = y * u.to(ACC_DTYPE)
        tl.store(Y + rows[:, None] * stride_ym + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_act_bwd_kernel(
    DY,  # (M, N) upstream gradient, row stride stride_dym
    X,  # (M, N) saved input (read only), row stride stride_xm
    B,  # (N,) saved bias (unused unless HAS_BIAS)
    U,  # (M, N) saved up-projection, row stride stride_um (unused unless GATED)
    DX,  # (M, N) output gradient, row stride stride_dxm
    DU,  # (M, N) gradient of U, row stride stride_dum (unused unless GATED)
    DB_PARTIAL,  # (num row programs, N) fp32 partial column sums of dz (unused unless HAS_BIAS)
    M, N,
    stride_dym, stride_xm, stride_um, stride_dxm, stride_dum,
    ROWS_PER_PROG,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GATED: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if HAS_BIAS:
        b = tl.load(B + cols, mask=col_mask, other=0.0).to(ACC_DTYPE)
        db = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    row0 = pid_m.to(tl.int64) * ROWS_PER_PROG
    for i in range(0, ROWS_PER_PROG, BLOCK_M):
        rows = row0 + i + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & col_mask[None, :]
        z = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
        z = z.to(ACC_DTYPE)
        if HAS_BIAS:
            z = z + b[None, :]
        dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0)
        dy = dy.to(ACC_DTYPE)
        if GATED:
            u = tl.load(U + rows[:, None] * stride_um + cols[None, :], mask=mask, other=0.0)
            du = dy * _activate(z, ACT)
            tl.store(DU + rows[:, None] * stride_dum + cols[None, :], du.to(DU.dtype.element_ty),
                     mask=mask)
            dy = dy * u.to(ACC_DTYPE)
        dz = dy * _activate_grad(z, ACT)
        tl.store(DX + rows[:, None] * stride_dxm + cols[None, :], dz.to(DX.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            # masked lanes loaded dy = 0, so they add nothing
            db += tl.sum(tl.where(mask, dz, 0.0), axis=0)
    if HAS_BIAS:
        tl.store(DB_PARTIAL + pid_m.to(tl.int64) * N + cols, db.to(DB_PARTIAL.dtype.element_ty), mask=col_mask)


def _assert_args(x: torch.Tensor, bias, activation: str):
    # checked with torch's errors at the public entry (fasttx.functional); here only asserted
    assert activation in ACTIVATIONS, activation
    assert bias is None or (x.dim() > 0 and bias.shape == (x.shape[-1],)), (x.shape, bias.shape)


def bias_act_forward(x: torch.Tensor, bias, activation: str, out_dtype=None) -> torch.Tensor:
    """y = act(x + bias): x (*, N), bias (N,) or None -> y (*, N), contiguous, in `out_dtype`
    (default x's dtype). activation: a key of ACTIVATIONS (no "silu"). fp32 math inside."""
    _assert_args(x, bias, activation)
    out_dtype = out_dtype or x.dtype
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if x.numel() == 0:
        return y
    x2 = as_rows(x)  # (M, N)
    y2 = y.view(x2.shape)  # (M, N)
    M, N = x2.shape
    # with a bias: about 2 row programs per SM, each loading its bias columns once for all its rows
    # (one program per 4-row tile read the bias 1.12x over the minimum traffic, tools/traffic.py)
    max_rows = min(MAX_ROW_PROGRAMS, 2 * num_sms(x.device)) if bias is not None else MAX_ROW_PROGRAMS
    compute = torch.promote_types(x.dtype, bias.dtype) if bias is not None else x.dtype
    block_m, block_n, rows_per_prog, grid, num_warps = _launch_config(M, N, max_rows, compute)
    _bias_act_fwd_kernel[grid](
        x2, bias if bias is not None else x2, x2, y2, M, N, x2.stride(0), 0, y2.stride(0),
        rows_per_prog, ACT=ACTIVATIONS[activation], HAS_BIAS=bias is not None, GATED=False,
        ACC_DTYPE=acc_dtype(compute), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return y


def bias_act_backward(dy: torch.Tensor, x: torch.Tensor, bias, activation: str):
    """Gradients of y = act(x + bias): dy, x (*, N), bias (N,) or None -> (dx like x in x's dtype,
    dbias (N,) in bias's dtype or None). x and bias are only read."""
    _assert_args(x, bias, activation)
    assert dy.shape == x.shape, (dy.shape, x.shape)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        db = None if bias is None else torch.zeros_like(bias)
        return dx, db
    x2, dy2 = as_rows(x), as_rows(dy)  # (M, N)
    dx2 = dx.view(x2.shape)  # (M, N)
    M, N = x2.shape
    max_rows = min(_MAX_DBIAS_STRIPS, num_sms(x.device)) if bias is not None else MAX_ROW_PROGRAMS
    compute = torch.promote_types(x.dtype, bias.dtype) if bias is not None else x.dtype
    block_m, block_n, rows_per_prog, grid, num_warps = _launch_config(M, N, max_rows, compute)
    acc = acc_dtype(compute)
    partial = torch.empty((grid[1], N) if bias is not None else (1,), dtype=stat_dtype(compute), device=x.device)
    _bias_act_bwd_kernel[grid](
        dy2, x2, bias if bias is not None else x2, x2, dx2, dx2, partial, M, N,
        dy2.stride(0), x2.stride(0), 0, dx2.stride(0), 0, rows_per_prog,
        ACT=ACTIVATIONS[activation], HAS_BIAS=bias is not None, GATED=False, ACC_DTYPE=acc,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    # fixed-order sum of the per-strip partials: deterministic, still in fp32
    db = None if bias is None else partial.sum(dim=0).to(bias.dtype)
    return dx, db


# ----------------------------------------------------------------------------------------------
# Gated activations: y = act(gate) * up
# ----------------------------------------------------------------------------------------------
def _gate_up_rows(gate: torch.Tensor, up):
    """(gate, up) as (M, N) views with unit column stride; up None: gate is (gate|up) (*, 2N),
    split into two column-offset views of one (M, 2N) buffer (no copy)."""
    if up is None:
        both = as_rows(gate)  # (M, 2N)
        n = both.shape[1] // 2
        return both[:, :n], both[:, n:]
    return as_rows(gate), as_rows(up)


def gated_act_forward(gate: torch.Tensor, up, activation: str) -> torch.Tensor:
    """y = act(gate) * up: gate, up (*, N) -> y (*, N), contiguous, in gate's dtype; up None:
    gate is (*, 2N) = (gate|up) on its last dim. activation: "silu", "gelu" or "gelu_tanh".
    fp32 math inside, one rounding at the store. The caller validates shapes and dtypes."""
    assert activation in ACTIVATIONS, activation
    shape = gate.shape if up is not None else gate.shape[:-1] + (gate.shape[-1] // 2,)
    y = torch.empty(shape, dtype=gate.dtype, device=gate.device)
    if y.numel() == 0:
        return y
    g2, u2 = _gate_up_rows(gate, up)  # (M, N) each
    y2 = y.view(g2.shape)
    M, N = g2.shape
    block_m, block_n, rows_per_prog, grid, num_warps = _launch_config(M, N, MAX_ROW_PROGRAMS, gate.dtype)
    _bias_act_fwd_kernel[grid](
        g2, g2, u2, y2, M, N, g2.stride(0), u2.stride(0), y2.stride(0), rows_per_prog,
        ACT=ACTIVATIONS[activation], HAS_BIAS=False, GATED=True, ACC_DTYPE=acc_dtype(gate.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return y


def gated_act_backward(dy: torch.Tensor, gate: torch.Tensor, up, activation: str):
    """Gradients of gated_act_forward: dy (*, N) -> (dgate like gate, dup like up); up None:
    dgate is the (*, 2N) gradient of the concatenated input and dup None. Inputs only read."""
    assert activation in ACTIVATIONS, activation
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty(up.shape, dtype=up.dtype, device=up.device) if up is not None else None
    if dy.numel() == 0:
        return dgate, dup
    g2, u2 = _gate_up_rows(gate, up)  # (M, N)
    dg2, du2 = _gate_up_rows(dgate, dup)  # contiguous outputs: views, no copy
    dy2 = as_rows(dy)
    M, N = g2.shape
    block_m, block_n, rows_per_prog, grid, num_warps = _launch_config(M, N, MAX_ROW_PROGRAMS, gate.dtype)
    _bias_act_bwd_kernel[grid](
        dy2, g2, g2, u2, dg2, du2, dg2, M, N,
        dy2.stride(0), g2.stride(0), u2.stride(0), dg2.stride(0), du2.stride(0), rows_per_prog,
        ACT=ACTIVATIONS[activation], HAS_BIAS=False, GATED=True, ACC_DTYPE=acc_dtype(gate.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return dgate, dup


def compile_variants(quick: bool):
    """Every launch that selects different code: each activation, with and without bias, per dtype
    (tools/gpu_compile_check.py compiles them for a GPU target)."""
    dtypes = [torch.float16, torch.bfloat16] if quick else [torch.float16, torch.bfloat16, torch.float32, torch.float64]
    for dt in dtypes:
        x = torch.randn(64, 1000, dtype=dt)
        for act in ACTIVATIONS:
            for bias in (None, torch.randn(1000, dtype=dt)):
                bias_act_forward(x, bias, act)
                bias_act_backward(torch.randn(64, 1000, dtype=dt), x, bias, act)
        # gated: separate gate/up, and the concatenated (gate|up) layout
        for act in ("silu", "gelu", "gelu_tanh"):
            for up in (torch.randn(64, 1000, dtype=dt), None):
                gate = x if up is not None else torch.randn(64, 2000, dtype=dt)
                gated_act_forward(gate, up, act)
                gated_act_backward(torch.randn(64, 1000, dtype=dt), gate, up, act)
