"""Static kernel report: what every fasttx kernel variant costs on the GPU, read from its compile, without a GPU.

tools/gpu_compile_check.py turns every launch of each kernel file's `compile_variants(quick)` into a
compile for an NVIDIA target (no GPU: a stand-in driver; autotuned kernels compile every config their
pruning keeps). This tool reads each compiled variant and reports, per arch (sm_90, and sm_100 where
the installed triton's bundled ptxas knows it):

- registers per thread and spill bytes (ptxas -v: "bytes spill stores / loads"; the log of the compile
  itself, or ptxas re-run on the PTX when the kernel came from triton's cache; kept beside it there);
- shared memory and TMEM columns (the compile's metadata: `shared`, `tmem_size` where triton has it);
- resident warps per SM, from registers, shared memory, TMEM and warps per program (the occupancy
  calculator's arithmetic with the limits in ARCH_LIMITS);
- the MMA instructions in the PTX (wgmma / tcgen05 / mma.sync) and the copy path (TMA
  cp.async.bulk.tensor / cp.async);
- the variant's role: "fixed" (the first config an autotuned launch's pruning keeps: what
  FASTTX_AUTOTUNE=0 runs), "autotune" (the others pruning keeps), "single" (no autotuning), all three
  "default" (can run by default); with --pruned also the configs pruning drops ("pruned", not default).

    python tools/kernel_report.py                          # all kernels, sm_90 and sm_100, markdown
    python tools/kernel_report.py --arch 90 --quick --modules attention --json report.json
    python tools/kernel_report.py --summary                # per kernel and arch: variants, spills

One arch per process (triton keeps one target per device in a process): the CLI runs a subprocess per
arch; `collect(arch, ...)` is the in-process API. Run with TRITON_INTERPRET unset. The importable
pieces (`collect`, `summarize`, `markdown`, `occupancy`) are what tests/test_kernel_report.py uses.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_compile_check  # noqa: E402  (the compile-only driver and the compile_variants loop)

# Per-SM limits (CUDA occupancy calculator, compute capability 9.0 and 10.0): 64K 32-bit registers
# allocated per warp in units of 256, 64 resident warps, 32 resident programs (CTAs), 228 KiB of
# shared memory with 1 KiB reserved per program, and on sm_100 512 TMEM columns.
ARCH_LIMITS = {
    90: dict(regs=65536, reg_unit=256, warps=64, programs=32, smem=233472, smem_reserved=1024, tmem=0),
    100: dict(regs=65536, reg_unit=256, warps=64, programs=32, smem=233472, smem_reserved=1024, tmem=512),
}
ROLE_ORDER = ("fixed", "autotune", "single", "pruned")  # the strongest role of a binary reached twice wins
_CACHE_FILE = "fasttx_ptxas_v1.json"


@dataclass
class Variant:
    """One compiled binary (variants reached by several launches are counted once)."""
    kernel: str
    arch: int
    role: str
    dtype: str
    constexprs: dict
    num_warps: int
    num_stages: int
    regs: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int
    tmem: int
    warps_per_sm: int
    mma: list = field(default_factory=list)
    copy: list = field(default_factory=list)
    hash: str = ""

    @property
    def default(self) -> bool:
        return self.role != "pruned"

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


def occupancy(arch: int, regs: int, shared: int, tmem: int, num_warps: int) -> int:
    """Resident warps per SM: whole programs (CTAs) limited by registers (allocated per warp in units
    of 256), shared memory (plus the 1 KiB reserved per program), TMEM columns, warps and programs."""
    lim = ARCH_LIMITS.get(arch, ARCH_LIMITS[90])
    per_warp = -(-max(regs, 1) * 32 // lim["reg_unit"]) * lim["reg_unit"]
    programs = min(lim["programs"], lim["warps"] // num_warps, (lim["regs"] // per_warp) // num_warps,
                   lim["smem"] // (shared + lim["smem_reserved"]))
    if tmem and lim["tmem"]:
        programs = min(programs, lim["tmem"] // tmem)
    return max(programs, 0) * num_warps


def parse_ptxas_log(log: str, name: str):
    """(registers, spill stores, spill loads, stack frame) of entry `name` from a `ptxas -v` log, or None."""
    sections = re.split(r"Compiling entry function '", log)
    for sec in sections[1:]:
        if not sec.startswith(name + "'"):
            continue
        regs = re.search(r"Used (\d+) registers", sec)
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", sec)
        if regs is None:
            return None
        st, ss, sl = (int(x) for x in frame.groups()) if frame else (0, 0, 0)
        return int(regs.group(1)), ss, sl, st
    return None


def _ptxas_args():
    """ptxas and the flags triton's make_cubin passes besides -o (checked in its source, triton 3.6 to 3.9)."""
    import inspect

    from triton.backends.nvidia import compiler

    src = inspect.getsource(compiler.CUDABackend.make_cubin)
    return ["-lineinfo", "-v"] + (["--regAllocOptLevel=2"] if "regAllocOptLevel=2" in src else [])


