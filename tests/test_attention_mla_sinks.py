"""Two attention-kernel features against the fp64 oracle (fasttx/reference.py), both backends:

- value head dim Ev != q/k head dim E (DeepSeek's MLA: E = 192, Ev = 128; also Ev > E), through
  fasttx.functional.scaled_dot_product_attention (torch's exact signature) and fasttx.flash (FA3's
  hdim_v): forward, dq, dk, dv, the flash-decoding split path, varlen and the kv-cache;
- attention sinks (gpt-oss; flash-attn's `learnable_sink`): a per-head logit in each row's softmax
  denominator, with its gradient ds_h = -sum_i exp(s_h - lse_i) delta_i.

Small shapes (the Triton interpreter); fp32 to 1e-4 of the oracle, 16-bit to the 2x rule
(tests/README.md) with the oracle run in that dtype as the yardstick (3x for gradients).
"""
import warnings

import pytest
import torch

import fasttx
from fasttx import reference as R
from fasttx.flash import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

from test_attention import check_attention
from utils import ATOL_FLOOR, assert_2x_rule

fp32, bf16 = torch.float32, torch.bfloat16


def _randn(*shape, dtype=fp32, device="cpu", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)


def _no_fallback(record):
    msgs = [str(w.message) for w in record if "running torch's implementation" in str(w.message)]
    assert not msgs, msgs


# ------------------------------------------------------------------------------------------------
# Ev != E through fasttx.functional (torch's signature)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("E,Ev,dtype,kw", [
    (48, 32, fp32, dict(is_causal=True, enable_gqa=True)),     # MLA-like: Ev < E, GQA, causal
    (24, 40, fp32, dict()),                                     # Ev > E, non-power-of-two Ev
    (48, 32, bf16, dict(is_causal=True)),
], ids=["mla-gqa-causal", "ev>e", "mla-bf16"])
def test_sdpa_value_head_dim(backend, device, E, Ev, dtype, kw):
    Hkv = 2 if kw.get("enable_gqa") else 4
    q = _randn(2, 4, 19, E, dtype=dtype, device=device, seed=1)
    k = _randn(2, Hkv, 23, E, dtype=dtype, device=device, seed=2)
    v = _randn(2, Hkv, 23, Ev, dtype=dtype, device=device, seed=3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out, _ = check_attention(q, k, v, **kw)
    _no_fallback(record)  # the kernels run it (it used to fall back to torch)
    assert out.shape == (2, 4, 19, Ev)


def test_sdpa_value_head_dim_with_mask_and_broadcast(backend, device):
    # float mask broadcast over heads, 3-D inputs (no batch dim)
    q, k = _randn(3, 9, 16, device=device, seed=1), _randn(3, 13, 16, device=device, seed=2)
    v = _randn(3, 13, 8, device=device, seed=3)
    check_attention(q, k, v, attn_mask=_randn(9, 13, device=device, seed=4))


# ------------------------------------------------------------------------------------------------
# fasttx.flash: Ev != E and learnable_sink
# ------------------------------------------------------------------------------------------------
def _flash_grads(fn, tensors, do):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in tensors]
    out = fn(*leaves)
    wrt = [t for t in leaves if t is not None]
    return out.detach(), torch.autograd.grad(out, wrt, do)


def check_flash(q, k, v, do, sinks=None, **kw):
    """flash_attn_func (learnable_sink=sinks) vs R.flash_attention(sinks=...) in fp64: out, dq, dk,
    dv and (with sinks) the sink's gradient."""
    ours, g = _flash_grads(lambda q, k, v, s: flash_attn_func(q, k, v, learnable_sink=s, **kw), (q, k, v, sinks), do)
    ref_kw = {n: kw[n] for n in ("causal", "window_size", "softcap", "alibi_slopes", "softmax_scale") if n in kw}
    ref_fn = lambda q, k, v, s: R.flash_attention(q, k, v, sinks=s, **ref_kw)[0]  # noqa: E731
    up = [t.double() if t is not None else None for t in (q, k, v, sinks)]
    ref, gr = _flash_grads(ref_fn, up, do.double())
    assert ours.shape == (*q.shape[:3], v.shape[-1]) and ours.dtype == q.dtype
    if sinks is not None:
        assert g[3].dtype == sinks.dtype and g[3].shape == sinks.shape
    if q.dtype == fp32:
        for a, b in zip((ours, *g), (ref, *gr)):
            torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)
    else:
        low, gl = _flash_grads(ref_fn, (q, k, v, sinks), do)
        atol = ATOL_FLOOR[q.dtype]
        assert_2x_rule(ours, low, ref, atol=atol)
        for name, a, b, c in zip(["q", "k", "v", "sink"], g, gl, gr):
            assert_2x_rule(a, b, c, mult=3.0, atol=atol, name=f"d{name}")
    return ours, g


