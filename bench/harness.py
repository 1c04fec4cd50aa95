"""The shared benchmark harness: every bench_<op>.py only describes *what* to measure (cases,
providers, byte and FLOP formulas); this module times it, measures memory, converts to GB/s,
TFLOP/s or tokens/s, and writes the results (JSON, markdown, plots).

Timing
  CUDA: `triton.testing.do_bench` (L2 flushed between runs, grads set to None between runs);
        the median and the 20/80 quantiles in ms.
  CPU:  `time.perf_counter` around each call (after one untimed call), median and 20/80 quantiles.
Every mode is called once untimed before it is timed, so torch.compile (and Triton's JIT) compile
outside the timed region.

Modes
  "fwd"      the forward alone.
  "bwd"      the backward alone: one forward is run first and kept; each timed call back-propagates
             random output gradients through it (retain_graph=True).
  "fwd+bwd"  forward then backward.
  "call"     a whole step given by the provider (a training step, a generate() call).

Memory
  peak_MB   torch.cuda.max_memory_allocated() during one call, after reset_peak_memory_stats(),
            minus what was allocated before the call (CUDA only).
  saved_MB  ("fwd" only) bytes of the tensors autograd keeps for the backward that are neither the
            op's inputs nor its outputs (saved_tensors_hooks; unique storages). Device independent:
            this is where a stored dropout mask shows up.

Throughput, from the explicit formulas each case carries (never from the implementation):
  GB/s      bytes[mode] / time   (each input read once, each output written once)
  TFLOP/s   flops[mode] / time
  tokens/s  tokens / time
and the fraction of the matching ceiling measured at the start of the same run
(device-to-device copy bandwidth for GB/s, a large matmul for TFLOP/s).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
METRICS = ("GB/s", "TFLOP/s", "tokens/s")
SIZES = ("tiny", "quick", "full")


class Unsupported(Exception):
    """Raised by a provider's build (or by a run, for providers marked `errors_are_skips`) when it
    cannot run a case; the row is recorded as skipped with this message as the reason."""


# ----------------------------------------------------------------------------------------------
# What a bench module describes
# ----------------------------------------------------------------------------------------------
@dataclass
class Config:
    """One run of the suite. `size`: "tiny" (CPU, smoke), "quick" or "full" (GPU sweep)."""

    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes: Sequence[torch.dtype] = (torch.bfloat16, torch.float16)
    size: str = "full"
    modes: Sequence[str] = MODES
    providers: Optional[Sequence[str]] = None  # None = every provider
    compile: bool = True  # include the torch.compile baselines
    compile_backend: str = "inductor"
    fasttx_backend: str = "auto"  # "auto" = Triton on CUDA, the reference fallback on CPU
    warmup_ms: float = 25.0  # do_bench's warmup/rep on CUDA
    rep_ms: float = 100.0
    rounds: int = 5  # timed calls at least (CPU)
    max_seconds_per_row: float = 0.5  # CPU: stop adding rounds past this
    verbose: bool = True

    @property
    def cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"


@dataclass
class Case:
    """One problem size. `bytes` / `flops` map a mode to the count the throughput is computed
    from; `x` is the plot's x value within `series` (e.g. the hidden size)."""

    label: str
    x: int
    dtype: torch.dtype
    params: Dict[str, Any] = field(default_factory=dict)
    series: str = ""
    bytes: Optional[Dict[str, float]] = None
    flops: Optional[Dict[str, float]] = None
    tokens: Optional[int] = None
    modes: Optional[Sequence[str]] = None  # None = the suite's modes


@dataclass
class Work:
    """What a provider built for one case: `fn()` runs the forward (or the whole step, mode
    "call") and returns its output(s); `leaves` are the tensors whose .grad the harness resets."""

    fn: Callable[[], Any]
    leaves: Sequence[torch.Tensor] = ()
    inputs: Sequence[torch.Tensor] = ()  # excluded from saved_MB (defaults to leaves)


@dataclass
class Provider:
    """An implementation. `build(case, cfg) -> Work` allocates inputs and returns the callable;
    `available(cfg) -> reason or None` says up front whether it can run at all here."""

    name: str
    build: Callable[[Case, Config], Work]
    available: Callable[[Config], Optional[str]] = lambda cfg: None
    kind: str = "torch"  # "fasttx" | "torch" | "compile" | "peer"
    errors_are_skips: bool = False  # a failure means "this backend can't run this case"


