"""The static kernel report (tools/kernel_report.py) and what CI holds with it: no attention config that
can run by default spills registers on sm_90 at head dims 64 and 128, fp16 and bf16.

The report compiles for a real GPU target without one (TRITON_INTERPRET unset, in a subprocess: this
test process runs the interpreter) and reads ptxas's register and spill counts. Compiles are cached
by triton (~/.triton/cache), so a rerun reads them back in seconds; the resource counts are kept
beside each cached kernel.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))
import kernel_report  # noqa: E402


def _run_report(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton 3.9 warns when unset; fusion is the GPU default
    out = tmp_path / "report.json"
    r = subprocess.run([sys.executable, str(TOOLS / "kernel_report.py"), "--json", str(out), "--summary", *args],
                       capture_output=True, text=True, env=env, timeout=900)
    if r.returncode == 2 and "UNSUPPORTED" in r.stdout + r.stderr:
        pytest.skip("this triton cannot compile for sm_90 without a GPU: " + (r.stdout + r.stderr).strip()[-300:])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return json.loads(out.read_text()), r.stdout


def test_default_attention_configs_do_not_spill_on_sm90(tmp_path):
    data, text = _run_report(tmp_path, "--arch", "90", "--attention-subset", "--head-dims", "64", "128",
                             "--dtypes", "float16", "bfloat16")
    variants = [kernel_report.Variant(**v) for v in data["variants"]]
    kernels = {v.kernel for v in variants}
    assert {"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"} <= kernels, text
    assert {v.constexprs.get("BLOCK_D") for v in variants if v.kernel == "_attn_fwd"} == {64, 128}
    assert any(v.role == "fixed" for v in variants) and all(v.default for v in variants)
    spilling = [f"{v.kernel} {v.dtype} {v.constexprs} warps={v.num_warps} stages={v.num_stages} ({v.role}): "
                f"{v.spill_stores} B spill stores, {v.regs} registers" for v in variants if v.spills]
    assert spilling == [], "default attention configs that spill on sm_90:\n" + "\n".join(spilling)
    assert all(v.regs > 0 and v.mma for v in variants if v.kernel == "_attn_fwd")  # tensor cores read


def test_occupancy_arithmetic():
    """Resident warps per SM from the per-SM limits (the CUDA occupancy calculator's figures)."""
    occ = kernel_report.occupancy
    assert occ(90, regs=32, shared=0, tmem=0, num_warps=4) == 64  # warp-limited: 16 programs of 4 warps
    assert occ(90, regs=128, shared=0, tmem=0, num_warps=4) == 16  # 128 x 32 x 4 = 16K registers per program
    assert occ(90, regs=255, shared=0, tmem=0, num_warps=8) == 8  # 256 x 32 x 8 = 64K: one program
    assert occ(90, regs=64, shared=100 * 1024, tmem=0, num_warps=4) == 8  # two programs fit 228 KiB
    assert occ(100, regs=64, shared=0, tmem=512, num_warps=4) == 4  # all 512 TMEM columns: one program
    assert occ(90, regs=64, shared=0, tmem=512, num_warps=4) == 32  # no TMEM on sm_90


def test_ptxas_log_parsing_and_instruction_scan():
    log = ("ptxas info    : Compiling entry function '_k' for 'sm_90a'\n"
           "ptxas info    : Function properties for _k\n"
           "    312 bytes stack frame, 312 bytes spill stores, 340 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 312 bytes smem\n")
    assert kernel_report.parse_ptxas_log(log, "_k") == (255, 312, 340, 312)
    assert kernel_report.parse_ptxas_log(log, "_other") is None
    ptx = "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 ...\ncp.async.cg.shared.global [r1], [r2], 16;\n"
    assert kernel_report.instructions(ptx) == (["wgmma"], ["cp.async"])
    ptx = "tcgen05.mma.cta_group::1.kind::f16 ...\ncp.async.bulk.tensor.2d.shared::cluster.global ...\n"
    assert kernel_report.instructions(ptx) == (["tcgen05"], ["TMA"])


def _kept(prune, table, **args):
    import fasttx.kernels.attention as K

    configs = prune(K._configs(table), args)
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in configs]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_attention_pruning_keeps_configs_within_the_register_budget(dtype, monkeypatch):
    """Every config the pruning can return (autotune lists, the fixed choice, the fallback) for every
    head-dim block, dtype and shape class is within the register budget; the configs the report found
    spilling (forward 128x64 4 warps and dK/dV 64x64 4 warps at d=128, fp16, sm_90 and sm_100) are
    never returned; the fixed choice is the autotune list's first."""
    import torch

    import fasttx.kernels.attention as K

    monkeypatch.setattr(K.config, "AUTOTUNE", True)
    q = torch.empty(1, 1, 1, 1, dtype=getattr(torch, dtype))
    for d in (16, 32, 64, 128, 256):
        for lb in (8, 1024):
            for mask in (False, True):
                args = dict(Q=q, Mask=torch.empty(1, dtype=torch.float32), BLOCK_D=d, L_BUCKET=lb, HAS_MASK=mask,
                            WINDOW=mask)  # a window: a flag the backward budgets for
                dkdv = dict(DK=q, DQ_MODE=K.config.DQ_KERNEL)  # the kernel taking DK; its dQ part or not
                for kernel, prune, table, extra in (("fwd", K._prune, K._FWD_GPU, {}),
                                                    ("dkdv", K._prune_bwd, K._BWD_GPU, dkdv),
                                                    ("dkdv+dq", K._prune_bwd, K._BWD_GPU,
                                                     dict(dkdv, DQ_MODE=K.config.DQ_ORDERED)),
                                                    ("dq", K._prune_bwd, K._BWD_GPU, {})):
                    kept = _kept(prune, table, **args, **extra)
                    assert kept, (kernel, d, lb)
                    budget = K.config._budget(kernel, {**args, **extra})
                    if mask and kernel != "fwd":  # WINDOW
                        assert budget == (24 if dtype == "float32" else 48)
                    else:
                        budgets = K.config._REG_TILE_BUDGET_FP32 if dtype == "float32" else K.config._REG_TILE_BUDGET
                        assert budget == budgets[kernel]
                    for bm, bn, w, st in kept:
                        # the fallback (1 stage; nothing fits: d=256 with flags, fp32 with flags) may exceed it:
                        # its tile is the smallest there is
                        if st > 1:
                            assert K.config._tile_values(kernel, bm, bn, d, w) <= budget, (kernel, d, dtype, bm, bn, w)
                        # 8 warps only where 4 exceed the budget, never for fp32 (both spilled: see _fits_registers)
                        assert w == 4 or (dtype != "float32" and K.config._tile_values(kernel, bm, bn, d, 4) > budget
                                          and (bm * bn > 32 * 32 or d == 256 or st == 1
                                               or (kernel == "dkdv+dq" and not mask)))
                    monkeypatch.setattr(K.config, "AUTOTUNE", False)
                    assert _kept(prune, table, **args, **extra) == kept[:1]
                    monkeypatch.setattr(K.config, "AUTOTUNE", True)
    fp16 = dict(Q=torch.empty(1, 1, 1, 1, dtype=torch.float16), Mask=q, BLOCK_D=128, L_BUCKET=1024, HAS_MASK=False)
    assert (128, 64, 4, 3) not in _kept(K._prune, K._FWD_GPU, **fp16)
    assert {(64, 64, 4, 3), (64, 64, 8, 2)}.isdisjoint(_kept(K._prune_bwd, K._BWD_GPU, **fp16, DK=q))
    assert (64, 128, 8, 2) not in _kept(K._prune_bwd, K._BWD_GPU, **fp16)
    assert _kept(K._prune, K._FWD_GPU, **fp16)[0] == (128, 64, 8, 3)
    # spilled 4 B on sm_100 (64 registers), 12-196 B in fp32 on sm_90: two warp groups on a 64x64 tile
    assert (64, 64, 8, 2) not in _kept(K._prune, K._FWD_GPU, **dict(fp16, BLOCK_D=64))
    # d = 256: 64x64 spilled 8-180 B with flags or the fp32 output store; 64x32, 8 warps (4 cannot hold it)
    assert _kept(K._prune, K._FWD_GPU, **dict(fp16, BLOCK_D=256)) == [(64, 32, 8, 2)]
    # head dim 40 (rows not a multiple of 16 elements): 4-warp tiles pipeline at most 2 stages (128x32 with 4
    # stages spilled 408-716 B, 16x128 with 3 stages 4-100 B); the aligned d = 48 keeps them
    d40 = dict(fp16, BLOCK_D=64, E=40, EV=40, stride_qm=40, stride_kn=40, stride_vn=40)
    for lb in (1024, 16):
        kept40 = _kept(K._prune, K._FWD_GPU, **dict(d40, L_BUCKET=lb))
        assert kept40 and all(w == 8 or st <= 2 for _, _, w, st in kept40), kept40
    assert (128, 32, 4, 4) in _kept(K._prune, K._FWD_GPU, **dict(d40, E=48, EV=48, stride_qm=48, stride_kn=48,
                                                                  stride_vn=48))
    assert _kept(K._prune, K._FWD_GPU, **d40)[0] == (128, 64, 8, 3)  # the fixed choice stays
    # and two thirds of the register budgets (128x128 with a mask, dK/dV 32x64 and 64x64 spilled 16-316 B)
    assert [K.config._budget(k, d40) for k in ("fwd", "dkdv", "dkdv+dq", "dq")] == [64, 48, 48, 53]
    assert (128, 128, 8, 3) not in _kept(K._prune, K._FWD_GPU, **d40)
    # d = 16: 64x64 on 4 warps held at 80 registers on sm_100 and spilled 8-28 B
    assert not {(64, 64, 4, 3), (64, 64, 4, 2)} & set(_kept(K._prune, K._FWD_GPU, **dict(fp16, BLOCK_D=16)))
    window = dict(fp16, BLOCK_D=64, WINDOW=True, IS_CAUSAL=True, DK=q)  # spilled 24 B on sm_90 at budget 80
    assert (64, 64, 8, 2) not in _kept(K._prune_bwd, K._BWD_GPU, **window)
    assert (64, 64, 8, 2) in _kept(K._prune_bwd, K._BWD_GPU, **dict(window, WINDOW=False))


