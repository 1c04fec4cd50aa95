"""RMSNorm and the fused residual add + RMSNorm (with the Llama/Gemma casting orders), both backends.

Every case runs through fasttx.functional (the `backend` fixture picks the path) and is checked
against fasttx.reference in float64, forward and every gradient; the casting orders are also
checked against the model families' own formulas in 16-bit (the non-upcast reference, itself
checked against HuggingFace's modules when transformers is importable).
"""
import warnings

import pytest
import torch
import torch.nn.functional as F

import fasttx
import fasttx.functional as FF
from fasttx import reference as R

from utils import DTYPES, Case, assert_2x_rule, assert_close, noncontig

F64 = torch.float64
# Units in the last place allowed between our 16-bit output and the model's own formula run by
# torch, measured as eps * |y|: 1 (a different summation order may flip one rounding). The
# interpreter rounds fp32 -> bf16 as a GPU does (tests/_interpreter_bf16.py); when it truncated,
# this had to be 3 there.
MAX_ULP = 1


def _leaf(t):
    return t.detach().clone().requires_grad_(True) if t is not None else None


def _grads(*ts):
    return tuple(t.grad if t is not None else None for t in ts)


def _rms_case(x, ns, w, dy, eps=None):
    """((y, dx, dw) of FF.rms_norm, the same of the float64 reference)."""
    xs, ws = _leaf(x), _leaf(w)
    y = FF.rms_norm(xs, ns, ws, eps)
    y.backward(dy)
    xr, wr = _leaf(x), _leaf(w)
    # eps=None is the eps of the dtype torch computes in (fp32 for 16-bit): pass it explicitly,
    # since the fp64 oracle would otherwise take float64's
    e = torch.finfo(F64 if x.dtype == F64 else torch.float32).eps if eps is None else eps
    yr = R.rms_norm(xr, ns, wr, e, upcast=F64)
    yr.backward(dy.to(F64))
    return (y,) + _grads(xs, ws), (yr,) + _grads(xr, wr)


def _check(ours, ref, dtype, names):
    for name, o, r in zip(names, ours, ref):
        if r is None:
            assert o is None, name
            continue
        assert_close(o, r, dtype=dtype, msg=f"{name} ({dtype})")


# ----------------------------------------------------------------------------------------------
# rms_norm: shapes, dtypes
# ----------------------------------------------------------------------------------------------
SHAPES = [(1, 1), (7, 7), (1151, 7), (7, 1023), (2, 10000), (1, 65536)]  # 10000: chunked rows


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,hidden", SHAPES)
def test_rms_norm_matches_reference(backend, device, rows, hidden, dtype):
    torch.manual_seed(0)
    x = torch.randn(rows, hidden, device=device).to(dtype)
    w = (1 + 0.5 * torch.randn(hidden, device=device)).to(dtype)
    dy = torch.randn(rows, hidden, device=device).to(dtype)
    ours, ref = _rms_case(x, (hidden,), w, dy)
    assert ours[0].dtype == dtype and ours[1].dtype == dtype and ours[2].dtype == dtype
    if dtype == torch.float32:
        _check(ours, ref, dtype, ("y", "dx", "dweight"))
    else:
        # dweight sums `rows` products rounded to 16 bits: the 2x rule against torch's own
        _check(ours[:2], ref[:2], dtype, ("y", "dx"))
        xt, wt = _leaf(x), _leaf(w)
        F.rms_norm(xt, (hidden,), wt).backward(dy)
        assert_2x_rule(ours[2], wt.grad, ref[2], name="dweight")


@pytest.mark.parametrize(
    "shape,ns",
    [((5,), (5,)), ((3, 5, 17), (17,)), ((2, 3, 4, 5), (4, 5)), ((2, 3, 4, 5), torch.Size([2, 3, 4, 5]))],
)
def test_rms_norm_leading_dims_and_no_weight(backend, device, shape, ns):
    torch.manual_seed(1)
    x, dy = torch.randn(shape, device=device), torch.randn(shape, device=device)
    for w in (torch.randn(tuple(ns), device=device), None):
        ours, ref = _rms_case(x, ns, w, dy, eps=1e-6)
        _check(ours, ref, torch.float32, ("y", "dx", "dweight"))


