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


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OURS = os.path.join(_ROOT, "kernels")


def _run_at(cwd, code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd,
                          env=dict(os.environ, PYTHONPATH=""))


_IMPORT_ALL_OF_FASTTX = (
    "import sys, importlib, pkgutil, os\n"
    "import fasttx, fasttx.functional, fasttx.nn, fasttx.models, fasttx.flash, fasttx.kernels\n"
    "for pkg in ('fasttx.kernels', 'fasttx.ops', 'fasttx.nn', 'fasttx.models'):\n"
    "    for m in pkgutil.iter_modules(importlib.import_module(pkg).__path__):\n"
    "        importlib.import_module(pkg + '.' + m.name)\n"
    "k = sys.modules.get('kernels')\n"
    "paths = [os.path.realpath(p) for p in getattr(k, '__path__', [])] if k is not None else []\n"
    "print('kernels', 'absent' if k is None else paths)\n"
)


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_importing_fasttx_binds_no_top_level_kernels_of_ours(tmp_path, where):
    """fasttx's kernels exist only as fasttx.kernels: importing every part of fasttx, from the
    repository root (on sys.path) or from anywhere else, binds no top-level `kernels` (a name
    Hugging Face's package owns), and fasttx.kernels is our folder."""
    import fasttx.kernels
    import fasttx.kernels._common

    assert os.path.realpath(os.path.dirname(fasttx.kernels._common.__file__)) == os.path.realpath(_OURS)
    r = _run_at(_ROOT if where == "root" else tmp_path, _IMPORT_ALL_OF_FASTTX)
    if "No module named 'fasttx'" in r.stderr:
        pytest.skip("fasttx is not installed (pytest run from a bare checkout)")
    assert r.returncode == 0, r.stderr
    assert os.path.realpath(_OURS) not in r.stdout, r.stdout
    assert r.stdout.startswith("kernels absent"), r.stdout


def test_import_kernels_from_the_root_is_never_ours():
    """With the repository root on sys.path, `import kernels` finds Hugging Face's package when it
    is installed; ours (a folder without __init__.py) never wins over it, and is never a regular
    package of that name."""
    code = (
        "import os, importlib.util\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print('none' if spec is None else (spec.origin, [os.path.realpath(p) for p in "
        "spec.submodule_search_locations or []]))\n"
    )
    r = _run_at(_ROOT, code)
    assert r.returncode == 0, r.stderr
    assert not os.path.isfile(os.path.join(_OURS, "__init__.py"))
    hf = _run_at(os.path.dirname(_ROOT), "import importlib.util as u, sys; sys.path = [p for p in sys.path if p]\n"
                 "print(u.find_spec('kernels') is not None)")
    if hf.stdout.strip() == "True":  # Hugging Face's kernels is installed: it is what the root finds
        assert "site-packages" in r.stdout and os.path.realpath(_OURS) not in r.stdout, r.stdout


def test_transformers_hub_kernels_imports_from_the_root():
    """transformers imports Hugging Face's `kernels` (transformers.integrations.hub_kernels); from
    the repository root that import must find theirs, not our kernels/ folder."""
    pytest.importorskip("transformers")
    r = _run_at(_ROOT, "import transformers.integrations.hub_kernels\n"
                "import fasttx.integrations.huggingface\nprint('ok')")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("ok")


@pytest.mark.parametrize("case", ["missing", "broken"])
def test_hf_integration_reports_import_errors_as_they_are(tmp_path, case):
    """Only a missing transformers is told to install the extra; any other import error of
    transformers is named, with the real exception chained."""
    if case == "missing":
        (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['transformers'] = None\n")
    else:
        (tmp_path / "transformers").mkdir()
        (tmp_path / "transformers" / "__init__.py").write_text(
            "from kernels import CUDAProperties  # what a shadowed dependency looks like\n")
        (tmp_path / "kernels").mkdir()
        (tmp_path / "kernels" / "__init__.py").write_text("")
    code = ("try:\n    import fasttx.integrations.huggingface\n"
            "except ImportError as e:\n    print(repr(e)); print(repr(e.__cause__))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert r.returncode == 0, r.stderr
    if case == "missing":
        assert "pip install 'fasttx[hf]'" in r.stdout, r.stdout
    else:
        assert "fasttx[hf]" not in r.stdout, r.stdout
        assert "importing transformers failed" in r.stdout and "CUDAProperties" in r.stdout, r.stdout
