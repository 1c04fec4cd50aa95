"""Attention kernels' configuration: the autotune tables, their pruning and key, the flash-decoding
thresholds and the interpreter overrides (the launchers in launch.py and the kernels' autotune
decorators in forward.py / backward.py read them)."""
import os

import torch
import triton
import triton.language as tl

from .._common import INTERPRETING, register_share

# ------------------------------------------------------------------------------------------------
# Configuration. (BLOCK_M, BLOCK_N, num_warps, num_stages); autotuned per (head-dim block, causal,
# mask, dropout, split, L bucket, S bucket) and per input dtype (the autotuner adds every tensor
# argument's dtype to the key). The first config of a table that survives pruning is the fixed
# choice when autotuning is off. Every BLOCK_N divides _SPLIT_ALIGN, so a flash-decoding split of
# a multiple of _SPLIT_ALIGN keys is a whole number of key blocks whatever config wins.
# Register budget (_REG_TILE_BUDGET, below): the pruning drops every config whose fp32 tiles held in
# registers exceed it, so that no config that can run spills (tools/kernel_report.py checks it on
# sm_90 and sm_100; tests/test_kernel_report.py in CI). The tables are ordered so that the first
# config left is a good fixed choice: 128x64 with 8 warps before 4 (4 warps spilled at head dim 128).
# Two 16-row configs are gone though within the budget: they spilled a few bytes at under 100
# registers on sm_90 (forward 16x32 4 stages at d=256: 4 B; the backward's 16x32 dK/dV at d=64:
# 12 B); 16x64 takes their place. So is the forward's 16x64 with 3 stages (12 B at 128 registers,
# causal, d=128, sm_100); 2 stages stayed clean on both. The backward's 32x64 8-warp tile has 3 stages:
# with 2, ptxas held the causal dK/dV (d = 64) at 64 registers and the causal dQ (d = 256) at 128 on
# sm_100 and spilled 4 B each (triton 3.9 passes --regAllocOptLevel=2; without it, none); with 3, 69.
# The forward's 64x128 4-warp tile is gone (96 values at d = 64: 16 B with sinks + varlen on sm_90);
# 64x32 8 warps is d = 256's (16-bit) tile: its 64x64 sat at 251-255 registers and spilled 8-180 B
# with the fp32 output store, dropout, a window, softcap, ALiBi or packed GQA, 64x32 at 183-198.
# ------------------------------------------------------------------------------------------------
_FWD_GPU = [
    (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 32, 4, 4),
    (64, 64, 4, 3), (64, 32, 4, 4), (64, 64, 4, 2), (64, 64, 8, 2), (64, 32, 8, 2),
    (16, 64, 4, 2), (16, 128, 4, 3),
]
_BWD_GPU = [  # dK/dV kernel: BLOCK_N key rows resident, BLOCK_M query rows streamed (dQ: swapped)
    (64, 64, 8, 2), (64, 64, 4, 3), (64, 128, 8, 2), (32, 128, 4, 2), (32, 64, 4, 3), (32, 64, 8, 3),
    (32, 32, 4, 3), (16, 64, 4, 2), (32, 32, 8, 2),
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


# How the attention backward forms dQ (backward.py explains the three): DQ_ORDERED unless
# FASTTX_ATTN_DQ=atomic|kernel|ordered (read once, at import) says otherwise.
DQ_KERNEL, DQ_ATOMIC, DQ_ORDERED = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
_DQ_MODES = {"kernel": DQ_KERNEL, "atomic": DQ_ATOMIC, "ordered": DQ_ORDERED}
_dq_env = os.environ.get("FASTTX_ATTN_DQ", "ordered").strip().lower()
if _dq_env not in _DQ_MODES:
    raise ValueError(f"FASTTX_ATTN_DQ must be one of {sorted(_DQ_MODES)}, got {_dq_env!r}")
DQ_MODE = _DQ_MODES[_dq_env]


def _upcast_dots(dtype) -> bool:
    return INTERPRETING and dtype != torch.float32


# tl.dot's input precision. fp32 inputs: "tf32x3", three TF32 tensor-core products per tile GEMM
# (each operand split into its TF32 part and the TF32 rounding of the rest; only the small x small
# term, ~2^-22 relative, is dropped): what torch's own fp32 SDPA runs on sm_80+ (its memory-
# efficient kernel, the fp32 backend, uses CUTLASS's 3xTF32 operator), near fp32's accuracy. The
# exact "ieee" dot has no tensor-core form: triton emits it as scalar FMAs with each thread holding
# whole head-dim rows of both operands, and every fp32 config spilled 0.3-36 KB on sm_90 (d = 64,
# 8 warps: 32 registers, 11-36 KB of spills). 16-bit operands ignore the setting.
def _dot_precision(dtype) -> str:
    return "tf32x3" if dtype == torch.float32 else "tf32"


# Flash-decoding (split the keys across programs, combine partials) is used when the queries are
# few and the keys many: L <= _DECODE_MAX_L and S >= _DECODE_MIN_S, without dropout (inference).
_DECODE_MAX_L = 16
_DECODE_MIN_S = 512

# Kernel variants (PACK_GQA forward only), each chosen here and nowhere else (the launchers call these rules;
# AttnOptions.pack_gqa / .tma or FASTTX_ATTN_PACK_GQA / FASTTX_ATTN_TMA = 0 or 1, read at each
# launch, force them off or on where the inputs allow).
#
# PACK_GQA: with few queries per head an unpacked program pads its L rows to a 16-row block and each
# of a kv head's GROUPS query heads loads that kv head's K/V again. Packed, one program per (batch,
# kv head[, key split]) takes the GROUPS x L (head, query) rows: K/V bytes drop by GROUPS and the
# tile GEMM has GROUPS * L rows (16 run mma.sync, 64 reach wgmma on sm_90). It pays while the
# unpacked blocks are mostly padding: L <= _DECODE_MAX_L (the 16-row class; longer L fills 64- and
# 128-row blocks and shares K/V tiles across its own rows already), GROUPS > 1, no dropout (training;
# the packed kernel supports it, the rule leaves it out). Dense queries only (the packed rows of a
# varlen batch would differ per sequence).
_PACK_GQA_MAX_L = _DECODE_MAX_L


def _forced(env, option):
    """The option if given, else the environment variable env ("0"/"1"), else None (the rule decides)."""
    if option is not None:
        return bool(option)
    value = os.environ.get(env, "").strip()
    return None if value == "" else value not in ("0", "false", "False")


def _pack_gqa(groups, L, dropout_p, varlen_q, option=None) -> bool:
    forced = _forced("FASTTX_ATTN_PACK_GQA", option)
    if varlen_q or forced is False:
        return False
    return bool(forced) or (groups > 1 and L <= _PACK_GQA_MAX_L and dropout_p == 0.0)


# USE_TMA: the streamed tiles through tensor descriptors (the copy engine: cp.async.bulk.tensor) on sm_90 /
# sm_100: K/V in the forward and the dQ kernel, Q/dO in dK/dV (the backward passes those as k, v here).
# Needs tl.make_tensor_descriptor (triton 3.6 and 3.9 have it and compile it for sm_90), 16-byte
# aligned base pointers and row/batch/head strides, and no paged cache (a key block may span pages).
# Varlen keys are fine: each program's descriptor starts at its sequence and ends at its last key.
# The descriptors are built on the device (a 128-byte global scratch per program, allocated at
# launch through triton.set_allocator): no host encoding per launch, and the autotuned BLOCK_N is
# the descriptor's box without config hooks. Off under the interpreter unless forced (its
# descriptors are what the tests exercise) and on older GPUs: the pointer path (cp.async pipelining).
# fp32 inputs keep the pointer path unless forced: their TMA variants spilled 4-12 B where the pointer
# ones did not (dQ 16x64 causal and forward 64x64 at d = 64, sm_90), and fp32 is not the fast path.
# No persistent grid: the forward's grids are one program per (query block, head) or, decoding, sized
# to ~2 programs per SM by the key split; a persistent loop pays with warp-specialised producer /
# consumer pipelines (FA3), which triton's attention gets only from its own autoWS, and no GPU
# measurement backs it here.
def _use_tma(q, k, v, paged, option=None, args=None) -> bool:
    """args: the backward's launch arguments. With dropout, a window or varlen it runs its smallest
    tiles (_REG_TILE_BUDGET_BWD_FLAGS), where the descriptors' registers tipped the 16x32 fallback
    into spilling (16-36 B, sm_90): the pointer path there unless forced."""
    forced = _forced("FASTTX_ATTN_TMA", option)
    if forced is False or paged or not hasattr(triton.language, "make_tensor_descriptor"):
        return False
    aligned = all(t.data_ptr() % 16 == 0 and t.stride(2) > 0
                  and all(st * t.element_size() % 16 == 0 for st in t.stride()[:3]) for t in (k, v))
    if not aligned:
        return False
    if forced:
        return True
    if args is not None and any(args.get(f) for f in _BWD_FLAGS):
        return False
    return (q.is_cuda and not INTERPRETING and q.dtype != torch.float32
            and torch.cuda.get_device_capability(q.device)[0] in (9, 10))


def _configs(table):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in table]


