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
gives a NaN row.

Numerics: scores, softmax statistics and accumulators in fp32; the output is cast at the store.
tl.dot precision: fp16/bf16 operands on GPU (fp32 accumulate); fp32 inputs use
input_precision="ieee" (exact fp32, no TF32), matching torch's default for fp32 SDPA. Under the
Triton interpreter 16-bit operands are upcast to fp32 before tl.dot (the interpreter's bf16 dot
returns garbage); the interpreter's dot is exact fp32.

Dropout: Philox keep-mask kernels._math.dropout_keep(seed, 0, idx, p) with idx the flattened
int64 index b*H*L*S + h*L*S + i*S + j of the (B, H, L, S) probability matrix; the backward
regenerates it from the same seed; it is never stored. `dropout_mask` materialises it for tests.
"""
import os

import torch
import triton
import triton.language as tl

from ._math import dropout_keep

# Set when the kernels run through the Triton interpreter (TRITON_INTERPRET=1, read once, like
# triton itself does at import): a single config (autotune with several fails there) and 16-bit
# tl.dot operands upcast to fp32.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# ------------------------------------------------------------------------------------------------
# GPU configuration. Autotuned per (head-dim block, causal, mask, split, L bucket, S bucket) and
# per input dtype (the autotuner adds every tensor argument's dtype to the key).
# (BLOCK_M, BLOCK_N, num_warps, num_stages). Every BLOCK_N divides _SPLIT_ALIGN, so a flash-decoding
# split of a multiple of _SPLIT_ALIGN keys is a whole number of key blocks whatever config wins.
# ------------------------------------------------------------------------------------------------
_FWD_GPU = [
    (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4),
    (64, 64, 4, 3), (64, 128, 4, 3), (64, 32, 4, 4), (64, 64, 4, 2),
    (16, 64, 4, 3), (16, 128, 4, 3), (16, 32, 4, 4), (16, 64, 4, 2),
]
_BWD_GPU = [  # dK/dV kernel: BLOCK_N key rows resident, BLOCK_M query rows streamed (dQ: swapped)
    (64, 128, 8, 2), (64, 64, 4, 3), (32, 128, 4, 2), (32, 64, 4, 3),
    (64, 64, 8, 2), (32, 32, 4, 3), (16, 64, 4, 2), (16, 32, 4, 2),
]
_INTERP = [(32, 32, 4, 1)]  # one config; 32 keeps several blocks per test shape (loops, diagonals)
_SPLIT_ALIGN = 32 if _INTERPRET else 128

# Flash-decoding (split the keys across programs, combine partials) is used when the queries are
# few and the keys many: L <= _DECODE_MAX_L and S >= _DECODE_MIN_S, without dropout (inference).
_DECODE_MAX_L = 16
_DECODE_MIN_S = 512


def _configs(table):
    rows = _INTERP if _INTERPRET else table
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in rows]


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
    return kept or [triton.Config({"BLOCK_M": 16 if short_l else 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]


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
    return kept or [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)]


_KEY = ["BLOCK_D", "IS_CAUSAL", "HAS_MASK", "HAS_DROPOUT", "L_BUCKET", "S_BUCKET"]


@triton.jit
def _block_and_head(n_rows, BLOCK: tl.constexpr):
    """(row-block index, batch*head index) of this program. Both live on grid axis 0, which allows
    2^31 - 1 programs (axes 1 and 2 only 65535, too few for batch x heads in large-batch
    inference); the row blocks of one head are adjacent, so they share that head's K/V in L2."""
    n_blocks = tl.cdiv(n_rows, BLOCK)
    pid = tl.program_id(0)
    return pid % n_blocks, pid // n_blocks


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_block_loop(
    acc, l_i, m_i, q,                    # running (BLOCK_M, BLOCK_D) output, row sum, row max; q tile
    k_base, v_base, mask_base,           # pointers at this (batch, head)
    stride_kn, stride_vn, stride_mm, stride_mn,
    offs_m, offs_d, lo, hi,              # rows of this block; keys [lo, hi) (lo a multiple of BLOCK_N)
    L, E, scale, drop_p, drop_scale, seed, drop_row,  # drop_row: (BLOCK_M,) int64 index of (i, j=0)
    CAUSAL_DIAG: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Online softmax: with m the running max and l = sum exp(s - m), a new block with max m' gives
    # l' = l exp(m - m') + sum exp(s_new - m'), acc' = acc exp(m - m') + exp(s_new - m') V_new.
    # While every score so far is -inf, m' = -inf; exponentiating against 0 instead keeps p and the
    # rescale factor at exactly 0 (exp(-inf - -inf) would be NaN).
    m_ok = offs_m < L
    d_ok = offs_d < E
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        kv_off = offs_n[:, None].to(tl.int64)
        k = tl.load(k_base + kv_off * stride_kn + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_base + kv_off * stride_vn + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale  # (BLOCK_M, BLOCK_N) fp32
        valid = m_ok[:, None] & n_ok[None, :]
        if HAS_MASK:
            mval = tl.load(mask_base + offs_m[:, None].to(tl.int64) * stride_mm
                           + offs_n[None, :].to(tl.int64) * stride_mn, mask=valid, other=0)
            if MASK_BOOL:
                valid = valid & (mval != 0)
            else:
                s = s + mval.to(tl.float32)
        if CAUSAL_DIAG:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
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


@triton.autotune(configs=_configs(_FWD_GPU), key=_KEY + ["SPLIT"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _attn_fwd(
    Q, K, V, Mask,                       # inputs (see the module docstring for layouts)
    Out, Lse,                            # (B, H, L, E) input dtype, (B, H, L) fp32; unused when SPLIT
    PartAcc, PartM, PartL,               # SPLIT: (B*H, n_splits, L, E), (B*H, n_splits, L) x2, fp32
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    H, GROUPS, L, S, E,                  # query heads, query heads per kv head, sizes
    scale, drop_p, drop_scale, seed,     # softmax scale; dropout p, 1/(1-p) (0 when p == 1), Philox seed
    split_size, n_splits,                # SPLIT: keys per program (a multiple of BLOCK_N), programs per row
    L_BUCKET, S_BUCKET,                  # autotune key only
    BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m, pid_bh = _block_and_head(L, BLOCK_M)
    pid_s = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUPS  # the shared kv head (GQA/MQA)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    d_ok = offs_d < E

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    mask_base = Mask + b * stride_mb + h * stride_mh
    drop_row = ((b * H + h) * L + offs_m.to(tl.int64)) * S

    lo = 0
    hi = S
    if SPLIT:
        lo = pid_s * split_size
        hi = tl.minimum(S, lo + split_size)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if IS_CAUSAL:
        # Keys j <= i only: nothing past the block's last row; key blocks wholly at or below the
        # diagonal (n0 + BLOCK_N - 1 <= m0) need no causal mask, the rest (the diagonal) do.
        hi = tl.minimum(hi, m0 + BLOCK_M)
        full_end = tl.maximum(lo, tl.minimum(hi, ((m0 + 1) // BLOCK_N) * BLOCK_N))
        acc, l_i, m_i = _fwd_block_loop(
            acc, l_i, m_i, q, k_base, v_base, mask_base, stride_kn, stride_vn, stride_mm, stride_mn,
            offs_m, offs_d, lo, full_end, L, E, scale, drop_p, drop_scale, seed, drop_row,
            False, HAS_MASK, MASK_BOOL, HAS_DROPOUT, UPCAST, DOT_PREC, BLOCK_N)
        acc, l_i, m_i = _fwd_block_loop(
            acc, l_i, m_i, q, k_base, v_base, mask_base, stride_kn, stride_vn, stride_mm, stride_mn,
            offs_m, offs_d, full_end, hi, L, E, scale, drop_p, drop_scale, seed, drop_row,
            True, HAS_MASK, MASK_BOOL, HAS_DROPOUT, UPCAST, DOT_PREC, BLOCK_N)
    else:
        acc, l_i, m_i = _fwd_block_loop(
            acc, l_i, m_i, q, k_base, v_base, mask_base, stride_kn, stride_vn, stride_mm, stride_mn,
            offs_m, offs_d, lo, hi, L, E, scale, drop_p, drop_scale, seed, drop_row,
            False, HAS_MASK, MASK_BOOL, HAS_DROPOUT, UPCAST, DOT_PREC, BLOCK_N)

    if SPLIT:
        # Unnormalised partials; _attn_decode_combine merges the n_splits of each row.
        part = (pid_bh.to(tl.int64) * n_splits + pid_s) * L + offs_m
        tl.store(PartAcc + part[:, None] * E + offs_d[None, :], acc, mask=m_ok[:, None] & d_ok[None, :])
        tl.store(PartM + part, m_i, mask=m_ok)
        tl.store(PartL + part, l_i, mask=m_ok)
    else:
        # A fully masked row has l = 0 and acc = 0: output 0, lse = log 0 = -inf.
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        out = acc / l_safe[:, None]
        lse = tl.where(empty, float("-inf"), m_i + tl.log(l_safe))
        row = pid_bh.to(tl.int64) * L + offs_m
        tl.store(Out + row[:, None] * E + offs_d[None, :], out.to(Out.dtype.element_ty),
                 mask=m_ok[:, None] & d_ok[None, :])
        tl.store(Lse + row, lse, mask=m_ok)


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
# dK/dV: one program per (key block, kv head) loops over the query blocks of every query head of
# its group; dQ: one program per (query block, head) loops over key blocks. Each gradient element
# is summed by exactly one program in a fixed order: no atomics, bit-identical reruns.
# ------------------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_preprocess(
    Out, DO, Delta,                      # (B, H, L, E) contiguous; dO strided; (B, H, L) fp32 out
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
    dk, dv, k, v,                        # (BLOCK_N, BLOCK_D) fp32 accumulators; this block's k, v
    q_base, do_base, lse_ptr, delta_ptr, mask_base,
    stride_qm, stride_dom, stride_mm, stride_mn,
    offs_n, offs_d, lo, hi,              # keys of this block; query rows [lo, hi)
    L, S, E, scale, drop_p, drop_scale, seed, drop_base,  # drop_base: int64 index of (b, h, 0, 0)
    CAUSAL_DIAG: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # Works on transposed tiles (keys x queries) so dK and dV accumulate without transposes.
    n_ok = offs_n < S
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
        sT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * scale  # (BLOCK_N, BLOCK_M)
        valid = n_ok[:, None] & m_ok[None, :]
        if HAS_MASK:
            mval = tl.load(mask_base + offs_m[None, :].to(tl.int64) * stride_mm
                           + offs_n[:, None].to(tl.int64) * stride_mn, mask=valid, other=0)
            if MASK_BOOL:
                valid = valid & (mval != 0)
            else:
                sT = sT + mval.to(tl.float32)
        if CAUSAL_DIAG:
            valid = valid & (offs_n[:, None] <= offs_m[None, :])
        sT = tl.where(valid, sT, float("-inf"))
        pT = tl.exp(sT - lse[None, :])
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # dZ^T
        if HAS_DROPOUT:
            idx = drop_base + offs_m[None, :].to(tl.int64) * S + offs_n[:, None].to(tl.int64)  # (i, j) of P^T
            keep = dropout_keep(seed, 0, idx, drop_p)
            zT = tl.where(keep, pT * drop_scale, 0.0)
            dpT = tl.where(keep, dpT * drop_scale, 0.0)
        else:
            zT = pT
        dv += tl.dot(zT.to(do.dtype), do, input_precision=DOT_PREC)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PREC)
    return dk, dv


@triton.autotune(configs=_configs(_BWD_GPU), key=_KEY, prune_configs_by={"early_config_prune": _prune_bwd})
@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, Mask, DO, Lse, Delta,       # Lse, Delta (B, H, L) fp32 contiguous
    DK, DV,                              # (B, Hkv, S, E) contiguous outputs
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dom,
    H, HKV, GROUPS, L, S, E,
    scale, drop_p, drop_scale, seed,
    L_BUCKET, S_BUCKET,
    BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n, pid_bk = _block_and_head(S, BLOCK_N)
    b = (pid_bk // HKV).to(tl.int64)
    hk = (pid_bk % HKV).to(tl.int64)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_ok = (offs_n[:, None] < S) & (offs_d[None, :] < E)
    kv_off = offs_n[:, None].to(tl.int64)
    k = tl.load(K + b * stride_kb + hk * stride_kh + kv_off * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + kv_off * stride_vn + offs_d[None, :], mask=kv_ok, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, GROUPS):
        h = hk * GROUPS + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_ptr = Lse + (b * H + h) * L
        delta_ptr = Delta + (b * H + h) * L
        mask_base = Mask + b * stride_mb + h * stride_mh
        drop_base = (b * H + h) * L * S
        if IS_CAUSAL:
            # Query rows i < n0 see none of these keys; query blocks from the first with
            # m0 >= n0 + BLOCK_N - 1 see all of them (no causal mask); in between, the diagonal.
            lo = (n0 // BLOCK_M) * BLOCK_M
            full_start = tl.maximum(lo, tl.minimum(L, tl.cdiv(n0 + BLOCK_N - 1, BLOCK_M) * BLOCK_M))
            dk, dv = _dkdv_block_loop(
                dk, dv, k, v, q_base, do_base, lse_ptr, delta_ptr, mask_base,
                stride_qm, stride_dom, stride_mm, stride_mn, offs_n, offs_d, lo, full_start,
                L, S, E, scale, drop_p, drop_scale, seed, drop_base,
                True, HAS_MASK, MASK_BOOL, HAS_DROPOUT, UPCAST, DOT_PREC, BLOCK_M)
            dk, dv = _dkdv_block_loop(
                dk, dv, k, v, q_base, do_base, lse_ptr, delta_ptr, mask_base,
                stride_qm, stride_dom, stride_mm, stride_mn, offs_n, offs_d, full_start, L,
                L, S, E, scale, drop_p, drop_scale, seed, drop_base,
                False, HAS_MASK, MASK_BOOL, HAS_DROPOUT, UPCAST, DOT_PREC, BLOCK_M)
        else:
            dk, dv = _dkdv_block_loop(
                dk, dv, k, v, q_base, do_base, lse_ptr, delta_ptr, mask_base,
                stride_qm, stride_dom, stride_mm, stride_mn, offs_n, offs_d, 0, L,
                L, S, E, scale, drop_p, drop_scale, seed, drop_base,
                False, HAS_MASK, MASK_BOOL, HAS_DROPOUT, UPCAST, DOT_PREC, BLOCK_M)
    out = ((b * HKV + hk) * S + offs_n)[:, None] * E + offs_d[None, :]
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit
def _dq_block_loop(
    dq, q, do, lse, delta,               # (BLOCK_M, BLOCK_D) fp32 accumulator; this block's tiles
    k_base, v_base, mask_base,
    stride_kn, stride_vn, stride_mm, stride_mn,
    offs_m, offs_d, lo, hi,              # rows of this block; keys [lo, hi)
    L, S, E, scale, drop_p, drop_scale, seed, drop_row,
    CAUSAL_DIAG: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    m_ok = offs_m < L
    d_ok = offs_d < E
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < S
        kv_off = offs_n[:, None].to(tl.int64)
        k = tl.load(k_base + kv_off * stride_kn + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_base + kv_off * stride_vn + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale
        valid = m_ok[:, None] & n_ok[None, :]
        if HAS_MASK:
            mval = tl.load(mask_base + offs_m[:, None].to(tl.int64) * stride_mm
                           + offs_n[None, :].to(tl.int64) * stride_mn, mask=valid, other=0)
            if MASK_BOOL:
                valid = valid & (mval != 0)
            else:
                s = s + mval.to(tl.float32)
        if CAUSAL_DIAG:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
        p = tl.exp(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, 0, drop_row[:, None] + offs_n[None, :].to(tl.int64), drop_p)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


@triton.autotune(configs=_configs(_BWD_GPU), key=_KEY, prune_configs_by={"early_config_prune": _prune_bwd})
@triton.jit
def _attn_bwd_dq(
    Q, K, V, Mask, DO, Lse, Delta,
    DQ,                                  # (B, H, L, E) contiguous output
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dom,
    H, GROUPS, L, S, E,
    scale, drop_p, drop_scale, seed,
    L_BUCKET, S_BUCKET,
    BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # BLOCK_N here plays the role of the streamed key block; the tables are shared with dK/dV.
    pid_m, pid_bh = _block_and_head(L, BLOCK_M)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUPS
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    ok = m_ok[:, None] & (offs_d[None, :] < E)
    row_off = offs_m[:, None].to(tl.int64)
    q = tl.load(Q + b * stride_qb + h * stride_qh + row_off * stride_qm + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + row_off * stride_dom + offs_d[None, :], mask=ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row = (b * H + h) * L + offs_m
    lse = tl.load(Lse + row, mask=m_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(Delta + row, mask=m_ok, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    mask_base = Mask + b * stride_mb + h * stride_mh
    drop_row = row * S
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if IS_CAUSAL:
        hi = tl.minimum(S, m0 + BLOCK_M)
        full_end = tl.minimum(hi, ((m0 + 1) // BLOCK_N) * BLOCK_N)
        dq = _dq_block_loop(
            dq, q, do, lse, delta, k_base, v_base, mask_base, stride_kn, stride_vn, stride_mm, stride_mn,
            offs_m, offs_d, 0, full_end, L, S, E, scale, drop_p, drop_scale, seed, drop_row,
            False, HAS_MASK, MASK_BOOL, HAS_DROPOUT, UPCAST, DOT_PREC, BLOCK_N)
        dq = _dq_block_loop(
            dq, q, do, lse, delta, k_base, v_base, mask_base, stride_kn, stride_vn, stride_mm, stride_mn,
            offs_m, offs_d, full_end, hi, L, S, E, scale, drop_p, drop_scale, seed, drop_row,
            True, HAS_MASK, MASK_BOOL, HAS_DROPOUT, UPCAST, DOT_PREC, BLOCK_N)
    else:
        dq = _dq_block_loop(
            dq, q, do, lse, delta, k_base, v_base, mask_base, stride_kn, stride_vn, stride_mm, stride_mn,
            offs_m, offs_d, 0, S, L, S, E, scale, drop_p, drop_scale, seed, drop_row,
            False, HAS_MASK, MASK_BOOL, HAS_DROPOUT, UPCAST, DOT_PREC, BLOCK_N)
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


def _common(q, k, v, mask, dropout_p):
    """Checks and the constexpr flags shared by the forward and backward launchers."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("attention launchers take q (B, H, L, E), k and v (B, Hkv, S, E)")
    B, H, L, E = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != E or H % Hkv != 0:
        raise ValueError(f"bad attention shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError("q, k, v must share one dtype among float16, bfloat16, float32; "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if E > MAX_HEAD_DIM:
        raise ValueError(f"head dim E={E} exceeds the kernel's limit of {MAX_HEAD_DIM}")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError("q, k, v need a contiguous last dim (stride 1)")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {dropout_p}")
    if mask is not None:
        if mask.shape != (B, H, L, S):
            raise ValueError(f"mask must be expanded to (B, H, L, S) = {(B, H, L, S)}, got {tuple(mask.shape)}")
        if mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)  # same bytes; keeps stride-0 dims
    flags = dict(
        BLOCK_D=max(16, triton.next_power_of_2(E)),
        HAS_MASK=mask is not None,
        MASK_BOOL=mask is not None and mask.dtype == torch.uint8,
        HAS_DROPOUT=dropout_p > 0.0,
        UPCAST=_INTERPRET and q.dtype != torch.float32,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",  # tf32 is ignored for 16-bit operands
    )
    mstrides = mask.stride() if mask is not None else (0, 0, 0, 0)
    mask_arg = mask if mask is not None else q  # never read when HAS_MASK is False
    drop_scale = 1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0  # p == 1 drops everything
    return B, H, Hkv, L, S, E, mask_arg, mstrides, flags, drop_scale


def _buckets(L, S):
    return triton.next_power_of_2(max(L, 1)), triton.next_power_of_2(max(S, 1))


def _n_sms(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def attention_forward(q, k, v, mask=None, *, scale, is_causal=False, dropout_p=0.0, seed=0,
                      decode=None, split_size=None, return_mask=False):
    """Fused attention forward.

    q (B, H, L, E), k, v (B, Hkv, S, E) with a contiguous last dim, H % Hkv == 0; mask None or
    (B, H, L, S) bool/float (any strides, stride 0 for broadcast dims). Returns
    (out (B, H, L, E) in q's dtype contiguous, lse (B, H, L) fp32: the row logsumexp of the scaled,
    biased scores, -inf for fully masked rows).

    decode: None picks flash-decoding when L <= 16, S >= 512 and no dropout; True/False forces it
    (dropout must be 0). split_size: keys per program in decode mode, a multiple of _SPLIT_ALIGN
    (default: enough splits to fill the GPU twice over).
    return_mask: test hook, also return the dropout keep-mask (B, H, L, S) bool that was applied.
    """
    if return_mask:
        out, lse = attention_forward(q, k, v, mask, scale=scale, is_causal=is_causal, dropout_p=dropout_p,
                                     seed=seed, decode=decode, split_size=split_size)
        shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        return out, lse, dropout_mask(shape, seed, dropout_p, q.device)
    B, H, Hkv, L, S, E, mask_arg, ms, flags, drop_scale = _common(q, k, v, mask, dropout_p)
    out = torch.empty((B, H, L, E), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if decode is None:
        decode = L <= _DECODE_MAX_L and S >= _DECODE_MIN_S and dropout_p == 0.0
    if decode and dropout_p > 0.0:
        raise ValueError("the decode (flash-decoding) path is for inference: dropout_p must be 0")
    lb, sb = _buckets(L, S)
    common = (
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        *ms,
        H, H // Hkv, L, S, E,
        scale, dropout_p, drop_scale, seed,
    )
    if not decode:
        grid = lambda meta: (triton.cdiv(L, meta["BLOCK_M"]) * B * H, 1, 1)  # noqa: E731
        _attn_fwd[grid](q, k, v, mask_arg, out, lse, lse, lse, lse, *common, 0, 1, lb, sb,
                        IS_CAUSAL=is_causal, SPLIT=False, **flags)
        return out, lse
    if split_size is None:
        # Enough splits for ~2 programs per SM; each at least 256 keys so the combine stays cheap.
        want = max(1, (2 * _n_sms(q.device)) // (B * H * triton.cdiv(L, 16)))
        split_size = max(256, triton.cdiv(triton.cdiv(S, want), _SPLIT_ALIGN) * _SPLIT_ALIGN)
    if split_size <= 0 or split_size % _SPLIT_ALIGN:
        raise ValueError(f"split_size must be a positive multiple of {_SPLIT_ALIGN}, got {split_size}")
    n_splits = max(1, triton.cdiv(S, split_size))
    part_acc = torch.empty((B * H, n_splits, L, E), dtype=torch.float32, device=q.device)
    part_m = torch.empty((B * H, n_splits, L), dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    grid = lambda meta: (triton.cdiv(L, meta["BLOCK_M"]) * B * H, 1, n_splits)  # noqa: E731
    _attn_fwd[grid](q, k, v, mask_arg, out, lse, part_acc, part_m, part_l, *common, split_size, n_splits,
                    lb, sb, IS_CAUSAL=is_causal, SPLIT=True, **flags)
    _attn_decode_combine[(triton.cdiv(L, 16) * B * H,)](
        part_acc, part_m, part_l, out, lse, L, E, n_splits, BLOCK_M=16, BLOCK_D=flags["BLOCK_D"])
    return out, lse


def attention_backward(do, q, k, v, mask, out, lse, *, scale, is_causal=False, dropout_p=0.0, seed=0):
    """Gradients of attention_forward. do (B, H, L, E) (contiguous last dim), out and lse the
    forward's outputs. Returns (dq (B, H, L, E), dk, dv (B, Hkv, S, E)), contiguous, input dtype.
    Reads its inputs only (nothing saved is overwritten); deterministic (no atomics)."""
    B, H, Hkv, L, S, E, mask_arg, ms, flags, drop_scale = _common(q, k, v, mask, dropout_p)
    if do.stride(-1) != 1:
        do = do.contiguous()
    dq = torch.empty((B, H, L, E), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Hkv, S, E), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, Hkv, S, E), dtype=v.dtype, device=v.device)
    if dq.numel() == 0 and dk.numel() == 0:
        return dq, dk, dv
    if L == 0 or E == 0:  # no query rows (or an empty head dim): every gradient is 0
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    pre_m = 64 if flags["BLOCK_D"] <= 128 else 32
    _attn_bwd_preprocess[(triton.cdiv(L, pre_m) * B * H,)](
        out, do, delta, do.stride(0), do.stride(1), do.stride(2), H, L, E,
        BLOCK_M=pre_m, BLOCK_D=flags["BLOCK_D"])
    lb, sb = _buckets(L, S)
    strides = (
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        *ms,
        do.stride(0), do.stride(1), do.stride(2),
    )
    tail = (scale, dropout_p, drop_scale, seed, lb, sb)
    if dk.numel():
        grid = lambda meta: (triton.cdiv(S, meta["BLOCK_N"]) * B * Hkv,)  # noqa: E731
        _attn_bwd_dkdv[grid](q, k, v, mask_arg, do, lse, delta, dk, dv, *strides,
                             H, Hkv, H // Hkv, L, S, E, *tail, IS_CAUSAL=is_causal, **flags)
    grid = lambda meta: (triton.cdiv(L, meta["BLOCK_M"]) * B * H,)  # noqa: E731
    _attn_bwd_dq[grid](q, k, v, mask_arg, do, lse, delta, dq, *strides,
                       H, H // Hkv, L, S, E, *tail, IS_CAUSAL=is_causal, **flags)
    return dq, dk, dv


def dropout_mask(shape, seed, dropout_p, device):
    """Test hook: the keep-mask (bool, `shape` = (B, H, L, S), True = kept) that the attention
    kernels draw for (seed, dropout_p), materialised so tests can replay it through the reference."""
    keep = torch.empty(shape, dtype=torch.int8, device=device)
    n = keep.numel()
    if n:
        block = 1024
        _dropout_mask_kernel[(triton.cdiv(n, block),)](keep, n, seed, dropout_p, BLOCK=block)
    return keep.bool()


__all__ = ["attention_forward", "attention_backward", "dropout_mask", "MAX_HEAD_DIM"]
