"""Attention launchers: the options (`AttnOptions`, one named structure), the arguments the kernels
share (`_launch_args`), `attention_forward`, `attention_backward`, the dropout-mask test hook and
`compile_variants` (tools/gpu_compile_check.py)."""
from typing import NamedTuple, Optional

import torch
import triton

from .._common import num_sms, seed_tensor
from .._dtypes import KERNEL_FLOATS
from .backward import _attn_bwd_dkdv, _attn_bwd_dq, _attn_bwd_preprocess
from .config import (_DECODE_MAX_L, _DECODE_MIN_S, _SPLIT_ALIGN, DQ_ATOMIC, DQ_KERNEL, DQ_MODE, DQ_ORDERED,
                     _dot_precision, _pack_gqa, _upcast_dots, _use_tma)
from .forward import _attn_decode_combine, _attn_fwd, _dropout_mask_kernel

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


class AttnOptions(NamedTuple):
    """Everything attention_forward / attention_backward take besides the tensors, in one place.

    scale: the softmax scale. is_causal with causal_offset: query i sees keys j <= i + causal_offset
    (0: SDPA's top-left alignment; S - L: flash-attn's bottom-right; plus a window's right size);
    rows that see no key give 0 and lse -inf. dropout_p, seed: the dropout and its Philox seed (an
    int, or the (1,) int64 device tensor the kernels read).
    window_offset: None, or query i sees only keys j >= i + window_offset (flash-attn's left window:
    S - L - left); key blocks wholly before it are skipped.
    softcap > 0: scores softcap * tanh(scale q.k / softcap). alibi_slopes fp32 (H,) or (B, H): adds
    - slope |i + alibi_offset - j| (after the softcap).
    seqlens (a Seqlens): variable-length sequences (packed q/k/v or a kv-cache with per-batch
    lengths); out and lse then have q's view shape, (1, H, total_q, E) / (1, H, total_q) for packed
    queries. block_table (B, pages) int32 with page_size: key j of sequence b lives at row
    block_table[b, j // page_size] * page_size + j % page_size of the k/v views (forward only).
    Forward only: decode None picks flash-decoding when L <= 16, S >= 512 and no dropout; True/False
    forces it (dropout must be 0). split_size: keys per program in decode mode, a multiple of
    _SPLIT_ALIGN (default: enough splits to fill the GPU twice over). return_fp32_out: also return
    the output in fp32 (B, H, L, E) before the cast (what attention_backward wants as `out` for
    16-bit inputs); not with decode. return_mask: test hook, also return the dropout keep-mask
    (B, H, L, S) bool that was applied.
    sinks: None, or fp32 (H,) attention-sink logits (gpt-oss): s_h joins every row's softmax
    denominator, P_ij = exp(S_ij) / (sum_j exp(S_ij) + exp(s_h)), with no value row; lse includes it
    (a row that sees no key then gives 0 and lse = s_h). The backward also returns its gradient.
    pack_gqa (forward only), tma (forward and backward): None lets config._pack_gqa / config._use_tma
    choose the PACK_GQA / USE_TMA kernel variants; True / False forces them on (where the inputs
    allow) or off."""
    scale: float
    is_causal: bool = False
    causal_offset: int = 0
    dropout_p: float = 0.0
    seed: object = 0
    window_offset: Optional[int] = None
    softcap: float = 0.0
    alibi_slopes: Optional[torch.Tensor] = None
    alibi_offset: int = 0
    seqlens: Optional[Seqlens] = None
    block_table: Optional[torch.Tensor] = None
    page_size: int = 0
    decode: Optional[bool] = None
    split_size: Optional[int] = None
    return_fp32_out: bool = False
    return_mask: bool = False
    sinks: Optional[torch.Tensor] = None
    pack_gqa: Optional[bool] = None
    tma: Optional[bool] = None


