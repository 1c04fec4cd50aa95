"""Softmax: both backends against the fp64 reference and torch, forward and backward, any dim,
dtype=, single-block and looped (long-row) paths, -inf rows, NaN."""

import pytest
import torch
import torch.nn.functional as F

import fasttx
import fasttx.functional as FF
from fasttx import reference as R
from fasttx.kernels import softmax as K

from utils import ATOL_FLOOR, DTYPES, assert_2x_rule, assert_close, noncontig, run_probe

SHAPES = [(1,), (7,), (17, 113), (1023, 7), (2, 3, 1151), (2, 3, 4, 17)]


def _grads(fn, x, dy):
    leaf = x.detach().clone().requires_grad_(True)
    out = fn(leaf)
    (dx,) = torch.autograd.grad(out, leaf, dy.to(out.dtype))
    return out.detach(), dx


def _atol(ref, dtype):
    """The 2x rule's floor (the interpreter rounds fp32 -> bf16 as a GPU does: tests/_interpreter_bf16.py)."""
    return ATOL_FLOOR[dtype]


def _check_all(x, dy, dim, dtype=None):
    out, dx = _grads(lambda t: FF.softmax(t, dim, dtype=dtype), x, dy)
    pt, pt_dx = _grads(lambda t: F.softmax(t, dim, dtype=dtype), x, dy)
    ref, ref_dx = _grads(lambda t: R.softmax(t, dim, upcast=torch.float64), x.to(dtype or x.dtype).double(),
                         dy.double())
    assert out.dtype == pt.dtype and dx.dtype == x.dtype and out.shape == x.shape
    assert out.is_contiguous() == pt.is_contiguous()
    # tolerance of the least precise dtype the values went through (fp64 held to fp32's)
    rank = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2, torch.float64: 2}
    tol = min((out.dtype, dx.dtype), key=rank.get)
    tol = torch.float32 if tol == torch.float64 else tol
    assert_close(out, ref, dtype=tol, msg="softmax")
    assert_close(dx, ref_dx, dtype=tol, msg="dx")
    if out.dtype in (torch.float16, torch.bfloat16):
        assert_2x_rule(out, pt, ref, atol=_atol(ref, out.dtype), name="softmax")
    if dx.dtype in (torch.float16, torch.bfloat16):
        assert_2x_rule(dx, pt_dx, ref_dx, atol=_atol(ref_dx, dx.dtype), name="dx")


def _inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3).to(device=device, dtype=dtype)
    dy = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    return x, dy


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_softmax_last_dim(backend, device, shape, dtype):
    x, dy = _inputs(shape, dtype, device)
    _check_all(x, dy, -1)


@pytest.mark.parametrize("dim", [0, 1, 2, -2])
def test_softmax_each_dim_of_3d(backend, device, dim):
    x, dy = _inputs((5, 17, 9), torch.float32, device)
    _check_all(x, dy, dim)


@pytest.mark.parametrize("dtype,to", [(torch.float16, torch.float32), (torch.float32, torch.bfloat16),
                                      (torch.bfloat16, torch.float64)])
def test_softmax_dtype_argument(backend, device, dtype, to):
    x, dy = _inputs((7, 113), dtype, device)
    _check_all(x, dy, 1, dtype=to)


