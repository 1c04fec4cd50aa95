"""fasttx.flash.flash_attn_func against a plain fp64 oracle with flash-attn's semantics
(fasttx.reference.flash_attention), on both backends: forward and dq, dk, dv.

fp32 is held to 1e-4 of the fp64 oracle; 16-bit inputs to the 2x rule (tests/README.md) with the
oracle's own result in that dtype as the yardstick (3x for the gradients)."""
import warnings

import pytest
import torch

import fasttx
from fasttx import reference as R
from fasttx.flash import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

from utils import ATOL_FLOOR, assert_2x_rule

fp32, fp16, bf16 = torch.float32, torch.float16, torch.bfloat16


def _qkv(B, Lq, Lk, H, Hk, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return mk(B, Lq, H, D), mk(B, Lk, Hk, D), mk(B, Lk, Hk, D), mk(B, Lq, H, D)


def _grads(fn, q, k, v, do):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    return out.detach(), torch.autograd.grad(out, (q, k, v), do)


def check_flash(q, k, v, do, **kw):
    ours, g = _grads(lambda *t: flash_attn_func(*t, **kw), q, k, v, do)
    ref_kw = {n: kw[n] for n in ("causal", "window_size", "softcap", "alibi_slopes", "softmax_scale") if n in kw}
    ref, gr = _grads(lambda *t: R.flash_attention(*t, **ref_kw)[0], q.double(), k.double(), v.double(), do.double())
    assert ours.shape == q.shape and ours.dtype == q.dtype and ours.is_contiguous()
    if q.dtype == fp32:
        for a, b in zip((ours, *g), (ref, *gr)):
            torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)
    else:
        low, gl = _grads(lambda *t: R.flash_attention(*t, **ref_kw)[0], q, k, v, do)
        atol = ATOL_FLOOR[q.dtype]  # bf16 stores round as on a GPU (tests/_interpreter_bf16.py)
        assert_2x_rule(ours, low, ref, atol=atol)
        for name, a, b, c in zip("qkv", g, gl, gr):
            assert_2x_rule(a, b, c, mult=3.0, atol=atol, name=f"d{name}")
    return ours, g


@pytest.mark.parametrize("Lq,Lk", [(13, 13), (7, 29), (29, 7), (1, 40)], ids=["square", "q<k", "q>k", "decode"])
@pytest.mark.parametrize("causal", [False, True])
def test_causal_bottom_right(backend, device, Lq, Lk, causal):
    check_flash(*_qkv(2, Lq, Lk, 2, 2, 16, fp32, device), causal=causal)


def test_bottom_right_alignment_is_flash_attns(backend, device):
    # Lq < Lk: the last query sees every key (top-left alignment would hide the last Lk - Lq);
    # Lq > Lk: the first Lq - Lk queries see no key and give exactly zero.
    q, k, v, _ = _qkv(1, 3, 8, 1, 1, 16, fp32, device)
    out = flash_attn_func(q, k, v, causal=True)
    full = flash_attn_func(q[:, -1:], k, v)  # one query, no mask
    torch.testing.assert_close(out[:, -1], full[:, 0], atol=1e-6, rtol=1e-6)
    q, k, v, _ = _qkv(1, 8, 3, 1, 1, 16, fp32, device)
    out = flash_attn_func(q, k, v, causal=True)
    assert (out[:, :5] == 0).all() and (out[:, 5:] != 0).any()


@pytest.mark.parametrize("dtype", [fp16, bf16])
@pytest.mark.parametrize("causal", [False, True])
def test_16bit(backend, device, dtype, causal):
    check_flash(*_qkv(1, 21, 37, 2, 2, 32, dtype, device), causal=causal)


@pytest.mark.parametrize("hk", [2, 1], ids=["gqa", "mqa"])
def test_gqa(backend, device, hk):
    _, g = check_flash(*_qkv(2, 11, 19, 4, hk, 16, fp32, device), causal=True)
    assert g[1].shape == (2, 19, hk, 16)


def test_scale_and_lse(backend, device):
    q, k, v, do = _qkv(2, 9, 14, 2, 1, 16, fp32, device)
    check_flash(q, k, v, do, causal=True, softmax_scale=0.3)
    out, lse, probs = flash_attn_func(q, k, v, softmax_scale=0.3, causal=True, return_attn_probs=True)
    ref_lse = R.flash_attention(q.double(), k.double(), v.double(), softmax_scale=0.3, causal=True)[1]
    assert lse.shape == (2, 2, 9) and lse.dtype == fp32 and probs.shape == (0,)  # S_dmask: empty without dropout
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


