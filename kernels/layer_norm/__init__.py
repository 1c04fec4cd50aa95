"""LayerNorm and RMSNorm, and the fused `h = residual + dropout(x); y = Norm(h)` sub-layer, in Triton.

The input is viewed as (rows, N), N = prod(normalized_shape); every row is normalized on its own.
One forward kernel and one backward kernel serve every op: the residual add, the dropout, the store
of h, the affine weight/bias, RMSNorm instead of LayerNorm (IS_RMS_NORM: no mean, rstd from
mean(h^2)) and the model families' casting orders are `tl.constexpr` flags, so a plain LayerNorm
compiles none of the other code.

RMSNorm casting orders (the `cast` argument of the rms_norm launchers), xhat = h * rstd in fp32:
    "torch"  y = (xhat * w).to(dtype(h))                    torch.nn.functional.rms_norm
    "llama"  y = xhat.to(dtype(h)) * w   (in promote(h, w))  HF Llama/Mistral/Qwen: CAST_XHAT
    "gemma"  y = (xhat * (1 + w)).to(dtype(h))              HF Gemma: WEIGHT_PLUS_ONE
With a residual, h = x + residual is rounded to its dtype before the statistics (ROUND_H), as the
unfused `h = x + residual; norm(h)` of a 16-bit model rounds it.

Launchers (tensors in, tensors out):
    layer_norm_forward(x, N, weight, bias, eps, residual=None, p=0.0, seed=0, store_h=False,
                   return_mask=False) -> (y, h, mean, rstd[, keep_mask])
    layer_norm_backward(dy, h, N, weight, bias, mean, rstd, dh_out=None, p=0.0, seed=0,
                   store_dh=False, dx_dtype=None) -> (dx, dh, dweight, dbias)
    rms_norm_forward(x, N, weight, eps, residual=None, cast="torch") -> (y, h, rstd)
    rms_norm_backward(dy, h, N, weight, rstd, dh_out=None, cast="torch", store_dh=False,
                      dx_dtype=None) -> (dx, dh, dweight)

A package (kernels/layer_norm/):
    forward.py   _layer_norm_fwd_kernel and its helpers (overflow-safe sums of squares, h, the affine)
    backward.py  _layer_norm_bwd_kernel and its tile helpers (the math in its header)
    launch.py    calc_settings, the launchers below, compile_variants
"""
from .backward import _layer_norm_bwd_kernel  # noqa: F401
from .forward import _layer_norm_fwd_kernel  # noqa: F401
from .launch import (  # noqa: F401
    CASTS,
    CHUNK_M,
    CHUNK_N,
    MAX_BLOCK_N,
    MAX_HIDDEN,
    calc_settings,
    compile_variants,
    layer_norm_backward,
    layer_norm_forward,
    rms_norm_backward,
    rms_norm_forward,
    rms_norm_out_dtype,
)
