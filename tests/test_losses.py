"""fasttx.losses against TRL's formulas (huggingface/trl; each TRL-side function below is written
from the file named in its docstring, on materialised logits, the way the trainer computes it),
end to end from hidden states + LM head through fasttx.functional.linear_log_probs, both backends,
with gradients; fp32 and bf16. TRL itself is an optional extra (`trl`): the tests that call its
functions run only where it imports."""
import math

import pytest
import torch
import torch.nn.functional as F

import fasttx.functional as FF
from fasttx import losses as L

B, T, H, V = 2, 7, 8, 23  # B pairs -> 2B sequences for the paired losses


# ----------------------------------------------------------------------------------------------
# TRL's side, on logits
# ----------------------------------------------------------------------------------------------
def trl_per_token_logps(logits, labels, mask):
    """trl/trainer/utils.py selective_log_softmax, then `per_token_logps[mask == 0] = 0.0` as
    DPOTrainer._compute_loss / KTOTrainer do (trl/trainer/dpo_trainer.py)."""
    lp = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    lp = lp.clone()
    lp[mask == 0] = 0.0
    return lp


def trl_dpo(pol, ref, mask, beta, loss_type, ls=0.0, reference_free=False):
    """trl/trainer/dpo_trainer.py DPOTrainer._compute_loss (f_divergence 'reverse_kl'); sigmoid with
    label smoothing and reference_free as before the DPO refactor (e3b7897)."""
    c, r = pol.sum(1).chunk(2)
    rc, rr = ref.sum(1).chunk(2)
    if reference_free:
        rc, rr = 0 * rc, 0 * rr
    cs, rs = c - rc, r - rr
    d = cs - rs
    if loss_type == "sigmoid":
        out = -F.logsigmoid(beta * d) * (1 - ls) - F.logsigmoid(-beta * d) * ls
    elif loss_type == "hinge":
        out = torch.relu(1 - beta * d)
    elif loss_type == "ipo":
        cm, rm = mask.chunk(2)
        out = (cs / cm.sum(1).clamp(min=1.0) - rs / rm.sum(1).clamp(min=1.0) - 1 / (2 * beta)) ** 2
    else:  # robust
        out = (-(1 - ls) * F.logsigmoid(beta * d) - (-ls * F.logsigmoid(-beta * d))) / (1 - 2 * ls)
    return out.mean()