def _fixed(kept):
    return kept if AUTOTUNE else kept[:1]


# fp32 values per thread of the tiles a program keeps in registers, at most, per kernel. Each thread
# also holds operand fragments, pointers, offsets and the flags' state: measured with
# tools/kernel_report.py (triton 3.9, fp16/bf16), forward configs estimated at 128 used 200-255
# registers and some spilled (128x64 4 warps at d=128: 312 B on sm_90, 560 B on sm_100), those at 96
# or below stayed at <= 220 registers, causal included; the backward kernels hold more beside their
# tiles: at 96 the causal dK/dV (64x64 8 warps, d=128) spilled 24 B and dQ (64x128 8 warps) 4 B on
# sm_90, so they get 80; the dK/dV kernel 72: alone (FASTTX_ATTN_DQ=kernel) its causal 32x64 8 warps
# (80, d = 128) spilled 84 B in one specialisation on sm_90, and forming dQ parts its 64x64 8 warps
# (80, d = 64) 16-36 B with softcap, ALiBi or causal TMA on sm_100 (clean in other shapes: the edge);
# with atomic dQ parts 8 less again (64x64 at d = 64: 16 B on sm_90 at 80).
_REG_TILE_BUDGET = {"fwd": 96, "dkdv": 72, "dkdv+dq": 72, "dq": 80}
# fp32 inputs: their tf32x3 dots hold each operand fragment as fp32 and split it in two (the TF32 part
# and the rest), so fewer tile values fit: at d = 64 the forward's 64x32 4-warp tile (48 values)
# spilled 8-28 B on sm_100 and the dQ kernel's 32x64 (48) 220 B on sm_90; at 32 (forward) and 40
# none did. With flags the backward falls back to its smallest tile (16x32, 4 warps).
_REG_TILE_BUDGET_FP32 = {"fwd": 32, "dkdv": 40, "dkdv+dq": 40, "dq": 40}
# fp32 runs the kernels on a GPU only at the head dims whose fp32 tiles compiled without spilling on
# sm_90 and sm_100: multiples of 16 in (32, 64] (BLOCK_D = 64, aligned rows). Above 64 every config
# spilled (every tile from 16x32 to 128x32, 4 and 8 warps, forward and backward: 8 B - 41 KB at d = 128
# and 256); at d = 16 the 16-row decode tiles and the dQ kernel 12-724 B; at d = 40 (rows not a multiple
# of 16 elements) even the 16x32 fallback 4-72 B; d = 32 was not compiled. Other head dims run torch's
# attention (gpu_limit), its fp32 kernel a 3xTF32 one too. The interpreter has no registers and runs them.
FP32_HEAD_DIMS = (48, 64)


