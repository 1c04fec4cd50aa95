"""Results: the run's environment record (device, versions, the autotuner's chosen configs), the
JSON document (schema in bench/results/README.md), its markdown tables (throughput, speedup over
the suite's baseline, % of the measured ceiling, the skip list), the PNG plots, and the one-line
formats the CLI prints. Nothing here runs a benchmark."""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch

from .spec import DTYPE_NAMES, Config, Suite

SMOKE_NOTE = ("SMOKE RUN: one timed round per row on tiny sizes. It checks that every setup runs; "
              "its numbers are not a measurement.")


# ----------------------------------------------------------------------------------------------
# Environment
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
            path = f"unavailable ({type(e).__name__}: {e})"
    return {
        "device": cfg.device,
        "device_name": device_name,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "fasttx": fasttx.__version__,
        "fasttx_path": path,
        "cpu_threads": (max(1, cfg.threads or 1) if not cfg.cuda else torch.get_num_threads()),
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


def autotune_configs() -> Dict[str, List[Dict[str, str]]]:
    """The configs Triton's autotuner chose in this process, per fasttx kernel: {"<module>.<kernel>":
    [{"key": ..., "config": ...}]} (empty where nothing was tuned, e.g. on CPU)."""
    try:
        from triton.runtime.autotuner import Autotuner
    except Exception:  # noqa: BLE001 - no triton here
        return {}
    out: Dict[str, List[Dict[str, str]]] = {}
    for name, mod in sorted(sys.modules.items()):
        if not name.startswith("fasttx.kernels") or mod is None:
            continue
        for attr, obj in sorted(vars(mod).items()):
            if isinstance(obj, Autotuner) and getattr(obj, "cache", None):
                out[f"{name.split('.')[-1]}.{attr}"] = [{"key": str(k), "config": str(c)}
                                                         for k, c in obj.cache.items()]
    return out


# ----------------------------------------------------------------------------------------------
# The JSON document
# ----------------------------------------------------------------------------------------------
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


def document(rows, suites: Sequence[Suite], cfg: Config, env, ceilings, date: Optional[str] = None):
    """The results document (bench/results/README.md describes every field)."""
    return {
        "schema": 1,
        "date": date or _dt.date.today().isoformat(),
        "timestamp": _dt.datetime.now().isoformat(timespec="seconds"),
        "measurement": not cfg.smoke,
        "environment": env,
        "config": config_dict(cfg),
        "ceilings": ceilings,
        "suites": [
            {"name": s.name, "metric": s.metric, "baseline": s.baseline, "xlabel": s.xlabel,
             "description": s.description, "unavailable": s.unavailable}
            for s in suites
        ],
        "autotune": autotune_configs(),
        "rows": rows,
    }


def write_results(rows, suites: Sequence[Suite], cfg: Config, env, ceilings, out_dir: str,
                  plots: bool = True, date: Optional[str] = None, log=print) -> Dict[str, str]:
    """Writes <out_dir>/<stem>.json, <stem>.md and <stem>/<op>-<dtype>.png; returns their paths."""
    doc = document(rows, suites, cfg, env, ceilings, date)
    stem = result_stem(env, doc["date"])
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, stem + ".json"), "md": os.path.join(out_dir, stem + ".md")}
    with open(paths["json"], "w") as f:
        json.dump(doc, f, indent=1, default=str)
    with open(paths["md"], "w") as f:
        f.write(markdown(doc, plot_dir=stem if plots else None))
    if plots:
        made = write_plots(doc, os.path.join(out_dir, stem), log=log)
        if made:
            paths["plots"] = os.path.join(out_dir, stem)
    return paths


# ----------------------------------------------------------------------------------------------
# Summaries
# ----------------------------------------------------------------------------------------------
def geomean(xs) -> Optional[float]:
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def _fasttx_rows(rows, op, provider="fasttx", modes=None):
    return [r for r in rows if r["op"] == op and r["provider"] == provider and r["status"] == "ok"
            and r["provider"] != r["baseline"] and r.get("speedup") and (modes is None or r["mode"] in modes)]


def summary(rows, provider: str = "fasttx", key: str = "speedup", modes=None) -> Dict[str, Optional[float]]:
    """Geometric-mean speedup of `provider` over each suite's baseline, per suite (`key`:
    "speedup" from medians, "speedup_min" from the fastest runs); `modes` narrows the rows."""
    return {op: geomean(r[key] for r in _fasttx_rows(rows, op, provider, modes))
            for op in dict.fromkeys(r["op"] for r in rows)}


def ratio_noise(rows, op, provider: str = "fasttx", modes=None) -> Optional[float]:
    """Typical relative uncertainty of one speedup in suite `op`: the median over its rows of the
    provider's and the baseline's noise combined (root of the sum of squares)."""
    base = {(r["series"], r["case"], r["dtype"], r["mode"]): r for r in rows
            if r["op"] == op and r["provider"] == r["baseline"] and r["status"] == "ok"}
    vals = []
    for r in _fasttx_rows(rows, op, provider, modes):
        b = base.get((r["series"], r["case"], r["dtype"], r["mode"]))
        if b and r.get("noise") is not None and b.get("noise") is not None:
            vals.append(math.hypot(r["noise"], b["noise"]))
    return statistics.median(vals) if vals else None