def test_softmax_dtype_argument_on_integers(backend, device):
    x = torch.arange(12, device=device).reshape(3, 4)
    torch.testing.assert_close(FF.softmax(x, 1, dtype=torch.float32), F.softmax(x, 1, dtype=torch.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [5000, 9001])
def test_long_rows_looped_path(backend, device, dtype, n):
    assert n > K.SINGLE_BLOCK_MAX  # the looped path
    x, dy = _inputs((3, n), dtype, device)
    _check_all(x, dy, -1)


@pytest.mark.parametrize("n", [1, 7, 17, 113])
def test_looped_path_small_chunks(device, n):
    # the looped kernels with chunks of 4 (or 16) elements: many chunks and a ragged last one
    x, dy = _inputs((5, n), torch.float32, device)
    x[1, : n // 2] = float("-inf")  # leading chunks that are all -inf
    ref, ref_dx = _grads(lambda t: R.softmax(t, -1, upcast=torch.float64), x.double(), dy.double())
    for limit in ((1, 4, 16) if n <= 17 else (4, 16)):
        y = K.softmax_forward(x, single_block_max=limit)
        dx = K.softmax_backward(dy, y, single_block_max=limit)
        assert_close(y, ref)
        assert_close(dx, ref_dx)


def _special_rows(device):
    inf, nan = float("inf"), float("nan")
    return torch.tensor([[-inf] * 5, [1.0, nan, 2.0, 0.0, 1.0], [-inf, 0.0, -inf, 1.0, -inf],
                         [1.0, inf, 2.0, 0.0, 1.0], [0.0, 1.0, 2.0, 3.0, 4.0],
                         [nan, -inf, -inf, -inf, -inf]], device=device)


def test_minus_inf_rows_and_nan_like_torch(backend, device):
    x = _special_rows(device)
    dy = torch.ones_like(x)
    pt, pt_dx = _grads(lambda t: F.softmax(t, -1), x, dy)
    assert pt[0].isnan().all() and pt[1].isnan().all() and pt[5].isnan().all()
    out, dx = _grads(lambda t: FF.softmax(t, -1), x, dy)
    torch.testing.assert_close(out, pt, equal_nan=True)
    torch.testing.assert_close(dx, pt_dx, equal_nan=True)


@pytest.mark.parametrize("limit", [1, 2, 4])
def test_minus_inf_rows_and_nan_looped_path(device, limit):
    # the online (max, sum) loop in chunks of `limit`: -inf-only chunks and NaN must behave as torch
    x = _special_rows(device)
    dy = torch.ones_like(x)
    pt, pt_dx = _grads(lambda t: F.softmax(t, -1), x, dy)
    y = K.softmax_forward(x, single_block_max=limit)
    torch.testing.assert_close(y, pt, equal_nan=True)
    torch.testing.assert_close(K.softmax_backward(dy, y, single_block_max=limit), pt_dx, equal_nan=True)


def test_noncontiguous_input_and_grad(backend, device):
    x, dy = _inputs((5, 3, 37), torch.float32, device)
    for xi, dyi in [(noncontig(x), noncontig(dy)), (x.transpose(0, 1), dy.transpose(0, 1)),
                    (x[:, :, :20], dy[:, :, :20])]:
        assert not xi.is_contiguous() and not dyi.is_contiguous()
        out, dx = _grads(lambda t: FF.softmax(t, -1), xi, dyi)
        ref, ref_dx = _grads(lambda t: R.softmax(t, -1, upcast=torch.float64), xi.double(), dyi.double())
        assert_close(out, ref)
        assert_close(dx, ref_dx)


@pytest.mark.parametrize("shape,dim", [((0,), 0), ((0, 7), 1), ((3, 0), 1), ((3, 0), 0), ((2, 0, 5), 2)])
def test_zero_size(backend, device, shape, dim):
    x = torch.randn(shape, device=device, requires_grad=True)
    y = FF.softmax(x, dim)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_scalar(backend, device):
    x = torch.tensor(0.3, device=device, requires_grad=True)
    y = FF.softmax(x, 0)
    torch.testing.assert_close(y, F.softmax(x, 0))
    y.backward()
    assert x.grad.shape == ()


def test_bad_inputs(backend, device):
    x = torch.randn(3, 4, device=device)
    with pytest.raises(IndexError, match="Dimension out of range"):
        FF.softmax(x, 2)
    with pytest.raises(IndexError, match="Dimension out of range"):
        FF.softmax(x, -3)
    with pytest.raises(NotImplementedError):
        FF.softmax(torch.arange(4, device=device), 0)


def test_backward_deterministic_and_output_untouched(device):
    x, dy = _inputs((17, 5000), torch.float32, device)
    with fasttx.use_backend("triton"):
        x.requires_grad_(True)
        y = FF.softmax(x, -1)
        y0 = y.detach().clone()
        g1 = torch.autograd.grad(y, x, dy, retain_graph=True)[0]
        g2 = torch.autograd.grad(y, x, dy)[0]
    assert torch.equal(g1, g2) and torch.equal(y.detach(), y0)


def test_torch_compile_fullgraph(device):
    fasttx.use_backend("triton")  # restored by conftest's autouse fixture
    x, dy = _inputs((7, 5, 113), torch.float32, device)

    def f(t):
        return FF.softmax(t, -1) + FF.softmax(t, 1, dtype=torch.float64).float()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, dx = _grads(compiled, x, dy)
    eager, eager_dx = _grads(f, x, dy)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(dx, eager_dx)


_PROBE = r"""
import torch
from fasttx.kernels import softmax as K
dev = "cuda" if torch.cuda.is_available() else "cpu"
S = 2**30 + 64  # row stride that fits int32, while row 2 starts at 2^31 + 128
big = torch.empty(2 * S + 8192, dtype=torch.float16, device=dev)  # untouched pages stay virtual on CPU
dbig = torch.empty_like(big)
for n in (4096, 8000):  # single-block and looped paths
    x = big.as_strided((3, n), (S, 1))
    x.copy_(torch.randn(3, n, device=dev))
    dy = dbig.as_strided((3, n), (S, 1))
    dy.copy_(torch.randn(3, n, device=dev))
    y = K.softmax_forward(x)
    ref = torch.softmax(x.double(), -1)
    assert (y.double() - ref).abs().max() < 1e-3, "forward"
    ys = big.as_strided((3, n), (S, 1))  # the saved output at the same huge offsets
    ys.copy_(y)
    dx = K.softmax_backward(dy, ys)
    dref = ref * (dy.double() - (dy.double() * ref).sum(-1, keepdim=True))
    assert (dx.double() - dref).abs().max() < 1e-3, "backward"
print("ok")
"""


def test_int64_row_offset_probe():
    """What this proves: rows whose offset (row * stride) passes 2^31 elements are read in int64
    by the forward and backward kernels on both paths (a row stride that fits int32, so an int32
    product would wrap). What it does not prove: output offsets past 2^31 (outputs here are
    small and contiguous). Costs 4 GiB virtual buffers of which only touched pages are real."""
    run_probe(_PROBE)


@pytest.mark.gpu
def test_softmax_more_than_2_31_elements():
    m, n = 2**31 // 1024 + 8, 1024
    x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    with fasttx.use_backend("triton"):
        y = FF.softmax(x, -1)
    assert_close(y[-16:], torch.softmax(x[-16:].float(), -1))