# Features that run the torch path on both backends for now (the Triton backend warns once).
FEATURES = {
    "window_left": dict(window_size=(3, -1)),
    "window_right": dict(window_size=(-1, 2)),
    "window_both": dict(window_size=(4, 1)),
    "window_zero": dict(window_size=(0, 0)),
    "window_causal": dict(window_size=(3, -1), causal=True),
    "softcap": dict(softcap=2.0),
    "alibi_heads": dict(alibi_slopes=torch.tensor([0.5, 0.25])),
    "alibi_batch_heads": dict(alibi_slopes=torch.tensor([[0.5, 0.25], [0.125, 1.0]]), causal=True),
}


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("Lq,Lk", [(9, 17), (17, 9)], ids=["q<k", "q>k"])
def test_window_softcap_alibi(backend, device, feature, Lq, Lk):
    kw = {n: (a.to(device) if isinstance(a, torch.Tensor) else a) for n, a in FEATURES[feature].items()}
    q, k, v, do = _qkv(2, Lq, Lk, 2, 2, 16, fp32, device)
    q = q * 3  # larger scores, so softcap and ALiBi matter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Triton backend's fallback warning
        check_flash(q, k, v, do, **kw)


def test_features_run_in_the_kernel(device, monkeypatch):
    # Window, softcap and ALiBi reach the kernels as flags (no fallback warning, no torch path).
    if not fasttx._backend.triton_available():
        pytest.skip("triton is not installed")
    from fasttx.kernels import attention as K
    seen = []
    real_f, real_b = K.attention_forward, K.attention_backward
    # the launchers' options: an AttnOptions (argument 4 of the forward, 7 of the backward) or keywords
    opts = lambda a, kw, i: a[i]._asdict() if len(a) > i else kw  # noqa: E731
    monkeypatch.setattr(K, "attention_forward", lambda *a, **kw: seen.append(opts(a, kw, 4)) or real_f(*a, **kw))
    monkeypatch.setattr(K, "attention_backward", lambda *a, **kw: seen.append(opts(a, kw, 7)) or real_b(*a, **kw))
    q, k, v, do = _qkv(1, 5, 6, 2, 1, 16, fp32, device)
    q.requires_grad_()
    with fasttx.use_backend("triton"), warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback warning would fail here
        out = flash_attn_func(q, k, v, softcap=1.0, window_size=(2, 1), alibi_slopes=torch.ones(2, device=device))
        out.sum().backward()
    assert len(seen) == 2
    for kw in seen:
        assert kw["softcap"] == 1.0 and kw["window_offset"] == 6 - 5 - 2 and kw["alibi_slopes"] is not None
        assert kw["is_causal"] and kw["causal_offset"] == 6 - 5 + 1


def test_16bit_features(backend, device):
    q, k, v, do = _qkv(1, 19, 27, 2, 1, 32, fp16, device)
    check_flash(q * 2, k, v, do, window_size=(5, 3), softcap=3.0, alibi_slopes=torch.tensor([0.3, 0.1], device=device))


def test_dropout_replay_with_window(device):
    # The kernels' keep-mask, replayed through the oracle, gives the kernels' output and gradients.
    if not fasttx._backend.triton_available():
        pytest.skip("triton is not installed")
    from fasttx.kernels import attention as K
    q, k, v, do = _qkv(1, 20, 24, 2, 2, 16, fp32, device)
    opts = dict(is_causal=True, causal_offset=4 + 1, window_offset=4 - 6, softcap=2.0)
    qh, kh, vh, doh = (t.transpose(1, 2) for t in (q, k, v, do))
    out, lse, keep = K.attention_forward(qh, kh, vh, None, scale=0.25, dropout_p=0.4, seed=77, return_mask=True, **opts)
    g = K.attention_backward(doh, qh, kh, vh, None, out, lse, scale=0.25, dropout_p=0.4, seed=77, **opts)
    kept = keep.float().mean().item()
    assert abs(kept - 0.6) < 0.08
    ref, gr = _grads(lambda *t: R.flash_attention(*t, softmax_scale=0.25, window_size=(6, 1), softcap=2.0,
                                                  dropout_p=0.4, dropout_mask=keep)[0],
                     q.double(), k.double(), v.double(), do.double())
    torch.testing.assert_close(out.transpose(1, 2).double(), ref, atol=1e-4, rtol=1e-4)
    for a, b in zip(g, gr):
        torch.testing.assert_close(a.transpose(1, 2).double(), b, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# flash_attn_varlen_func
# ------------------------------------------------------------------------------------------------
def _packed(lens_q, lens_k, H, Hk, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    cu = lambda lens: torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)  # noqa: E731
    tq, tk = sum(lens_q), sum(lens_k)
    return mk(tq, H, D), mk(tk, Hk, D), mk(tk, Hk, D), mk(tq, H, D), cu(lens_q), cu(lens_k)


def _varlen_oracle(q, k, v, cu_q, cu_k, alibi=None, **kw):
    outs, lses = [], []
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cq) - 1):
        a = alibi[b] if alibi is not None and alibi.dim() == 2 else alibi
        o, s = R.flash_attention(q[None, cq[b]:cq[b + 1]], k[None, ck[b]:ck[b + 1]], v[None, ck[b]:ck[b + 1]],
                                 alibi_slopes=a, **kw)
        outs.append(o[0])
        lses.append(s[0])
    return torch.cat(outs), torch.cat(lses, dim=-1)