def skip_list(rows) -> List[Dict[str, Any]]:
    """Rows not measured, grouped: [{op, provider, status, reason, rows, cases}] in first-seen order."""
    groups: Dict[tuple, Dict[str, Any]] = {}
    for r in rows:
        if r["status"] == "ok":
            continue
        g = groups.setdefault((r["op"], r["provider"], r["status"], r["reason"]),
                              {"op": r["op"], "provider": r["provider"], "status": r["status"],
                               "reason": r["reason"], "rows": 0, "cases": []})
        g["rows"] += 1
        if r["case"] not in g["cases"]:
            g["cases"].append(r["case"])
    return list(groups.values())


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------
def _pct(frac) -> str:
    return f", {100 * frac:.0f}%" if frac is not None else ""


def markdown(doc, plot_dir: Optional[str] = None) -> str:
    env, ceil, rows = doc["environment"], doc["ceilings"], doc["rows"]
    lines = [
        f"# fasttx benchmarks: {env['device_name']} ({doc['date']})",
        "",
    ]
    if not doc.get("measurement", True):
        lines += [f"**{SMOKE_NOTE}**", ""]
    lines += [
        f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, python {env['python']}; "
        f"fasttx {env['fasttx']} (path on this device: {env['fasttx_path']}); "
        f"size `{doc['config']['size']}`" + (f"; {env['cpu_threads']} CPU thread(s)" if env["device"] == "cpu" else "")
        + ".",
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
        "parentheses, the speedup over the suite's baseline in the same run (>1 = faster) and the "
        "fraction of the matching ceiling. Times are medians; † = the fasttx call fell back to "
        "torch's implementation (the row's `fallback` field says why).",
        "",
    ]
    sm, sm_min = summary(rows), summary(rows, key="speedup_min")
    if any(v is not None for v in sm.values()):
        lines += ["| suite | fasttx speedup over baseline, geometric mean of medians | ... of minima "
                  "| typical ratio noise |",
                  "|---|---|---|---|"]
        by_name = {s["name"]: s for s in doc["suites"]}
        for op, v in sm.items():
            if v is not None:
                nz = ratio_noise(rows, op)
                lines.append(f"| {op} (vs {by_name.get(op, {}).get('baseline', '?')}) | {v:.2f}x "
                             f"| {sm_min[op]:.2f}x | {'-' if nz is None else f'±{100 * nz:.0f}%'} |")
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
                lines.append("| series | case | " + " | ".join(providers)
                             + " | peak MB / saved MB (fasttx, baseline) |")
                lines.append("|---|---|" + "---|" * len(providers) + "---|")
                for key in dict.fromkeys((r["series"], r["case"]) for r in sel):
                    cells = []
                    by_prov = {r["provider"]: r for r in sel if (r["series"], r["case"]) == key}
                    for p in providers:
                        r = by_prov.get(p)
                        if r is None or r["status"] != "ok":
                            cells.append("-" if r is None else r["status"])
                        else:
                            sp = f"{r['speedup']:.2f}x" if r["speedup"] else ""
                            paren = f" ({sp}{_pct(r.get('frac_ceiling'))})".replace("(, ", "(")
                            mark = "†" if r.get("fallback") else ""
                            cells.append(_fmt_value(r["value"], r["metric"]) + mark
                                         + (paren if paren != " ()" else ""))
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
        skipped = skip_list(srows)
        if skipped:
            lines += ["Not measured:", ""]
            for g in skipped:
                n = len(g["cases"])
                lines.append(f"- `{g['provider']}` {g['status']} ({n} case{'s' * (n != 1)}): {g['reason']}")
            lines.append("")
    if doc.get("autotune"):
        lines += ["## Autotuned configs (chosen by Triton's autotuner in this run)", ""]
        for kernel, entries in doc["autotune"].items():
            for e in entries:
                lines.append(f"- `{kernel}` key `{e['key']}`: {e['config']}")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------
def write_plots(doc, plot_dir: str, log=print, only: Optional[Sequence[str]] = None) -> List[str]:
    """One PNG per suite and dtype: a grid of (series x mode) panels, the metric against the
    suite's x per provider, with the measured ceiling as a dashed line. `only`: suite names."""
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
        if only is not None and s["name"] not in only:
            continue
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
            smoke = "" if doc.get("measurement", True) else " - SMOKE, not a measurement"
            fig.suptitle(f"{s['name']} {dtype} - {env['device_name']} - {doc['date']}{smoke}", fontsize=10)
            fig.tight_layout()
            path = os.path.join(plot_dir, f"{s['name']}-{dtype}.png")
            fig.savefig(path, dpi=90)
            plt.close(fig)
            made.append(path)
    return made


# ----------------------------------------------------------------------------------------------
# One-line formats (the CLI's per-row output)
# ----------------------------------------------------------------------------------------------
def fmt_value(v, metric) -> str:
    if v is None:
        return "-"
    if metric == "tokens/s":
        return f"{v:,.0f}"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


_fmt_value = fmt_value


def fmt_row(r) -> str:
    head = (f"{r['op']:<22} {r['series'][:18]:<18} {r['case'][:26]:<26} {r['dtype']:<4} {r['mode']:<7} "
            f"{r['provider']:<16}")
    if r["status"] != "ok":
        return f"{head} {r['status']}: {r['reason']}"
    extra = f" x{r['speedup']:.2f}" if r["speedup"] else ""
    nz = f" ±{100 * r['noise']:.0f}%" if r.get("noise") is not None else ""
    mem = f" peak {r['peak_MB']:.1f}MB" if r["peak_MB"] is not None else ""
    saved = f" saved {r['saved_MB']:.2f}MB" if r["saved_MB"] is not None else ""
    fb = " (fell back to torch)" if r.get("fallback") else ""
    return (f"{head} {r['ms']:9.4f} ms{nz}  {fmt_value(r['value'], r['metric'])} {r['metric']}"
            f"{extra}{mem}{saved}{fb}")