def test_launch_choices_that_removed_spills():
    """The choices outside the attention tables that the report's spills led to (each would spill
    again if reverted: bench/NOTES.md's kernel-report section has the before counts)."""
    import torch

    import fasttx.kernels.attention.config as AC
    from fasttx.kernels import gelu, softmax
    from fasttx.kernels.cross_entropy import launch as ce
    from fasttx.kernels.layer_norm import launch as ln
    from fasttx.kernels.moe import config as moe

    assert AC._dot_precision(torch.float32) == "tf32x3"  # "ieee": scalar FMA dots, 0.3-36 KB spilled
    assert AC._dot_precision(torch.bfloat16) == "tf32"  # ignored for 16-bit operands
    assert moe._k_and_warps(torch.float32) == dict(BLOCK_K=16, num_warps=8)  # 64 x 4: 25 KB
    assert moe._k_and_warps(torch.bfloat16) == dict(BLOCK_K=moe.BLOCK_K, num_warps=moe._NUM_WARPS)
    assert gelu._num_warps(4 * 1024) == 16  # 8: 4-12 B at 48-128 registers
    assert ce._block_c(32000) == (4096, 32)  # 16: 4 B at 64 registers
    # fp64 values take two registers (value_words): its tiles hold half the elements at the same
    # warps; at the 16/32-bit tiles they spilled 12-540 B or ran 8-12 warps per SM
    f64 = torch.float64
    block_m, block_n, _, _, warps = gelu._launch_config(64, 1024, 65535, f64)
    assert (block_m, block_n, warps) == (2, 1024, 16)
    assert ce._block_c(32000, f64) == (2048, 32)
    assert softmax.softmax_config(8, 4096, dtype=f64)[1:3] == (1024, True)  # looped past 2048
    assert softmax.softmax_config(8, 2048, dtype=f64)[:3] == (1, 2048, False)
    assert ln.calc_settings(2048, f64)[1:] == (2048, 16, True)
    assert ln.calc_settings(2049, f64)[3] is False  # fp64 rows past MAX_BLOCK_N_FP64 are chunked


