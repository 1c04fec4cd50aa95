"""fasttx.functional.scaled_dot_product_attention against an fp64 oracle and torch itself.

The flash-attention rule (tests/README.md): with ref = fasttx.reference in fp64 and pt =
torch's own F.scaled_dot_product_attention in the same low dtype,
    max|ours - ref| <= 2 max|pt - ref| + atol  (output),  3x for dq, dk, dv.
Shapes are small on CPU (the kernels run in the Triton interpreter); (1023, 1024), head dim 256 and
the int64 probe are GPU-only.
"""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import fasttx
import fasttx.functional as FF
from fasttx import reference as R

from utils import ATOL_FLOOR, assert_2x_rule, noncontig, run_probe

fp32, fp16, bf16 = torch.float32, torch.float16, torch.bfloat16


def _randn(*shape, dtype, device, seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randn(*shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


def _qkv(B, Hq, Hkv, L, S, E, dtype, device, seed=0):
    q = _randn(B, Hq, L, E, dtype=dtype, device=device, seed=seed)
    k = _randn(B, Hkv, S, E, dtype=dtype, device=device, seed=seed + 1)
    v = _randn(B, Hkv, S, E, dtype=dtype, device=device, seed=seed + 2)
    return q, k, v


def _fwd_bwd(fn, q, k, v, do, **kw):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    grads = torch.autograd.grad(out, (q, k, v), do)
    return out.detach(), grads


def check_attention(q, k, v, do=None, *, dropout_mask=None, dropout_p=0.0, grads=True, **kw):
    """Our result (the backend in force) vs the fp64 reference, with torch's own low-precision
    error as the yardstick; forward and (if grads) dq, dk, dv."""
    kw_ref = dict(kw, dropout_p=dropout_p, dropout_mask=dropout_mask)
    if do is None:
        L, Ev = q.size(-2), v.size(-1)
        lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2]) if not kw.get("enable_gqa") else q.shape[:-2]
        do = _randn(*lead, L, Ev, dtype=q.dtype, device=q.device, seed=7)
    ours = lambda q, k, v, **a: FF.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, **a)  # noqa: E731
    ref64 = lambda q, k, v, **a: R.scaled_dot_product_attention(q, k, v, upcast=torch.float64, **kw_ref)  # noqa: E731
    if dropout_mask is None:
        low = lambda q, k, v, **a: F.scaled_dot_product_attention(q, k, v, **kw)  # noqa: E731
    else:  # torch cannot replay a mask: its low-precision yardstick is the reference run in q's dtype
        low = lambda q, k, v, **a: R.scaled_dot_product_attention(q, k, v, **kw_ref).to(q.dtype)  # noqa: E731
    if not grads:
        with torch.no_grad():
            o, r, p = ours(q, k, v, **kw), ref64(q, k, v), low(q, k, v)
        assert o.dtype == q.dtype and o.shape == r.shape
        assert_2x_rule(o, p, r)
        return o
    o, g = _fwd_bwd(lambda *t: ours(*t, **kw), q, k, v, do)
    # The plain-math oracle's (and torch's math) backward gives NaN for fully masked rows (softmax of
    # all -inf). Their correct contribution is zero: dq rows 0, nothing to dk/dv. So the yardsticks'
    # gradients are taken with those rows unmasked and their grad_output zeroed, which has exactly
    # that effect; our kernel still sees the original mask and grad_output.
    bias = R.attention_bias(q.size(-2), k.size(-2), kw.get("attn_mask"), kw.get("is_causal", False),
                            torch.float32, q.device)
    dead = (bias == float("-inf")).all(-1)  # (..., L)
    do_g = do
    if dead.any():
        kw = dict(kw, attn_mask=bias.masked_fill(dead[..., None], 0.0), is_causal=False)
        kw_ref.update(kw)
        do_g = (do * (~dead)[..., None].to(do.dtype)).reshape(do.shape)
        r_fwd = ref64(q, k, v)
    r, gr = _fwd_bwd(ref64, q.double(), k.double(), v.double(), do_g.double())
    p, gp = _fwd_bwd(low, q, k, v, do_g)
    if dead.any():
        r = r_fwd
        p = torch.where(dead[..., None], torch.zeros((), dtype=p.dtype), p)
    assert o.dtype == q.dtype and o.shape == r.shape
    assert_2x_rule(o, p, r)
    for name, a, b, c, t in zip("qkv", g, gp, gr, (q, k, v)):
        assert a.shape == t.shape and a.dtype == t.dtype
        assert_2x_rule(a, b, c, mult=3.0, name=f"d{name}")
    return o, g


# ------------------------------------------------------------------------------------------------
# Shapes, head dims, dtypes
# ------------------------------------------------------------------------------------------------
LS = [(1, 1), (1, 37), (17, 17), (113, 203), (203, 113), (128, 217), (256, 256),
      pytest.param(1023, 1024, marks=pytest.mark.gpu)]


@pytest.mark.parametrize("L,S", LS)
def test_seq_lengths(backend, device, L, S):
    check_attention(*_qkv(1, 2, 2, L, S, 64, fp16, device))


