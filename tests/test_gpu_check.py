"""`make gpu-check` (tools/gpu_check.py) rehearsed on CPU, so that the one command a GPU window
runs cannot rot: without CUDA it runs every stage on the Triton interpreter at tiny sizes and
writes the same files. Its budget and junit logic are checked directly, cheaply."""
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.py"
ALLOWED = {"results.json", "results.md", "junit.xml", "summary.txt", "log.txt"}


def _tool():
    spec = importlib.util.spec_from_file_location("gpu_check", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, str(TOOL), "--out", str(out), "--budget-s", "400", "--rehearsal"],
                       capture_output=True, text=True, env=env, timeout=900)
    return r, out


def test_rehearsal_passes_and_writes_the_files(rehearsal):
    r, out = rehearsal
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    files = sorted(os.listdir(out))
    assert ALLOWED <= set(files) and len(files) <= 8, files
    plots = [f for f in files if f not in ALLOWED]
    assert 1 <= len(plots) <= 3 and all(f.startswith("plot-") and f.endswith(".png") for f in plots)
    assert not [f for f in files if (out / f).is_dir()]


def test_summary_says_what_passed_first(rehearsal):
    _, out = rehearsal
    lines = (out / "summary.txt").read_text().splitlines()
    assert lines[0].startswith("fasttx gpu-check: PASS - REHEARSAL on CPU")
    head = "\n".join(lines[:7])
    assert "Tests: " in head and " passed, 0 failed" in head and "Determinism: ok" in head
    assert "Sanitizer: skipped" in head and "Headline" in head and "not a measurement" in head
    assert "attention " in head and "vs sdpa" in head and "Cut by the time budget: no stage" in head


def test_results_hold_every_stage_and_the_bench_schema(rehearsal):
    _, out = rehearsal
    doc = json.loads((out / "results.json").read_text())
    stages = [s["name"] for s in doc["gpu_check"]["stages"]]
    assert stages[:4] == ["environment", "tests", "determinism", "sanitizer"]
    assert "bench:attention" in stages and "bench:gpt_train" in stages
    assert all(s["status"] in ("ok", "skipped") for s in doc["gpu_check"]["stages"]), doc["gpu_check"]["stages"]
    det = doc["gpu_check"]["determinism"]
    assert {"attention", "layer_norm", "softmax", "dropout"} <= {d["suite"] for d in det}
    assert all(d["status"] == "identical" for d in det)
    ops = {r["op"] for r in doc["rows"] if r["status"] == "ok"}
    assert {"attention", "attention_decode", "layer_norm", "softmax", "gpt_train"} <= ops
    assert doc["ceilings"]["copy_GBps"] > 0 and doc["measurement"] is False
    root = ET.parse(out / "junit.xml").getroot()
    assert sum(1 for _ in root.iter("testcase")) >= 3
    md = (out / "results.md").read_text()
    assert md.startswith("# fasttx gpu-check") and "%)" in md  # ratios and % of ceiling


def test_budget_cuts_later_stages_cleanly(tmp_path):
    gc = _tool()
    check = gc.Check(str(tmp_path), budget_s=20.0, rehearsal=True)
    ran = []
    check.stage("first", 0.5, lambda cap: (ran.append(cap), ("ok", "done"))[1])
    check.t0 -= 18.0  # as if the first stage had used 18 of the 20 s
    check.stage("second", 0.5, lambda cap: (ran.append(cap), ("ok", "done"))[1])
    check.stage("third", 0.5, lambda cap: 1 / 0)
    assert len(ran) == 1 and ran[0] == pytest.approx(10.0, abs=0.5)
    assert [s["status"] for s in check.stages] == ["ok", "cut", "cut"]
    assert "time budget spent" in check.stages[1]["note"]
    check = gc.Check(str(tmp_path), budget_s=100.0, rehearsal=True)
    rec = check.stage("broken", 0.5, lambda cap: 1 / 0)
    assert rec["status"] == "error" and "ZeroDivisionError" in rec["note"]


