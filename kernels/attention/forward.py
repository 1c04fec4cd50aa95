"""Attention forward kernels: `_attn_fwd` (one program per query block and head; with SPLIT, per key
split too: flash-decoding's unnormalised partials) and `_attn_decode_combine` (merges the splits).
Launched by launch.attention_forward."""
import triton
import triton.language as tl

from .._math import dropout_keep
from .config import _FWD_TABLE, _KEY, _configs, _prune
from .tiles import (_alibi_slope, _block_and_head, _head_row0, _key_range, _kv_rows, _load_kv, _load_rows_desc,
                    _packed_rows, _prologue, _row_descriptors, _scores)

# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_block_loop(
    acc, l_i, m_i,                       # running (BLOCK_M, BLOCK_DV) output, row sum, row max (fp32)
    q, offs_m, offs_d, offs_dv,          # this block's query tile, its rows, the q/k and the v head-dim columns
    lo, hi, k_end,                       # key blocks [lo, hi) (lo a multiple of BLOCK_N); keys < k_end exist
    k_base, v_base, stride_kn, stride_vn,  # USE_TMA: K/V tensor descriptors (tiles._row_descriptors)
    bt_base, page_size,                  # PAGED: this sequence's page-table row, keys per page
    mask_base, stride_mm, stride_mn,
    L, E, EV, scale, causal_off, left_off, alibi_off, slope, softcap,
    drop_row, drop_p, drop_scale, seed,  # drop_row: (BLOCK_M,) int64 dropout index of (i, j=0)
    DIAG: tl.constexpr,                  # these blocks cross the causal diagonal
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, PAGED: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr = False,
):
    # Online softmax: with m the running max and l = sum exp(s - m), a new block with max m' gives
    # l' = l exp(m - m') + sum exp(s_new - m'), acc' = acc exp(m - m') + exp(s_new - m') V_new.
    # While every score so far is -inf, m' = -inf; exponentiating against 0 instead keeps p and the
    # rescale factor at exactly 0 (exp(-inf - -inf) would be NaN).
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if USE_TMA:
            k, v = _load_rows_desc(k_base, v_base, start_n, UPCAST)
        else:
            kv_off = _kv_rows(offs_n, k_end, bt_base, page_size, PAGED)[:, None]
            k, v = _load_kv(k_base, v_base, kv_off, (offs_n < k_end)[:, None], offs_d, offs_dv, E, EV, stride_kn,
                            stride_vn, UPCAST)
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


