"""GELU (exact / tanh), bias_gelu and bias_relu: both backends against the fp64 reference and
torch, forward, dx and dbias."""

import pytest
import torch
import torch.nn.functional as F

import fasttx
import fasttx.functional as FF
from fasttx import reference as R

from utils import ATOL_FLOOR, DTYPES, Case, assert_2x_rule, assert_close, noncontig, run_probe

SHAPES = [(1,), (7,), (17, 113), (1023, 3), (2, 3, 1151), (2, 3, 4, 17)]
APPROX = ["none", "tanh"]


def _inputs(shape, dtype, device, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3).to(device=device, dtype=dtype)
    b = (torch.randn(shape[-1], generator=g)).to(device=device, dtype=dtype) if bias else None
    dy = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    return x, b, dy


def _grads(fn, inputs, dy):
    """Output and gradients of fn(*inputs) for upstream gradient dy (inputs made leaves)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, dy.to(out.dtype))
    return out.detach(), grads


def _check(ours, torch_low, ref, name):
    """Per-dtype tolerance against the fp64 oracle, and the 2x rule against torch's own error."""
    assert ours.dtype == torch_low.dtype, f"{name}: dtype {ours.dtype} != torch's {torch_low.dtype}"
    assert_close(ours, ref.to(ours.dtype) if ours.dtype == torch.float32 else ref, dtype=ours.dtype, msg=name)
    if ours.dtype != torch.float32:
        assert_2x_rule(ours, torch_low, ref, name=name, atol=_atol(ref, ours.dtype))


def _atol(ref, dtype):
    """The 2x rule's floor (the interpreter rounds fp32 -> bf16 as a GPU does: tests/_interpreter_bf16.py)."""
    return ATOL_FLOOR[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("shape", SHAPES)
def test_gelu_forward_backward(backend, device, shape, approximate, dtype):
    x, _, dy = _inputs(shape, dtype, device)
    out, (dx,) = _grads(lambda t: FF.gelu(t, approximate), [x], dy)
    pt, (pt_dx,) = _grads(lambda t: F.gelu(t, approximate=approximate), [x], dy)
    ref, (ref_dx,) = _grads(lambda t: R.gelu(t, approximate, upcast=torch.float64), [x.double()], dy.double())
    _check(out, pt, ref, "gelu")
    _check(dx, pt_dx, ref_dx, "dx")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("shape", [(7,), (17, 113), (1023, 7), (2, 3, 1151), (2, 3, 4, 17)])
def test_bias_act_forward_backward(backend, device, shape, act, dtype):
    x, b, dy = _inputs(shape, dtype, device, bias=True)
    if act == "relu":
        ours_fn, pt_fn = FF.bias_relu, (lambda t, c: F.relu(t + c))
        # reference.bias_relu is clamp_min, whose gradient at z == 0 exactly is 1 where
        # torch.relu's (and ours) is 0; such ties occur in 16-bit inputs, so the fp64 oracle for
        # the gradients is torch.relu itself, and reference.bias_relu checks the forward below.
        ref_fn = lambda t, c: F.relu(t + c)  # noqa: E731
        fwd_ref = R.bias_relu(x, b, upcast=torch.float64)
    else:
        a = "tanh" if act == "gelu_tanh" else "none"
        ours_fn = lambda t, c: FF.bias_gelu(t, c, a)  # noqa: E731
        pt_fn = lambda t, c: F.gelu(t + c, approximate=a)  # noqa: E731
        ref_fn = lambda t, c: R.bias_gelu(t, c, a, upcast=torch.float64)  # noqa: E731
    out, (dx, db) = _grads(ours_fn, [x, b], dy)
    pt, (pt_dx, pt_db) = _grads(pt_fn, [x, b], dy)
    ref, (ref_dx, ref_db) = _grads(ref_fn, [x.double(), b.double()], dy.double())
    _check(out, pt, ref, act)
    if act == "relu":
        _check(out, pt, fwd_ref, act)
    _check(dx, pt_dx, ref_dx, "dx")
    # dbias sums M rows: compare with the relative tolerance scaled to the sum's magnitude
    assert db.dtype == b.dtype
    scale = ref_dx.abs().sum(dim=tuple(range(ref_dx.dim() - 1))).max().item()
    atol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}[dtype] * max(scale, 1.0)
    torch.testing.assert_close(db.double(), ref_db, atol=atol, rtol=0)
    if dtype != torch.float32:
        assert_2x_rule(db, pt_db, ref_db, name="dbias", atol=atol)


