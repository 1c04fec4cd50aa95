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
    # Installed, `fasttx.kernels` comes from setuptools' package-dir mapping. From a source
    # checkout that is not installed (pytest from the repository root), bind ../kernels under
    # that name: there is never a top-level `kernels` module.
    if "fasttx.kernels" in _sys.modules or _ilu.find_spec("fasttx.kernels") is not None:
        return
    src = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels")
    init = _os.path.join(src, "__init__.py")
    if not _os.path.isfile(init):
        return
    spec = _ilu.spec_from_file_location("fasttx.kernels", init, submodule_search_locations=[src])
    module = _ilu.module_from_spec(spec)
    _sys.modules["fasttx.kernels"] = module
    spec.loader.exec_module(module)


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
