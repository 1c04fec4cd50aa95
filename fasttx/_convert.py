"""fasttx.convert (the function; this module is private so that no submodule shadows it): swap
the torch.nn modules of an existing model that fasttx.nn overrides for fasttx.nn's."""
from __future__ import annotations

import copy

import torch

from .nn.transformer import _adopt, _mark_converted

__all__ = ["convert"]


def convert(module: torch.nn.Module, inplace: bool = True) -> torch.nn.Module:
    """Swap every torch.nn LayerNorm, GELU, Dropout, MultiheadAttention, TransformerEncoderLayer,
    TransformerDecoderLayer, TransformerEncoder, TransformerDecoder and Transformer inside
    `module` (itself included, at any depth) for its fasttx.nn counterpart; returns the model.

    Each fasttx.nn class subclasses its torch.nn one and adds no state, so the swap re-classes the
    existing instance: parameters, buffers, hooks, device, dtype, training mode, object identity
    and sharing between parents are all kept, and the outputs are unchanged (up to rounding).
    Only exact torch.nn types are swapped; user subclasses of them keep their own forward.
    The swapped modules print as `fasttx.<Name>(...)`, so `print(model)` shows what runs on
    fasttx (modules built from fasttx.nn directly keep torch's repr). A TorchScript (scripted or
    traced) module anywhere inside raises TypeError.
    With inplace=False the model is deep-copied first and the copy is converted.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"convert() expects a torch.nn.Module, got {type(module).__name__}")
    scripted = [name or "the model" for name, m in module.named_modules()
                if isinstance(m, torch.jit.ScriptModule)]
    if scripted:
        raise TypeError(
            f"convert() cannot swap modules inside TorchScript code ({scripted[0]} is a "
            "torch.jit.script/trace module, whose forward is compiled and would ignore the swap); "
            "convert the eager model first, then script or trace it"
        )
    if not inplace:
        module = copy.deepcopy(module)
    return _mark_converted(_adopt(module))