def gpu_limit(q, v) -> "str | None":
    """Why the attention kernels do not take a call with query q and value v on a GPU (the callers run
    torch's attention instead and say so once), or None."""
    dims = (q.shape[-1], v.shape[-1])
    if q.is_cuda and q.dtype == torch.float32 and any(d not in FP32_HEAD_DIMS for d in dims):
        return (f"float32 with head dims {dims[0]} / {dims[1]}: the kernels hold fp32 tiles in registers without "
                f"spilling (sm_90, sm_100) only at head dims {' and '.join(map(str, FP32_HEAD_DIMS))}")
    return None
# The backward with dropout, a window or varlen sequences holds their state too: at 64-80 causal+window
# dK/dV (64x64 8 warps at d=64, 32x64 8 warps at d=128 with varlen) spilled 8-24 B and dQ with
# dropout (64x128 8 warps, d=64) 76 B on sm_90, so 48 there (masks, softcap, ALiBi: clean at 80).
_REG_TILE_BUDGET_BWD_FLAGS = 48
_BWD_FLAGS = ("HAS_DROPOUT", "WINDOW", "VARLEN_Q", "VARLEN_K")


def _tile_values(kernel, bm, bn, d, warps) -> float:
    """fp32 tile values per thread of one attention program: the forward holds its output
    accumulator (BLOCK_M x d) and the scores (BLOCK_M x BLOCK_N); dK/dV holds both accumulators
    (2 BLOCK_N x d) and the scores and their gradient (2 BLOCK_M x BLOCK_N); dQ its accumulator
    (BLOCK_M x d) and the same two score tiles; dK/dV forming dQ parts adds a (BLOCK_M x d) tile."""
    if kernel == "fwd":
        values = bm * (d + bn)
    elif kernel == "dkdv":
        values = 2 * bn * d + 2 * bm * bn
    elif kernel == "dkdv+dq":  # and the (BLOCK_M x d) dQ part of the ordered / atomic modes
        values = 2 * bn * d + 2 * bm * bn + bm * d
    else:
        values = bm * d + 2 * bm * bn
    return values / (32 * warps)


