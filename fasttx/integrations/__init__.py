"""Integrations of fasttx with other libraries. Each one is imported on first use, so that
`import fasttx.integrations` never pulls in an optional dependency:

    from fasttx.integrations.huggingface import apply_fasttx   # needs the `hf` extra (transformers)
    model = apply_fasttx(model)
"""
from __future__ import annotations

__all__ = ["apply_fasttx"]


def __getattr__(name):
    if name == "apply_fasttx":
        from .huggingface import apply_fasttx

        return apply_fasttx
    if name == "huggingface":
        import importlib

        return importlib.import_module(f"{__name__}.huggingface")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