def test_bias_relu_nan_and_zero_like_torch(backend, device):
    # torch.relu keeps NaN and -0.0; its backward passes dy for a NaN input and blocks it at 0
    x = torch.tensor([[float("nan"), -0.0, 0.0, -1.0, 2.0]], device=device)
    b = torch.zeros(5, device=device)
    dy = torch.ones_like(x)
    out, (dx, db) = _grads(FF.bias_relu, [x, b], dy)
    pt, (pt_dx, pt_db) = _grads(lambda t, c: F.relu(t + c), [x, b], dy)
    torch.testing.assert_close(out, pt, equal_nan=True)
    assert torch.equal(torch.signbit(out[0, 1:]), torch.signbit(pt[0, 1:]))
    torch.testing.assert_close(dx, pt_dx, equal_nan=True)
    torch.testing.assert_close(db, pt_db, equal_nan=True)


@pytest.mark.parametrize("approximate", APPROX)
def test_gelu_nan_propagates(backend, device, approximate):
    x = torch.tensor([1.0, float("nan"), -2.0, 0.5, float("nan")], device=device)
    dy = torch.tensor([1.0, 1.0, float("nan"), 1.0, 1.0], device=device)
    out, (dx,) = _grads(lambda t: FF.gelu(t, approximate), [x], dy)
    pt, (pt_dx,) = _grads(lambda t: F.gelu(t, approximate=approximate), [x], dy)
    assert torch.equal(out.isnan(), pt.isnan()) and out.isnan().sum() == 2
    assert torch.equal(dx.isnan(), pt_dx.isnan()) and dx.isnan().sum() == 3
    torch.testing.assert_close(out, pt, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noncontiguous_input_and_grad(backend, device, dtype):
    x, b, dy = _inputs((5, 3, 37), dtype, device, bias=True)
    xt, dyt = noncontig(x), noncontig(dy)  # stride 2 in the last dim: not a row view
    xp, dyp = x.transpose(0, 1), dy.transpose(0, 1)  # permuted: rows not collapsible
    for xi, dyi in [(xt, dyt), (xp, dyp), (x[:, :, :20], dy[:, :, :20])]:
        bi = b[: xi.shape[-1]]
        out, (dx, db) = _grads(lambda t, c: FF.bias_gelu(t, c, "tanh"), [xi, bi], dyi)
        ref, (rdx, rdb) = _grads(lambda t, c: R.bias_gelu(t, c, "tanh", upcast=torch.float64),
                                 [xi.double(), bi.double()], dyi.double())
        assert_close(out, ref)
        assert_close(dx, rdx)
        assert_close(db, rdb, atol=5e-5 if dtype == torch.float32 else 0.5)  # a sum of 15 rows


@pytest.mark.parametrize("shape", [(0,), (0, 7), (3, 0), (2, 0, 5)])
def test_zero_size(backend, device, shape):
    x = torch.randn(shape, device=device, requires_grad=True)
    y = FF.gelu(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    y.sum().backward()
    assert x.grad.shape == x.shape
    b = torch.randn(shape[-1], device=device, requires_grad=True)
    y = FF.bias_gelu(x, b)
    y.sum().backward()
    assert y.shape == x.shape and torch.equal(b.grad, torch.zeros_like(b))


def test_scalar_input(backend, device):
    x = torch.tensor(0.7, device=device)
    torch.testing.assert_close(FF.gelu(x), F.gelu(x))
    assert FF.gelu(x).shape == ()


def test_bias_promotes_like_torch(backend, device):
    x = torch.randn(4, 9, device=device, dtype=torch.bfloat16)
    b = torch.randn(9, device=device, dtype=torch.float32, requires_grad=True)
    out = FF.bias_gelu(x, b)
    pt = F.gelu(x + b)
    assert out.dtype == pt.dtype == torch.float32
    assert_close(out, pt)
    out.sum().backward()
    assert b.grad.dtype == torch.float32


def test_fp64_stays_fp64(backend, device):
    x, _, dy = _inputs((3, 17), torch.float64, device)
    out, (dx,) = _grads(FF.gelu, [x], dy)
    pt, (pt_dx,) = _grads(F.gelu, [x], dy)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, pt, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(dx, pt_dx, atol=1e-12, rtol=1e-12)


def test_bad_inputs(backend, device):
    x = torch.randn(3, 4, device=device)
    with pytest.raises(RuntimeError, match="approximate"):
        FF.gelu(x, approximate="foo")
    with pytest.raises(RuntimeError, match="approximate"):
        FF.bias_gelu(x, torch.randn(4, device=device), approximate="foo")
    with pytest.raises(NotImplementedError):
        FF.gelu(torch.arange(4, device=device))
    # A bias that does not broadcast: torch's error on both paths.
    with pytest.raises(RuntimeError, match="size of tensor|broadcast"):
        FF.bias_gelu(x, torch.randn(5, device=device))
    with pytest.raises(RuntimeError, match="size of tensor|broadcast"):
        FF.bias_relu(x, torch.randn(5, device=device))
    # torch's API rejects these; both paths must too.
    with pytest.raises(TypeError, match="approximate"):
        FF.gelu(x, approximate=None)
    with pytest.raises(TypeError, match="input"):
        FF.gelu([1.0, 2.0])


@pytest.mark.parametrize("x_shape, b_shape", [((3, 4), (1, 4)), ((), (4,)), ((2, 3, 4), (1, 1, 4)),
                                              ((3, 4), (1,)), ((3, 1), (4,))])
def test_bias_ops_broadcast_like_torch(backend, device, x_shape, b_shape):
    # Any bias torch's `input + bias` broadcasts works on both paths with torch's result: a
    # per-column bias of another shape runs the kernel, the rest falls back to torch's ops.
    import warnings

    x = torch.randn(x_shape, device=device)
    b = torch.randn(b_shape, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for ours, theirs in ((FF.bias_gelu(x, b), torch.nn.functional.gelu(x + b)),
                             (FF.bias_relu(x, b), torch.relu(x + b))):
            assert ours.shape == theirs.shape
            torch.testing.assert_close(ours, theirs)



def test_dbias_deterministic_and_inputs_untouched(device):
    x, b, dy = _inputs((1151, 113), torch.float32, device, bias=True)
    x0, b0 = x.clone(), b.clone()
    with fasttx.use_backend("triton"):
        x.requires_grad_(True)
        b.requires_grad_(True)
        y = FF.bias_gelu(x, b)
        g1 = torch.autograd.grad(y, (x, b), dy, retain_graph=True)
        g2 = torch.autograd.grad(y, (x, b), dy)
    assert torch.equal(g1[0], g2[0]) and torch.equal(g1[1], g2[1])
    assert torch.equal(x.detach(), x0) and torch.equal(b.detach(), b0)


def test_torch_compile_fullgraph(device):
    x, b, dy = _inputs((7, 113), torch.float32, device, bias=True)

    def f(t, c):
        return FF.gelu(t, "tanh") * 2 + FF.bias_gelu(t, c) + FF.bias_relu(t, c)

    with fasttx.use_backend("triton"):
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        out, grads = _grads(compiled, [x, b], dy)
        eager, eager_grads = _grads(f, [x, b], dy)
    torch.testing.assert_close(out, eager)
    for a, e in zip(grads, eager_grads):
        torch.testing.assert_close(a, e)


_PROBE = r"""
import torch, torch.nn.functional as F
from fasttx.kernels import gelu as K
dev = "cuda" if torch.cuda.is_available() else "cpu"
S = 2**30 + 64  # row stride that fits int32, while row 2 starts at 2^31 + 128
big = torch.empty(2 * S + 4096, dtype=torch.float16, device=dev)  # untouched pages stay virtual on CPU
x = big.as_strided((3, 4096), (S, 1))
x.copy_(torch.randn(3, 4096, device=dev))
dy_big = torch.empty_like(big)
dy = dy_big.as_strided((3, 4096), (S, 1))
dy.copy_(torch.randn(3, 4096, device=dev))
b = torch.randn(4096, device=dev, dtype=torch.float16)
y = K.bias_act_forward(x, b, "gelu")
dx, db = K.bias_act_backward(dy, x, b, "gelu")
xr = (x.double() + b.double()).requires_grad_(True)
yr = F.gelu(xr)
dxr, = torch.autograd.grad(yr, xr, dy.double())
assert (y.double() - yr).abs().max() < 1e-2, "forward"
assert (dx.double() - dxr).abs().max() < 1e-2, "dx"
assert (db.double() - dxr.sum(0)).abs().max() < 3e-2, "dbias"
print("ok")
"""


def test_int64_row_offset_probe():
    """What this proves: rows whose offset (row * stride) passes 2^31 elements are addressed in
    int64 by both kernels (input x, dy reads), with a row stride that itself fits int32, so an
    int32 product would wrap. An int32 version of the kernels was seen to segfault here, hence
    the subprocess. What it does not prove: outputs or Philox indices past 2^31 (the outputs here
    are small and contiguous). Costs a 4 GiB virtual buffer of which only touched pages are real."""
    run_probe(_PROBE)


@pytest.mark.gpu
def test_gelu_more_than_2_31_elements():
    """The real thing on GPU: 2^31 + 1000 elements, so output offsets and tiles pass 2^31 too."""
    n = 2**31 + 1000
    x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    with fasttx.use_backend("triton"):
        y = FF.gelu(x)
    tail = slice(n - 70000, n)
    assert_close(y[tail], F.gelu(x[tail].float()))
    assert_close(y[:70000], F.gelu(x[:70000].float()))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_permuted_input_keeps_its_layout_like_torch(backend, device, approximate):
    # torch's elementwise ops return a permuted-but-dense input's layout (preserve_format);
    # a strided slice with gaps gives a contiguous output. Values and gradients unchanged.
    for x in (torch.randn(4, 6, 8, device=device).permute(2, 0, 1),
              torch.randn(4, 6, 8, device=device)[:, :, ::2]):
        ours = x.detach().clone().requires_grad_(False)
        xs = x.detach().requires_grad_(True)
        y = FF.gelu(xs, approximate)
        expected = F.gelu(x, approximate=approximate)
        assert y.stride() == expected.stride()
        assert_close(y, expected)
        dy = torch.randn_like(y)
        (dx,) = torch.autograd.grad(y, xs, dy)
        xt = ours.requires_grad_(True)
        (dx_t,) = torch.autograd.grad(F.gelu(xt, approximate=approximate), xt, dy)
        assert_close(dx, dx_t)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_of_infinities_is_the_limit_where_torch_gives_nan(device, approximate):
    # gelu(x) -> x as x -> +inf and -> 0 as x -> -inf, with gradients -> 1 and 0. torch's CPU
    # gelu gives NaN at +inf (erf form) and at -inf (both forms: -inf * 0); the Triton kernels give
    # the limits. Kept so, on purpose.
    import fasttx

    x = torch.tensor([float("inf"), -float("inf"), 1.0], device=device, requires_grad=True)
    with fasttx.use_backend("triton"):
        y = FF.gelu(x, approximate)
    y.sum().backward()
    assert y[0].item() == float("inf") and y[1].item() == 0.0
    assert x.grad[0].item() == 1.0 and x.grad[1].item() == 0.0


# ----------------------------------------------------------------------------------------------
# relu_squared: relu(x) ** 2 (its op-contract CASE for tests/test_op_contract.py, and its semantics)
# ----------------------------------------------------------------------------------------------
CONTRACT_CASES = {
    "relu_squared": Case(lambda t: (t(3, 8),), lambda t: (t(0, 8),),
                         bad=((lambda t: ([1.0],), TypeError),),
                         probe="tests/test_op_contract.py::test_int64_offset_probe_activations",
                         oracle=lambda x, upcast=None: R.relu(x, upcast) ** 2),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7,), (17, 113), (2, 3, 1151)])
def test_relu_squared_matches_oracle_and_torch(backend, device, dtype, shape):
    x, _, dy = _inputs(shape, dtype, device)
    x.view(-1)[:3] = torch.tensor([0.0, -0.0, -2.0])  # the kink and the zero side
    out, (dx,) = _grads(FF.relu_squared, [x], dy)
    ref = R.relu(x, upcast=torch.float64) ** 2
    ref_dx = 2 * R.relu(x, upcast=torch.float64) * dy.double()
    pt, (pt_dx,) = _grads(lambda t: torch.square(F.relu(t)), [x], dy)
    assert out.dtype == dtype and out.shape == x.shape
    assert_2x_rule(out, pt, ref, name="relu_squared")
    assert_2x_rule(dx, pt_dx, ref_dx, name="d relu_squared")


def test_relu_squared_integer_input_runs_torchs_path(backend, device):
    x = torch.arange(-3, 4, device=device)
    if backend == "triton":
        with pytest.warns(UserWarning, match="relu_squared: an input of dtype torch.int64"):
            y = FF.relu_squared(x)
    else:
        y = FF.relu_squared(x)
    assert torch.equal(y, torch.tensor([0, 0, 0, 0, 1, 4, 9], device=device))


def test_relu_squared_module(backend, device):
    x = torch.randn(4, 8, device=device)
    m = fasttx.nn.ReLUSquared()
    assert list(m.parameters()) == [] and not isinstance(m, torch.nn.ReLU)
    torch.testing.assert_close(m(x), torch.square(F.relu(x)), atol=1e-6, rtol=1e-6)