@pytest.mark.parametrize("dtype", [fp32, fp16, bf16])
@pytest.mark.parametrize("E", [16, 40, 64, 80, 96, 128, pytest.param(160, marks=pytest.mark.gpu),
                               pytest.param(256, marks=pytest.mark.gpu)])
def test_head_dims_dtypes(backend, device, E, dtype):
    check_attention(*_qkv(1, 2, 2, 33, 45, E, dtype, device))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [fp16, bf16, fp32])
@pytest.mark.parametrize("E", [16, 64, 80, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_large(backend, device, E, dtype, causal):
    check_attention(*_qkv(2, 4, 4, 1023, 1500, E, dtype, device), is_causal=causal)


@pytest.mark.parametrize("L,S", [(37, 90), (90, 37), (113, 203), (64, 64)])
@pytest.mark.parametrize("dtype", [fp32, bf16])
def test_causal(backend, device, L, S, dtype):
    # top-left aligned for L != S: query i sees keys j <= i (torch's rule), L > S included
    check_attention(*_qkv(1, 2, 2, L, S, 32, dtype, device), is_causal=True)


def test_causal_top_left_alignment(backend, device):
    # Row 0 must see key 0 alone: its output is exactly v[0] (a bottom-right alignment would not).
    q, k, v = _qkv(1, 1, 1, 3, 8, 16, fp32, device)
    out = FF.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out[0, 0, 0], v[0, 0, 0], atol=1e-6, rtol=0)


def test_custom_scale(backend, device):
    q, k, v = _qkv(1, 2, 2, 20, 30, 40, fp16, device)
    check_attention(q, k, v, scale=0.37)
    o_default = FF.scaled_dot_product_attention(q, k, v)
    o_explicit = FF.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(40))
    torch.testing.assert_close(o_default, o_explicit, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------
# Masks
# ------------------------------------------------------------------------------------------------
B_, H_, L_, S_ = 2, 2, 19, 37


def _mask(form, device, dtype):
    g = torch.Generator().manual_seed(3)
    full = (B_, H_, L_, S_)
    if form == "bool_LS":
        m = torch.rand(L_, S_, generator=g) > 0.3
    elif form == "float_LS":
        m = torch.randn(L_, S_, generator=g).to(dtype)
    elif form == "bool_key_padding":  # (N, 1, 1, S)
        m = torch.ones(B_, 1, 1, S_, dtype=torch.bool)
        m[0, ..., 30:] = False
        m[1, ..., 11:] = False
    elif form == "float_key_padding":
        m = torch.zeros(B_, 1, 1, S_)
        m[1, ..., 5:] = float("-inf")
        m = m.to(dtype)
    elif form == "bool_full":
        m = torch.rand(*full, generator=g) > 0.5
    elif form == "float_full_fp32":  # an fp32 mask with 16-bit inputs is allowed, like torch
        m = torch.randn(*full, generator=g)
    elif form == "bool_head":  # (1, H, 1, S)
        m = torch.rand(1, H_, 1, S_, generator=g) > 0.4
    elif form == "bool_expanded":  # stride-0 expanded (not materialised) mask
        m = (torch.rand(1, 1, L_, S_, generator=g) > 0.3).expand(*full)
        assert m.stride(0) == 0 and m.stride(1) == 0
    elif form == "float_noncontig":
        m = torch.randn(S_, L_, generator=g).to(dtype).t()
    return m.to(device)


MASKS = ["bool_LS", "float_LS", "bool_key_padding", "float_key_padding", "bool_full", "float_full_fp32",
         "bool_head", "bool_expanded", "float_noncontig"]


@pytest.mark.parametrize("form", MASKS)
def test_masks(backend, device, form):
    dtype = fp16
    q, k, v = _qkv(B_, H_, H_, L_, S_, 24, dtype, device)
    check_attention(q, k, v, attn_mask=_mask(form, device, dtype))


@pytest.mark.parametrize("form", ["bool_LS", "float_LS"])
def test_mask_with_causal(backend, device, form):
    # Both given: both apply (torch's CPU and fused kernels combine them)
    q, k, v = _qkv(B_, H_, H_, L_, S_, 16, fp32, device)
    check_attention(q, k, v, attn_mask=_mask(form, device, fp32), is_causal=True)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_rows(backend, device, kind):
    q, k, v = _qkv(1, 2, 2, 20, 33, 16, fp32, device)
    if kind == "bool":
        m = torch.rand(20, 33, generator=torch.Generator().manual_seed(0)) > 0.3
        m[[0, 7, 19]] = False
    else:
        m = torch.zeros(20, 33)
        m[[0, 7, 19]] = float("-inf")
    m = m.to(device)
    o, g = check_attention(q, k, v, attn_mask=m)
    assert torch.isfinite(o).all() and all(torch.isfinite(t).all() for t in g)
    assert (o[..., [0, 7, 19], :] == 0).all()
    assert (g[0][..., [0, 7, 19], :] == 0).all()


def test_fully_masked_key_padding_batch(backend, device):
    # a whole batch element without keys: zeros, zero grads, no NaN
    q, k, v = _qkv(2, 2, 2, 9, 40, 16, fp16, device)
    m = torch.ones(2, 1, 1, 40, dtype=torch.bool, device=device)
    m[1] = False
    o, (dq, dk, dv) = check_attention(q, k, v, attn_mask=m)
    assert (o[1] == 0).all() and (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()


def test_nan_propagates_to_its_row(backend, device):
    q, k, v = _qkv(1, 1, 1, 9, 40, 16, fp32, device)
    q[0, 0, 4, 3] = float("nan")
    o = FF.scaled_dot_product_attention(q, k, v)
    r = R.scaled_dot_product_attention(q, k, v, upcast=torch.float64)
    assert o[0, 0, 4].isnan().all() == r[0, 0, 4].isnan().all()
    assert o[0, 0, 4].isnan().all()
    torch.testing.assert_close(o[0, 0, :4], r[0, 0, :4].float(), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# GQA / MQA, layouts, ranks
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hkv", [2, 1], ids=["gqa", "mqa"])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa(backend, device, hkv, causal):
    q, k, v = _qkv(2, 4, hkv, 21, 30, 32, fp16, device)
    _, (dq, dk, dv) = check_attention(q, k, v, enable_gqa=True, is_causal=causal)
    assert dk.shape == (2, hkv, 30, 32)


def test_gqa_with_mask_and_different_kv_heads(backend, device):
    # Hk != Hv is accepted by torch; fasttx.reference does not model it, so the fp64 oracle here is
    # torch's own math in float64.
    q = _randn(1, 4, 11, 16, dtype=fp32, device=device, seed=0)
    k = _randn(1, 2, 23, 16, dtype=fp32, device=device, seed=1)
    v = _randn(1, 1, 23, 16, dtype=fp32, device=device, seed=2)
    m = (torch.rand(1, 4, 11, 23, generator=torch.Generator().manual_seed(0)) > 0.4).to(device)
    do = _randn(1, 4, 11, 16, dtype=fp32, device=device, seed=3)
    o, g = _fwd_bwd(lambda *t: FF.scaled_dot_product_attention(*t, attn_mask=m, enable_gqa=True), q, k, v, do)
    r, gr = _fwd_bwd(lambda *t: F.scaled_dot_product_attention(*t, attn_mask=m, enable_gqa=True),
                     q.double(), k.double(), v.double(), do.double())
    torch.testing.assert_close(o.double(), r, atol=1e-5, rtol=1e-5)
    for a, b in zip(g, gr):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


def test_gqa_does_not_copy_kv(device, monkeypatch):
    # the kernel receives the 2 shared kv heads, not 4 repeated ones
    if not fasttx._backend.triton_available():
        pytest.skip("triton is not installed")
    import fasttx.kernels.attention as K

    seen = {}
    real = K.attention_forward

    def spy(q, k, v, *a, **kw):
        seen["k"] = k
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(K, "attention_forward", spy)
    q, k, v = _qkv(1, 4, 2, 5, 7, 16, fp32, device)
    with fasttx.use_backend("triton"):
        FF.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert seen["k"].shape[1] == 2 and seen["k"].data_ptr() == k.data_ptr()


def test_noncontiguous_inputs_and_grad(backend, device):
    # (B, L, H, E) storage viewed as (B, H, L, E) (the usual projection layout), plus a
    # strided last dim (copied), and a non-contiguous grad_output
    B, H, L, S, E = 2, 2, 17, 29, 40
    q = _randn(B, L, H, E, dtype=fp16, device=device, seed=0).transpose(1, 2)
    k = noncontig(_randn(B, H, S, E, dtype=fp16, device=device, seed=1))
    v = _randn(B, S, H, E, dtype=fp16, device=device, seed=2).transpose(1, 2)
    do = noncontig(_randn(B, H, L, E, dtype=fp16, device=device, seed=3))
    assert not q.is_contiguous() and not k.is_contiguous() and not do.is_contiguous()
    check_attention(q, k, v, do, is_causal=True)


@pytest.mark.parametrize("shapes", [
    ((7, 13, 16), (7, 21, 16)),                    # 3-D (N, L, E)
    ((13, 16), (21, 16)),                          # 2-D
    ((2, 3, 2, 9, 16), (2, 3, 2, 14, 16)),         # extra batch dims
    ((2, 2, 9, 16), (1, 2, 14, 16)),               # broadcast batch
    ((2, 2, 9, 16), (2, 1, 14, 16)),               # broadcast heads (without enable_gqa)
    ((2, 9, 16), (2, 2, 14, 16)),                  # different ranks broadcast
], ids=["3d", "2d", "5d", "bcast_batch", "bcast_heads", "ranks"])
def test_ranks_and_broadcasting(backend, device, shapes):
    qs, ks = shapes
    q = _randn(*qs, dtype=fp32, device=device, seed=0)
    k = _randn(*ks, dtype=fp32, device=device, seed=1)
    v = _randn(*ks, dtype=fp32, device=device, seed=2)
    check_attention(q, k, v, is_causal=True)


def test_zero_size(backend, device):
    for L, S, B in [(0, 5, 1), (4, 0, 1), (4, 5, 0)]:
        q, k, v = _qkv(B, 2, 2, L, S, 16, fp32, device)
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        out = FF.scaled_dot_product_attention(q, k, v)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
        out.sum().backward()
        assert all(t.grad is not None and (t.grad == 0).all() for t in (q, k, v))


# ------------------------------------------------------------------------------------------------
# Dropout
# ------------------------------------------------------------------------------------------------
def _kernels():
    if not fasttx._backend.triton_available():
        pytest.skip("triton is not installed")
    import fasttx.kernels.attention as K

    return K


def test_dropout_mask_replay(device):
    # The kernel's forward and its backward (the regenerated mask) against the fp64 reference
    # replaying the mask that the launcher's test hook returns for the same seed.
    K = _kernels()
    p = 0.3
    q, k, v = _qkv(1, 2, 2, 20, 45, 16, fp32, device)
    out, lse, keep = K.attention_forward(q, k, v, None, scale=0.25, dropout_p=p, seed=1234, return_mask=True)
    assert keep.shape == (1, 2, 20, 45) and keep.dtype == torch.bool
    do = _randn(1, 2, 20, 16, dtype=fp32, device=device, seed=9)
    dq, dk, dv = K.attention_backward(do, q, k, v, None, out, lse, scale=0.25, dropout_p=p, seed=1234)
    qq, kk, vv = (t.double().requires_grad_() for t in (q, k, v))
    ref = R.scaled_dot_product_attention(qq, kk, vv, dropout_p=p, dropout_mask=keep, scale=0.25)
    gr = torch.autograd.grad(ref, (qq, kk, vv), do.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    for a, b in zip((dq, dk, dv), gr):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


def test_dropout_through_public_api_replays(device, monkeypatch):
    # The public op (custom op + autograd) with a known seed: forward and all grads match the
    # reference with the replayed mask; the kept fraction is ~1 - p.
    K = _kernels()
    import fasttx.ops.attention as ops

    monkeypatch.setattr(ops, "draw_seed", lambda dev: torch.tensor([4321], dtype=torch.int64, device=dev))
    p = 0.2
    q, k, v = _qkv(1, 2, 2, 32, 64, 16, fp16, device)
    keep = K.dropout_mask((1, 2, 32, 64), 4321, p, device)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.03
    with fasttx.use_backend("triton"):
        check_attention(q, k, v, dropout_p=p, dropout_mask=keep, is_causal=True)


def test_dropout_kept_fraction_and_scale(device):
    K = _kernels()
    p = 0.25
    keep = K.dropout_mask((2, 2, 64, 128), 77, p, device)
    frac = keep.float().mean().item()
    assert abs(frac - (1 - p)) < 0.01  # 32768 draws: std ~0.0024
    # with uniform attention (q = 0) and v = 1 every output is (kept count / S) / (1 - p)
    q = torch.zeros(1, 1, 16, 16, device=device)
    k = _randn(1, 1, 128, 16, dtype=fp32, device=device)
    v = torch.ones(1, 1, 128, 16, device=device)
    out, _, keep = K.attention_forward(q, k, v, None, scale=1.0, dropout_p=p, seed=5, return_mask=True)
    expect = keep[0, 0].float().mean(-1) / (1 - p)
    torch.testing.assert_close(out[0, 0, :, 0], expect, atol=1e-6, rtol=1e-6)


def test_dropout_seed_reproducible_and_different(backend, device):
    q, k, v = _qkv(1, 2, 2, 16, 24, 16, fp32, device)

    def run(seed):
        torch.manual_seed(seed)
        return _fwd_bwd(lambda *t: FF.scaled_dot_product_attention(*t, dropout_p=0.5), q, k, v, torch.ones_like(q))

    (o1, g1), (o2, g2), (o3, _) = run(0), run(0), run(1)
    assert torch.equal(o1, o2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert not torch.equal(o1, o3)


def test_dropout_p_one_gives_zeros(backend, device):
    q, k, v = _qkv(1, 1, 1, 8, 8, 16, fp32, device)
    o, g = _fwd_bwd(lambda *t: FF.scaled_dot_product_attention(*t, dropout_p=1.0), q, k, v, torch.ones_like(q))
    assert (o == 0).all() and all((t == 0).all() for t in g)


# ------------------------------------------------------------------------------------------------
# Determinism, decode path, compile
# ------------------------------------------------------------------------------------------------
def test_backward_deterministic_and_inputs_untouched(device):
    K = _kernels()
    q, k, v = _qkv(1, 4, 2, 50, 70, 16, fp16, device)
    out, lse = K.attention_forward(q, k, v, None, scale=0.3, is_causal=True)
    do = _randn(1, 4, 50, 16, dtype=fp16, device=device, seed=5)
    saved = [t.clone() for t in (q, k, v, out, lse, do)]
    g1 = K.attention_backward(do, q, k, v, None, out, lse, scale=0.3, is_causal=True)
    g2 = K.attention_backward(do, q, k, v, None, out, lse, scale=0.3, is_causal=True)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert all(torch.equal(a, b) for a, b in zip(saved, (q, k, v, out, lse, do)))


def _ref_lse(q, k, scale, mask=None, causal=False, groups=1):
    kk = k.double().repeat_interleave(groups, dim=1)
    s = q.double() @ kk.transpose(-2, -1) * scale
    s = s + R.attention_bias(q.size(-2), k.size(-2), mask, causal, torch.float64, q.device)
    return torch.logsumexp(s, -1)


@pytest.mark.parametrize("L,S,split", [(1, 100, 32), (4, 161, 64), (16, 40, 32)])
@pytest.mark.parametrize("variant", ["plain", "mask_causal_gqa"])
def test_decode_path(device, L, S, split, variant):
    # flash-decoding forced on for small S; S not a multiple of the split size
    K = _kernels()
    q, k, v = _qkv(2, 4, 2 if variant != "plain" else 4, L, S, 40, fp16, device)
    mask, causal, gqa = None, False, False
    if variant != "plain":
        mask = (torch.rand(2, 1, L, S, generator=torch.Generator().manual_seed(1)) > 0.3).to(device)
        mask[0, :, 0] = False  # a fully masked row
        mask = mask.expand(2, 4, L, S)
        causal, gqa = True, True
    out, lse = K.attention_forward(q, k, v, mask, scale=0.2, is_causal=causal, decode=True, split_size=split)
    ref = R.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=0.2, enable_gqa=gqa,
                                         upcast=torch.float64)
    pt = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=0.2, enable_gqa=gqa)
    assert_2x_rule(out, pt, ref)
    ref_lse = _ref_lse(q, k, 0.2, mask, causal, 4 // k.size(1))
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-4)
    # the main (non-split) kernel agrees on the statistics the backward needs
    out2, lse2 = K.attention_forward(q, k, v, mask, scale=0.2, is_causal=causal, decode=False)
    torch.testing.assert_close(lse, lse2, atol=1e-5, rtol=1e-5)


def test_decode_path_auto_selected(device, monkeypatch):
    # L <= 16 and S >= 512 takes flash-decoding; gradients still flow through the main backward
    K = _kernels()
    calls = []
    real = K._attn_decode_combine

    class Spy:
        def __getitem__(self, grid):
            calls.append(grid)
            return real[grid]

    monkeypatch.setattr(K.launch, "_attn_decode_combine", Spy())  # where attention_forward launches it
    q, k, v = _qkv(1, 1, 1, 2, 600, 16, fp32, device)
    with fasttx.use_backend("triton"):
        check_attention(q, k, v)
    assert calls


def test_torch_compile_fullgraph(backend, device):
    import fasttx.ops.attention  # noqa: F401  (imported before tracing starts)

    q, k, v = _qkv(1, 2, 2, 16, 24, 16, fp32, device)
    m = torch.ones(16, 24, dtype=torch.bool, device=device).tril()

    def f(q, k, v):
        return FF.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=0.0, enable_gqa=True)

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    o1, g1 = _fwd_bwd(cf, q, k, v, torch.ones_like(q))
    o2, g2 = _fwd_bwd(f, q, k, v, torch.ones_like(q))
    torch.testing.assert_close(o1, o2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_torch_compile_dropout(backend, device):
    import fasttx.ops.attention  # noqa: F401  (imported before tracing starts)

    q, k, v = _qkv(1, 2, 2, 8, 12, 16, fp32, device)
    cf = torch.compile(lambda *t: FF.scaled_dot_product_attention(*t, dropout_p=0.5), fullgraph=True,
                       backend="aot_eager")
    torch.manual_seed(3)
    o1, g1 = _fwd_bwd(cf, q, k, v, torch.ones_like(q))
    torch.manual_seed(3)
    o2, g2 = _fwd_bwd(cf, q, k, v, torch.ones_like(q))
    assert torch.equal(o1, o2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert (o1 != 0).any()


# ------------------------------------------------------------------------------------------------
# Fallbacks and errors
# ------------------------------------------------------------------------------------------------
def _forget_fallback_warnings():
    fasttx._backend._warned.clear()


def test_value_head_dim_above_kernel_limit_falls_back_once(device):
    # Ev != E runs on the kernels (tests/test_attention_mla_sinks.py); Ev above 256 is a kernel limit
    _forget_fallback_warnings()
    q, k, _ = _qkv(1, 2, 2, 5, 7, 16, fp32, device)
    v = _randn(1, 2, 7, 264, dtype=fp32, device=device)
    with fasttx.use_backend("triton"), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        o1 = FF.scaled_dot_product_attention(q, k, v)
        FF.scaled_dot_product_attention(q, k, v)
    assert len([x for x in w if "Ev" in str(x.message)]) == 1
    torch.testing.assert_close(o1, R.scaled_dot_product_attention(q, k, v, upcast=torch.float64).float())


def test_fp32_head_dims_but_48_and_64_are_a_gpu_limit():
    # fp32 tiles spill on sm_90 / sm_100 above d = 64 in every config, at d = 16 and at the unaligned
    # d = 40 (kernels/attention/config.py); d = 48 and 64 compiled clean
    from types import SimpleNamespace

    K = _kernels()
    t = lambda d, dtype=fp32, cuda=True: SimpleNamespace(is_cuda=cuda, dtype=dtype, shape=(1, 2, 3, d))  # noqa: E731
    assert "head dims 128 / 128" in K.gpu_limit(t(128), t(128))
    assert "head dims 64 / 96" in K.gpu_limit(t(64), t(96))  # Ev counts too
    for d in (16, 32, 40):
        assert "only at head dims 48 and 64" in K.gpu_limit(t(d), t(d))
    assert K.gpu_limit(t(64), t(64)) is None and K.gpu_limit(t(48), t(64)) is None
    assert K.gpu_limit(t(40, fp16), t(40, fp16)) is None and K.gpu_limit(t(128, fp16), t(128, fp16)) is None
    assert K.gpu_limit(t(128, cuda=False), t(128, cuda=False)) is None  # the interpreter has no registers


@pytest.mark.parametrize("entry", ["sdpa", "flash", "flash_varlen", "flash_kvcache"])
def test_gpu_limit_runs_the_torch_path_once(entry, monkeypatch):
    # every entry point asks the kernels' gpu_limit and runs torch's attention where it says so
    import fasttx.flash as flash

    monkeypatch.setattr(_kernels(), "gpu_limit", lambda q, v: "a limit of this test")
    _forget_fallback_warnings()
    q, k, v = _qkv(1, 2, 2, 5, 7, 16, fp32, "cpu")
    qf, kf, vf = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # flash layout (B, L, H, D)
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
    call = {"sdpa": lambda: FF.scaled_dot_product_attention(q, k, v),
            "flash": lambda: flash.flash_attn_func(qf, kf, vf),
            "flash_varlen": lambda: flash.flash_attn_varlen_func(qf[0], kf[0], vf[0], i32([0, 5]), i32([0, 7]), 5, 7),
            "flash_kvcache": lambda: flash.flash_attn_with_kvcache(qf, kf, vf)}[entry]
    with fasttx.use_backend("triton"), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = call()
        call()
    assert len([x for x in w if "a limit of this test" in str(x.message)]) == 1
    with fasttx.use_backend("torch"):
        torch.testing.assert_close(out, call())


def test_mask_requiring_grad_gets_its_gradient(device):
    q, k, v = _qkv(1, 2, 2, 5, 7, 16, fp32, device)
    m = _randn(5, 7, dtype=fp32, device=device).requires_grad_()
    _forget_fallback_warnings()
    with fasttx.use_backend("triton"), pytest.warns(UserWarning, match="attn_mask requires grad"):
        FF.scaled_dot_product_attention(q, k, v, attn_mask=m).sum().backward()
    g = m.grad.clone()
    m.grad = None
    F.scaled_dot_product_attention(q, k, v, attn_mask=m).sum().backward()
    torch.testing.assert_close(g, m.grad)


def _bad(device):
    q, k, v = _qkv(2, 4, 4, 5, 7, 16, fp32, device)
    return [
        ("dtype", (q.half(), k, v), {}, "same dtype"),
        ("device", (q, k.to("meta"), v), {}, "same device"),
        ("rank", (q[0, 0, 0], k[0, 0, 0], v[0, 0, 0]), {}, "at least 2 dimensional"),
        ("head_dim", (q[..., :8], k, v), {}, "same head dim E"),
        # torch's CPU kernel does not check this one (it reads past v's end): only ours is checked
        ("seq", (q, k, v[..., :6, :]), {"torch_lenient": True}, "same sequence length S"),
        ("mask_shape", (q, k, v), {"attn_mask": torch.ones(3, 7, dtype=torch.bool, device=device)},
         "attn_mask of shape .* not broadcastable"),
        ("mask_dtype", (q, k, v), {"attn_mask": torch.ones(5, 7, dtype=torch.int32, device=device)},
         "attn_mask must be bool"),
        ("gqa", (_randn(2, 6, 5, 16, dtype=fp32, device=device), k, v), {"enable_gqa": True},
         "must divide the number of heads in query"),
        ("heads", (_randn(2, 6, 5, 16, dtype=fp32, device=device), k, v), {}, "not broadcastable"),
        ("batch", (q, k[:, :3].repeat(3, 1, 1, 1)[:3], v[:, :3].repeat(3, 1, 1, 1)[:3]), {}, "not broadcastable"),
        ("dropout", (q, k, v), {"dropout_p": 1.5}, "dropout probability"),
    ]


@pytest.mark.parametrize("case", range(11))
def test_bad_inputs(device, case):
    name, args, kw, match = _bad(device)[case]
    if not kw.pop("torch_lenient", False):
        with pytest.raises((RuntimeError, ValueError)):  # torch rejects the same input
            F.scaled_dot_product_attention(*args, **kw)
    if not fasttx._backend.triton_available():
        pytest.skip("triton is not installed")
    with fasttx.use_backend("triton"), pytest.raises((RuntimeError, ValueError), match=match):
        FF.scaled_dot_product_attention(*args, **kw)


def test_launcher_rejects_bad_split(device):
    # launchers only assert (the public op checks with torch's rules before reaching them)
    K = _kernels()
    q, k, v = _qkv(1, 1, 1, 2, 40, 16, fp32, device)
    with pytest.raises(AssertionError, match="split_size must be a positive multiple"):
        K.attention_forward(q, k, v, scale=1.0, decode=True, split_size=K._SPLIT_ALIGN + 1)
    with pytest.raises(AssertionError, match="dropout_p must be 0"):
        K.attention_forward(q, k, v, scale=1.0, decode=True, dropout_p=0.1)


# ------------------------------------------------------------------------------------------------
# GPU-only: int64 offsets
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_int64_offsets_long_kv_cache(device):
    # k and v hold more than 2^31 elements: row offsets n * stride overflow int32.
    S, E = 2**31 // 16 + 1000, 16
    q = _randn(1, 1, 1, E, dtype=fp16, device=device)
    k = torch.randn(1, 1, S, E, dtype=fp16, device=device)
    v = torch.randn(1, 1, S, E, dtype=fp16, device=device)
    v[0, 0, -1000:] += 3.0  # the tail past 2^31 elements changes the answer
    with fasttx.use_backend("triton"):
        out = FF.scaled_dot_product_attention(q, k, v)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
def test_batch_times_heads_beyond_grid_axis_limit(device):
    # batch x heads = 66000 > 65535 (the CUDA limit of grid axes 1 and 2): the kernels put
    # (row block, batch x head) on axis 0, so large-batch decoding still launches.
    q = torch.randn(16500, 4, 1, 64, device=device, dtype=torch.float16, requires_grad=True)
    k = torch.randn(16500, 4, 8, 64, device=device, dtype=torch.float16, requires_grad=True)
    v = torch.randn(16500, 4, 8, 64, device=device, dtype=torch.float16, requires_grad=True)
    with fasttx.use_backend("triton"):
        out = FF.scaled_dot_product_attention(q, k, v)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


# ------------------------------------------------------------------------------------------------
# Sharp (nearly one-hot) attention in 16 bits: the backward's delta must come from the fp32 output
# ------------------------------------------------------------------------------------------------
def _sharp(L, S, E, dtype, device, seed):
    torch.manual_seed(seed)
    make = lambda *s: torch.testing.make_tensor(*s, dtype=dtype, device=device, low=-9, high=9)  # noqa: E731
    return make(4, L, E), make(4, S, E), make(4, S, E)


@pytest.mark.parametrize("dtype", [bf16, fp16])
@pytest.mark.parametrize("seed", [5, 6, 7])
@pytest.mark.parametrize("causal", [False, True])
def test_sharp_attention_backward_16bit(backend, device, dtype, seed, causal):
    # q (4, 3, 8), k/v (4, 6, 8), values up to +-9: one probability dominates each row, so
    # dS = P (dP - delta) cancels; with delta from the 16-bit rounded output dq and dk were off by
    # ~0.4 (bf16) where torch's error is ~7e-4. Gradients held to the 2x rule here (not 3x).
    q, k, v = _sharp(3, 6, 8, dtype, device, seed)
    do = torch.testing.make_tensor(4, 3, 8, dtype=dtype, device=device, low=-1, high=1)
    o, g = _fwd_bwd(lambda *t: FF.scaled_dot_product_attention(*t, is_causal=causal), q, k, v, do)
    r, gr = _fwd_bwd(lambda *t: R.scaled_dot_product_attention(*t, is_causal=causal, upcast=torch.float64),
                     q.double(), k.double(), v.double(), do.double())
    p, gp = _fwd_bwd(lambda *t: F.scaled_dot_product_attention(*t, is_causal=causal), q, k, v, do)
    for name, a, b, c in zip(["output", "dq", "dk", "dv"], (o, *g), (p, *gp), (r, *gr)):
        assert_2x_rule(a, b, c, atol=_atol_16bit_store(c, dtype), name=name)


def _atol_16bit_store(ref, dtype):
    """The 2x rule's floor: bf16 stores round to nearest even under the interpreter as on a GPU
    (tests/_interpreter_bf16.py; it used to truncate, which cost up to 1 ulp of outputs near |8|)."""
    return ATOL_FLOOR[dtype]


def test_sharp_attention_fp32_output_is_what_the_backward_reads(device):
    # The op keeps the forward's fp32 output for 16-bit inputs (and only when differentiated):
    # the backward gets it as `out`, and its delta is exact to fp32 rounding.
    K = _kernels()
    import fasttx.ops.attention as ops

    q, k, v = (t[:, None] for t in _sharp(3, 6, 8, bf16, device, 5))  # (4, 1, L, 8)
    out, lse, out32 = K.attention_forward(q, k, v, None, scale=8 ** -0.5, return_fp32_out=True)
    ref = R.scaled_dot_product_attention(q, k, v, upcast=torch.float64)
    assert out32.dtype == fp32 and (out32.double() - ref).abs().max() < 1e-5
    assert torch.equal(out, out32.to(bf16)) or (out.float() - out32).abs().max() <= 2 ** -7 * out32.abs().max()
    seen = {}
    real = K.attention_backward

    def spy(do, q, k, v, mask, out, *a, **kw):
        seen["out"] = out
        return real(do, q, k, v, mask, out, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(K, "attention_backward", spy)
        qq = q.clone().requires_grad_()
        with fasttx.use_backend("triton"):
            FF.scaled_dot_product_attention(qq, k, v).sum().backward()
            with torch.no_grad():
                res = ops._sdpa_fwd(q, k, v, None, 0.0, False, 8 ** -0.5, False)
    assert seen["out"].dtype == fp32
    assert res[3].numel() == 0  # not differentiated: no fp32 copy is written


# ------------------------------------------------------------------------------------------------
# Edge cases of issue 19: torch's behaviour where it is right, ours where torch is wrong
# ------------------------------------------------------------------------------------------------
def test_head_dim_zero_gives_empty(backend, device):
    q, k, v = (torch.randn(1, 2, n, 0, device=device, requires_grad=True) for n in (3, 4, 4))
    out = FF.scaled_dot_product_attention(q, k, v)
    assert out.shape == (1, 2, 3, 0)
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


@pytest.mark.parametrize("kw,exc,match", [
    (dict(scale="0.5"), TypeError, "'scale' must be float, not str"),
    (dict(dropout_p="0.1"), TypeError, "'dropout_p' must be float, not str"),
    (dict(is_causal=1), TypeError, "'is_causal' must be bool, not int"),
    (dict(enable_gqa="yes"), TypeError, "'enable_gqa' must be bool, not str"),
    (dict(dropout_p=1.5), RuntimeError, "dropout probability has to be between 0 and 1, but got 1.5"),
], ids=["scale_str", "dropout_str", "causal_int", "gqa_str", "dropout_above_1"])
def test_argument_types_and_ranges_as_torch(device, kw, exc, match):
    q, k, v = _qkv(1, 2, 2, 3, 4, 8, fp32, device)
    with pytest.raises(exc):  # torch raises the same exception type
        F.scaled_dot_product_attention(q, k, v, **kw)
    if not fasttx._backend.triton_available():
        pytest.skip("triton is not installed")
    with fasttx.use_backend("triton"), pytest.raises(exc, match=match):
        FF.scaled_dot_product_attention(q, k, v, **kw)


def test_number_like_scales_accepted_as_torch(device):
    q, k, v = _qkv(1, 2, 2, 3, 4, 8, fp32, device)
    if not fasttx._backend.triton_available():
        pytest.skip("triton is not installed")
    for s in (1, 0.5, torch.tensor(0.5)):
        with fasttx.use_backend("triton"):
            ours = FF.scaled_dot_product_attention(q, k, v, scale=s)
        torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, scale=s), atol=1e-5, rtol=1e-5)


# Where torch is wrong and the Triton path right (the torch backend is torch's own op, so these
# hold for the Triton path): each checked against the plain fp64 math.
def _triton_only():
    if not fasttx._backend.triton_available():
        pytest.skip("triton is not installed")
    return fasttx.use_backend("triton")


def test_nan_scale_gives_nan(device):
    q, k, v = _qkv(1, 1, 1, 3, 4, 8, fp32, device)
    with _triton_only():
        assert FF.scaled_dot_product_attention(q, k, v, scale=float("nan")).isnan().all()  # torch: zeros
    assert R.scaled_dot_product_attention(q, k, v, scale=float("nan")).isnan().all()


def test_nan_in_masked_out_keys_is_ignored(device):
    q, k, v = _qkv(1, 1, 1, 5, 9, 8, fp32, device)
    m = torch.ones(5, 9, dtype=torch.bool, device=device)
    m[:, 6:] = False
    k_nan = k.clone()
    k_nan[..., 6:, :] = float("nan")  # keys no query may see
    with _triton_only():
        out = FF.scaled_dot_product_attention(q, k_nan, v, attn_mask=m)
    ref = R.scaled_dot_product_attention(q, k, v, attn_mask=m, upcast=torch.float64)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_gqa_with_zero_kv_heads_rejected(device):
    q = _randn(1, 4, 3, 8, dtype=fp32, device=device)
    k = v = _randn(1, 0, 5, 8, dtype=fp32, device=device)
    with _triton_only(), pytest.raises(RuntimeError, match="must divide the number of heads in query"):
        FF.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # torch returns a tensor


@pytest.mark.parametrize("p", [-0.1, float("nan")])
def test_negative_or_nan_dropout_rejected(device, p):
    q, k, v = _qkv(1, 1, 1, 3, 4, 8, fp32, device)
    with _triton_only(), pytest.raises(RuntimeError, match="dropout probability has to be between 0 and 1"):
        FF.scaled_dot_product_attention(q, k, v, dropout_p=p)


def test_autotune_knob_fixes_one_config(device, monkeypatch):
    # FASTTX_AUTOTUNE=0 (read at import) keeps only the first config the pruning keeps, per shape
    # class; the GPU tables themselves are used here (under the interpreter the table has one).
    K = _kernels()
    q = torch.empty(1, 1, 1, 64, dtype=fp16)
    args = dict(Q=q, Mask=q, BLOCK_D=64, L_BUCKET=1024, HAS_MASK=False)
    fwd, bwd = K._configs(K._FWD_GPU), K._configs(K._BWD_GPU)
    monkeypatch.setattr(K.config, "AUTOTUNE", True)  # read by the pruning, in kernels/attention/config.py
    assert len(K._prune(fwd, args)) > 1 and len(K._prune_bwd(bwd, args)) > 1
    monkeypatch.setattr(K.config, "AUTOTUNE", False)
    one, one_bwd = K._prune(fwd, args), K._prune_bwd(bwd, args)
    assert len(one) == 1 and len(one_bwd) == 1 and one[0].kwargs["BLOCK_M"] == 128
    assert K._prune(fwd, dict(args, L_BUCKET=8))[0].kwargs["BLOCK_M"] == 16  # the decode-like class
    monkeypatch.setenv("FASTTX_AUTOTUNE", "0")
    run_probe("import fasttx.kernels.attention as K; assert K.AUTOTUNE is False; print('ok')", timeout=120)
