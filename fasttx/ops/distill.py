"""linear_jsd / linear_kl_div: distillation divergences between a student head and a teacher head
(each final hidden states + LM head weight, the same vocabulary) without the (N, V) logits of
either model: chunked over rows as linear_cross_entropy is, one (rows, V) tile of each model's
logits at a time; the forward keeps per-row divergences only, the backward recomputes each
chunk's logits of both models and turns them into gradients. Plain torch on every backend (the
work is the four matmuls per chunk; the per-tile divergence is elementwise), fp32 math (fp64 for
fp64 inputs), weight gradients accumulated in fp32 across chunks in a fixed order.

Per row, with s = log_softmax(z_s / T), q = log_softmax(z_t / T), P_S = e^s, P_T = e^q, as TRL's
GKDTrainer.generalized_jsd_loss (trl/experimental/gkd/gkd_trainer.py) defines it:
  beta = 0:  D = KL(P_T || P_S) = sum_v P_T (q - s)                     (forward KL)
  beta = 1:  D = KL(P_S || P_T) = sum_v P_S (s - q)                     (reverse KL)
  else:      m = log((1 - beta) P_S + beta P_T)
             D = beta sum_v P_T (q - m) + (1 - beta) sum_v P_S (s - m)
Gradients with respect to the scaled logits (then / T to the raw ones), per row times its upstream g:
  student:  beta = 0: P_S - P_T;  otherwise P_S (u - sum P_S u), u = s - q (beta = 1) or (1 - beta)(s - m)
  teacher:  beta = 1: P_T - P_S;  otherwise P_T (v - sum P_T v), v = q - s (beta = 0) or beta (q - m)
(d/dP_S of the mixed form is (1 - beta)(s - m): the terms through m cancel). The teacher's
gradients are computed only when a teacher tensor requires grad (the usual teacher runs under
no_grad and costs nothing extra).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fasttx._registry import contract

from . import cross_entropy as ce
from ._common import acc_dtype

REDUCTIONS = ("none", "sum", "mean", "batchmean")


def check(name, xs, ws, bs, xt, wt, bt, target, beta, temperature, ignore_index, reduction) -> None:
    """Shapes, dtypes, devices and options, with torch's exception types, naming the argument."""
    for arg, t in (("student_input", xs), ("student_weight", ws), ("teacher_input", xt), ("teacher_weight", wt)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}(): argument '{arg}' must be Tensor, not {type(t).__name__}")
        if not t.is_floating_point():
            raise RuntimeError(f"{name}: expected a floating point {arg}, got {t.dtype}")
    for who, x, w, b in (("student", xs, ws, bs), ("teacher", xt, wt, bt)):
        if x.dim() < 1 or w.dim() != 2 or x.shape[-1] != w.shape[1]:
            raise RuntimeError(
                f"{name}: expected {who}_input (*, H) and {who}_weight (V, H), got {tuple(x.shape)} and "
                f"{tuple(w.shape)}")
        if b is not None and tuple(b.shape) != (w.shape[0],):
            raise RuntimeError(f"{name}: expected {who}_bias of shape ({w.shape[0]},), got {tuple(b.shape)}")
        if w.dtype != x.dtype or (b is not None and b.dtype != x.dtype):
            raise RuntimeError(f"{name}: {who}_input, {who}_weight and {who}_bias must have the same dtype")
        for arg, t in ((f"{who}_input", x), (f"{who}_weight", w), (f"{who}_bias", b)):
            if t is not None and t.device != xs.device:
                raise RuntimeError(f"{name}: expected {arg} on the student input's device {xs.device}, got {t.device}")
    if ws.shape[0] != wt.shape[0]:
        raise RuntimeError(f"{name}: student and teacher vocabularies differ ({ws.shape[0]} and {wt.shape[0]})")
    if tuple(xs.shape[:-1]) != tuple(xt.shape[:-1]):
        raise RuntimeError(
            f"{name}: student_input and teacher_input must have the same leading shape, got "
            f"{tuple(xs.shape[:-1])} and {tuple(xt.shape[:-1])}")
    if target is not None:
        if not isinstance(target, Tensor) or target.is_floating_point():
            raise RuntimeError(f"{name}: expected target (labels) of an integer dtype or None")
        if tuple(target.shape) != tuple(xs.shape[:-1]):
            raise RuntimeError(
                f"{name}: expected target of shape {tuple(xs.shape[:-1])}, got {tuple(target.shape)}")
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"{name}: beta must be a number in [0, 1], got {beta!r}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
        raise ValueError(f"{name}: temperature must be a number > 0, got {temperature!r}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"{name}(): argument 'ignore_index' must be int, not {type(ignore_index).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _tile(x, w, b, inv_t, acc):
    """(m, V) scaled logits of one row chunk in the accumulation dtype, and their log-softmax."""
    z = F.linear(x, w, b).to(acc).mul_(inv_t)
    return z.log_softmax(-1)


def _rows(s, q, beta):
    """Per-row divergence of log-prob tiles s (student), q (teacher), and the mixture (or None)."""
    if beta == 0.0:
        return (q.exp() * (q - s)).sum(-1), None
    if beta == 1.0:
        return (s.exp() * (s - q)).sum(-1), None
    m = torch.logaddexp(s + math.log1p(-beta), q + math.log(beta))
    return beta * (q.exp() * (q - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1), m


def _softmax_grad(logp, u):
    """P (u - sum P u) for P = exp(logp): the gradient through a log-softmax of sum_v P_v u_v's
    d/dP = u form."""
    p = logp.exp()
    return p * (u - (p * u).sum(-1, keepdim=True))


class _LinearJSD(torch.autograd.Function):
    """Per-row divergence (M,) (0 where `valid` is False) of student head (xs, ws, bs) from teacher
    head (xt, wt, bt), chunked over rows."""

    @staticmethod
    def forward(ctx, xs, ws, bs, xt, wt, bt, valid, beta, temperature):
        M = xs.shape[0]
        V = ws.shape[0]
        acc = acc_dtype(xs.dtype)
        chunk = ce._chunk(M, max(xs.shape[1], xt.shape[1]), V)
        inv_t = 1.0 / temperature
        out = torch.empty(M, dtype=acc, device=xs.device)
        for r in range(0, M, chunk):
            s = _tile(xs[r:r + chunk], ws, bs, inv_t, acc)  # (m, V)
            q = _tile(xt[r:r + chunk], wt, bt, inv_t, acc)
            d, _ = _rows(s, q, beta)
            out[r:r + chunk] = torch.where(valid[r:r + chunk], d, torch.zeros_like(d))
            del s, q
        ctx.save_for_backward(xs, ws, bs, xt, wt, bt, valid)
        ctx.options = (beta, temperature, chunk)
        return out

    @staticmethod
    def backward(ctx, grad):
        xs, ws, bs, xt, wt, bt, valid = ctx.saved_tensors
        beta, temperature, chunk = ctx.options
        need = ctx.needs_input_grad
        student = any(need[:3])
        teacher = any(need[3:6])
        acc = acc_dtype(xs.dtype)
        inv_t = 1.0 / temperature
        M = xs.shape[0]

        def buffers(x, w, b, on):
            if not on:
                return None, None, None
            return (torch.empty_like(x), torch.zeros(w.shape, dtype=acc, device=w.device),
                    torch.zeros(w.shape[0], dtype=acc, device=w.device) if b is not None else None)

        dxs, dws, dbs = buffers(xs, ws, bs, student)
        dxt, dwt, dbt = buffers(xt, wt, bt, teacher)
        for r in range(0, M, chunk):
            rows = slice(r, r + chunk)
            xsc, xtc = xs[rows], xt[rows]
            s = _tile(xsc, ws, bs, inv_t, acc)
            q = _tile(xtc, wt, bt, inv_t, acc)
            _, m = _rows(s, q, beta)
            g = grad if grad.numel() == 1 else grad[rows]
            g = torch.where(valid[rows], g.to(acc).expand(valid[rows].shape), 0.0) * inv_t  # (m,)
            g = g[:, None]
            if student:
                if beta == 0.0:
                    dz = s.exp() - q.exp()
                else:
                    dz = _softmax_grad(s, (s - q) if beta == 1.0 else (1 - beta) * (s - m))
                _accumulate(dz.mul_(g), xsc, ws, b=bs, dx=dxs, dw=dws, db=dbs, rows=rows)
            if teacher:
                if beta == 1.0:
                    dz = q.exp() - s.exp()
                else:
                    dz = _softmax_grad(q, (q - s) if beta == 0.0 else beta * (q - m))
                _accumulate(dz.mul_(g), xtc, wt, b=bt, dx=dxt, dw=dwt, db=dbt, rows=rows)
            del s, q, m
        grads = []
        for on, (dx, dw, db), (w, b) in ((student, (dxs, dws, dbs), (ws, bs)), (teacher, (dxt, dwt, dbt), (wt, bt))):
            if not on:
                grads += [None, None, None]
            else:
                grads += [dx, dw.to(w.dtype), db.to(b.dtype) if db is not None else None]
        return (*grads, None, None, None)


def _accumulate(dz, x, w, b, dx, dw, db, rows):
    """dx[rows] = dz @ w; dw += dz^T x and db += colsum(dz) in the accumulation dtype."""
    dx[rows] = dz.to(w.dtype) @ w  # (m, H): 16-bit operands for a 16-bit head, as linear_cross_entropy
    dw.addmm_(dz.t().to(dw.dtype), x.to(dw.dtype))
    if db is not None:
        db += dz.sum(0, dtype=db.dtype)


def divergence(xs, ws, bs, xt, wt, bt, target, beta, temperature, ignore_index, reduction,
               num_items_in_batch=None) -> Tensor:
    """(arguments already checked) the reduced divergence, TRL's reductions: 'batchmean' = sum over
    the kept tokens / their count (target given; at least 1) or / input.shape[0] (no target, as
    TRL's jsd.size(0)); 'sum'; 'mean' = sum / (kept tokens * V) (TRL's jsd.mean() over its
    (tokens, V) elements); 'none' = per token (input.shape[:-1]; 0 where ignored: the vocabulary
    is summed, TRL's 'none' keeps it). num_items_in_batch: sum / num_items_in_batch."""
    shape = tuple(xs.shape[:-1])
    x_s = xs.reshape(-1, xs.shape[-1])
    x_t = xt.reshape(-1, xt.shape[-1])
    if target is not None:
        valid = (target != ignore_index).reshape(-1)
    else:
        valid = torch.ones(x_s.shape[0], dtype=torch.bool, device=xs.device)
    rows = _LinearJSD.apply(x_s, ws, bs, x_t, wt, bt, valid, float(beta), float(temperature))
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(rows.device)
        return rows.sum() / num_items_in_batch
    if reduction == "none":
        return rows.reshape(shape)
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        kept = valid.sum() if target is not None else valid.numel()
        return rows.sum() / (kept * ws.shape[0])
    denom = valid.sum().clamp_min(1) if target is not None else max(xs.shape[0] if xs.dim() > 1 else 1, 1)
    return rows.sum() / denom


# ----------------------------------------------------------------------------------------------
# Contracts (fasttx._registry.route): one path on every backend (chunked torch ops)
# ----------------------------------------------------------------------------------------------
def _jsd(student_input, student_weight, teacher_input, teacher_weight, target, student_bias, teacher_bias, beta,
         temperature, ignore_index, reduction, num_items_in_batch):
    check("linear_jsd", student_input, student_weight, student_bias, teacher_input, teacher_weight,
          teacher_bias, target, beta, temperature, ignore_index, reduction)
    return divergence(student_input, student_weight, student_bias, teacher_input, teacher_weight,
                      teacher_bias, target, beta, temperature, ignore_index, reduction, num_items_in_batch)


def _kl_div(student_input, student_weight, teacher_input, teacher_weight, target, student_bias, teacher_bias,
            temperature, ignore_index, reduction, num_items_in_batch):
    # exactly linear_jsd with beta = 0 (forward KL), its checks and messages included
    return _jsd(student_input, student_weight, teacher_input, teacher_weight, target, student_bias, teacher_bias,
                0.0, temperature, ignore_index, reduction, num_items_in_batch)


contract("linear_jsd", tensors=lambda *a: None, unsupported=lambda *a: None, triton=None, torch=_jsd)
contract("linear_kl_div", tensors=lambda *a: None, unsupported=lambda *a: None, triton=None, torch=_kl_div)
