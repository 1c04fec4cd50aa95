"""The benchmark suite as a CPU smoke (tiny sizes, one round), run by `make test` so that it cannot
rot: every bench module's setups go through the harness, and the JSON and markdown it writes must
hold the expected rows and fields. Speed itself is never asserted here (TESTING.md)."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from bench import harness
from bench.__main__ import main
from bench.harness import OPS, Case, Config, Provider, Suite, Work

CUDA = torch.cuda.is_available()
ENV_FIELDS = ("device", "device_name", "torch", "triton", "cuda", "python", "fasttx", "fasttx_path")
ROW_FIELDS = ("op", "series", "case", "x", "dtype", "mode", "provider", "metric", "status", "reason",
              "ms", "ms_q20", "ms_q80", "ms_min", "noise", "fallback", "GBps", "TFLOPs", "tokens_per_s", "value",
              "frac_ceiling", "speedup", "baseline", "peak_MB", "peak_total_MB", "saved_MB", "params")


def smoke_config(**kw) -> Config:
    base = dict(device="cpu", dtypes=(torch.float32,), size="tiny", rounds=1,
                max_seconds_per_row=0.0, compile=False, verbose=False, smoke=True)
    base.update(kw)
    return Config(**base)


def _models_missing():
    try:
        import fasttx.models  # noqa: F401
    except ImportError as e:
        return f"fasttx.models is not importable yet ({e}): the GPT benchmark cannot run"
    return None


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """One CPU smoke run of every bench module (GPT included when fasttx.models exists)."""
    out = tmp_path_factory.mktemp("bench")
    ops = [op for op in OPS if op != "gpt" or _models_missing() is None]
    result = harness.run(ops, smoke_config(), out_dir=str(out), plots=False)
    with open(result["paths"]["json"]) as f:
        doc = json.load(f)
    with open(result["paths"]["md"]) as f:
        md = f.read()
    return result, doc, md, ops


def test_json_has_environment_ceilings_and_config(cpu_run):
    result, doc, _, _ = cpu_run
    assert os.path.basename(result["paths"]["json"]) == f"cpu-{doc['date']}.json"
    for key in ENV_FIELDS:
        assert key in doc["environment"], key
    assert doc["environment"]["torch"] == torch.__version__
    assert doc["environment"]["fasttx_path"] == "torch"  # auto on CPU = torch's ops
    assert doc["environment"]["cpu_threads"] == 1  # the default: stable CPU timings
    assert doc["measurement"] is False and doc["config"]["smoke"] is True
    assert doc["ceilings"]["copy_GBps"] > 0 and doc["ceilings"]["matmul_TFLOPs"] > 0
    assert doc["config"]["size"] == "tiny" and doc["config"]["dtypes"] == ["fp32"]


def test_every_setup_ran_for_fasttx_and_baseline(cpu_run):
    _, doc, _, ops = cpu_run
    rows = doc["rows"]
    assert all(set(ROW_FIELDS) <= set(r) for r in rows)
    errors = [(r["op"], r["provider"], r["mode"], r["reason"]) for r in rows if r["status"] == "error"]
    assert not errors, errors
    suites = {s["name"]: s for s in doc["suites"]}
    loaded = harness.load_suites(ops, smoke_config())
    assert {s.name for s in loaded} == set(suites)
    for name in (s.name for s in loaded if not s.unavailable):
        srows = [r for r in rows if r["op"] == name]
        assert srows, f"{name}: no rows"
        cases = {r["case"] for r in srows}
        modes = {r["mode"] for r in srows}
        for provider in ("fasttx", suites[name]["baseline"]):
            for case in cases:
                for mode in modes:
                    ok = [r for r in srows if (r["provider"], r["case"], r["mode"]) == (provider, case, mode)
                          and r["status"] == "ok"]
                    assert ok, f"{name} {provider} {case} {mode}: no ok row"
                    r = ok[0]
                    assert r["ms"] > 0 and r["ms_q20"] <= r["ms"] <= r["ms_q80"], r
                    assert r["value"] > 0 and math.isfinite(r["value"]), r
                    assert r["speedup"] is not None, r
                    if r["metric"] != "tokens/s":
                        assert 0 < r["frac_ceiling"], r


def test_expected_row_count_and_skip_reasons(cpu_run):
    result, doc, _, _ = cpu_run
    expected = 0
    for s in result["suites"]:
        for c in s.cases:
            expected += len(s.providers) * len(c.modes or s.modes)
    assert len(doc["rows"]) == expected
    for r in doc["rows"]:
        if r["status"] == "skipped":
            assert r["reason"], r
    # Things that cannot run on this CPU are recorded with the reason, not dropped.
    reasons = {r["provider"]: r["reason"] for r in doc["rows"] if r["status"] == "skipped"}
    assert "torch.compile" in reasons and "--compile" in reasons["torch.compile"]
    assert "sdpa-cudnn" in reasons


def test_markdown_lists_every_suite(cpu_run):
    _, doc, md, _ = cpu_run
    assert md.startswith("# fasttx benchmarks: ")
    assert "SMOKE RUN" in md.split("##")[0]  # a one-round run says it is not a measurement
    assert f"torch {torch.__version__}" in md
    for s in doc["suites"]:
        assert f"## {s['name']} ({s['metric']}" in md
    assert "| series | case | fasttx |" in md
    assert "Not measured:" in md and "`sdpa-cudnn` skipped" in md


def test_throughput_formulas():
    """GB/s, TFLOP/s and the ceiling fraction come from the case's explicit counts."""
    case = Case("c", 1, torch.float32, bytes={"fwd": 3e9}, flops={"fwd": 2e12}, tokens=500)
    row = {"metric": "GB/s"}
    harness._fill_metrics(row, case, "fwd", 1000.0, {"copy_GBps": 6.0, "matmul_TFLOPs": 4.0})
    assert row["GBps"] == pytest.approx(3.0) and row["TFLOPs"] == pytest.approx(2.0)
    assert row["tokens_per_s"] == pytest.approx(500.0)
    assert row["value"] == row["GBps"] and row["frac_ceiling"] == pytest.approx(0.5)
    row = {"metric": "TFLOP/s"}
    harness._fill_metrics(row, case, "fwd", 500.0, {"copy_GBps": 6.0, "matmul_TFLOPs": 8.0})
    assert row["value"] == pytest.approx(4.0) and row["frac_ceiling"] == pytest.approx(0.5)


