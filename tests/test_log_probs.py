"""fasttx.functional.linear_log_probs: per-token log-probs and entropy without the logits, on both
paths, against the fp64 oracle (fasttx/reference.py), torch's own composition and TRL's formulas."""
import pytest
import torch
import torch.nn.functional as F

import fasttx
import fasttx.functional as FF
import fasttx.ops.cross_entropy as ce_ops
from fasttx import reference as ref

from utils import assert_2x_rule

ATOL = 1e-5


def _inputs(shape, H, V, dtype=torch.float32, bias=True, seed=0, ignore=-100):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, H, generator=g) * 2).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) * H ** -0.5).to(dtype).requires_grad_()
    b = torch.randn(V, generator=g).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, V, shape, generator=g)
    if t.numel() > 2:
        t.view(-1)[1::3] = ignore  # every third token ignored
    return x, w, b, t


def _small_chunks(monkeypatch):
    """Force several row chunks on both paths at test sizes (the defaults keep tiny inputs whole)."""
    from fasttx.kernels.cross_entropy import linear as K  # the host loop: chunk_rows, MIN_CHUNK

    monkeypatch.setattr(ce_ops, "_MIN_CHUNK", 1)
    monkeypatch.setattr(K, "MIN_CHUNK", 1)


def _grads(outs, ups, leaves):
    loss = sum((o * u).sum() for o, u in zip(outs, ups))
    return torch.autograd.grad(loss, [t for t in leaves if t is not None])