def _unaligned(args) -> bool:
    """Row strides or head dims that are not a multiple of 16 elements (head dim 40, 72, ...): triton
    then knows no alignment of the Q/K/V rows and loads them element by element, each pipeline stage
    holding its own addresses. At d = 40 (16-bit) on sm_90 / sm_100 the forward's 4-warp 128x32 with 4
    stages spilled 408-716 B and 16x128 with 3 stages 4-100 B (the aligned d = 48, same tiles: 168
    registers), 128x128 with a mask 16 B, the dK/dV kernel's 32x64 and 64x64 8-warp tiles 24-316 B:
    there the budgets are two thirds and 4-warp forward tiles pipeline at most 2 stages."""
    return any(args.get(a, 0) % 16 for a in ("stride_qm", "stride_kn", "stride_vn", "E", "EV"))


def _budget(kernel, args) -> int:
    """The register budget of `kernel` for this launch: per input dtype (_REG_TILE_BUDGET_FP32) and
    flags (_BWD_FLAGS; fp32: half of it); two thirds of it for unaligned rows (_unaligned)."""
    fp32 = args["Q"].element_size() == 4
    if kernel != "fwd" and any(args.get(f) for f in _BWD_FLAGS):
        budget = _REG_TILE_BUDGET_BWD_FLAGS // 2 if fp32 else _REG_TILE_BUDGET_BWD_FLAGS
    else:
        budget = (_REG_TILE_BUDGET_FP32 if fp32 else _REG_TILE_BUDGET)[kernel]
    return budget * 2 // 3 if _unaligned(args) else budget


def _fits_registers(kernel, c, d, budget, fp32) -> bool:
    """The config's tiles fit the budget, and it has 8 warps only where the same tile with 4 would not
    fit (fp32: never), and on a 32x32 tile only at d = 256 or in the dK/dV kernel that forms dQ parts
    without flags. Two warp groups on a tile one could hold split its rows or columns for nothing:
    ptxas then held 64x64 forward tiles (d = 64) at 64 registers on sm_100 and spilled 4 B, and
    32x32 backward ones at 128 on sm_90 and spilled 40-56 B (dK/dV alone at d = 128 with softcap or
    ALiBi; dK/dV + dQ parts at d = 64 with varlen); the latter at d = 128 unflagged held 170-178
    (softcap and ALiBi too) on sm_90 and sm_100 without spilling. fp32's 8-warp tiles spilled
    4-1732 B on sm_90 whatever their size."""
    bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
    if _tile_values(kernel, bm, bn, d, c.num_warps) > budget:
        return False
    if c.num_warps == 4:
        return True
    small_ok = d >= 256 or (kernel == "dkdv+dq" and budget == _REG_TILE_BUDGET[kernel])
    return not fp32 and _tile_values(kernel, bm, bn, d, 4) > budget and (bm * bn > 32 * 32 or small_ok)


def _fallback(kernel, bm, bn, d, budget, fp32):
    """The config when nothing in the table fits: small tiles without pipelining, 8 warps if 4 would
    exceed the register budget (head dim 256; fp32: always 4), and the whole register share of the
    SM (register_share): with no smaller tile left, a second resident program is what gives way.
    ptxas held the dK/dV fallback (d = 128, dropout + window + softcap + ALiBi, 8 warps) at 128
    registers and spilled 12 B on sm_100, and with descriptors under window + varlen 16-40 B; with
    the share the flag sweep's 41 fallback variants hold 144-205 and none spills (14 of them run
    one program fewer per SM than before: 8-12 warps, not 12-16)."""
    warps = 4 if fp32 or _tile_values(kernel, bm, bn, d, 4) <= budget else 8
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=1,
                          maxnreg=register_share(warps))]