def trl_nll(logits, labels):
    """nn.CrossEntropyLoss() over the chosen half, labels -100 off the completion (ORPO/CPO trainers)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def trl_orpo(pol, mask, chosen_logits, chosen_labels, beta):
    """trl/experimental/orpo/orpo_trainer.py: average_log_prob=True, odds_ratio_loss in fp32 with
    log1mexp, loss = policy_nll_loss - losses.mean()."""
    avg = pol.sum(-1) / mask.sum(-1)
    c, r = (t.float() for t in avg.chunk(2))

    def log1mexp(x):
        return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))

    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    return trl_nll(chosen_logits, chosen_labels) - (beta * F.logsigmoid(log_odds)).mean()


def trl_cpo(pol, mask, chosen_logits, chosen_labels, beta, loss_type, ls, gamma, alpha):
    """trl/experimental/cpo/cpo_trainer.py: average_log_prob for ipo/simpo, cpo_loss, + cpo_alpha NLL."""
    s = pol.sum(-1)
    if loss_type in ("ipo", "simpo"):
        s = s / mask.sum(-1)
    c, r = s.chunk(2)
    logits = c - r
    if loss_type == "simpo":
        logits = logits - gamma / beta
        out = -F.logsigmoid(beta * logits) * (1 - ls) - F.logsigmoid(-beta * logits) * ls
    elif loss_type == "sigmoid":
        out = -F.logsigmoid(beta * logits) * (1 - ls) - F.logsigmoid(-beta * logits) * ls
    elif loss_type == "hinge":
        out = torch.relu(1 - beta * logits)
    else:
        out = (logits - 1 / (2 * beta)) ** 2
    loss = out.mean()
    return loss + alpha * trl_nll(chosen_logits, chosen_labels) if alpha else loss


def trl_kto(pol, ref, kl_pol, kl_ref, label, beta, dw, uw, loss_type):
    """trl/trainer/kto_trainer.py _compute_loss (one process: the gathered KL is this batch's)."""
    lp, rlp = pol.sum(-1), ref.sum(-1)
    ci, ri = torch.nonzero(label, as_tuple=True)[0], torch.nonzero(~label, as_tuple=True)[0]
    kl = (kl_pol.sum(-1) - kl_ref.sum(-1)).mean().detach().clamp(min=0) if loss_type == "kto" else torch.zeros(1)
    cl = lp[ci] - rlp[ci]
    rl = lp[ri] - rlp[ri]
    if loss_type == "kto":
        c_loss, r_loss = 1 - torch.sigmoid(beta * (cl - kl)), 1 - torch.sigmoid(beta * (kl - rl))
    else:
        c_loss, r_loss = 1 - torch.sigmoid(beta * cl), torch.sigmoid(beta * rl)
    return torch.cat((dw * c_loss, uw * r_loss), 0).nanmean()


def trl_grpo(lp, old, ref, adv, mask, beta, eps_low, eps_high, loss_type, level, delta=None, max_len=None):
    """trl/trainer/grpo_trainer.py GRPOTrainer._compute_loss (num_processes 1, no vLLM correction,
    no entropy mask; the gradient-accumulation division left out)."""
    adv = adv.unsqueeze(1)
    old = lp.detach() if old is None else old
    log_ratio = lp - old
    if level == "token":
        w = log_ratio
    else:
        w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    c1 = torch.exp(w)
    c2 = torch.clamp(c1, 1 - eps_low, 1 + eps_high)
    if delta is not None:
        c1 = torch.clamp(c1, max=delta)
    ptl = -torch.min(c1 * adv, c2 * adv)
    if beta != 0.0:
        ptl = ptl + beta * (torch.exp(ref - lp) - (ref - lp) - 1)
    if loss_type == "grpo":
        return ((ptl * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (ptl * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (ptl * mask).sum() / (ptl.size(0) * max_len)
    return (ptl * mask).sum() / mask.sum().clamp(min=1.0)  # dapo: num_items_in_batch of one process


# ----------------------------------------------------------------------------------------------
# Fixtures: a policy head and a reference head on the same hidden states
# ----------------------------------------------------------------------------------------------
def _batch(rows, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, T, H, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.5).to(dtype).requires_grad_()
    w_ref = (w.detach() + 0.1 * torch.randn(V, H, generator=g).to(dtype))
    labels = torch.randint(0, V, (rows, T), generator=g)
    mask = torch.zeros(rows, T, dtype=torch.long)
    for i in range(rows):  # prompts of different lengths, a padded tail on some rows
        start, end = 1 + i % 3, T - (i % 2)
        mask[i, start:end] = 1
    return h, w, w_ref, labels, mask


def _ours(h, w, labels, mask):
    # completion tokens only: everything else is ignored (0, no gradient)
    target = torch.where(mask.bool(), labels, torch.full_like(labels, -100))
    return FF.linear_log_probs(h, w, target)


def _theirs(h, w, labels, mask):
    logits = F.linear(h, w).float()
    return trl_per_token_logps(logits, labels, mask), logits


def _check(ours, theirs, leaves, atol=1e-5):
    torch.testing.assert_close(ours, theirs, atol=atol, rtol=atol)
    g1 = torch.autograd.grad(ours, leaves, retain_graph=True)
    g2 = torch.autograd.grad(theirs, leaves, retain_graph=True)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=atol, rtol=atol)


@pytest.mark.parametrize("loss_type,ls,free", [("sigmoid", 0.0, False), ("sigmoid", 0.1, False), ("hinge", 0.0, False),
                                               ("ipo", 0.0, False), ("robust", 0.2, False), ("sigmoid", 0.0, True)])
def test_dpo(loss_type, ls, free):
    h, w, w_ref, labels, mask = _batch(2 * B)
    with torch.no_grad():
        ref_ours = _ours(h, w_ref, labels, mask)
        ref_theirs, _ = _theirs(h, w_ref, labels, mask)
    ours = L.dpo_loss(_ours(h, w, labels, mask), ref_ours, mask, beta=0.3, loss_type=loss_type,
                      label_smoothing=ls, reference_free=free)
    theirs = trl_dpo(_theirs(h, w, labels, mask)[0], ref_theirs, mask, 0.3, loss_type, ls, free)
    _check(ours, theirs, (h, w))


def test_dpo_and_grpo_through_the_triton_path(backend):
    test_dpo("sigmoid", 0.0, False)
    test_grpo_family("grpo", "token", 0.04, True, None)


def test_orpo(backend):
    h, w, _, labels, mask = _batch(2 * B)
    ours = L.orpo_loss(_ours(h, w, labels, mask), mask, beta=0.2)
    pol, logits = _theirs(h, w, labels, mask)
    chosen_labels = torch.where(mask.bool(), labels, -100)[:B]
    _check(ours, trl_orpo(pol, mask, logits[:B], chosen_labels, 0.2), (h, w))


@pytest.mark.parametrize("loss_type,alpha", [("sigmoid", 1.0), ("hinge", 0.0), ("ipo", 0.5), ("simpo", 0.0)])
def test_cpo_and_simpo(loss_type, alpha):
    h, w, _, labels, mask = _batch(2 * B)
    ours = L.cpo_loss(_ours(h, w, labels, mask), mask, beta=0.5, loss_type=loss_type, label_smoothing=0.1,
                      simpo_gamma=0.4, cpo_alpha=alpha)
    pol, logits = _theirs(h, w, labels, mask)
    chosen_labels = torch.where(mask.bool(), labels, -100)[:B]
    _check(ours, trl_cpo(pol, mask, logits[:B], chosen_labels, 0.5, loss_type, 0.1, 0.4, alpha), (h, w))
    if loss_type == "simpo":
        torch.testing.assert_close(L.simpo_loss(_ours(h, w, labels, mask), mask, beta=0.5, gamma=0.4,
                                                label_smoothing=0.1), ours)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto(loss_type):
    h, w, w_ref, labels, mask = _batch(5)
    label = torch.tensor([True, False, True, True, False])
    kl_labels = labels.roll(1, 0)  # mismatched (prompt, completion) pairs
    with torch.no_grad():
        ref_o, kl_ref_o = _ours(h, w_ref, labels, mask), _ours(h, w_ref, kl_labels, mask)
        ref_t, kl_ref_t = _theirs(h, w_ref, labels, mask)[0], _theirs(h, w_ref, kl_labels, mask)[0]
    ours = L.kto_loss(_ours(h, w, labels, mask), ref_o, mask, label, _ours(h, w, kl_labels, mask), kl_ref_o, mask,
                      beta=0.4, desirable_weight=1.3, undesirable_weight=0.7, loss_type=loss_type)
    theirs = trl_kto(_theirs(h, w, labels, mask)[0], ref_t, _theirs(h, w, kl_labels, mask)[0], kl_ref_t, label,
                     0.4, 1.3, 0.7, loss_type)
    _check(ours, theirs, (h, w))


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "bnpo"])
@pytest.mark.parametrize("level,beta,old,delta", [("token", 0.0, False, None), ("token", 0.04, True, None),
                                                  ("sequence", 0.04, True, None), ("token", 0.0, True, 1.5)])
def test_grpo_family(loss_type, level, beta, old, delta):
    h, w, w_ref, labels, mask = _batch(4)
    adv = torch.tensor([1.0, -0.5, 0.0, 2.0])
    g = torch.Generator().manual_seed(7)
    w_old = w.detach() + 0.3 * torch.randn(V, H, generator=g)  # ratios far enough from 1 to clip
    with torch.no_grad():
        ref_o, ref_t = _ours(h, w_ref, labels, mask), _theirs(h, w_ref, labels, mask)[0]
        old_o = _ours(h, w_old, labels, mask) if old else None
        old_t = _theirs(h, w_old, labels, mask)[0] if old else None
    ours = L.grpo_loss(_ours(h, w, labels, mask), adv, mask, old_per_token_logps=old_o, ref_per_token_logps=ref_o,
                       beta=beta, epsilon=0.2, epsilon_high=0.28, delta=delta, loss_type=loss_type,
                       importance_sampling_level=level, max_completion_length=T + 3)
    theirs = trl_grpo(_theirs(h, w, labels, mask)[0], old_t, ref_t, adv, mask, beta, 0.2, 0.28, loss_type, level,
                      delta, T + 3)
    _check(ours, theirs, (h, w))


@pytest.mark.parametrize("name", ["dpo", "orpo", "cpo", "kto", "grpo"])
def test_bf16_per_token_log_probs_give_trls_bf16_result(name):
    # the same per-token log-probs in bf16 into both: the formulas run in TRL's order and dtype
    g = torch.Generator().manual_seed(3)
    lp = (-torch.rand(4, T, generator=g) * 3).to(torch.bfloat16)
    ref = (lp.float() + 0.05 * torch.randn(4, T, generator=g)).to(torch.bfloat16)
    mask = torch.ones(4, T, dtype=torch.long)
    mask[:, :2] = 0
    lpm = lp.masked_fill(mask == 0, 0)
    refm = ref.masked_fill(mask == 0, 0)
    if name == "dpo":
        ours, theirs = L.dpo_loss(lp, ref, mask, beta=0.1), trl_dpo(lpm, refm, mask, 0.1, "sigmoid")
    elif name == "orpo":
        ours = L.orpo_loss(lp, mask, beta=0.1)
        nll = -(lpm[:2].float().sum() / mask[:2].sum())  # the NLL on logits is what trl_orpo's CE gives
        avg = lpm.sum(-1) / mask.sum(-1)
        c, r = (t.float() for t in avg.chunk(2))
        log_odds = (c - r) - (torch.log1p(-torch.exp(c)) - torch.log1p(-torch.exp(r)))
        theirs = nll.to(torch.bfloat16) - (0.1 * F.logsigmoid(log_odds)).mean()
    elif name == "cpo":
        ours = L.cpo_loss(lp, mask, cpo_alpha=0.0)
        theirs = trl_cpo(lpm, mask, None, None, 0.1, "sigmoid", 0.0, 0.5, 0.0)
    elif name == "kto":
        label = torch.tensor([True, False, True, False])
        ours = L.kto_loss(lp, ref, mask, label, lp.roll(1, 0), ref.roll(1, 0), mask)
        theirs = trl_kto(lpm, refm, lpm.roll(1, 0), refm.roll(1, 0), label, 0.1, 1.0, 1.0, "kto")
    else:
        adv = torch.tensor([1.0, -1.0, 0.5, 0.0], dtype=torch.bfloat16)
        old = (lp.float() + 0.2).to(torch.bfloat16)
        ours = L.grpo_loss(lp, adv, mask, old_per_token_logps=old, ref_per_token_logps=ref, beta=0.04,
                           loss_type="grpo")
        theirs = trl_grpo(lp, old, ref, adv, mask, 0.04, 0.2, 0.2, "grpo", "token")
    assert ours.dtype in (torch.bfloat16, torch.float32)
    torch.testing.assert_close(ours.float(), theirs.float(), atol=2e-2, rtol=2e-2)


def test_known_values():
    # equal chosen and rejected log-probs: DPO sigmoid = log 2, hinge = 1, IPO = (1 / (2 beta))^2
    lp = torch.full((2, 3), -1.0)
    mask = torch.ones(2, 3)
    assert math.isclose(L.dpo_loss(lp, lp, mask).item(), math.log(2), rel_tol=1e-6)
    assert math.isclose(L.dpo_loss(lp, lp, mask, loss_type="hinge").item(), 1.0, rel_tol=1e-6)
    assert math.isclose(L.dpo_loss(lp, lp, mask, beta=0.5, loss_type="ipo").item(), 1.0, rel_tol=1e-6)
    # GRPO on-policy (ratio 1), no KL: -mean advantage over the completion tokens
    adv = torch.tensor([2.0, -1.0])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert math.isclose(L.grpo_loss(lp, adv, m, loss_type="bnpo").item(), -(2 + 2 - 1) / 3, rel_tol=1e-6)
    assert math.isclose(L.grpo_loss(lp, adv, m, loss_type="grpo").item(), -(2 - 1) / 2, rel_tol=1e-6)
    # the k3 KL estimator is 0 when policy == reference, and grows as they part
    assert L.grpo_loss(lp, adv * 0, m, ref_per_token_logps=lp, beta=1.0).item() == 0.0
    assert L.grpo_loss(lp, adv * 0, m, ref_per_token_logps=lp - 1, beta=1.0).item() > 0.0


def test_bad_options_raise():
    lp, mask = torch.zeros(4, 3), torch.ones(4, 3)
    with pytest.raises(ValueError, match="loss_type"):
        L.dpo_loss(lp, lp, mask, loss_type="nope")
    with pytest.raises(ValueError, match="label_smoothing"):
        L.dpo_loss(lp, lp, mask, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="even batch"):
        L.dpo_loss(lp[:3], lp[:3], mask[:3])
    with pytest.raises(ValueError, match="ref_per_token_logps"):
        L.grpo_loss(lp, torch.zeros(4), mask, beta=0.1)
    with pytest.raises(ValueError, match="loss_type"):
        L.grpo_loss(lp, torch.zeros(4), mask, loss_type="ppo")


def test_against_trl_when_importable():
    # TRL's own static loss of the GKD trainer against linear_jsd (the rest of TRL's losses are
    # trainer methods that need a constructed trainer: compared through the formulas above)
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    h, w, w_ref, labels, mask = _batch(2)
    target = torch.where(mask.bool(), labels, -100)
    for beta in (0.0, 0.5, 1.0):
        theirs = gkd.GKDTrainer.generalized_jsd_loss(F.linear(h, w), F.linear(h, w_ref), labels=target, beta=beta)
        ours = FF.linear_jsd(h, w, h, w_ref, target, beta=beta)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
