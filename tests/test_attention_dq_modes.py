"""The attention backward's three ways of forming dQ (kernels/attention/backward.py): the ordered
accumulation in the dK/dV kernel (the default, 5 tile GEMMs), fp32 atomics there (5 GEMMs), and
the separate dQ kernel (7 GEMMs). Checked: equal gradients across the modes and against the fp64
oracle on the shapes that change which key blocks see which query blocks (causal, windows, GQA,
varlen, dropout); the tile-GEMM count, counted by the interpreter; the mode choice under
torch.use_deterministic_algorithms. Whether the ordered adds are race-free is a GPU question
(tests/README.md: the interpreter runs programs one after another); `make gpu-check` reruns
every backward twice and compares the bits."""
import os
import subprocess
import sys

import pytest
import torch

from fasttx import reference as R
from fasttx.kernels.attention import launch as L
from fasttx.kernels.attention.config import DQ_ATOMIC, DQ_KERNEL, DQ_ORDERED

MODES = {"ordered": DQ_ORDERED, "atomic": DQ_ATOMIC, "kernel": DQ_KERNEL}


def _inputs(B=1, H=4, Hkv=2, Lq=80, S=96, E=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, E, generator=g) for h, n in ((H, Lq), (Hkv, S), (Hkv, S)))
    return q, k, v, torch.randn(B, H, Lq, E, generator=g)


def _grads(q, k, v, do, mode, **opts):
    opts.setdefault("scale", q.shape[-1] ** -0.5)
    out, lse = L.attention_forward(q, k, v, None, **opts)
    return L.attention_backward(do, q, k, v, None, out, lse, dq_mode=MODES[mode], **opts)


CASES = {
    "plain": dict(),
    "causal": dict(is_causal=True),
    "causal_bottom_right": dict(is_causal=True, causal_offset=16),
    "window": dict(is_causal=True, causal_offset=16, window_offset=-20),
    "window_wide_left": dict(window_offset=-70),
    "dropout": dict(dropout_p=0.3, seed=5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_modes_agree_and_match_the_oracle(case):
    q, k, v, do = _inputs()
    opts = CASES[case]
    got = {m: _grads(q, k, v, do, m, **opts) for m in MODES}
    for m in ("atomic", "kernel"):
        for a, b in zip(got["ordered"], got[m]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{case}: ordered vs {m}")
    if "dropout_p" in opts:
        return  # the dropout mask is checked against the oracle in test_attention.py
    Hkv, groups = k.shape[1], q.shape[1] // k.shape[1]
    causal_off, left_off = opts.get("causal_offset", 0), opts.get("window_offset")
    i = torch.arange(q.shape[2])[:, None]
    j = torch.arange(k.shape[2])[None, :]
    allowed = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool)
    if opts.get("is_causal"):
        allowed &= j <= i + causal_off
    if left_off is not None:
        allowed &= j >= i + left_off
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    kr, vr = (t.repeat_interleave(groups, dim=1) for t in leaves[1:])
    ref = R.scaled_dot_product_attention(leaves[0], kr, vr, attn_mask=allowed, scale=q.shape[-1] ** -0.5)
    ref = torch.nan_to_num(ref)  # rows that see no key: 0, as the kernels give
    ref_grads = torch.autograd.grad(ref, leaves, do.double())
    assert Hkv == 2
    for name, a, b in zip("qkv", got["ordered"], ref_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=f"{case}: d{name} vs the oracle")


def test_varlen_and_16bit_modes_agree():
    g = torch.Generator().manual_seed(3)
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
    q = torch.randn(1, 4, 90, 32, generator=g).bfloat16()
    k, v = (torch.randn(1, 2, 110, 32, generator=g).bfloat16() for _ in range(2))
    do = torch.randn(1, 4, 90, 32, generator=g).bfloat16()
    seq = L.Seqlens(i32([0, 7, 90]), i32([0, 20]), i32([20, 90]), 83, 90)
    opts = dict(scale=32 ** -0.5, seqlens=seq, is_causal=True, window_offset=-33)
    out, lse, out32 = L.attention_forward(q, k, v, None, return_fp32_out=True, **opts)
    got = {m: L.attention_backward(do, q, k, v, None, out32, lse, dq_mode=MODES[m], **opts) for m in MODES}
    for m in ("atomic", "kernel"):
        for a, b in zip(got["ordered"], got[m]):
            assert a.dtype == torch.bfloat16
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2, msg=f"varlen: ordered vs {m}")


def _dot_flops(monkeypatch):
    """Counts 2 M N K for every tl.dot the interpreter runs."""
    from triton.runtime import interpreter

    counted = [0]
    real = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, *args, **kwargs):
        m, kk = a.data.shape[-2:]
        counted[0] += 2 * m * kk * b.data.shape[-1]
        return real(self, a, b, d, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)
    return counted