@dataclass
class Suite:
    """One benchmark: cases x providers x modes, one metric, speedups against `baseline`."""

    name: str
    metric: str
    cases: List[Case]
    providers: List[Provider]
    modes: Sequence[str] = MODES
    baseline: str = "torch"
    unavailable: Optional[str] = None  # the whole suite cannot run here (e.g. a missing module)
    xlabel: str = "size"
    description: str = ""
    rep_ms: Optional[float] = None  # timing budget override (long steps: the model benchmark)

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")


# ----------------------------------------------------------------------------------------------
# Provider helpers shared by the bench modules
# ----------------------------------------------------------------------------------------------
def importable(module: str, cuda_only: bool = True) -> Callable[[Config], Optional[str]]:
    """Availability check of an optional peer (Liger-Kernel, flash-attn, Apex): never a
    dependency, so a missing one is a skip with the reason recorded."""

    def check(cfg: Config) -> Optional[str]:
        if cuda_only and not cfg.cuda:
            return "needs a CUDA device"
        try:
            __import__(module)
        except Exception as e:  # ImportError, or a broken build raising something else
            return f"{module} not importable ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
        return None

    return check


def compile_available(cfg: Config) -> Optional[str]:
    if not cfg.compile:
        return "torch.compile baselines off (--no-compile, or CPU default; pass --compile)"
    return None


