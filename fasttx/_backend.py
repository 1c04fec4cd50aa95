"""Backend choice, in exactly one place.

"auto"      -> the Triton kernels for CUDA tensors, the reference (PyTorch) path otherwise.
"triton"    -> always the Triton kernels; on CPU tensors this needs TRITON_INTERPRET=1 set before
               triton is imported (the Triton interpreter), otherwise a clear RuntimeError.
"reference" -> always the PyTorch path.

Set it with `fasttx.use_backend(name)` (also a context manager that restores the previous choice)
or the environment variable FASTTX_BACKEND.
"""
from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "reference")


def _check(name) -> str:
    if name not in BACKENDS:
        raise ValueError(f"fasttx backend must be one of {BACKENDS}, got {name!r}")
    return name


_backend: str = _check(os.environ.get("FASTTX_BACKEND", "auto").strip().lower() or "auto")


def get_backend() -> str:
    """The backend in force: "auto", "triton" or "reference"."""
    return _backend


class use_backend:
    """Select the backend. Takes effect at once; as a context manager it restores the previous
    choice on exit:

        fasttx.use_backend("reference")          # from now on
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


def use_triton(*tensors) -> bool:
    """Whether an op on these tensors runs the Triton kernels (True) or the reference path (False).
    `None` entries are ignored."""
    name = _backend
    if name == "reference":
        return False
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if name == "auto":
        return on_cuda and triton_available()
    if not triton_available():
        raise RuntimeError(
            "fasttx backend 'triton' was requested but triton is not installed "
            "(it is available on Linux only); use fasttx.use_backend('auto') or 'reference'"
        )
    if not on_cuda and not interpreting():
        devices = sorted({str(t.device) for t in tensors if isinstance(t, torch.Tensor)})
        raise RuntimeError(
            f"fasttx backend 'triton' needs CUDA tensors, got tensors on {devices}; to run the "
            "kernels on CPU set TRITON_INTERPRET=1 before triton is imported, or use "
            "fasttx.use_backend('auto') to fall back to the reference path"
        )
    return True


def backend_for(*tensors) -> str:
    """Name of the path `use_triton` picks for these tensors: "triton" or "reference"."""
    return "triton" if use_triton(*tensors) else "reference"


# Stand-in until the lead's fasttx/_backend.py lands (same contract; take main's on merge).
_warned_fallbacks: set = set()


def warn_fallback(op: str, reason: str) -> None:
    """One warning per (op, reason): the Triton path does not cover a call and torch's op runs."""
    import warnings

    if (op, reason) not in _warned_fallbacks:
        _warned_fallbacks.add((op, reason))
        warnings.warn(f"fasttx {op}: {reason}; running torch's implementation instead", stacklevel=3)
