"""Running a sweep: which bench modules exist (every bench/bench_<op>.py, found by name), how
their suites are loaded and narrowed (ops, suites, providers, case parameters), and how every
case x provider x mode becomes one result row (ok, skipped with a reason, error, or cut by the
time budget), with throughput, speedup and noise filled in.

The bench is split by concern:
  spec.py     what a bench module describes (Config, Case, Provider, Work, Suite) and its helpers
  timing.py   timing, memory, modes, ceilings
  report.py   environment, the JSON document, markdown, plots, one-line formats
  harness.py  this file: discovery and the run; it also re-exports spec's names, so a bench
              module may import them from either (`from .harness import Case, Suite, ...`).

Adding an op to the bench = adding bench/bench_<op>.py with a `suites(cfg) -> List[Suite]`
function (and, optionally, `ORDER = <int>`: position in a full run, default 50; lower first).
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import time
import traceback
import warnings
from typing import Any, Dict, List, Optional, Sequence

import torch

from . import report
from .report import autotune_configs, environment, summary, write_plots, write_results  # noqa: F401
from .spec import (DTYPE_NAMES, DTYPES, METRICS, MODES, SIZES, STATUSES, Case, Config, Provider,  # noqa: F401
                   Suite, Unsupported, Work, compile_available, compiled, importable, nbytes, randn,
                   torch_and_compile)
from .timing import (cpu_threads, measure_ceilings, mode_fn, noise, peak_memory_mb, reset_grads,  # noqa: F401
                     saved_memory_mb, time_fn, time_interleaved)

_reset_grads = reset_grads  # the name the pytest-benchmark entry used

FALLBACK_MARK = "running torch's implementation instead"  # fasttx's one-time fallback warning


# ----------------------------------------------------------------------------------------------
# The bench modules
# ----------------------------------------------------------------------------------------------
def discover() -> tuple:
    """Every bench/bench_<op>.py, as op names, ordered by the module's ORDER (default 50), then name.
    Reads ORDER from the source text, so listing the ops imports nothing."""
    here = os.path.dirname(os.path.abspath(__file__))
    found = []
    for fname in os.listdir(here):
        if fname.startswith("bench_") and fname.endswith(".py"):
            order = 50
            with open(os.path.join(here, fname)) as f:
                for line in f:
                    if line.startswith("ORDER = "):
                        order = int(line.split("=", 1)[1].split("#")[0])
                        break
            found.append((order, fname[len("bench_"):-3]))
    return tuple(op for _, op in sorted(found))


OPS = discover()


def _matches(case: Case, where) -> bool:
    return all(k not in case.params or case.params[k] in vals for k, vals in (where or {}).items())


def load_suites(ops: Sequence[str], cfg: Config) -> List[Suite]:
    """The suites of `ops`, narrowed by cfg.suites (names) and cfg.where (case parameters)."""
    suites: List[Suite] = []
    for op in ops:
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; choose from {OPS}")
        mod = importlib.import_module(f"bench.bench_{op}")
        for s in mod.suites(cfg):
            if cfg.suites is not None and s.name not in cfg.suites:
                continue
            if cfg.where:
                s.cases = [c for c in s.cases if _matches(c, cfg.where)]
            suites.append(s)
    return suites


# ----------------------------------------------------------------------------------------------
# Rows
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
        "noise": None,  # relative uncertainty of ms: (q80 - q20) / (2 * ms)
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
        "fallback": None,  # fasttx's fallback warning, when the fasttx call ran torch's implementation
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
    row["value"] = {"GB/s": row["GBps"], "TFLOP/s": row["TFLOPs"], "tokens/s": row["tokens_per_s"]}[row["metric"]]
    fill_ceiling_fraction(row, ceilings)


def fill_ceiling_fraction(row, ceilings) -> None:
    """frac_ceiling = value / the matching ceiling (copy for GB/s, matmul for TFLOP/s)."""
    key = {"GB/s": "copy_GBps", "TFLOP/s": "matmul_TFLOPs"}.get(row["metric"])
    if ceilings and key in ceilings and row.get("value") is not None:
        row["frac_ceiling"] = row["value"] / ceilings[key]


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


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


def fill_speedups(rows) -> None:
    """speedup / speedup_min of every ok row against its suite's baseline row (same case, dtype, mode)."""
    base = {}
    for r in rows:
        if r["provider"] == r["baseline"] and r["status"] == "ok":
            base.setdefault((r["op"], r["series"], r["case"], r["dtype"], r["mode"]), r)
    for r in rows:
        b = base.get((r["op"], r["series"], r["case"], r["dtype"], r["mode"]))
        if b and r["status"] == "ok":
            r["speedup"] = b["ms"] / r["ms"]
            r["speedup_min"] = b["ms_min"] / r["ms_min"]


