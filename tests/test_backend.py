import os
import subprocess
import sys

import pytest
import torch

import fasttx
import fasttx.functional as FF
from fasttx import _backend


def test_use_backend_sets_and_restores():
    assert fasttx.get_backend() == "auto"
    with fasttx.use_backend("torch"):
        assert fasttx.get_backend() == "torch"
        with fasttx.use_backend("triton"):
            assert fasttx.get_backend() == "triton"
        assert fasttx.get_backend() == "torch"
    assert fasttx.get_backend() == "auto"
    fasttx.use_backend("torch")
    assert fasttx.get_backend() == "torch"


def test_reference_is_a_deprecated_alias_of_torch():
    with pytest.warns(DeprecationWarning, match="now called 'torch'"):
        with fasttx.use_backend("reference"):
            assert fasttx.get_backend() == "torch"
    r = _run("import warnings; warnings.simplefilter('default')\nimport fasttx; print(fasttx.get_backend())",
             FASTTX_BACKEND="reference")
    assert r.returncode == 0 and r.stdout.strip() == "torch", r.stderr


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="backend must be one of"):
        fasttx.use_backend("cuda")


def test_auto_picks_torch_on_cpu():
    x = torch.randn(3, device="cpu")
    with fasttx.use_backend("auto"):
        assert _backend.backend_for(x) == "torch"
    with fasttx.use_backend("torch"):
        assert _backend.backend_for(x) == "torch"


def test_forced_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(3)
    with fasttx.use_backend("triton"):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            FF.gelu(x)


def test_forced_triton_on_cpu_under_interpreter_runs_kernels(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(3)
    with fasttx.use_backend("triton"):
        assert _backend.backend_for(x) == "triton"


def _run(code, **env):
    full = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full)


def test_env_variable_selects_backend():
    r = _run("import fasttx; print(fasttx.get_backend())", FASTTX_BACKEND="torch")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "torch"
    r = _run("import fasttx", FASTTX_BACKEND="bogus")
    assert r.returncode != 0 and "backend must be one of" in r.stderr


def test_missing_triton_leaves_torch_path_working():
    # Simulate macOS/Windows: make `import triton` fail, then use every op on torch's path.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import importlib.util as u; orig = u.find_spec\n"
        "u.find_spec = lambda n, *a, **k: None if n == 'triton' else orig(n, *a, **k)\n"
        "import torch, fasttx, fasttx.functional as F, fasttx.nn as nn\n"
        "x = torch.randn(2, 4, 8, requires_grad=True)\n"
        "y = F.layer_norm(x, (8,)) + F.gelu(x) + F.softmax(x, -1) + F.dropout(x, 0.1)\n"
        "y = y + F.scaled_dot_product_attention(x, x, x)\n"
        "y.sum().backward(); print('ok', fasttx.get_backend())\n"
    )
    r = _run(code, TRITON_INTERPRET="0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok auto"
    r = _run(code.replace("print('ok'", "fasttx.use_backend('triton'); F.gelu(x); print('bad'"),
             TRITON_INTERPRET="0")
    assert r.returncode != 0 and "triton is not installed" in r.stderr


def test_kernels_importable_as_subpackage_only(tmp_path):
    """Installed, fasttx's kernels exist only as fasttx.kernels: importing every part of fasttx
    (outside the source tree, where the repository root is not on sys.path) never binds a
    top-level `kernels`, a name another PyPI package owns, and none is importable."""
    import fasttx.kernels

    assert os.path.basename(os.path.dirname(fasttx.kernels.__file__)) == "kernels"
    code = (
        "import sys, importlib, pkgutil\n"
        "import fasttx, fasttx.functional, fasttx.nn, fasttx.models, fasttx.kernels\n"
        "for m in pkgutil.iter_modules(fasttx.kernels.__path__):\n"
        "    importlib.import_module('fasttx.kernels.' + m.name)\n"
        "for name in ('layer_norm', 'activation', 'dropout', 'softmax', 'attention'):\n"
        "    importlib.import_module('fasttx.ops.' + name)\n"
        "assert 'kernels' not in sys.modules, sys.modules['kernels']\n"
        "try:\n"
        "    import kernels\n"
        "except ImportError:\n"
        "    print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env=dict(os.environ, PYTHONPATH=""))
    if "No module named 'fasttx'" in r.stderr:
        pytest.skip("fasttx is not installed (pytest run from a bare checkout)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"
