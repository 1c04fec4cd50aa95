"""Post-training losses from hidden states (a DPO step and a GRPO step, policy + reference): time
and peak memory of the loss's forward + backward (the model body excluded) with fasttx's
linear_log_probs + fasttx.losses (no logits), against the same formulas on materialised logits
(TRL's way: logits = F.linear, selective_log_softmax, the loss), torch.compile of that, and (if
importable) Liger-Kernel's chunked losses (LigerFusedLinearDPOLoss, LigerFusedLinearGRPOLoss).
peak_MB (CUDA) is the point: at 4096 tokens and a 152k vocabulary the policy's fp32 logits are
2.4 GiB, their gradient as much again, and the reference's logits on top.

FLOP counts (tokens N, hidden H, vocab V; the useful matmuls; the reference under no_grad):
  fwd      policy logits 2NHV + reference logits 2NHV        4NHV
  fwd+bwd  + dx = dlogits W, dW = dlogits^T x                8NHV
fasttx recomputes the policy's logits in the backward (10NHV done for 8NHV counted).
"""
from __future__ import annotations

import math
from typing import List

import torch
import torch.nn.functional as F

import fasttx.functional as ff
from fasttx import losses

from .harness import Case, Config, Provider, Suite, Work, importable, randn, torch_and_compile


def _sizes(cfg: Config):
    if cfg.size == "tiny":
        return [(4, 16, 32, 1000)]  # sequences, length, H, V
    return [(8, 512, 4096, 152064)]  # 4096 tokens, Qwen2.5-7B's head (H 3584 there; 4096 here)