@pytest.mark.parametrize("D,Dv,Lq,Lk,kw", [
    (48, 32, 13, 21, dict(causal=True)),
    (24, 40, 21, 13, dict(causal=True, window_size=(5, 0))),  # Lq > Lk: the first rows see no key
    (48, 32, 17, 17, dict(softcap=5.0, alibi_slopes=torch.tensor([0.1, 0.3, 0.2, 0.05]))),
], ids=["mla-causal", "ev>e-window", "softcap-alibi"])
def test_flash_value_head_dim(backend, device, D, Dv, Lq, Lk, kw):
    q = _randn(2, Lq, 4, D, device=device, seed=1)
    k, v = _randn(2, Lk, 2, D, device=device, seed=2), _randn(2, Lk, 2, Dv, device=device, seed=3)
    if "alibi_slopes" in kw:
        kw = dict(kw, alibi_slopes=kw["alibi_slopes"].to(device))
    check_flash(q, k, v, _randn(2, Lq, 4, Dv, device=device, seed=4), **kw)


@pytest.mark.parametrize("dtype,kw", [
    (fp32, dict()),
    (fp32, dict(causal=True, window_size=(6, 0))),  # gpt-oss's sliding layers: causal + window + GQA
    (fp32, dict(causal=True)),                       # Lq > Lk below: rows without a visible key
    (bf16, dict(causal=True)),
], ids=["full", "causal-window", "empty-rows", "bf16"])
def test_flash_sinks(backend, device, dtype, kw):
    Lq, Lk = (19, 11) if kw.get("causal") and "window_size" not in kw and dtype == fp32 else (17, 17)
    q = _randn(2, Lq, 4, 32, dtype=dtype, device=device, seed=1)
    k, v = _randn(2, Lk, 2, 32, dtype=dtype, device=device, seed=2), _randn(2, Lk, 2, 32, dtype=dtype,
                                                                           device=device, seed=3)
    sinks = _randn(4, dtype=dtype, device=device, seed=5, scale=2.0)
    out, g = check_flash(q, k, v, _randn(2, Lq, 4, 32, dtype=dtype, device=device, seed=4), sinks=sinks, **kw)
    # the sink changes the result (a test that would catch a kernel ignoring it)
    plain = flash_attn_func(q, k, v, **kw)
    assert (out.float() - plain.float()).abs().max() > 1e-2
    if Lq > Lk:  # rows that see no key: zeros, and softmax_lse is the sink's logit
        _, lse, _ = flash_attn_func(q, k, v, learnable_sink=sinks, return_attn_probs=True, **kw)
        dead = Lq - Lk
        assert torch.equal(out[:, :dead].float(), torch.zeros_like(out[:, :dead].float()))
        torch.testing.assert_close(lse[:, :, :dead], sinks.float()[None, :, None].expand(2, 4, dead))


def test_flash_sinks_and_value_head_dim_together(backend, device):
    q = _randn(1, 9, 4, 48, device=device, seed=1)
    k, v = _randn(1, 12, 1, 48, device=device, seed=2), _randn(1, 12, 1, 16, device=device, seed=3)
    check_flash(q, k, v, _randn(1, 9, 4, 16, device=device, seed=4), sinks=_randn(4, device=device, seed=5),
                causal=True)