def test_attention_flop_count():
    from bench import bench_attention

    cfg = smoke_config(size="full")
    train = bench_attention.suites(cfg)[0]
    c = next(c for c in train.cases if c.params["S"] == 2048 and c.params["E"] == 64 and not c.params["causal"])
    p = c.params
    assert (p["B"], p["H"]) == (8, 32)  # 16k tokens, H*E = 2048
    fwd = 4 * 8 * 32 * 2048 * 2048 * 64
    assert c.flops == {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}
    causal = next(k for k in train.cases if k.params == dict(p, causal=True))
    assert causal.flops["fwd"] == fwd / 2
    decode = bench_attention.suites(cfg)[1]
    assert {c.params["S"] for c in decode.cases} == {1024 * 2**i for i in range(7)}  # 1k .. 64k
    assert all(c.params["L"] == 1 and not c.params["causal"] for c in decode.cases)


def test_saved_memory_sees_torch_dropout_mask():
    """saved_MB is what shows that a dropout keeps no mask: torch's F.dropout keeps one byte per
    element (a bool mask); a plain add keeps nothing."""
    n = 1 << 16
    x = torch.randn(n, requires_grad=True)
    mb = harness.saved_memory_mb(lambda: torch.nn.functional.dropout(x, 0.5, True), inputs=(x,))
    # CUDA keeps a bool mask (1 byte/element); CPU multiplies by a float mask and keeps that (4)
    assert mb == pytest.approx(n * (1 if x.is_cuda else x.element_size()) / 2**20)
    assert harness.saved_memory_mb(lambda: x * 2.0, inputs=(x,)) == 0.0