def _launch_args(q, k, v, mask, o: AttnOptions):
    """Checks (asserts: the op wrapper has checked with torch's rules) and the keyword arguments
    shared by the forward and both backward kernels: strides, sizes, constexpr flags."""
    assert q.dim() == k.dim() == v.dim() == 4, \
        "attention launchers take q (B, H, L, E), k (B, Hkv, S, E) and v (B, Hkv, S, Ev)"
    dropout_p, seqlens, block_table, page_size = o.dropout_p, o.seqlens, o.block_table, o.page_size
    window_offset, softcap, alibi_slopes = o.window_offset, o.softcap, o.alibi_slopes
    H, L_TOT, E, EV = q.shape[1], q.shape[2], q.shape[3], v.shape[3]
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
    assert k.shape[:3] == v.shape[:3] and k.shape[3] == E and Hkv > 0 and H % Hkv == 0, \
        f"bad attention shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    assert q.dtype == k.dtype == v.dtype and q.dtype in KERNEL_FLOATS, \
        f"q, k, v must share one dtype among float16, bfloat16, float32; got {q.dtype}, {k.dtype}, {v.dtype}"
    assert E <= MAX_HEAD_DIM and EV <= MAX_HEAD_DIM, \
        f"head dims E={E}, Ev={EV} exceed the kernel's limit of {MAX_HEAD_DIM}"
    assert all(t.stride(-1) == 1 for t in (q, k, v)), "q, k, v need a contiguous last dim (stride 1)"
    assert 0.0 <= dropout_p <= 1.0, f"dropout probability has to be between 0 and 1, but got {dropout_p}"
    assert block_table is None or (seqlens is not None and page_size > 0 and block_table.dtype == torch.int32
                                   and block_table.dim() == 2 and block_table.shape[0] == B), \
        "a paged cache needs seqlens, page_size > 0 and an int32 (B, pages) block_table"
    if alibi_slopes is not None:
        assert alibi_slopes.dtype == torch.float32 and alibi_slopes.shape in ((H,), (B, H)), \
            "alibi_slopes (H,) or (B, H) fp32"
        alibi_slopes = alibi_slopes.contiguous()
    if o.sinks is not None:
        assert o.sinks.dtype == torch.float32 and o.sinks.shape == (H,), "sinks (H,) fp32"
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
        H=H, GROUPS=H // Hkv, L=L, S=S, E=E, EV=EV, L_TOT=L_TOT,
        drop_p=dropout_p, drop_scale=1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0,  # p == 1 drops everything
        left_off=0 if window_offset is None else int(window_offset), alibi_off=int(o.alibi_offset),
        softcap=float(softcap) if softcap > 0.0 else 1.0, page_size=max(int(page_size), 1),
        L_BUCKET=lb, S_BUCKET=sb,
        scale=o.scale, SEED=_seed_arg(o.seed, dropout_p, q), causal_off=o.causal_offset, IS_CAUSAL=o.is_causal,
        BLOCK_D=max(16, triton.next_power_of_2(E)), BLOCK_DV=max(16, triton.next_power_of_2(EV)),
        HAS_MASK=mask is not None,
        MASK_BOOL=mask is not None and mask.dtype == torch.uint8,
        HAS_DROPOUT=dropout_p > 0.0,
        WINDOW=window_offset is not None, SOFTCAP=softcap > 0.0, ALIBI=alibi_slopes is not None,
        VARLEN_Q=seqlens is not None and seqlens.cu_q is not None, VARLEN_K=seqlens is not None,
        PAGED=block_table is not None,
        UPCAST=_upcast_dots(q.dtype),
        DOT_PREC=_dot_precision(q.dtype),
    )
    if args["VARLEN_Q"]:  # one packed row space: sequences are found through CuQ, not a batch stride
        args["stride_qb"] = 0
    if args["VARLEN_K"]:
        args["stride_kb"] = args["stride_vb"] = 0
    return (B, H, Hkv, L, S, E, EV), args


def _buckets(L, S):
    return triton.next_power_of_2(max(L, 1)), triton.next_power_of_2(max(S, 1))


