"""cross_entropy and linear_cross_entropy: their contracts (argument checks, `unsupported`, the
torch path and the Triton path, run by fasttx._registry.route), the reduction, and both paths.

Both paths reduce to one differentiable core, per-row losses (M,) fp32 with torch.nn's reduction
applied outside in plain torch (so autograd hands the core a per-row gradient: 1/denominator for
'mean', expanded, never materialised):
  - Triton: custom ops over fasttx.kernels.cross_entropy (imported lazily, so this module and the
    torch path work where triton is not installed)
        fasttx::cross_entropy(logits, target, weight, ignore_index, label_smoothing) -> (loss, lse)
        fasttx::cross_entropy_backward(grad, logits, target, weight, lse, ...) -> dlogits
        fasttx::linear_cross_entropy(x, w, b, target, weight, ...) -> (loss, lse)
        fasttx::linear_cross_entropy_backward(grad, x, w, b, target, weight, ...) -> (dx, dw, db)
  - torch: `_TorchLinearCE`, the same chunked loop in plain torch (cross_entropy with given logits
    is torch's own F.cross_entropy).
Neither path ever holds the (N, C) logits of linear_cross_entropy: the forward keeps per-row
losses only, the backward recomputes each chunk's logits and turns them into their gradient.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fasttx._registry import autocast_inputs, autocast_lower, contract
from fasttx._torch_errors import raise_as_torch
from fasttx.distributed import opt, placements, sharding_rule

from ._common import acc_dtype

_REDUCTIONS = ("none", "mean", "sum")


# ----------------------------------------------------------------------------------------------
# Argument checks (both paths): torch's exception types and messages
# ----------------------------------------------------------------------------------------------
def _meta(t: Optional[Tensor], shape=None) -> Optional[Tensor]:
    if t is None:
        return None
    return torch.empty(t.shape if shape is None else shape, dtype=t.dtype, device="meta")


def _torch_raises(logits_shape, dtype, target, weight, ignore_index, reduction, label_smoothing, device_type):
    """Raise exactly what torch's own F.cross_entropy raises for arguments of these shapes and
    dtypes (fasttx/_torch_errors.py; its meta kernels differ: AssertionError, missing dtype
    rules). Target values are checked by the caller."""
    logits = torch.empty(logits_shape, dtype=dtype, device="meta")
    sizes = (*logits_shape, *target.shape, *(() if weight is None else weight.shape))
    raise_as_torch(lambda m: F.cross_entropy(m.tensor(logits), m.tensor(target), m.tensor(weight),
                                             ignore_index=ignore_index, reduction=reduction,
                                             label_smoothing=label_smoothing),
                   sizes, logits_shape, device_type)


def _check_ce(logits_shape, dtype, device, target, weight, ignore_index, reduction, label_smoothing):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    compiling = torch.compiler.is_compiling()
    if not compiling:  # torch's own checks, exactly
        _torch_raises(logits_shape, dtype, target, weight, ignore_index, reduction, label_smoothing, device.type)
    C = logits_shape[0] if len(logits_shape) == 1 else logits_shape[1]
    if compiling and weight is not None and (weight.dim() != 1 or weight.numel() != C):
        # torch's messages (its meta kernels raise an AssertionError here instead)
        if target.is_floating_point():
            raise RuntimeError(
                f"cross_entropy: weight tensor should be defined either for all {C} classes or no "
                f"classes but got weight tensor of shape: {list(weight.shape)}"
            )
        if len(logits_shape) > 2:
            raise RuntimeError("weight tensor should be defined either for all or no classes")
        raise RuntimeError(
            f"weight tensor should be defined either for all {C} classes or no classes but got "
            f"weight tensor of shape: {list(weight.shape)}"
        )
    if compiling:  # traceable: torch's meta kernels (their types differ from torch's in places)
        logits = torch.empty(logits_shape, dtype=dtype, device="meta")
        F.cross_entropy(logits, _meta(target), _meta(weight), ignore_index=ignore_index,
                        reduction=reduction, label_smoothing=label_smoothing)
    for name, t in (("target", target), ("weight", weight)):
        if t is not None and t.device != device:
            raise RuntimeError(
                f"cross_entropy: expected {name} on the input's device {device}, got {t.device}"
            )
    if not target.is_floating_point() and not compiling and target.numel():
        bad = (target != ignore_index) & ((target < 0) | (target >= C))
        if bool(bad.any()):
            raise IndexError(f"Target {int(target[bad].reshape(-1)[0])} is out of bounds.")


def check(input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """Raise what torch.nn.functional.cross_entropy raises for these arguments: shapes, dtypes
    and options by running torch's own op on tiny CPU stand-ins (`_torch_raises`; under
    torch.compile on meta tensors, no data touched), then the target
    range, which meta tensors cannot see (outside torch.compile: it needs the values)."""
    if not isinstance(input, Tensor) or not isinstance(target, Tensor):
        raise TypeError(
            f"cross_entropy(): argument 'input' and 'target' must be Tensor, not "
            f"{type(input).__name__} and {type(target).__name__}"
        )
    _check_ce(tuple(input.shape), input.dtype, input.device, target, weight, ignore_index, reduction,
              label_smoothing)


def check_linear(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                 label_smoothing) -> int:
    """torch 2.13's linear_cross_entropy checks (its messages), then cross_entropy's on the
    logits' shape. Returns the ignore_index in force (None -> -100)."""
    for name, t in (("input", input), ("linear_weight", linear_weight), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"linear_cross_entropy(): argument '{name}' must be Tensor, not {type(t).__name__}")
    if input.dim() < 1 or input.dim() > 2:
        raise RuntimeError(f"expected input with dimensionality 1 or 2, got {input.dim()}")
    if linear_weight.dim() < 2:
        raise RuntimeError(
            f"expected linear_weight with dimensionality at least 2, got {linear_weight.dim()}"
        )
    in_features = input.shape[-1]
    if in_features != linear_weight.shape[-1]:
        raise RuntimeError(
            "expected equal input and linear_weight last dimensions (in_features), "
            f"got {input.shape[-1]} and {linear_weight.shape[-1]}, respectively"
        )
    C, out_features = linear_weight.shape[0], tuple(linear_weight.shape[1:-1])
    if linear_bias is not None and tuple(linear_bias.shape) != (C, *out_features):
        raise RuntimeError(
            f"expected linear_bias shape {(C, *out_features)}, got {tuple(linear_bias.shape)}"
        )
    if out_features and input.dim() == 1:
        raise RuntimeError(
            f"K-dimensional loss defined by linear_weight shape {tuple(linear_weight.shape)} requires"
            f" batched input, (N, {in_features}), got unbatched input with shape {tuple(input.shape)}"
        )
    if input.dtype != linear_weight.dtype or (linear_bias is not None and linear_bias.dtype != input.dtype):
        raise RuntimeError(
            "linear_cross_entropy: input, linear_weight and linear_bias must have the same dtype, got "
            f"{input.dtype}, {linear_weight.dtype} and "
            f"{None if linear_bias is None else linear_bias.dtype}"
        )
    for name, t in (("linear_weight", linear_weight), ("linear_bias", linear_bias)):
        if t is not None and t.device != input.device:
            raise RuntimeError(
                f"linear_cross_entropy: expected {name} on the input's device {input.device}, got {t.device}"
            )
    logits_shape = (*input.shape[:-1], C, *out_features)
    if tuple(target.shape) == logits_shape and ignore_index is not None:
        raise RuntimeError("ignore_index cannot be specified when target contains probabilities")
    ignore_index = -100 if ignore_index is None else ignore_index
    _check_ce(logits_shape, input.dtype, input.device, target, weight, ignore_index, reduction,
              label_smoothing)
    return ignore_index