def test_sink_gradient_is_minus_psink_delta(device):
    # The formula the kernels use, checked on the oracle itself: ds_h = -sum_i exp(s_h - lse_i) delta_i
    # with delta_i = dO_i . O_i (summed over batch and rows of head h).
    q = _randn(2, 7, 3, 8, dtype=torch.float64, device=device, seed=1)
    k, v = _randn(2, 9, 3, 8, dtype=torch.float64, device=device, seed=2), _randn(2, 9, 3, 5, dtype=torch.float64,
                                                                                 device=device, seed=3)
    s = _randn(3, dtype=torch.float64, device=device, seed=4).requires_grad_()
    do = _randn(2, 7, 3, 5, dtype=torch.float64, device=device, seed=5)
    out, lse = R.flash_attention(q, k, v, causal=True, sinks=s)
    (ds,) = torch.autograd.grad(out, s, do)
    delta = (do * out).sum(-1).transpose(1, 2)  # (B, H, Lq)
    formula = -(torch.exp(s.detach()[None, :, None] - lse.detach()) * delta.detach()).sum((0, 2))
    torch.testing.assert_close(ds, formula)


def test_flash_varlen_sinks_and_value_head_dim(backend, device):
    lens_q, lens_k = [5, 0, 9], [7, 3, 9]
    cu_q = torch.tensor([0, 5, 5, 14], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 7, 10, 19], dtype=torch.int32, device=device)
    q = _randn(14, 4, 24, device=device, seed=1)
    k, v = _randn(19, 2, 24, device=device, seed=2), _randn(19, 2, 40, device=device, seed=3)
    sinks = _randn(4, device=device, seed=4)
    do = _randn(14, 4, 40, device=device, seed=5)
    fn = lambda q, k, v, s: flash_attn_varlen_func(q, k, v, cu_q, cu_k, 9, 9, causal=True,  # noqa: E731
                                                   window_size=(4, 0), learnable_sink=s)
    ours, g = _flash_grads(fn, (q, k, v, sinks), do)
    assert ours.shape == (14, 4, 40)
    outs = []
    for b in range(3):
        qb, kb, vb = (t[c[b]:c[b + 1]] for t, c in ((q, cu_q), (k, cu_k), (v, cu_k)))
        outs.append(R.flash_attention(qb[None].double(), kb[None].double(), vb[None].double(), causal=True,
                                      window_size=(4, 0), sinks=sinks.double())[0][0])
    torch.testing.assert_close(ours.double(), torch.cat(outs), atol=1e-4, rtol=1e-4)
    # the gradients against the same function on the torch backend (its own autograd of plain ops)
    with fasttx.use_backend("torch"):
        _, gt = _flash_grads(fn, (q, k, v, sinks), do)
    for a, b in zip(g, gt):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert sum(lens_q) == q.shape[0] and sum(lens_k) == k.shape[0]