def _seed_arg(seed, dropout_p, q):
    """The kernels' SEED pointer: the (1,) int64 device tensor (an int is copied there); any
    pointer when there is no dropout (never read)."""
    return seed_tensor(seed, q.device) if dropout_p > 0.0 else q


def attention_forward(q, k, v, mask=None, opts: Optional[AttnOptions] = None, **options):
    """Fused attention forward.

    q (B, H, L, E), k, v (B, Hkv, S, E) with a contiguous last dim, H % Hkv == 0; mask None or
    (B, H, L, S) bool/float (any strides, stride 0 for broadcast dims); opts an AttnOptions (or its
    fields as keywords). v's head dim Ev may differ from E (MLA). Returns (out (B, H, L, Ev) in q's
    dtype contiguous, lse (B, H, L) fp32: the row logsumexp of the scaled, biased scores (and the
    sink), -inf for fully masked rows), then out32 with return_fp32_out and the keep-mask with
    return_mask.
    """
    o = opts if opts is not None else AttnOptions(**options)
    dropout_p, decode, return_fp32_out = o.dropout_p, o.decode, o.return_fp32_out
    if o.return_mask:
        assert o.seqlens is None, "return_mask is for dense inputs"
        res = attention_forward(q, k, v, mask, o._replace(return_mask=False))
        shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        return (*res, dropout_mask(shape, o.seed, dropout_p, q.device))
    (B, H, Hkv, L, S, E, EV), args = _launch_args(q, k, v, mask, o)
    out_shape = (*q.shape[:3], EV)
    out = torch.empty(out_shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    out32 = torch.empty(out_shape if return_fp32_out else (0,), dtype=torch.float32, device=q.device)
    res = (out, lse, out32) if return_fp32_out else (out, lse)
    if out.numel() == 0 or B == 0:
        return res
    if decode is None:
        decode = (L <= _DECODE_MAX_L and S >= _DECODE_MIN_S and dropout_p == 0.0 and not return_fp32_out
                  and not args["VARLEN_Q"])
    assert not (decode and dropout_p > 0.0), "the decode (flash-decoding) path is for inference: dropout_p must be 0"
    assert not (decode and return_fp32_out), "the decode (flash-decoding) path does not write an fp32 output"
    assert not (decode and args["VARLEN_Q"]), "the decode (flash-decoding) path takes dense queries"
    pack = _pack_gqa(H // Hkv, L, dropout_p, args["VARLEN_Q"], o.pack_gqa)
    launch = dict(args, STORE_O32=return_fp32_out, SINK=o.sinks is not None,
                  Sinks=o.sinks if o.sinks is not None else lse,
                  PACK_GQA=pack, USE_TMA=_use_tma(q, k, v, args["PAGED"], o.tma))
    rows, heads = (H // Hkv * L, Hkv) if pack else (L, H)  # a program's rows: (head, query) pairs when packed
    if pack:
        launch["L_BUCKET"] = triton.next_power_of_2(rows)  # the autotune class (16-row blocks or not) follows them
    if launch["USE_TMA"] and q.is_cuda:
        _set_descriptor_allocator()
    if not decode:
        grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * B * heads, 1, 1)  # noqa: E731
        _attn_fwd[grid](q, k, v, Out=out, Lse=lse, Out32=out32 if return_fp32_out else lse,
                        PartAcc=lse, PartM=lse, PartL=lse, split_size=0, n_splits=1, SPLIT=False, **launch)
        return res
    split_size = o.split_size
    if split_size is None:
        # Enough splits for ~2 programs per SM; each at least 256 keys so the combine stays cheap.
        want = max(1, (2 * num_sms(q.device)) // (B * heads * triton.cdiv(rows, 16)))
        split_size = max(256, triton.cdiv(triton.cdiv(S, want), _SPLIT_ALIGN) * _SPLIT_ALIGN)
    assert split_size > 0 and split_size % _SPLIT_ALIGN == 0, \
        f"split_size must be a positive multiple of {_SPLIT_ALIGN}, got {split_size}"
    n_splits = max(1, triton.cdiv(S, split_size))
    part_acc = torch.empty((B * H, n_splits, L, EV), dtype=torch.float32, device=q.device)
    part_m = torch.empty((B * H, n_splits, L), dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * B * heads, 1, n_splits)  # noqa: E731
    _attn_fwd[grid](q, k, v, Out=out, Lse=lse, Out32=lse, PartAcc=part_acc, PartM=part_m, PartL=part_l,
                    split_size=split_size, n_splits=n_splits, SPLIT=True, **launch)
    _attn_decode_combine[(triton.cdiv(L, 16) * B * H,)](
        part_acc, part_m, part_l, out, lse, L, EV, n_splits, BLOCK_M=16, BLOCK_D=args["BLOCK_DV"])
    return res


def _set_descriptor_allocator():
    """USE_TMA builds its tensor descriptors on the device, in a small global scratch that triton
    allocates at launch through the allocator of triton.set_allocator (a context variable). Unless
    one is set already (the user's is kept), set one that takes the scratch from torch's caching
    allocator on the current device (stream-ordered, CUDA-graph safe)."""
    from triton.runtime import _allocation

    current = getattr(_allocation, "_allocator", None)
    null = getattr(_allocation, "NullAllocator", None)
    if current is None or null is None or isinstance(current.get(), null):
        triton.set_allocator(lambda size, alignment, stream: torch.empty(
            size, dtype=torch.int8, device=torch.device("cuda", torch.cuda.current_device())))


def attention_backward(do, q, k, v, mask, out, lse, opts: Optional[AttnOptions] = None, dq_mode=None, **options):
    """Gradients of attention_forward (same options; no paged cache). do like q (contiguous last
    dim), out and lse the forward's outputs: for 16-bit inputs pass its fp32 output
    (return_fp32_out=True), from which delta = rowsum(dO * O) is accurate (the 16-bit one works,
    less accurately on sharp attention). Returns (dq like q, dk like k, dv like v), contiguous, input
    dtype, and with sinks their gradient dsinks (H,) fp32 = -sum over rows of exp(s_h - lse) delta.
    Reads its inputs only (nothing saved is overwritten). dQ as config.DQ_MODE says (backward.py):
    bit-identical reruns unless FASTTX_ATTN_DQ=atomic, and then too under
    torch.use_deterministic_algorithms(True). dq_mode overrides it (tests, benchmarks)."""
    o = opts if opts is not None else AttnOptions(**options)
    if dq_mode is None:
        dq_mode = DQ_MODE
    if dq_mode == DQ_ATOMIC and torch.are_deterministic_algorithms_enabled():
        dq_mode = DQ_ORDERED
    assert o.block_table is None, "the backward takes no paged cache"
    (B, H, Hkv, L, S, E, EV), args = _launch_args(q, k, v, mask, o)
    sinks = o.sinks
    if do.stride(-1) != 1:
        do = do.contiguous()
    out = out.contiguous()
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    res = (dq, dk, dv) if sinks is None else (dq, dk, dv, torch.zeros_like(sinks))
    if dq.numel() == 0 and dk.numel() == 0 and dv.numel() == 0:
        return res
    if L == 0 or E == 0 or B == 0 or dq.numel() == 0 or EV == 0:  # no query rows or an empty head dim: all 0
        for t in (dq, dk, dv):
            t.zero_()
        return res
    if args["VARLEN_K"]:  # rows of the k/v views outside every sequence get no gradient from the kernel
        dk.zero_()
        dv.zero_()
    Bq, Lq = q.shape[0], q.shape[2]
    delta = torch.empty((Bq, H, Lq), dtype=torch.float32, device=q.device)
    # delta over the output's head dim Ev, at most 16 values per thread per array: with 4 warps on 64x64
    # tiles and more, the fp32 output at d = 40 held 152 registers (12 warps per SM; tools/kernel_report.py)
    pre_m = 64 if args["BLOCK_DV"] <= 128 else 32
    pre_warps = max(4, pre_m * args["BLOCK_DV"] // (32 * 16))
    _attn_bwd_preprocess[(triton.cdiv(Lq, pre_m) * Bq * H,)](
        out, do, delta, do.stride(0), do.stride(1), do.stride(2), H, Lq, EV,
        BLOCK_M=pre_m, BLOCK_D=args["BLOCK_DV"], num_warps=pre_warps)
    do_strides = _strides("do", do)
    if args["VARLEN_Q"]:
        do_strides["stride_dob"] = 0
    launch = dict(args, **do_strides, HKV=Hkv, S_TOT=k.shape[2])
    # USE_TMA on the tiles each kernel streams (the rule checks its 2nd and 3rd tensors' alignment): Q and dO
    # past dK/dV's resident K/V, K and V past the dQ kernel's resident Q/dO.
    tma_dkdv = _use_tma(q, q, do, False, o.tma, args)
    tma_dq = dq_mode == DQ_KERNEL and _use_tma(q, k, v, False, o.tma, args)
    if (tma_dkdv or tma_dq) and q.is_cuda:
        _set_descriptor_allocator()
    if dq_mode == DQ_KERNEL:
        dq32 = locks = torch.zeros(1, dtype=torch.float32, device=q.device)  # never read
        lock_stride = 0
    else:  # fp32 dQ and one counter per (batch, head, query block of the smallest BLOCK_M)
        dq32 = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lock_stride = triton.cdiv(L, 16)
        locks = torch.zeros((B * H, lock_stride) if dq_mode == DQ_ORDERED else (1,), dtype=torch.int32,
                            device=q.device)
    if dk.numel():
        grid = lambda meta: (triton.cdiv(S, meta["BLOCK_N"]) * B * Hkv,)  # noqa: E731
        _attn_bwd_dkdv[grid](q, k, v, DO=do, Lse=lse, Delta=delta, DK=dk, DV=dv, DQ=dq32, Locks=locks,
                             lock_stride=lock_stride, DQ_MODE=dq_mode, USE_TMA=tma_dkdv, **launch)
    if dq_mode == DQ_KERNEL:
        grid = lambda meta: (triton.cdiv(L, meta["BLOCK_M"]) * B * H,)  # noqa: E731
        _attn_bwd_dq[grid](q, k, v, DO=do, Lse=lse, Delta=delta, DQ=dq, USE_TMA=tma_dq, **launch)
    else:
        dq.copy_(dq32)
    if sinks is not None:
        # ds_h = -sum_i exp(s_h - lse_i) delta_i over head h's rows (backward.py's header): a plain
        # reduction in torch's fixed order, deterministic. Every row of lse/delta is a real query row.
        # A row with lse = -inf (no visible key and s_h = -inf) has no sink probability: 0, not NaN.
        p_sink = torch.where(lse == float("-inf"), 0.0, torch.exp(sinks[None, :, None] - lse))  # (Bq, H, Lq)
        res[3].copy_(-(p_sink * delta).sum(dim=(0, 2)))
    return res


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


def compile_variants(quick: bool, dtypes=None, head_dims=None):
    """Call the launchers over every variant that selects different code (dtypes, head dims, causal,
    masks, dropout, GQA, the fp32-output store, decode, GQA packing, tensor descriptors, the three dQ
    modes, fasttx.flash's window, softcap, ALiBi, varlen and paged flags, v's own head dim BLOCK_DV and
    SINK); tools/gpu_compile_check.py compiles them. dtypes / head_dims narrow the sweep (every flag at
    those only: tools/kernel_report.py --attention-flags)."""
    if dtypes is None:
        dtypes = [torch.float16, torch.bfloat16] if quick else [torch.float16, torch.bfloat16, torch.float32]
    if head_dims is None:
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
            for mode in (DQ_ATOMIC, DQ_KERNEL):  # the default DQ_ORDERED compiled above
                q2 = q[:, :, :64]
                out, lse, *out32 = attention_forward(q2, k, v, None, scale=e ** -0.5, return_fp32_out=fp32_out,
                                                     is_causal=True)
                attention_backward(r(1, 4, 64, e, dtype=dt), q2, k, v, None, out32[0] if fp32_out else out, lse,
                                   scale=e ** -0.5, is_causal=True, dq_mode=mode)
            kd, vd = r(1, 2, 4096, e, dtype=dt), r(1, 2, 4096, e, dtype=dt)
            attention_forward(r(1, 4, 1, e, dtype=dt), kd, vd, None, scale=e ** -0.5, decode=True)
            _compile_flash_variants(r, dt, e, quick)
            _compile_pack_tma_variants(r, dt, e, quick)
        _compile_mla_sink_variants(r, dt, quick)


def _compile_mla_sink_variants(r, dt, quick):
    """BLOCK_DV != BLOCK_D (DeepSeek's MLA 192/128, and Ev > E) and SINK (gpt-oss: causal, a window,
    GQA, 64-dim heads): forward and backward, the flash-decoding split and its combine, and (full
    mode) varlen; the kv-cache decode with sinks. Quick mode keeps the launches that compile new
    code (the backward kernels have no SINK flag: with sinks they are the plain ones)."""
    fp32_out = dt != torch.float32
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
    dims = [(192, 128, None), (64, 64, torch.randn(4))]  # (E, Ev, sinks)
    if not quick:
        dims += [(64, 128, None), (192, 128, torch.randn(4))]
    for e, ev, sinks in dims:
        q, k, v = r(2, 4, 128, e, dtype=dt), r(2, 2, 160, e, dtype=dt), r(2, 2, 160, ev, dtype=dt)
        kws = [dict(is_causal=True, causal_offset=32, sinks=sinks),
               dict(is_causal=True, causal_offset=32, window_offset=-96, sinks=sinks)]
        if quick:
            kws = kws[1:] if sinks is not None else kws[:1]
        for kw in kws:
            out, lse, *o32 = attention_forward(q, k, v, None, scale=e ** -0.5, return_fp32_out=fp32_out, **kw)
            attention_backward(r(2, 4, 128, ev, dtype=dt), q, k, v, None, o32[0] if fp32_out else out, lse,
                               scale=e ** -0.5, **kw)
        kd, vd = r(1, 2, 4096, e, dtype=dt), r(1, 2, 4096, ev, dtype=dt)
        attention_forward(r(1, 4, 1, e, dtype=dt), kd, vd, None, scale=e ** -0.5, decode=True, sinks=sinks)
        if sinks is not None or not quick:
            kc, vc = r(1, 2, 2048, e, dtype=dt), r(1, 2, 2048, ev, dtype=dt)
            cache = Seqlens(None, i32([0, 1024]), i32([700, 1024]), 1, 1024)
            attention_forward(r(2, 4, 1, e, dtype=dt), kc, vc, None, scale=e ** -0.5, seqlens=cache, decode=True,
                              is_causal=True, sinks=sinks)
        if quick:
            continue
        qp, kp, vp = r(1, 4, 200, e, dtype=dt), r(1, 2, 230, e, dtype=dt), r(1, 2, 230, ev, dtype=dt)
        seq = Seqlens(i32([0, 1, 200]), i32([0, 30]), i32([30, 200]), 199, 200)
        out, lse, *o32 = attention_forward(qp, kp, vp, None, scale=e ** -0.5, seqlens=seq, is_causal=True,
                                           return_fp32_out=fp32_out, sinks=sinks)
        attention_backward(r(1, 4, 200, ev, dtype=dt), qp, kp, vp, None, o32[0] if fp32_out else out, lse,
                           scale=e ** -0.5, seqlens=seq, is_causal=True, sinks=sinks)


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


def _compile_pack_tma_variants(r, dt, e, quick):
    """The PACK_GQA (forward) and USE_TMA (forward and backward) flags, forced (the launches above
    take the rules: GQA 2 with L <= 16 packs; no TMA for CPU tensors): packed decode with 16-row
    tiles (GQA 2, L = 1: mma.sync) and 64-row ones (GQA 16, L = 4: wgmma on sm_90), unpacked
    decode, each with and without TMA (quick: the 64-row and unpacked ones with one of the two);
    TMA on the dense forward (plain; causal and window + softcap + ALiBi in full) and the kv-cache
    (VARLEN_K) decode; TMA in the backward (_compile_bwd_tma_variants)."""
    kd, vd = r(1, 2, 4096, e, dtype=dt), r(1, 2, 4096, e, dtype=dt)
    for L, hq, pack, tmas in ((1, 4, True, (False, True)), (4, 32, True, (True,) if quick else (False, True)),
                              (1, 4, False, (False,) if quick else (False, True))):
        for tma in tmas:
            attention_forward(r(1, hq, L, e, dtype=dt), kd, vd, None, scale=e ** -0.5, decode=True, is_causal=True,
                              causal_offset=4096 - L, pack_gqa=pack, tma=tma)
    q, k, v = r(1, 4, 128, e, dtype=dt), r(1, 2, 192, e, dtype=dt), r(1, 2, 192, e, dtype=dt)
    variants = [dict()]
    if not quick:
        variants += [dict(is_causal=True, causal_offset=64),
                     dict(is_causal=True, causal_offset=64, window_offset=-32, softcap=20.0,
                          alibi_slopes=torch.rand(4), alibi_offset=64)]
    for kw in variants:
        attention_forward(q, k, v, None, scale=e ** -0.5, tma=True, pack_gqa=False, **kw)
    attention_forward(r(1, 32, 4, e, dtype=dt), k, v, None, scale=e ** -0.5, decode=False, pack_gqa=True, tma=True)
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
    cache = Seqlens(None, i32([0, 2048]), i32([700, 1024]), 1, 1024)
    kc, vc = r(1, 2, 4 * 1024, e, dtype=dt), r(1, 2, 4 * 1024, e, dtype=dt)
    attention_forward(r(2, 4, 1, e, dtype=dt), kc, vc, None, scale=e ** -0.5, seqlens=cache, decode=True,
                      is_causal=True, tma=True)
    _compile_bwd_tma_variants(r, dt, e, quick, variants)


def _compile_bwd_tma_variants(r, dt, e, quick, variants):
    """USE_TMA in the backward (dK/dV streaming Q/dO, the dQ kernel streaming K/V), forced: the dense
    variants of the forward's TMA launches in the default dQ mode and with the dQ kernel (full: all
    three modes, plus dropout, varlen with a window, and v's own head dim); quick: at e = 64 only."""
    if quick and e != 64:
        return
    out32 = lambda *shape: torch.randn(*shape)  # noqa: E731  (compile only: any fp32 out / lse of the shape)
    modes = (DQ_ORDERED, DQ_KERNEL) if quick else (DQ_ORDERED, DQ_ATOMIC, DQ_KERNEL)
    q, k, v = r(1, 4, 128, e, dtype=dt), r(1, 2, 192, e, dtype=dt), r(1, 2, 192, e, dtype=dt)
    if not quick:
        variants = variants + [dict(dropout_p=0.1, seed=3)]
    for kw in variants:
        for mode in modes:
            attention_backward(r(1, 4, 128, e, dtype=dt), q, k, v, None, out32(1, 4, 128, e), out32(1, 4, 128),
                               scale=e ** -0.5, tma=True, dq_mode=mode, **kw)
    if quick:
        return
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
    seq = Seqlens(i32([0, 1, 200]), i32([0, 30]), i32([30, 200]), 199, 200)
    for ev in (e, 128 if e != 128 else 64):
        qp, kp, vp = r(1, 4, 200, e, dtype=dt), r(1, 2, 230, e, dtype=dt), r(1, 2, 230, ev, dtype=dt)
        for mode in modes:
            attention_backward(r(1, 4, 200, ev, dtype=dt), qp, kp, vp, None, out32(1, 4, 200, ev), out32(1, 4, 200),
                               scale=e ** -0.5, seqlens=seq, is_causal=True, window_offset=-64, tma=True,
                               dq_mode=mode)