def unsupported(input, target, weight=None, *rest) -> Optional[str]:
    """Why the Triton path cannot take this call (None when it can)."""
    if not input.is_floating_point():
        return f"logits of dtype {input.dtype}"
    if target.is_floating_point() and target.requires_grad:
        return "target probabilities that require grad"
    if weight is not None and weight.dtype != input.dtype and weight.dtype != torch.float32:
        return f"class weights of dtype {weight.dtype} for {input.dtype} logits"
    return None


# ----------------------------------------------------------------------------------------------
# Layout and reduction (both paths)
# ----------------------------------------------------------------------------------------------
def _class_last(input: Tensor, target: Tensor):
    """(C,) / (N, C) / (N, C, d1, ...) logits -> (M, C) rows; targets -> (M,) or (M, C).
    Returns (rows, target_rows, per-row loss shape)."""
    if input.dim() == 1:
        return input.unsqueeze(0), target.reshape(1, -1) if target.is_floating_point() else target.reshape(1), ()
    C = input.shape[1]
    x = input.movedim(1, -1) if input.dim() > 2 else input  # (N, d1, ..., C)
    shape = tuple(x.shape[:-1])
    t = target.movedim(1, -1).reshape(-1, C) if target.is_floating_point() else target.reshape(-1)
    return x.reshape(-1, C), t, shape