def test_attention_fallback_takes_the_register_share():
    """ptxas (triton 3.9) held the attention fallback tile at the count that lets one more program
    reside and spilled there (12-40 B): the fallback passes maxnreg = the SM's whole share."""
    import fasttx.kernels.attention.config as AC
    from fasttx.kernels import _common

    assert [_common.register_share(w) for w in (4, 8, 16, 32)] == [255, 255, 128, 64]
    for kernel, d, budget in (("dkdv", 128, 48), ("dkdv+dq", 64, 24), ("fwd", 256, 96)):
        (c,) = AC._fallback(kernel, 16, 32, d, budget, False)
        assert c.num_stages == 1 and c.maxnreg == _common.register_share(c.num_warps)
    (c,) = AC._configs([(64, 64, 4, 3)])  # the tables leave ptxas its choice
    assert c.maxnreg is None


def test_long_row_norm_forward_holds_and_takes_the_register_share(monkeypatch):
    """The long-row forward holds the first _fwd_hold columns of each row in registers, fewer where
    they spilled, and passes maxnreg = the SM's whole share (one program per SM: ptxas held three
    variants at 64 of their 128 registers and spilled 8-12 B without it); one-block rows do not."""
    import torch

    from fasttx.kernels import _common
    from fasttx.kernels.layer_norm import launch as ln

    assert ln._fwd_hold(torch.float16, 0.1) == ln._fwd_hold(torch.float32, 0.0) == 8192
    assert ln._fwd_hold(torch.float32, 0.1) == 4096  # 8192: 64-88 B at 128 registers
    assert ln._fwd_hold(torch.float64, 0.0) == 2048  # 4096: 60-80 B with a bias or dropout
    launched = []
    monkeypatch.setattr(ln, "_layer_norm_fwd_kernel", type("K", (), {"__getitem__": lambda self, grid: (
        lambda *a, **kw: launched.append(kw))})())
    for n in (8192, 9000):
        ln.layer_norm_forward(torch.randn(2, n), n, None, None, 1e-5)
    single, chunked = launched
    assert single["SINGLE_BLOCK"] and single["maxnreg"] is None
    assert not chunked["SINGLE_BLOCK"] and chunked["HOLD"] == 8192
    assert chunked["maxnreg"] == _common.register_share(chunked["num_warps"]) == 128
