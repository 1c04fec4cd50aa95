"""Fused attention (FlashAttention-style): forward, flash-decoding forward, backward.

Layout the launchers expect (the op wrapper in fasttx/ops/attention.py normalises to it):
    q (B, H, L, E), k and v (B, Hkv, S, E) with H % Hkv == 0 (GQA/MQA: query head h reads kv head
    h // (H // Hkv), nothing is copied), any strides as long as the last dim is contiguous
    (stride 0 for broadcast batch/head dims is fine); mask None or (B, H, L, S), bool (True = attend)
    or float (added to the scores), any strides (an expand()ed mask keeps its stride-0 dims and is
    read tile by tile through them, never materialised).

Semantics are torch.nn.functional.scaled_dot_product_attention's:
    P = softmax(scale * Q K^T + bias),  O = dropout(P) V
bias: -inf above the diagonal when causal (top-left aligned: query i sees keys j <= i, also when
L != S), -inf where a bool mask is False, the float mask's value otherwise. A row with every score
-inf gives O = 0, lse = -inf and zero gradients (never NaN); a NaN score in an unmasked position
gives a NaN row. All three kernels (forward, dK/dV, dQ) compute a tile's scores through one helper,
`_scores`, so the mask and causal rules exist once.

Numerics: scores, softmax statistics and accumulators in fp32; the output is cast at the store.
tl.dot precision: fp16/bf16 operands on GPU (fp32 accumulate); fp32 inputs use
input_precision="ieee" (exact fp32, no TF32), matching torch's default for fp32 SDPA. For 16-bit
inputs the forward can also write the fp32 output (`return_fp32_out`): the backward's
delta = rowsum(dO * O) then comes from it, not from the rounded output (see the backward's notes).

Dropout: Philox keep-mask kernels._math.dropout_keep(seed, 0, idx, p) with idx the flattened
int64 index b*H*L*S + h*L*S + i*S + j of the (B, H, L, S) probability matrix; the backward
regenerates it from the same seed; it is never stored. `dropout_mask` materialises it for tests.
"""
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._common import INTERPRETING, num_sms, seed_tensor
from ._dtypes import KERNEL_FLOATS
from ._math import dropout_keep, tanh

# ------------------------------------------------------------------------------------------------
# Configuration. (BLOCK_M, BLOCK_N, num_warps, num_stages); autotuned per (head-dim block, causal,
# mask, dropout, split, L bucket, S bucket) and per input dtype (the autotuner adds every tensor
# argument's dtype to the key). The first config of a table that survives pruning is the fixed
# choice when autotuning is off. Every BLOCK_N divides _SPLIT_ALIGN, so a flash-decoding split of
# a multiple of _SPLIT_ALIGN keys is a whole number of key blocks whatever config wins.
# ------------------------------------------------------------------------------------------------
_FWD_GPU = [
    (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4),
    (64, 64, 4, 3), (64, 128, 4, 3), (64, 32, 4, 4), (64, 64, 4, 2),
    (16, 64, 4, 3), (16, 128, 4, 3), (16, 32, 4, 4), (16, 64, 4, 2),
]
_BWD_GPU = [  # dK/dV kernel: BLOCK_N key rows resident, BLOCK_M query rows streamed (dQ: swapped)
    (64, 64, 4, 3), (64, 128, 8, 2), (32, 128, 4, 2), (32, 64, 4, 3),
    (64, 64, 8, 2), (32, 32, 4, 3), (16, 64, 4, 2), (16, 32, 4, 2),
]
_SPLIT_ALIGN_GPU = 128

# FASTTX_AUTOTUNE=0 (read once, at import): one fixed config per shape class (the first the pruning
# keeps) instead of benchmarking every config; bounds compile time, e.g. for `make gpu-check`.
AUTOTUNE = os.environ.get("FASTTX_AUTOTUNE", "1").strip() not in ("0", "false", "False", "")

# Interpreter-only overrides, all of them (INTERPRETING: TRITON_INTERPRET=1, read once at import):
#   one config (autotune with several fails there; 32 keeps several blocks per test shape, so the
#   loops and diagonals are exercised), a split alignment to match, and 16-bit tl.dot operands
#   upcast to fp32 (the interpreter's bf16 dot returns garbage; its fp32 dot is exact).
if INTERPRETING:
    _FWD_TABLE = _BWD_TABLE = [(32, 32, 4, 1)]
    _SPLIT_ALIGN = 32
else:
    _FWD_TABLE, _BWD_TABLE = _FWD_GPU, _BWD_GPU
    _SPLIT_ALIGN = _SPLIT_ALIGN_GPU


def _upcast_dots(dtype) -> bool:
    return INTERPRETING and dtype != torch.float32


# Flash-decoding (split the keys across programs, combine partials) is used when the queries are
# few and the keys many: L <= _DECODE_MAX_L and S >= _DECODE_MIN_S, without dropout (inference).
_DECODE_MAX_L = 16
_DECODE_MIN_S = 512


def _configs(table):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in table]


def _fixed(kept):
    return kept if AUTOTUNE else kept[:1]