@triton.autotune(configs=_configs(_FWD_TABLE), key=_KEY + ["SPLIT", "SINK", "PACK_GQA", "USE_TMA"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _attn_fwd(
    Q, K, V, Mask,                       # inputs (see the module docstring for layouts)
    Out, Lse, Out32,                     # (B, H, L, EV) input dtype, (B, H, L) fp32, (B, H, L, EV) fp32 if STORE_O32
    PartAcc, PartM, PartL,               # SPLIT: (B*H, n_splits, L, EV), (B*H, n_splits, L) x2, fp32
    Sinks,                               # SINK: (H,) fp32 per-head sink logits
    CuQ, KStart, KLen, BlockTable, Alibi,  # VARLEN_Q / VARLEN_K / PAGED / ALIBI inputs (module docstring)
    stride_qb, stride_qh, stride_qm,     # element strides (the last dim has stride 1)
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ab, stride_btb,               # ALiBi slopes' batch stride (0 for (H,)); page-table row stride
    H, GROUPS, L, S, E, EV,              # query heads, query heads per kv head, sizes (max per sequence), v's head dim
    L_TOT,                               # rows of the q/out/lse views per head (L, or total_q when VARLEN_Q)
    scale, drop_p, drop_scale, SEED,     # softmax scale; dropout p, 1/(1-p) (0 when p == 1), Philox seed
    causal_off, left_off, alibi_off,     # right bound, left bound (WINDOW), ALiBi diagonal (+ Sb - Lb if VARLEN_K)
    softcap, page_size,
    split_size, n_splits,                # SPLIT: keys per program (a multiple of BLOCK_N), programs per row
    L_BUCKET, S_BUCKET,                  # autotune key only
    BLOCK_D: tl.constexpr,               # head dim rounded up to a power of two (>= 16)
    BLOCK_DV: tl.constexpr,              # v's head dim EV rounded likewise (== BLOCK_D unless EV differs)
    SINK: tl.constexpr,                  # a per-head sink logit joins every row's softmax denominator
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    VARLEN_Q: tl.constexpr, VARLEN_K: tl.constexpr, PAGED: tl.constexpr,
    SPLIT: tl.constexpr,                 # flash-decoding: write unnormalised partials per key split
    STORE_O32: tl.constexpr,             # also write the fp32 output (16-bit inputs, for the backward)
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,  # interpreter: fp32 dot operands; "ieee" for fp32
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PACK_GQA: tl.constexpr = False,      # rows = (query head, query) pairs of one kv head (tiles._packed_rows)
    USE_TMA: tl.constexpr = False,       # K/V tiles through tensor descriptors (the copy engine on sm_90+)
):
    # Each row of the program's tile is query qi of head h; unpacked, h is the program's one head
    # (a scalar, hq = h) and qi = offs_m; PACK_GQA: h, qi are per row and hq = h[:, None].
    pid_s = tl.program_id(2)
    if PACK_GQA:  # one program per (batch, kv head[, key split]): K/V tiles loaded once for GROUPS heads
        pid_m, pid_bh = _block_and_head(GROUPS * L, BLOCK_M)
        b = (pid_bh // (H // GROUPS)).to(tl.int64)
        hk = (pid_bh % (H // GROUPS)).to(tl.int64)
    else:
        pid_m, pid_bh = _block_and_head(L, BLOCK_M)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        hk = h // GROUPS  # the shared kv head (GQA/MQA)
    seed, q0, Lb, k0, Sb, causal_off, left_off, alibi_off = _prologue(
        SEED, CuQ, KStart, KLen, b, L, S, causal_off, left_off, alibi_off, HAS_DROPOUT, VARLEN_Q, VARLEN_K)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    if PACK_GQA:  # dense queries only (Lb == L)
        h, qi, row_ok = _packed_rows(offs_m, hk, GROUPS, L)
        hq = h[:, None]
    else:
        qi, row_ok, hq = offs_m, offs_m < Lb, h
    slope = _alibi_slope(Alibi, b, stride_ab, hq, ALIBI)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    ok = row_ok[:, None] & (offs_d < E)[None, :]
    ok_v = row_ok[:, None] & (offs_dv < EV)[None, :]
    row0 = _head_row0(b, h, H, L_TOT, q0, VARLEN_Q)

    q = tl.load(Q + b * stride_qb + hq * stride_qh + (q0 + qi[:, None]).to(tl.int64) * stride_qm + offs_d[None, :],
                mask=ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    lo = 0
    hi = Sb
    if SPLIT:
        lo = pid_s * split_size
        hi = tl.minimum(Sb, lo + split_size)
    k_end = hi
    if PACK_GQA:
        # The rows' queries are not m0, m0 + 1, ...: the range follows the smallest query (left
        # bound, diagonal-free blocks) and the largest (right bound).
        q_min = tl.min(qi, 0)
        q_max = tl.max(tl.where(row_ok, qi, 0), 0)
        lo, mid, hi_end = _key_range(q_min, lo, hi, causal_off, left_off, IS_CAUSAL, WINDOW, BLOCK_M, BLOCK_N)
        if IS_CAUSAL:
            hi = tl.maximum(lo, tl.minimum(hi, q_max + 1 + causal_off))
            mid = tl.minimum(mid, hi)
        else:
            hi = hi_end
    else:
        lo, mid, hi = _key_range(m0, lo, hi, causal_off, left_off, IS_CAUSAL, WINDOW, BLOCK_M, BLOCK_N)
    if VARLEN_Q:  # row blocks past this sequence's end visit no key
        hi = tl.where(m0 < Lb, hi, lo)
        mid = tl.minimum(mid, hi)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if SINK:
        # The sink is one more score s_h per row with no value row: the online softmax starts from
        # it (m = s_h, l = exp(s_h - s_h) = 1, acc = 0). With SPLIT only split 0 counts it, so the
        # combine sees it once. PACK_GQA: each row's own head's sink.
        sink = tl.load(Sinks + h)
        first = pid_s == 0
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.where(first, sink, float("-inf"))
        l_i = l_i + tl.where(first, 1.0, 0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    k_base = K + b * stride_kb + hk * stride_kh + k0 * stride_kn
    v_base = V + b * stride_vb + hk * stride_vh + k0 * stride_vn
    if USE_TMA:  # not PAGED: a key block may span pages, which one descriptor box cannot express
        k_base, v_base = _row_descriptors(k_base, v_base, k_end, E, EV, stride_kn, stride_vn, BLOCK_N, BLOCK_D,
                                          BLOCK_DV)
    for diag in tl.static_range(2 if IS_CAUSAL else 1):
        acc, l_i, m_i = _fwd_block_loop(
            acc, l_i, m_i, q, qi, offs_d, offs_dv,
            lo=lo if diag == 0 else mid, hi=mid if diag == 0 else hi, k_end=k_end,
            k_base=k_base, v_base=v_base,
            stride_kn=stride_kn, stride_vn=stride_vn,
            bt_base=BlockTable + b * stride_btb, page_size=page_size,
            mask_base=Mask + b * stride_mb + hq * stride_mh, stride_mm=stride_mm, stride_mn=stride_mn,
            L=Lb, E=E, EV=EV, scale=scale, causal_off=causal_off, left_off=left_off, alibi_off=alibi_off, slope=slope,
            softcap=softcap,
            drop_row=(row0 + qi.to(tl.int64)) * S, drop_p=drop_p, drop_scale=drop_scale, seed=seed,
            DIAG=diag == 1, HAS_MASK=HAS_MASK, MASK_BOOL=MASK_BOOL, HAS_DROPOUT=HAS_DROPOUT,
            WINDOW=WINDOW, SOFTCAP=SOFTCAP, ALIBI=ALIBI, PAGED=PAGED,
            UPCAST=UPCAST, DOT_PREC=DOT_PREC, BLOCK_N=BLOCK_N, USE_TMA=USE_TMA)

    if SPLIT:
        # Unnormalised partials; _attn_decode_combine merges the n_splits of each row.
        part = ((b * H + h) * n_splits + pid_s) * L + qi  # (b * H + h) is pid_bh unpacked
        tl.store(PartAcc + part[:, None] * EV + offs_dv[None, :], acc, mask=ok_v)
        tl.store(PartM + part, m_i, mask=row_ok)
        tl.store(PartL + part, l_i, mask=row_ok)
    else:
        # A fully masked row has l = 0 and acc = 0: output 0, lse = log 0 = -inf (with a sink:
        # l = 1 relative to m = s_h, output 0, lse = s_h).
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        out = acc / l_safe[:, None]
        lse = tl.where(empty, float("-inf"), m_i + tl.log(l_safe))
        row = row0 + qi
        tl.store(Out + row[:, None] * EV + offs_dv[None, :], out.to(Out.dtype.element_ty), mask=ok_v)
        if STORE_O32:
            tl.store(Out32 + row[:, None] * EV + offs_dv[None, :], out, mask=ok_v)
        tl.store(Lse + row, lse, mask=row_ok)


@triton.jit
def _attn_decode_combine(
    PartAcc, PartM, PartL,               # (B*H, n_splits, L, E), (B*H, n_splits, L) x2, fp32
    Out, Lse,                            # (B, H, L, E) output dtype, (B, H, L) fp32
    L, E, n_splits,                      # E: the output's (v's) head dim, BLOCK_D its power-of-two block
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


@triton.jit
def _dropout_mask_kernel(Keep, n, seed, drop_p, BLOCK: tl.constexpr):
    # Test hook: the attention kernels' keep-mask, element idx of the flattened (B, H, L, S).
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Keep + idx, dropout_keep(seed, 0, idx, drop_p).to(tl.int8), mask=idx < n)
