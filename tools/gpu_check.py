"""`make gpu-check OUT=dir`: everything one GPU window should tell about fasttx, in one command.

    python tools/gpu_check.py --out gpu-check-out               # default budget 480 s
    python tools/gpu_check.py --out dir --budget-s 300 --workers 8

Stages, in the order that matters (each has a share of the budget; what a stage leaves unused
passes on; a stage that would start with too little time left is cut and listed as cut):

  environment   device, SM count, clocks, driver / CUDA / torch / triton versions
  tests         the whole suite (GPU-marked tests included) on the compiled kernels, spread over
                the host's cores (pytest-xdist), a per-test timeout when pytest-timeout is there,
                junit xml; FASTTX_AUTOTUNE=0 so each kernel compiles one config per shape class
  determinism   every bench suite's fasttx op, forward + backward twice on its largest case,
                compared bit for bit (output and every gradient)
  sanitizer     compute-sanitizer memcheck and racecheck over one small case of every suite
                (skipped, with the reason, where compute-sanitizer is not installed)
  bench:*       `python -m bench` selections: ceilings and attention (fwd, fwd+bwd; bf16; head
                dim 64/128; seq 1k/4k/16k; causal and not; every SDPA backend) with decode; every
                other op at two sizes; the GPT-2-small training step; then FlexAttention, the
                torch.compile baselines, the compiled GPT step and generate, as the budget allows.
                Autotuning runs here; the chosen configs are recorded in results.json / results.md.

Output (at most 8 files in OUT): results.json (the bench schema plus a "gpu_check" record),
results.md, junit.xml, summary.txt (first lines: what passed, what failed, the headline ratios),
log.txt (everything every stage printed), and up to three plots.

Without CUDA the same command is a rehearsal: the Triton interpreter, tiny sizes, a few tests,
the same files (a test in `make test` runs it so that the command cannot rot).
Exit status: 0 when nothing failed (a cut is not a failure), 1 otherwise.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from typing import Any, Callable, Dict, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # a bare checkout: bench/ and fasttx/ from the repository

# Rehearsal (no CUDA): a few quick tests, one of them GPU-marked (it must show as skipped).
REHEARSAL_TESTS = [
    "tests/test_layer_norm.py::test_layer_norm_backward_is_deterministic",
    "tests/test_dropout.py::test_backward_twice_is_deterministic",
    "bench/test_bench_smoke.py::test_gpu_smoke_records_memory",
]
# Not run inside the check: this file's own rehearsal test, and the pytest-benchmark entry (a
# benchmark, whose GPU sweep belongs to the bench stages).
EXCLUDED_TESTS = ["tests/test_gpu_check.py", "bench/test_bench_pytest_benchmark.py"]
MIN_STAGE_S = 5.0  # a stage with less time than this left is cut, not started
PLOT_PRIORITY = ["attention", "attention_decode", "layer_norm", "gpt_train"]
MAX_PLOTS = 3


# ------------------------------------------------------------------------------------------------
# Budget, stages, subprocesses
# ------------------------------------------------------------------------------------------------
class Check:
    """The run: a wall-clock budget measured from construction, the stage records, the log."""

    def __init__(self, out: str, budget_s: float, rehearsal: bool, log_path: Optional[str] = None):
        self.out, self.budget_s, self.rehearsal = out, budget_s, rehearsal
        self.t0 = time.monotonic()
        self.stages: List[Dict[str, Any]] = []
        self.allotted_s = 0.0  # the shares of the stages so far, in seconds: each stage's deadline
        self.log_file = open(log_path, "a") if log_path else None

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def log(self, text: str) -> None:
        line = f"[{self.elapsed():6.1f}s] {text}"
        print(line, flush=True)
        if self.log_file:
            self.log_file.write(line + "\n")
            self.log_file.flush()

    def stage(self, name: str, share: float, fn: Callable[[float], Tuple[str, str]]) -> Dict[str, Any]:
        """Run fn(cap_s) -> (status, note) with cap_s = its share of the budget plus what the
        stages before it left unused, at most what is left; status is "ok", "failed", "skipped"
        or "error" (an exception); "cut" if never started."""
        self.allotted_s += share * self.budget_s
        cap = min(self.allotted_s - self.elapsed(), self.left())
        rec = {"name": name, "status": "cut", "seconds": 0.0, "cap_s": round(max(cap, 0.0), 1),
               "note": f"time budget spent ({self.elapsed():.0f} of {self.budget_s:.0f} s used)"}
        if cap < MIN_STAGE_S:
            self.log(f"== {name}: CUT ({rec['note']})")
            self.stages.append(rec)
            return rec
        self.log(f"== {name} (up to {cap:.0f} s)")
        start = time.monotonic()
        try:
            rec["status"], rec["note"] = fn(cap)
        except Exception as e:  # noqa: BLE001 - a broken stage is reported, the check goes on
            rec["status"], rec["note"] = "error", f"{type(e).__name__}: {e}"
        rec["seconds"] = round(time.monotonic() - start, 1)
        self.log(f"== {name}: {rec['status']} in {rec['seconds']:.0f} s: {rec['note']}")
        self.stages.append(rec)
        return rec

    def run(self, cmd: List[str], cap_s: float, env: Optional[Dict[str, str]] = None) -> Tuple[int, str, bool]:
        """Run cmd (output into the log), stopping it at cap_s: SIGINT first (pytest then still
        writes its junit xml), SIGKILL 20 s later. Returns (returncode, output, timed_out)."""
        self.log("$ " + " ".join(cmd))
        with tempfile.TemporaryFile("w+") as buf:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=buf, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            timed_out = False
            try:
                proc.wait(timeout=max(1.0, cap_s))
            except subprocess.TimeoutExpired:
                timed_out = True
                self.log(f"stopping after {cap_s:.0f} s (stage cap)")
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            buf.seek(0)
            output = buf.read()
        if self.log_file:
            self.log_file.write(output if output.endswith("\n") or not output else output + "\n")
            self.log_file.flush()
        return proc.returncode, output, timed_out


def child_env(rehearsal: bool, autotune: bool) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if rehearsal:
        env["TRITON_INTERPRET"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""  # a rehearsal asked for on a GPU machine stays on the CPU
    else:
        env.pop("TRITON_INTERPRET", None)
    if autotune:
        env.pop("FASTTX_AUTOTUNE", None)
    else:
        env["FASTTX_AUTOTUNE"] = "0"  # the kernels use one fixed config per shape class
    return env


# ------------------------------------------------------------------------------------------------
# Stage: environment
# ------------------------------------------------------------------------------------------------
def find_sanitizer() -> Optional[str]:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for root in [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"))]:
        path = os.path.join(root, "bin", "compute-sanitizer") if root else ""
        if path and os.access(path, os.X_OK):
            return path
    return None


def environment_info() -> Dict[str, Any]:
    import torch

    info: Dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "host_cores": os.cpu_count(), "platform": platform.platform(),
        "pytest_xdist": importlib.util.find_spec("xdist") is not None,
        "pytest_timeout": importlib.util.find_spec("pytest_timeout") is not None,
        "compute_sanitizer": find_sanitizer(),
    }
    for mod in ("triton", "numpy", "transformers", "matplotlib"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional
            info[mod] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, sm_count=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                    memory_GiB=round(p.total_memory / 2**30, 1), device_count=torch.cuda.device_count(),
                    cudnn=torch.backends.cudnn.version())
        smi = shutil.which("nvidia-smi")
        if smi:
            fields = "driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,temperature.gpu"
            try:
                r = subprocess.run([smi, f"--query-gpu={fields}", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=20)
                values = [v.strip() for v in r.stdout.splitlines()[0].split(",")]
                info.update(dict(zip(fields.replace(".", "_").split(","), values)))
            except Exception as e:  # noqa: BLE001 - clocks are nice to have
                info["nvidia_smi"] = f"unreadable ({type(e).__name__}: {e})"
        else:
            info["nvidia_smi"] = "not found (no driver version or clocks)"
    else:
        from bench.report import _cpu_name

        info.update(device=_cpu_name() + " (no CUDA: rehearsal)", sm_count=None)
    return info


# ------------------------------------------------------------------------------------------------
# Stage: tests
# ------------------------------------------------------------------------------------------------
def pytest_command(junit: str, rehearsal: bool, workers: int, has_xdist: bool, has_timeout: bool) -> List[str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", f"--junitxml={junit}",
           "--durations=15"]
    if rehearsal:
        cmd += REHEARSAL_TESTS
    else:
        cmd += ["tests", "bench"] + [f"--ignore={t}" for t in EXCLUDED_TESTS]
    if has_xdist:
        cmd += ["-n", str(workers)]
    if has_timeout:
        cmd += ["--timeout", "120" if rehearsal else "300"]
    return cmd


def parse_junit(path: str) -> Dict[str, Any]:
    """Counts, failures (with their first lines) and the slowest tests of a junit xml file."""
    res: Dict[str, Any] = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0,
                           "failures": [], "slowest": []}
    if not os.path.exists(path):
        res["missing"] = True
        return res
    root = ET.parse(path).getroot()
    cases = []
    for tc in root.iter("testcase"):
        name = f"{tc.get('classname', '')}::{tc.get('name', '')}"
        t = float(tc.get("time") or 0.0)
        cases.append((t, name))
        res["tests"] += 1
        kinds = {child.tag: child for child in tc}
        if "failure" in kinds or "error" in kinds:
            tag = "failure" if "failure" in kinds else "error"
            el = kinds[tag]
            text = (el.get("message") or el.text or "").strip().splitlines()
            res["failed" if tag == "failure" else "errors"] += 1
            res["failures"].append({"test": name, "kind": tag, "first_lines": text[:3]})
        elif "skipped" in kinds:
            res["skipped"] += 1
        else:
            res["passed"] += 1
    res["slowest"] = [{"test": n, "seconds": round(t, 2)} for t, n in sorted(cases, reverse=True)[:10]]
    return res


def stage_tests(check: Check, workers: int, info: Dict[str, Any], holder: Dict[str, Any]):
    def fn(cap):
        junit = os.path.join(check.out, "junit.xml")
        cmd = pytest_command(junit, check.rehearsal, 0 if check.rehearsal else workers,
                             info["pytest_xdist"], info["pytest_timeout"])
        rc, out, timed_out = check.run(cmd, cap, child_env(check.rehearsal, autotune=False))
        res = parse_junit(junit)
        res.update(returncode=rc, cut=timed_out)
        holder["tests"] = res
        counts = (f"{res['passed']} passed, {res['failed']} failed, {res['errors']} errors, "
                  f"{res['skipped']} skipped of {res['tests']}")
        if res.get("missing"):
            return "failed", f"no junit xml (pytest exit {rc}); see log.txt"
        if timed_out:
            return "failed", f"stopped at the stage cap: {counts} (the rest did not run)"
        bad = res["failed"] or res["errors"] or rc not in (0, 5)
        return ("failed" if bad else "ok"), counts
    return fn


# ------------------------------------------------------------------------------------------------
# Stages: determinism and sanitizer (both run the worker below in a child process)
# ------------------------------------------------------------------------------------------------
def worker_command(kind: str, rehearsal: bool, result: str) -> List[str]:
    return [sys.executable, os.path.abspath(__file__), "--worker", kind, "--worker-json", result,
            "--size", "tiny" if rehearsal or kind == "launches" else "full",
            "--device", "cpu" if rehearsal else "cuda"]


def stage_determinism(check: Check, holder: Dict[str, Any]):
    def fn(cap):
        result = os.path.join(check.tmp, "determinism.json")
        rc, out, timed_out = check.run(worker_command("determinism", check.rehearsal, result), cap,
                                       child_env(check.rehearsal, autotune=False))
        if not os.path.exists(result):
            return "failed", f"worker exit {rc}{' (stopped at the cap)' if timed_out else ''}; see log.txt"
        with open(result) as f:
            res = json.load(f)
        holder["determinism"] = res
        same = [r["suite"] for r in res if r["status"] == "identical"]
        bad = [f"{r['suite']}: {r['status']} {r.get('detail', '')}".strip() for r in res if r["status"] != "identical"]
        note = f"{len(same)} of {len(res)} suites bit-identical (output and every gradient, run twice)"
        return ("failed" if bad else "ok"), note + ("; " + "; ".join(bad) if bad else "")
    return fn


def stage_sanitizer(check: Check, holder: Dict[str, Any]):
    def fn(cap):
        tool = find_sanitizer()
        result = os.path.join(check.tmp, "launches.json")
        cmd = worker_command("launches", check.rehearsal, result)
        env = child_env(check.rehearsal, autotune=False)
        if check.rehearsal or tool is None:
            why = ("no CUDA (rehearsal)" if check.rehearsal
                   else "compute-sanitizer not found (PATH, /usr/local/cuda*/bin)")
            rc, _, _ = check.run(cmd, cap, env)  # the launch script itself still runs, so it cannot rot
            holder["sanitizer"] = {"skipped": why, "launches_rc": rc}
            if rc != 0:
                return "failed", f"{why}; the launch script alone failed (exit {rc})"
            return "skipped", f"{why}; the launch script ran without it"
        env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"  # so out-of-bounds accesses hit unallocated memory
        res, notes, failed = {}, [], False
        for name, extra in (("memcheck", []), ("racecheck", ["--racecheck-report", "hazard"])):
            rc, out, timed_out = check.run([tool, "--tool", name, *extra, "--error-exitcode", "9",
                                            "--print-limit", "20", *cmd], cap / 2, env)
            summary = [ln.strip() for ln in out.splitlines() if "SUMMARY" in ln]
            res[name] = {"returncode": rc, "summary": summary, "cut": timed_out}
            bad = rc != 0 and not timed_out
            failed |= bad
            notes.append(f"{name}: {summary[-1] if summary else 'no summary'}"
                         + (" (stopped at the cap)" if timed_out else "") + (f" exit {rc}" if bad else ""))
        holder["sanitizer"] = res
        return ("failed" if failed else "ok"), "; ".join(notes)
    return fn


def _bits(t):
    import torch

    t = t.detach().contiguous().reshape(-1)  # 1-D: a 0-d loss cannot be viewed as bytes
    return t.view(torch.uint8) if t.is_floating_point() and t.numel() else t


def worker(kind: str, size: str, device: str, out_json: str) -> int:
    """The child of the determinism and sanitizer stages: every bench suite's fasttx op (Triton
    path) on one case, forward + backward; "determinism" runs it twice on the largest case and
    compares bit for bit, "launches" once on the smallest (what compute-sanitizer watches)."""
    import torch

    import fasttx
    from bench import harness, timing

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = harness.Config(device=device, dtypes=(dtype,), size=size, fasttx_backend="triton",
                         providers=["fasttx"], compile=False, verbose=False)
    results = []
    for op in harness.OPS:
        try:
            suites = harness.load_suites([op], cfg)
        except Exception as e:  # noqa: BLE001 - a broken bench module is a finding
            results.append({"suite": op, "status": "error", "detail": f"{type(e).__name__}: {e}"})
            continue
        for s in suites:
            if s.unavailable or "call" in s.modes or not any(p.name == "fasttx" for p in s.providers):
                continue
            prov = next(p for p in s.providers if p.name == "fasttx")
            case = (max if kind == "determinism" else min)(s.cases, key=lambda c: c.x)
            rec = {"suite": s.name, "case": case.label, "dtype": harness.DTYPE_NAMES[case.dtype]}
            backward = "fwd+bwd" in s.modes
            try:
                with fasttx.use_backend("triton"):
                    runs = []
                    for _ in range(2 if kind == "determinism" else 1):
                        torch.manual_seed(0)
                        work = prov.build(case, cfg)
                        torch.manual_seed(1)  # dropout seeds and the output gradients
                        out = work.fn()
                        tensors = timing._tensors(out)
                        if backward:
                            outs, grads = timing._grad_outputs(out)
                            torch.autograd.backward(outs, grads)
                            tensors += [t.grad for t in work.leaves if t.grad is not None]
                        if device == "cuda":
                            torch.cuda.synchronize()
                        runs.append([_bits(t).cpu() for t in tensors])
                        del work, out
                if kind == "determinism":
                    a, b = runs
                    same = len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))
                    rec["status"] = "identical" if same else "DIFFERENT"
                    rec["tensors"] = len(a)
                    if not same:
                        rec["detail"] = "outputs/gradients differ between two identical runs"
                else:
                    rec["status"] = "ran"
            except Exception as e:  # noqa: BLE001 - recorded
                first = str(e).splitlines()[0][:300] if str(e) else ""
                rec["status"], rec["detail"] = "error", f"{type(e).__name__}: {first}"
            print(f"{kind} {s.name} {case.label}: {rec['status']} {rec.get('detail', '')}", flush=True)
            results.append(rec)
            if device == "cuda":
                torch.cuda.empty_cache()
    with open(out_json, "w") as f:
        json.dump(results, f, indent=1)
    ok = "identical" if kind == "determinism" else "ran"
    return 0 if all(r["status"] == ok for r in results) else 1


# ------------------------------------------------------------------------------------------------
# Stages: the bench
# ------------------------------------------------------------------------------------------------
def bench_plan(rehearsal: bool, ops: List[str]) -> List[Dict[str, Any]]:
    """The bench selections, most important first: (name, share of the budget, CLI arguments)."""
    other = [op for op in ops if op not in ("attention", "gpt")]  # every op file but these two
    if rehearsal:
        sizes = {"attention": [], "ops": ["--size", "tiny"]}
        where16k, where4k = [], []
    else:
        sizes = {"attention": ["--size", "full"], "ops": ["--size", "quick"]}
        where16k, where4k = ["--where", "S=1024,4096,16384"], ["--where", "S=4096"]
    sdpa = "fasttx,fasttx-dq-atomic,fasttx-dq-kernel,sdpa,sdpa-flash,sdpa-efficient,sdpa-cudnn,sdpa-math,flash_attn"
    fwd = ["--modes", "fwd,fwd+bwd"]
    plan = [
        dict(name="bench:attention", share=0.34, args=["--ops", "attention", *sizes["attention"], *where16k,
                                                       "--providers", sdpa, "--no-compile", *fwd]),
        dict(name="bench:ops", share=0.10, args=["--ops", ",".join(other), *sizes["ops"], "--no-compile",
                                                 "--no-ceilings", *fwd] if other else None),
        dict(name="bench:gpt_train", share=0.06, args=["--ops", "gpt", "--suites", "gpt_train",
                                                       "--providers", "fasttx,torch", "--no-compile",
                                                       "--no-ceilings"]),
        dict(name="bench:flex", share=0.08, args=["--ops", "attention", "--suites", "attention",
                                                  *sizes["attention"], *where4k, "--providers", "flex",
                                                  "--compile", "--no-ceilings", *fwd]),
        dict(name="bench:compile-baselines", share=0.08,
             args=["--ops", ",".join(other), *sizes["ops"], "--providers", "torch.compile", "--compile",
                   "--no-ceilings", *fwd] if other else None),
        dict(name="bench:gpt_train-compiled", share=0.12,
             args=["--ops", "gpt", "--suites", "gpt_train", "--providers", "torch.compile,fasttx.compile",
                   "--compile", "--no-ceilings"]),
        dict(name="bench:gpt_generate", share=0.05,
             args=["--ops", "gpt", "--suites", "gpt_generate", "--providers", "fasttx,torch",
                   "--no-ceilings"] + ([] if rehearsal else ["--where", "use_cache=true"])),
    ]
    return [p for p in plan if p["args"] is not None]


def stage_bench(check: Check, step: Dict[str, Any], index: int, docs: List[Dict[str, Any]]):
    def fn(cap):
        out_dir = os.path.join(check.tmp, f"bench{index}")
        common = ["--out-dir", out_dir, "--no-plots", "-q", "--budget-s", f"{max(1.0, cap * 0.85 - 5):.0f}"]
        args = step["args"]
        if check.rehearsal:  # compiling on the CPU would dominate the rehearsal: the rows skip
            common += ["--smoke", "--device", "cpu"]
            args = ["--no-compile" if a == "--compile" else a for a in args]
        else:
            common += ["--dtype", "bf16", "--warmup-ms", "10", "--rep-ms", "50"]
        rc, out, timed_out = check.run([sys.executable, "-m", "bench", *args, *common], cap,
                                       child_env(check.rehearsal, autotune=True))
        found = sorted(glob.glob(os.path.join(out_dir, "*.json")))
        if not found:
            return "failed", f"no results (exit {rc}{', stopped at the cap' if timed_out else ''}); see log.txt"
        with open(found[0]) as f:
            doc = json.load(f)
        docs.append(doc)
        rows = doc["rows"]
        counts = {st: sum(r["status"] == st for r in rows) for st in ("ok", "skipped", "error", "cut")}
        note = ", ".join(f"{n} {st}" for st, n in counts.items()) + " rows"
        if timed_out:
            note += "; stopped at the cap (rows of the case in progress are lost)"
        errors = [r for r in rows if r["status"] == "error" and r["provider"] in ("fasttx", r["baseline"])]
        return ("failed" if errors else "ok"), note
    return fn


def merge_docs(docs: List[Dict[str, Any]], info: Dict[str, Any]) -> Dict[str, Any]:
    """One results document (the bench schema) from the stages' documents: rows concatenated,
    suites once each, the first ceilings, speedups and ceiling fractions recomputed over all rows
    (FlexAttention's rows, timed in their own stage, get their speedup over sdpa-flash here)."""
    from bench import harness

    if not docs:
        return {"schema": 1, "date": time.strftime("%Y-%m-%d"), "measurement": False,
                "environment": {"device": "none", "device_name": info.get("device", "?"), "torch": info["torch"],
                                "triton": info.get("triton"), "cuda": info.get("cuda"),
                                "python": info["python"], "fasttx": "?", "fasttx_path": "?"},
                "config": {"size": "-"}, "ceilings": {}, "suites": [], "autotune": {}, "rows": []}
    doc = dict(docs[0])
    doc["ceilings"] = next((d["ceilings"] for d in docs if d.get("ceilings")), {})
    doc["configs"] = [d["config"] for d in docs]
    seen, suites, rows, autotune = set(), [], [], {}
    for d in docs:
        for s in d["suites"]:
            if s["name"] not in seen:
                seen.add(s["name"])
                suites.append(s)
        rows += d["rows"]
        for k, v in d.get("autotune", {}).items():
            autotune.setdefault(k, []).extend(e for e in v if e not in autotune.get(k, []))
    for r in rows:
        if r["status"] == "ok":
            r["frac_ceiling"] = None
            harness.fill_ceiling_fraction(r, doc["ceilings"])
    harness.fill_speedups(rows)
    doc.update(suites=suites, rows=rows, autotune=autotune,
               measurement=all(d.get("measurement", True) for d in docs))
    return doc


# ------------------------------------------------------------------------------------------------
# Summary
# ------------------------------------------------------------------------------------------------
def headline(doc) -> List[str]:
    """fasttx's geometric-mean speedup per suite and mode group, in plain words."""
    from bench import report

    rows, parts = doc["rows"], []
    base = {s["name"]: s["baseline"] for s in doc["suites"]}
    for s in doc["suites"]:
        modes = list(dict.fromkeys(r["mode"] for r in rows if r["op"] == s["name"] and r["status"] == "ok"))
        bits = []
        for m in modes:
            v = report.summary(rows, modes=[m]).get(s["name"])
            if v is not None:
                bits.append(f"{m} {v:.2f}x")
        if bits:
            parts.append(f"{s['name']} {', '.join(bits)} vs {base[s['name']]}")
    return parts


def write_summary(check: Check, info, holder, doc, path: str, failed: List[str]) -> List[str]:
    t = holder.get("tests")
    lines = []
    verdict = "FAIL" if failed else "PASS"
    where = ("REHEARSAL on CPU (Triton interpreter, tiny sizes: no GPU numbers)" if check.rehearsal
             else info.get("device"))
    lines.append(f"fasttx gpu-check: {verdict} - {where}; {check.elapsed():.0f} s of the "
                 f"{check.budget_s:.0f} s budget; python {sys.executable}.")
    if failed:
        lines.append("FAILED: " + "; ".join(failed))
    if t:
        lines.append(f"Tests: {t['passed']} passed, {t['failed']} failed, {t['errors']} errors, "
                     f"{t['skipped']} skipped of {t['tests']}" + (" (stopped at the cap)" if t.get("cut") else "")
                     + " - junit.xml.")
    else:
        lines.append("Tests: not run.")
    by = {s["name"]: s for s in check.stages}
    for name, label in (("determinism", "Determinism"), ("sanitizer", "Sanitizer")):
        s = by.get(name)
        lines.append(f"{label}: {s['status']} - {s['note']}" if s else f"{label}: not run.")
    head = headline(doc)
    smoke = "" if doc.get("measurement", True) else " [rehearsal smoke: not a measurement]"
    lines.append("Headline (fasttx speedup, geometric mean of medians)" + smoke + ": "
                 + ("; ".join(head) if head else "no bench rows."))
    cut = [s["name"] for s in check.stages if s["status"] == "cut"]
    cut_rows = sum(r["status"] == "cut" for r in doc["rows"])
    lines.append("Cut by the time budget: " + (", ".join(cut) if cut else "no stage")
                 + (f"; {cut_rows} bench rows" if cut_rows else "") + ".")
    lines += ["", "Stages (in run order):"]
    for s in check.stages:
        lines.append(f"  {s['name']:<26} {s['status']:<8} {s['seconds']:7.1f} s (cap {s['cap_s']:.0f} s)  {s['note']}")
    lines += ["", "Slowest stages:"]
    for s in sorted(check.stages, key=lambda s: -s["seconds"])[:5]:
        lines.append(f"  {s['seconds']:7.1f} s  {s['name']}")
    if t and t["failures"]:
        lines += ["", f"Test failures ({len(t['failures'])}):"]
        for f in t["failures"][:40]:
            lines.append(f"  {f['kind'].upper()} {f['test']}")
            lines += [f"      {ln[:200]}" for ln in f["first_lines"]]
    if t and t["slowest"]:
        lines += ["", "Slowest tests:"]
        lines += [f"  {x['seconds']:7.2f} s  {x['test']}" for x in t["slowest"]]
    errs = [r for r in doc["rows"] if r["status"] == "error"]
    if errs:
        lines += ["", f"Bench errors ({len(errs)}):"]
        lines += [f"  {r['op']} {r['case']} {r['mode']} {r['provider']}: {r['reason']}" for r in errs[:30]]
    fb = sorted({r["op"] for r in doc["rows"] if r.get("fallback")})
    if fb:
        lines += ["", "fasttx fell back to torch's implementation in: " + ", ".join(fb)]
    if cut or cut_rows:
        lines += ["", "What was cut:"]
        lines += [f"  stage {n}" for n in cut]
        groups: Dict[str, int] = {}
        for r in doc["rows"]:
            if r["status"] == "cut":
                groups[f"{r['op']} {r['provider']}"] = groups.get(f"{r['op']} {r['provider']}", 0) + 1
        lines += [f"  {k}: {n} rows" for k, n in groups.items()]
    if doc.get("autotune"):
        lines += ["", f"Autotuned configs recorded: {sum(len(v) for v in doc['autotune'].values())} "
                  "(results.json 'autotune', results.md)."]
    lines += ["", "Environment:"]
    lines += [f"  {k}: {v}" for k, v in info.items()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return lines


def write_plots(doc, out: str, tmp: str) -> List[str]:
    from bench import report

    have = [s["name"] for s in doc["suites"] if any(r["op"] == s["name"] and r["status"] == "ok" for r in doc["rows"])]
    order = [n for n in PLOT_PRIORITY if n in have] + [n for n in have if n not in PLOT_PRIORITY]
    made = report.write_plots(doc, os.path.join(tmp, "plots"), log=lambda s: None, only=order[:MAX_PLOTS])
    kept = []
    for path in sorted(made, key=lambda p: order.index(os.path.basename(p).rsplit("-", 1)[0]))[:MAX_PLOTS]:
        dest = os.path.join(out, "plot-" + os.path.basename(path))
        shutil.copyfile(path, dest)
        kept.append(os.path.basename(dest))
    return kept


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu-check-out", help="output folder (created; at most 8 files)")
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of the whole run")
    p.add_argument("--workers", type=int, default=None, help="pytest-xdist workers (default: host cores, at most 16)")
    p.add_argument("--rehearsal", action="store_true", help="rehearse on CPU even where CUDA is present")
    p.add_argument("--worker", choices=("determinism", "launches"), help=argparse.SUPPRESS)
    p.add_argument("--worker-json", help=argparse.SUPPRESS)
    p.add_argument("--size", default="full", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.size, args.device, args.worker_json)

    # First line: which python runs (make gpu-check picks the project's .venv, else python3).
    print(f"fasttx gpu-check: python {sys.executable} ({platform.python_version()})", flush=True)
    if args.rehearsal:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA
    try:
        import torch
    except ModuleNotFoundError as exc:
        sys.exit(f"fasttx gpu-check: this python ({sys.executable}) cannot import {exc.name}: run "
                 "`make install` for the project's .venv, or choose a python with GPU_PY=...")

    rehearsal = args.rehearsal or not torch.cuda.is_available()
    if rehearsal:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything here imports triton
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    for name in ("results.json", "results.md", "junit.xml", "summary.txt", "log.txt"):
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    for old in glob.glob(os.path.join(out, "plot-*.png")):
        os.remove(old)
    check = Check(out, args.budget_s, rehearsal, os.path.join(out, "log.txt"))
    workers = args.workers or min(os.cpu_count() or 1, 16)
    holder: Dict[str, Any] = {}
    docs: List[Dict[str, Any]] = []
    info: Dict[str, Any] = {}

    with tempfile.TemporaryDirectory(prefix="fasttx-gpu-check-") as tmp:
        check.tmp = tmp

        def env_stage(cap):
            info.update(environment_info())
            return "ok", (f"{info.get('device')}; SMs {info.get('sm_count')}; torch {info['torch']}, "
                          f"triton {info.get('triton')}, CUDA {info.get('cuda')}, "
                          f"driver {info.get('driver_version', '-')}")

        check.stage("environment", 0.02, env_stage)
        if not info:
            info.update(python=platform.python_version(), torch=torch.__version__, pytest_xdist=False,
                        pytest_timeout=False)
        check.stage("tests", 0.38, stage_tests(check, workers, info, holder))
        check.stage("determinism", 0.07, stage_determinism(check, holder))  # 28 bench suites twice
        check.stage("sanitizer", 0.07, stage_sanitizer(check, holder))
        from bench.harness import OPS

        for i, step in enumerate(bench_plan(rehearsal, list(OPS))):
            check.stage(step["name"], step["share"], stage_bench(check, step, i, docs))

        doc = merge_docs(docs, info)
        doc["gpu_check"] = {"rehearsal": rehearsal, "budget_s": args.budget_s,
                            "elapsed_s": round(check.elapsed(), 1), "environment": info,
                            "stages": check.stages, **holder}
        plots = write_plots(doc, out, tmp)
        failed = [f"{s['name']} ({s['note']})" for s in check.stages if s["status"] in ("failed", "error")]
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(doc, f, indent=1, default=str)
        summary = write_summary(check, info, holder, doc, os.path.join(out, "summary.txt"), failed)
        from bench import report

        with open(os.path.join(out, "results.md"), "w") as f:
            f.write("# fasttx gpu-check\n\n```\n" + "\n".join(summary[:summary.index("")]) + "\n```\n\n")
            f.write("".join(f"![{p}]({p})\n\n" for p in plots))
            f.write(report.markdown(doc).replace("# fasttx benchmarks:", "# Benchmarks:", 1))
    check.log("\n".join(summary[:summary.index("")]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