def _run_ptxas(ptx: str, arch: int, fp_fusion: bool) -> str:
    from triton.backends.nvidia import compiler

    try:
        ptxas = compiler.get_ptxas(arch).path
    except TypeError:  # older triton: one ptxas
        ptxas = compiler.get_ptxas().path
    target = re.search(r"\.target (sm_\w+)", ptx).group(1)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas, *_ptxas_args(), *([] if fp_fusion else ["--fmad=false"]), f"--gpu-name={target}", src,
               "-o", os.path.join(d, "k.o")]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stderr


def _resources(kernel, arch: int, log: str):
    """ptxas resources of a compiled kernel: from the log of its compile (captured), else from triton's
    cache directory (written here the first time), else by running ptxas -v on its PTX."""
    from triton.runtime.cache import get_cache_manager

    name = kernel.metadata.name
    cache = get_cache_manager(kernel.hash)
    res = parse_ptxas_log(log, name) if log else None
    if res is None:
        path = cache.get_file(_CACHE_FILE)
        if path is not None:
            with open(path) as f:
                return tuple(json.load(f))
        res = parse_ptxas_log(_run_ptxas(kernel.asm["ptx"], arch, getattr(kernel.metadata, "enable_fp_fusion", True)),
                              name)
    if res is None:
        raise RuntimeError(f"no ptxas resource line for {name}")
    cache.put(json.dumps(res), _CACHE_FILE, binary=False)
    return res


def instructions(ptx: str):
    """(MMA kinds, copy paths) used by a kernel's PTX."""
    mma = [k for k, pat in (("wgmma", r"\bwgmma\.mma_async"), ("tcgen05", r"\btcgen05\.mma"),
                            ("mma.sync", r"\bmma\.sync")) if re.search(pat, ptx)]
    copy = [k for k, pat in (("TMA", r"\bcp\.async\.bulk\.tensor"), ("cp.async", r"\bcp\.async\.c[ag]\b"))
            if re.search(pat, ptx)]
    return mma, copy


def _dtype(args, kwargs) -> str:
    for a in list(args) + list(kwargs.values()):
        if hasattr(a, "dtype") and hasattr(a, "data_ptr"):
            return str(a.dtype).replace("torch.", "")
    return "-"


def collect(arch: int = 90, quick: bool = False, modules=None, pruned_too: bool = False, launches=None,
            max_configs=None):
    """Compile every variant for `arch` in this process and return (variants, errors): one Variant per
    distinct binary, errors as gpu_compile_check records them. `launches` (a callable) replaces the
    kernel files' compile_variants (a subset); max_configs as gpu_compile_check's (the largest tiles
    of each autotuned launch only). Call once per process (one target per process)."""
    import triton

    with contextlib.suppress(AttributeError):
        triton.knobs.nvidia.dump_ptxas_log = True  # the compile prints its ptxas -v log: captured below
    from triton.runtime.jit import JITFunction

    last_log = [""]
    run = JITFunction.run

    def run_capturing(self, *args, **kwargs):
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                return run(self, *args, **kwargs)
        finally:
            last_log[0] = buf.getvalue()

    JITFunction.run = run_capturing
    variants = {}

    def on_compile(fn, args, kwargs, kernel, role):
        prev = variants.get(kernel.hash)
        if prev is not None:
            if ROLE_ORDER.index(role) < ROLE_ORDER.index(prev.role):
                prev.role = role
            return
        regs, spill_st, spill_ld, stack = _resources(kernel, arch, last_log[0])
        md = kernel.metadata
        tmem = getattr(md, "tmem_size", 0) or 0
        mma, copy = instructions(kernel.asm["ptx"])
        names = {p.name for p in fn.params if p.is_constexpr}
        consts = {k: v if isinstance(v, (bool, int, float, str, type(None))) else str(v)
                  for k, v in kwargs.items() if k in names and k not in ("num_warps", "num_stages")}
        variants[kernel.hash] = Variant(
            kernel=fn.__name__, arch=arch, role=role, dtype=_dtype(args, kwargs), constexprs=consts,
            num_warps=md.num_warps, num_stages=md.num_stages, regs=regs, spill_stores=spill_st,
            spill_loads=spill_ld, stack=stack, shared=md.shared, tmem=tmem,
            warps_per_sm=occupancy(arch, regs, md.shared, tmem, md.num_warps), mma=mma, copy=copy, hash=kernel.hash)

    _, errors = gpu_compile_check.install_compile_only_driver(arch, max_configs, on_compile, pruned_too)
    if launches is not None:
        launches()
    else:
        gpu_compile_check.launch_all(quick, modules)
    return list(variants.values()), errors