_fill_speedups = fill_speedups


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------
def run_suite(suite: Suite, cfg: Config, ceilings=None, log=print, deadline: Optional[float] = None,
              after_case=None) -> List[Dict[str, Any]]:
    """Every case x provider x mode of `suite`: one row each (ok, skipped with a reason, error, or
    cut: not started before `deadline`, a time.monotonic() value).

    CUDA: provider after provider (build, every mode, free), each timed by do_bench.
    CPU: all providers of a case are built together and timed in interleaved rounds, so that load
    from other processes falls on every provider alike and the ratios stay meaningful."""
    rows: List[Dict[str, Any]] = []
    providers = [p for p in suite.providers if cfg.providers is None or p.name in cfg.providers]
    # The sweep seeds torch's generator per build; leave the caller's random state as it was.
    devices = [torch.device(cfg.device).index or 0] if cfg.cuda else []
    with torch.random.fork_rng(devices=devices), cpu_threads(cfg):
        for case in suite.cases:
            rows += _run_case(suite, case, providers, cfg, ceilings, log, deadline)
            if after_case is not None:
                fill_speedups(rows)
                after_case(rows)
    fill_speedups(rows)
    return rows


def _run_case(suite, case, providers, cfg, ceilings, log, deadline) -> List[Dict[str, Any]]:
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
            if deadline is not None and time.monotonic() > deadline:
                rows += [_row(suite, case, p.name, m, status="cut", reason="time budget spent")
                         for p in group for m in modes]
                continue
            new = _run_group(suite, case, group, modes, cfg, ceilings, caught)
            rows += new
            if cfg.verbose:
                for r in new:
                    if r["status"] != "skipped":  # skips are listed once, grouped, at the end
                        log(report.fmt_row(r))
            if cfg.cuda:
                torch.cuda.empty_cache()
    return rows


@contextlib.contextmanager
def _fallback_warnings_again(on: bool):
    """fasttx warns once per (op, reason) and process when it falls back to torch's op; for the
    bench to flag every row that fell back, the once-only memory is emptied around the call and
    restored after (fasttx._backend._warned, a set, where present)."""
    import fasttx._backend as backend

    warned = getattr(backend, "_warned", None)
    if not on or not isinstance(warned, set):
        yield
        return
    saved = set(warned)
    warned.clear()
    try:
        yield
    finally:
        warned |= saved