@pytest.mark.parametrize("S,Lq", [(600, 1), (20, 3)], ids=["decode-split", "short"])
def test_kvcache_sinks_and_value_head_dim(backend, device, S, Lq):
    # S >= 512 with one query takes the flash-decoding split path (partials + combine) on Triton
    B, H, Hk, D, Dv = 2, 4, 2, 32, 16
    q = _randn(B, Lq, H, D, device=device, seed=1)
    kc, vc = _randn(B, S, Hk, D, device=device, seed=2), _randn(B, S, Hk, Dv, device=device, seed=3)
    lens = torch.tensor([S - 7, S // 2], dtype=torch.int32, device=device)
    sinks = _randn(H, device=device, seed=4, scale=3.0)
    out, lse = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, causal=True, learnable_sink=sinks,
                                       return_softmax_lse=True)
    assert out.shape == (B, Lq, H, Dv)
    for b in range(B):
        n = int(lens[b])
        ref, rl = R.flash_attention(q[b:b + 1].double(), kc[b:b + 1, :n].double(), vc[b:b + 1, :n].double(),
                                    causal=True, sinks=sinks.double())
        torch.testing.assert_close(out[b:b + 1].double(), ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(lse[b:b + 1].double(), rl, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bad,match", [
    (lambda d: torch.zeros(3, device=d), r"learnable_sink must be a floating-point tensor of shape \(nheads,\)"),
    (lambda d: torch.zeros(4, dtype=torch.int64, device=d), "learnable_sink must be a floating-point"),
    (lambda d: [0.0] * 4, "learnable_sink must be a floating-point"),
])
def test_flash_bad_sinks(backend, device, bad, match):
    q, k, v = (_randn(1, 5, 4, 16, device=device, seed=i) for i in range(3))
    with pytest.raises(ValueError, match=match):
        flash_attn_func(q, k, v, learnable_sink=bad(device))


def test_flash_bad_value_shape(backend, device):
    q, k = _randn(1, 5, 4, 16, device=device), _randn(1, 6, 2, 16, device=device)
    with pytest.raises(ValueError, match="headdim_v"):
        flash_attn_func(q, k, _randn(1, 7, 2, 16, device=device))  # v's seqlen differs from k's
    with pytest.raises(ValueError, match="at most 256"):
        flash_attn_func(q, k, _randn(1, 6, 2, 264, device=device))


def test_sink_gradient_deterministic(backend, device):
    q, k, v = (_randn(2, 11, 4, 16, device=device, seed=i) for i in range(3))
    sinks = _randn(4, device=device, seed=9)

    def run():
        s = sinks.clone().requires_grad_()
        flash_attn_func(q, k, v, causal=True, learnable_sink=s).square().sum().backward()
        return s.grad

    assert torch.equal(run(), run())


# ------------------------------------------------------------------------------------------------
# SDPA's semantics with sinks (fasttx.ops.attention.sdpa_with_sinks: what the transformers
# integration calls for gpt-oss with a padding mask)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,kw", [
    (fp32, dict(is_causal=True, enable_gqa=True)),
    (fp32, dict(mask="bool")),   # a padded row and a fully masked query row
    (bf16, dict(mask="float", enable_gqa=True)),
], ids=["causal-gqa", "bool-mask", "bf16-float-mask"])
def test_sdpa_with_sinks(backend, device, dtype, kw):
    from fasttx.ops.attention import sdpa_with_sinks

    kw = dict(kw)
    mask = kw.pop("mask", None)
    Hkv = 2 if kw.get("enable_gqa") else 4
    q = _randn(2, 4, 9, 16, dtype=dtype, device=device, seed=1)
    k, v = _randn(2, Hkv, 12, 16, dtype=dtype, device=device, seed=2), _randn(2, Hkv, 12, 24, dtype=dtype,
                                                                             device=device, seed=3)
    sinks = _randn(4, device=device, seed=4, scale=2.0)  # fp32 parameters in a bf16 model too
    if mask == "bool":
        m = torch.ones(2, 1, 9, 12, dtype=torch.bool, device=device)
        m[1, :, :, -3:] = False  # padding
        m[0, :, 4] = False  # one query row sees nothing: zeros
        kw["attn_mask"] = m
    elif mask == "float":
        kw["attn_mask"] = _randn(2, 1, 9, 12, dtype=dtype, device=device, seed=6)
    do = _randn(2, 4, 9, 24, dtype=dtype, device=device, seed=5)
    ours, g = _flash_grads(lambda q, k, v, s: sdpa_with_sinks(q, k, v, sinks=s, **kw), (q, k, v, sinks), do)
    ref_fn = lambda q, k, v, s: R.scaled_dot_product_attention(q, k, v, sinks=s, **kw)  # noqa: E731
    up = [t.double() for t in (q, k, v, sinks)]
    ref, gr = _flash_grads(lambda q, k, v, s: R.scaled_dot_product_attention(
        q, k, v, sinks=s, **dict(kw, attn_mask=kw["attn_mask"].double() if mask == "float" else kw.get("attn_mask"))),
        up, do.double())
    assert ours.shape == (2, 4, 9, 24) and ours.dtype == dtype and g[3].dtype == sinks.dtype
    if mask == "bool":
        assert torch.equal(ours[0, :, 4], torch.zeros_like(ours[0, :, 4]))
    if dtype == fp32:
        for a, b in zip((ours, *g), (ref, *gr)):
            torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)
    else:
        low, gl = _flash_grads(ref_fn, (q, k, v, sinks), do)
        assert_2x_rule(ours, low, ref)
        for name, a, b, c in zip(["q", "k", "v", "sink"], g, gl, gr):
            assert_2x_rule(a, b, c, mult=3.0, name=f"d{name}")


def test_sdpa_with_sinks_bad_sinks(backend, device):
    from fasttx.ops.attention import sdpa_with_sinks

    q = _randn(1, 4, 5, 16, device=device)
    with pytest.raises(RuntimeError, match=r"sinks must be a floating-point tensor of shape \(Hq,\)"):
        sdpa_with_sinks(q, q, q, sinks=torch.zeros(2, device=device))


