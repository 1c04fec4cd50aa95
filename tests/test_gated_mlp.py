"""Gated MLP activations: swiglu = silu(gate) * up and geglu = gelu(gate) * up (erf and tanh), for
separate gate/up tensors and the concatenated (gate|up) layout, on both backends, forward and both
gradients against the float64 oracle."""
import pytest
import torch
import torch.nn.functional as F

import fasttx.functional as FF
from fasttx import reference as R

from utils import DTYPES, assert_close, noncontig

F64 = torch.float64
# (public function, its kwargs, the oracle's activation name)
ACTS = {
    "swiglu": (FF.swiglu, {}, "silu"),
    "geglu": (FF.geglu, {}, "gelu"),
    "geglu_tanh": (FF.geglu, {"approximate": "tanh"}, "gelu_tanh"),
}


def _leaf(t):
    return t.detach().clone().requires_grad_(True) if t is not None else None


def _case(act, gate, up, dy):
    """(y, dgate, dup) of ours and of the float64 oracle."""
    fn, kw, name = ACTS[act]
    gs, us = _leaf(gate), _leaf(up)
    y = fn(gs, us, **kw)
    y.backward(dy)
    gr, ur = _leaf(gate), _leaf(up)
    yr = R.gated(gr, ur, name, upcast=F64)
    yr.backward(dy.to(F64))
    grads = lambda g, u: (g.grad, u.grad if u is not None else None)  # noqa: E731
    return (y,) + grads(gs, us), (yr,) + grads(gr, ur)


def _check(ours, ref, dtype):
    for name, o, r in zip(("y", "dgate", "dup"), ours, ref):
        if r is None:
            assert o is None
            continue
        assert o.dtype == dtype and o.shape == r.shape, name
        assert_close(o, r, dtype=dtype, msg=f"{name} ({dtype})")


@pytest.mark.parametrize("layout", ["separate", "concat"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("shape", [(1,), (1151, 7), (3, 1023), (2, 3, 113)])
def test_gated_matches_reference(backend, device, act, dtype, layout, shape):
    torch.manual_seed(0)
    gate = (2 * torch.randn(shape, device=device)).to(dtype)
    up = torch.randn(shape, device=device).to(dtype)
    dy = torch.randn(shape, device=device).to(dtype)
    if layout == "concat":
        gate, up = torch.cat([gate, up], dim=-1), None
    _check(*_case(act, gate, up, dy), dtype)


def test_gated_float64(backend, device):
    torch.manual_seed(1)
    g, u, dy = (torch.randn(7, 33, device=device, dtype=F64) for _ in range(3))
    for act in ACTS:
        ours, ref = _case(act, g, u, dy)
        for o, r in zip(ours, ref):
            assert o.dtype == F64
            torch.testing.assert_close(o, r, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("act", ["swiglu", "geglu"])
def test_gated_noncontiguous(backend, device, act):
    torch.manual_seed(2)
    g, u, dy = (torch.randn(4, 6, 40, device=device) for _ in range(3))
    # strided columns (a copy), permuted leading dims, strided rows; non-contiguous dy
    for gg, uu, dd in ((noncontig(g), u.transpose(0, 1).contiguous().transpose(0, 1), noncontig(dy)),
                       (g.transpose(0, 1), u.transpose(0, 1), dy.transpose(0, 1))):
        _check(*_case(act, gg, uu, dd), torch.float32)
    # the concatenated layout as a slice of a wider projection output: rows at stride 100
    wide = torch.randn(24, 100, device=device)
    _check(*_case(act, wide[:, :80], None, torch.randn(24, 40, device=device)), torch.float32)
    _check(*_case(act, torch.cat([g, u], -1).transpose(0, 1), None, noncontig(dy.transpose(0, 1))),
           torch.float32)


@pytest.mark.parametrize("layout", ["separate", "concat"])
def test_gated_zero_size(backend, device, layout):
    g = torch.randn(0, 8, device=device, requires_grad=True)
    u = torch.randn(0, 8, device=device, requires_grad=True) if layout == "separate" else None
    for act in ACTS:
        fn, kw, _ = ACTS[act]
        y = fn(g, u, **kw)
        assert y.shape == ((0, 8) if u is not None else (0, 4))
        y.sum().backward()
        assert g.grad.shape == g.shape


def test_gated_nan_and_extremes(backend, device):
    g = torch.tensor([[-100.0, -88.0, -20.0, 0.0, 20.0, 100.0, float("nan"), 1.0]], device=device)
    u = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, float("nan")]], device=device)
    dy = torch.ones_like(g)
    for act in ACTS:
        fn, kw, name = ACTS[act]
        gs, us = _leaf(g), _leaf(u)
        fn(gs, us, **kw).backward(dy)
        gt, ut = _leaf(g), _leaf(u)
        torch_act = F.silu if name == "silu" else (lambda x: F.gelu(x, approximate=kw.get("approximate", "none")))
        yt = torch_act(gt) * ut
        yt.backward(dy)
        assert_close(fn(g, u, **kw), yt, msg=act)
        assert_close(gs.grad, gt.grad, msg=act)
        assert_close(us.grad, ut.grad, msg=act)
        # NaN exactly where torch has it (the NaN gate's and the NaN up's elements)
        assert torch.equal(torch.isnan(fn(g, u, **kw)), torch.isnan(yt))