def _run_group(suite, case, group, modes, cfg, ceilings, caught) -> List[Dict[str, Any]]:
    """Build the providers of `group` for `case`, then time each mode (interleaved on CPU)."""
    out: List[Dict[str, Any]] = []
    works = {}
    fallbacks: Dict[str, str] = {}
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
                reset_grads(work.leaves)
                with _fallback_warnings_again(prov.kind == "fasttx"):
                    fn()  # untimed: compiles (torch.compile, Triton JIT), and checks it runs at all
                if cfg.cuda:
                    torch.cuda.synchronize()
                fns[name] = fn
            except Exception as e:  # noqa: BLE001 - recorded in the row
                out.append(_error_row(suite, case, prov, mode, e, caught[n0:], cfg))
            fell = [str(w.message) for w in caught[n0:] if FALLBACK_MARK in str(w.message)]
            if fell and prov.kind == "fasttx":
                fallbacks[name] = fell[0].splitlines()[0][:200]
        try:
            if cfg.cuda:
                timings = {n: time_fn(f, cfg, works[n][1].leaves, rep_ms=suite.rep_ms) for n, f in fns.items()}
            else:
                timings = time_interleaved(fns, cfg, {n: works[n][1].leaves for n in fns}, suite.rep_ms)
        except Exception as e:  # noqa: BLE001 - e.g. a backward that fails only when repeated
            timings, err = {}, e
            for n in fns:
                out.append(_error_row(suite, case, works[n][0], mode, err, (), cfg))
        single = not cfg.cuda and cfg.rounds <= 1  # one timed call: no spread to speak of
        for name, (ms, q20, q80, ms_min) in timings.items():
            prov, work = works[name]
            try:
                row = _row(suite, case, name, mode, ms=ms, ms_q20=q20, ms_q80=q80, ms_min=ms_min,
                           noise=None if single else noise(ms, q20, q80), fallback=fallbacks.get(name))
                _fill_metrics(row, case, mode, ms, ceilings)
                row["peak_MB"], row["peak_total_MB"] = peak_memory_mb(fns[name], cfg, work.leaves)
                if mode == "fwd" and prov.kind != "compile" and torch.is_grad_enabled():
                    # compiled graphs are left out: saved-tensor hooks would make dynamo retrace them
                    row["saved_MB"] = saved_memory_mb(work.fn, work.inputs or work.leaves)
                reset_grads(work.leaves)
                out.append(row)
            except Exception as e:  # noqa: BLE001 - recorded in the row
                out.append(_error_row(suite, case, prov, mode, e, (), cfg))
        del fns
    works.clear()
    return out


def run(ops: Sequence[str], cfg: Config, out_dir: Optional[str] = None, plots: bool = True,
        log=print) -> Dict[str, Any]:
    """Measure the ceilings (unless cfg.ceilings is False), run every suite of `ops`, write the
    results to `out_dir` (if given; the JSON is rewritten after each case, so a run stopped from
    outside keeps what it measured). Rows not started within cfg.budget_s seconds are "cut".
    Returns {"rows", "environment", "ceilings", "paths", "suites"}."""
    start = time.monotonic()
    deadline = start + cfg.budget_s if cfg.budget_s is not None else None
    env = environment(cfg)
    if cfg.verbose:
        log(f"device: {env['device_name']}; torch {env['torch']}, triton {env['triton']}, "
            f"CUDA {env['cuda']}; fasttx path: {env['fasttx_path']}"
            + (f"; {env['cpu_threads']} CPU thread(s)" if not cfg.cuda else ""))
        if cfg.smoke:
            log(report.SMOKE_NOTE)
    ceilings: Dict[str, Any] = {}
    if cfg.ceilings:
        with cpu_threads(cfg):
            ceilings = measure_ceilings(cfg)
        if cfg.verbose:
            log(f"ceilings: copy {ceilings['copy_GBps']:.1f} GB/s, matmul "
                f"{ceilings['matmul_TFLOPs']:.3f} TFLOP/s ({ceilings['matmul_dtype']})")
    suites = load_suites(ops, cfg)
    rows: List[Dict[str, Any]] = []
    paths: Dict[str, str] = {}
    checkpoint = None
    if out_dir is not None:  # the JSON after every case: a run stopped from outside keeps its rows
        os.makedirs(out_dir, exist_ok=True)

        def checkpoint(srows):
            doc = report.document(rows + srows, suites, cfg, env, ceilings)
            with open(os.path.join(out_dir, report.result_stem(env, doc["date"]) + ".json"), "w") as f:
                json.dump(doc, f, indent=1, default=str)

    for s in suites:
        rows += run_suite(s, cfg, ceilings, log=log, deadline=deadline, after_case=checkpoint)
    if out_dir is not None:
        paths = write_results(rows, suites, cfg, env, ceilings, out_dir, plots=plots, log=log)
    return {"rows": rows, "environment": env, "ceilings": ceilings, "paths": paths, "suites": suites}