def test_rms_norm_float64_and_fp32_weight(backend, device):
    torch.manual_seed(2)
    x, w, dy = (torch.randn(7, 100, device=device, dtype=F64) for _ in range(3))
    ours, ref = _rms_case(x, (100,), w[0], dy)
    for o, r in zip(ours, ref):
        assert o.dtype == F64
        torch.testing.assert_close(o, r, atol=1e-12, rtol=1e-12)
    # a float32 weight with a bf16 input: output in the input's dtype, as torch's
    xb = x.bfloat16()
    ours, ref = _rms_case(xb, (100,), w[0].float(), dy.bfloat16())
    assert ours[0].dtype == torch.bfloat16 and ours[2].dtype == torch.float32
    _check(ours[:2], ref[:2], torch.bfloat16, ("y", "dx"))


def test_rms_norm_default_eps_is_float32s(backend, device):
    # torch's eps=None is finfo(float32).eps for a bf16 input (not bf16's 2^-7): tiny rows show it
    x = torch.full((2, 8), 1e-3, device=device).bfloat16()
    assert_close(FF.rms_norm(x, (8,)), F.rms_norm(x, (8,)))
    y = FF.rms_norm(x, (8,)).float()  # 1e-3 / sqrt(1e-6 + 1.19e-7) = 0.945; bf16's eps would give 0.011
    assert 0.94 < y.min() and y.max() < 0.95


def test_rms_norm_noncontiguous(backend, device):
    torch.manual_seed(3)
    x, dy = torch.randn(3, 5, 48, device=device), torch.randn(3, 5, 48, device=device)
    w = torch.randn(48, device=device)
    for xx, gg, ww in ((noncontig(x), noncontig(dy), w), (x.transpose(0, 1), dy.transpose(0, 1), noncontig(w)),
                       (torch.randn(7, 100, device=device)[:, :48], noncontig(torch.randn(7, 48, device=device)), w)):
        ours, ref = _rms_case(xx, (48,), ww, gg)
        _check(ours, ref, torch.float32, ("y", "dx", "dweight"))


@pytest.mark.parametrize("shape,ns", [((0, 8), (8,)), ((2, 0, 8), (8,)), ((3, 0), (0,))])
def test_rms_norm_zero_size(backend, device, shape, ns):
    x = torch.randn(shape, device=device, requires_grad=True)
    w = torch.randn(ns, device=device, requires_grad=True)
    y = FF.rms_norm(x, ns, w)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))


def test_rms_norm_nan_propagates_to_its_row_only(backend, device):
    torch.manual_seed(4)
    x, w, dy = torch.randn(4, 19, device=device), torch.randn(19, device=device), torch.randn(4, 19, device=device)
    x[1, 3] = float("nan")
    (y, dx, dw), _ = _rms_case(x, (19,), w, dy)
    xt, wt = _leaf(x), _leaf(w)
    yt = F.rms_norm(xt, (19,), wt)
    yt.backward(dy)
    assert torch.isnan(y[1]).all() and torch.isnan(dx[1]).all()
    assert not torch.isnan(y[[0, 2, 3]]).any() and not torch.isnan(dx[[0, 2, 3]]).any()
    for o, t, name in ((y, yt, "y"), (dx, xt.grad, "dx"), (dw, wt.grad, "dw")):
        assert_close(o, t, msg=name)