def test_gated_bad_inputs(backend, device):
    g = torch.randn(3, 8, device=device)
    with pytest.raises(RuntimeError, match="same shape"):
        FF.swiglu(g, torch.randn(3, 7, device=device))
    with pytest.raises(RuntimeError, match="same dtype"):
        FF.swiglu(g, g.double())
    with pytest.raises(RuntimeError, match="must be even"):
        FF.geglu(torch.randn(3, 7, device=device))
    with pytest.raises(RuntimeError, match="must be even"):
        FF.swiglu(torch.tensor(1.0, device=device))
    with pytest.raises(NotImplementedError, match="floating-point"):
        FF.swiglu(g.int(), g.int())
    with pytest.raises(RuntimeError, match="approximate argument must be either none or tanh"):
        FF.geglu(g, g, approximate="exact")


def test_gated_int64_row_offsets(device):
    # A (3, 64) gate view with a row stride of 2^30 + 64 elements (row 2 starts past element
    # 2^31) over an untouched 4 GiB buffer: forward and backward form row * stride in int64.
    K = pytest.importorskip("fasttx.kernels.gelu")
    N, stride = 64, 2**30 + 64
    try:
        buf = torch.empty(2 * stride + 2 * N, dtype=torch.float16, device=device)
    except (RuntimeError, MemoryError) as e:
        pytest.skip(f"cannot reserve a 4 GiB buffer here: {e}")
    both = buf.as_strided((3, 2 * N), (stride, 1))  # the concatenated layout: (gate|up) rows
    torch.manual_seed(3)
    both.copy_(torch.randn(3, 2 * N))
    y = K.gated_act_forward(both, None, "silu")
    assert_close(y, R.gated(both, None, "silu", upcast=F64))
    dy = torch.randn(3, N, device=device, dtype=torch.float16)
    dboth, _ = K.gated_act_backward(dy, both, None, "silu")
    br = _leaf(both.to(F64))
    R.gated(br, None, "silu").backward(dy.to(F64))
    assert_close(dboth, br.grad)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_compile_fullgraph(backend, device):
    torch._dynamo.reset()
    torch.manual_seed(4)
    g, u, dy = (torch.randn(5, 16, device=device) for _ in range(3))
    fn = torch.compile(lambda g, u: FF.swiglu(g, u) + FF.geglu(torch.cat([g, u], -1), approximate="tanh"),
                       fullgraph=True, backend="aot_eager")
    gs, us = _leaf(g), _leaf(u)
    fn(gs, us).backward(dy)
    gr, ur = _leaf(g), _leaf(u)
    (R.gated(gr, ur, "silu", upcast=F64) + R.gated(torch.cat([gr, ur], -1), None, "gelu_tanh", upcast=F64)).backward(dy.to(F64))
    assert_close(gs.grad, gr.grad)
    assert_close(us.grad, ur.grad)