def reduce(loss: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
           reduction: str, shape, dtype: torch.dtype) -> Tensor:
    """torch's reduction of per-row losses (M,) fp32: 'none' -> `shape`, 'sum', or 'mean' (class
    indices: over sum_n w_{y_n} of the rows not ignored; NaN when none is; probabilities: over
    the row count). The result in the logits' dtype."""
    if reduction == "none":
        return loss.reshape(shape).to(dtype)
    total = loss.sum()
    if reduction == "mean":
        if target.is_floating_point():
            total = total / loss.numel()
        else:
            valid = target != ignore_index
            if weight is None:
                denom = valid.sum(dtype=torch.float32)
            else:
                w_y = weight.float()[torch.where(valid, target, torch.zeros_like(target))]
                denom = (w_y * valid).sum()
            total = total / denom
    return total.to(dtype)


# ----------------------------------------------------------------------------------------------
# Triton path: custom ops
# ----------------------------------------------------------------------------------------------
def _kernels():
    from fasttx.kernels import cross_entropy as K  # lazy: only the Triton path needs triton

    return K


def _f32(weight: Optional[Tensor]) -> Optional[Tensor]:
    return weight.float().contiguous() if weight is not None else None


@torch.library.custom_op("fasttx::cross_entropy", mutates_args=())
def _ce(logits: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
        label_smoothing: float) -> Tuple[Tensor, Tensor]:
    return _kernels().cross_entropy_forward(logits, target, _f32(weight), ignore_index, label_smoothing)


@_ce.register_fake
def _(logits, target, weight, ignore_index, label_smoothing):
    M = logits.shape[0]
    return logits.new_empty(M, dtype=torch.float32), logits.new_empty(M, dtype=torch.float32)


@torch.library.custom_op("fasttx::cross_entropy_backward", mutates_args=())
def _ce_backward(grad: Tensor, logits: Tensor, target: Tensor, weight: Optional[Tensor], lse: Tensor,
                 ignore_index: int, label_smoothing: float) -> Tensor:
    return _kernels().cross_entropy_backward(grad, logits, target, _f32(weight), lse, ignore_index,
                                             label_smoothing)


@_ce_backward.register_fake
def _(grad, logits, target, weight, lse, ignore_index, label_smoothing):
    return logits.new_empty(logits.shape)


def _ce_setup(ctx, inputs, output):
    logits, target, weight, ignore_index, label_smoothing = inputs
    ctx.save_for_backward(logits, target, weight, output[1])
    ctx.options = (ignore_index, label_smoothing)


def _ce_bwd(ctx, grad_loss, grad_lse):
    logits, target, weight, lse = ctx.saved_tensors
    dlogits = _ce_backward(grad_loss, logits, target, weight, lse, *ctx.options)
    return dlogits, None, None, None, None


_ce.register_autograd(_ce_bwd, setup_context=_ce_setup)


@torch.library.custom_op("fasttx::linear_cross_entropy", mutates_args=())
def _lce(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor, weight: Optional[Tensor],
         ignore_index: int, label_smoothing: float) -> Tuple[Tensor, Tensor]:
    return _kernels().linear_cross_entropy_forward(x, w, b, target, _f32(weight), ignore_index,
                                                   label_smoothing)


@_lce.register_fake
def _(x, w, b, target, weight, ignore_index, label_smoothing):
    M = x.shape[0]
    return x.new_empty(M, dtype=torch.float32), x.new_empty(M, dtype=torch.float32)