def test_unsupported_and_errors_are_recorded_not_raised():
    def refuse(case, cfg):
        raise harness.Unsupported("this case is out of range")

    def crash(case, cfg):
        raise ZeroDivisionError("boom")

    def fine(case, cfg):
        x = torch.ones(4, requires_grad=True)
        return Work(lambda: x * 2, leaves=(x,))

    suite = Suite("demo", "GB/s", [Case("n=4", 4, torch.float32, bytes={m: 32.0 for m in harness.MODES})],
                  [Provider("torch", fine), Provider("refuses", refuse), Provider("crashes", crash)])
    rows = harness.run_suite(suite, smoke_config())
    status = {(r["provider"], r["mode"]): (r["status"], r["reason"]) for r in rows}
    assert status[("torch", "bwd")][0] == "ok"
    assert status[("refuses", "fwd")] == ("skipped", "this case is out of range")
    assert status[("crashes", "fwd+bwd")] == ("error", "ZeroDivisionError: boom")
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(r["speedup"] == pytest.approx(1.0) for r in ok)  # the baseline against itself


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib", reason="plots need the optional matplotlib (bench extra)")
    result = harness.run(["dropout"], smoke_config(), out_dir=str(tmp_path), plots=True)
    pngs = sorted(os.listdir(result["paths"]["plots"]))
    assert pngs == ["dropout-fp32.png"]
    assert os.path.getsize(os.path.join(result["paths"]["plots"], pngs[0])) > 1000
    with open(result["paths"]["md"]) as f:
        assert "dropout-fp32.png" in f.read()