VARLEN = {
    "plain": dict(),
    "causal": dict(causal=True),
    "window": dict(window_size=(2, 1)),
    "softcap_alibi": dict(softcap=2.0, alibi="batch", causal=True),
}


@pytest.mark.parametrize("case", list(VARLEN))
def test_varlen(backend, device, case):
    # sequences of length 0 and 1, Lq < Lk and Lq > Lk, one longer than a kernel block (32)
    lens_q, lens_k = [3, 0, 1, 7, 35], [5, 0, 4, 2, 40]
    q, k, v, do, cu_q, cu_k = _packed(lens_q, lens_k, 4, 2, 16, fp32, device)
    kw = dict(VARLEN[case])
    if kw.pop("alibi", None):
        kw["alibi_slopes"] = torch.rand(5, 4, device=device)
    q = q * 2

    def fn(q, k, v):
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), **kw)

    ours, g = _grads(fn, q, k, v, do)
    alibi = kw.pop("alibi_slopes", None)
    ref, gr = _grads(lambda *t: _varlen_oracle(*t, cu_q, cu_k, alibi=alibi, **kw)[0],
                     q.double(), k.double(), v.double(), do.double())
    assert ours.shape == q.shape
    for a, b in zip((ours, *g), (ref, *gr)):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), return_attn_probs=True,
                                         alibi_slopes=alibi, **kw)
    ref_lse = _varlen_oracle(q.double(), k.double(), v.double(), cu_q, cu_k, alibi=alibi, **kw)[1]
    assert lse.shape == (4, sum(lens_q))
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


def test_varlen_matches_padded_batch(backend, device):
    # A packed batch gives the padded batch's output and gradients on the real tokens.
    lens = [6, 2]
    q, k, v, do, cu, _ = _packed(lens, lens, 2, 2, 16, fp32, device)
    ours, g = _grads(lambda *t: flash_attn_varlen_func(*t, cu, cu, 6, 6, causal=True), q, k, v, do)
    for b, (s, n) in enumerate(zip(cu.tolist(), lens)):
        sl = slice(s, s + n)
        ref, gr = _grads(lambda *t: flash_attn_func(*t, causal=True),
                         q[None, sl], k[None, sl], v[None, sl], do[None, sl])
        torch.testing.assert_close(ours[sl], ref[0], atol=1e-5, rtol=1e-5)
        for a, r in zip(g, gr):
            torch.testing.assert_close(a[sl], r[0], atol=1e-5, rtol=1e-5)