@torch.library.custom_op("fasttx::linear_cross_entropy_backward", mutates_args=())
def _lce_backward(grad: Tensor, x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor,
                  weight: Optional[Tensor], ignore_index: int,
                  label_smoothing: float) -> Tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = _kernels().linear_cross_entropy_backward(grad, x, w, b, target, _f32(weight),
                                                          ignore_index, label_smoothing)
    return dx, dw, db if db is not None else x.new_empty(0)  # custom ops cannot return None


@_lce_backward.register_fake
def _(grad, x, w, b, target, weight, ignore_index, label_smoothing):
    return x.new_empty(x.shape), w.new_empty(w.shape), (b.new_empty(b.shape) if b is not None else x.new_empty(0))


def _lce_setup(ctx, inputs, output):
    x, w, b, target, weight, ignore_index, label_smoothing = inputs
    ctx.save_for_backward(x, w, b, target, weight)
    ctx.options = (ignore_index, label_smoothing)


def _lce_bwd(ctx, grad_loss, grad_lse):
    x, w, b, target, weight = ctx.saved_tensors
    dx, dw, db = _lce_backward(grad_loss, x, w, b, target, weight, *ctx.options)
    return dx, dw, (db if b is not None else None), None, None, None, None


_lce.register_autograd(_lce_bwd, setup_context=_lce_setup)


# ----------------------------------------------------------------------------------------------
# torch path: the same chunked loop in plain torch
# ----------------------------------------------------------------------------------------------
def _torch_rows(z: Tensor, t: Tensor, weight, ignore_index, eps, wsum, g=None, scale=1.0, ent=None,
                g_ent=None):
    """Per-row losses of a scratch chunk of logits z (m, C) (any dtype; math in fp32, fp64 for
    fp64), and with g ((m,) or (1,)) their gradient, written over z (otherwise z is left
    clobbered). The formulas of kernels/cross_entropy/, in place: e = exp(z - max) is computed
    once, lse = max + log(sum e) and p = e / sum e come from it; one fp32 (m, C) buffer at most
    (none for fp32 logits). linear_log_probs: the rows are z * scale; `ent` ((m,), class indices)
    receives each row's entropy (0 on ignored rows), and with g the entropy's gradient times
    g_ent ((m,) or (1,); None: 0) is added (two more (m, C) buffers on that path only)."""
    acc = acc_dtype(z.dtype)
    zf = z.to(acc)  # z itself for fp32 logits
    if scale != 1.0:
        zf = zf.mul_(scale)
    C = z.shape[1]
    w = weight.to(acc) if weight is not None else None
    prob = t.is_floating_point()
    if prob:
        wt = t.to(acc) * (1 - eps) + eps / C  # (m, C): w_c t'_c
        if w is not None:
            wt.mul_(w)
        A = wt.sum(1)
        sum_wx = (wt * zf).sum(1)
    else:
        valid = t != ignore_index
        tc = torch.where(valid, t, torch.zeros_like(t))
        x_y = zf.gather(1, tc[:, None])[:, 0]
        w_y = (w[tc] if w is not None else torch.ones_like(x_y)) * valid
        if eps:
            sum_wx = zf @ w if w is not None else zf.sum(1)
    mx = zf.amax(dim=1)  # (m,)
    if ent is not None:
        zm = zf.sub_(mx[:, None])  # z - max
        e = zm.exp()
        se = e.sum(1)
        # H = log s - sum e (z - max) / s: relative to the max, no cancellation of large logits.
        # e (z - max) is NaN only as 0 * -inf (an -inf logit: its term is 0) or in a row holding a
        # NaN logit, whose s is NaN already: nan_to_num_ in place, one (m, C) buffer
        h = se.log() - (e * zm).nan_to_num_(nan=0.0).sum(1) / se
        ent.copy_(torch.where(valid, h, torch.zeros_like(h)))
        if g is not None:
            # dH/dz_c = -p_c (z_c - lse + H) = -p_c (zm_c - log s + H), p_c = e_c / s
            gh = torch.where(valid, (g_ent.to(acc).reshape(-1) if g_ent is not None else 0.0) / se, 0.0)
            d_ent = (e * zm.sub_((se.log() - h)[:, None])).nan_to_num_(nan=0.0).mul_(-gh[:, None])
    else:
        e = zf.sub_(mx[:, None]).exp_()  # exp(z - max), over zf
        se = e.sum(1)
    lse = mx + se.log()
    if prob:
        loss = A * lse - sum_wx
        if g is not None:  # d = g (A p - w t')
            d = e.mul_((A / se)[:, None]).sub_(wt).mul_(g.to(acc).reshape(-1, 1))
    else:
        loss = (1 - eps) * w_y * ((mx - x_y) + se.log())  # not lse - x_y: no rounding at the logits' size
        if eps:
            loss = loss + torch.where(valid, eps / C * (wsum * lse - sum_wx), torch.zeros_like(lse))
        if g is not None:
            # d = g [(1 - eps) w_y (p - [c = y]) + eps / C (W p - w)]; ignored rows: g -> 0
            scale = torch.where(valid, g.to(acc).reshape(-1).expand_as(lse), torch.zeros_like(lse))
            d = e.mul_((((1 - eps) * w_y + eps / C * wsum) * scale / se)[:, None])
            if eps:
                if w is not None:
                    d.addr_(scale, w, alpha=-eps / C)
                else:
                    d.sub_((eps / C * scale)[:, None])
            # the true class: (1 - eps) w_y (p_y - 1), p_y - 1 = expm1(x_y - lse): no cancellation
            d_y = (1 - eps) * w_y * torch.expm1(x_y - lse)
            if eps:
                d_y = d_y + eps / C * (wsum * torch.exp(x_y - lse) - w_y)
            d.scatter_(1, tc[:, None], (d_y * scale)[:, None])
            if ent is not None:
                d.add_(d_ent)
    if g is not None and d is not z:
        z.copy_(d)
    return loss