def test_rms_norm_bad_inputs(backend, device):
    # torch's exception types (and, for shapes, its messages) on both paths
    x = torch.randn(3, 4, device=device)
    with pytest.raises(RuntimeError, match=r"expected input with shape \[\*5\]"):
        FF.rms_norm(x, (5,))
    with pytest.raises(RuntimeError, match="Expected weight to be of same shape as normalized_shape"):
        FF.rms_norm(x, (4,), torch.randn(5, device=device))
    with pytest.raises(RuntimeError, match="normalized_shape to be at least 1-dimensional"):
        FF.rms_norm(x, ())
    with pytest.raises(NotImplementedError, match="\"rms_norm\" not implemented for 'Int'"):
        FF.rms_norm(x.int(), (4,))
    with pytest.raises(TypeError, match="must be tuple of ints, not int"):
        FF.rms_norm(x, 4)
    with pytest.raises(ValueError, match="cast must be one of"):
        FF.add_rms_norm(x, x, (4,), cast="mistral")
    with pytest.raises(RuntimeError, match="expected residual of the input's shape"):
        FF.add_rms_norm(x, x[:1], (4,))


def test_rms_norm_past_kernel_limit_falls_back_with_one_warning(device):
    pytest.importorskip("triton")
    from fasttx.kernels import layer_norm as K

    x = torch.randn(1, K.MAX_HIDDEN + 3, device=device)
    with fasttx.use_backend("triton"), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        y = FF.rms_norm(x, (x.shape[-1],))
        y2 = FF.rms_norm(x, (x.shape[-1],))
    ours = [w for w in seen if "fasttx rms_norm" in str(w.message)]
    assert len(ours) == 1 and "running torch's implementation instead" in str(ours[0].message)
    assert torch.equal(y, F.rms_norm(x, (x.shape[-1],))) and torch.equal(y, y2)


def test_rms_norm_backward_is_deterministic(device):
    pytest.importorskip("triton")
    torch.manual_seed(5)
    x, w, dy = torch.randn(1151, 7, device=device), torch.randn(7, device=device), torch.randn(1151, 7, device=device)
    with fasttx.use_backend("triton"):
        a, b = (_rms_case(x, (7,), w, dy)[0] for _ in range(2))
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_rms_norm_int64_row_offsets(device):
    # A (3, 64) view with a row stride of 2^30 + 64 elements over an untouched 4 GiB buffer: row 2
    # starts past element 2^31, so the forward and backward must form row * stride in int64.
    K = pytest.importorskip("fasttx.kernels.layer_norm")
    N, stride = 64, 2**30 + 64
    try:
        buf = torch.empty(2 * stride + N, dtype=torch.float16, device=device)
    except (RuntimeError, MemoryError) as e:
        pytest.skip(f"cannot reserve a 4 GiB buffer here: {e}")
    x = buf.as_strided((3, N), (stride, 1))
    torch.manual_seed(10)
    x.copy_(torch.randn(3, N))
    w = torch.randn(N, device=device, dtype=torch.float16)
    y, _, rstd = K.rms_norm_forward(x, N, w, 1e-6)
    assert_close(y, R.rms_norm(x, (N,), w, 1e-6, upcast=F64))
    dy = torch.randn(3, N, device=device, dtype=torch.float16)
    dx, _, _ = K.rms_norm_backward(dy, x, N, w, rstd)
    xr = _leaf(x.to(F64))
    R.rms_norm(xr, (N,), w.to(F64), 1e-6).backward(dy.to(F64))
    assert_close(dx, xr.grad)


# ----------------------------------------------------------------------------------------------
# add_rms_norm and the casting orders
# ----------------------------------------------------------------------------------------------
def _add_case(x, res, ns, w, dy, dh, cast, eps=1e-6, upcast=None, fn=None):
    """(y, h, d_input, d_residual, dweight) of FF.add_rms_norm (or of R.add_rms_norm with upcast)."""
    xs, rs, ws = _leaf(x), _leaf(res), _leaf(w)
    if fn is None:
        y, h = FF.add_rms_norm(xs, rs, ns, ws, eps, cast=cast)
    else:
        y, h = fn(xs, rs, ns, ws, eps, cast, upcast)
    outs, grads = [y], [dy.to(y.dtype)]
    if res is not None:
        outs.append(h)
        grads.append(dh.to(h.dtype))
    torch.autograd.backward(outs, grads)
    return (y, h) + _grads(xs, rs, ws)