def test_varlen_dropout_reproducible(backend, device):
    q, k, v, do, cu_q, cu_k = _packed([9, 1, 12], [9, 3, 12], 2, 1, 16, fp32, device)

    def run(seed):
        torch.manual_seed(seed)
        return _grads(lambda *t: flash_attn_varlen_func(*t, cu_q, cu_k, 12, 12, dropout_p=0.3), q, k, v, do)

    (o1, g1), (o2, g2), (o3, _) = run(0), run(0), run(1)
    assert torch.equal(o1, o2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert not torch.equal(o1, o3)


def test_varlen_paged_matches_packed(backend, device):
    # flash_attn_varlen_func with block_table (forward only): the packed keys, scattered over
    # shuffled pages of 16 rows, give the packed result.
    lens_q, lens_k, page = [2, 0, 5], [20, 3, 33], 16
    q, k, v, _, cu_q, cu_k = _packed(lens_q, lens_k, 2, 1, 16, fp32, device)
    ref = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 33, causal=True, softcap=5.0)
    n = [-(-x // page) for x in lens_k]
    perm = torch.randperm(sum(n) + 1, generator=torch.Generator().manual_seed(3)).tolist()
    table = torch.zeros(3, max(n), dtype=torch.int32)
    pk, pv = torch.zeros(sum(n) + 1, page, 1, 16), torch.zeros(sum(n) + 1, page, 1, 16)
    used, start = 0, 0
    for b, x in enumerate(lens_k):
        for i in range(n[b]):
            p, rows = perm[used], slice(start + i * page, min(start + (i + 1) * page, start + x))
            table[b, i] = p
            m = rows.stop - rows.start
            pk[p, :m], pv[p, :m] = k[rows].cpu(), v[rows].cpu()
            used += 1
        start += x
    out = flash_attn_varlen_func(q, pk.to(device), pv.to(device), cu_q, cu_k, 5, 33, causal=True, softcap=5.0,
                                 block_table=table.to(device))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["cu_dtype", "cu_end", "heads", "rank", "max_seqlen", "cu_count"])
def test_varlen_bad_inputs(backend, device, case):
    q, k, v, _, cu_q, cu_k = _packed([3, 4], [3, 4], 4, 2, 16, fp32, device)
    args = [q, k, v, cu_q, cu_k, 4, 4]
    if case == "cu_dtype":
        args[3], match = cu_q.long(), "int32"
    elif case == "cu_end":
        args[4], match = cu_k - 0 + torch.tensor([0, 0, 1], dtype=torch.int32, device=device), "end at the packed"
    elif case == "heads":
        args[0], match = q[:, :3], "divisible"
    elif case == "rank":
        args[0], match = q[None], "3-D tensor"
    elif case == "max_seqlen":
        args[5], match = 2, "max_seqlen"
    else:
        args[3], match = cu_q[:2], "cu_seqlens_q"
    with pytest.raises(ValueError, match=match):
        flash_attn_varlen_func(*args)


def test_dropout_reproducible(backend, device):
    q, k, v, do = _qkv(1, 16, 24, 2, 2, 16, fp32, device)

    def run(seed):
        torch.manual_seed(seed)
        return _grads(lambda *t: flash_attn_func(*t, dropout_p=0.3, causal=True), q, k, v, do)

    (o1, g1), (o2, g2), (o3, _) = run(0), run(0), run(1)
    assert torch.equal(o1, o2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert not torch.equal(o1, o3)
    assert (flash_attn_func(q, k, v, dropout_p=1.0) == 0).all()


@pytest.mark.parametrize("case", ["heads", "rank", "dtype", "kv_shape", "window", "alibi", "dropout"])
def test_bad_inputs(backend, device, case):
    q, k, v, _ = _qkv(1, 5, 6, 4, 2, 16, fp32, device)
    args, kw, match = (q, k, v), {}, None
    if case == "heads":
        args, match = (q[:, :, :3], k, v), "divisible by the number of key/value heads"
    elif case == "rank":
        args, match = (q[0], k, v), "4-D tensor"
    elif case == "dtype":
        args, match = (q.half(), k, v), "share one dtype"
    elif case == "kv_shape":
        args, match = (q, k, v[:, :5]), "k and v must be"
    elif case == "window":
        kw, match = dict(window_size=(-2, 0)), "window_size"
    elif case == "alibi":
        kw, match = dict(alibi_slopes=torch.ones(3, device=device)), "alibi_slopes"
    elif case == "dropout":
        kw, match = dict(dropout_p=1.5), "dropout_p"
    with pytest.raises(ValueError, match=match):
        flash_attn_func(*args, **kw)


# ------------------------------------------------------------------------------------------------
# flash_attn_with_kvcache
# ------------------------------------------------------------------------------------------------
def _rope_oracle(x, cos, sin, pos, interleaved):
    # Independent of fasttx.flash: complex multiplication (interleaved pairs) or rotate-half (NeoX).
    x = x.double()
    rd = 2 * cos.shape[1]
    ang = torch.complex(cos.double()[pos], sin.double()[pos])[:, :, None]  # (B, L, 1, rd/2)
    r = x[..., :rd]
    if interleaved:
        z = torch.view_as_complex(r.reshape(*r.shape[:-1], rd // 2, 2).contiguous()) * ang
        r = torch.view_as_real(z).flatten(-2)
    else:
        z = torch.complex(r[..., :rd // 2], r[..., rd // 2:]) * ang
        r = torch.cat((z.real, z.imag), dim=-1)
    return torch.cat((r, x[..., rd:]), dim=-1)


def _kvcache_oracle(q, cache_k, cache_v, k_new, v_new, seqlens, rows, leftpad, rope, interleaved, causal, **kw):
    """(out fp64, expected k cache, expected v cache): the append and rotary done by hand."""
    B, Lq = q.shape[:2]
    Lnew = k_new.shape[1] if k_new is not None else 0
    ck, cv = cache_k.double().clone(), cache_v.double().clone()
    q = q.double()
    if k_new is not None:
        if rope is not None:
            pos0 = torch.tensor(seqlens)  # absolute cache positions (flash-attn's, also with a left pad)
            kpos = pos0[:, None] + torch.arange(Lnew)
            qpos = pos0[:, None] + (torch.arange(Lq) if causal or kw.get("window_size", (-1, -1)) != (-1, -1)
                                    else torch.zeros(Lq, dtype=torch.long))
            k_new = _rope_oracle(k_new, *rope, kpos, interleaved)
            q = _rope_oracle(q, *rope, qpos, interleaved)
        for b in range(B):
            ck[rows[b], seqlens[b]:seqlens[b] + Lnew] = k_new[b].double()
            cv[rows[b], seqlens[b]:seqlens[b] + Lnew] = v_new[b].double()
    outs = []
    for b in range(B):
        lo, hi = leftpad[b], seqlens[b] + Lnew
        outs.append(R.flash_attention(q[b:b + 1], ck[None, rows[b], lo:hi], cv[None, rows[b], lo:hi], causal=causal,
                                      **kw)[0])
    return torch.cat(outs), ck, cv


KVCACHE = {
    "append_rope": dict(rope=True, interleaved=True, causal=True),
    "append_rope_neox": dict(rope=True, interleaved=False, causal=False),
    "batch_idx_leftpad": dict(rows=[2, 0], leftpad=[1, 3], causal=True),
    "no_append": dict(append=False, window_size=(4, 0), softcap=2.0),
}


@pytest.mark.parametrize("case", list(KVCACHE))
def test_kvcache(backend, device, case):
    opt = dict(KVCACHE[case])
    B, Lq, H, Hk, D, S = 2, 2, 4, 2, 16, 40
    g = torch.Generator().manual_seed(1)
    mk = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    q, cache_k, cache_v = mk(B, Lq, H, D), mk(3, S, Hk, D), mk(3, S, Hk, D)
    append = opt.pop("append", True)
    k_new, v_new = (mk(B, 3, Hk, D), mk(B, 3, Hk, D)) if append else (None, None)
    seqlens, rows, leftpad = [5, 33], opt.pop("rows", [0, 1]), opt.pop("leftpad", [0, 0])
    rope = (torch.cos(mk(64, 4)), torch.sin(mk(64, 4))) if opt.pop("rope", False) else None
    interleaved, causal = opt.pop("interleaved", True), opt.pop("causal", False)
    out_ref, ck_ref, cv_ref = _kvcache_oracle(q, cache_k, cache_v, k_new, v_new, seqlens, rows, leftpad, rope,
                                              interleaved, causal, **opt)
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
    out, lse = flash_attn_with_kvcache(
        q, cache_k, cache_v, k_new, v_new, rotary_cos=rope[0] if rope else None, rotary_sin=rope[1] if rope else None,
        cache_seqlens=i32(seqlens), cache_batch_idx=i32(rows), cache_leftpad=i32(leftpad) if any(leftpad) else None,
        causal=causal, rotary_interleaved=interleaved, return_softmax_lse=True, **opt)
    assert out.shape == q.shape and lse.shape == (B, H, Lq)
    torch.testing.assert_close(out.double(), out_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cache_k.double(), ck_ref, atol=1e-5, rtol=1e-5)  # appended in place
    torch.testing.assert_close(cache_v.double(), cv_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("page", [8, 48])
def test_kvcache_paged_matches_dense(backend, device, page):
    # A paged cache with a shuffled block table gives the dense cache's result; the append lands in
    # the right pages. 528 keys: the decode (flash-decoding split) path with per-batch lengths.
    B, H, Hk, D, S = 2, 2, 1, 16, 528
    g = torch.Generator().manual_seed(2)
    mk = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    q, dense_k, dense_v = mk(B, 1, H, D), mk(B, S, Hk, D), mk(B, S, Hk, D)
    k_new, v_new = mk(B, 1, Hk, D), mk(B, 1, Hk, D)
    n = S // page
    perm = torch.randperm(B * n, generator=g)
    table = perm.view(B, n).to(torch.int32).to(device)
    paged_k = torch.empty(B * n, page, Hk, D, device=device)
    paged_v = torch.empty_like(paged_k)
    paged_k[table.long()] = dense_k.view(B, n, page, Hk, D)
    paged_v[table.long()] = dense_v.view(B, n, page, Hk, D)
    seqlens = torch.tensor([S - 1, 100], dtype=torch.int32, device=device)
    kw = dict(cache_seqlens=seqlens, causal=True, alibi_slopes=torch.tensor([0.2, 0.05], device=device))
    ref = flash_attn_with_kvcache(q, dense_k, dense_v, k_new, v_new, **kw)
    out = flash_attn_with_kvcache(q, paged_k, paged_v, k_new, v_new, block_table=table, **kw)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(paged_k[table.long()].reshape(B, S, Hk, D), dense_k)
    ref_full = R.flash_attention(q.double()[1:], dense_k.double()[1:, :101], dense_v.double()[1:, :101], causal=True,
                                 alibi_slopes=kw["alibi_slopes"].double())[0]
    torch.testing.assert_close(out[1:].double(), ref_full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["overflow", "table_dtype", "leftpad_paged", "seqlens_dtype", "new_shape"])
def test_kvcache_bad_inputs(backend, device, case):
    q, ck, cv = torch.randn(2, 1, 2, 16), torch.randn(2, 8, 1, 16), torch.randn(2, 8, 1, 16)
    kw = dict(cache_seqlens=torch.tensor([3, 8], dtype=torch.int32),
              k=torch.randn(2, 1, 1, 16), v=torch.randn(2, 1, 1, 16))
    if case == "overflow":
        match = "fit the cache"
    elif case == "table_dtype":
        kw["block_table"], match = torch.zeros(2, 1, dtype=torch.int64), "block_table"
    elif case == "leftpad_paged":
        kw.update(block_table=torch.zeros(2, 1, dtype=torch.int32), cache_leftpad=torch.zeros(2, dtype=torch.int32))
        match = "cache_leftpad"
    elif case == "seqlens_dtype":
        kw["cache_seqlens"], match = torch.tensor([1, 2]), "cache_seqlens"
    else:
        kw["k"], kw["v"], match = torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16), "k and v must be"
    with pytest.raises(ValueError, match=match):
        flash_attn_with_kvcache(q.to(device), ck.to(device), cv.to(device), **{
            n: (t.to(device) if isinstance(t, torch.Tensor) else t) for n, t in kw.items()})


# ------------------------------------------------------------------------------------------------
# HuggingFace: packed sequences run as varlen, sliding windows in the kernel
# ------------------------------------------------------------------------------------------------
def test_hf_attention_uses_flash(backend, device, monkeypatch):
    hf = pytest.importorskip("fasttx.integrations.huggingface")
    import fasttx.flash as X

    calls = []
    for name in ("flash_attn_varlen_func", "flash_attn_func"):
        real = getattr(X, name)
        monkeypatch.setattr(X, name, lambda *a, _r=real, _n=name, **kw: calls.append(_n) or _r(*a, **kw))
    module = torch.nn.Module()
    module.is_causal = True
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 4, 9, 16, generator=g).to(device) for _ in range(3))  # (B=1, H, L, E)
    k, v = k[:, :2], v[:, :2]  # GQA
    # position_ids restarting at 0: sequences [0, 5) and [5, 9), each causal within itself
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]], device=device)
    out, _ = hf.fasttx_attention_forward(module, q, k, v, None, position_ids=pos)
    for sl in (slice(0, 5), slice(5, 9)):
        ref = R.flash_attention(*(t[:, :, sl].transpose(1, 2).double() for t in (q, k, v)), causal=True)[0]
        torch.testing.assert_close(out[:, sl].double(), ref, atol=1e-5, rtol=1e-5)
    # sliding window 3 without a mask: i - 3 < j <= i
    out, _ = hf.fasttx_attention_forward(module, q, k, v, None, sliding_window=3)
    ref = R.flash_attention(*(t.transpose(1, 2).double() for t in (q, k, v)), causal=True, window_size=(2, 0))[0]
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert calls == ["flash_attn_varlen_func", "flash_attn_func"]