@pytest.mark.parametrize("mode, gemms", [("ordered", 5), ("atomic", 5), ("kernel", 7)])
def test_backward_runs_five_tile_gemms(monkeypatch, mode, gemms):
    q, k, v, do = _inputs(H=2, Hkv=2, Lq=64, S=64)  # whole 32 x 32 tiles: no block is partial
    counted = _dot_flops(monkeypatch)
    out, lse = L.attention_forward(q, k, v, None, scale=0.2)
    forward = counted[0]
    L.attention_backward(do, q, k, v, None, out, lse, scale=0.2, dq_mode=MODES[mode])
    assert forward == 2 * (2 * 2 * 64 * 64 * 32)  # S = Q K^T and O = P V
    assert counted[0] - forward == gemms * forward // 2


def test_deterministic_algorithms_never_take_the_atomic_path(monkeypatch):
    seen = []
    real = L._attn_bwd_dkdv

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(kwargs["DQ_MODE"])
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(L, "_attn_bwd_dkdv", Spy())
    q, k, v, do = _inputs(H=2, Hkv=1, Lq=32, S=32)
    _grads(q, k, v, do, "atomic")
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _grads(q, k, v, do, "atomic")
        _grads(q, k, v, do, "kernel")
    finally:
        torch.use_deterministic_algorithms(was)
    assert seen == [DQ_ATOMIC, DQ_ORDERED, DQ_KERNEL]


def test_the_mode_comes_from_the_environment_once():
    code = ("from fasttx.kernels.attention.config import DQ_MODE, DQ_ORDERED, DQ_ATOMIC; import os; "
            "want = {'': DQ_ORDERED, 'atomic': DQ_ATOMIC}[os.environ.get('FASTTX_ATTN_DQ', '')]; "
            "assert DQ_MODE == want, DQ_MODE")
    env = {k: v for k, v in os.environ.items() if k != "FASTTX_ATTN_DQ"}
    for extra, ok in (({}, True), ({"FASTTX_ATTN_DQ": "atomic"}, True), ({"FASTTX_ATTN_DQ": "fast"}, False)):
        r = subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True)
        if ok:
            assert r.returncode == 0, r.stderr[-2000:]
        else:
            assert r.returncode != 0 and "FASTTX_ATTN_DQ must be one of" in r.stderr


# ------------------------------------------------------------------------------------------------
# USE_TMA in the backward: the streamed tiles (Q and dO in dK/dV, K and V in the dQ kernel) through
# tensor descriptors, forced on under the interpreter (its descriptors run; on CPU the rule never
# picks them by itself). Same arithmetic, only the loads differ: the gradients must be bit-identical.
# ------------------------------------------------------------------------------------------------
class _Loads:
    """Under the interpreter: bytes each named tensor gave to pointer loads (masked-off lanes not
    counted; a descriptor load's own materialised pointers are not pointer loads) and the number of
    tensor-descriptor loads."""

    def __init__(self, monkeypatch, **tensors):
        import numpy as np
        from triton.runtime.interpreter import InterpreterBuilder

        self.bytes, self.descriptor_loads = dict.fromkeys(tensors, 0), 0
        spans = {n: (t.data_ptr(), t.data_ptr() + t.untyped_storage().nbytes()) for n, t in tensors.items()}
        load, desc_load = InterpreterBuilder.create_masked_load, InterpreterBuilder.create_descriptor_load
        in_desc = [False]

        def counted_load(builder, ptrs, mask, *args, **kwargs):
            ret = load(builder, ptrs, mask, *args, **kwargs)
            if not in_desc[0]:
                addr, ok = np.asarray(ptrs.data).astype(np.int64), np.asarray(mask.data, bool)
                for n, (lo, hi) in spans.items():
                    self.bytes[n] += int(((addr >= lo) & (addr < hi) & ok).sum()) * ret.data.dtype.itemsize
            return ret

        def counted_desc_load(builder, *args, **kwargs):
            self.descriptor_loads += 1
            in_desc[0] = True
            try:
                return desc_load(builder, *args, **kwargs)
            finally:
                in_desc[0] = False

        monkeypatch.setattr(InterpreterBuilder, "create_masked_load", counted_load)
        monkeypatch.setattr(InterpreterBuilder, "create_descriptor_load", counted_desc_load)


@pytest.mark.parametrize("mode", list(MODES))
def test_tma_backward_loads_the_streamed_tiles_through_descriptors(monkeypatch, mode):
    # Whole 32 x 32 tiles, not causal: dK/dV programs (2 key blocks x 2 kv heads) each visit 2 query
    # blocks of 2 query heads; each visit loads a Q and a dO tile; the dQ kernel's programs (2 query
    # blocks x 4 heads) each load 2 K and V tiles.
    q, k, v, do = _inputs(H=4, Hkv=2, Lq=64, S=64)
    out, lse = L.attention_forward(q, k, v, None, scale=0.2)
    got = {}
    for tma in (True, False):
        with monkeypatch.context() as m:
            loads = _Loads(m, q=q, k=k, v=v, do=do)
            grads = L.attention_backward(do, q, k, v, None, out, lse, scale=0.2, dq_mode=MODES[mode], tma=tma)
        got[tma] = grads, loads
    (grads, on), (grads_p, off) = got[True], got[False]
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_p))
    tile_visits = 2 * 2 * 2 * 2
    kernel = mode == "kernel"
    assert on.descriptor_loads == 2 * tile_visits * (2 if kernel else 1) and off.descriptor_loads == 0
    size = {n: t.numel() * t.element_size() for n, t in dict(q=q, k=k, v=v, do=do).items()}
    # Pointer loads left with descriptors: the resident tiles (K/V in dK/dV; Q/dO in the dQ kernel),
    # each byte once, and the delta preprocess's dO.
    assert on.bytes == dict(q=size["q"] if kernel else 0, k=size["k"], v=size["v"],
                            do=size["do"] * (2 if kernel else 1))
    # Without: also every streamed tile by pointers, once per program that visits it (Q, dO: 2 key
    # blocks; K, V: 2 query blocks of each of 2 query heads).
    assert off.bytes == dict(q=size["q"] * (3 if kernel else 2), k=size["k"] * (5 if kernel else 1),
                             v=size["v"] * (5 if kernel else 1), do=size["do"] * (4 if kernel else 3))


