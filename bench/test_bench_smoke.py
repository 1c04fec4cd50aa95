"""The benchmark suite as a CPU smoke (tiny sizes, one round), run by `make test` so that it cannot
rot: every bench module's setups go through the harness, and the JSON and markdown it writes must
hold the expected rows and fields. Speed itself is never asserted here (TESTING.md)."""
from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest
import torch

from bench import harness
from bench.__main__ import main
from bench.harness import OPS, Case, Config, Provider, Suite, Work

OP_SUITES = {  # bench module -> the suites it defines
    "layer_norm": ("layer_norm", "dropout_add_layer_norm"),
    "gelu": ("gelu", "bias_gelu"),
    "dropout": ("dropout",),
    "softmax": ("softmax",),
    "attention": ("attention", "attention_decode"),
    "gpt": ("gpt_train", "gpt_generate"),
}
# The fasttx.ops module behind each suite's Triton path.
OPS_MODULE = {
    "layer_norm": "layer_norm", "dropout_add_layer_norm": "layer_norm", "gelu": "activation",
    "bias_gelu": "activation", "dropout": "dropout", "softmax": "softmax", "attention": "attention",
    "attention_decode": "attention",
}
ENV_FIELDS = ("device", "device_name", "torch", "triton", "cuda", "python", "fasttx", "fasttx_path")
ROW_FIELDS = ("op", "series", "case", "x", "dtype", "mode", "provider", "metric", "status", "reason",
              "ms", "ms_q20", "ms_q80", "ms_min", "GBps", "TFLOPs", "tokens_per_s", "value",
              "frac_ceiling", "speedup", "baseline", "peak_MB", "peak_total_MB", "saved_MB", "params")


def smoke_config(**kw) -> Config:
    base = dict(device="cpu", dtypes=(torch.float32,), size="tiny", rounds=1,
                max_seconds_per_row=0.0, compile=False, verbose=False)
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
    assert doc["ceilings"]["copy_GBps"] > 0 and doc["ceilings"]["matmul_TFLOPs"] > 0
    assert doc["config"]["size"] == "tiny" and doc["config"]["dtypes"] == ["fp32"]


def test_every_setup_ran_for_fasttx_and_baseline(cpu_run):
    _, doc, _, ops = cpu_run
    rows = doc["rows"]
    assert all(set(ROW_FIELDS) <= set(r) for r in rows)
    errors = [(r["op"], r["provider"], r["mode"], r["reason"]) for r in rows if r["status"] == "error"]
    assert not errors, errors
    suites = {s["name"]: s for s in doc["suites"]}
    for op in ops:
        for name in OP_SUITES[op]:
            assert name in suites, name
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
    assert main(["--smoke", "--ops", "softmax", "--out-dir", str(tmp_path), "--no-plots", "-q"]) == 0
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


@pytest.mark.parametrize("suite_name", list(OPS_MODULE))
def test_triton_path_under_interpreter(suite_name):
    """The fasttx provider on the Triton path (interpreter on CPU): the bench calls the op with
    the arguments the custom op accepts, forward and backward (first tiny case only)."""
    mod = f"fasttx.ops.{OPS_MODULE[suite_name]}"
    if importlib.util.find_spec(mod) is None:
        pytest.skip(f"{mod} does not exist yet: no Triton path to benchmark")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton path on CPU needs TRITON_INTERPRET=1 (set by bench/conftest.py)")
    # fwd+bwd runs both directions in the fewest interpreted calls; dropout's fwd also shows saved_MB
    modes = {"dropout": ("fwd", "fwd+bwd"), "attention_decode": ("fwd",)}.get(suite_name, ("fwd+bwd",))
    cfg = smoke_config(fasttx_backend="triton", providers=["fasttx"], modes=modes)
    op = next(op for op, names in OP_SUITES.items() if suite_name in names)
    suite = next(s for s in harness.load_suites([op], cfg) if s.name == suite_name)
    suite.cases = suite.cases[:1]
    rows = harness.run_suite(suite, cfg)
    assert rows and all(r["status"] == "ok" for r in rows), [(r["mode"], r["reason"]) for r in rows]
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
