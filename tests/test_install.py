"""`make install` is reproducible: every pip install it runs is constrained by the committed lock
(tools/constraints.txt), which pins exact versions of what the suite needs; `make test-latest` and
`make lock` run without it."""
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCK = os.path.join(ROOT, "tools", "constraints.txt")


def _pins():
    pins = {}
    for line in open(LOCK, encoding="utf-8"):
        line = line.strip()
        if line and not line.startswith("#"):
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([0-9][^\s+;]*)", line)
            assert m, f"not an exact, portable pin (name==version, no local label): {line!r}"
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def test_lock_pins_exact_versions_of_what_the_suite_needs():
    pins = _pins()
    for name in ("torch", "triton", "transformers", "kernels", "numpy", "pytest", "pytest-xdist", "ruff",
                 "einops", "safetensors"):
        assert name in pins, f"{name} is not pinned in tools/constraints.txt"


def _dry_run(target, tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    r = subprocess.run(["make", "-n", target, f"VENV={tmp_path / 'venv'}", f"LATEST_VENV={tmp_path / 'latest'}"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return [line for line in r.stdout.splitlines() if "pip install" in line]


def test_make_install_is_constrained_by_the_lock(tmp_path):
    lines = _dry_run("install", tmp_path)
    assert len(lines) == 3, lines  # torch, fasttx with its extras, the examples' model
    assert all("-c tools/constraints.txt" in line for line in lines), lines


def test_make_test_latest_runs_without_the_lock(tmp_path):
    lines = _dry_run("test-latest", tmp_path)
    assert lines and not any("constraints" in line for line in lines), lines
    eager = [line for line in lines if "--upgrade-strategy eager" in line]
    # torch is named in the eager upgrade itself, so it stays at its spec (PyPI's newest torch is the
    # CUDA build, several GB): every other dependency moves to its newest release.
    assert eager and all("torch==" in line for line in eager), lines
