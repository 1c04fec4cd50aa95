"""Rotary position embedding of q and k (FF.apply_rotary_emb) on both backends: forward and both
gradients against the float64 oracle, HF's Llama and GPT-J formulas, both layouts, partial rotary,
GQA, position ids, strided views."""
import warnings

import pytest
import torch

import fasttx
import fasttx.functional as FF
from fasttx import reference as R

from utils import DTYPES, assert_close

F64 = torch.float64


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _tables(B, L, R, device, dtype=torch.float32, base=10000.0, scale=1.0):
    """HF Llama-style (B, L, R) cos/sin: each frequency twice (cat(freqs, freqs))."""
    inv = 1.0 / base ** (torch.arange(0, R, 2, device=device).float() / R)
    pos = torch.arange(L, device=device).float()[None, :].expand(B, L) + torch.arange(B, device=device)[:, None]
    freqs = pos[..., None] * inv / scale  # (B, L, R/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _case(q, k, cos, sin, dq, dk, **kw):
    """((q_out, k_out, dq_in, dk_in) of FF.apply_rotary_emb, the same of the float64 oracle)."""
    qs, ks = _leaf(q), _leaf(k)
    qo, ko = FF.apply_rotary_emb(qs, ks, cos, sin, **kw)
    torch.autograd.backward([qo, ko], [dq, dk])
    seq_dim = kw.get("seq_dim", -2)
    c, s = cos, sin
    if kw.get("position_ids") is not None:
        ids = kw["position_ids"]
        c, s = cos[ids], sin[ids]
    if c.dim() == 2:
        c, s = c[None], s[None]
    c, s = c.unsqueeze(1 if seq_dim == -2 else 2), s.unsqueeze(1 if seq_dim == -2 else 2)
    qr, kr = _leaf(q), _leaf(k)
    qro = R.rotary(qr, c, s, kw.get("interleaved", False), upcast=F64)
    kro = R.rotary(kr, c, s, kw.get("interleaved", False), upcast=F64)
    torch.autograd.backward([qro, kro], [dq.to(F64), dk.to(F64)])
    return (qo, ko, qs.grad, ks.grad), (qro, kro, qr.grad, kr.grad)


def _check(ours, ref, dtype):
    for name, o, r in zip(("q", "k", "dq", "dk"), ours, ref):
        assert o.dtype == dtype and o.shape == r.shape, name
        assert_close(o, r, dtype=dtype, msg=f"{name} ({dtype})")