def test_no_matplotlib_means_no_plots_and_a_message(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now raises ImportError
    said = []
    doc = {"ceilings": {}, "suites": [], "rows": [], "environment": {}, "date": ""}
    assert harness.write_plots(doc, str(tmp_path), log=said.append) == []
    assert "matplotlib" in said[0]


def test_cli_help_list_and_smoke(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "--ops" in capsys.readouterr().out
    assert main(["--list", "--ops", "softmax,attention"]) == 0
    out = capsys.readouterr().out
    assert "softmax (GB/s, baseline torch)" in out and "attention_decode (GB/s" in out
    assert main(["--smoke", "--ops", "softmax", "--out-dir", str(tmp_path), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "SMOKE RUN" in out and "not a measurement" in out
    # skipped rows are not printed row by row: one grouped line per (provider, reason)
    assert not [ln for ln in out.splitlines() if " skipped: " in ln]
    assert "Not measured (grouped" in out and "liger" in out
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 2 and files[0].startswith("cpu-") and files[0].endswith(".json")
    with pytest.raises(SystemExit) as e:
        main(["--ops", "convolution"])
    assert e.value.code == 2
    assert "convolution" in capsys.readouterr().err


def test_gpt_bench_runs(cpu_run):
    missing = _models_missing()
    if missing:
        pytest.skip(missing)
    _, doc, _, _ = cpu_run
    for name in ("gpt_train", "gpt_generate"):
        ok = {r["provider"] for r in doc["rows"] if r["op"] == name and r["status"] == "ok"}
        assert {"fasttx", "torch"} <= ok, (name, ok)
    train = next(r for r in doc["rows"] if r["op"] == "gpt_train" and r["provider"] == "fasttx")
    assert train["tokens_per_s"] == pytest.approx(2 * 32 / (train["ms"] * 1e-3))


def test_compile_baseline_path(tmp_path):
    """The torch.compile baselines (off by default on CPU) compile the eager code per shape and
    run; aot_eager keeps this quick while exercising the same wrapper."""
    cfg = smoke_config(compile=True, compile_backend="aot_eager", providers=["torch", "torch.compile"])
    suite = harness.load_suites(["dropout"], cfg)[0]
    suite.cases = suite.cases[:1]
    rows = harness.run_suite(suite, cfg)
    comp = [r for r in rows if r["provider"] == "torch.compile"]
    assert comp and all(r["status"] == "ok" for r in comp), comp


def _triton_suites():
    """(op, suite) of every suite with a fasttx provider and a per-op mode (not a whole "call"
    step), derived from the bench modules: a new bench_<op>.py is covered with nothing added here."""
    out = []
    for op in OPS:
        for s in harness.load_suites([op], smoke_config()):
            if not s.unavailable and any(p.name == "fasttx" for p in s.providers) and "call" not in s.modes:
                out.append(pytest.param(op, s.name, id=s.name))
    return out


def test_ops_are_discovered_from_the_bench_files():
    here = os.path.dirname(os.path.abspath(harness.__file__))
    files = {f[len("bench_"):-3] for f in os.listdir(here) if f.startswith("bench_") and f.endswith(".py")}
    assert set(OPS) == files and OPS[-1] == "gpt"  # ORDER = 90 puts the model last
    assert {"attention", "layer_norm", "softmax"} <= {op for op, _ in (p.values for p in _triton_suites())}


@pytest.mark.parametrize("op,suite_name", _triton_suites())
def test_triton_path_under_interpreter(op, suite_name):
    """The fasttx provider on the Triton path (interpreter on CPU, the compiled kernels on a GPU):
    the bench calls the op with the arguments the custom op accepts, forward and backward (first
    tiny case only), and the call does not fall back to torch's implementation."""
    if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton path on CPU needs TRITON_INTERPRET=1 (set by bench/conftest.py)")
    cfg0 = smoke_config()
    suite0 = next(s for s in harness.load_suites([op], cfg0) if s.name == suite_name)
    # fwd+bwd runs both directions in the fewest interpreted calls; dropout's fwd also shows saved_MB
    modes = ("fwd+bwd",) if "fwd+bwd" in suite0.modes else tuple(suite0.modes)
    if suite_name == "dropout":
        modes = ("fwd", "fwd+bwd")
    cfg = smoke_config(fasttx_backend="triton", providers=["fasttx"], modes=modes,
                       **(dict(device="cuda", dtypes=(torch.bfloat16,)) if CUDA else {}))
    suite = next(s for s in harness.load_suites([op], cfg) if s.name == suite_name)
    suite.cases = suite.cases[:1]
    rows = harness.run_suite(suite, cfg)
    assert rows and all(r["status"] == "ok" for r in rows), [(r["mode"], r["reason"]) for r in rows]
    assert not [r["fallback"] for r in rows if r["fallback"]], "the Triton path fell back to torch"
    if suite_name == "dropout":
        fwd = next(r for r in rows if r["mode"] == "fwd")
        assert fwd["saved_MB"] < 1e-3, "fasttx dropout saved more than its seed for the backward"


@pytest.mark.gpu
def test_gpu_smoke_records_memory(tmp_path):
    """On a GPU: do_bench timing, peak memory, and dropout's saved memory against torch's."""
    cfg = smoke_config(device="cuda", dtypes=(torch.bfloat16,), warmup_ms=2, rep_ms=5)
    rows = harness.run(["dropout", "layer_norm"], cfg, out_dir=str(tmp_path), plots=False)["rows"]
    assert not [r for r in rows if r["status"] == "error"]
    ok = [r for r in rows if r["status"] == "ok" and r["provider"] in ("fasttx", "torch")]
    assert ok and all(r["peak_MB"] is not None for r in ok)
    saved = {r["provider"]: r["saved_MB"] for r in ok if r["op"] == "dropout" and r["mode"] == "fwd"}
    assert saved["fasttx"] < saved["torch"]


def test_where_suites_and_budget_narrow_the_run():
    from bench.__main__ import parse_where

    assert parse_where("S=64,128;causal=true;name=x") == {"S": [64, 128], "causal": [True], "name": ["x"]}
    cfg = smoke_config(suites=["attention"], where={"S": [128], "causal": [False]})
    (suite,) = harness.load_suites(["attention"], cfg)  # attention_decode dropped by name
    assert suite.name == "attention" and suite.cases
    assert all(c.params["S"] == 128 and not c.params["causal"] for c in suite.cases)
    # a deadline already past: every row is recorded as cut, none is run
    rows = harness.run_suite(suite, smoke_config(providers=["fasttx", "sdpa"]), deadline=0.0)
    assert rows and {r["status"] for r in rows} == {"cut"}
    assert all(r["reason"] == "time budget spent" for r in rows)


def test_cpu_timing_uses_the_configured_threads():
    seen = []
    suite = Suite("threads", "GB/s", [Case("n=4", 4, torch.float32, bytes={"fwd": 32.0})],
                  [Provider("torch", lambda c, cfg: Work(lambda: seen.append(torch.get_num_threads())))],
                  modes=("fwd",))
    before = torch.get_num_threads()
    harness.run_suite(suite, smoke_config(threads=1))
    assert seen and set(seen) == {1} and torch.get_num_threads() == before


def test_runs_from_any_directory(tmp_path):
    """`python <repo>/bench` works outside the repository and writes into the current directory."""
    import subprocess
    import sys

    bench_dir = os.path.dirname(os.path.abspath(harness.__file__))
    r = subprocess.run([sys.executable, bench_dir, "--list", "--ops", "dropout"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "dropout (GB/s, baseline torch)" in r.stdout
    from bench.__main__ import DEFAULT_OUT, parser

    assert not os.path.isabs(DEFAULT_OUT) and parser().parse_args([]).out_dir == DEFAULT_OUT


def test_a_fasttx_fallback_is_flagged_on_every_row(monkeypatch):
    """A fasttx call that ran torch's implementation is marked, on every row, not only the first."""
    from fasttx._backend import warn_fallback

    def build(case, cfg):
        x = torch.ones(4, requires_grad=True)

        def fn():
            warn_fallback("demo_op", "this case is outside the kernel")
            return x * 2

        return Work(fn, leaves=(x,))

    suite = Suite("demo", "GB/s", [Case(f"n={n}", n, torch.float32, bytes={m: 32.0 for m in harness.MODES})
                                   for n in (4, 8)],
                  [Provider("fasttx", build, kind="fasttx"), Provider("torch", build)])
    rows = harness.run_suite(suite, smoke_config())
    fasttx_rows = [r for r in rows if r["provider"] == "fasttx"]
    assert len(fasttx_rows) == 6 and all("outside the kernel" in (r["fallback"] or "") for r in fasttx_rows)
    assert not [r for r in rows if r["provider"] == "torch" and r["fallback"]]


def test_attention_dq_ablations_build_and_match_fasttx():
    """The CUDA-only dQ ablations (fasttx-dq-atomic / -kernel) run here on their builders directly:
    same output and gradients as the fasttx provider on a tiny case."""
    from bench import bench_attention

    cfg = smoke_config()
    suite = next(s for s in bench_attention.suites(cfg) if s.name == "attention")
    case = min(suite.cases, key=lambda c: c.x)
    providers = {p.name: p for p in suite.providers}
    results = {}
    for name in ("fasttx", "fasttx-dq-atomic", "fasttx-dq-kernel"):
        torch.manual_seed(0)
        work = providers[name].build(case, cfg)
        out = work.fn()
        out.backward(torch.ones_like(out))
        results[name] = [out.detach()] + [t.grad for t in work.leaves]
    for name in ("fasttx-dq-atomic", "fasttx-dq-kernel"):
        for a, b in zip(results["fasttx"], results[name]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