def _inputs(case: Case, cfg: Config):
    S, T, H, V = (case.params[k] for k in ("S", "T", "H", "V"))
    x = randn(S, T, H, dtype=case.dtype, device=cfg.device, requires_grad=True)
    W = randn(V, H, dtype=case.dtype, device=cfg.device, requires_grad=True, scale=H ** -0.5)
    x_ref = x.detach().clone()
    W_ref = (W.detach() + 0.01 * torch.randn_like(W)).requires_grad_(False)
    ids = torch.randint(0, V, (S, T), device=cfg.device)
    mask = torch.ones(S, T, dtype=torch.long, device=cfg.device)
    mask[:, : T // 4] = 0  # the prompt
    mask[1::2, -T // 8:] = 0  # padding on every other sequence
    return x, W, x_ref, W_ref, ids, mask


def _target(ids, mask):
    return torch.where(mask.bool(), ids, torch.full_like(ids, -100))


def _materialised_logps(x, W, ids, mask):
    # TRL's path: the logits, selective_log_softmax (gather - logsumexp), masked positions set to 0
    logits = F.linear(x, W).float()
    logps = logits.gather(-1, ids[..., None])[..., 0] - torch.logsumexp(logits, -1)
    return torch.where(mask.bool(), logps, torch.zeros_like(logps))


# ----------------------------------------------------------------------------------------------
# DPO
# ----------------------------------------------------------------------------------------------
def _dpo_fasttx(case, cfg):
    x, W, xr, Wr, ids, mask = _inputs(case, cfg)
    t = _target(ids, mask)

    def step():
        with torch.no_grad():
            ref = ff.linear_log_probs(xr, Wr, t)
        return losses.dpo_loss(ff.linear_log_probs(x, W, t), ref, mask)

    return Work(step, leaves=(x, W))


def _dpo_torch(case, cfg):
    x, W, xr, Wr, ids, mask = _inputs(case, cfg)

    def step():
        with torch.no_grad():
            ref = _materialised_logps(xr, Wr, ids, mask)
        return losses.dpo_loss(_materialised_logps(x, W, ids, mask), ref, mask)

    return Work(step, leaves=(x, W))


def _dpo_liger(case, cfg):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    x, W, xr, Wr, ids, mask = _inputs(case, cfg)
    t = _target(ids, mask)
    loss = LigerFusedLinearDPOLoss(beta=0.1)
    return Work(lambda: loss(W, x, t, ref_input=xr, ref_weight=Wr)[0], leaves=(x, W))


# ----------------------------------------------------------------------------------------------
# GRPO (loss_type "grpo", beta 0.04: the reference's log-probs for the k3 KL; on-policy ratios)
# ----------------------------------------------------------------------------------------------
def _advantages(case, cfg):
    g = torch.Generator().manual_seed(0)
    return torch.randn(case.params["S"], generator=g).to(cfg.device)


def _grpo_fasttx(case, cfg):
    x, W, xr, Wr, ids, mask = _inputs(case, cfg)
    t, adv = _target(ids, mask), _advantages(case, cfg)

    def step():
        with torch.no_grad():
            ref = ff.linear_log_probs(xr, Wr, t)
        return losses.grpo_loss(ff.linear_log_probs(x, W, t), adv, mask, ref_per_token_logps=ref, beta=0.04,
                                loss_type="grpo")

    return Work(step, leaves=(x, W))


def _grpo_torch(case, cfg):
    x, W, xr, Wr, ids, mask = _inputs(case, cfg)
    adv = _advantages(case, cfg)

    def step():
        with torch.no_grad():
            ref = _materialised_logps(xr, Wr, ids, mask)
        return losses.grpo_loss(_materialised_logps(x, W, ids, mask), adv, mask, ref_per_token_logps=ref,
                                beta=0.04, loss_type="grpo")

    return Work(step, leaves=(x, W))


def _grpo_liger(case, cfg):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    x, W, xr, Wr, ids, mask = _inputs(case, cfg)
    adv = _advantages(case, cfg)
    loss = LigerFusedLinearGRPOLoss(beta=0.04, loss_type="grpo")
    return Work(lambda: loss(x, W, ids, mask, adv, ref_input=xr, ref_weight=Wr)[0], leaves=(x, W))


# ----------------------------------------------------------------------------------------------
# Distillation: linear_jsd (beta 0.5) and linear_kl_div, student and teacher of one head size here
# ----------------------------------------------------------------------------------------------
def _distill_fasttx(name):
    def build(case, cfg):
        x, W, x_t, W_t, ids, mask = _inputs(case, cfg)
        t = _target(ids, mask)
        if name == "linear_jsd":
            return Work(lambda: ff.linear_jsd(x, W, x_t, W_t, t), leaves=(x, W))
        return Work(lambda: ff.linear_kl_div(x, W, x_t, W_t, t), leaves=(x, W))

    return build


def _distill_torch(name):
    def build(case, cfg):  # TRL's generalized_jsd_loss on the materialised logits
        x, W, x_t, W_t, ids, mask = _inputs(case, cfg)
        keep = mask.bool().reshape(-1)
        beta = 0.5 if name == "linear_jsd" else 0.0

        def eager():
            s = F.log_softmax(F.linear(x, W).float(), -1).reshape(-1, W.shape[0])
            q = F.log_softmax(F.linear(x_t, W_t).float(), -1).reshape(-1, W.shape[0])
            if beta == 0.0:
                rows = F.kl_div(s, q, reduction="none", log_target=True).sum(-1)
            else:
                m = torch.logsumexp(torch.stack([s + math.log(1 - beta), q + math.log(beta)]), 0)
                rows = (beta * F.kl_div(m, q, reduction="none", log_target=True)
                        + (1 - beta) * F.kl_div(m, s, reduction="none", log_target=True)).sum(-1)
            return rows[keep].sum() / keep.sum()

        return Work(eager, leaves=(x, W))

    return build


def suites(cfg: Config) -> List[Suite]:
    cases = []
    for dt in cfg.dtypes:
        for S, T, H, V in _sizes(cfg):
            N = S * T
            flops = {"fwd": 4.0 * N * H * V, "fwd+bwd": 8.0 * N * H * V}
            cases.append(Case(f"N={N} H={H} V={V}", V, dt, {"S": S, "T": T, "H": H, "V": V}, flops=flops,
                              series=f"N={N}"))
    out = []
    for name, fasttx_fn, torch_fn, liger_fn, liger_mod in (
        ("dpo_step", _dpo_fasttx, _dpo_torch, _dpo_liger, "liger_kernel.chunked_loss"),
        ("grpo_step", _grpo_fasttx, _grpo_torch, _grpo_liger, "liger_kernel.chunked_loss"),
    ):
        out.append(Suite(
            name, "TFLOP/s", cases,
            [Provider("fasttx", fasttx_fn, kind="fasttx"), *torch_and_compile("torch", torch_fn),
             Provider("liger", liger_fn, importable(liger_mod), kind="peer", errors_are_skips=True)],
            modes=("fwd", "fwd+bwd"),
            xlabel="vocabulary V",
            description=f"{name.split('_')[0].upper()} loss from the policy's and the reference's hidden states "
            "(reference under no_grad); torch = TRL's formula on materialised logits; peak_MB (CUDA) is "
            "the memory above the inputs.",
        ))
    for name in ("linear_jsd", "linear_kl_div"):
        out.append(Suite(
            name, "TFLOP/s", cases,  # the flops of two heads' forward (student, teacher) and one backward
            [Provider("fasttx", _distill_fasttx(name), kind="fasttx"),
             *torch_and_compile("torch", _distill_torch(name))],
            modes=("fwd", "fwd+bwd"),
            xlabel="vocabulary V",
            description=f"{name} of the student's and the teacher's hidden states (teacher frozen); torch = "
            "TRL's generalized_jsd_loss formula on materialised logits.",
        ))
    return out