def _same_h(h, expected):
    """h = input + residual as torch's add gives it: bit-identical (the interpreter rounds the fp32
    sum to 16 bits as a GPU does, tests/_interpreter_bf16.py)."""
    assert torch.equal(h, expected)


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
@pytest.mark.parametrize("cast", ["torch", "llama", "gemma"])
@pytest.mark.parametrize("dtype,rows,hidden", [(torch.float32, 7, 129), (torch.bfloat16, 5, 300),
                                              (torch.float16, 3, 10000)])
def test_add_rms_norm_matches_reference(backend, device, cast, residual, dtype, rows, hidden):
    torch.manual_seed(6)
    x = torch.randn(rows, hidden, device=device).to(dtype)
    res = torch.randn(rows, hidden, device=device).to(dtype) if residual else None
    w = (0.5 * torch.randn(hidden, device=device)).to(dtype)
    dy, dh = torch.randn(rows, hidden, device=device), torch.randn(rows, hidden, device=device)
    ours = _add_case(x, res, (hidden,), w, dy, dh, cast)
    assert ours[0].dtype == dtype and ours[1].dtype == dtype
    # the oracle: h rounded as the model's add rounds it, then float64 math
    h = x if res is None else x + res
    ref = _add_case(h, None, (hidden,), w, dy, dh, cast, upcast=F64, fn=R.add_rms_norm)
    if residual:
        _same_h(ours[1], h)
        # d_input = d_residual = the gradient of h: the norm's plus dh
        dref = ref[2] + dh.to(F64)
        _check(ours[:1] + ours[2:4], (ref[0], dref, dref), dtype, ("y", "d_input", "d_residual"))
    else:
        assert ours[1] is not None and ours[3] is None
        _check(ours[:1] + ours[2:3], ref[:1] + ref[2:3], dtype, ("y", "d_input"))
    # dweight: a sum over rows of rounded products; the 2x rule against the model's own formula
    # run by torch in the same dtype (the non-upcast reference)
    low = _add_case(h, None, (hidden,), w, dy, dh, cast, fn=R.add_rms_norm)
    if dtype == torch.float32:
        _check(ours[4:], ref[4:], dtype, ("dweight",))
    else:
        assert_2x_rule(ours[4], low[4], ref[4], name="dweight")


