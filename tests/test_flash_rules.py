"""fasttx.flash against flash-attn 2.8's documented rules, as its own tests exercise them (the rules
restated here in our words, the oracles written from them, on both backends):

- kv-cache rotary: the new keys are rotated at their absolute cache positions cache_seqlens + i,
  also when cache_leftpad moves the first key; queries at cache_seqlens + i when causal or local,
  else all at cache_seqlens. A cos/sin table as long as the cache is always enough for k.
- a window side at least as long as the keys is unbounded (its -1).
- window_size may be a 2-element integer tensor (flash-attn's tests pass torch.randint(0, n, (2,))).
- varlen with a paged cache (block_table) runs its forward on inputs that require grad.
- return_attn_probs with dropout gives S_dmask: (B, H, Lq and Lk rounded up to 128), the
  probabilities with the dropped entries negated, for the mask the call applied.
"""
import warnings

import pytest
import torch

import fasttx
from fasttx import reference as R
from fasttx.flash import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

fp32 = torch.float32


def _rand(*shape, g, device, dtype=fp32):
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def _i32(xs, device):
    return torch.tensor(xs, dtype=torch.int32, device=device)


# ------------------------------------------------------------------------------------------------
# kv-cache rotary positions and table length
# ------------------------------------------------------------------------------------------------
def _rotate(x, cos, sin, pos, interleaved):
    """Rotary embedding in fp64 as complex multiplication: feature pairs (2i, 2i+1) when
    interleaved, else (i, i + rd/2), turned by the angle whose cos/sin are row pos of the table."""
    x = x.double()
    rd = 2 * cos.shape[1]
    turn = torch.complex(cos.double()[pos], sin.double()[pos])[:, :, None]  # (B, L, 1, rd/2)
    r = x[..., :rd]
    if interleaved:
        z = torch.view_as_complex(r.reshape(*r.shape[:-1], rd // 2, 2).contiguous()) * turn
        r = torch.view_as_real(z).flatten(-2)
    else:
        z = torch.complex(r[..., :rd // 2], r[..., rd // 2:]) * turn
        r = torch.cat((z.real, z.imag), dim=-1)
    return torch.cat((r, x[..., rd:]), dim=-1)


def _cache_oracle(q, ck, cv, k, v, seqlens, leftpad, cos, sin, interleaved, causal, per_row_q, window=(-1, -1)):
    """(out, k cache, v cache) in fp64: k rotated at cache_seqlens + i and written there, q rotated
    at cache_seqlens (+ i when per_row_q), batch b attending keys [leftpad_b, cache_seqlens_b + Lnew)."""
    B, Lq = q.shape[:2]
    Lnew = k.shape[1]
    pos0 = torch.tensor(seqlens)[:, None]
    kr = _rotate(k, cos, sin, pos0 + torch.arange(Lnew), interleaved)
    qr = _rotate(q, cos, sin, pos0 + (torch.arange(Lq) if per_row_q else torch.zeros(Lq, dtype=torch.long)),
                 interleaved)
    ck, cv = ck.double().clone(), cv.double().clone()
    outs = []
    for b in range(B):
        ck[b, seqlens[b]:seqlens[b] + Lnew] = kr[b]
        cv[b, seqlens[b]:seqlens[b] + Lnew] = v[b].double()
        lo, hi = leftpad[b], seqlens[b] + Lnew
        outs.append(R.flash_attention(qr[b:b + 1], ck[None, b, lo:hi], cv[None, b, lo:hi], causal=causal,
                                      window_size=window)[0])
    return torch.cat(outs), ck, cv


@pytest.mark.parametrize("causal,interleaved", [(True, True), (False, False)])
def test_kvcache_rotary_with_leftpad_uses_absolute_positions(backend, device, causal, interleaved):
    g = torch.Generator().manual_seed(0)
    B, S, H, D, Lnew, Lq = 2, 24, 2, 16, 2, 2
    q, k, v = _rand(B, Lq, H, D, g=g, device=device), _rand(B, Lnew, H, D, g=g, device=device), \
        _rand(B, Lnew, H, D, g=g, device=device)
    ck, cv = _rand(B, S, H, D, g=g, device=device), _rand(B, S, H, D, g=g, device=device)
    angle = torch.rand(S, 4, generator=g) * 6.3  # a table exactly as long as the cache, rotary_dim 8 < D
    cos, sin = torch.cos(angle).to(device), torch.sin(angle).to(device)
    seqlens, leftpad = [6, 12], [2, 5]
    want, ck_want, cv_want = _cache_oracle(q, ck, cv, k, v, seqlens, leftpad, cos, sin, interleaved, causal,
                                           per_row_q=causal)
    out = flash_attn_with_kvcache(q, ck, cv, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=_i32(seqlens, device),
                                  cache_leftpad=_i32(leftpad, device), causal=causal, rotary_interleaved=interleaved)
    torch.testing.assert_close(ck.double(), ck_want, atol=1e-5, rtol=1e-5)  # rotated at 6, 7 and 12, 13
    torch.testing.assert_close(cv.double(), cv_want, atol=0, rtol=0)
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["non_causal", "wide_window", "causal"])
def test_kvcache_rotary_table_as_long_as_the_cache(backend, device, case):
    # The cache fills up to its last row (37 + 3 new = 40 = S) with a 4-query, 40-row table:
    # non-causal queries are all rotated at 37 and the call is valid (fasttx used to demand 37 + 4
    # rows). A window at least as wide as the cache is no window (flash-attn's -1): queries at 37
    # too. Causal queries sit at 37..40: row 40 is past the table, a clear ValueError.
    g = torch.Generator().manual_seed(1)
    B, S, H, D, Lnew, Lq = 1, 40, 1, 16, 3, 4
    q, k, v = _rand(B, Lq, H, D, g=g, device=device), _rand(B, Lnew, H, D, g=g, device=device), \
        _rand(B, Lnew, H, D, g=g, device=device)
    ck, cv = _rand(B, S, H, D, g=g, device=device), _rand(B, S, H, D, g=g, device=device)
    angle = torch.rand(S, 8, generator=g) * 6.3
    cos, sin = torch.cos(angle).to(device), torch.sin(angle).to(device)
    kw = dict(rotary_cos=cos, rotary_sin=sin, cache_seqlens=_i32([37], device), rotary_interleaved=True)
    if case == "causal":
        with pytest.raises(ValueError, match="rotary_cos/sin have 40 positions, but this call rotates at position 40"):
            flash_attn_with_kvcache(q, ck, cv, k, v, causal=True, **kw)
    else:
        window = (S, S) if case == "wide_window" else (-1, -1)
        want = _cache_oracle(q, ck, cv, k, v, [37], [0], cos, sin, True, False, per_row_q=False)[0]
        out = flash_attn_with_kvcache(q, ck, cv, k, v, window_size=window, **kw)
        torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)


def test_kvcache_rotary_needs_new_keys(backend, device):
    q, ck = torch.randn(1, 1, 1, 16, device=device), torch.randn(1, 8, 1, 16, device=device)
    cos = torch.ones(8, 4, device=device)
    with pytest.raises(ValueError, match="need k and v"):  # flash-attn refuses it too; never silently ignored
        flash_attn_with_kvcache(q, ck, ck.clone(), rotary_cos=cos, rotary_sin=cos, cache_seqlens=3)


# ------------------------------------------------------------------------------------------------
# window_size: tensors and lists; a side as long as the keys is unbounded
# ------------------------------------------------------------------------------------------------
def test_window_size_as_tensor_or_list(backend, device):
    g = torch.Generator().manual_seed(2)
    q, k, v = (_rand(1, 9, 2, 16, g=g, device=device) for _ in range(3))
    want = flash_attn_func(q, k, v, window_size=(3, 1))
    ref = R.flash_attention(q.double(), k.double(), v.double(), window_size=(3, 1))[0]
    torch.testing.assert_close(want.double(), ref, atol=1e-4, rtol=1e-4)
    for w in (torch.tensor([3, 1]), torch.tensor([3, 1], dtype=torch.int32, device=device), [3, 1]):
        assert torch.equal(flash_attn_func(q, k, v, window_size=w), want)
    cu = _i32([0, 9], device)
    packed = flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 9, 9, window_size=torch.tensor([3, 1]))
    torch.testing.assert_close(packed, want[0], atol=1e-5, rtol=1e-5)
    cached = flash_attn_with_kvcache(q, k, v, window_size=torch.tensor([3, 1]))
    torch.testing.assert_close(cached, want, atol=1e-5, rtol=1e-5)
    for bad in (torch.tensor([3.0, 1.0]), torch.tensor([3, 1, 0]), (3,), (1.5, 0)):
        with pytest.raises(ValueError, match="window_size"):
            flash_attn_func(q, k, v, window_size=bad)


def test_window_side_as_long_as_keys_is_unbounded(backend, device):
    # 6 queries, 2 keys (bottom-right aligned: query i sees key j when j - i + 4 <= right). A right
    # side of 3 >= Lk means no bound, as in flash-attn; bounded it would hide both keys from query 0.
    g = torch.Generator().manual_seed(3)
    q, k, v = _rand(1, 6, 1, 16, g=g, device=device), _rand(1, 2, 1, 16, g=g, device=device), \
        _rand(1, 2, 1, 16, g=g, device=device)
    out = flash_attn_func(q, k, v, window_size=(-1, 3))
    ref = R.flash_attention(q.double(), k.double(), v.double())[0]
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# varlen with a paged cache: forward with grad-requiring inputs, backward refused
# ------------------------------------------------------------------------------------------------
def _paged(k, lens_k, page, device):
    """Packed keys (total_k, Hk, D) -> (pages (n, page, Hk, D), block_table (B, max pages) int32), the
    pages of each sequence in reverse order so the table matters."""
    n = [-(-x // page) for x in lens_k]
    pages = torch.zeros(sum(n), page, *k.shape[1:], device=device)
    table = torch.zeros(len(lens_k), max(n), dtype=torch.int32)
    used, start = sum(n), 0
    for b, x in enumerate(lens_k):
        for i in range(n[b]):
            used -= 1
            rows = slice(start + i * page, min(start + (i + 1) * page, start + x))
            pages[used, :rows.stop - rows.start] = k[rows]
            table[b, i] = used
        start += x
    return pages, table.to(device)


def test_varlen_paged_forward_with_grad_inputs(backend, device):
    g = torch.Generator().manual_seed(4)
    lens_k = [9, 5]
    q = _rand(5, 2, 16, g=g, device=device).requires_grad_()
    k, v = _rand(14, 1, 16, g=g, device=device), _rand(14, 1, 16, g=g, device=device)
    cu_q, cu_k = _i32([0, 3, 5], device), _i32([0, 9, 14], device)
    (pk, table), (pv, _) = _paged(k, lens_k, 4, device), _paged(v, lens_k, 4, device)
    pk.requires_grad_()
    out = flash_attn_varlen_func(q, pk, pv, cu_q, cu_k, 3, 9, causal=True, block_table=table)
    want = flash_attn_varlen_func(q.detach(), k, v, cu_q, cu_k, 3, 9, causal=True)
    torch.testing.assert_close(out.detach(), want, atol=1e-5, rtol=1e-5)
    assert out.requires_grad
    with pytest.raises(RuntimeError, match="no backward through a paged KV cache"):
        out.sum().backward()


def test_varlen_paged_dropout_is_applied(backend, device):
    # The paged kernel has no dropout: the Triton path runs torch's ops (one warning), so dropout is
    # applied on both backends and the same seed gives the same result on both.
    g = torch.Generator().manual_seed(5)
    q, k, v = _rand(4, 2, 16, g=g, device=device), _rand(8, 1, 16, g=g, device=device), \
        _rand(8, 1, 16, g=g, device=device)
    cu_q, cu_k = _i32([0, 4], device), _i32([0, 8], device)
    (pk, table), (pv, _) = _paged(k, [8], 4, device), _paged(v, [8], 4, device)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.manual_seed(0)
        out = flash_attn_varlen_func(q, pk, pv, cu_q, cu_k, 4, 8, dropout_p=0.5, block_table=table)
    assert any("paged" in str(w.message) and "dropout" in str(w.message) for w in seen) == (backend == "triton")
    with fasttx.use_backend("torch"):  # torch's ops on the packed keys, same seed: the same mask
        torch.manual_seed(0)
        same = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 4, 8, dropout_p=0.5)
        plain = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 4, 8)
    torch.testing.assert_close(out, same, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, plain)


# ------------------------------------------------------------------------------------------------
# S_dmask
# ------------------------------------------------------------------------------------------------
def _probs(q, k, scale, left=-1, right=-1):
    """softmax(scale q k^T) in fp64 over the visible keys: bottom-right aligned distance
    d = i + Lk - Lq - j, visible when d <= left (left >= 0) and -d <= right (right >= 0)."""
    Lq, Lk = q.shape[1], k.shape[1]
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    d = torch.arange(Lq, device=q.device)[:, None] + Lk - Lq - torch.arange(Lk, device=q.device)[None, :]
    visible = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device)
    if left >= 0:
        visible &= d <= left
    if right >= 0:
        visible &= -d <= right
    return torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1), visible


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_s_dmask_is_the_applied_dropout(backend, device, dtype):
    g = torch.Generator().manual_seed(6)
    B, Lq, Lk, H, D, p = 2, 12, 20, 2, 16, 0.3
    q, k, v = (_rand(B, L, H, D, g=g, device=device, dtype=dtype) for L in (Lq, Lk, Lk))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse, S = flash_attn_func(q, k, v, dropout_p=p, causal=True, window_size=(6, -1), return_attn_probs=True)
    assert S.shape == (B, H, 128, 128) and S.dtype == dtype and not S.requires_grad
    assert (S[:, :, Lq:] == 0).all() and (S[:, :, :, Lk:] == 0).all()
    probs, visible = _probs(q, k, D ** -0.5, left=6, right=0)
    S = S[:, :, :Lq, :Lk].double()
    keep = ~torch.signbit(S)  # a dropped entry is negated (a dropped 0 is -0.0)
    tol = 1e-6 if dtype == fp32 else 1e-3
    torch.testing.assert_close(S.abs(), probs, atol=tol, rtol=tol)
    kept = keep[:, :, visible].float().mean().item()
    assert abs(kept - (1 - p)) < 0.1, kept
    # the output, and its gradients, are those of attention with exactly this mask
    want = torch.einsum("bhqk,bkhd->bqhd", S.clamp(min=0) / (1 - p), v.double())
    torch.testing.assert_close(out.double(), want, atol=tol * 10, rtol=tol * 10)
    do = torch.randn(out.shape, generator=g).to(device=device, dtype=dtype)
    grads = torch.autograd.grad(out, (q, k, v), do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = R.flash_attention(q64, k64, v64, causal=True, window_size=(6, -1), dropout_p=p, dropout_mask=keep)[0]
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b, atol=tol * 20, rtol=tol * 20)
    # without dropout flash-attn returns an empty S_dmask
    empty = flash_attn_func(q, k, v, return_attn_probs=True)[2]
    assert empty.shape == (0,) and empty.dtype == dtype