def attention_subset(head_dims=(64, 128), dtypes=("float16", "bfloat16"), causal=(False, True), decode=False):
    """A launches callable for `collect`: the attention forward and backward without masks, dropout or
    fasttx.flash's flags (the configs a plain model runs) at each head dim and dtype, non-causal and
    causal, the forward and the backward also through tensor descriptors (USE_TMA: the default on
    sm_90 / sm_100 for 16-bit inputs, which CPU tensors do not select by themselves), the backward in the default dQ
    mode and with the separate dQ kernel; decode=True adds 16-query forwards (the BLOCK_M=16 configs
    pruning keeps for short L) and a GQA decode step (4 query heads per kv head: PACK_GQA's packed rows)."""
    def launches():
        import torch

        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from fasttx.kernels.attention import attention_backward, attention_forward
        from fasttx.kernels.attention.config import DQ_KERNEL, DQ_MODE

        for dt in (getattr(torch, d) for d in dtypes):
            for e in head_dims:
                q, k, v = (torch.randn(1, 2, 256, e, dtype=dt) for _ in range(3))
                tmas = (False,) if dt == torch.float32 else (False, True)  # config._use_tma: fp32 by pointers
                for c in causal:
                    fp32_out = dt != torch.float32
                    for tma in tmas:
                        out, lse, *o32 = attention_forward(q, k, v, None, scale=e ** -0.5, is_causal=c,
                                                           return_fp32_out=fp32_out, tma=tma)
                    for dq_mode in (DQ_MODE, DQ_KERNEL):  # the default dQ mode, and FASTTX_ATTN_DQ=kernel's dQ kernel
                        for tma in tmas:  # the streamed tiles by pointers, and through tensor descriptors
                            attention_backward(torch.randn_like(q), q, k, v, None, o32[0] if fp32_out else out, lse,
                                               scale=e ** -0.5, is_causal=c, dq_mode=dq_mode, tma=tma)
                    if decode:
                        for tma in tmas:
                            attention_forward(q[:, :, :16], k, v, None, scale=e ** -0.5, is_causal=c, decode=False,
                                              tma=tma)
                            gqa = torch.randn(1, 8, 1, e, dtype=dt)
                            attention_forward(gqa, k, v, None, scale=e ** -0.5, is_causal=c, tma=tma)
    return launches


def attention_flags(head_dims, dtypes):
    """A launches callable for `collect`: the attention kernel file's full compile_variants (every
    flag, mask, dropout, varlen, paged, packing, TMA and dQ-mode variant) at these head dims and dtypes
    only (the MLA / sinks launches, which fix their own head dims, come with each dtype)."""
    def launches():
        import torch

        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from fasttx.kernels.attention import compile_variants

        compile_variants(False, dtypes=[getattr(torch, d) for d in dtypes], head_dims=list(head_dims))
    return launches


def summarize(variants):
    """Per (kernel, arch): variants, default variants, default variants that spill (and their largest
    spill), pruned variants that spill, largest registers, fewest resident warps per SM of a default one."""
    rows = {}
    for v in variants:
        r = rows.setdefault((v.kernel, v.arch), dict(kernel=v.kernel, arch=v.arch, variants=0, default=0,
                                                    default_spill=0, max_spill=0, pruned_spill=0, max_regs=0,
                                                    min_warps_per_sm=None))
        r["variants"] += 1
        r["max_regs"] = max(r["max_regs"], v.regs)
        if v.default:
            r["default"] += 1
            r["default_spill"] += v.spills
            r["max_spill"] = max(r["max_spill"], v.spill_stores)
            w = r["min_warps_per_sm"]
            r["min_warps_per_sm"] = v.warps_per_sm if w is None else min(w, v.warps_per_sm)
        else:
            r["pruned_spill"] += v.spills
    return [rows[k] for k in sorted(rows)]


def _consts(c: dict) -> str:
    return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in c.items())