@pytest.mark.parametrize("cast", ["torch", "llama", "gemma"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_casting_orders_match_the_models_formula_in_16bit(backend, device, cast, dtype):
    # The point of the casting orders: a patched model gives its own module's 16-bit output, not
    # merely something close to the fp64 value. Our output vs the model's formula run by torch in
    # the same dtype: within one unit in the last place (the roundings are torch's, on a GPU and
    # under the interpreter alike).
    torch.manual_seed(7)
    x = (3 * torch.randn(64, 999, device=device)).to(dtype)
    res = torch.randn(64, 999, device=device).to(dtype)
    w = (1 + torch.randn(999, device=device)).to(dtype)
    y, h = FF.add_rms_norm(x, res, (999,), w, 1e-6, cast=cast)
    yr, hr = R.add_rms_norm(x, res, (999,), w, 1e-6, cast=cast)
    _same_h(h, hr)
    assert y.dtype == yr.dtype
    ulp = torch.finfo(dtype).eps * yr.float().abs().clamp_min(torch.finfo(dtype).tiny)
    err = ((y.float() - yr.float()).abs() / ulp).max().item()
    assert err <= MAX_ULP, f"{cast} {dtype}: {err} ulp from the model's formula"
    # and the other orders are really different in 16-bit (so the test can tell them apart)
    other = R.add_rms_norm(x, res, (999,), w, 1e-6, cast="llama" if cast != "llama" else "torch")[0]
    if cast != "gemma":
        assert (other.float() - yr.float()).abs().max() > 0


@pytest.mark.parametrize("cast", ["torch", "llama"])
def test_add_rms_norm_long_rows_normalize_the_stored_h(device, cast):
    # Chunked rows in 16 bits: h = x + residual is rounded to its dtype, stored, and normalized as
    # rounded (ROUND_H), so the second pass reads the stored h back instead of x and the residual:
    # y is bit-identical to RMSNorm of the returned h.
    pytest.importorskip("triton")
    from fasttx.kernels.layer_norm import rms_norm_forward

    torch.manual_seed(13)
    x, r = (torch.randn(5, 9000, device=device).to(torch.float16) for _ in range(2))
    w = (1 + 0.5 * torch.randn(9000, device=device)).to(torch.float16)
    y, h, rstd = rms_norm_forward(x, 9000, w, 1e-6, residual=r, cast=cast)
    y1, _, rstd1 = rms_norm_forward(h, 9000, w, 1e-6, cast=cast)
    assert torch.equal(h, (x.float() + r.float()).half())
    assert torch.equal(y, y1) and torch.equal(rstd, rstd1)


def test_add_rms_norm_gradient_through_h_alone(backend, device):
    # only the new residual stream is used: d_input = d_residual = dh, dweight = 0
    x, res, w = (torch.randn(3, 16, device=device, requires_grad=True) for _ in range(3))
    dh = torch.randn(3, 16, device=device)
    _, h = FF.add_rms_norm(x, res, 16, w[0])
    h.backward(dh)
    assert torch.equal(x.grad, dh) and torch.equal(res.grad, dh)


def test_llama_order_promotes_with_an_fp32_weight(backend, device):
    # HF Llama: weight (fp32) * hidden.to(bf16) -> fp32 output; torch's and Gemma's: the input's
    x = torch.randn(4, 32, device=device).bfloat16()
    w = torch.randn(32, device=device)
    assert FF.add_rms_norm(x, None, (32,), w, cast="llama")[0].dtype == torch.float32
    assert FF.add_rms_norm(x, None, (32,), w, cast="gemma")[0].dtype == torch.bfloat16
    assert FF.add_rms_norm(x, None, (32,), w, cast="torch")[0].dtype == torch.bfloat16
    assert_close(FF.add_rms_norm(x, None, (32,), w, cast="llama")[0],
                 R.rms_norm(x, (32,), w, cast="llama"), dtype=torch.bfloat16)


def test_reference_orders_are_huggingfaces():
    # the oracle's casting orders are the HuggingFace modules', bit for bit (both torch code)
    modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    modeling_gemma = pytest.importorskip("transformers.models.gemma.modeling_gemma")
    torch.manual_seed(8)
    x = (3 * torch.randn(8, 64)).bfloat16()
    llama = modeling_llama.LlamaRMSNorm(64, eps=1e-6).bfloat16()
    gemma = modeling_gemma.GemmaRMSNorm(64, eps=1e-6).bfloat16()
    with torch.no_grad():
        llama.weight.normal_()
        gemma.weight.normal_()
    assert torch.equal(llama(x), R.rms_norm(x, (64,), llama.weight, 1e-6, cast="llama"))
    assert torch.equal(gemma(x), R.rms_norm(x, (64,), gemma.weight, 1e-6, cast="gemma"))


# ----------------------------------------------------------------------------------------------
# nn.RMSNorm, convert, torch.compile
# ----------------------------------------------------------------------------------------------
def test_nn_rmsnorm_is_drop_in(backend, device):
    import fasttx.nn as nn

    for args, kw in (((16,), {}), (([4, 16],), {"eps": 1e-5}), ((16,), {"elementwise_affine": False})):
        ours, theirs = nn.RMSNorm(*args, **kw, device=device), torch.nn.RMSNorm(*args, **kw, device=device)
        assert isinstance(ours, torch.nn.RMSNorm) and repr(ours) == repr(theirs)
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        ours.load_state_dict(theirs.state_dict(), strict=True)
        x = torch.randn(3, 4, 16, device=device)
        assert_close(ours(x), theirs(x))
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.RMSNorm(16))
    fasttx.convert(model)
    assert type(model[1]) is nn.RMSNorm


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_compile_fullgraph(backend, device):
    torch._dynamo.reset()
    torch.manual_seed(9)
    x, res, dy = (torch.randn(5, 32, device=device) for _ in range(3))
    w = torch.randn(32, device=device)
    fn = torch.compile(lambda x, r, w: FF.add_rms_norm(x, r, (32,), w, cast="gemma")[0] + FF.rms_norm(x, [32], w),
                       fullgraph=True, backend="aot_eager")
    xs, rs, ws = _leaf(x), _leaf(res), _leaf(w)
    fn(xs, rs, ws).backward(dy)
    xr, rr, wr = _leaf(x), _leaf(res), _leaf(w)
    yr = R.add_rms_norm(xr, rr, (32,), wr, cast="gemma", upcast=F64)[0] + R.rms_norm(xr, (32,), wr, upcast=F64)
    yr.backward(dy.to(F64))
    for o, r in zip(_grads(xs, rs, ws), _grads(xr, rr, wr)):
        assert_close(o, r)


# ----------------------------------------------------------------------------------------------
# offset_rms_norm: x / rms(x) * (1 + weight) (its op-contract CASE, and its semantics)
# ----------------------------------------------------------------------------------------------
CONTRACT_CASES = {
    "offset_rms_norm": Case(
        lambda t: (t(3, 8), (8,), t(8)), lambda t: (t(0, 8), (8,), t(8)),
        bad=((lambda t: (t(3, 8), 8), TypeError), (lambda t: (t(3, 8), (5,)), RuntimeError),
             (lambda t: (torch.arange(6).reshape(2, 3), (3,)), NotImplementedError)),
        probe="tests/test_op_contract.py::test_int64_offset_probe_norms",
        oracle=lambda x, shape, w=None, eps=None, upcast=None: R.rms_norm(x, shape, w, eps, cast="gemma",
                                                                          upcast=upcast)),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 17), (2, 3, 1151)])