def test_unused_time_passes_on_to_the_next_stage(tmp_path):
    gc = _tool()
    check = gc.Check(str(tmp_path), budget_s=100.0, rehearsal=True)
    caps = []
    check.stage("quick", 0.4, lambda cap: (caps.append(cap), ("ok", "done"))[1])  # uses ~0 of its 40 s
    check.stage("next", 0.1, lambda cap: (caps.append(cap), ("ok", "done"))[1])
    check.t0 -= 45.0  # as if "next" had run 45 s, past its own 10 s share
    check.stage("last", 0.2, lambda cap: (caps.append(cap), ("ok", "done"))[1])
    assert caps[0] == pytest.approx(40.0, abs=0.5) and caps[1] == pytest.approx(50.0, abs=0.5)
    assert caps[2] == pytest.approx(25.0, abs=0.5)  # 70 s allotted so far, 45 s used


def test_subprocess_is_stopped_at_its_cap(tmp_path):
    gc = _tool()
    check = gc.Check(str(tmp_path), budget_s=100.0, rehearsal=True)
    rc, out, timed_out = check.run([sys.executable, "-c", "import time; print('hi', flush=True); time.sleep(60)"], 2.0)
    assert timed_out and rc != 0 and "hi" in out


def test_junit_parsing(tmp_path):
    gc = _tool()
    (tmp_path / "j.xml").write_text(
        '<testsuites><testsuite><testcase classname="t.a" name="ok" time="0.5"/>'
        '<testcase classname="t.a" name="bad" time="2.0">'
        '<failure message="assert 1 == 2&#10;more">tb</failure></testcase>'
        '<testcase classname="t.b" name="sk" time="0.0"><skipped message="needs a GPU"/></testcase>'
        '<testcase classname="t.b" name="err" time="0.1"><error message="fixture broke"/></testcase>'
        '</testsuite></testsuites>')
    res = gc.parse_junit(str(tmp_path / "j.xml"))
    assert (res["tests"], res["passed"], res["failed"], res["skipped"], res["errors"]) == (4, 1, 1, 1, 1)
    assert res["failures"][0] == {"test": "t.a::bad", "kind": "failure", "first_lines": ["assert 1 == 2", "more"]}
    assert res["slowest"][0]["test"] == "t.a::bad"
    assert gc.parse_junit(str(tmp_path / "missing.xml"))["missing"]


def test_gpu_plan_covers_the_headline_rows():
    gc = _tool()
    plan = {p["name"]: p["args"] for p in gc.bench_plan(False, ["attention", "layer_norm", "rms_norm", "gpt"])}
    att = " ".join(plan["bench:attention"])
    assert "--size full" in att and "S=1024,4096,16384" in att and "sdpa-cudnn" in att and "fwd,fwd+bwd" in att
    assert "layer_norm,rms_norm" in " ".join(plan["bench:ops"])  # a new bench_<op>.py joins by itself
    names = list(plan)
    assert names.index("bench:gpt_train") < names.index("bench:flex") < names.index("bench:gpt_train-compiled")
    cmd = gc.pytest_command("j.xml", False, 16, True, True)
    assert "-n" in cmd and "16" in cmd and "--timeout" in cmd and "tests" in cmd
    assert "--timeout" not in gc.pytest_command("j.xml", False, 16, True, False)


def test_first_line_names_the_python(rehearsal):
    r, out = rehearsal
    assert r.stdout.splitlines()[0] == f"fasttx gpu-check: python {sys.executable} ({platform.python_version()})"
    assert f"python {sys.executable}" in (out / "summary.txt").read_text().splitlines()[0]


@pytest.mark.parametrize("venv", ["present", "absent"])
def test_make_gpu_check_runs_the_venv_python_when_there_is_one(tmp_path, venv):
    """`make gpu-check` runs the project's .venv python if it exists, else the machine's python3."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    root = TOOL.parents[1]
    py = tmp_path / "bin" / "python"
    if venv == "present":
        py.parent.mkdir()
        py.write_text("")
    r = subprocess.run(["make", "-n", "gpu-check", f"VENV={tmp_path}"], capture_output=True, text=True,
                       cwd=root)
    assert r.returncode == 0, r.stderr
    cmd = [line for line in r.stdout.splitlines() if "tools/gpu_check.py" in line]
    assert cmd and cmd[0].split()[0] == (str(py) if venv == "present" else "python3"), r.stdout
