"""The attention forward's decode variants: GQA head packing (PACK_GQA: the query heads of one kv head
share a program, so K/V tiles are loaded once per kv head) and tensor-descriptor K/V tiles (USE_TMA).

Both are forward-only kernel variants chosen in kernels/attention/config.py (_pack_gqa, _use_tma) and
forced here through FASTTX_ATTN_PACK_GQA / FASTTX_ATTN_TMA. Checked against the fp64 oracle
(fasttx.reference) with the flash-attention rule (tests/README.md), against the unpacked pointer path
(the same kernel without the flag), and by counting under the interpreter the bytes of K/V each
decode call loads: packed, every K/V byte once; unpacked, once per query head.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fasttx.functional as FF
from fasttx import reference as R
from fasttx.flash import flash_attn_func, flash_attn_with_kvcache

from utils import assert_2x_rule

fp32, fp16 = torch.float32, torch.float16


def _kernels():
    import fasttx.kernels.attention as K

    return K


def _randn(*shape, dtype=fp32, device="cpu", gen):
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


class KVLoads:
    """Under the interpreter: bytes loaded from the K and V tensors' storage (masked-off lanes not
    counted), and how many loads went through a tensor descriptor. Every load of the interpreter
    (pointer or descriptor) ends in InterpreterBuilder.create_masked_load."""

    def __init__(self, monkeypatch, *tensors):
        from triton.runtime.interpreter import InterpreterBuilder

        self.bytes, self.descriptor_loads = 0, 0
        spans = [(t.data_ptr(), t.data_ptr() + t.untyped_storage().nbytes()) for t in tensors]
        load, desc_load = InterpreterBuilder.create_masked_load, InterpreterBuilder.create_descriptor_load

        def counted_load(builder, ptrs, mask, *args, **kwargs):
            ret = load(builder, ptrs, mask, *args, **kwargs)
            addr = np.asarray(ptrs.data).astype(np.int64)  # triton 3.6's descriptor loads pass memoryviews
            inside = sum(((addr >= lo) & (addr < hi)) for lo, hi in spans).astype(bool) & np.asarray(mask.data, bool)
            self.bytes += int(inside.sum()) * ret.data.dtype.itemsize
            return ret

        def counted_desc_load(builder, *args, **kwargs):
            self.descriptor_loads += 1
            return desc_load(builder, *args, **kwargs)

        monkeypatch.setattr(InterpreterBuilder, "create_masked_load", counted_load)
        monkeypatch.setattr(InterpreterBuilder, "create_descriptor_load", counted_desc_load)


def _packed_and_unpacked(monkeypatch, fn, unpacked=True):
    """fn() with GQA packing forced on, then (if unpacked) off; the pointer path both times."""
    monkeypatch.setenv("FASTTX_ATTN_TMA", "0")
    monkeypatch.setenv("FASTTX_ATTN_PACK_GQA", "1")
    packed = fn()
    monkeypatch.setenv("FASTTX_ATTN_PACK_GQA", "0")
    return packed, fn() if unpacked else None


# ------------------------------------------------------------------------------------------------
# PACK_GQA through the public entries
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("L", [1, 3])
@pytest.mark.parametrize("variant", ["plain", "causal", "mask"])
def test_sdpa_gqa_packed(backend, device, monkeypatch, groups, L, variant):
    g = torch.Generator().manual_seed(L * 10 + groups)
    B, Hkv, S, E = 2, 2, 37, 16
    q, k, v = (_randn(B, Hkv * groups, L, E, gen=g, device=device), _randn(B, Hkv, S, E, gen=g, device=device),
               _randn(B, Hkv, S, E, gen=g, device=device))
    kw = dict(enable_gqa=True, scale=0.3)
    if variant == "causal":
        kw["is_causal"] = True  # top-left: query i sees keys <= i
    elif variant == "mask":  # a per-head float mask (the packed rows read their own head's) with a dead row
        mask = _randn(B, Hkv * groups, L, S, gen=g, device=device)
        mask[:, -1, 0] = float("-inf")
        kw["attn_mask"] = mask
    with torch.no_grad():
        ours, unpacked = _packed_and_unpacked(monkeypatch, lambda: FF.scaled_dot_product_attention(q, k, v, **kw))
        ref = R.scaled_dot_product_attention(q, k, v, upcast=torch.float64, **kw)
        assert_2x_rule(ours, F.scaled_dot_product_attention(q, k, v, **kw), ref)
    torch.testing.assert_close(ours, unpacked, atol=1e-6, rtol=1e-6)


def test_sdpa_gqa_packed_fp16_gradients(backend, device, monkeypatch):
    # Packed forward, unpacked backward: the backward reads the packed forward's lse and output.
    g = torch.Generator().manual_seed(3)
    q, k, v = (_randn(1, 4, 3, 40, dtype=fp16, gen=g, device=device), _randn(1, 1, 29, 40, dtype=fp16, gen=g,
               device=device), _randn(1, 1, 29, 40, dtype=fp16, gen=g, device=device))
    do = _randn(1, 4, 3, 40, dtype=fp16, gen=g, device=device)

    def run(fn, *t):
        t = [x.detach().requires_grad_() for x in t]
        out = fn(*t, is_causal=True, enable_gqa=True)
        return (out.detach(), *torch.autograd.grad(out, t, do.to(out.dtype)))

    monkeypatch.setenv("FASTTX_ATTN_PACK_GQA", "1")
    ours = run(FF.scaled_dot_product_attention, q, k, v)
    ref = run(lambda *t, **a: R.scaled_dot_product_attention(*t, upcast=torch.float64, **a), q.double(), k.double(),
              v.double())
    low = run(F.scaled_dot_product_attention, q, k, v)
    for i, (a, b, c) in enumerate(zip(ours, low, ref)):
        assert_2x_rule(a, b, c, mult=2.0 if i == 0 else 3.0)


KVCACHE = {
    "causal": dict(causal=True),
    "window_alibi": dict(causal=True, window_size=(5, 0), alibi=True),
    "paged": dict(causal=True, page=8),
}


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("L", [1, 3])
@pytest.mark.parametrize("case", list(KVCACHE))
def test_kvcache_gqa_packed(backend, device, monkeypatch, groups, L, case):
    # flash_attn_with_kvcache with per-batch cache_seqlens (bottom-right causal / window per sequence),
    # per-head ALiBi slopes or a shuffled paged cache; 520 cached keys take the flash-decoding split path.
    # Against the oracle always; against the unpacked kernel (4x the interpreter's work) once per case.
    opt = dict(KVCACHE[case])
    g = torch.Generator().manual_seed(groups * 7 + L)
    B, Hk, D, S = 2, 2, 16, 520
    H = Hk * groups
    q, ck, cv = _randn(B, L, H, D, gen=g, device=device), _randn(B, S, Hk, D, gen=g), _randn(B, S, Hk, D, gen=g)
    seqlens = [515, 100]
    kw = dict(cache_seqlens=torch.tensor(seqlens, dtype=torch.int32, device=device), causal=opt.get("causal", False))
    if "window_size" in opt:
        kw["window_size"] = opt["window_size"]
    if opt.get("alibi"):
        kw["alibi_slopes"] = torch.rand(B, H, generator=g).to(device)
    k_cache, v_cache = ck.to(device), cv.to(device)
    if "page" in opt:
        page, n = opt["page"], S // opt["page"]
        perm = torch.randperm(B * n, generator=g)
        kw["block_table"] = perm.view(B, n).to(torch.int32).to(device)
        k_cache = torch.empty(B * n, page, Hk, D)
        v_cache = torch.empty_like(k_cache)
        k_cache[perm.view(B, n)] = ck.view(B, n, page, Hk, D)
        v_cache[perm.view(B, n)] = cv.view(B, n, page, Hk, D)
        k_cache, v_cache = k_cache.to(device), v_cache.to(device)
    compare = backend == "triton" and groups == 4 and L == 3
    (out, lse), unpacked = _packed_and_unpacked(
        monkeypatch, lambda: flash_attn_with_kvcache(q, k_cache, v_cache, return_softmax_lse=True, **kw), compare)
    ref_kw = {n: kw[n] for n in ("causal", "window_size") if n in kw}
    for b in range(B):
        alibi = kw["alibi_slopes"][b:b + 1].double() if "alibi_slopes" in kw else None
        ref, ref_lse = R.flash_attention(q[b:b + 1].double(), ck[b:b + 1, :seqlens[b]].double().to(device),
                                         cv[b:b + 1, :seqlens[b]].double().to(device), alibi_slopes=alibi, **ref_kw)
        torch.testing.assert_close(out[b:b + 1].double(), ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(lse[b:b + 1].double(), ref_lse, atol=1e-4, rtol=1e-4)
    if compare:
        torch.testing.assert_close(out, unpacked[0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(lse, unpacked[1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("L", [1, 3])
def test_flash_func_gqa_packed(backend, device, monkeypatch, L):
    # flash_attn_func, dense: bottom-right causal with a window, softcap and per-head ALiBi at once
    g = torch.Generator().manual_seed(L)
    q, k, v = (_randn(2, L, 8, 16, gen=g, device=device), _randn(2, 45, 2, 16, gen=g, device=device),
               _randn(2, 45, 2, 16, gen=g, device=device))
    kw = dict(causal=True, window_size=(9, 0), softcap=3.0, alibi_slopes=torch.rand(8, generator=g).to(device))
    ours, unpacked = _packed_and_unpacked(monkeypatch, lambda: flash_attn_func(q, k, v, **kw))
    ref = R.flash_attention(q.double(), k.double(), v.double(), **dict(kw, alibi_slopes=kw["alibi_slopes"].double()))
    torch.testing.assert_close(ours.double(), ref[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours, unpacked, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Counts: K/V bytes per decode call
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_packed_decode_loads_kv_once(device, monkeypatch, groups):
    # One decode step (L = 1, flash-decoding split forced): unpacked, each of the H query heads loads
    # its kv head's K and V (groups x the minimum); packed, each K/V byte is loaded exactly once.
    if torch.device(device).type != "cpu":
        pytest.skip("counts loads under the Triton interpreter")
    K = _kernels()
    g = torch.Generator().manual_seed(0)
    B, Hkv, S, E = 1, 2, 96, 16
    q, k, v = _randn(B, Hkv * groups, 1, E, gen=g), _randn(B, Hkv, S, E, gen=g), _randn(B, Hkv, S, E, gen=g)
    counted = {}
    for pack in (True, False):
        with monkeypatch.context() as m:
            loads = KVLoads(m, k, v)
            counted[pack] = K.attention_forward(q, k, v, None, scale=0.25, decode=True, split_size=32,
                                                pack_gqa=pack, tma=False)
        counted[pack] = (loads.bytes, counted[pack])
    minimum = 2 * B * Hkv * S * E * k.element_size()  # K and V, each byte once
    assert counted[True][0] == minimum
    assert counted[False][0] == groups * minimum
    torch.testing.assert_close(counted[True][1], counted[False][1], atol=1e-6, rtol=1e-6)


def test_public_decode_packs_by_default(device, monkeypatch):
    # The rule (config._pack_gqa) packs a GQA decode step through the public entry: K/V read once.
    if torch.device(device).type != "cpu":
        pytest.skip("counts loads under the Triton interpreter")
    monkeypatch.delenv("FASTTX_ATTN_PACK_GQA", raising=False)
    g = torch.Generator().manual_seed(1)
    q, k, v = _randn(1, 8, 1, 16, gen=g), _randn(1, 2, 40, 16, gen=g), _randn(1, 2, 40, 16, gen=g)
    import fasttx

    with fasttx.use_backend("triton"), torch.no_grad():
        loads = KVLoads(monkeypatch, k, v)
        FF.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert loads.bytes == 2 * k.numel() * k.element_size()


def test_pack_rule(monkeypatch):
    K = _kernels()
    rule = K.config._pack_gqa
    monkeypatch.delenv("FASTTX_ATTN_PACK_GQA", raising=False)
    assert rule(4, 1, 0.0, False) and rule(2, 16, 0.0, False)
    assert not rule(1, 1, 0.0, False)  # nothing shared: packing only renames rows
    assert not rule(4, 17, 0.0, False)  # full 16-row blocks unpacked already
    assert not rule(4, 1, 0.1, False)  # dropout: training, not decode
    assert not rule(4, 1, 0.0, True) and not rule(4, 1, 0.0, True, True)  # varlen queries never
    assert rule(1, 64, 0.1, False, True) and not rule(4, 1, 0.0, False, False)  # forced on / off
    monkeypatch.setenv("FASTTX_ATTN_PACK_GQA", "1")
    assert rule(1, 100, 0.0, False)
    monkeypatch.setenv("FASTTX_ATTN_PACK_GQA", "0")
    assert not rule(4, 1, 0.0, False)


# ------------------------------------------------------------------------------------------------
# USE_TMA: tensor-descriptor K/V tiles (run by the interpreter's descriptors when forced)
# ------------------------------------------------------------------------------------------------
TMA_CASES = {
    "plain": dict(L=5, S=70, kw=dict()),
    "causal_window": dict(L=9, S=61, kw=dict(is_causal=True, causal_offset=52, window_offset=40)),
    "decode_split": dict(L=1, S=100, kw=dict(decode=True, split_size=32, is_causal=True, causal_offset=99)),
    "packed_alibi": dict(L=3, S=50, kw=dict(pack_gqa=True, alibi_slopes=torch.linspace(0.1, 0.5, 4), alibi_offset=47)),
    "fp16_d40": dict(L=4, S=45, kw=dict(), dtype=fp16, E=40),  # E < BLOCK_D: the box's extra columns read as 0
    # MLA's v head dim (its own descriptor box) and gpt-oss's sinks (each packed row its head's)
    "packed_mla_sinks": dict(L=2, S=70, E=24, EV=16, kw=dict(pack_gqa=True, is_causal=True, causal_offset=68,
                                                            sinks=torch.linspace(-1.0, 1.0, 4))),
}


@pytest.mark.parametrize("case", list(TMA_CASES))
def test_tma_variant_equals_pointer_path(device, monkeypatch, case):
    if torch.device(device).type != "cpu":
        pytest.skip("forces the descriptor variant under the Triton interpreter")
    K = _kernels()
    c = TMA_CASES[case]
    dtype, E, L, S = c.get("dtype", fp32), c.get("E", 16), c["L"], c["S"]
    g = torch.Generator().manual_seed(5)
    q, k, v = _randn(2, 4, L, E, dtype=dtype, gen=g), _randn(2, 2, S, E, dtype=dtype, gen=g), \
        _randn(2, 2, S, c.get("EV", E), dtype=dtype, gen=g)
    runs = {}
    for tma in (True, False):
        with monkeypatch.context() as m:
            loads = KVLoads(m, k, v)
            runs[tma] = K.attention_forward(q, k, v, None, scale=0.3, tma=tma, **c["kw"]), loads.descriptor_loads
    (out, lse), n_desc = runs[True]
    (out_p, lse_p), n_ptr = runs[False]
    assert n_desc > 0 and n_ptr == 0
    assert torch.equal(out, out_p) and torch.equal(lse, lse_p)
    if c["kw"].get("pack_gqa"):  # and packed equals unpacked (tests/test_attention_mla_sinks.py: that vs the oracle)
        out_u, lse_u = K.attention_forward(q, k, v, None, scale=0.3, **dict(c["kw"], pack_gqa=False, tma=False))
        torch.testing.assert_close(out, out_u, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, lse_u, rtol=1e-5, atol=1e-5)


def test_tma_variant_kvcache_seqlens(device, monkeypatch):
    # Varlen keys (a kv cache with per-batch lengths) through the public entry: each program's
    # descriptor starts at its sequence's first key and ends at its last (zeros past it).
    if torch.device(device).type != "cpu":
        pytest.skip("forces the descriptor variant under the Triton interpreter")
    g = torch.Generator().manual_seed(6)
    q, kc, vc = _randn(2, 2, 4, 16, gen=g), _randn(3, 80, 2, 16, gen=g), _randn(3, 80, 2, 16, gen=g)
    kw = dict(cache_seqlens=torch.tensor([70, 9], dtype=torch.int32), cache_batch_idx=torch.tensor(
        [2, 0], dtype=torch.int32), causal=True, return_softmax_lse=True)
    out = {}
    for tma in ("1", "0"):
        monkeypatch.setenv("FASTTX_ATTN_TMA", tma)
        out[tma] = flash_attn_with_kvcache(q, kc, vc, **kw)
    assert all(torch.equal(a, b) for a, b in zip(out["1"], out["0"]))
    ref = R.flash_attention(q[1:].double(), kc[:1, :9].double(), vc[:1, :9].double(), causal=True)[0]
    torch.testing.assert_close(out["1"][0][1:].double(), ref, atol=1e-4, rtol=1e-4)


def test_tma_rule(device):
    K = _kernels()
    rule = K.config._use_tma
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 64, 16)
    assert rule(q, k, k, paged=False, option=True)
    assert not rule(q, k, k, paged=True, option=True)  # a key block may span pages
    odd = torch.randn(1, 2, 64, 20, dtype=fp16)[..., :5]  # rows 40 bytes apart: not a multiple of 16
    assert not rule(q, odd, odd, paged=False, option=True)
    assert not rule(q, k, k, paged=False, option=False)
    assert not rule(q, k, k, paged=False)  # auto: sm_90 / sm_100 only, never the interpreter (CPU here)


def test_descriptor_allocator_keeps_the_users():
    # USE_TMA's device-side descriptors need triton's launch-time allocator: the launcher sets a torch
    # one when none is set, and leaves a user's in place. (A context copy: nothing leaks out.)
    import contextvars

    from triton.runtime import _allocation

    K = _kernels()

    def check():
        assert isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
        K.launch._set_descriptor_allocator()
        ours = _allocation._allocator.get()
        assert not isinstance(ours, _allocation.NullAllocator)
        users = lambda size, alignment, stream: None  # noqa: E731
        _allocation._allocator.set(users)
        K.launch._set_descriptor_allocator()
        assert _allocation._allocator.get() is users

    contextvars.Context().run(check)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [fp16, torch.bfloat16])
def test_gpu_packed_and_tma_decode(device, dtype):
    # On the GPU the compiled variants (wgmma with 64 packed rows, the copy engine where the rule
    # turns it on) agree with the unpacked pointer path; Llama-70B-like GQA 8, a 4096-key cache.
    K = _kernels()
    g = torch.Generator().manual_seed(9)
    q = _randn(2, 64, 8, 128, dtype=dtype, gen=g, device=device)
    k = _randn(2, 8, 4096, 128, dtype=dtype, gen=g, device=device)
    v = _randn(2, 8, 4096, 128, dtype=dtype, gen=g, device=device)
    for L in (1, 8):
        kw = dict(scale=128 ** -0.5, is_causal=True, causal_offset=4096 - L)
        base, base_lse = K.attention_forward(q[:, :, :L], k, v, None, pack_gqa=False, tma=False, **kw)
        for pack, tma in ((True, None), (False, None), (True, False)):
            out, lse = K.attention_forward(q[:, :, :L], k, v, None, pack_gqa=pack, tma=tma, **kw)
            torch.testing.assert_close(out, base, atol=2e-3 if dtype == fp16 else 1.6e-2, rtol=0)
            torch.testing.assert_close(lse, base_lse, atol=1e-4, rtol=1e-4)


def test_packed_dropout_draws_the_unpacked_mask(device):
    # Forced on with dropout (the rule never does): each packed row draws its own (head, query) keep-mask.
    K = _kernels()
    g = torch.Generator().manual_seed(4)
    q, k, v = _randn(2, 4, 3, 16, gen=g, device=device), _randn(2, 2, 40, 16, gen=g, device=device), \
        _randn(2, 2, 40, 16, gen=g, device=device)
    kw = dict(scale=0.3, dropout_p=0.3, seed=11, is_causal=True)
    out, lse = K.attention_forward(q, k, v, None, pack_gqa=True, **kw)
    out_u, lse_u = K.attention_forward(q, k, v, None, pack_gqa=False, **kw)
    torch.testing.assert_close(out, out_u, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, lse_u, atol=1e-6, rtol=1e-6)