def _prune(configs, named_args, **kwargs):
    """Drop configs that cannot fit or waste work: query blocks of 16 only for short L (decode-like)
    and not otherwise; smaller tiles and fewer stages as the head dim (and fp32 operands) grow
    (shared memory ~ stages * (BLOCK_M + 2 BLOCK_N) * BLOCK_D * bytes)."""
    if len(configs) == 1:
        return configs
    args = {**named_args, **kwargs}
    d, short_l = args["BLOCK_D"], args["L_BUCKET"] <= 16
    wide = args["Q"].element_size() * d  # bytes per row of a tile
    mask_bytes = _mask_bytes(args)
    kept = []
    for c in configs:
        bm, bn, st = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages
        if (bm == 16) != short_l:
            continue
        if st * ((bm + 2 * bn) * wide + bm * bn * mask_bytes) > 200 * 1024:  # H100: 227 KiB/block
            continue
        if wide >= 512 and bm * bn > 64 * 64:  # d=256 fp16 or d>=128 fp32: register pressure
            continue
        kept.append(c)
    # Nothing fits (e.g. fp32 with d=256): small tiles without pipelining always do.
    return _fixed(kept) or [triton.Config({"BLOCK_M": 16 if short_l else 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]


def _mask_bytes(args) -> int:
    """Bytes per element of the mask tile the kernel streams beside K and V (0 without a mask).
    It is pipelined like them: a (BLOCK_M, BLOCK_N) fp32 mask tile can outweigh the K/V tiles at
    small head dims (fp32, d=16, 128x128, 3 stages overflowed sm_90's shared memory)."""
    return args["Mask"].element_size() if args.get("HAS_MASK") else 0


def _prune_bwd(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    if len(configs) == 1:
        return configs
    wide = args["Q"].element_size() * args["BLOCK_D"]
    mask_bytes = _mask_bytes(args)
    kept = [c for c in configs
            if c.num_stages * ((2 * c.kwargs["BLOCK_M"] + 2 * c.kwargs["BLOCK_N"]) * wide
                               + c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * mask_bytes) <= 200 * 1024
            and not (wide >= 512 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 32 * 64)]
    return _fixed(kept) or [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)]


_KEY = ["BLOCK_D", "IS_CAUSAL", "HAS_MASK", "HAS_DROPOUT", "WINDOW", "SOFTCAP", "ALIBI", "VARLEN_Q", "VARLEN_K",
        "PAGED", "L_BUCKET", "S_BUCKET"]


@triton.jit
def _block_and_head(n_rows, BLOCK: tl.constexpr):
    """(row-block index, batch*head index) of this program. Both live on grid axis 0, which allows
    2^31 - 1 programs (axes 1 and 2 only 65535, too few for batch x heads in large-batch
    inference); the row blocks of one head are adjacent, so they share that head's K/V in L2."""
    n_blocks = tl.cdiv(n_rows, BLOCK)
    pid = tl.program_id(0)
    return pid % n_blocks, pid // n_blocks


@triton.jit
def _sequence(CuQ, KStart, KLen, b, L, S, VARLEN_Q: tl.constexpr, VARLEN_K: tl.constexpr):
    """(q0, Lb, k0, Sb): first query row and query count, first key row and key count of sequence b.
    VARLEN_Q: queries packed, sequence b owns rows [CuQ[b], CuQ[b+1]); else every sequence has L.
    VARLEN_K: sequence b's keys are rows [KStart[b], KStart[b] + KLen[b]) (packed keys, or a kv-cache
    with per-batch lengths); else keys [0, S) of batch b."""
    if VARLEN_Q:
        q0 = tl.load(CuQ + b).to(tl.int64)
        Lb = (tl.load(CuQ + b + 1) - tl.load(CuQ + b)).to(tl.int32)
    else:
        q0 = 0
        Lb = L
    if VARLEN_K:
        k0 = tl.load(KStart + b).to(tl.int64)
        Sb = tl.load(KLen + b).to(tl.int32)
    else:
        k0 = 0
        Sb = S
    return q0, Lb, k0, Sb


@triton.jit
def _kv_rows(offs_n, k_end, bt_base, page_size, PAGED: tl.constexpr):
    """int64 row of each key in its K/V view: the key itself, or through the page table (key j of a
    paged cache lives in page bt[j // page_size] at row j % page_size; any page size)."""
    if PAGED:
        page = tl.load(bt_base + offs_n // page_size, mask=offs_n < k_end, other=0).to(tl.int64)
        return page * page_size + (offs_n % page_size).to(tl.int64)
    else:
        return offs_n.to(tl.int64)


# ------------------------------------------------------------------------------------------------
# The scores of one tile, shared by the forward and both backward kernels
# ------------------------------------------------------------------------------------------------
@triton.jit
def _scores(
    qk,                                  # raw q.k dot products of the tile, fp32
    qi, kj,                              # query / key index of each element, broadcastable to qk
    L, k_end,                            # queries < L and keys < k_end exist
    mask_base, stride_mm, stride_mn,     # the (L, S) mask of this (batch, head)
    scale, causal_off, left_off,         # right bound: j <= i + causal_off; left bound: j >= i + left_off
    alibi_off, slope, softcap,           # ALiBi: - slope |i + alibi_off - j|; softcap > 0
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
):
    """(s, t): s = the tile's scores, -inf wherever query qi may not see key kj; t = tanh of the
    capped score (SOFTCAP; the backward's chain factor 1 - t^2), else s again (unused).

    s = scale q.k, then softcap * tanh(s / softcap) (SOFTCAP), then - slope |i + alibi_off - j|
    (ALIBI), then + the float mask. The tile may be in either orientation: (queries, keys) with
    qi = offs_m[:, None], kj = offs_n[None, :], or transposed (keys, queries, as the dK/dV kernel
    works) with qi = offs_m[None, :], kj = offs_n[:, None]. CAUSAL applies the right bound
    (j <= i + causal_off: 0 is SDPA's top-left alignment, S - L flash-attn's bottom-right, plus a
    window's right size); callers pass it only for blocks that cross it. WINDOW applies the left
    bound j >= i + left_off on every block."""
    s = qk * scale
    t = s
    if SOFTCAP:
        t = tanh(s / softcap)
        s = softcap * t
    if ALIBI:
        s = s - slope * tl.abs(qi + alibi_off - kj).to(tl.float32)
    valid = (qi < L) & (kj < k_end)
    if HAS_MASK:
        bias = tl.load(mask_base + qi.to(tl.int64) * stride_mm + kj.to(tl.int64) * stride_mn, mask=valid, other=0)
        if MASK_BOOL:
            valid = valid & (bias != 0)
        else:
            s = s + bias.to(tl.float32)
    if CAUSAL:
        valid = valid & (kj <= qi + causal_off)
    if WINDOW:
        valid = valid & (kj >= qi + left_off)
    return tl.where(valid, s, float("-inf")), t


@triton.jit
def _key_range(m0, lo, hi, causal_off, left_off, IS_CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(lo, mid, hi) for query rows [m0, m0 + BLOCK_M) within keys [lo, hi) (lo a multiple of
    BLOCK_N): blocks before the window's left edge are skipped (lo rounded down to a block), none
    past the last row's right bound are visited, and [lo, mid) lie wholly at or below the right
    bound (n0 + BLOCK_N - 1 <= m0 + causal_off) and need no right-bound mask. Offsets are clamped
    at 0 before the integer divisions (negative ones would round towards zero)."""
    if WINDOW:
        lo = tl.maximum(lo, (tl.maximum(m0 + left_off, 0) // BLOCK_N) * BLOCK_N)
    mid = hi
    if IS_CAUSAL:
        hi = tl.maximum(lo, tl.minimum(hi, m0 + BLOCK_M + causal_off))
        mid = tl.maximum(lo, tl.minimum(hi, (tl.maximum(m0 + 1 + causal_off, 0) // BLOCK_N) * BLOCK_N))
    return lo, mid, hi


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_block_loop(
    acc, l_i, m_i,                       # running (BLOCK_M, BLOCK_D) output, row sum, row max (fp32)
    q, offs_m, offs_d,                   # this block's query tile, its rows, the head-dim columns
    lo, hi, k_end,                       # key blocks [lo, hi) (lo a multiple of BLOCK_N); keys < k_end exist
    k_base, v_base, stride_kn, stride_vn,
    bt_base, page_size,                  # PAGED: this sequence's page-table row, keys per page
    mask_base, stride_mm, stride_mn,
    L, E, scale, causal_off, left_off, alibi_off, slope, softcap,
    drop_row, drop_p, drop_scale, seed,  # drop_row: (BLOCK_M,) int64 dropout index of (i, j=0)
    DIAG: tl.constexpr,                  # these blocks cross the causal diagonal
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, PAGED: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Online softmax: with m the running max and l = sum exp(s - m), a new block with max m' gives
    # l' = l exp(m - m') + sum exp(s_new - m'), acc' = acc exp(m - m') + exp(s_new - m') V_new.
    # While every score so far is -inf, m' = -inf; exponentiating against 0 instead keeps p and the
    # rescale factor at exactly 0 (exp(-inf - -inf) would be NaN).
    d_ok = offs_d < E
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n < k_end)[:, None] & d_ok[None, :]
        kv_off = _kv_rows(offs_n, k_end, bt_base, page_size, PAGED)[:, None]
        k = tl.load(k_base + kv_off * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_base + kv_off * stride_vn + offs_d[None, :], mask=kv_ok, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s, _t = _scores(tl.dot(q, tl.trans(k), input_precision=DOT_PREC), offs_m[:, None], offs_n[None, :],
                        L, k_end, mask_base, stride_mm, stride_mn, scale, causal_off, left_off, alibi_off, slope,
                        softcap, HAS_MASK, MASK_BOOL, DIAG, WINDOW, SOFTCAP, ALIBI)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)  # the softmax normaliser ignores dropout
        if HAS_DROPOUT:
            keep = dropout_keep(seed, 0, drop_row[:, None] + offs_n[None, :].to(tl.int64), drop_p)
            p = tl.where(keep, p * drop_scale, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_configs(_FWD_TABLE), key=_KEY + ["SPLIT"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _attn_fwd(
    Q, K, V, Mask,                       # inputs (see the module docstring for layouts)
    Out, Lse, Out32,                     # (B, H, L, E) input dtype, (B, H, L) fp32, (B, H, L, E) fp32 if STORE_O32
    PartAcc, PartM, PartL,               # SPLIT: (B*H, n_splits, L, E), (B*H, n_splits, L) x2, fp32
    CuQ, KStart, KLen, BlockTable, Alibi,  # VARLEN_Q / VARLEN_K / PAGED / ALIBI inputs (module docstring)
    stride_qb, stride_qh, stride_qm,     # element strides (the last dim has stride 1)
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ab, stride_btb,               # ALiBi slopes' batch stride (0 for (H,)); page-table row stride
    H, GROUPS, L, S, E,                  # query heads, query heads per kv head, sizes (max per sequence)
    L_TOT,                               # rows of the q/out/lse views per head (L, or total_q when VARLEN_Q)
    scale, drop_p, drop_scale, SEED,     # softmax scale; dropout p, 1/(1-p) (0 when p == 1), Philox seed
    causal_off, left_off, alibi_off,     # right bound, left bound (WINDOW), ALiBi diagonal (+ Sb - Lb if VARLEN_K)
    softcap, page_size,
    split_size, n_splits,                # SPLIT: keys per program (a multiple of BLOCK_N), programs per row
    L_BUCKET, S_BUCKET,                  # autotune key only
    BLOCK_D: tl.constexpr,               # head dim rounded up to a power of two (>= 16)
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    VARLEN_Q: tl.constexpr, VARLEN_K: tl.constexpr, PAGED: tl.constexpr,
    SPLIT: tl.constexpr,                 # flash-decoding: write unnormalised partials per key split
    STORE_O32: tl.constexpr,             # also write the fp32 output (16-bit inputs, for the backward)
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,  # interpreter: fp32 dot operands; "ieee" for fp32
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    if HAS_DROPOUT:
        seed = tl.load(SEED)  # (1,) int64 on the device: a CUDA graph replay's new draw takes effect
    else:
        seed = 0
    pid_m, pid_bh = _block_and_head(L, BLOCK_M)
    pid_s = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUPS  # the shared kv head (GQA/MQA)
    q0, Lb, k0, Sb = _sequence(CuQ, KStart, KLen, b, L, S, VARLEN_Q, VARLEN_K)
    if VARLEN_K:  # flash-attn's bottom-right alignment, per sequence
        causal_off += Sb - Lb
        left_off += Sb - Lb
        alibi_off += Sb - Lb
    slope = 0.0
    if ALIBI:
        slope = tl.load(Alibi + b * stride_ab + h)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m < Lb)[:, None] & (offs_d < E)[None, :]
    if VARLEN_Q:
        row0 = h * L_TOT + q0  # (1, H, total_q) layout
    else:
        row0 = (b * H + h) * L_TOT

    q = tl.load(Q + b * stride_qb + h * stride_qh + (q0 + offs_m[:, None]).to(tl.int64) * stride_qm + offs_d[None, :],
                mask=ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    lo = 0
    hi = Sb
    if SPLIT:
        lo = pid_s * split_size
        hi = tl.minimum(Sb, lo + split_size)
    k_end = hi
    lo, mid, hi = _key_range(m0, lo, hi, causal_off, left_off, IS_CAUSAL, WINDOW, BLOCK_M, BLOCK_N)
    if VARLEN_Q:  # row blocks past this sequence's end visit no key
        hi = tl.where(m0 < Lb, hi, lo)
        mid = tl.minimum(mid, hi)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for diag in tl.static_range(2 if IS_CAUSAL else 1):
        acc, l_i, m_i = _fwd_block_loop(
            acc, l_i, m_i, q, offs_m, offs_d,
            lo=lo if diag == 0 else mid, hi=mid if diag == 0 else hi, k_end=k_end,
            k_base=K + b * stride_kb + hk * stride_kh + k0 * stride_kn,
            v_base=V + b * stride_vb + hk * stride_vh + k0 * stride_vn,
            stride_kn=stride_kn, stride_vn=stride_vn,
            bt_base=BlockTable + b * stride_btb, page_size=page_size,
            mask_base=Mask + b * stride_mb + h * stride_mh, stride_mm=stride_mm, stride_mn=stride_mn,
            L=Lb, E=E, scale=scale, causal_off=causal_off, left_off=left_off, alibi_off=alibi_off, slope=slope,
            softcap=softcap,
            drop_row=(row0 + offs_m.to(tl.int64)) * S, drop_p=drop_p, drop_scale=drop_scale, seed=seed,
            DIAG=diag == 1, HAS_MASK=HAS_MASK, MASK_BOOL=MASK_BOOL, HAS_DROPOUT=HAS_DROPOUT,
            WINDOW=WINDOW, SOFTCAP=SOFTCAP, ALIBI=ALIBI, PAGED=PAGED,
            UPCAST=UPCAST, DOT_PREC=DOT_PREC, BLOCK_N=BLOCK_N)

    if SPLIT:
        # Unnormalised partials; _attn_decode_combine merges the n_splits of each row.
        part = (pid_bh.to(tl.int64) * n_splits + pid_s) * L + offs_m
        tl.store(PartAcc + part[:, None] * E + offs_d[None, :], acc, mask=ok)
        tl.store(PartM + part, m_i, mask=offs_m < Lb)
        tl.store(PartL + part, l_i, mask=offs_m < Lb)
    else:
        # A fully masked row has l = 0 and acc = 0: output 0, lse = log 0 = -inf.
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        out = acc / l_safe[:, None]
        lse = tl.where(empty, float("-inf"), m_i + tl.log(l_safe))
        row = row0 + offs_m
        tl.store(Out + row[:, None] * E + offs_d[None, :], out.to(Out.dtype.element_ty), mask=ok)
        if STORE_O32:
            tl.store(Out32 + row[:, None] * E + offs_d[None, :], out, mask=ok)
        tl.store(Lse + row, lse, mask=offs_m < Lb)


@triton.jit
def _attn_decode_combine(
    PartAcc, PartM, PartL,               # (B*H, n_splits, L, E), (B*H, n_splits, L) x2, fp32
    Out, Lse,                            # (B, H, L, E) output dtype, (B, H, L) fp32
    L, E, n_splits,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Split s holds m_s, l_s = sum exp(x - m_s), acc_s = sum exp(x - m_s) v over its keys. With
    # M = max_s m_s: l = sum_s l_s exp(m_s - M), O = sum_s acc_s exp(m_s - M) / l, lse = M + log l.
    # Splits with no visible key have m_s = -inf and weigh exactly 0 (M taken as 0 if all are).
    pid_m, pid_bh = _block_and_head(L, BLOCK_M)
    pid_bh = pid_bh.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    d_ok = offs_d < E
    m_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for s in range(0, n_splits):
        part = (pid_bh * n_splits + s) * L + offs_m
        m_max = tl.maximum(m_max, tl.load(PartM + part, mask=m_ok, other=float("-inf")))
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    l_tot = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for s in range(0, n_splits):
        part = (pid_bh * n_splits + s) * L + offs_m
        w = tl.exp(tl.load(PartM + part, mask=m_ok, other=float("-inf")) - m_safe)
        l_tot += w * tl.load(PartL + part, mask=m_ok, other=0.0)
        a = tl.load(PartAcc + part[:, None] * E + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        acc += w[:, None] * a
    empty = l_tot == 0.0
    l_safe = tl.where(empty, 1.0, l_tot)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), m_max + tl.log(l_safe))
    row = pid_bh * L + offs_m
    tl.store(Out + row[:, None] * E + offs_d[None, :], out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(Lse + row, lse, mask=m_ok)



# ------------------------------------------------------------------------------------------------
# Backward
#
# With S = scale Q K^T + bias, P = softmax(S) (rows), Z = P o keep / (1 - p) (dropout), O = Z V,
# and dO given:
#   dV   = Z^T dO
#   dZ   = dO V^T,   dP = dZ o keep / (1 - p)
#   dS_ij = P_ij (dP_ij - sum_k P_ik dP_ik)            (softmax Jacobian, row by row)
#   sum_k P_ik dP_ik = sum_k Z_ik (dO_i . V_k) = dO_i . O_i =: delta_i   (the preprocess kernel)
#   dQ   = scale dS K,   dK = scale dS^T Q
# P is recomputed as exp(S - lse) from the saved fp32 row logsumexp. A fully masked row has
# lse = -inf; it is read as +inf so that every P_ij = exp(S_ij - inf) = 0 there (zero gradients).
#
# delta needs O in fp32. On sharp attention (one P_ij close to 1, common in trained models)
# dP_ij and delta_i nearly cancel in dS_ij; a delta from the 16-bit rounded O carries an error
# ~2^-8 |dO_i| |O_i| (bf16) that survives the cancellation and dominated dQ and dK (errors ~1000x
# torch's). So for 16-bit inputs the forward also writes its fp32 O and the preprocess reads that.
#
# dK/dV: one program per (key block, kv head) loops over the query blocks of every query head of
# its group; dQ: one program per (query block, head) loops over key blocks. Each gradient element
# is summed by exactly one program in a fixed order: no atomics, bit-identical reruns.
# ------------------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_preprocess(
    Out, DO, Delta,                      # (B, H, L, E) contiguous (any float dtype); dO strided; (B, H, L) fp32 out
    stride_dob, stride_doh, stride_dom,
    H, L, E,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m, pid_bh = _block_and_head(L, BLOCK_M)
    pid_bh = pid_bh.to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < L) & (offs_d[None, :] < E)
    row = pid_bh * L + offs_m
    o = tl.load(Out + row[:, None] * E + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None].to(tl.int64) * stride_dom + offs_d[None, :],
                 mask=ok, other=0.0).to(tl.float32)
    tl.store(Delta + row, tl.sum(o * do, 1), mask=offs_m < L)


@triton.jit
def _dkdv_block_loop(
    dk, dv,                              # (BLOCK_N, BLOCK_D) fp32 accumulators
    k, v, offs_n, offs_d,                # this block's key and value tiles, its keys, the head-dim columns
    lo, hi,                              # query blocks [lo, hi), lo a multiple of BLOCK_M
    q_base, do_base, stride_qm, stride_dom,
    lse_ptr, delta_ptr,                  # this (batch, head)'s rows of lse and delta
    mask_base, stride_mm, stride_mn,
    L, S, E, scale, causal_off, left_off, alibi_off, slope, softcap,
    drop_base, drop_stride, drop_p, drop_scale, seed,  # dropout index of (i, j): drop_base + i * drop_stride + j
    DIAG: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # Works on transposed tiles (keys x queries) so dK and dV accumulate without transposes.
    d_ok = offs_d < E
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < L
        row_off = offs_m[:, None].to(tl.int64)
        q = tl.load(q_base + row_off * stride_qm + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        do = tl.load(do_base + row_off * stride_dom + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(lse_ptr + offs_m, mask=m_ok, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
        delta = tl.load(delta_ptr + offs_m, mask=m_ok, other=0.0)
        sT, tT = _scores(tl.dot(k, tl.trans(q), input_precision=DOT_PREC), offs_m[None, :], offs_n[:, None],
                         L, S, mask_base, stride_mm, stride_mn, scale, causal_off, left_off, alibi_off, slope,
                         softcap, HAS_MASK, MASK_BOOL, DIAG, WINDOW, SOFTCAP, ALIBI)
        pT = tl.exp(sT - lse[None, :])
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # dZ^T
        if HAS_DROPOUT:
            idx = drop_base + offs_m[None, :].to(tl.int64) * drop_stride + offs_n[:, None].to(tl.int64)  # (i, j) of P^T
            keep = dropout_keep(seed, 0, idx, drop_p)
            zT = tl.where(keep, pT * drop_scale, 0.0)
            dpT = tl.where(keep, dpT * drop_scale, 0.0)
        else:
            zT = pT
        dv += tl.dot(zT.to(do.dtype), do, input_precision=DOT_PREC)
        dsT = pT * (dpT - delta[None, :])
        if SOFTCAP:  # d/dx softcap tanh(x / softcap) = 1 - tanh^2
            dsT = dsT * (1.0 - tT * tT)
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PREC)
    return dk, dv


@triton.autotune(configs=_configs(_BWD_TABLE), key=_KEY, prune_configs_by={"early_config_prune": _prune_bwd})
@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, Mask, DO, Lse, Delta,       # Lse, Delta (B, H, L) fp32 contiguous
    DK, DV,                              # (B, Hkv, S, E) contiguous outputs ((1, Hkv, total_k, E) if VARLEN_K)
    CuQ, KStart, KLen, BlockTable, Alibi,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dom,
    stride_ab, stride_btb,
    H, HKV, GROUPS, L, S, E, L_TOT, S_TOT,
    scale, drop_p, drop_scale, SEED, causal_off, left_off, alibi_off, softcap, page_size,
    L_BUCKET, S_BUCKET,
    BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    VARLEN_Q: tl.constexpr, VARLEN_K: tl.constexpr, PAGED: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    if HAS_DROPOUT:
        seed = tl.load(SEED)  # (1,) int64 on the device: a CUDA graph replay's new draw takes effect
    else:
        seed = 0
    pid_n, pid_bk = _block_and_head(S, BLOCK_N)
    b = (pid_bk // HKV).to(tl.int64)
    hk = (pid_bk % HKV).to(tl.int64)
    q0, Lb, k0, Sb = _sequence(CuQ, KStart, KLen, b, L, S, VARLEN_Q, VARLEN_K)
    if VARLEN_K:
        causal_off += Sb - Lb
        left_off += Sb - Lb
        alibi_off += Sb - Lb
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_ok = (offs_n[:, None] < Sb) & (offs_d[None, :] < E)
    kv_off = (k0 + offs_n[:, None]).to(tl.int64)
    k = tl.load(K + b * stride_kb + hk * stride_kh + kv_off * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + kv_off * stride_vn + offs_d[None, :], mask=kv_ok, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    # Query rows that see these keys: [mid, hi) see every key of the block (from the first with
    # m0 >= n0 + BLOCK_N - 1 on), [lo, mid) cross the causal diagonal; rows i < n0 - causal_off see
    # none, nor (WINDOW) rows i > n0 + BLOCK_N - 1 - left_off (skipped).
    lo = 0
    mid = 0
    hi = Lb
    if WINDOW:
        hi = tl.maximum(0, tl.minimum(Lb, n0 + BLOCK_N - left_off))
    if IS_CAUSAL:  # row i sees key j when i >= j - causal_off
        lo = tl.minimum(Lb, (tl.maximum(n0 - causal_off, 0) // BLOCK_M) * BLOCK_M)
        mid = tl.maximum(lo, tl.minimum(Lb, tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - causal_off, 0), BLOCK_M) * BLOCK_M))
        mid = tl.minimum(mid, hi)
    if VARLEN_K:  # key blocks past this sequence's end see no query
        hi = tl.where(n0 < Sb, hi, 0)
        mid = tl.minimum(mid, hi)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, GROUPS):
        h = hk * GROUPS + g
        if VARLEN_Q:
            row0 = h * L_TOT + q0
        else:
            row0 = (b * H + h) * L_TOT
        slope = 0.0
        if ALIBI:
            slope = tl.load(Alibi + b * stride_ab + h)
        for diag in tl.static_range(2 if IS_CAUSAL else 1):  # the full blocks first, then the diagonal
            dk, dv = _dkdv_block_loop(
                dk, dv, k, v, offs_n, offs_d,
                lo=mid if diag == 0 else lo, hi=hi if diag == 0 else mid,
                q_base=Q + b * stride_qb + h * stride_qh + q0 * stride_qm,
                do_base=DO + b * stride_dob + h * stride_doh + q0 * stride_dom,
                stride_qm=stride_qm, stride_dom=stride_dom,
                lse_ptr=Lse + row0, delta_ptr=Delta + row0,
                mask_base=Mask + b * stride_mb + h * stride_mh, stride_mm=stride_mm, stride_mn=stride_mn,
                L=Lb, S=Sb, E=E, scale=scale, causal_off=causal_off, left_off=left_off, alibi_off=alibi_off,
                slope=slope, softcap=softcap,
                drop_base=row0 * S, drop_stride=S, drop_p=drop_p, drop_scale=drop_scale, seed=seed,
                DIAG=diag == 1, HAS_MASK=HAS_MASK, MASK_BOOL=MASK_BOOL, HAS_DROPOUT=HAS_DROPOUT,
                WINDOW=WINDOW, SOFTCAP=SOFTCAP, ALIBI=ALIBI,
                UPCAST=UPCAST, DOT_PREC=DOT_PREC, BLOCK_M=BLOCK_M)
    if VARLEN_K:
        out_row = hk * S_TOT + k0 + offs_n
    else:
        out_row = (b * HKV + hk) * S_TOT + offs_n
    out = out_row[:, None] * E + offs_d[None, :]
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit
def _dq_block_loop(
    dq,                                  # (BLOCK_M, BLOCK_D) fp32 accumulator
    q, do, lse, delta, offs_m, offs_d,   # this block's tiles and statistics, its rows, the columns
    lo, hi,                              # key blocks [lo, hi), lo a multiple of BLOCK_N
    k_base, v_base, stride_kn, stride_vn,
    mask_base, stride_mm, stride_mn,
    L, S, E, scale, causal_off, left_off, alibi_off, slope, softcap,
    drop_row, drop_p, drop_scale, seed,
    DIAG: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr,
):
    d_ok = offs_d < E
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n < S)[:, None] & d_ok[None, :]
        kv_off = offs_n[:, None].to(tl.int64)
        k = tl.load(k_base + kv_off * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_base + kv_off * stride_vn + offs_d[None, :], mask=kv_ok, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s, t = _scores(tl.dot(q, tl.trans(k), input_precision=DOT_PREC), offs_m[:, None], offs_n[None, :],
                       L, S, mask_base, stride_mm, stride_mn, scale, causal_off, left_off, alibi_off, slope,
                       softcap, HAS_MASK, MASK_BOOL, DIAG, WINDOW, SOFTCAP, ALIBI)
        p = tl.exp(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, 0, drop_row[:, None] + offs_n[None, :].to(tl.int64), drop_p)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


@triton.autotune(configs=_configs(_BWD_TABLE), key=_KEY, prune_configs_by={"early_config_prune": _prune_bwd})
@triton.jit
def _attn_bwd_dq(
    Q, K, V, Mask, DO, Lse, Delta,
    DQ,                                  # (B, H, L, E) contiguous output ((1, H, total_q, E) if VARLEN_Q)
    CuQ, KStart, KLen, BlockTable, Alibi,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dom,
    stride_ab, stride_btb,
    H, HKV, GROUPS, L, S, E, L_TOT, S_TOT,
    scale, drop_p, drop_scale, SEED, causal_off, left_off, alibi_off, softcap, page_size,
    L_BUCKET, S_BUCKET,
    BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    VARLEN_Q: tl.constexpr, VARLEN_K: tl.constexpr, PAGED: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    if HAS_DROPOUT:
        seed = tl.load(SEED)  # (1,) int64 on the device: a CUDA graph replay's new draw takes effect
    else:
        seed = 0
    # BLOCK_N here plays the role of the streamed key block; the tables are shared with dK/dV.
    pid_m, pid_bh = _block_and_head(L, BLOCK_M)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUPS
    q0, Lb, k0, Sb = _sequence(CuQ, KStart, KLen, b, L, S, VARLEN_Q, VARLEN_K)
    if VARLEN_K:
        causal_off += Sb - Lb
        left_off += Sb - Lb
        alibi_off += Sb - Lb
    slope = 0.0
    if ALIBI:
        slope = tl.load(Alibi + b * stride_ab + h)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lb
    ok = m_ok[:, None] & (offs_d[None, :] < E)
    row_off = (q0 + offs_m[:, None]).to(tl.int64)
    q = tl.load(Q + b * stride_qb + h * stride_qh + row_off * stride_qm + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + row_off * stride_dom + offs_d[None, :], mask=ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    if VARLEN_Q:
        row0 = h * L_TOT + q0
    else:
        row0 = (b * H + h) * L_TOT
    row = row0 + offs_m
    lse = tl.load(Lse + row, mask=m_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(Delta + row, mask=m_ok, other=0.0)
    # Key blocks as in the forward: [lo, mid) below the diagonal, [mid, hi) crossing it.
    lo, mid, hi = _key_range(m0, 0, Sb, causal_off, left_off, IS_CAUSAL, WINDOW, BLOCK_M, BLOCK_N)
    if VARLEN_Q:
        hi = tl.where(m0 < Lb, hi, lo)
        mid = tl.minimum(mid, hi)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for diag in tl.static_range(2 if IS_CAUSAL else 1):
        dq = _dq_block_loop(
            dq, q, do, lse, delta, offs_m, offs_d,
            lo=lo if diag == 0 else mid, hi=mid if diag == 0 else hi,
            k_base=K + b * stride_kb + hk * stride_kh + k0 * stride_kn,
            v_base=V + b * stride_vb + hk * stride_vh + k0 * stride_vn,
            stride_kn=stride_kn, stride_vn=stride_vn,
            mask_base=Mask + b * stride_mb + h * stride_mh, stride_mm=stride_mm, stride_mn=stride_mn,
            L=Lb, S=Sb, E=E, scale=scale, causal_off=causal_off, left_off=left_off, alibi_off=alibi_off,
            slope=slope, softcap=softcap,
            drop_row=row * S, drop_p=drop_p, drop_scale=drop_scale, seed=seed,
            DIAG=diag == 1, HAS_MASK=HAS_MASK, MASK_BOOL=MASK_BOOL, HAS_DROPOUT=HAS_DROPOUT,
            WINDOW=WINDOW, SOFTCAP=SOFTCAP, ALIBI=ALIBI,
            UPCAST=UPCAST, DOT_PREC=DOT_PREC, BLOCK_N=BLOCK_N)
    tl.store(DQ + row[:, None] * E + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=ok)


@triton.jit
def _dropout_mask_kernel(Keep, n, seed, drop_p, BLOCK: tl.constexpr):
    # Test hook: the attention kernels' keep-mask, element idx of the flattened (B, H, L, S).
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Keep + idx, dropout_keep(seed, 0, idx, drop_p).to(tl.int8), mask=idx < n)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------
MAX_HEAD_DIM = 256


def _strides(name, t, dims="bhm"):
    """{"stride_<name>b": ..., "stride_<name>h": ..., "stride_<name>m": ...}: the kernels' keyword
    arguments for a (B, H, rows, E) tensor (its last dim has stride 1)."""
    return {f"stride_{name}{d}": t.stride(i) for i, d in enumerate(dims)}


class Seqlens(NamedTuple):
    """Per-sequence lengths for the VARLEN_Q / VARLEN_K kernel variants (all int32, on q's device).

    cu_q: (B + 1,) cumulative query counts (queries packed as q (1, H, total_q, E)), or None for
    dense q (B, H, L, E). k_start, k_len: (B,) first key row and key count of each sequence in the
    k/v views (1, Hkv, rows, E) (packed keys: cu_k[:-1], diff(cu_k); a kv-cache: the cache row of
    batch b and its filled length; a paged cache: zeros, and the rows are pages * page_size).
    max_q, max_k: the longest sequence's query and key count (the grid and the dropout index).
    With Seqlens every causal/window/ALiBi offset is relative: each sequence adds its own Sb - Lb
    (flash-attn's bottom-right alignment)."""
    cu_q: Optional[torch.Tensor]
    k_start: torch.Tensor
    k_len: torch.Tensor
    max_q: int
    max_k: int


def _launch_args(q, k, v, mask, dropout_p, *, window_offset=None, softcap=0.0, alibi_slopes=None, alibi_offset=0,
                 seqlens=None, block_table=None, page_size=0):
    """Checks (asserts: the op wrapper has checked with torch's rules) and the keyword arguments
    shared by the forward and both backward kernels: strides, sizes, constexpr flags."""
    assert q.dim() == k.dim() == v.dim() == 4, "attention launchers take q (B, H, L, E), k and v (B, Hkv, S, E)"
    H, L_TOT, E = q.shape[1], q.shape[2], q.shape[3]
    Hkv, S_TOT = k.shape[1], k.shape[2]
    if seqlens is None:
        B, L, S = q.shape[0], L_TOT, S_TOT
        assert k.shape[0] == B, f"bad attention shapes q {tuple(q.shape)}, k {tuple(k.shape)}"
    else:
        B, S = seqlens.k_len.numel(), seqlens.max_k
        L = seqlens.max_q if seqlens.cu_q is not None else L_TOT
        assert k.shape[0] == 1 and (seqlens.cu_q is None and q.shape[0] == B or q.shape[0] == 1), \
            "with seqlens, k/v are (1, Hkv, rows, E) views and q (1, H, total_q, E) or (B, H, L, E)"
        assert all(t.dtype == torch.int32 for t in seqlens[:3] if t is not None), "seqlens must be int32"
    assert k.shape == v.shape and k.shape[3] == E and Hkv > 0 and H % Hkv == 0, \
        f"bad attention shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    assert q.dtype == k.dtype == v.dtype and q.dtype in KERNEL_FLOATS, \
        f"q, k, v must share one dtype among float16, bfloat16, float32; got {q.dtype}, {k.dtype}, {v.dtype}"
    assert E <= MAX_HEAD_DIM, f"head dim E={E} exceeds the kernel's limit of {MAX_HEAD_DIM}"
    assert all(t.stride(-1) == 1 for t in (q, k, v)), "q, k, v need a contiguous last dim (stride 1)"
    assert 0.0 <= dropout_p <= 1.0, f"dropout probability has to be between 0 and 1, but got {dropout_p}"
    assert block_table is None or (seqlens is not None and page_size > 0 and block_table.dtype == torch.int32
                                   and block_table.dim() == 2 and block_table.shape[0] == B), \
        "a paged cache needs seqlens, page_size > 0 and an int32 (B, pages) block_table"
    if alibi_slopes is not None:
        assert alibi_slopes.dtype == torch.float32 and alibi_slopes.shape in ((H,), (B, H)), \
            "alibi_slopes (H,) or (B, H) fp32"
        alibi_slopes = alibi_slopes.contiguous()
    if mask is not None:
        assert seqlens is None, "no mask with seqlens"
        assert mask.shape == (B, H, L, S), \
            f"mask must be expanded to (B, H, L, S) = {(B, H, L, S)}, got {tuple(mask.shape)}"
        if mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)  # same bytes; keeps stride-0 dims
    lb, sb = _buckets(L, S)
    args = dict(
        Mask=mask if mask is not None else q,  # never read when HAS_MASK is False (nor the pointers below)
        CuQ=seqlens.cu_q if seqlens is not None and seqlens.cu_q is not None else q,
        KStart=seqlens.k_start if seqlens is not None else q, KLen=seqlens.k_len if seqlens is not None else q,
        BlockTable=block_table if block_table is not None else q,
        Alibi=alibi_slopes if alibi_slopes is not None else q,
        **_strides("q", q), **_strides("k", k, "bhn"), **_strides("v", v, "bhn"),
        **(_strides("m", mask, "bhmn") if mask is not None
           else dict(stride_mb=0, stride_mh=0, stride_mm=0, stride_mn=0)),
        stride_ab=H if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0,
        stride_btb=block_table.stride(0) if block_table is not None else 0,
        H=H, GROUPS=H // Hkv, L=L, S=S, E=E, L_TOT=L_TOT,
        drop_p=dropout_p, drop_scale=1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0,  # p == 1 drops everything
        left_off=0 if window_offset is None else int(window_offset), alibi_off=int(alibi_offset),
        softcap=float(softcap) if softcap > 0.0 else 1.0, page_size=max(int(page_size), 1),
        L_BUCKET=lb, S_BUCKET=sb,
        BLOCK_D=max(16, triton.next_power_of_2(E)),
        HAS_MASK=mask is not None,
        MASK_BOOL=mask is not None and mask.dtype == torch.uint8,
        HAS_DROPOUT=dropout_p > 0.0,
        WINDOW=window_offset is not None, SOFTCAP=softcap > 0.0, ALIBI=alibi_slopes is not None,
        VARLEN_Q=seqlens is not None and seqlens.cu_q is not None, VARLEN_K=seqlens is not None,
        PAGED=block_table is not None,
        UPCAST=_upcast_dots(q.dtype),
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",  # tf32 is ignored for 16-bit operands
    )
    if args["VARLEN_Q"]:  # one packed row space: sequences are found through CuQ, not a batch stride
        args["stride_qb"] = 0
    if args["VARLEN_K"]:
        args["stride_kb"] = args["stride_vb"] = 0
    return (B, H, Hkv, L, S, E), args


def _buckets(L, S):
    return triton.next_power_of_2(max(L, 1)), triton.next_power_of_2(max(S, 1))


def _seed_arg(seed, dropout_p, q):
    """The kernels' SEED pointer: the (1,) int64 device tensor (an int is copied there); any
    pointer when there is no dropout (never read)."""
    return seed_tensor(seed, q.device) if dropout_p > 0.0 else q


def attention_forward(q, k, v, mask=None, *, scale, is_causal=False, dropout_p=0.0, seed=0,
                      decode=None, split_size=None, return_mask=False, return_fp32_out=False, causal_offset=0,
                      window_offset=None, softcap=0.0, alibi_slopes=None, alibi_offset=0,
                      seqlens=None, block_table=None, page_size=0):
    """Fused attention forward.

    q (B, H, L, E), k, v (B, Hkv, S, E) with a contiguous last dim, H % Hkv == 0; mask None or
    (B, H, L, S) bool/float (any strides, stride 0 for broadcast dims). Returns
    (out (B, H, L, E) in q's dtype contiguous, lse (B, H, L) fp32: the row logsumexp of the scaled,
    biased scores, -inf for fully masked rows).

    decode: None picks flash-decoding when L <= 16, S >= 512 and no dropout; True/False forces it
    (dropout must be 0). split_size: keys per program in decode mode, a multiple of _SPLIT_ALIGN
    (default: enough splits to fill the GPU twice over).
    return_fp32_out: also return the output in fp32 (B, H, L, E) before the cast (what
    attention_backward wants as `out` for 16-bit inputs); not with decode.
    causal_offset: with is_causal, query i sees keys j <= i + causal_offset (0: SDPA's top-left
    alignment; S - L: flash-attn's bottom-right; plus a window's right size). Rows that see no key
    give 0 and lse -inf.
    window_offset: None, or query i sees only keys j >= i + window_offset (flash-attn's left window:
    S - L - left); key blocks wholly before it are skipped.
    softcap > 0: scores softcap * tanh(scale q.k / softcap). alibi_slopes fp32 (H,) or (B, H): adds
    - slope |i + alibi_offset - j| (after the softcap).
    seqlens (a Seqlens): variable-length sequences (packed q/k/v or a kv-cache with per-batch
    lengths); out and lse then have q's view shape, (1, H, total_q, E) / (1, H, total_q) for packed
    queries. block_table (B, pages) int32 with page_size: key j of sequence b lives at row
    block_table[b, j // page_size] * page_size + j % page_size of the k/v views (forward only).
    return_mask: test hook, also return the dropout keep-mask (B, H, L, S) bool that was applied.
    """
    feats = dict(window_offset=window_offset, softcap=softcap, alibi_slopes=alibi_slopes, alibi_offset=alibi_offset,
                 seqlens=seqlens, block_table=block_table, page_size=page_size)
    if return_mask:
        assert seqlens is None, "return_mask is for dense inputs"
        res = attention_forward(q, k, v, mask, scale=scale, is_causal=is_causal, dropout_p=dropout_p,
                                seed=seed, decode=decode, split_size=split_size, return_fp32_out=return_fp32_out,
                                causal_offset=causal_offset, **feats)
        shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        return (*res, dropout_mask(shape, seed, dropout_p, q.device))
    (B, H, Hkv, L, S, E), args = _launch_args(q, k, v, mask, dropout_p, **feats)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    out32 = torch.empty(q.shape if return_fp32_out else (0,), dtype=torch.float32, device=q.device)
    res = (out, lse, out32) if return_fp32_out else (out, lse)
    if out.numel() == 0 or B == 0:
        return res
    if decode is None:
        decode = (L <= _DECODE_MAX_L and S >= _DECODE_MIN_S and dropout_p == 0.0 and not return_fp32_out
                  and not args["VARLEN_Q"])
    assert not (decode and dropout_p > 0.0), "the decode (flash-decoding) path is for inference: dropout_p must be 0"
    assert not (decode and return_fp32_out), "the decode (flash-decoding) path does not write an fp32 output"
    assert not (decode and args["VARLEN_Q"]), "the decode (flash-decoding) path takes dense queries"
    launch = dict(args, scale=scale, SEED=_seed_arg(seed, dropout_p, q), causal_off=causal_offset, IS_CAUSAL=is_causal,
                  STORE_O32=return_fp32_out)
    if not decode:
        grid = lambda meta: (triton.cdiv(L, meta["BLOCK_M"]) * B * H, 1, 1)  # noqa: E731
        _attn_fwd[grid](q, k, v, Out=out, Lse=lse, Out32=out32 if return_fp32_out else lse,
                        PartAcc=lse, PartM=lse, PartL=lse, split_size=0, n_splits=1, SPLIT=False, **launch)
        return res
    if split_size is None:
        # Enough splits for ~2 programs per SM; each at least 256 keys so the combine stays cheap.
        want = max(1, (2 * num_sms(q.device)) // (B * H * triton.cdiv(L, 16)))
        split_size = max(256, triton.cdiv(triton.cdiv(S, want), _SPLIT_ALIGN) * _SPLIT_ALIGN)
    assert split_size > 0 and split_size % _SPLIT_ALIGN == 0, \
        f"split_size must be a positive multiple of {_SPLIT_ALIGN}, got {split_size}"
    n_splits = max(1, triton.cdiv(S, split_size))
    part_acc = torch.empty((B * H, n_splits, L, E), dtype=torch.float32, device=q.device)
    part_m = torch.empty((B * H, n_splits, L), dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    grid = lambda meta: (triton.cdiv(L, meta["BLOCK_M"]) * B * H, 1, n_splits)  # noqa: E731
    _attn_fwd[grid](q, k, v, Out=out, Lse=lse, Out32=lse, PartAcc=part_acc, PartM=part_m, PartL=part_l,
                    split_size=split_size, n_splits=n_splits, SPLIT=True, **launch)
    _attn_decode_combine[(triton.cdiv(L, 16) * B * H,)](
        part_acc, part_m, part_l, out, lse, L, E, n_splits, BLOCK_M=16, BLOCK_D=args["BLOCK_D"])
    return res


def attention_backward(do, q, k, v, mask, out, lse, *, scale, is_causal=False, dropout_p=0.0, seed=0,
                       causal_offset=0, window_offset=None, softcap=0.0, alibi_slopes=None, alibi_offset=0,
                       seqlens=None):
    """Gradients of attention_forward (same options; no paged cache). do like q (contiguous last
    dim), out and lse the forward's outputs: for 16-bit inputs pass its fp32 output
    (return_fp32_out=True), from which delta = rowsum(dO * O) is accurate (the 16-bit one works,
    less accurately on sharp attention). Returns (dq like q, dk, dv like k), contiguous, input dtype.
    Reads its inputs only (nothing saved is overwritten); deterministic (no atomics)."""
    (B, H, Hkv, L, S, E), args = _launch_args(q, k, v, mask, dropout_p, window_offset=window_offset, softcap=softcap,
                                              alibi_slopes=alibi_slopes, alibi_offset=alibi_offset, seqlens=seqlens)
    if do.stride(-1) != 1:
        do = do.contiguous()
    out = out.contiguous()
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if dq.numel() == 0 and dk.numel() == 0:
        return dq, dk, dv
    if L == 0 or E == 0 or B == 0 or dq.numel() == 0:  # no query rows (or an empty head dim): every gradient is 0
        return dq.zero_(), dk.zero_(), dv.zero_()
    if args["VARLEN_K"]:  # rows of the k/v views outside every sequence get no gradient from the kernel
        dk.zero_()
        dv.zero_()
    Bq, Lq = q.shape[0], q.shape[2]
    delta = torch.empty((Bq, H, Lq), dtype=torch.float32, device=q.device)
    pre_m = 64 if args["BLOCK_D"] <= 128 else 32
    _attn_bwd_preprocess[(triton.cdiv(Lq, pre_m) * Bq * H,)](
        out, do, delta, do.stride(0), do.stride(1), do.stride(2), H, Lq, E,
        BLOCK_M=pre_m, BLOCK_D=args["BLOCK_D"])
    do_strides = _strides("do", do)
    if args["VARLEN_Q"]:
        do_strides["stride_dob"] = 0
    launch = dict(args, **do_strides, HKV=Hkv, S_TOT=k.shape[2], scale=scale, SEED=_seed_arg(seed, dropout_p, q),
                  causal_off=causal_offset, IS_CAUSAL=is_causal)
    if dk.numel():
        grid = lambda meta: (triton.cdiv(S, meta["BLOCK_N"]) * B * Hkv,)  # noqa: E731
        _attn_bwd_dkdv[grid](q, k, v, DO=do, Lse=lse, Delta=delta, DK=dk, DV=dv, **launch)
    grid = lambda meta: (triton.cdiv(L, meta["BLOCK_M"]) * B * H,)  # noqa: E731
    _attn_bwd_dq[grid](q, k, v, DO=do, Lse=lse, Delta=delta, DQ=dq, **launch)
    return dq, dk, dv


def dropout_mask(shape, seed, dropout_p, device):
    """Test hook: the keep-mask (bool, `shape` = (B, H, L, S), True = kept) that the attention
    kernels draw for (seed, dropout_p), materialised so tests can replay it through the reference."""
    keep = torch.empty(shape, dtype=torch.int8, device=device)
    n = keep.numel()
    if n:
        block = 1024
        seed = int(seed) if isinstance(seed, torch.Tensor) else seed  # a host copy: a test hook
        _dropout_mask_kernel[(triton.cdiv(n, block),)](keep, n, seed, dropout_p, BLOCK=block)
    return keep.bool()


def compile_variants(quick: bool):
    """Call the launchers over every variant that selects different code (dtypes, head dims, causal,
    masks, dropout, GQA, the fp32-output store, decode, and fasttx.flash's window, softcap, ALiBi,
    varlen and paged flags); tools/gpu_compile_check.py compiles them."""
    dtypes = [torch.float16, torch.bfloat16] if quick else [torch.float16, torch.bfloat16, torch.float32]
    head_dims = [64, 128] if quick else [16, 40, 64, 80, 96, 128, 160, 256]

    def r(*shape, dtype):
        return torch.randn(*shape, dtype=dtype)

    for dt in dtypes:
        for e in head_dims:
            q, k, v = r(1, 4, 128, e, dtype=dt), r(1, 2, 192, e, dtype=dt), r(1, 2, 192, e, dtype=dt)
            variants = [dict(), dict(is_causal=True), dict(is_causal=True, causal_offset=64)]
            if not quick or e == 64:
                variants += [
                    dict(mask=torch.rand(1, 1, 128, 192).expand(1, 4, 128, 192) > 0.5),
                    dict(mask=r(1, 4, 128, 192, dtype=dt)),
                    dict(dropout_p=0.1, seed=3),
                ]
            for kw in variants:
                mask = kw.pop("mask", None)
                fp32_out = dt != torch.float32
                out, lse, *out32 = attention_forward(q, k, v, mask, scale=e ** -0.5, return_fp32_out=fp32_out, **kw)
                attention_backward(r(1, 4, 128, e, dtype=dt), q, k, v, mask, out32[0] if fp32_out else out, lse,
                                   scale=e ** -0.5, **kw)
            kd, vd = r(1, 2, 4096, e, dtype=dt), r(1, 2, 4096, e, dtype=dt)
            attention_forward(r(1, 4, 1, e, dtype=dt), kd, vd, None, scale=e ** -0.5, decode=True)
            _compile_flash_variants(r, dt, e, quick)


def _compile_flash_variants(r, dt, e, quick):
    """fasttx.flash's flags: WINDOW, SOFTCAP, ALIBI (fwd + bwd), VARLEN_Q + VARLEN_K (packed, fwd +
    bwd), VARLEN_K alone (kv-cache, dense and decode) and PAGED (forward, plain and decode)."""
    fp32_out = dt != torch.float32
    q, k, v = r(2, 4, 128, e, dtype=dt), r(2, 2, 160, e, dtype=dt), r(2, 2, 160, e, dtype=dt)
    alibi = torch.rand(2, 4)
    variants = [dict(is_causal=True, causal_offset=32, window_offset=-96), dict(softcap=30.0),
                dict(alibi_slopes=alibi, alibi_offset=32)]
    if not quick:
        variants.append(dict(is_causal=True, causal_offset=40, window_offset=-40, softcap=20.0,
                             alibi_slopes=alibi[0], alibi_offset=32, dropout_p=0.1, seed=1))
    for kw in variants:
        out, lse, *o32 = attention_forward(q, k, v, None, scale=e ** -0.5, return_fp32_out=fp32_out, **kw)
        attention_backward(r(2, 4, 128, e, dtype=dt), q, k, v, None, o32[0] if fp32_out else out, lse,
                           scale=e ** -0.5, **kw)
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
    qp, kp, vp = r(1, 4, 200, e, dtype=dt), r(1, 2, 230, e, dtype=dt), r(1, 2, 230, e, dtype=dt)
    seq = Seqlens(i32([0, 1, 200]), i32([0, 30]), i32([30, 200]), 199, 200)
    out, lse, *o32 = attention_forward(qp, kp, vp, None, scale=e ** -0.5, seqlens=seq, is_causal=True,
                                       window_offset=-64, return_fp32_out=fp32_out)
    attention_backward(r(1, 4, 200, e, dtype=dt), qp, kp, vp, None, o32[0] if fp32_out else out, lse,
                       scale=e ** -0.5, seqlens=seq, is_causal=True, window_offset=-64)
    kc, vc = r(1, 2, 4 * 1024, e, dtype=dt), r(1, 2, 4 * 1024, e, dtype=dt)  # 4 cache rows (or pages) of 1024
    cache = Seqlens(None, i32([0, 2048]), i32([700, 1024]), 1, 1024)
    table = i32([[3], [1]])
    for L, decode in ((1, True), (16, False)):
        qd = r(2, 4, L, e, dtype=dt)
        attention_forward(qd, kc, vc, None, scale=e ** -0.5, seqlens=cache, decode=decode, is_causal=True)
        paged = Seqlens(None, i32([0, 0]), i32([700, 1024]), 1, 1024)
        attention_forward(qd, kc, vc, None, scale=e ** -0.5, seqlens=paged, decode=decode, block_table=table,
                          page_size=1024)


__all__ = ["attention_forward", "attention_backward", "Seqlens", "dropout_mask", "compile_variants", "MAX_HEAD_DIM"]
