"""Backend choice, in exactly one place.

"auto"   -> the Triton kernels for CUDA tensors, torch's own ops otherwise (the default).
"triton" -> always the Triton kernels; on CPU tensors this needs TRITON_INTERPRET=1 set before
            triton is imported (the Triton interpreter, 100-1000x slower than torch's ops: for
            testing the kernels, not for speed), otherwise a clear RuntimeError.
"torch"  -> always torch's own ops (e.g. to compare, or to run a model exactly as torch.nn would).
"reference" is accepted as a deprecated alias of "torch" (its old name).

Set it with `fasttx.use_backend(name)` (also a context manager that restores the previous choice)
or the environment variable FASTTX_BACKEND.

Every fasttx.functional op asks `use_triton(*tensors)` whether this call takes the Triton path; an
op whose kernel cannot serve a particular call (a dtype, a size past a kernel limit, a feature)
runs torch's op instead and says so once through `warn_fallback`.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import warnings

import torch

BACKENDS = ("auto", "triton", "torch")
_ALIASES = {"reference": "torch"}


def _check(name) -> str:
    if isinstance(name, str) and name in _ALIASES:
        warnings.warn(
            f"fasttx backend {name!r} is deprecated: it is now called {_ALIASES[name]!r}",
            DeprecationWarning,
            stacklevel=3,
        )
        name = _ALIASES[name]
    if name not in BACKENDS:
        raise ValueError(f"fasttx backend must be one of {BACKENDS}, got {name!r}")
    return name


_backend: str = _check(os.environ.get("FASTTX_BACKEND", "auto").strip().lower() or "auto")


def get_backend() -> str:
    """The backend in force: "auto", "triton" or "torch"."""
    return _backend


class use_backend:
    """Select the backend. Takes effect at once; as a context manager it restores the previous
    choice on exit:

        fasttx.use_backend("torch")              # from now on
        with fasttx.use_backend("triton"): ...   # only inside the block
    """

    def __init__(self, name: str):
        global _backend
        self.name = _check(name)
        self._previous = _backend
        _backend = self.name

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _backend
        _backend = self._previous
        return False

    def __repr__(self):
        return f"use_backend({self.name!r})"


# Looked up once: triton is not installed on macOS or Windows. A constant (not a cached function)
# so that torch.compile traces the dispatch without guarding on a cache wrapper.
_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """True when triton can be imported."""
    return _TRITON_AVAILABLE


def interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_warned_slow = False
_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def _user_stacklevel() -> int:
    """warnings.warn's stacklevel (counted from the caller of this function's caller) of the first
    frame outside fasttx: a warning points at the user's line whatever fasttx frames (the public
    entry, route(), a contract) lie between."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level


def _check_cpu_triton(tensors) -> None:
    """The forced Triton path on CPU tensors: only through the interpreter, and only if the
    kernels were decorated under it (triton reads TRITON_INTERPRET when `@triton.jit` runs, i.e.
    when fasttx.kernels is first imported; setting it later leaves GPU-only kernels behind)."""
    global _warned_slow
    if not interpreting():
        devices = sorted({str(t.device) for t in tensors if isinstance(t, torch.Tensor)})
        raise RuntimeError(
            f"fasttx backend 'triton' needs CUDA tensors, got tensors on {devices}; to run the "
            "kernels on CPU set TRITON_INTERPRET=1 before triton is imported, or use "
            "fasttx.use_backend('auto') to run torch's ops on CPU"
        )
    kernels = sys.modules.get("fasttx.kernels._common")
    if kernels is not None and not kernels.INTERPRETING:
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after fasttx's kernels had been imported, so they were "
            "built for a GPU and cannot run on these CPU tensors; set TRITON_INTERPRET=1 in the "
            "environment before the first import of triton or fasttx.kernels (at the top of the "
            "script, or in conftest.py)"
        )
    if not _warned_slow:
        _warned_slow = True
        warnings.warn(
            "fasttx backend 'triton' on CPU tensors runs the kernels through the Triton "
            "interpreter, 100-1000x slower than torch's ops: use it to test the kernels, and "
            "backend 'auto' or 'torch' for speed on CPU",
            stacklevel=_user_stacklevel(),
        )


def use_triton(*tensors) -> bool:
    """Whether an op on these tensors runs the Triton kernels (True) or torch's ops (False).
    `None` entries are ignored; any other non-tensor sends the call to torch's op, which raises
    torch's own TypeError for it."""
    name = _backend
    if name == "torch":
        return False
    on_cuda = True
    for t in tensors:
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            return False
        on_cuda = on_cuda and t.is_cuda
    if name == "auto":
        return on_cuda and _TRITON_AVAILABLE
    if not _TRITON_AVAILABLE:
        raise RuntimeError(
            "fasttx backend 'triton' was requested but triton is not installed "
            "(it is available on Linux only); use fasttx.use_backend('auto') or 'torch'"
        )
    if not on_cuda:
        _check_cpu_triton(tensors)
    return True


def backend_for(*tensors) -> str:
    """Name of the path `use_triton` picks for these tensors: "triton" or "torch"."""
    return "triton" if use_triton(*tensors) else "torch"


_warned: set = set()


def warn_fallback(op: str, reason: str) -> None:
    """Say once per (op, reason) that a call the Triton path cannot serve runs torch's op (the
    warning points at the user's line)."""
    if (op, reason) not in _warned:
        _warned.add((op, reason))
        warnings.warn(f"fasttx {op}: {reason}; running torch's implementation instead",
                      stacklevel=_user_stacklevel())
