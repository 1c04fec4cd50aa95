"""Attention backward kernels: the delta preprocess, dK/dV (one program per key block and kv head,
which also accumulates dQ unless DQ_MODE is DQ_KERNEL) and dQ (one program per query block and
head; DQ_KERNEL mode only). Launched by launch.attention_backward. With USE_TMA (config._use_tma)
the tiles a kernel streams (Q and dO past dK/dV's resident K/V, K and V past dQ's resident Q/dO)
come through tensor descriptors (tiles._row_descriptors); the resident tiles, lse, delta and the dQ
adds stay pointer accesses."""
import triton
import triton.language as tl

from .._math import dropout_keep
from .config import _BWD_TABLE, _KEY, DQ_ATOMIC, DQ_KERNEL, _configs, _prune_bwd
from .tiles import (_alibi_slope, _block_and_head, _head_row0, _key_range, _load_kv, _load_rows_desc, _prologue,
                    _row_descriptors, _scores)


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
# Attention sinks (SINK in the forward): row i's denominator also holds exp(s_h), a per-head logit
# with no value row, so P_ij = exp(S_ij - lse_i) with lse_i = log(sum_j exp(S_ij) + exp(s_h)).
# Nothing above changes (the sink has no dP; delta_i = dO_i . O_i still), and with
# P_sink_i = exp(s_h - lse_i), dP_ik/ds_h = -P_ik P_sink_i gives
#   ds_h = sum_i sum_k dP_ik (-P_ik P_sink_i) = -sum_i P_sink_i delta_i   (over h's rows, every batch)
# which launch.attention_backward sums from lse and delta in a fixed order (no atomics).
# P is recomputed as exp(S - lse) from the saved fp32 row logsumexp. A fully masked row has
# lse = -inf; it is read as +inf so that every P_ij = exp(S_ij - inf) = 0 there (zero gradients).
#
# delta needs O in fp32. On sharp attention (one P_ij close to 1, common in trained models)
# dP_ij and delta_i nearly cancel in dS_ij; a delta from the 16-bit rounded O carries an error
# ~2^-8 |dO_i| |O_i| (bf16) that survives the cancellation and dominated dQ and dK (errors ~1000x
# torch's). So for 16-bit inputs the forward also writes its fp32 O and the preprocess reads that.
#
# dK/dV: one program per (key block, kv head) loops over the query blocks of every query head of
# its group. dQ (DQ_MODE, config.py):
#   DQ_ORDERED (default): the same program adds scale dS K of each query block it visits into an
#     fp32 dQ; the key blocks that see a query block form a contiguous range [first, last], and
#     key block n adds its part only once the block's counter says n - first parts are in
#     (a spin lock on an int32 per (batch, head, query block)), so dQ is summed in key-block order:
#     bit-identical reruns with 5 tile GEMMs (S, dP, dV, dK, dQ) instead of 7. Programs only
#     wait for lower key blocks of their own head, which the GPU dispatches first: no deadlock.
#   DQ_ATOMIC: the same adds as fp32 atomics (5 GEMMs, no waiting, not bit-reproducible).
#   DQ_KERNEL: a second kernel, one program per (query block, head), recomputes S and dP over the
#     key blocks (7 GEMMs); no shared accumulator at all.
# ------------------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_preprocess(
    Out, DO, Delta,                      # (B, H, L, E) contiguous (any float dtype); dO strided; (B, H, L) fp32 out
                                         # (E here is the output's head dim: v's, EV)
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
    dk, dv,                              # (BLOCK_N, BLOCK_D), (BLOCK_N, BLOCK_DV) fp32 accumulators
    k, v, offs_n, offs_d, offs_dv,       # this block's key and value tiles, its keys, the q/k and v head-dim columns
    lo, hi,                              # query blocks [lo, hi), lo a multiple of BLOCK_M
    q_base, do_base, stride_qm, stride_dom,  # this head's first query row; USE_TMA: Q/dO tensor descriptors
    lse_ptr, delta_ptr,                  # this (batch, head)'s rows of lse and delta
    mask_base, stride_mm, stride_mn,
    L, S, E, EV, scale, causal_off, left_off, alibi_off, slope, softcap,
    drop_base, drop_stride, drop_p, drop_scale, seed,  # dropout index of (i, j): drop_base + i * drop_stride + j
    dq_base, lock_base, pid_n,           # this (batch, head)'s fp32 dQ rows and query-block counters; key block
    DIAG: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, DQ_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr,
):
    # Works on transposed tiles (keys x queries) so dK and dV accumulate without transposes.
    d_ok = offs_d < E
    dv_ok = offs_dv < EV
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < L
        row_off = offs_m[:, None].to(tl.int64)
        if USE_TMA:
            q, do = _load_rows_desc(q_base, do_base, start_m, UPCAST)
        else:
            q = tl.load(q_base + row_off * stride_qm + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :],
                        other=0.0)
            do = tl.load(do_base + row_off * stride_dom + offs_dv[None, :], mask=m_ok[:, None] & dv_ok[None, :],
                         other=0.0)
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
        if DQ_MODE != DQ_KERNEL:
            dq = tl.dot(tl.trans(dsT.to(k.dtype)), k, input_precision=DOT_PREC) * scale
            dq_ptrs = dq_base + row_off * E + offs_d[None, :]
            dq_ok = m_ok[:, None] & d_ok[None, :]
            if DQ_MODE == DQ_ATOMIC:
                tl.atomic_add(dq_ptrs, dq, mask=dq_ok, sem="relaxed")
            else:
                # The first key block that visits this query block is where the dQ kernel's key
                # range starts (this loop's hi(n) is its inverse).
                first = _key_range(start_m, 0, S, causal_off, left_off, False, WINDOW, BLOCK_M, BLOCK_N)[0]
                _ordered_add(dq_ptrs, dq, dq_ok, lock_base + start_m // BLOCK_M, pid_n - first // BLOCK_N)
    return dk, dv


@triton.jit
def _ordered_add(ptrs, val, ok, lock, rank):
    """ptrs += val once the int32 at lock equals rank (the parts before this one are in); then
    lock = rank + 1. Loads bypass L1 (.cg): an earlier part was stored from another SM."""
    while tl.atomic_cas(lock, rank, rank, sem="acquire") != rank:
        pass
    acc = tl.load(ptrs, mask=ok, other=0.0, cache_modifier=".cg")
    tl.store(ptrs, acc + val, mask=ok)
    tl.debug_barrier()  # every thread's store is issued before the release
    tl.atomic_xchg(lock, rank + 1, sem="release")


@triton.autotune(configs=_configs(_BWD_TABLE), key=[*_KEY, "DQ_MODE", "USE_TMA"],
                 prune_configs_by={"early_config_prune": _prune_bwd},
                 reset_to_zero=["DQ", "Locks"])  # each benchmark run accumulates dQ from zero
@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, Mask, DO, Lse, Delta,       # Lse, Delta (B, H, L) fp32 contiguous
    DK, DV,                              # (B, Hkv, S, E), (B, Hkv, S, EV) contiguous ((1, Hkv, total_k, *) if VARLEN_K)
    DQ, Locks,                           # DQ_MODE != DQ_KERNEL: fp32 dQ like q; int32 (B * H, lock_stride); zeroed
    CuQ, KStart, KLen, BlockTable, Alibi,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dom,
    stride_ab, stride_btb,
    H, HKV, GROUPS, L, S, E, EV, L_TOT, S_TOT,
    scale, drop_p, drop_scale, SEED, causal_off, left_off, alibi_off, softcap, page_size, lock_stride,
    L_BUCKET, S_BUCKET,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    VARLEN_Q: tl.constexpr, VARLEN_K: tl.constexpr, PAGED: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, DQ_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr = False,       # the streamed Q/dO tiles through tensor descriptors (the copy engine)
):
    pid_n, pid_bk = _block_and_head(S, BLOCK_N)
    b = (pid_bk // HKV).to(tl.int64)
    hk = (pid_bk % HKV).to(tl.int64)
    seed, q0, Lb, k0, Sb, causal_off, left_off, alibi_off = _prologue(
        SEED, CuQ, KStart, KLen, b, L, S, causal_off, left_off, alibi_off, HAS_DROPOUT, VARLEN_Q, VARLEN_K)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_ok = offs_n[:, None] < Sb
    kv_off = (k0 + offs_n[:, None]).to(tl.int64)
    k, v = _load_kv(K + b * stride_kb + hk * stride_kh, V + b * stride_vb + hk * stride_vh, kv_off, n_ok, offs_d,
                    offs_dv, E, EV, stride_kn, stride_vn, UPCAST)
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
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for g in range(0, GROUPS):
        h = hk * GROUPS + g
        row0 = _head_row0(b, h, H, L_TOT, q0, VARLEN_Q)
        slope = _alibi_slope(Alibi, b, stride_ab, h, ALIBI)
        q_base = Q + b * stride_qb + h * stride_qh + q0 * stride_qm
        do_base = DO + b * stride_dob + h * stride_doh + q0 * stride_dom
        if USE_TMA:  # over head h's Lb query rows of sequence b
            q_base, do_base = _row_descriptors(q_base, do_base, Lb, E, EV, stride_qm, stride_dom, BLOCK_M, BLOCK_D,
                                               BLOCK_DV)
        for diag in tl.static_range(2 if IS_CAUSAL else 1):  # the full blocks first, then the diagonal
            dk, dv = _dkdv_block_loop(
                dk, dv, k, v, offs_n, offs_d, offs_dv,
                lo=mid if diag == 0 else lo, hi=hi if diag == 0 else mid,
                q_base=q_base, do_base=do_base,
                stride_qm=stride_qm, stride_dom=stride_dom,
                lse_ptr=Lse + row0, delta_ptr=Delta + row0,
                mask_base=Mask + b * stride_mb + h * stride_mh, stride_mm=stride_mm, stride_mn=stride_mn,
                L=Lb, S=Sb, E=E, EV=EV, scale=scale, causal_off=causal_off, left_off=left_off, alibi_off=alibi_off,
                slope=slope, softcap=softcap,
                drop_base=row0 * S, drop_stride=S, drop_p=drop_p, drop_scale=drop_scale, seed=seed,
                dq_base=DQ + row0 * E, lock_base=Locks + (b * H + h) * lock_stride, pid_n=pid_n,
                DIAG=diag == 1, HAS_MASK=HAS_MASK, MASK_BOOL=MASK_BOOL, HAS_DROPOUT=HAS_DROPOUT,
                WINDOW=WINDOW, SOFTCAP=SOFTCAP, ALIBI=ALIBI,
                UPCAST=UPCAST, DOT_PREC=DOT_PREC, DQ_MODE=DQ_MODE, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                USE_TMA=USE_TMA)
    if VARLEN_K:
        out_row = hk * S_TOT + k0 + offs_n
    else:
        out_row = (b * HKV + hk) * S_TOT + offs_n
    out_row = out_row[:, None]
    tl.store(DK + out_row * E + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=n_ok & (offs_d < E)[None, :])
    tl.store(DV + out_row * EV + offs_dv[None, :], dv.to(DV.dtype.element_ty), mask=n_ok & (offs_dv < EV)[None, :])


@triton.jit
def _dq_block_loop(
    dq,                                  # (BLOCK_M, BLOCK_D) fp32 accumulator
    q, do, lse, delta, offs_m, offs_d, offs_dv,  # this block's tiles and statistics, its rows, the columns
    lo, hi,                              # key blocks [lo, hi), lo a multiple of BLOCK_N
    k_base, v_base, stride_kn, stride_vn,  # this sequence's first key row; USE_TMA: K/V tensor descriptors
    mask_base, stride_mm, stride_mn,
    L, S, E, EV, scale, causal_off, left_off, alibi_off, slope, softcap,
    drop_row, drop_p, drop_scale, seed,
    DIAG: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if USE_TMA:
            k, v = _load_rows_desc(k_base, v_base, start_n, UPCAST)
        else:
            kv_off = offs_n[:, None].to(tl.int64)
            k, v = _load_kv(k_base, v_base, kv_off, (offs_n < S)[:, None], offs_d, offs_dv, E, EV, stride_kn,
                            stride_vn, UPCAST)
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


@triton.autotune(configs=_configs(_BWD_TABLE), key=[*_KEY, "USE_TMA"],
                 prune_configs_by={"early_config_prune": _prune_bwd})
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
    H, HKV, GROUPS, L, S, E, EV, L_TOT, S_TOT,
    scale, drop_p, drop_scale, SEED, causal_off, left_off, alibi_off, softcap, page_size,
    L_BUCKET, S_BUCKET,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    VARLEN_Q: tl.constexpr, VARLEN_K: tl.constexpr, PAGED: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr = False,       # the streamed K/V tiles through tensor descriptors (the copy engine)
):
    # BLOCK_N here plays the role of the streamed key block; the tables are shared with dK/dV.
    pid_m, pid_bh = _block_and_head(L, BLOCK_M)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUPS
    seed, q0, Lb, k0, Sb, causal_off, left_off, alibi_off = _prologue(
        SEED, CuQ, KStart, KLen, b, L, S, causal_off, left_off, alibi_off, HAS_DROPOUT, VARLEN_Q, VARLEN_K)
    slope = _alibi_slope(Alibi, b, stride_ab, h, ALIBI)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < Lb
    ok = m_ok[:, None] & (offs_d[None, :] < E)
    row_off = (q0 + offs_m[:, None]).to(tl.int64)
    q = tl.load(Q + b * stride_qb + h * stride_qh + row_off * stride_qm + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + row_off * stride_dom + offs_dv[None, :],
                 mask=m_ok[:, None] & (offs_dv[None, :] < EV), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row = _head_row0(b, h, H, L_TOT, q0, VARLEN_Q) + offs_m
    lse = tl.load(Lse + row, mask=m_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(Delta + row, mask=m_ok, other=0.0)
    # Key blocks as in the forward: [lo, mid) below the diagonal, [mid, hi) crossing it.
    lo, mid, hi = _key_range(m0, 0, Sb, causal_off, left_off, IS_CAUSAL, WINDOW, BLOCK_M, BLOCK_N)
    if VARLEN_Q:
        hi = tl.where(m0 < Lb, hi, lo)
        mid = tl.minimum(mid, hi)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + b * stride_kb + hk * stride_kh + k0 * stride_kn
    v_base = V + b * stride_vb + hk * stride_vh + k0 * stride_vn
    if USE_TMA:  # over sequence b's Sb keys, as the forward's
        k_base, v_base = _row_descriptors(k_base, v_base, Sb, E, EV, stride_kn, stride_vn, BLOCK_N, BLOCK_D, BLOCK_DV)
    for diag in tl.static_range(2 if IS_CAUSAL else 1):
        dq = _dq_block_loop(
            dq, q, do, lse, delta, offs_m, offs_d, offs_dv,
            lo=lo if diag == 0 else mid, hi=mid if diag == 0 else hi,
            k_base=k_base, v_base=v_base,
            stride_kn=stride_kn, stride_vn=stride_vn,
            mask_base=Mask + b * stride_mb + h * stride_mh, stride_mm=stride_mm, stride_mn=stride_mn,
            L=Lb, S=Sb, E=E, EV=EV, scale=scale, causal_off=causal_off, left_off=left_off, alibi_off=alibi_off,
            slope=slope, softcap=softcap,
            drop_row=row * S, drop_p=drop_p, drop_scale=drop_scale, seed=seed,
            DIAG=diag == 1, HAS_MASK=HAS_MASK, MASK_BOOL=MASK_BOOL, HAS_DROPOUT=HAS_DROPOUT,
            WINDOW=WINDOW, SOFTCAP=SOFTCAP, ALIBI=ALIBI,
            UPCAST=UPCAST, DOT_PREC=DOT_PREC, BLOCK_N=BLOCK_N, USE_TMA=USE_TMA)
    tl.store(DQ + row[:, None] * E + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=ok)