@pytest.mark.parametrize("shape,H,V", [((1,), 5, 1), ((7,), 8, 13), ((2, 9), 6, 113), ((0,), 4, 7)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_the_fp64_oracle_with_gradients_on_both_outputs(backend, monkeypatch, shape, H, V, temperature,
                                                              bias):
    _small_chunks(monkeypatch)
    x, w, b, t = _inputs(shape, H, V, bias=bias)
    logp, ent = FF.linear_log_probs(x, w, t, bias=b, temperature=temperature, return_entropy=True)
    assert logp.shape == t.shape and ent.shape == t.shape and logp.dtype == torch.float32
    r_logp, r_ent = ref.linear_log_probs(x, w, t, b, temperature, upcast=torch.float64)
    torch.testing.assert_close(logp.double(), r_logp, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(ent.double(), r_ent, atol=ATOL, rtol=ATOL)
    ignored = t == -100
    assert (logp[ignored] == 0).all() and (ent[ignored] == 0).all()
    g = torch.Generator().manual_seed(1)
    ups = [torch.randn(t.shape, generator=g) for _ in range(2)]
    leaves = (x, w, b)
    got = _grads((logp, ent), ups, leaves)
    want = _grads((r_logp, r_ent), [u.double() for u in ups], leaves)
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e.double(), atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("which", ["logp", "ent"])
def test_gradient_of_either_output_alone(backend, monkeypatch, which):
    _small_chunks(monkeypatch)
    x, w, b, t = _inputs((11,), 6, 17)
    logp, ent = FF.linear_log_probs(x, w, t, bias=b, temperature=1.3, return_entropy=True)
    r_logp, r_ent = ref.linear_log_probs(x, w, t, b, 1.3, upcast=torch.float64)
    out, r_out = (logp, r_logp) if which == "logp" else (ent, r_ent)
    up = torch.linspace(-1, 2, 11)
    got = _grads([out], [up], (x, w, b))
    want = _grads([r_out], [up.double()], (x, w, b))
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e.double(), atol=ATOL, rtol=ATOL)


def test_without_entropy_returns_one_tensor_and_its_gradient(backend):
    x, w, b, t = _inputs((2, 5), 8, 29, bias=False)
    logp = FF.linear_log_probs(x, w, t)
    assert isinstance(logp, torch.Tensor) and logp.shape == (2, 5)
    r_logp, _ = ref.linear_log_probs(x, w, t, upcast=torch.float64)
    torch.testing.assert_close(logp.double(), r_logp, atol=ATOL, rtol=ATOL)
    got = _grads([logp], [torch.ones(2, 5)], (x, w))
    want = _grads([r_logp], [torch.ones(2, 5, dtype=torch.float64)], (x, w))
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e.double(), atol=ATOL, rtol=ATOL)


def test_custom_ignore_index(backend):
    x, w, b, t = _inputs((9,), 4, 11, ignore=5)  # 5 is also a real token id elsewhere: only the index counts
    logp, ent = FF.linear_log_probs(x, w, t, bias=b, ignore_index=5, return_entropy=True)
    r_logp, r_ent = ref.linear_log_probs(x, w, t, b, ignore_index=5, upcast=torch.float64)
    assert (t == 5).any()
    torch.testing.assert_close(logp.double(), r_logp, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(ent.double(), r_ent, atol=ATOL, rtol=ATOL)


def test_equals_torch_log_softmax_gather_and_trl_formulas(backend):
    # TRL's formulas, trl/trainer/utils.py: selective_log_softmax (logits.log_softmax(-1) gathered at the
    # index) and entropy_from_logits (-(exp(logps) * logps).sum(-1) of logps = log_softmax(logits)),
    # on the logits GRPO builds: logits / temperature.
    x, w, b, t = _inputs((3, 7), 16, 50, ignore=-100)
    t = t.clamp(min=0)  # TRL's functions have no ignore_index: every position
    logits = F.linear(x, w, b) / 0.9
    want = torch.log_softmax(logits, -1).gather(-1, t[..., None])[..., 0]
    logps = F.log_softmax(logits, dim=-1)
    want_ent = -(torch.exp(logps) * logps).sum(-1)
    logp, ent = FF.linear_log_probs(x, w, t, bias=b, temperature=0.9, return_entropy=True)
    torch.testing.assert_close(logp, want, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(ent, want_ent, atol=ATOL, rtol=ATOL)


def test_against_trl_functions_when_importable(backend):
    trl_utils = pytest.importorskip("trl.trainer.utils")  # the optional extra `trl`
    x, w, b, t = _inputs((2, 6), 8, 40)
    t = t.clamp(min=0)
    logits = F.linear(x, w, b)
    logp, ent = FF.linear_log_probs(x, w, t, bias=b, return_entropy=True)
    torch.testing.assert_close(logp, trl_utils.selective_log_softmax(logits, t), atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(ent, trl_utils.entropy_from_logits(logits), atol=ATOL, rtol=ATOL)


def test_bf16_equals_fp32_math_on_the_bf16_logits(backend):
    # the head's matmul runs in bf16 (as F.linear does), the softmax statistics in fp32
    x, w, b, t = _inputs((13,), 32, 77, dtype=torch.bfloat16)
    logp, ent = FF.linear_log_probs(x, w, t, bias=b, temperature=0.8, return_entropy=True)
    z = F.linear(x, w, b).float() / 0.8
    r_logp, r_ent = ref.linear_log_probs(z, torch.eye(77), t, upcast=torch.float64)  # log-softmax of z
    torch.testing.assert_close(logp.double(), r_logp, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(ent.double(), r_ent, atol=ATOL, rtol=ATOL)
    # gradients in bf16: the 2x rule against torch's own bf16 composition (fp32 softmax of the bf16
    # logits, their gradient back through the bf16 matmul), both against the fp64 gradient
    ups = [torch.randn(13), torch.randn(13)]
    got = _grads((logp, ent), ups, (x, w, b))
    rl, re_ = ref.linear_log_probs(x, w, t, b, 0.8, upcast=torch.float64)
    want = _grads((rl, re_), [u.double() for u in ups], (x, w, b))
    pl, pe = ref.linear_log_probs(F.linear(x, w, b).float(), torch.eye(77), t, temperature=0.8)
    pt = _grads((pl, pe), ups, (x, w, b))
    for a, p, e in zip(got, pt, want):
        assert a.dtype == torch.bfloat16
        assert_2x_rule(a, p, e, name="bf16 gradient")


def test_large_logits_no_overflow_and_peaked_entropy(backend):
    # logits of size 1e4: lse and the entropy stay exact (the entropy is accumulated relative to the max)
    x = torch.tensor([[1.0], [1.0]], requires_grad=True)
    w = torch.tensor([[1e4], [1e4 - 1.0], [0.0]])
    t = torch.tensor([0, 1])
    logp, ent = FF.linear_log_probs(x, w, t, return_entropy=True)
    r_logp, r_ent = ref.linear_log_probs(x, w, t, upcast=torch.float64)
    torch.testing.assert_close(logp.double(), r_logp, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ent.double(), r_ent, atol=1e-6, rtol=1e-6)


def test_deterministic(backend, monkeypatch):
    _small_chunks(monkeypatch)
    x, w, b, t = _inputs((10,), 6, 19)
    runs = []
    for _ in range(2):
        logp, ent = FF.linear_log_probs(x, w, t, bias=b, return_entropy=True)
        runs.append([logp, ent, *_grads((logp, ent), [torch.ones(10), torch.ones(10)], (x, w, b))])
    for a, c in zip(*runs):
        assert torch.equal(a, c)


def test_logits_are_never_materialised(backend, monkeypatch):
    # every (rows, V) buffer the head's matmul makes is one chunk of rows, forward and backward
    _small_chunks(monkeypatch)
    from fasttx.kernels.cross_entropy import linear as K  # the host loop: chunk_rows, MIN_CHUNK

    monkeypatch.setattr(K, "chunk_rows", lambda M, H, C: 4)
    monkeypatch.setattr(ce_ops, "_chunk", lambda M, H, C: 4)
    shapes = []
    linear = F.linear

    def spy(x, w, b=None):
        out = linear(x, w, b)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    x, w, b, t = _inputs((16,), 6, 23)
    logp, ent = FF.linear_log_probs(x, w, t, bias=b, return_entropy=True)
    (logp.sum() + ent.sum()).backward()
    assert shapes and max(s[0] for s in shapes) == 4 and len(shapes) == 8  # 4 chunks, forward and backward


def test_fp64_result_dtype_on_both_paths(backend):
    x, w, b, t = _inputs((5,), 4, 9, dtype=torch.float64)
    logp = FF.linear_log_probs(x, w, t, bias=b)
    assert logp.dtype == torch.float64


@pytest.mark.parametrize("bad,exc", [
    (dict(temperature=0.0), ValueError),
    (dict(temperature=-1.0), ValueError),
    (dict(target=torch.tensor([0, 9, 1])), IndexError),
    (dict(target=torch.tensor([0, 1])), RuntimeError),
    (dict(target=torch.tensor([0.0, 1.0, 2.0])), RuntimeError),
    (dict(weight=torch.randn(9, 5)), RuntimeError),
    (dict(weight=torch.randn(9, 4, dtype=torch.float64)), RuntimeError),
    (dict(bias=torch.randn(8)), RuntimeError),
    (dict(ignore_index=1.5), TypeError),
])
def test_bad_arguments_raise(backend, bad, exc):
    args = dict(input=torch.randn(3, 4), weight=torch.randn(9, 4), target=torch.tensor([0, 1, 2]), bias=None,
                temperature=1.0, ignore_index=-100)
    args.update(bad)
    with pytest.raises(exc):
        FF.linear_log_probs(args.pop("input"), args.pop("weight"), args.pop("target"), **args)


def test_listed_as_a_fasttx_op():
    assert {"linear_log_probs", "linear_jsd", "linear_kl_div"} <= set(FF.__all__)
    assert fasttx.functional.linear_log_probs is FF.linear_log_probs


def test_torch_compile_fullgraph(backend):
    x, w, b, t = _inputs((9,), 8, 13)
    eager = FF.linear_log_probs(x, w, t, bias=b, temperature=0.5, return_entropy=True)  # also: warnings said
    want = _grads(eager, [torch.ones(9), torch.ones(9)], (x, w, b))
    f = torch.compile(lambda a, w_, b_: FF.linear_log_probs(a, w_, t, bias=b_, temperature=0.5, return_entropy=True),
                      fullgraph=True, backend="aot_eager")
    out = f(x, w, b)
    got = _grads(out, [torch.ones(9), torch.ones(9)], (x, w, b))
    for a, e in zip((*out, *got), (*eager, *want)):
        torch.testing.assert_close(a, e)


def test_nan_propagates_to_its_row_only(backend):
    x, w, b, t = _inputs((4,), 8, 13, bias=False)
    x = x.detach().clone()
    x[1, 0] = float("nan")
    t = torch.tensor([1, 2, -100, 3])
    logp, ent = FF.linear_log_probs(x, w.detach(), t, return_entropy=True)
    assert logp[1].isnan() and ent[1].isnan()
    assert torch.isfinite(logp[[0, 2, 3]]).all() and torch.isfinite(ent[[0, 2, 3]]).all()


def test_a_minus_inf_logit_is_probability_zero_not_nan(backend):
    # a vocabulary entry masked by a -inf bias: p = 0 there, its p log p term 0, finite gradients
    x, w, b, t = _inputs((6,), 8, 13)
    b = b.detach().clone()
    b[5] = float("-inf")
    t = torch.tensor([1, 2, -100, 3, 0, 12])
    b.requires_grad_()
    logp, ent = FF.linear_log_probs(x, w, t, bias=b, return_entropy=True)
    r_logp, r_ent = ref.linear_log_probs(x, w, t, b, upcast=torch.float64)
    torch.testing.assert_close(logp.double(), r_logp, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(ent.double(), r_ent.detach(), atol=ATOL, rtol=ATOL)
    gx, gw = _grads((logp, ent), [torch.ones(6), torch.ones(6)], (x, w))
    assert torch.isfinite(gx).all() and torch.isfinite(gw).all()
