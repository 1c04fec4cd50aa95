"""Fused attention (FlashAttention-style): forward, flash-decoding forward, backward; a package:
    config.py    autotune tables, pruning, key; decode thresholds; interpreter overrides
    tiles.py     shared tile helpers: grid place, sequence/page lookup, program prologue, scores, key range
    forward.py   _attn_fwd, _attn_decode_combine (+ the dropout-mask test kernel)
    backward.py  _attn_bwd_preprocess, _attn_bwd_dkdv, _attn_bwd_dq (the math in its header)
    launch.py    AttnOptions, launch arguments, attention_forward / attention_backward, compile_variants

Layout the launchers expect (the op wrapper in fasttx/ops/attention.py normalises to it):
    q (B, H, L, E), k (B, Hkv, S, E) and v (B, Hkv, S, Ev) (Ev may differ from E: MLA; its own
    power-of-two block BLOCK_DV) with H % Hkv == 0 (GQA/MQA: query head h reads kv head
    h // (H // Hkv), nothing is copied), any strides as long as the last dim is contiguous
    (stride 0 for broadcast batch/head dims is fine); mask None or (B, H, L, S), bool (True = attend)
    or float (added to the scores), any strides (an expand()ed mask keeps its stride-0 dims and is
    read tile by tile through them, never materialised).

Semantics are torch.nn.functional.scaled_dot_product_attention's:
    P = softmax(scale * Q K^T + bias),  O = dropout(P) V
with attention sinks (SINK, gpt-oss) a per-head logit s_h joins each row's softmax denominator
only: P_ij = exp(S_ij) / (sum_j exp(S_ij) + exp(s_h)) (no value row; its gradient in backward.py).
bias: -inf above the diagonal when causal (top-left aligned: query i sees keys j <= i, also when
L != S), -inf where a bool mask is False, the float mask's value otherwise. A row with every score
-inf gives O = 0, lse = -inf and zero gradients (never NaN); a NaN score in an unmasked position
gives a NaN row. All three kernels (forward, dK/dV, dQ) compute a tile's scores through one helper,
`_scores`, so the mask and causal rules exist once.

Numerics: scores, softmax statistics and accumulators in fp32; the output is cast at the store.
tl.dot precision: fp16/bf16 operands on GPU (fp32 accumulate); fp32 inputs use
input_precision="tf32x3" (three TF32 tensor-core products, near fp32's accuracy), as torch's own
fp32 SDPA does on sm_80+ (config._dot_precision says why not "ieee"). For 16-bit
inputs the forward can also write the fp32 output (`return_fp32_out`): the backward's
delta = rowsum(dO * O) then comes from it, not from the rounded output (see the backward's notes).

Dropout: Philox keep-mask kernels._math.dropout_keep(seed, 0, idx, p) with idx the flattened
int64 index b*H*L*S + h*L*S + i*S + j of the (B, H, L, S) probability matrix; the backward
regenerates it from the same seed; it is never stored. `dropout_mask` materialises it for tests.
"""
from .config import (_BWD_GPU, _FWD_GPU, _SPLIT_ALIGN, AUTOTUNE, FP32_HEAD_DIMS, _configs, _prune,  # noqa: F401
                     _prune_bwd, gpu_limit)
from .forward import _attn_decode_combine  # noqa: F401
from .launch import (  # noqa: F401
    MAX_HEAD_DIM,
    AttnOptions,
    Seqlens,
    attention_backward,
    attention_forward,
    compile_variants,
    dropout_mask,
)
