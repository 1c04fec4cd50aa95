"""fasttx.functional.linear_jsd / linear_kl_div: distillation divergences without the logits,
against the fp64 oracle (fasttx/reference.py: generalized_jsd) and TRL's
GKDTrainer.generalized_jsd_loss (trl/experimental/gkd/gkd_trainer.py), written on logits below."""
import pytest
import torch
import torch.nn.functional as F

import fasttx.functional as FF
import fasttx.ops.cross_entropy as ce_ops
from fasttx import reference as ref


def trl_generalized_jsd(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                        reduction="batchmean", num_items_in_batch=None):
    """TRL's formula (trl/experimental/gkd/gkd_trainer.py, GKDTrainer.generalized_jsd_loss)."""
    s = F.log_softmax(student_logits / temperature, dim=-1)
    q = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(s, q, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(q, s, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=s.dtype)
        mix = torch.logsumexp(torch.stack([s + torch.log1p(-b), q + torch.log(b)]), dim=0)
        jsd = b * F.kl_div(mix, q, reduction="none", log_target=True) + (1 - b) * F.kl_div(
            mix, s, reduction="none", log_target=True)
    if labels is not None:
        mask = labels != -100
        jsd = jsd[mask]
    if num_items_in_batch is not None:
        return jsd.sum() / num_items_in_batch
    if reduction == "batchmean":
        return jsd.sum() / (mask.sum().clamp_min(1) if labels is not None else max(jsd.size(0), 1))
    if reduction == "sum":
        return jsd.sum()
    if reduction == "mean":
        return jsd.mean()
    return jsd


def _heads(dtype=torch.float64, B=2, T=5, Hs=8, Ht=6, V=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(B, T, Hs, generator=g).to(dtype).requires_grad_()
    ws = (torch.randn(V, Hs, generator=g) * 0.5).to(dtype).requires_grad_()
    bs = torch.randn(V, generator=g).to(dtype).requires_grad_()
    xt = torch.randn(B, T, Ht, generator=g).to(dtype)
    wt = (torch.randn(V, Ht, generator=g) * 0.5).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 1] = labels[1, 4] = -100
    return xs, ws, bs, xt, wt, labels


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    monkeypatch.setattr(ce_ops, "_chunk", lambda M, H, C: 3)  # several row chunks at test sizes


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
@pytest.mark.parametrize("with_labels", [False, True])
def test_equals_trls_generalized_jsd_with_student_gradients(beta, reduction, with_labels):
    xs, ws, bs, xt, wt, labels = _heads()
    lab = labels if with_labels else None
    ours = FF.linear_jsd(xs, ws, xt, wt, lab, student_bias=bs, beta=beta, temperature=0.8, reduction=reduction)
    theirs = trl_generalized_jsd(F.linear(xs, ws, bs), F.linear(xt, wt), lab, beta, 0.8, reduction)
    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=1e-10)
    for a, b in zip(torch.autograd.grad(ours, (xs, ws, bs)), torch.autograd.grad(theirs, (xs, ws, bs))):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_none_reduction_and_num_items_in_batch():
    xs, ws, bs, xt, wt, labels = _heads()
    rows = FF.linear_jsd(xs, ws, xt, wt, labels, beta=0.4, reduction="none")
    oracle = ref.generalized_jsd(F.linear(xs, ws), F.linear(xt, wt), labels, beta=0.4)
    assert rows.shape == labels.shape and (rows[labels == -100] == 0).all()
    torch.testing.assert_close(rows, oracle, atol=1e-10, rtol=1e-10)
    ours = FF.linear_jsd(xs, ws, xt, wt, labels, beta=0.4, num_items_in_batch=torch.tensor(11))
    theirs = trl_generalized_jsd(F.linear(xs, ws), F.linear(xt, wt), labels, 0.4, num_items_in_batch=11)
    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=1e-10)


def test_kl_div_is_forward_kl():
    xs, ws, bs, xt, wt, labels = _heads()
    ours = FF.linear_kl_div(xs, ws, xt, wt, labels, temperature=2.0)
    s = F.log_softmax(F.linear(xs, ws) / 2.0, -1)
    q = F.log_softmax(F.linear(xt, wt) / 2.0, -1)
    per_token = F.kl_div(s, q, reduction="none", log_target=True).sum(-1)  # KL(teacher || student)
    want = per_token[labels != -100].sum() / (labels != -100).sum()
    torch.testing.assert_close(ours, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_a_teacher_that_requires_grad_gets_its_exact_gradient(beta):
    xs, ws, bs, xt, wt, labels = _heads()
    xt.requires_grad_()
    wt.requires_grad_()
    bt = torch.randn(37, dtype=torch.float64, requires_grad=True)
    ours = FF.linear_jsd(xs, ws, xt, wt, labels, teacher_bias=bt, beta=beta)
    theirs = trl_generalized_jsd(F.linear(xs, ws), F.linear(xt, wt, bt), labels, beta)
    leaves = (xs, ws, xt, wt, bt)
    for a, b in zip(torch.autograd.grad(ours, leaves), torch.autograd.grad(theirs, leaves)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_teacher_under_no_grad_gets_nothing_and_costs_no_teacher_backward(monkeypatch):
    xs, ws, bs, xt, wt, labels = _heads(dtype=torch.float32)
    loss = FF.linear_jsd(xs, ws, xt, wt, labels)
    loss.backward()
    assert xt.grad is None and wt.grad is None and xs.grad is not None


def test_fp32_and_bf16_against_the_fp64_oracle():
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        xs, ws, bs, xt, wt, labels = _heads(dtype=dtype)
        ours = FF.linear_jsd(xs, ws, xt, wt, labels, beta=0.5)
        assert ours.dtype == torch.float32
        zs, zt = F.linear(xs, ws).double(), F.linear(xt, wt).double()  # the logits the heads give in dtype
        want = ref.generalized_jsd(zs, zt, labels, 0.5).sum() / (labels != -100).sum()
        torch.testing.assert_close(ours.double(), want, atol=tol, rtol=tol)
        (g,) = torch.autograd.grad(ours, (xs,))
        assert g.dtype == dtype and torch.isfinite(g.float()).all()


def test_never_more_than_a_chunk_of_logits(monkeypatch):
    shapes = []
    linear = F.linear

    def spy(x, w, b=None):
        out = linear(x, w, b)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    xs, ws, bs, xt, wt, labels = _heads()
    FF.linear_jsd(xs, ws, xt, wt, labels).backward()
    assert max(s[0] for s in shapes) == 3 and len(shapes) == 4 * 4  # 10 rows / 3: 4 chunks, 2 heads, fwd + bwd


@pytest.mark.parametrize("bad,exc", [
    (dict(beta=1.5), ValueError), (dict(temperature=0.0), ValueError), (dict(reduction="avg"), ValueError),
    (dict(teacher_weight=torch.randn(36, 6, dtype=torch.float64)), RuntimeError),
    (dict(teacher_input=torch.randn(2, 4, 6, dtype=torch.float64)), RuntimeError),
    (dict(target=torch.zeros(2, 4, dtype=torch.long)), RuntimeError),
    (dict(student_weight=torch.randn(37, 8)), RuntimeError),
])
def test_bad_arguments_raise(bad, exc):
    xs, ws, bs, xt, wt, labels = _heads()
    args = dict(student_input=xs, student_weight=ws, teacher_input=xt, teacher_weight=wt, target=labels)
    args.update(bad)
    with pytest.raises(exc):
        FF.linear_jsd(**args)