def markdown(variants, summary_only=False) -> str:
    out = ["| kernel | sm | variants | default | default spilling | largest spill (B) | pruned spilling "
           "| max regs | min warps/SM |", "|---|---|---|---|---|---|---|---|---|"]
    for r in summarize(variants):
        out.append(f"| {r['kernel']} | {r['arch']} | {r['variants']} | {r['default']} | {r['default_spill']} "
                   f"| {r['max_spill']} | {r['pruned_spill']} | {r['max_regs']} | {r['min_warps_per_sm']} |")
    if summary_only:
        return "\n".join(out) + "\n"
    out += ["", "| kernel | sm | role | dtype | warps | stages | regs | spill st/ld (B) | smem (B) | tmem "
            "| warps/SM | mma | copy | constexprs |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for v in sorted(variants, key=lambda v: (v.kernel, v.arch, v.dtype, _consts(v.constexprs), v.num_warps)):
        out.append(f"| {v.kernel} | {v.arch} | {v.role} | {v.dtype} | {v.num_warps} | {v.num_stages} | {v.regs} "
                   f"| {v.spill_stores}/{v.spill_loads} | {v.shared} | {v.tmem} | {v.warps_per_sm} "
                   f"| {','.join(v.mma) or '-'} | {','.join(v.copy) or '-'} | {_consts(v.constexprs)} |")
    return "\n".join(out) + "\n"


def _child(args):
    """One arch in this process: collect and write JSON to args.child_out."""
    launches = None
    if args.attention_subset:
        launches = attention_subset(args.head_dims, args.dtypes, decode=True)
    elif args.attention_flags:
        launches = attention_flags(args.head_dims, args.dtypes)
    variants, errors = collect(args.arch[0], args.quick, args.modules, args.pruned, launches, args.configs)
    with open(args.child_out, "w") as f:
        json.dump(dict(variants=[asdict(v) for v in variants],
                       errors=[dict(kernel=n, meta={k: repr(x) for k, x in m.items()}, error=e)
                               for n, m, e in errors]), f)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 100], help="compute capabilities x10")
    parser.add_argument("--quick", action="store_true", help="the kernel files' representative subset")
    parser.add_argument("--modules", nargs="+", default=None, help="fasttx.kernels modules (default: all)")
    parser.add_argument("--pruned", action="store_true", help="also compile the configs pruning drops")
    parser.add_argument("--configs", type=int, default=None, metavar="N",
                        help="per autotuned launch, only the N kept configs with the largest tiles")
    parser.add_argument("--json", default=None, help="write the variants and the summary as JSON here")
    parser.add_argument("--markdown", default=None, help="write the markdown tables here (default: stdout)")
    parser.add_argument("--summary", action="store_true", help="only the per-kernel summary table")
    parser.add_argument("--attention-subset", action="store_true",
                        help="instead of compile_variants: attention fwd/bwd without flags (plain and causal, "
                             "and a 16-query forward) at --head-dims and --dtypes")
    parser.add_argument("--attention-flags", action="store_true",
                        help="instead of compile_variants: the attention file's every flag variant at --head-dims "
                             "and --dtypes")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_out:
        return _child(args)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FASTTX_AUTOTUNE"] = "1"  # roles come from the full pruned lists (their first is the AUTOTUNE=0 choice)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    variants, errors, status = [], [], 0
    for arch in args.arch:
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            cmd = [sys.executable, os.path.abspath(__file__), "--arch", str(arch), "--child-out", tmp.name]
            cmd += (["--quick"] if args.quick else []) + (["--pruned"] if args.pruned else [])
            cmd += ["--configs", str(args.configs)] if args.configs else []
            cmd += ["--modules", *args.modules] if args.modules else []
            if args.attention_subset or args.attention_flags:
                which = "--attention-subset" if args.attention_subset else "--attention-flags"
                cmd += [which, "--head-dims", *map(str, args.head_dims), "--dtypes", *args.dtypes]
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode == 2 and "UNSUPPORTED" in r.stdout:  # this triton cannot compile without a GPU
                print(f"sm_{arch}: {r.stdout.strip()}")
                return 2
            if r.returncode != 0:
                print(f"sm_{arch}: the report failed:\n{r.stdout[-3000:]}{r.stderr[-3000:]}", file=sys.stderr)
                status = 1
                continue
            data = json.load(open(tmp.name))
        variants += [Variant(**v) for v in data["variants"]]
        errors += [dict(e, arch=arch) for e in data["errors"]]
    text = markdown(variants, args.summary)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    else:
        print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(summary=summarize(variants), variants=[asdict(v) for v in variants], errors=errors), f,
                      indent=1)
    for e in errors:
        print(f"COMPILE ERROR sm_{e['arch']} {e['kernel']} {e['meta']}:\n  {e['error'][:600]}", file=sys.stderr)
    return 1 if errors or status else 0


if __name__ == "__main__":
    sys.exit(main())