def _prune(configs, named_args, **kwargs):
    """Drop configs that cannot fit or waste work: query blocks of 16 only for short L (decode-like)
    and not otherwise; smaller tiles and fewer stages as the head dim (and fp32 operands) grow
    (shared memory ~ stages * (BLOCK_M + 2 BLOCK_N) * BLOCK_D * bytes); tiles over the register
    budget (_tile_values)."""
    if len(configs) == 1:
        return configs
    args = {**named_args, **kwargs}
    d, short_l = max(args["BLOCK_D"], args.get("BLOCK_DV", 0)), args["L_BUCKET"] <= 16  # the wider of q/k and v
    wide = args["Q"].element_size() * d  # bytes per row of a tile
    fp32, budget = args["Q"].element_size() == 4, _budget("fwd", args)
    # Flags that work on the score tile (masks, dropout, softcap, ALiBi, sinks, varlen and packed rows'
    # indices) cost registers per score: with them 128x128 (8 warps, d = 64: 64 scores per thread)
    # spilled 100-3892 B on sm_90 / sm_100, so at most 32 scores per thread; packed rows 16 (128x64
    # and 64x64 with packed GQA and a kv cache spilled 20-28 B at d = 128). d = 256 with flags: even 64x32
    # spilled (4 B with dropout, window, softcap and ALiBi; 16 B packed): 16-row tiles or the fallback.
    flagged = any(args.get(f) for f in _BWD_FLAGS + ("SOFTCAP", "ALIBI", "SINK", "PACK_GQA"))
    unaligned = _unaligned(args)
    mask_bytes = _mask_bytes(args)
    kept = []
    for c in configs:
        bm, bn, st = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages
        if (bm == 16) != short_l:
            continue
        if st * ((bm + 2 * bn) * wide + bm * bn * mask_bytes) > 200 * 1024:  # H100: 227 KiB/block
            continue
        if wide >= 512 and (bm * bn > 64 * 32 or (flagged and bm > 16)):  # d=256 16-bit, d>=128 fp32
            continue
        if flagged and bm * bn > (16 if args.get("PACK_GQA") else 32) * 32 * c.num_warps:
            continue
        if unaligned and c.num_warps == 4 and st > 2:
            continue
        if d == 16 and (bm, bn, c.num_warps) == (64, 64, 4):  # sm_100: held at 80 registers, 8-28 B spilled
            continue
        if not _fits_registers("fwd", c, d, budget, fp32):
            continue
        kept.append(c)
    # Nothing fits (e.g. fp32 with d=256): small tiles without pipelining always do.
    return _fixed(kept) or _fallback("fwd", 16 if short_l else 32, 32, d, budget, fp32)


def _mask_bytes(args) -> int:
    """Bytes per element of the mask tile the kernel streams beside K and V (0 without a mask).
    It is pipelined like them: a (BLOCK_M, BLOCK_N) fp32 mask tile can outweigh the K/V tiles at
    small head dims (fp32, d=16, 128x128, 3 stages overflowed sm_90's shared memory)."""
    return args["Mask"].element_size() if args.get("HAS_MASK") else 0


def _prune_bwd(configs, named_args, **kwargs):
    """Shared memory as the forward (two more BLOCK_M rows: dO beside Q), the register budget per
    kernel (dK/dV, the one taking DK, with its dQ part unless DQ_MODE is DQ_KERNEL; or dQ) and per
    flags (_budget)."""
    args = {**named_args, **kwargs}
    if len(configs) == 1:
        return configs
    d = max(args["BLOCK_D"], args.get("BLOCK_DV", 0))  # the wider of q/k and v
    kernel = "dkdv" if "DK" in args else "dq"
    if kernel == "dkdv" and args.get("DQ_MODE", DQ_KERNEL) != DQ_KERNEL:
        kernel = "dkdv+dq"  # it also forms each query block's dQ part
    budget = _budget(kernel, args) - (8 if args.get("DQ_MODE") == DQ_ATOMIC else 0)
    wide = args["Q"].element_size() * d
    fp32 = args["Q"].element_size() == 4
    mask_bytes = _mask_bytes(args)
    kept = [c for c in configs
            if c.num_stages * ((2 * c.kwargs["BLOCK_M"] + 2 * c.kwargs["BLOCK_N"]) * wide
                               + c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * mask_bytes) <= 200 * 1024
            and not (wide >= 512 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 32 * 64)
            and _fits_registers(kernel, c, d, budget, fp32)]
    return _fixed(kept) or _fallback(kernel, 16, 32, d, budget, fp32)


_KEY = ["BLOCK_D", "IS_CAUSAL", "HAS_MASK", "HAS_DROPOUT", "WINDOW", "SOFTCAP", "ALIBI", "VARLEN_Q", "VARLEN_K",
        "PAGED", "L_BUCKET", "S_BUCKET", "BLOCK_DV"]
