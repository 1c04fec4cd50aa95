"""No kernel reads or writes outside its tensors: ragged shapes of every kernel family run under the
interpreter's bounds checker (tests/_bounds.py), which fails a test on any access with a true mask
outside the tensors passed to its launch. First, proof that the checker catches what it should and
nothing else (a test that could not fail would be worth nothing)."""
import os

import pytest
import torch

import fasttx
import fasttx.flash as flash
import fasttx.functional as F

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="the bounds checker hooks the Triton interpreter; on a GPU compute-sanitizer (make gpu-check) checks bounds")

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from _bounds import BoundsChecker  # noqa: E402


@triton.jit
def _copy(X, Y, n, off, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if MASKED:
        tl.store(Y + i, tl.load(X + i + off, mask=i < n, other=0.0), mask=i < n)
    else:
        tl.store(Y + i, tl.load(X + i + off))


def test_checker_catches_an_unmasked_overrun_and_names_it():
    x, y = torch.arange(20.0), torch.zeros(20)
    with BoundsChecker() as bc:
        _copy[(2,)](x, y, 20, 0, MASKED=False, BLOCK=16)  # 32 lanes over 20 elements: 12 out
    assert bc.launches == 1 and len(bc.errors) == 2  # the load of X and the store to Y of program 1
    assert bc.errors[0].startswith("_copy: load out of bounds (12 lanes), argument X, element offset 20")
    assert "argument Y, element offset 20" in bc.errors[1] and bc.errors[1].startswith("_copy: store")


def test_checker_accepts_masked_lanes_and_sees_offsets():
    x, y = torch.arange(20.0), torch.zeros(20)
    with BoundsChecker() as bc:
        _copy[(2,)](x, y, 20, 0, MASKED=True, BLOCK=16)
    assert bc.errors == [] and bc.accesses == 40  # 20 loads + 20 stores with a true mask
    assert torch.equal(y, x)
    base, view = torch.arange(40.0), torch.zeros(20)
    with BoundsChecker() as bc:  # a view's extent, not its storage: reading past x[:20] is caught
        _copy[(2,)](base[:20], view, 20, 5, MASKED=True, BLOCK=16)
    # lanes 15 (program 0) and 16-19 (program 1) read x[20:25]: one error per load, 1 and 4 lanes
    assert [e.split(", argument")[0] for e in bc.errors] == ["_copy: load out of bounds (1 lanes)",
                                                             "_copy: load out of bounds (4 lanes)"]
    assert "argument X, element offset 20" in bc.errors[0] and "element offset 21" in bc.errors[1]


@pytest.fixture
def checked(bounds_check):
    """tests/conftest.py's bounds_check (fails the test on an out-of-bounds access or when no kernel
    ran) with the triton backend forced (the torch path launches nothing)."""
    with fasttx.use_backend("triton"):
        yield bounds_check


def _grads(out, *inputs):
    g = torch.randn_like(out)
    return torch.autograd.grad(out, inputs, g)


def test_attention_ragged(checked):
    """Odd head dim (40), L and S not multiples of the block (37, 45), GQA, causal (fp32), and a
    broadcast boolean mask (bf16: 2-byte elements, the fp32 output copy of the 16-bit path)."""
    for dtype, kw in ((torch.float32, dict(is_causal=True)),
                      (torch.bfloat16, dict(attn_mask=torch.rand(1, 1, 37, 45) > 0.3))):
        q = torch.randn(1, 2, 37, 40, dtype=dtype, requires_grad=True)
        k = torch.randn(1, 1, 45, 40, dtype=dtype, requires_grad=True)
        v = torch.randn(1, 1, 45, 40, dtype=dtype, requires_grad=True)
        _grads(F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw), q, k, v)


@pytest.mark.parametrize("tma, dq_kernel", [("0", False), ("1", False), ("1", True)])
def test_attention_varlen_and_window(checked, monkeypatch, tma, dq_kernel):
    """Packed sequences of ragged lengths (1, 23, 40 queries; 5, 30, 51 keys), head dim 24, a window;
    with tma "1" the streamed tiles of the forward and the backward kernels (dK/dV, and the dQ kernel
    with dq_kernel) through tensor descriptors, each over its sequence's rows."""
    from triton.runtime.interpreter import InterpreterBuilder

    from fasttx.kernels.attention import config, launch

    monkeypatch.setenv("FASTTX_ATTN_TMA", tma)
    if dq_kernel:
        monkeypatch.setattr(launch, "DQ_MODE", config.DQ_KERNEL)
    descriptor_loads = []
    desc_load = InterpreterBuilder.create_descriptor_load
    monkeypatch.setattr(InterpreterBuilder, "create_descriptor_load",
                        lambda *a, **kw: descriptor_loads.append(1) or desc_load(*a, **kw))
    cu_q = torch.tensor([0, 1, 24, 64], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 35, 86], dtype=torch.int32)
    q = torch.randn(64, 2, 24, requires_grad=True)
    k = torch.randn(86, 1, 24, requires_grad=True)
    v = torch.randn(86, 1, 24, requires_grad=True)
    out = flash.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 40, 51, causal=True, window_size=(17, 3))
    _grads(out, q, k, v)
    assert bool(descriptor_loads) == (tma == "1")