def _varlen(E=16, EV=16, dtype=torch.float32):
    """Packed sequences of 5, 40, 21 queries and 9, 50, 30 keys. Each descriptor must stop at its
    sequence's last row: NaN rows lie between the key sequences and past the last query row (q and
    dO are views of longer buffers), which the pointer path never reads."""
    g = torch.Generator().manual_seed(7)
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
    q, do = (torch.randn(1, 4, 74, e, generator=g).index_fill_(2, torch.arange(66, 74), float("nan"))[:, :, :66]
             for e in (E, EV))
    starts, lens = [0, 12, 66], [9, 50, 30]
    gaps = torch.tensor([r for r in range(100) if not any(s <= r < s + n for s, n in zip(starts, lens))])
    k, v = (torch.randn(1, 2, 100, e, generator=g).index_fill_(2, gaps, float("nan")) for e in (E, EV))
    seq = L.Seqlens(i32([0, 5, 45, 66]), i32(starts), i32(lens), 40, 50)
    return tuple(t.to(dtype) for t in (q, k, v, do)), dict(seqlens=seq, is_causal=True)


TMA_CASES = {  # -> ((q, k, v, do), options)
    "plain": lambda: (_inputs(H=2, Hkv=2, Lq=40, S=45, E=16), dict()),
    "causal_gqa": lambda: (_inputs(H=4, Hkv=2, Lq=40, S=45, E=16), dict(is_causal=True, causal_offset=5)),
    "window_dropout": lambda: (_inputs(H=4, Hkv=1, Lq=40, S=45, E=16),
                               dict(is_causal=True, causal_offset=5, window_offset=-20, dropout_p=0.3, seed=2)),
    "varlen_causal": lambda: _varlen(),
    # fp16 (upcast under the interpreter), E < BLOCK_D (the box's extra columns read as 0), Ev != E
    "varlen_fp16_ev": lambda: _varlen(E=24, EV=16, dtype=torch.float16),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", list(TMA_CASES))
def test_tma_backward_equals_pointer_path(monkeypatch, case, mode):
    (q, k, v, do), opts = TMA_CASES[case]()
    opts = dict(opts, scale=q.shape[-1] ** -0.5)
    out, lse, *o32 = L.attention_forward(q, k, v, None, return_fp32_out=q.dtype != torch.float32, **opts)
    got = {}
    for tma in (True, False):
        with monkeypatch.context() as m:
            loads = _Loads(m)
            got[tma] = L.attention_backward(do, q, k, v, None, o32[0] if o32 else out, lse, dq_mode=MODES[mode],
                                            tma=tma, **opts)
        assert (loads.descriptor_loads > 0) == tma
    for name, a, b in zip("qkv", got[True], got[False]):
        assert a.dtype == q.dtype and torch.equal(a, b), f"{case}, {mode}: d{name} differs with tma"


def test_tma_backward_rule_per_kernel(monkeypatch):
    # The rule (config._use_tma) looks at each kernel's streamed tensors: dO with rows 168 bytes apart
    # (not a multiple of 16) keeps dK/dV on pointers while the dQ kernel's K/V still take descriptors;
    # FASTTX_ATTN_TMA=1 forces it as tma=True does.
    q, k, v, do = _inputs(H=4, Hkv=2, Lq=64, S=64)
    do_odd = torch.empty(1, 4, 64, 42)[..., :32].copy_(do)
    assert do_odd.stride(2) * 4 % 16 != 0
    out, lse = L.attention_forward(q, k, v, None, scale=0.2)
    counts = {}
    for name, grad_out in (("aligned", do), ("odd", do_odd)):
        with monkeypatch.context() as m:
            m.setenv("FASTTX_ATTN_TMA", "1")
            loads = _Loads(m)
            got = L.attention_backward(grad_out, q, k, v, None, out, lse, scale=0.2, dq_mode=DQ_KERNEL)
        counts[name] = loads.descriptor_loads
        want = L.attention_backward(grad_out, q, k, v, None, out, lse, scale=0.2, dq_mode=DQ_KERNEL, tma=False)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert counts == {"aligned": 64, "odd": 32}  # dK/dV's 32 Q/dO tile loads gone, dQ's 32 K/V ones kept
