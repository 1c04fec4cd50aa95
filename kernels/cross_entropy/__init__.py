"""Cross-entropy over rows of logits, forward and backward, and the chunked linear cross-entropy
that never holds the (N, C) logits.

Rows: logits x (M, C) (last dim contiguous, rows at any stride), one row per program, the class
dim walked in BLOCK_C chunks. All math in fp32 (fp64 for fp64 logits), cast at the store.

Per row, with lse = log sum_c exp(x_c), p_c = exp(x_c - lse), class weights w (1 without),
smoothing eps and W = sum_c w_c:
  class index y:  l = (1 - eps) w_y (lse - x_y) + eps / C * (W lse - sum_c w_c x_c)   (0 if ignored)
                  dl/dx_c = (1 - eps) w_y (p_c - [c = y]) + eps / C * (W p_c - w_c)
  probabilities t, t'_c = (1 - eps) t_c + eps / C, A = sum_c w_c t'_c:
                  l = A lse - sum_c w_c t'_c x_c,   dl/dx_c = A p_c - w_c t'_c
Log-probs and entropy (linear_log_probs): the row is read as x * scale (scale = 1 / temperature),
log p_y = -l (no weights, no smoothing), and with ENTROPY also H = -sum_c p_c log p_c = lse - sum_c
p_c x_c, accumulated as r = sum_c e^(x_c - m) (x_c - m) beside s so that H = log s - r / s (never
lse minus a number of the logits' size), with dH/dx_c = -p_c (x_c - lse + H) (scaled by the
entropy's upstream gradient g2 and added to the cross-entropy's d).
The true-class term p_y - 1 is computed as expm1(x_y - lse), never as p_y - 1: when p_y is close
to 1 the subtraction cancels (in a 16-bit dtype it is all rounding error), expm1 keeps every digit.
The gradient is scaled per row by g (the upstream gradient of that row's loss; for 'mean' the
host folds the 1 / sum of weights into it); ignored rows get exactly 0.

lse is an online (max, sum) pass per lane, merged at the end, as in softmax.py: huge logits
never overflow, a NaN logit poisons its row's loss like torch.

Linear cross-entropy (host loop, `linear_cross_entropy_forward/backward`, and the log-probs of
linear_log_probs_forward/backward through the same loop): for each chunk of
rows, logits = x_chunk @ W^T + b by one torch matmul, the row kernel writes d(logits) over that
chunk in place, then dx_chunk = dlogits @ W and dW += dlogits^T @ x_chunk, db += colsum(dlogits)
in fp32 across chunks (cast once at the end), in a fixed order: deterministic, no atomics.
Memory: O(M H + C H) plus one (chunk, C) buffer; the (M, C) logits never exist.

A package (kernels/cross_entropy/):
    forward.py   _cross_entropy_fwd_kernel and the shared gradient pass (_grad_pass, _expm1)
    backward.py  _cross_entropy_bwd_kernel
    launch.py    the row launchers cross_entropy_forward / cross_entropy_backward, compile_variants
    linear.py    the linear cross-entropy / log-probs host loop over row chunks (chunk_rows, MIN_CHUNK)
"""
from .launch import MAX_BLOCK_C, compile_variants, cross_entropy_backward, cross_entropy_forward  # noqa: F401
from .linear import (  # noqa: F401
    MIN_CHUNK,
    chunk_rows,
    linear_cross_entropy_backward,
    linear_cross_entropy_forward,
    linear_log_probs_backward,
    linear_log_probs_forward,
)