def _qk(B, Hq, Hk, L, D, dtype, device, seq_dim=-2):
    shape = (lambda H: (B, H, L, D)) if seq_dim == -2 else (lambda H: (B, L, H, D))
    return [torch.randn(shape(H), device=device).to(dtype) for H in (Hq, Hk, Hq, Hk)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seq_dim", [-2, -3], ids=["BHLD", "BLHD"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("Hq,Hk,D,R_", [(4, 2, 16, 16), (3, 1, 10, 6), (1, 1, 2, 2)])  # GQA, partial
def test_rotary_matches_reference(backend, device, dtype, seq_dim, interleaved, Hq, Hk, D, R_):
    torch.manual_seed(0)
    B, L = 2, 7
    q, k, dq, dk = _qk(B, Hq, Hk, L, D, dtype, device, seq_dim)
    cos, sin = _tables(B, L, R_, device)
    ours, ref = _case(q, k, cos, sin, dq, dk, interleaved=interleaved, seq_dim=seq_dim)
    _check(ours, ref, dtype)
    if R_ < D:  # the pass-through columns are copied exactly
        assert torch.equal(ours[0][..., R_:], q[..., R_:]) and torch.equal(ours[2][..., R_:], dq[..., R_:])


def test_rotary_is_huggingfaces_llama_and_gptj(backend, device):
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    gptj = pytest.importorskip("transformers.models.gptj.modeling_gptj")
    torch.manual_seed(1)
    B, H, L, D = 2, 3, 6, 8
    q, k = torch.randn(B, H, L, D, device=device), torch.randn(B, 1, L, D, device=device)
    cos, sin = _tables(B, L, D, device)
    ours = FF.apply_rotary_emb(q, k, cos, sin)
    theirs = llama.apply_rotary_pos_emb(q, k, cos, sin)  # cos/sin (B, L, D), unsqueezed at dim 1
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t, atol=1e-6, rtol=1e-6)
    # (B, L, H, D) with unsqueeze_dim=2
    ours = FF.apply_rotary_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin, seq_dim=-3)
    theirs = llama.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin, unsqueeze_dim=2)
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t, atol=1e-6, rtol=1e-6)
    # GPT-J: (B, L, H, R) and half-width sin/cos repeat-interleaved: our interleaved layout
    x = torch.randn(B, L, H, D, device=device)
    sincos = gptj.create_sinusoidal_positions(L, D).to(device)[None].expand(B, L, D)
    s_half, c_half = torch.split(sincos, D // 2, dim=-1)
    theirs = gptj.apply_rotary_pos_emb(x, s_half, c_half)
    c, s = c_half.repeat_interleave(2, -1), s_half.repeat_interleave(2, -1)
    ours = FF.apply_rotary_emb(x, x, c, s, interleaved=True, seq_dim=-3)[0]
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("ids_shape", ["L", "BL"])
def test_rotary_position_ids_select_table_rows(backend, device, ids_shape):
    torch.manual_seed(2)
    B, L, D, P = 2, 5, 8, 40
    q, k, dq, dk = _qk(B, 2, 2, L, D, torch.float32, device)
    cos, sin = _tables(1, P, D, device, scale=4.0)  # linear scaling: only the table changes
    cos, sin = cos[0], sin[0]  # (P, R)
    ids = torch.randint(0, P, (L,) if ids_shape == "L" else (B, L), device=device)
    ours, ref = _case(q, k, cos, sin, dq, dk, position_ids=ids)
    _check(ours, ref, torch.float32)
    with pytest.raises(IndexError):
        FF.apply_rotary_emb(q, k, cos, sin, position_ids=torch.full((L,), P, device=device))


def test_rotary_float64(backend, device):
    torch.manual_seed(8)
    q, k, dq, dk = (t.double() for t in _qk(2, 3, 1, 5, 10, torch.float32, device))
    cos, sin = (t.double() for t in _tables(2, 5, 6, device))
    ours, ref = _case(q, k, cos, sin, dq, dk, interleaved=True)
    for o, r in zip(ours, ref):
        assert o.dtype == F64
        torch.testing.assert_close(o, r, atol=1e-12, rtol=1e-12)


def test_rotary_table_broadcast_shapes(backend, device):
    torch.manual_seed(3)
    q, k, dq, dk = _qk(3, 2, 2, 4, 8, torch.float32, device)
    cos, sin = _tables(1, 4, 8, device)
    for c, s in ((cos, sin), (cos[0], sin[0]), (cos.double(), sin.double())):
        ours, ref = _case(q, k, c, s, dq, dk)
        _check(ours, ref, torch.float32)


def test_rotary_strided_views_without_copies(backend, device):
    torch.manual_seed(4)
    B, L, H, D = 2, 5, 3, 8
    qkv = torch.randn(B, L, 3, H, D, device=device)  # a fused qkv projection, (B, L, H, D) views
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    cos, sin = _tables(B, L, D, device)
    dq = torch.randn(B, H, L, D, device=device).transpose(1, 2)  # non-contiguous gradients
    dk = torch.randn(B, L, H, 2 * D, device=device)[..., ::2]
    ours, ref = _case(q, k, cos, sin, dq, dk, seq_dim=-3)
    _check(ours, ref, torch.float32)
    # a dense (B, L, H, D) input keeps its layout in the output, as torch's elementwise ops do
    x = torch.randn(B, H, L, D, device=device).transpose(1, 2)
    out = FF.apply_rotary_emb(x, x, cos, sin, seq_dim=-3)[0]
    assert out.stride() == x.stride()


def test_rotary_nan_stays_in_its_pair(backend, device):
    q = torch.randn(1, 1, 3, 8, device=device)
    q[0, 0, 1, 2] = float("nan")
    cos, sin = _tables(1, 3, 8, device)
    out = FF.apply_rotary_emb(q, q, cos, sin)[0]
    nan = torch.isnan(out)
    assert nan[0, 0, 1, 2] and nan[0, 0, 1, 6] and nan.sum() == 2  # element 2 pairs with 2 + 4
    ref = R.rotary(q, cos[:, None], sin[:, None])
    assert torch.equal(nan, torch.isnan(ref))


def test_rotary_zero_size(backend, device):
    cos, sin = _tables(2, 0, 8, device)
    for L, B in ((0, 2), (4, 0)):
        q = torch.randn(B, 2, L, 8, device=device, requires_grad=True)
        c, s = _tables(max(B, 1), L, 8, device)
        qo, ko = FF.apply_rotary_emb(q, q, c if B else c[:1], s if B else s[:1])
        assert qo.shape == q.shape
        (qo.sum() + ko.sum()).backward()
        assert q.grad.shape == q.shape


def test_rotary_bad_inputs(backend, device):
    q, k = torch.randn(2, 4, 5, 8, device=device), torch.randn(2, 2, 5, 8, device=device)
    cos, sin = _tables(2, 5, 8, device)
    with pytest.raises(RuntimeError, match="4-D"):
        FF.apply_rotary_emb(q[0], k[0], cos, sin)
    with pytest.raises(RuntimeError, match="must share batch, sequence and head dims"):
        FF.apply_rotary_emb(q, k[..., :4], cos, sin)
    with pytest.raises(RuntimeError, match="rotary dim"):
        FF.apply_rotary_emb(q, k, cos[..., :3], sin[..., :3])
    with pytest.raises(RuntimeError, match="rotary dim"):
        c, s = _tables(2, 5, 10, device)
        FF.apply_rotary_emb(q, k, c, s)
    with pytest.raises(RuntimeError, match="without position_ids"):
        FF.apply_rotary_emb(q, k, cos[:, :4], sin[:, :4])
    with pytest.raises(RuntimeError, match="one shape"):
        FF.apply_rotary_emb(q, k, cos, sin[:1])
    with pytest.raises(ValueError, match="seq_dim"):
        FF.apply_rotary_emb(q, k, cos, sin, seq_dim=-1)
    with pytest.raises(RuntimeError, match="position_ids must be"):
        FF.apply_rotary_emb(q, k, cos[0], sin[0], position_ids=torch.arange(4, device=device))
    with pytest.raises(RuntimeError, match="share dtype"):
        FF.apply_rotary_emb(q, k.double(), cos, sin)
    with pytest.raises(NotImplementedError):
        FF.apply_rotary_emb(q.int(), k.int(), cos, sin)


def test_rotary_tables_requiring_grad_fall_back(device):
    pytest.importorskip("triton")
    torch.manual_seed(5)
    q, k, dq, dk = _qk(1, 2, 2, 3, 4, torch.float32, device)
    cos, sin = (_leaf(t) for t in _tables(1, 3, 4, device))
    with fasttx.use_backend("triton"), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        qo, ko = FF.apply_rotary_emb(q, k, cos, sin)
    assert any("fasttx apply_rotary_emb" in str(w.message) for w in seen)
    torch.autograd.backward([qo, ko], [dq, dk])
    cr, sr = _leaf(cos), _leaf(sin)
    qr = R.rotary(q, cr[:, None], sr[:, None])
    kr = R.rotary(k, cr[:, None], sr[:, None])
    torch.autograd.backward([qr, kr], [dq, dk])
    assert_close(cos.grad, cr.grad)
    assert_close(sin.grad, sr.grad)


def test_rotary_int64_offsets(device):
    # q (1, 1, 3, 16) whose sequence stride is 2^30 + 64 elements over an untouched 4 GiB buffer:
    # token 2 starts past element 2^31, so the kernel must form l * stride in int64.
    K = pytest.importorskip("fasttx.kernels.rotary")
    D, stride = 16, 2**30 + 64
    try:
        buf = torch.empty(2 * stride + D, dtype=torch.float16, device=device)
    except (RuntimeError, MemoryError) as e:
        pytest.skip(f"cannot reserve a 4 GiB buffer here: {e}")
    q = buf.as_strided((1, 1, 3, D), (0, 0, stride, 1))
    torch.manual_seed(6)
    q.copy_(torch.randn(1, 1, 3, D))
    cos, sin = _tables(1, 3, D, device)
    qo, _ = K.rotary_forward(q, q, cos, sin)
    assert_close(qo, R.rotary(q, cos[:, None], sin[:, None], upcast=F64))
    dq, _ = K.rotary_backward(q, q, cos, sin)
    qr = _leaf(torch.zeros(1, 1, 3, D, dtype=F64, device=device))
    R.rotary(qr, cos[:, None].double(), sin[:, None].double()).backward(q.double())
    assert_close(dq, qr.grad)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_compile_fullgraph(backend, device):
    torch._dynamo.reset()
    torch.manual_seed(7)
    q, k, dq, dk = _qk(2, 2, 1, 3, 8, torch.float32, device)
    cos, sin = _tables(2, 3, 8, device)
    fn = torch.compile(lambda q, k: FF.apply_rotary_emb(q, k, cos, sin), fullgraph=True, backend="aot_eager")
    qs, ks = _leaf(q), _leaf(k)
    qo, ko = fn(qs, ks)
    torch.autograd.backward([qo, ko], [dq, dk])
    ours = (qo, ko, qs.grad, ks.grad)
    _, ref = _case(q, k, cos, sin, dq, dk)
    _check(ours, ref, torch.float32)