def test_flash_sink_gradient_alone_bf16(backend, device):
    # only the sinks require grad (frozen q/k/v): the backward still gets the fp32 output for delta
    q, k, v = (_randn(1, 13, 2, 32, dtype=bf16, device=device, seed=i) for i in range(3))
    sinks = _randn(2, device=device, seed=7).requires_grad_()
    do = _randn(1, 13, 2, 32, dtype=bf16, device=device, seed=8)
    (ours,) = torch.autograd.grad(flash_attn_func(q, k, v, causal=True, learnable_sink=sinks), sinks, do)
    s64 = sinks.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(R.flash_attention(q.double(), k.double(), v.double(), causal=True, sinks=s64)[0],
                                 s64, do.double())
    s16 = sinks.detach().requires_grad_()
    (low,) = torch.autograd.grad(R.flash_attention(q, k, v, causal=True, sinks=s16)[0], s16, do)
    assert_2x_rule(ours, low, ref, mult=3.0, atol=ATOL_FLOOR[bf16], name="dsink")


def test_dropout_replay_with_sinks_and_value_head_dim(device):
    # The kernels' keep-mask replayed through the oracle: out, dq, dk, dv and the sink's gradient
    # (ds_h = -sum_i P_sink_i delta_i holds with dropout too: delta_i = dO_i . O_i of the dropped O).
    if not fasttx._backend.triton_available():
        pytest.skip("triton is not installed")
    from fasttx.kernels import attention as K
    q = _randn(1, 2, 20, 16, device=device, seed=1)  # (B, H, L, E): the launchers' layout
    k, v = _randn(1, 2, 24, 16, device=device, seed=2), _randn(1, 2, 24, 8, device=device, seed=3)
    sinks, do = _randn(2, device=device, seed=4), _randn(1, 2, 20, 8, device=device, seed=5)
    opts = dict(scale=0.25, dropout_p=0.4, seed=77, is_causal=True, causal_offset=4, sinks=sinks)
    out, lse, keep = K.attention_forward(q, k, v, None, return_mask=True, **opts)
    g = K.attention_backward(do, q, k, v, None, out, lse, **opts)
    tr = lambda t: t.transpose(1, 2).double()  # noqa: E731  (B, L, H, *) for the oracle
    ref, gr = _flash_grads(lambda q, k, v, s: R.flash_attention(q, k, v, softmax_scale=0.25, causal=True, dropout_p=0.4,
                                                                dropout_mask=keep, sinks=s)[0],
                           (tr(q), tr(k), tr(v), sinks.double()), tr(do))
    torch.testing.assert_close(tr(out), ref, atol=1e-4, rtol=1e-4)
    for a, b in zip(g[:3], gr[:3]):
        torch.testing.assert_close(tr(a), b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(g[3].double(), gr[3], atol=1e-4, rtol=1e-4)


def test_compiles_fullgraph_with_sinks_and_value_head_dim(backend, device):
    # the custom ops' optional sinks argument and Ev-shaped fakes trace under torch.compile
    from fasttx.ops.attention import sdpa_with_sinks

    q, k = _randn(1, 7, 4, 16, device=device, seed=1), _randn(1, 9, 2, 16, device=device, seed=2)
    v, s = _randn(1, 9, 2, 8, device=device, seed=3), _randn(4, device=device, seed=4)
    flash_attn_func(q, k, v)  # the interpreter's one-time warning outside the traced call
    leaves = [t.clone().requires_grad_() for t in (q, k, v, s)]
    fl = torch.compile(lambda q, k, v, s: flash_attn_func(q, k, v, causal=True, learnable_sink=s), fullgraph=True,
                       backend="aot_eager")
    sd = torch.compile(lambda q, k, v, s: sdpa_with_sinks(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                          is_causal=True, enable_gqa=True, sinks=s),
                       fullgraph=True, backend="aot_eager")
    out = fl(*leaves)
    torch.autograd.grad(out.sum(), leaves)
    torch.testing.assert_close(out, flash_attn_func(q, k, v, causal=True, learnable_sink=s))
    assert sd(*leaves).shape == (1, 4, 7, 8)
