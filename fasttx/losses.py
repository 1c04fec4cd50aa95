"""Post-training losses as thin formulas on per-token log-probabilities.

Every function here takes per-token log-probs (B, T) (from `fasttx.functional.linear_log_probs`
of the final hidden states and the LM head: no (tokens, vocab) logits anywhere) and the
completion masks (B, T) (1 on the completion tokens whose log-probs count, 0 on prompt and
padding) that TRL's trainers use, and returns the loss TRL's trainer computes for the same inputs,
with TRL's defaults. The formulas follow TRL's sources (huggingface/trl):

  dpo_loss     trl/trainer/dpo_trainer.py       DPOTrainer._compute_loss (sigmoid, hinge, ipo, robust;
                                                reference_free as DPOConfig.reference_free before the refactor)
  orpo_loss    trl/experimental/orpo/orpo_trainer.py   odds_ratio_loss + the chosen NLL
  cpo_loss     trl/experimental/cpo/cpo_trainer.py     cpo_loss (sigmoid, hinge, ipo, simpo) + cpo_alpha NLL
  simpo_loss   the same, loss_type="simpo", cpo_alpha=0 (SimPO without the NLL term)
  kto_loss     trl/trainer/kto_trainer.py       kto loss (kto, apo_zero_unpaired), KL from mismatched pairs
  grpo_loss    trl/trainer/grpo_trainer.py      _compute_loss (grpo, dapo, dr_grpo, bnpo): clipped
                                                importance ratios (token or sequence level), the k3 KL
                                                estimator, each variant's normalisation

Paired losses (DPO, ORPO, CPO, SimPO) take the batch as TRL builds it: the chosen completions in
the first half of dim 0 and the rejected ones in the second (`logps.chunk(2, dim=0)`). Masked
positions count as 0 whatever their log-prob holds (TRL sets them to 0 before summing). The
arithmetic runs in the inputs' dtype in TRL's order (a bf16 input gives TRL's bf16 result), except
where TRL itself upcasts (ORPO's odds ratio). Single process: the quantities TRL gathers across
ranks (KTO's KL, DAPO's token count) are this process's unless given; the gradient-accumulation
division TRL applies after the loss is left to the caller.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["sequence_log_probs", "dpo_loss", "orpo_loss", "cpo_loss", "simpo_loss", "kto_loss", "grpo_loss"]


def _masked(per_token_logps: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask.bool(), per_token_logps, torch.zeros_like(per_token_logps))


def sequence_log_probs(per_token_logps: Tensor, mask: Tensor, average: bool = False) -> Tensor:
    """(B, T) per-token log-probs -> (B,) per-sequence: the sum over the mask, or with `average`
    the sum / the mask's count (TRL's get_batch_logps(average_log_prob=True))."""
    s = _masked(per_token_logps, mask).sum(-1)
    return s / mask.sum(-1) if average else s


def _pairs(t: Tensor):
    if t.shape[0] % 2:
        raise ValueError(f"paired losses take [chosen; rejected] along dim 0: an even batch, got {t.shape[0]}")
    return t.chunk(2, dim=0)


def _nll(per_token_logps: Tensor, mask: Tensor) -> Tensor:
    """Mean negative log-likelihood over the masked tokens (nn.CrossEntropyLoss's mean over the
    labels that are not -100)."""
    return -_masked(per_token_logps, mask).sum() / mask.sum()


def _sigmoid_loss(logits: Tensor, beta: float, label_smoothing: float) -> Tensor:
    return -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing


def dpo_loss(
    per_token_logps: Tensor,
    ref_per_token_logps: Optional[Tensor],
    completion_mask: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    reduction: str = "mean",
) -> Tensor:
    """Direct preference optimisation. per_token_logps / ref_per_token_logps / completion_mask
    (2B, T): chosen rows first, then rejected. delta = (c - ref_c) - (r - ref_r) of the summed
    log-probs (ref terms 0 when reference_free or ref_per_token_logps is None):
      sigmoid  -logsigmoid(beta delta) (1 - ls) - logsigmoid(-beta delta) ls   (ls = label_smoothing)
      hinge    relu(1 - beta delta)
      ipo      (dc / |c| - dr / |r| - 1 / (2 beta))^2, each log-ratio averaged over its completion
               length (clamped at 1)
      robust   ((1 - ls)(-logsigmoid(beta delta)) + ls logsigmoid(-beta delta)) / (1 - 2 ls)
    Returns the mean over pairs (reduction="none": per pair (B,))."""
    if loss_type not in ("sigmoid", "hinge", "ipo", "robust"):
        raise ValueError(f"dpo_loss: loss_type must be one of sigmoid, hinge, ipo, robust; got {loss_type!r}")
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo_loss: label_smoothing must lie in [0, 0.5) for 'robust', got {label_smoothing}")
    chosen, rejected = _pairs(sequence_log_probs(per_token_logps, completion_mask))
    if reference_free or ref_per_token_logps is None:
        ref_chosen = ref_rejected = torch.zeros_like(chosen)
    else:
        ref_chosen, ref_rejected = _pairs(sequence_log_probs(ref_per_token_logps, completion_mask))
    chosen_scores = chosen - ref_chosen
    rejected_scores = rejected - ref_rejected
    delta = chosen_scores - rejected_scores
    if loss_type == "sigmoid":
        losses = _sigmoid_loss(delta, beta, label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        chosen_mask, rejected_mask = _pairs(completion_mask)
        ipo_delta = (chosen_scores / chosen_mask.sum(dim=1).clamp(min=1.0)
                     - rejected_scores / rejected_mask.sum(dim=1).clamp(min=1.0))
        losses = (ipo_delta - 1 / (2 * beta)) ** 2
    else:
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta)
        losses = (clean - flipped) / (1 - 2 * label_smoothing)
    return losses if reduction == "none" else losses.mean()


def _log1mexp(x: Tensor) -> Tensor:
    # log(1 - exp(x)) for x < 0, each branch where it keeps its digits (split at -log 2)
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(per_token_logps: Tensor, completion_mask: Tensor, *, beta: float = 0.1) -> Tensor:
    """Odds-ratio preference optimisation: the chosen completions' mean NLL minus
    beta * mean logsigmoid(log_odds), log_odds = (c - r) - (log(1 - e^c) - log(1 - e^r)) of the
    length-averaged log-probs c, r (in fp32, as TRL). (2B, T) inputs, chosen first."""
    avg = sequence_log_probs(per_token_logps, completion_mask, average=True)
    chosen, rejected = (t.float() for t in _pairs(avg))
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    chosen_tokens, _ = _pairs(per_token_logps)
    chosen_mask, _ = _pairs(completion_mask)
    return _nll(chosen_tokens, chosen_mask) - (beta * ratio).mean()


def cpo_loss(
    per_token_logps: Tensor,
    completion_mask: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    cpo_alpha: float = 1.0,
) -> Tensor:
    """Contrastive preference optimisation (and SimPO, loss_type="simpo"): no reference model.
    logits = c - r of the summed log-probs (averaged for ipo and simpo); simpo subtracts
    simpo_gamma / beta; sigmoid and simpo take the label-smoothed sigmoid loss, hinge relu(1 - beta
    logits), ipo (logits - 1 / (2 beta))^2. Returns mean + cpo_alpha * the chosen NLL."""
    if loss_type not in ("sigmoid", "hinge", "ipo", "simpo"):
        raise ValueError(f"cpo_loss: loss_type must be one of sigmoid, hinge, ipo, simpo; got {loss_type!r}")
    seq = sequence_log_probs(per_token_logps, completion_mask, average=loss_type in ("ipo", "simpo"))
    chosen, rejected = _pairs(seq)
    logits = chosen - rejected
    if loss_type == "simpo":
        losses = _sigmoid_loss(logits - simpo_gamma / beta, beta, label_smoothing)
    elif loss_type == "sigmoid":
        losses = _sigmoid_loss(logits, beta, label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:
        losses = (logits - 1 / (2 * beta)) ** 2
    loss = losses.mean()
    if cpo_alpha != 0.0:
        chosen_tokens, _ = _pairs(per_token_logps)
        chosen_mask, _ = _pairs(completion_mask)
        loss = loss + cpo_alpha * _nll(chosen_tokens, chosen_mask)
    return loss


def simpo_loss(per_token_logps: Tensor, completion_mask: Tensor, *, beta: float = 2.0, gamma: float = 0.5,
               label_smoothing: float = 0.0) -> Tensor:
    """SimPO: cpo_loss(loss_type="simpo", cpo_alpha=0) (length-averaged log-probs, margin
    gamma / beta, no reference, no NLL term). beta defaults to the SimPO paper's 2.0; TRL's CPO
    trainer takes beta and simpo_gamma from CPOConfig."""
    return cpo_loss(per_token_logps, completion_mask, beta=beta, loss_type="simpo",
                    label_smoothing=label_smoothing, simpo_gamma=gamma, cpo_alpha=0.0)


def kto_loss(
    per_token_logps: Tensor,
    ref_per_token_logps: Tensor,
    completion_mask: Tensor,
    label: Tensor,
    kl_per_token_logps: Optional[Tensor] = None,
    ref_kl_per_token_logps: Optional[Tensor] = None,
    kl_completion_mask: Optional[Tensor] = None,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
    kl: Optional[Tensor] = None,
) -> Tensor:
    """Kahneman-Tversky optimisation on unpaired completions. per_token_logps, ref_per_token_logps,
    completion_mask (B, T); label (B,) bool (True: desirable). The KL baseline is
    mean(KL - ref KL) of the summed log-probs of the mismatched (prompt, completion) pairs
    (kl_*; detached, clamped at 0; pass `kl` to give a gathered value instead; 0 without either):
      kto                desirable 1 - sigmoid(beta (logratio - KL)), undesirable 1 - sigmoid(beta (KL - logratio))
      apo_zero_unpaired  desirable 1 - sigmoid(beta logratio),        undesirable sigmoid(beta logratio)
    each weighted; returns the nanmean over the batch (desirable first, as TRL concatenates)."""
    if loss_type not in ("kto", "apo_zero_unpaired"):
        raise ValueError(f"kto_loss: loss_type must be 'kto' or 'apo_zero_unpaired', got {loss_type!r}")
    logps = sequence_log_probs(per_token_logps, completion_mask)
    ref_logps = sequence_log_probs(ref_per_token_logps, completion_mask)
    label = label.bool()
    chosen_idx = torch.nonzero(label, as_tuple=True)[0]
    rejected_idx = torch.nonzero(~label, as_tuple=True)[0]
    if kl is None:
        if loss_type == "kto" and kl_per_token_logps is not None:
            kl_logps = sequence_log_probs(kl_per_token_logps, kl_completion_mask)
            ref_kl_logps = sequence_log_probs(ref_kl_per_token_logps, kl_completion_mask)
            kl = (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
        else:
            kl = torch.zeros(1, dtype=logps.dtype, device=logps.device)
    chosen_logratios = logps.index_select(0, chosen_idx) - ref_logps.index_select(0, chosen_idx)
    rejected_logratios = logps.index_select(0, rejected_idx) - ref_logps.index_select(0, rejected_idx)
    if loss_type == "kto":
        chosen_losses = 1 - torch.sigmoid(beta * (chosen_logratios - kl))
        rejected_losses = 1 - torch.sigmoid(beta * (kl - rejected_logratios))
    else:
        chosen_losses = 1 - torch.sigmoid(beta * chosen_logratios)
        rejected_losses = torch.sigmoid(beta * rejected_logratios)
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses), 0)
    return losses.nanmean()


def grpo_loss(
    per_token_logps: Tensor,
    advantages: Tensor,
    completion_mask: Tensor,
    *,
    old_per_token_logps: Optional[Tensor] = None,
    ref_per_token_logps: Optional[Tensor] = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: Optional[float] = None,
    delta: Optional[float] = None,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    max_completion_length: Optional[int] = None,
    num_items_in_batch: Optional[Tensor] = None,
) -> Tensor:
    """The GRPO family's policy loss. per_token_logps (B, T) of the policy (the one tensor that
    carries the gradient); advantages (B,) (or (B, T)); completion_mask (B, T);
    old_per_token_logps (B, T) from the sampling policy (None: per_token_logps detached, ratio 1);
    ref_per_token_logps (B, T) for the KL term (needed when beta != 0).

    ratio r = exp(logp - old_logp) per token ("token") or exp of its masked mean per sequence
    ("sequence"); per-token loss = -min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A) (r capped
    at `delta` first when given: two-sided clipping), + beta * (exp(ref - logp) - (ref - logp) - 1)
    (the k3 estimator of KL(policy || ref)). Normalisation of the masked sum:
      grpo     per sequence by its length (clamped at 1), then the mean over sequences
      bnpo     by the batch's completion tokens (clamped at 1)
      dr_grpo  by B * max_completion_length (default: T)
      dapo     by num_items_in_batch (the completion tokens of the whole accumulated batch across
               processes, divided by the process count as TRL does; default: this batch's, clamped at 1)"""
    if loss_type not in ("grpo", "dapo", "dr_grpo", "bnpo"):
        raise ValueError(f"grpo_loss: loss_type must be one of grpo, dapo, dr_grpo, bnpo; got {loss_type!r}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"grpo_loss: importance_sampling_level must be 'token' or 'sequence', "
                         f"got {importance_sampling_level!r}")
    if beta != 0.0 and ref_per_token_logps is None:
        raise ValueError("grpo_loss: beta != 0 needs ref_per_token_logps (the reference policy's log-probs)")
    mask = completion_mask
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    old = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
    log_ratio = per_token_logps - old
    if importance_sampling_level == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    eps_high = epsilon if epsilon_high is None else epsilon_high
    coef_2 = torch.clamp(coef_1, 1 - epsilon, 1 + eps_high)
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if beta != 0.0:
        per_token_kl = torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        T = per_token_loss.shape[-1] if max_completion_length is None else max_completion_length
        return (per_token_loss * mask).sum() / (per_token_loss.size(0) * T)
    normalizer = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch)
    return (per_token_loss * mask).sum() / normalizer.to(per_token_loss.device).clamp(min=1.0)