def test_offset_rms_norm_matches_gemma_formula(backend, device, dtype, shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype).requires_grad_()
    w = (0.1 * torch.randn(shape[-1], generator=g)).to(device=device, dtype=dtype).requires_grad_()
    dy = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    out = FF.offset_rms_norm(x, [shape[-1]], w, 1e-6)
    dx, dw = torch.autograd.grad(out, (x, w), dy)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = R.rms_norm(xr, [shape[-1]], wr, 1e-6, cast="gemma")
    rdx, rdw = torch.autograd.grad(ref, (xr, wr), dy.double())
    xp, wp = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    pt = (xp.float() * torch.rsqrt(xp.float().pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + wp.float())).to(dtype)
    pdx, pdw = torch.autograd.grad(pt, (xp, wp), dy)  # HF GemmaRMSNorm's formula in torch ops
    assert out.dtype == dtype
    assert_2x_rule(out, pt, ref, name="offset_rms_norm")
    assert_2x_rule(dx, pdx, rdx, mult=3.0, name="dx")
    assert_2x_rule(dw, pdw, rdw, mult=3.0, atol=1e-3 if dtype == torch.float32 else None, name="dw")


def test_offset_rms_norm_module(backend, device):
    m = fasttx.nn.OffsetRMSNorm(8, eps=1e-6).to(device)
    assert torch.equal(m.weight.detach(), torch.zeros(8, device=device)) and list(m.state_dict()) == ["weight"]
    assert not isinstance(m, torch.nn.RMSNorm)
    x = torch.randn(3, 8, device=device)
    # a zero offset is plain RMSNorm
    torch.testing.assert_close(m(x), F.rms_norm(x, [8], None, 1e-6), atol=1e-5, rtol=1e-5)
    assert fasttx.nn.OffsetRMSNorm(8, elementwise_affine=False).weight is None