# Elements of the smallest (rows, C) chunk of the torch path: on CPU, chunks under ~8M elements
# run several times slower (measured at N=2048, H=64, C=65536: 2M-element chunks 16 s
# forward + backward, 8M 9 s), and 32 MiB of fp32 scratch is still far below any logits worth
# chunking.
_MIN_CHUNK = 1 << 23


def _chunk(M, H, C):
    """Rows per chunk: the (chunk, C) logits about the (M, H) input's size (torch's
    "aspect_ratio" rule), at least _MIN_CHUNK elements, at most M rows."""
    rows = math.ceil(M / max(1, math.ceil(C / max(H, 1))))
    rows = max(rows, math.ceil(_MIN_CHUNK / max(C, 1)))
    return max(1, min(M, 1 << max(0, math.ceil(math.log2(rows)))))


def _torch_loop_forward(x, w, b, target, weight, ignore_index, eps, wsum, chunk, scale=1.0, ent=None):
    """Per-row losses (M,) (fp64 for fp64 inputs, else fp32), chunk by chunk: one (chunk, C)
    logits buffer at a time. `scale` and `ent` as in _torch_rows."""
    M = x.shape[0]
    loss = torch.empty(M, dtype=acc_dtype(x.dtype), device=x.device)
    for s in range(0, M, chunk):
        loss[s:s + chunk] = _torch_rows(F.linear(x[s:s + chunk], w, b), target[s:s + chunk], weight,
                                        ignore_index, eps, wsum, scale=scale,
                                        ent=ent[s:s + chunk] if ent is not None else None)
    return loss


def _torch_loop_backward(grad, x, w, b, target, weight, ignore_index, eps, wsum, chunk, scale=1.0,
                         entropy=False, grad_ent=None):
    """(dx, dw, db) of sum_n grad_n loss_n (+ grad_ent_n ent_n): each chunk's logits recomputed and
    overwritten by their gradient, dw and db accumulated in fp32 (fp64) across chunks, cast once."""
    M, H = x.shape
    acc = acc_dtype(w.dtype)
    dx = torch.empty_like(x)
    dw = torch.zeros(w.shape, dtype=acc, device=w.device)  # fp32 across chunks, cast once
    db = torch.zeros(w.shape[0], dtype=acc, device=w.device) if b is not None else None
    ent = torch.empty(M, dtype=acc, device=x.device) if entropy else None
    for s in range(0, M, chunk):
        xc = x[s:s + chunk]
        g = grad if grad.numel() == 1 else grad[s:s + chunk]
        g2 = None
        if grad_ent is not None:
            g2 = grad_ent if grad_ent.numel() == 1 else grad_ent[s:s + chunk]
        z = F.linear(xc, w, b)  # (m, C), overwritten by its gradient
        _torch_rows(z, target[s:s + chunk], weight, ignore_index, eps, wsum, g, scale=scale,
                    ent=ent[s:s + chunk] if ent is not None else None, g_ent=g2)
        dx[s:s + chunk] = z @ w
        dw.addmm_(z.t().to(acc), xc.to(acc))
        if db is not None:
            db += z.sum(0, dtype=acc)
        del z
    return dx, dw.to(w.dtype), (db.to(b.dtype) if db is not None else None)


