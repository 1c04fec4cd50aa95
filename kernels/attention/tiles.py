"""Tile helpers shared by the attention kernels (forward.py, backward.py): the program's place in the
grid, the sequence and page lookups, the common program prologue, one tile's scores (the mask,
causal, window, softcap and ALiBi rules exist once, here) and the key range a query block visits."""
import triton
import triton.language as tl

from .._math import tanh

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
def _prologue(SEED, CuQ, KStart, KLen, b, L, S, causal_off, left_off, alibi_off,
              HAS_DROPOUT: tl.constexpr, VARLEN_Q: tl.constexpr, VARLEN_K: tl.constexpr):
    """The start every attention program shares (forward, dK/dV, dQ): the dropout seed, sequence b's
    query and key ranges (_sequence) and, with VARLEN_K, flash-attn's bottom-right alignment applied
    per sequence to the causal, window and ALiBi offsets.
    -> (seed, q0, Lb, k0, Sb, causal_off, left_off, alibi_off)."""
    if HAS_DROPOUT:
        seed = tl.load(SEED)  # (1,) int64 on the device: a CUDA graph replay's new draw takes effect
    else:
        seed = 0
    q0, Lb, k0, Sb = _sequence(CuQ, KStart, KLen, b, L, S, VARLEN_Q, VARLEN_K)
    if VARLEN_K:
        causal_off += Sb - Lb
        left_off += Sb - Lb
        alibi_off += Sb - Lb
    return seed, q0, Lb, k0, Sb, causal_off, left_off, alibi_off


@triton.jit
def _head_row0(b, h, H, L_TOT, q0, VARLEN_Q: tl.constexpr):
    """Row of (batch b, head h)'s first query in the (.., L_TOT) q/out/lse/delta row space: the
    (1, H, total_q) layout with VARLEN_Q, else (B, H, L)."""
    if VARLEN_Q:
        row0 = h * L_TOT + q0
    else:
        row0 = (b * H + h) * L_TOT
    return row0


@triton.jit
def _alibi_slope(Alibi, b, stride_ab, h, ALIBI: tl.constexpr):
    """Head h's ALiBi slope (0.0 without ALiBi)."""
    slope = 0.0
    if ALIBI:
        slope = tl.load(Alibi + b * stride_ab + h)
    return slope


@triton.jit
def _kv_rows(offs_n, k_end, bt_base, page_size, PAGED: tl.constexpr):
    """int64 row of each key in its K/V view: the key itself, or through the page table (key j of a
    paged cache lives in page bt[j // page_size] at row j % page_size; any page size)."""
    if PAGED:
        page = tl.load(bt_base + offs_n // page_size, mask=offs_n < k_end, other=0).to(tl.int64)
        return page * page_size + (offs_n % page_size).to(tl.int64)
    else:
        return offs_n.to(tl.int64)


@triton.jit
def _load_kv(k_base, v_base, kv_off, n_ok, offs_d, offs_dv, E, EV, stride_kn, stride_vn, UPCAST: tl.constexpr):
    """One (BLOCK_N, BLOCK_D) tile of K and one (BLOCK_N, BLOCK_DV) tile of V (value head dim EV,
    which may differ from E: DeepSeek's MLA) at rows kv_off (int64, (BLOCK_N, 1)), zero where not
    n_ok ((BLOCK_N, 1)) or past the head dim; in fp32 when UPCAST (bf16 under the interpreter)."""
    k = tl.load(k_base + kv_off * stride_kn + offs_d[None, :], mask=n_ok & (offs_d < E)[None, :], other=0.0)
    v = tl.load(v_base + kv_off * stride_vn + offs_dv[None, :], mask=n_ok & (offs_dv < EV)[None, :], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


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
# GQA packing (PACK_GQA, forward only) and tensor-descriptor (TMA) tiles (forward and backward)
# ------------------------------------------------------------------------------------------------
@triton.jit
def _packed_rows(rows, hk, GROUPS, L):
    """PACK_GQA: the rows of one program are the GROUPS query heads x L queries of kv head hk, row
    r -> head hk * GROUPS + r // L, query r % L. -> (head, query, ok), each (BLOCK_M,): rows past
    GROUPS * L are not ok, keep a head inside the group (every pointer formed from it stays in
    bounds) and get query index L, so _scores masks all their keys."""
    ok = rows < GROUPS * L
    head = hk * GROUPS + tl.minimum(rows // L, GROUPS - 1)
    query = tl.where(ok, rows % L, L)
    return head, query, ok


@triton.jit
def _row_descriptors(a_base, b_base, n_rows, E, EV, stride_a, stride_b, BLOCK_R: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """USE_TMA: tensor descriptors over the (n_rows, E) rows of a and the (n_rows, EV) rows of b
    that this program streams, in (BLOCK_R, BLOCK_D) and (BLOCK_R, BLOCK_DV) boxes: K and V in the
    forward and the dQ kernel (n_rows the keys, box BLOCK_N), Q and dO in the dK/dV kernel (the
    queries of one head, box BLOCK_M). Base pointers 16-byte aligned and row strides multiples of
    16 bytes (config._use_tma checks). The copy engine fills rows >= n_rows and columns past the
    head dim with zeros, as the pointer path's masks do (at least one row: a descriptor over no rows
    is never read, but keeps a valid shape)."""
    rows = tl.maximum(n_rows, 1)
    a_desc = tl.make_tensor_descriptor(a_base, shape=[rows, E], strides=[stride_a, 1],
                                       block_shape=[BLOCK_R, BLOCK_D])
    b_desc = tl.make_tensor_descriptor(b_base, shape=[rows, EV], strides=[stride_b, 1],
                                       block_shape=[BLOCK_R, BLOCK_DV])
    return a_desc, b_desc


@triton.jit
def _load_rows_desc(a_desc, b_desc, start, UPCAST: tl.constexpr):
    """_load_kv (or the dK/dV kernel's Q/dO loads) through tensor descriptors: the boxes of a and b
    at row start; in fp32 when UPCAST (bf16 under the interpreter)."""
    a = a_desc.load([start, 0])
    b = b_desc.load([start, 0])
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return a, b
