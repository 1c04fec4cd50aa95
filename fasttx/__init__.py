"""fasttx: transformer building blocks whose hot paths are Triton kernels.

    import fasttx.nn as nn          # drop-in for the transformer parts of torch.nn
    import fasttx.functional as FF  # drop-in for torch.nn.functional (ours where we have an op)
    fasttx.convert(model)           # swap torch.nn modules of an existing model for ours
    fasttx.use_backend("torch")     # "auto" (default) | "triton" | "torch"
"""
from __future__ import annotations

import importlib.util as _ilu
import os as _os
import sys as _sys


def _bind_kernels_from_source_tree() -> None:
    # The repository's top-level kernels/ is installed only as `fasttx.kernels`. It has no
    # __init__.py on purpose: with the repository root on sys.path (pytest, `python -c`, a notebook
    # or a README snippet run from the root), a folder without __init__.py is only a namespace
    # candidate, and Python prefers any regular `kernels` package further down sys.path, so
    # `import kernels` gives Hugging Face's package (transformers imports it), never ours.
    # Wheel installs: setuptools copies the folder to fasttx/kernels/, found as a namespace
    # subpackage. Editable installs and a bare checkout: setuptools' editable finder skips a
    # mapped folder without __init__.py, so fasttx.kernels is bound here to ../kernels.
    if "fasttx.kernels" in _sys.modules or _ilu.find_spec("fasttx.kernels") is not None:
        return
    src = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels")
    if not _os.path.isfile(_os.path.join(src, "_common.py")):
        return
    spec = _ilu.spec_from_loader("fasttx.kernels", None, is_package=True)
    spec.submodule_search_locations = [src]
    _sys.modules["fasttx.kernels"] = _ilu.module_from_spec(spec)


_bind_kernels_from_source_tree()

from ._backend import BACKENDS, get_backend, use_backend  # noqa: E402

__version__ = "0.1.0"


def __getattr__(name):
    # Heavier pieces load on first use, so `import fasttx` stays light.
    if name == "convert":
        from ._convert import convert

        globals()["convert"] = convert
        return convert
    if name in ("functional", "nn", "reference", "models", "kernels", "integrations"):
        import importlib

        return importlib.import_module(f"fasttx.{name}")
    raise AttributeError(f"module 'fasttx' has no attribute {name!r}")


__all__ = ["BACKENDS", "get_backend", "use_backend", "convert", "__version__"]