def compiled(fn: Callable, cfg: Config) -> Callable:
    """torch.compile of the same eager code, freshly for this case (dynamic=False: one graph per
    shape, as a user with a fixed shape would get). Dynamo's caches are reset first so that a
    sweep over many shapes never hits the recompile limit and silently falls back to eager."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False, backend=cfg.compile_backend)


def torch_and_compile(name: str, build: Callable[[Case, Config], Work]) -> List[Provider]:
    """The eager torch provider and its torch.compile twin, built from the same code: `build`
    returns the eager Work; the compiled one wraps its fn."""

    def build_compiled(case: Case, cfg: Config) -> Work:
        work = build(case, cfg)
        return dataclasses.replace(work, fn=compiled(work.fn, cfg))

    return [
        Provider(name, build, kind="torch"),
        Provider(f"{name}.compile", build_compiled, available=compile_available, kind="compile"),
    ]


def randn(*shape, dtype, device, requires_grad=False, scale=1.0) -> torch.Tensor:
    t = torch.randn(*shape, dtype=torch.float32, device=device).mul_(scale).to(dtype)
    return t.requires_grad_(requires_grad)


def nbytes(*counts_and_dtypes) -> float:
    """nbytes((numel, dtype), ...) -> total bytes; dtype may be a torch.dtype or a byte width."""
    total = 0
    for numel, dt in counts_and_dtypes:
        width = dt if isinstance(dt, int) else torch.empty((), dtype=dt).element_size()
        total += numel * width
    return float(total)


# ----------------------------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------------------------
def _sync(cfg: Config) -> None:
    if cfg.cuda:
        torch.cuda.synchronize()


def _reset_grads(leaves) -> None:
    for t in leaves:
        t.grad = None


def time_fn(fn: Callable, cfg: Config, leaves=(), rep_ms: Optional[float] = None):
    """(median, q20, q80, min) in ms."""
    if cfg.cuda:
        from triton.testing import do_bench

        res = do_bench(
            fn, warmup=cfg.warmup_ms, rep=rep_ms or cfg.rep_ms, grad_to_none=list(leaves) or None,
            quantiles=[0.5, 0.2, 0.8, 0.0],
        )
        return tuple(float(v) for v in res)
    name = "fn"
    return time_interleaved({name: fn}, cfg, {name: leaves}, rep_ms)[name]


def peak_memory_mb(fn: Callable, cfg: Config, leaves=()):
    """(peak over what was allocated before the call, absolute peak) in MB; (None, None) on CPU."""
    if not cfg.cuda:
        return None, None
    _reset_grads(leaves)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    total = torch.cuda.max_memory_allocated()
    del out
    return (total - base) / 2**20, total / 2**20


def _storage_key(t: torch.Tensor):
    s = t.untyped_storage()
    return (t.device.type, s.data_ptr()), s.nbytes()


def saved_memory_mb(fn: Callable, inputs=()) -> float:
    """MB autograd keeps for the backward beyond the inputs and outputs (unique storages)."""
    seen: Dict[Any, int] = {}

    def pack(t):
        try:
            key, size = _storage_key(t)
            seen[key] = size
        except Exception:  # tensors without storage (e.g. some subclasses): not counted
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    exclude = {_storage_key(t)[0] for t in list(inputs) + _tensors(out)}
    return sum(v for k, v in seen.items() if k not in exclude) / 2**20


def _tensors(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []


def _grad_outputs(out):
    outs = [t for t in _tensors(out) if t.requires_grad and t.is_floating_point()]
    if not outs:
        raise Unsupported("no output requires grad (nothing to back-propagate)")
    return outs, [torch.randn_like(t) for t in outs]


def mode_fn(work: Work, mode: str) -> Callable:
    """The callable that runs `mode` of `work`."""
    if mode in ("fwd", "call"):
        return work.fn
    if mode == "fwd+bwd":

        def fwd_bwd():
            outs, grads = _grad_outputs(work.fn())
            torch.autograd.backward(outs, grads)

        return fwd_bwd
    if mode == "bwd":
        outs, grads = _grad_outputs(work.fn())  # one forward, kept

        def bwd():
            torch.autograd.backward(outs, grads, retain_graph=True)

        return bwd
    raise ValueError(f"unknown mode {mode!r}")


# ----------------------------------------------------------------------------------------------
# Ceilings
# ----------------------------------------------------------------------------------------------
def measure_ceilings(cfg: Config) -> Dict[str, Any]:
    """Device-to-device copy bandwidth and a large matmul, measured with the same timer as the
    rows: the denominators of the 'fraction of ceiling' column."""
    dev = cfg.device
    if cfg.cuda:
        copy_numel, mm_n, mm_dtype = 2**28, 8192, torch.bfloat16  # 1 GiB fp32 copy; 8192^3 bf16
    else:
        copy_numel, mm_n, mm_dtype = 2**23, 512, torch.float32  # 32 MiB; CPU bf16 matmul is slow
    src = torch.empty(copy_numel, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), cfg)[0]
    copy_bytes = 2 * src.numel() * src.element_size()  # read once, written once
    src = dst = None  # free the copy buffers before the matmul
    a = torch.randn(mm_n, mm_n, device=dev, dtype=mm_dtype)
    b = torch.randn(mm_n, mm_n, device=dev, dtype=mm_dtype)
    mm_ms = time_fn(lambda: a @ b, cfg)[0]
    return {
        "copy_GBps": copy_bytes / (ms * 1e-3) / 1e9,
        "copy_bytes": copy_bytes,
        "matmul_TFLOPs": 2 * mm_n**3 / (mm_ms * 1e-3) / 1e12,
        "matmul_shape": [mm_n, mm_n, mm_n],
        "matmul_dtype": DTYPE_NAMES[mm_dtype],
    }


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------
def _row(suite: Suite, case: Case, provider: str, mode: str, **kw) -> Dict[str, Any]:
    row = {
        "op": suite.name,
        "series": case.series,
        "case": case.label,
        "x": case.x,
        "dtype": DTYPE_NAMES.get(case.dtype, str(case.dtype)),
        "mode": mode,
        "provider": provider,
        "metric": suite.metric,
        "status": "ok",
        "reason": None,
        "ms": None,
        "ms_q20": None,
        "ms_q80": None,
        "ms_min": None,
        "GBps": None,
        "TFLOPs": None,
        "tokens_per_s": None,
        "value": None,  # the suite's metric
        "frac_ceiling": None,
        "speedup": None,  # baseline median / this median, same case and mode
        "speedup_min": None,  # the same from the fastest runs (robust on a loaded CPU)
        "baseline": suite.baseline,
        "peak_MB": None,
        "peak_total_MB": None,
        "saved_MB": None,
        "params": {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
                   for k, v in case.params.items()},
    }
    row.update(kw)
    return row


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:200] if msg else ''}"


def _fill_metrics(row, case: Case, mode: str, ms: float, ceilings) -> None:
    sec = ms * 1e-3
    for key in ("GBps", "TFLOPs", "tokens_per_s", "frac_ceiling"):
        row.setdefault(key, None)
    if case.bytes and mode in case.bytes:
        row["GBps"] = case.bytes[mode] / sec / 1e9
    if case.flops and mode in case.flops:
        row["TFLOPs"] = case.flops[mode] / sec / 1e12
    if case.tokens:
        row["tokens_per_s"] = case.tokens / sec
    metric = row["metric"]
    row["value"] = {"GB/s": row["GBps"], "TFLOP/s": row["TFLOPs"], "tokens/s": row["tokens_per_s"]}[metric]
    if ceilings and row["value"] is not None:
        if metric == "GB/s":
            row["frac_ceiling"] = row["value"] / ceilings["copy_GBps"]
        elif metric == "TFLOP/s":
            row["frac_ceiling"] = row["value"] / ceilings["matmul_TFLOPs"]


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def run_suite(suite: Suite, cfg: Config, ceilings=None, log=print) -> List[Dict[str, Any]]:
    """Every case x provider x mode of `suite`: one row each (ok, skipped with a reason, or error).

    CUDA: provider after provider (build, every mode, free), each timed by do_bench.
    CPU: all providers of a case are built together and timed in interleaved rounds, so that load
    from other processes falls on every provider alike and the ratios stay meaningful."""
    rows: List[Dict[str, Any]] = []
    providers = [p for p in suite.providers if cfg.providers is None or p.name in cfg.providers]
    # The sweep seeds torch's generator per build; leave the caller's random state as it was.
    devices = [torch.device(cfg.device).index or 0] if cfg.cuda else []
    with torch.random.fork_rng(devices=devices):
        for case in suite.cases:
            rows += _run_case(suite, case, providers, cfg, ceilings, log)
    _fill_speedups(rows)
    return rows


def _run_case(suite, case, providers, cfg, ceilings, log) -> List[Dict[str, Any]]:
    import fasttx

    rows: List[Dict[str, Any]] = []
    modes = [m for m in (case.modes or suite.modes) if m in cfg.modes or m == "call"]
    runnable = []
    for prov in providers:
        reason = suite.unavailable or prov.available(cfg)
        if reason is not None:
            rows += [_row(suite, case, prov.name, m, status="skipped", reason=reason) for m in modes]
        else:
            runnable.append(prov)
    with fasttx.use_backend(cfg.fasttx_backend), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = [[p] for p in runnable] if cfg.cuda else [runnable]
        for group in groups:
            new = _run_group(suite, case, group, modes, cfg, ceilings, caught)
            rows += new
            if cfg.verbose:
                for r in new:
                    log(_fmt_row(r))
            if cfg.cuda:
                torch.cuda.empty_cache()
    return rows


def _run_group(suite, case, group, modes, cfg, ceilings, caught) -> List[Dict[str, Any]]:
    """Build the providers of `group` for `case`, then time each mode (interleaved on CPU)."""
    out: List[Dict[str, Any]] = []
    works = {}
    for prov in group:
        n0 = len(caught)
        try:
            torch.manual_seed(0)
            works[prov.name] = (prov, prov.build(case, cfg))
        except Exception as e:  # noqa: BLE001 - recorded in the row
            out += [_error_row(suite, case, prov, m, e, caught[n0:], cfg) for m in modes]
    for mode in modes:
        fns = {}
        for name, (prov, work) in works.items():
            n0 = len(caught)
            try:
                fn = mode_fn(work, mode)
                _reset_grads(work.leaves)
                fn()  # untimed: compiles (torch.compile, Triton JIT), and checks it runs at all
                _sync(cfg)
                fns[name] = fn
            except Exception as e:  # noqa: BLE001 - recorded in the row
                out.append(_error_row(suite, case, prov, mode, e, caught[n0:], cfg))
        try:
            if cfg.cuda:
                timings = {n: time_fn(f, cfg, works[n][1].leaves, rep_ms=suite.rep_ms) for n, f in fns.items()}
            else:
                timings = time_interleaved(fns, cfg, {n: works[n][1].leaves for n in fns}, suite.rep_ms)
        except Exception as e:  # noqa: BLE001 - e.g. a backward that fails only when repeated
            timings, err = {}, e
            for n in fns:
                out.append(_error_row(suite, case, works[n][0], mode, err, (), cfg))
        for name, (ms, q20, q80, ms_min) in timings.items():
            prov, work = works[name]
            try:
                row = _row(suite, case, name, mode, ms=ms, ms_q20=q20, ms_q80=q80, ms_min=ms_min)
                _fill_metrics(row, case, mode, ms, ceilings)
                row["peak_MB"], row["peak_total_MB"] = peak_memory_mb(fns[name], cfg, work.leaves)
                if mode == "fwd" and prov.kind != "compile" and torch.is_grad_enabled():
                    # compiled graphs are left out: saved-tensor hooks would make dynamo retrace them
                    row["saved_MB"] = saved_memory_mb(work.fn, work.inputs or work.leaves)
                _reset_grads(work.leaves)
                out.append(row)
            except Exception as e:  # noqa: BLE001 - recorded in the row
                out.append(_error_row(suite, case, prov, mode, e, (), cfg))
        del fns
    works.clear()
    return out


def time_interleaved(fns: Dict[str, Callable], cfg: Config, leaves: Dict[str, Sequence[torch.Tensor]],
                     rep_ms: Optional[float] = None) -> Dict[str, tuple]:
    """CPU: time several callables in round-robin rounds; {name: (median, q20, q80, min)} in ms.
    At least cfg.rounds rounds, more while the round budget lasts."""
    times: Dict[str, List[float]] = {n: [] for n in fns}
    budget = min(cfg.max_seconds_per_row * max(1, len(fns)), (rep_ms or cfg.rep_ms) / 1e3 * max(1, len(fns)))
    start = time.perf_counter()
    rounds = 0
    while rounds < max(1, cfg.rounds) or (time.perf_counter() - start < budget and rounds < 1000):
        for name, fn in fns.items():
            _reset_grads(leaves[name])
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
        if rounds >= 1 and time.perf_counter() - start > 4 * budget:
            break  # slow cases (a big CPU step): stop early rather than stall the run
    return {n: _quantiles(ts) for n, ts in times.items()}


def _quantiles(times: List[float]):
    if len(times) == 1:
        return times[0], times[0], times[0], times[0]
    q = statistics.quantiles(times, n=10, method="inclusive")  # deciles: q[1] = 20 %, q[7] = 80 %
    return statistics.median(times), q[1], q[7], min(times)


def _error_row(suite, case, prov, mode, err, caught, cfg):
    """`caught`: the warnings raised by the failing call (torch's SDPA explains there why it
    refused a backend); the first one is kept in the reason."""
    if isinstance(err, Unsupported) or _is_oom(err) or prov.errors_are_skips:
        why = _short(err) if not isinstance(err, Unsupported) else str(err)
        notes = [str(w.message).splitlines()[0][:160] for w in caught]
        if notes and not isinstance(err, Unsupported):
            why += f" [{notes[0]}]"
        if _is_oom(err) and cfg.cuda:
            torch.cuda.empty_cache()
        return _row(suite, case, prov.name, mode, status="skipped", reason=why)
    if os.environ.get("FASTTX_BENCH_TRACEBACK"):
        traceback.print_exception(type(err), err, err.__traceback__)
    return _row(suite, case, prov.name, mode, status="error", reason=_short(err))


def _fill_speedups(rows) -> None:
    base = {
        (r["op"], r["series"], r["case"], r["dtype"], r["mode"]): r
        for r in rows
        if r["provider"] == r["baseline"] and r["status"] == "ok"
    }
    for r in rows:
        b = base.get((r["op"], r["series"], r["case"], r["dtype"], r["mode"]))
        if b and r["status"] == "ok":
            r["speedup"] = b["ms"] / r["ms"]
            r["speedup_min"] = b["ms_min"] / r["ms_min"]


def _fmt_value(v, metric) -> str:
    if v is None:
        return "-"
    if metric == "tokens/s":
        return f"{v:,.0f}"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _fmt_row(r) -> str:
    head = f"{r['op']:<22} {r['series'][:18]:<18} {r['case'][:26]:<26} {r['dtype']:<4} {r['mode']:<7} {r['provider']:<16}"
    if r["status"] != "ok":
        return f"{head} {r['status']}: {r['reason']}"
    extra = f" x{r['speedup']:.2f}" if r["speedup"] else ""
    mem = f" peak {r['peak_MB']:.1f}MB" if r["peak_MB"] is not None else ""
    saved = f" saved {r['saved_MB']:.2f}MB" if r["saved_MB"] is not None else ""
    return f"{head} {r['ms']:9.4f} ms  {_fmt_value(r['value'], r['metric'])} {r['metric']}{extra}{mem}{saved}"


# ----------------------------------------------------------------------------------------------
# Results: JSON, markdown, plots
# ----------------------------------------------------------------------------------------------
def environment(cfg: Config) -> Dict[str, Any]:
    import fasttx
    from fasttx._backend import backend_for

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - triton is Linux only
        triton_version = None
    if cfg.cuda:
        device_name = torch.cuda.get_device_name(cfg.device)
    else:
        device_name = _cpu_name()
    with fasttx.use_backend(cfg.fasttx_backend):
        try:
            path = backend_for(torch.empty(0, device=cfg.device))
        except RuntimeError as e:
            path = f"unavailable ({_short(e)})"
    return {
        "device": cfg.device,
        "device_name": device_name,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "fasttx": fasttx.__version__,
        "fasttx_path": path,
        "cpu_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return "CPU " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"CPU {platform.processor() or platform.machine()}"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def result_stem(env: Dict[str, Any], date: str) -> str:
    """<gpu>-<date> (e.g. nvidia-h100-80gb-hbm3-2025-01-31) or cpu-<date>."""
    name = "cpu" if env["device"] == "cpu" else slug(env["device_name"])
    return f"{name}-{date}"


def config_dict(cfg: Config) -> Dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["dtypes"] = [DTYPE_NAMES[t] for t in cfg.dtypes]
    d["modes"] = list(cfg.modes)
    return d


def write_results(rows, suites: Sequence[Suite], cfg: Config, env, ceilings, out_dir: str,
                  plots: bool = True, date: Optional[str] = None, log=print) -> Dict[str, str]:
    """Writes <out_dir>/<stem>.json, <stem>.md and <stem>/<op>-<dtype>.png; returns their paths."""
    date = date or _dt.date.today().isoformat()
    stem = result_stem(env, date)
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, stem + ".json"), "md": os.path.join(out_dir, stem + ".md")}
    doc = {
        "schema": 1,
        "date": date,
        "timestamp": _dt.datetime.now().isoformat(timespec="seconds"),
        "environment": env,
        "config": config_dict(cfg),
        "ceilings": ceilings,
        "suites": [
            {"name": s.name, "metric": s.metric, "baseline": s.baseline, "xlabel": s.xlabel,
             "description": s.description, "unavailable": s.unavailable}
            for s in suites
        ],
        "rows": rows,
    }
    with open(paths["json"], "w") as f:
        json.dump(doc, f, indent=1, default=str)
    with open(paths["md"], "w") as f:
        f.write(markdown(doc, plot_dir=stem if plots else None))
    if plots:
        made = write_plots(doc, os.path.join(out_dir, stem), log=log)
        if made:
            paths["plots"] = os.path.join(out_dir, stem)
    return paths


def geomean(xs) -> Optional[float]:
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def summary(rows, provider: str = "fasttx", key: str = "speedup") -> Dict[str, Optional[float]]:
    """Geometric-mean speedup of `provider` over each suite's baseline, per suite (`key`:
    "speedup" from medians, "speedup_min" from the fastest runs)."""
    out: Dict[str, Optional[float]] = {}
    for op in dict.fromkeys(r["op"] for r in rows):
        out[op] = geomean(r[key] for r in rows if r["op"] == op and r["provider"] == provider
                          and r["status"] == "ok" and r["provider"] != r["baseline"])
    return out


def markdown(doc, plot_dir: Optional[str] = None) -> str:
    env, ceil, rows = doc["environment"], doc["ceilings"], doc["rows"]
    lines = [
        f"# fasttx benchmarks: {env['device_name']} ({doc['date']})",
        "",
        f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, python {env['python']}; "
        f"fasttx {env['fasttx']} (path on this device: {env['fasttx_path']}); "
        f"size `{doc['config']['size']}`.",
        "",
    ]
    if ceil:
        lines += [
            f"Ceilings measured in this run: copy **{ceil['copy_GBps']:.1f} GB/s** "
            f"(device-to-device, {ceil['copy_bytes'] / 2**20:.0f} MiB moved), matmul "
            f"**{ceil['matmul_TFLOPs']:.2f} TFLOP/s** ({ceil['matmul_dtype']} "
            f"{'x'.join(map(str, ceil['matmul_shape']))}).",
            "",
        ]
    lines += [
        "Cells: throughput (the suite's metric, from an explicit byte/FLOP/token count) and, in "
        "parentheses, the speedup over the suite's baseline in the same run (>1 = faster). "
        "Times are medians.",
        "",
    ]
    sm, sm_min = summary(rows), summary(rows, key="speedup_min")
    if any(v is not None for v in sm.values()):
        lines += ["| suite | fasttx speedup over baseline, geometric mean of medians | ... of minima |",
                  "|---|---|---|"]
        by_name = {s["name"]: s for s in doc["suites"]}
        for op, v in sm.items():
            if v is not None:
                lines.append(f"| {op} (vs {by_name.get(op, {}).get('baseline', '?')}) | {v:.2f}x "
                             f"| {sm_min[op]:.2f}x |")
        lines.append("")
    for s in doc["suites"]:
        srows = [r for r in rows if r["op"] == s["name"]]
        lines += [f"## {s['name']} ({s['metric']}, baseline `{s['baseline']}`)", ""]
        if s["description"]:
            lines += [s["description"], ""]
        if s["unavailable"]:
            lines += [f"Not run: {s['unavailable']}", ""]
            continue
        providers = list(dict.fromkeys(r["provider"] for r in srows if r["status"] == "ok"))
        for dtype in dict.fromkeys(r["dtype"] for r in srows):
            for mode in dict.fromkeys(r["mode"] for r in srows):
                sel = [r for r in srows if r["dtype"] == dtype and r["mode"] == mode]
                if not any(r["status"] == "ok" for r in sel):
                    continue
                lines += [f"**{dtype}, {mode}**", ""]
                lines.append("| series | case | " + " | ".join(providers) + " | peak MB / saved MB (fasttx, baseline) |")
                lines.append("|---|---|" + "---|" * len(providers) + "---|")
                for key in dict.fromkeys((r["series"], r["case"]) for r in sel):
                    cells = []
                    by_prov = {r["provider"]: r for r in sel if (r["series"], r["case"]) == key}
                    for p in providers:
                        r = by_prov.get(p)
                        if r is None or r["status"] != "ok":
                            cells.append("-" if r is None else r["status"])
                        else:
                            sp = f" ({r['speedup']:.2f}x)" if r["speedup"] else ""
                            cells.append(_fmt_value(r["value"], r["metric"]) + sp)
                    mem = []
                    for p in ("fasttx", s["baseline"]):
                        r = by_prov.get(p)
                        if r and r["status"] == "ok":
                            pk = "-" if r["peak_MB"] is None else f"{r['peak_MB']:.1f}"
                            sv = "-" if r["saved_MB"] is None else f"{r['saved_MB']:.3g}"
                            mem.append(f"{pk} / {sv}")
                    lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " | " + ", ".join(mem) + " |")
                lines.append("")
        if plot_dir:
            for dtype in dict.fromkeys(r["dtype"] for r in srows if r["status"] == "ok"):
                fname = f"{plot_dir}/{s['name']}-{dtype}.png"
                lines += [f"![{s['name']} {dtype}]({fname})", ""]
        skipped = {}
        for r in srows:
            if r["status"] != "ok":
                skipped.setdefault((r["provider"], r["status"], r["reason"]), []).append(r["case"])
        if skipped:
            lines += ["Not measured:", ""]
            for (p, st, why), cases in skipped.items():
                n = len(dict.fromkeys(cases))
                lines.append(f"- `{p}` {st} ({n} case{'s' * (n != 1)}): {why}")
            lines.append("")
    return "\n".join(lines)


def write_plots(doc, plot_dir: str, log=print) -> List[str]:
    """One PNG per suite and dtype: a grid of (series x mode) panels, the metric against the
    suite's x per provider, with the measured ceiling as a dashed line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plots (pip install -e '.[bench]')")
        return []
    os.makedirs(plot_dir, exist_ok=True)
    ceil = doc["ceilings"] or {}
    made = []
    for s in doc["suites"]:
        srows = [r for r in doc["rows"] if r["op"] == s["name"] and r["status"] == "ok"]
        for dtype in dict.fromkeys(r["dtype"] for r in srows):
            drows = [r for r in srows if r["dtype"] == dtype]
            series = list(dict.fromkeys(r["series"] for r in drows))
            modes = list(dict.fromkeys(r["mode"] for r in drows))
            fig, axes = plt.subplots(len(series), len(modes), squeeze=False,
                                     figsize=(4.2 * len(modes), 3.2 * len(series)))
            for i, se in enumerate(series):
                for j, mo in enumerate(modes):
                    ax = axes[i][j]
                    sel = [r for r in drows if r["series"] == se and r["mode"] == mo]
                    for prov in dict.fromkeys(r["provider"] for r in sel):
                        pts = sorted((r["x"], r["value"]) for r in sel if r["provider"] == prov)
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov,
                                linewidth=2.5 if prov == "fasttx" else 1.2)
                    if s["metric"] == "GB/s" and "copy_GBps" in ceil:
                        ax.axhline(ceil["copy_GBps"], color="k", linestyle="--", linewidth=1,
                                   label="copy ceiling")
                    elif s["metric"] == "TFLOP/s" and "matmul_TFLOPs" in ceil:
                        ax.axhline(ceil["matmul_TFLOPs"], color="k", linestyle="--", linewidth=1,
                                   label=f"{ceil['matmul_dtype']} matmul ceiling")
                    xs = sorted({r["x"] for r in sel})
                    if len(xs) > 1 and xs[0] > 0 and xs[-1] / xs[0] >= 8:
                        ax.set_xscale("log", base=2)
                    ax.set_title(f"{se + ', ' if se else ''}{mo}", fontsize=9)
                    ax.set_xlabel(s["xlabel"], fontsize=8)
                    ax.set_ylabel(s["metric"], fontsize=8)
                    ax.grid(alpha=0.3)
                    ax.legend(fontsize=6)
            env = doc["environment"]
            fig.suptitle(f"{s['name']} {dtype} - {env['device_name']} - {doc['date']}", fontsize=10)
            fig.tight_layout()
            path = os.path.join(plot_dir, f"{s['name']}-{dtype}.png")
            fig.savefig(path, dpi=90)
            plt.close(fig)
            made.append(path)
    return made