def test_attention_decode_splits_and_paged_cache(checked):
    """Flash-decoding with a last split shorter than the others (S = 100, splits of 32), and a
    kv-cache read through a block table with per-sequence lengths that end mid-page."""
    from fasttx.kernels.attention import attention_forward

    q, k, v = torch.randn(1, 2, 3, 40), torch.randn(1, 1, 100, 40), torch.randn(1, 1, 100, 40)
    attention_forward(q, k, v, None, scale=40 ** -0.5, decode=True, split_size=32)
    k_cache, v_cache = torch.randn(5, 16, 1, 40), torch.randn(5, 16, 1, 40)  # 5 pages of 16 rows
    table = torch.tensor([[3, 0], [4, 1]], dtype=torch.int32)
    lens = torch.tensor([21, 9], dtype=torch.int32)
    flash.flash_attn_with_kvcache(torch.randn(2, 1, 2, 40), k_cache, v_cache, cache_seqlens=lens,
                                  block_table=table, causal=True)


def test_norms_ragged(checked):
    """Hidden sizes not powers of two (1151, 7), rows not a multiple of any block, with grads."""
    for n, rows in ((1151, 5), (7, 33)):
        x = torch.randn(rows, n, requires_grad=True)
        w, b = torch.randn(n, requires_grad=True), torch.randn(n, requires_grad=True)
        _grads(F.layer_norm(x, (n,), w, b), x, w, b)
        _grads(F.rms_norm(x, (n,), w), x, w)


def test_softmax_cross_entropy_ragged(checked):
    """Row lengths 1023 and 37, ignored targets, label smoothing, a linear cross-entropy over 37 classes."""
    x = torch.randn(3, 1023, requires_grad=True)
    _grads(F.softmax(x, dim=-1), x)
    logits = torch.randn(5, 1023, requires_grad=True)
    target = torch.tensor([0, 1022, -100, 7, 500])
    _grads(F.cross_entropy(logits, target, label_smoothing=0.1), logits)
    h, w = torch.randn(9, 24, requires_grad=True), torch.randn(37, 24, requires_grad=True)
    _grads(F.linear_cross_entropy(h, w, torch.randint(0, 37, (9,))), h, w)


def test_elementwise_ragged(checked):
    """gelu, bias-gelu, swiglu, dropout and rotary on sizes that leave partial blocks (1151, 7 x 13)."""
    x = torch.randn(1151, requires_grad=True)
    _grads(F.gelu(x, approximate="tanh"), x)
    y, bias = torch.randn(7, 13, requires_grad=True), torch.randn(13, requires_grad=True)
    _grads(F.bias_gelu(y, bias), y, bias)
    g, u = torch.randn(7, 13, requires_grad=True), torch.randn(7, 13, requires_grad=True)
    _grads(F.swiglu(g, u), g, u)
    _grads(F.dropout(x, p=0.3), x)
    q, k = torch.randn(2, 3, 11, 20, requires_grad=True), torch.randn(2, 1, 11, 20, requires_grad=True)
    cos, sin = torch.randn(11, 12), torch.randn(11, 12)  # partial rotary: 12 of 20 dims
    qo, ko = F.apply_rotary_emb(q, k, cos, sin)
    torch.autograd.grad((qo.sum(), ko.sum()), (q, k))


def test_moe_ragged(checked):
    """Experts receiving 0, 1 and many tokens; hidden and intermediate sizes not powers of two."""
    T, H, inter, E = 11, 24, 20, 4
    x = torch.randn(T, H, requires_grad=True)
    idx = torch.tensor([[0, 2]] * 10 + [[3, 2]])  # expert 1 gets none, expert 3 one
    w = torch.rand(T, 2, requires_grad=True)
    gate_up = torch.randn(E, 2 * inter, H, requires_grad=True)
    down = torch.randn(E, H, inter, requires_grad=True)
    _grads(F.moe_experts(x, idx, w, gate_up, down), x, w, gate_up, down)
