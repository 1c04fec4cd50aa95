"""The row launchers (tensors in, tensors out) and compile_variants (see __init__.py)."""
import torch
import triton

from .._common import acc_dtype, as_rows, value_words
from .backward import _cross_entropy_bwd_kernel
from .forward import _cross_entropy_fwd_kernel

MAX_BLOCK_C = 4096  # class-dim chunk of the row kernel


def _block_c(C: int, dtype: torch.dtype = torch.float32):
    """Class-dim chunk and warps for logits of `dtype`: 32 warps for 4096-wide chunks (4 elements per
    thread): with 8 the forward held up to 185 registers (the in-place gradient variant), 8 resident
    warps per SM on sm_90; with 16 ptxas held two variants at 64 and spilled 4 B
    (--regAllocOptLevel=2, which triton 3.9 passes); with 32 none spills on sm_90 / sm_100
    (tools/kernel_report.py). fp64 chunks hold half the columns at the same warps (value_words)."""
    words = value_words(dtype)
    block = min(triton.next_power_of_2(max(C, 1)), MAX_BLOCK_C // words)
    values = block * words
    return block, (32 if values >= 4096 else 8 if values >= 2048 else 4)


def _targets(target: torch.Tensor, C: int):
    """(M,) class indices (int64) or (M, C) probabilities with a contiguous last dim."""
    if target.is_floating_point():
        return as_rows(target), True
    return target.reshape(-1).to(torch.int64), False


def _wsum(weight, C):
    # sum of the class weights, needed only with label smoothing (a host float: one sync)
    return float(weight.double().sum()) if weight is not None else float(C)


def cross_entropy_forward(logits, target, weight=None, ignore_index=-100, label_smoothing=0.0,
                          grad_scale=None, dlogits=None, wsum=None, scale=1.0, ent=None, grad_ent=None):
    """Per-row cross-entropy. logits (M, C); target (M,) int64 or (M, C) float; weight (C,) or
    None. Returns (loss (M,) fp32 unreduced, lse (M,) fp32). With `grad_scale` ((M,) or a
    1-element tensor, the upstream gradient of each row's loss) it also writes d(loss)/d(logits)
    into `dlogits` ((M, C), logits' dtype; may be `logits` itself, overwritten in place).
    `scale`: the rows are logits * scale (1 / temperature; the gradient is then with respect to
    the scaled logits: the caller folds `scale` into grad_scale / grad_ent). `ent` ((M,) fp32,
    class-index targets): also write each row's entropy there (0 on ignored rows), and with
    `grad_scale` add grad_ent ((M,) or 1 element) times its gradient to dlogits."""
    x = as_rows(logits)
    M, C = x.shape
    loss = torch.empty(M, dtype=torch.float32, device=x.device)
    lse = torch.empty(M, dtype=torch.float32, device=x.device)
    if M == 0:
        return loss, lse
    t, prob = _targets(target, C)
    smooth = label_smoothing != 0.0
    if wsum is None:
        wsum = _wsum(weight, C) if smooth and not prob else 0.0
    write = grad_scale is not None
    if write:
        assert dlogits is not None and dlogits.shape == x.shape and dlogits.stride(-1) == 1
        g = grad_scale.reshape(-1).to(torch.float32)
        stride_g = 0 if g.numel() == 1 else g.stride(0)
    else:
        g, stride_g, dlogits = loss, 0, loss
    entropy = ent is not None
    assert not (entropy and prob), "entropy with class-index targets only"
    if entropy and write and grad_ent is not None:
        g2 = grad_ent.reshape(-1).to(torch.float32)
        stride_g2 = 0 if g2.numel() == 1 else g2.stride(0)
    else:
        g2, stride_g2 = torch.zeros(1, dtype=torch.float32, device=x.device), 0
    block_c, num_warps = _block_c(C, x.dtype)
    _cross_entropy_fwd_kernel[(M,)](
        x, x.stride(0), t, t.stride(0) if prob else 1, weight if weight is not None else x,
        loss, lse, g, stride_g, dlogits, dlogits.stride(0) if write else 0,
        ent if entropy else loss, g2, stride_g2,
        C, ignore_index, float(label_smoothing), wsum, float(scale),
        HAS_WEIGHT=weight is not None, PROB_TARGET=prob, SMOOTH=smooth, WRITE_GRAD=write,
        ENTROPY=entropy, ACC_DTYPE=acc_dtype(x.dtype), BLOCK_C=block_c, num_warps=num_warps,
    )
    return loss, lse


def cross_entropy_backward(grad, logits, target, weight, lse, ignore_index=-100, label_smoothing=0.0,
                           wsum=None):
    """d(loss)/d(logits) for cross_entropy_forward's per-row losses: grad (M,) (any stride,
    stride 0 included), logits (M, C), lse (M,) from the forward -> (M, C) in logits' dtype."""
    x = as_rows(logits)
    M, C = x.shape
    dx = torch.empty((M, C), dtype=x.dtype, device=x.device)
    if M == 0 or C == 0:
        return dx.zero_()
    t, prob = _targets(target, C)
    smooth = label_smoothing != 0.0
    if wsum is None:
        wsum = _wsum(weight, C) if smooth and not prob else 0.0
    g = grad.reshape(-1) if grad.numel() == M else grad.reshape(1)
    stride_g = 0 if g.numel() == 1 else g.stride(0)
    block_c, num_warps = _block_c(C, x.dtype)
    _cross_entropy_bwd_kernel[(M,)](
        x, x.stride(0), t, t.stride(0) if prob else 1, weight if weight is not None else x,
        lse, g, stride_g, dx, dx.stride(0), C, ignore_index, float(label_smoothing), wsum,
        HAS_WEIGHT=weight is not None, PROB_TARGET=prob, SMOOTH=smooth,
        ACC_DTYPE=acc_dtype(x.dtype), BLOCK_C=block_c, num_warps=num_warps,
    )
    return dx


def compile_variants(quick: bool):
    """Every variant that selects different code: dtypes, class weights, smoothing, probability
    targets, the forward with and without the in-place gradient, the backward; block sizes from
    short to looped class dims. `quick`: bf16 only, one looped class dim, weights and smoothing
    together (12 kernels instead of 144); plus, per dtype, the log-prob forward with ENTROPY and a
    logit scale, with and without the in-place gradient."""
    dtypes = [torch.bfloat16] if quick else [torch.float16, torch.bfloat16, torch.float32, torch.float64]
    options = [(False, 0.0), (True, 0.1)] if quick else [(False, 0.0), (True, 0.0), (False, 0.1), (True, 0.1)]
    for dt in dtypes:
        for C in ([50257] if quick else [7, 1000, 50257]):
            x = torch.randn(8, C, dtype=dt)
            t = torch.randint(0, C, (8,))
            p = torch.rand(8, C, dtype=dt)
            for has_w, eps in options:
                weight = torch.rand(C) if has_w else None
                for target in (t, p):
                    loss, lse = cross_entropy_forward(x, target, weight, -100, eps)
                    cross_entropy_forward(x, target, weight, -100, eps, torch.ones(1), x.clone())
                    cross_entropy_backward(torch.ones(8), x, target, weight, lse, -100, eps)
        # log-probs and entropy (linear_log_probs): temperature scale, ENTROPY with and without the grad
        ent = torch.empty(8)
        cross_entropy_forward(x, t, None, -100, 0.0, scale=0.7, ent=ent)
        cross_entropy_forward(x, t, None, -100, 0.0, torch.ones(1), x.clone(), scale=0.7, ent=ent,
                              grad_ent=torch.ones(8))