# ----------------------------------------------------------------------------------------------
# The bench modules
# ----------------------------------------------------------------------------------------------
OPS = ("layer_norm", "gelu", "dropout", "softmax", "attention", "gpt")


def load_suites(ops: Sequence[str], cfg: Config) -> List[Suite]:
    import importlib

    suites: List[Suite] = []
    for op in ops:
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; choose from {OPS}")
        mod = importlib.import_module(f"bench.bench_{op}")
        suites += mod.suites(cfg)
    return suites


def run(ops: Sequence[str], cfg: Config, out_dir: Optional[str] = None, plots: bool = True,
        log=print) -> Dict[str, Any]:
    """Measure the ceilings, run every suite of `ops`, write the results to `out_dir` (if given).
    Returns {"rows", "environment", "ceilings", "paths", "suites"}."""
    env = environment(cfg)
    if cfg.verbose:
        log(f"device: {env['device_name']}; torch {env['torch']}, triton {env['triton']}, "
            f"CUDA {env['cuda']}; fasttx path: {env['fasttx_path']}")
    ceilings = measure_ceilings(cfg)
    if cfg.verbose:
        log(f"ceilings: copy {ceilings['copy_GBps']:.1f} GB/s, matmul "
            f"{ceilings['matmul_TFLOPs']:.3f} TFLOP/s ({ceilings['matmul_dtype']})")
    suites = load_suites(ops, cfg)
    rows: List[Dict[str, Any]] = []
    for s in suites:
        rows += run_suite(s, cfg, ceilings, log=log)
    paths = {}
    if out_dir is not None:
        paths = write_results(rows, suites, cfg, env, ceilings, out_dir, plots=plots, log=log)
    return {"rows": rows, "environment": env, "ceilings": ceilings, "paths": paths, "suites": suites}