class _TorchLinearCE(torch.autograd.Function):
    """Per-row losses of cross_entropy(linear(x, w, b), target), chunked over rows in plain torch:
    the forward keeps the losses only, the backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, x, w, b, target, weight, ignore_index, eps):
        M, H = x.shape
        C = w.shape[0]
        acc = acc_dtype(x.dtype)
        wsum = weight.sum(dtype=acc) if weight is not None else float(C)  # a tensor: no host sync
        chunk = _chunk(M, H, C)
        loss = _torch_loop_forward(x, w, b, target, weight, ignore_index, eps, wsum, chunk)
        ctx.save_for_backward(x, w, b, target, weight)
        ctx.options = (ignore_index, eps, wsum, chunk)
        return loss

    @staticmethod
    def backward(ctx, grad):
        x, w, b, target, weight = ctx.saved_tensors
        dx, dw, db = _torch_loop_backward(grad, x, w, b, target, weight, *ctx.options)
        return dx, dw, db, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Public-shaped functions
# ----------------------------------------------------------------------------------------------
def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """Triton path of torch.nn.functional.cross_entropy (arguments already checked)."""
    if target.dtype == torch.uint8:  # torch takes Byte class indices too; the kernels read int64
        target = target.long()
    x, t, shape = _class_last(input, target)
    loss, _ = _ce(x, t, weight, ignore_index, float(label_smoothing))
    return reduce(loss, t, weight, ignore_index, reduction, shape, input.dtype)


def linear_cross_entropy(input, linear_weight, target, linear_bias=None, weight=None, reduction="mean",
                         ignore_index=-100, label_smoothing=0.0, use_triton=True, out_dtype=None):
    """cross_entropy(linear(input, linear_weight, linear_bias), target) without the logits, on the
    Triton path (use_triton) or in plain torch (arguments already checked; ignore_index an int).
    The loss in out_dtype (default input's), reduced from fp32 per-row losses before any rounding.
    input (H,) or (N, H); linear_weight (C, *out_features, H); target (N, *out_features) class
    indices or (N, C, *out_features) probabilities. With out_features, each position p has its own
    (C, H) matrix linear_weight[:, p]: one chunked pass per position."""
    if target.dtype == torch.uint8:  # torch takes Byte class indices too; the kernels read int64
        target = target.long()
    C, H = linear_weight.shape[0], linear_weight.shape[-1]
    x = input.reshape(-1, H)  # (N, H)
    N = x.shape[0]
    out = tuple(linear_weight.shape[1:-1])
    P = math.prod(out)
    w3 = linear_weight.reshape(C, P, H)
    b2 = linear_bias.reshape(C, P) if linear_bias is not None else None
    prob = target.is_floating_point()
    t = target.reshape(N, C, P) if prob else target.reshape(N, P)
    eps = float(label_smoothing)
    losses = []
    for p in range(P):
        w, b = w3[:, p], (b2[:, p] if b2 is not None else None)  # (C, H), (C,)
        tp = t[:, :, p] if prob else t[:, p]
        if use_triton:
            bp = b if P == 1 or b is None else b.contiguous()
            loss, _ = _lce(x, w if P == 1 else w.contiguous(), bp, tp.contiguous(), weight, ignore_index, eps)
        else:
            loss = _TorchLinearCE.apply(x, w, b, tp, weight, ignore_index, eps)
        losses.append(loss)
    loss = losses[0] if P == 1 else torch.stack(losses, dim=1).reshape(-1)  # (N * P,) in (n, p) order
    t_rows = tp if P == 1 else (t.movedim(1, -1).reshape(-1, C) if prob else t.reshape(-1))
    shape = (*input.shape[:-1], *out)
    return reduce(loss, t_rows, weight, ignore_index, reduction, shape, out_dtype or input.dtype)


# ----------------------------------------------------------------------------------------------
# Contracts (fasttx._registry.route)
# ----------------------------------------------------------------------------------------------
def _ce_prepare(input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing):
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    return input, target, weight, None, ignore_index, None, reduction, label_smoothing


def _ce_triton(input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing):
    check(input, target, weight, ignore_index, reduction, label_smoothing)
    input, weight = autocast_inputs("cross_entropy", input, weight)
    if target.is_floating_point():
        (target,) = autocast_inputs("cross_entropy", target)
    return cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing)


contract("cross_entropy", prepare=_ce_prepare, tensors=lambda input, target, weight, *rest: (input, target, weight),
         unsupported=unsupported, triton=_ce_triton, torch=F.cross_entropy)


def _lce_prepare(input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing,
                 options):
    ignore_index = check_linear(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                                label_smoothing)
    return input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing, options


def _lce_path(use_triton: bool):
    def path(input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing, options):
        # as torch's composite under autocast: the linear in the autocast dtype, the loss in fp32
        # (cross_entropy is on torch's fp32 autocast list on CPU and CUDA alike), never rounded
        # to the autocast dtype on the way
        fp32 = torch.is_autocast_enabled(input.device.type)
        input, linear_weight, linear_bias = autocast_lower(input.device.type, input, linear_weight, linear_bias)
        return linear_cross_entropy(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                                    label_smoothing, use_triton=use_triton, out_dtype=torch.float32 if fp32 else None)

    return path


contract("linear_cross_entropy", prepare=_lce_prepare,
         tensors=lambda input, linear_weight, target, linear_bias, weight, *rest: (
             input, linear_weight, target, linear_bias, weight),
         unsupported=lambda input, linear_weight, target, linear_bias, weight, *rest: unsupported(
             input, target, weight),
         triton=_lce_path(True), torch=_lce_path(False))


# ----------------------------------------------------------------------------------------------
# DTensor sharding rules of the custom ops above (fasttx/distributed.py registers them). Each takes
# the op's arguments (tensors as DTensor's specs: .ndim, .shape, .placements; None when absent) and
# returns [(output placements, input placements), ...], one per output and per schema argument.
# ----------------------------------------------------------------------------------------------
@sharding_rule(_ce)
def _cross_entropy_rule(logits, target, weight, ignore_index, label_smoothing):
    # logits (M, C) row-wise: rows (the batch) sharded with their targets; the class weight
    # replicated. -> (per-row loss (M,), lse (M,)); the reduction runs outside the op on DTensors.
    R, S, _ = placements()
    return [([R, R], [R, R, opt(weight, R), None, None]),
            ([S(0), S(0)], [S(0), S(0), opt(weight, R), None, None])]


@sharding_rule(_ce_backward)
def _cross_entropy_backward_rule(grad, logits, target, weight, lse, ignore_index, label_smoothing):
    R, S, _ = placements()
    return [([R], [R, R, R, opt(weight, R), R, None, None]),
            ([S(0)], [S(0), S(0), S(0), opt(weight, R), S(0), None, None])]


@sharding_rule(_lce)
def _linear_cross_entropy_rule(x, w, b, target, weight, ignore_index, label_smoothing):
    # x (M, H) rows sharded (the batch), the LM head w (C, H) and bias replicated -> (loss, lse) (M,)
    R, S, _ = placements()
    return [([R, R], [R, R, opt(b, R), R, opt(weight, R), None, None]),
            ([S(0), S(0)], [S(0), R, opt(b, R), S(0), opt(weight, R), None, None])]


@sharding_rule(_lce_backward)
def _linear_cross_entropy_backward_rule(grad, x, w, b, target, weight, ignore_index, label_smoothing):
    # dx follows the rows; dw and db sum over rows: a partial sum on each rank (reduced by DTensor)
    R, S, P = placements()
    db = P if b is not None else R  # an empty stand-in without a bias
    return [([R, R, R], [R, R, R, opt(b, R), R, opt(weight, R), None, None]),
            ([S(0), P, db], [S(0), S(0), R, opt(b, R), S(0), opt(weight, R), None, None])]