def test_s_dmask_varlen(backend, device):
    g = torch.Generator().manual_seed(7)
    lens_q, lens_k, p = [3, 0, 6], [5, 2, 130], 0.25
    q, k, v = _rand(9, 2, 16, g=g, device=device), _rand(137, 1, 16, g=g, device=device), \
        _rand(137, 1, 16, g=g, device=device)
    cu_q, cu_k = _i32([0, 3, 3, 9], device), _i32([0, 5, 7, 137], device)
    out, _, S = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 6, 130, dropout_p=p, causal=True,
                                       return_attn_probs=True)
    assert S.shape == (3, 2, 128, 256) and S.dtype == fp32
    for b, (q0, k0) in enumerate(zip([0, 3, 3], [0, 5, 7])):
        lq, lk = lens_q[b], lens_k[b]
        Sb = S[b, :, :lq, :lk].double()
        probs, _ = _probs(q[None, q0:q0 + lq], k[None, k0:k0 + lk].expand(1, lk, 2, 16), 16 ** -0.5, right=0)
        torch.testing.assert_close(Sb.abs(), probs[0], atol=1e-6, rtol=1e-6)
        want = torch.einsum("hqk,khd->qhd", Sb.clamp(min=0) / (1 - p), v[k0:k0 + lk].double().expand(lk, 2, 16))
        torch.testing.assert_close(out[q0:q0 + lq].double(), want, atol=1e-5, rtol=1e-5)
        assert (S[b, :, lq:] == 0).all() and (S[b, :, :, lk:] == 0).all()
