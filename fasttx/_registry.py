"""Each fasttx op is declared once, by the `@fasttx_op` decorator on its fasttx.functional entry.

From those declarations come: `fasttx.functional.__all__`, the autocast policy the Triton path
applies (custom ops have none of their own), and the op list that docs and tests read
(`OPS`, in declaration order). Other lists are derived from the code they describe, not kept by
hand: fasttx.convert's torch -> fasttx class map from fasttx.nn (`fasttx.nn.TORCH_TO_FASTTX`), the
compile check's variants from each kernel file's `compile_variants`, the bench's ops from its
`bench/bench_<op>.py` files.

Autocast policies, as torch's per-op lists have them:
    None    - the op runs in its inputs' dtypes (elementwise ops, dropout)
    "fp32"  - under CUDA autocast, 16-bit floating inputs are cast to fp32 (torch's fp32 list:
              layer_norm, rms_norm, softmax, cross_entropy); CPU autocast leaves them alone
    "lower" - under autocast (CUDA or CPU) floating inputs other than fp64 are cast to the
              autocast dtype (torch's lower-precision list: scaled_dot_product_attention)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, NamedTuple, Optional

import torch

from fasttx.kernels._dtypes import LOW as _LOW

from ._backend import use_triton, warn_fallback

POLICIES = (None, "fp32", "lower")


@dataclass(frozen=True)
class Op:
    name: str
    fn: Callable
    autocast: Optional[str]


OPS: Dict[str, Op] = {}


def fasttx_op(autocast: Optional[str] = None):
    """Declare the decorated fasttx.functional entry as a fasttx op (see the module docstring).
    The function is returned unchanged: no wrapper on the hot path."""
    if autocast not in POLICIES:
        raise ValueError(f"autocast policy must be one of {POLICIES}, got {autocast!r}")

    def declare(fn):
        OPS[fn.__name__] = Op(fn.__name__, fn, autocast)
        return fn

    return declare


class Contract(NamedTuple):
    """One public op's contract, declared beside its custom ops in fasttx/ops/<op>.py by `contract`.
    Every function takes the public entry's arguments, positionally, in its signature's order.
        tensors(*args)      the tensors that pick the backend (`use_triton`), or None: torch's path
        unsupported(*args)  None when the kernels serve this call, else why not (one warning, torch's path)
        triton(*args)       the Triton path: torch's argument checks and exception types, autocast, the custom op
        torch(*args)        the torch path (torch's own op, or the op's semantics in torch ops)
        prepare(*args)      optional, both paths first: the rules of fasttx's own arguments (torch has
                            no op to check them) and their normalisation; returns the arguments"""
    tensors: Callable
    unsupported: Callable
    triton: Callable
    torch: Callable
    prepare: Optional[Callable] = None


CONTRACTS: Dict[str, Contract] = {}


def contract(name: str, **functions) -> Contract:
    """Declare op `name`'s contract (fasttx/ops/<op>.py, at import); `route` runs it."""
    CONTRACTS[name] = Contract(**functions)
    return CONTRACTS[name]


def load_contracts() -> None:
    """Import every fasttx/ops/<op>.py, each declaring its contracts as it loads (derived from the
    package's files, no list). torch only: the ops modules import the kernels on the Triton path."""
    import importlib
    import pkgutil

    from . import ops

    for m in pkgutil.iter_modules(ops.__path__):
        if not m.name.startswith("_"):
            importlib.import_module(f"{ops.__name__}.{m.name}")


def route(name: str, *args):
    """The one router every fasttx.functional entry calls: op `name`'s contract on `args`.

        args = prepare(*args)                      # fasttx's own argument rules, both paths
        if use_triton(*tensors(*args)):            # backend + device (fasttx/_backend.py)
            if unsupported(*args) is None:         # the kernels cover this call
                return triton(*args)               # checks, autocast, the torch.library custom op
            warn_fallback(name, reason)            # one warning per reason
        return torch(*args)                        # torch's own op, which checks its own arguments

    Plain Python over a dict of NamedTuples: torch.compile(fullgraph=True) traces through it."""
    c = CONTRACTS[name]
    if c.prepare is not None:
        args = c.prepare(*args)
    tensors = c.tensors(*args)
    if tensors is not None and use_triton(*tensors):
        reason = c.unsupported(*args)
        if reason is None:
            if _DTENSOR_RULES_PENDING[0]:
                _dtensor_rules()
            return c.triton(*args)
        warn_fallback(name, reason)
    return c.torch(*args)


# DTensor sharding rules are registered before the first Triton-path call that runs while
# torch.distributed.tensor is loaded (a program that builds DTensors has imported it); fasttx never
# imports it itself. Until then each Triton-path call looks once more (a flag and a dict lookup).
_DTENSOR_RULES_PENDING = [True]


def _dtensor_rules() -> None:
    if torch.compiler.is_compiling():
        # torch.compile runs an import statement instead of tracing it: the module's body registers
        from . import _dtensor_on_import  # noqa: F401
    else:
        from .distributed import register_if_dtensor_loaded

        if register_if_dtensor_loaded():
            _DTENSOR_RULES_PENDING[0] = False


def autocast_inputs(name: str, *tensors):
    """`tensors` cast as torch's autocast would cast them for op `name` (unchanged when autocast
    is off or the op's policy is None). The device type is the first tensor's."""
    policy = OPS[name].autocast
    first = next(t for t in tensors if t is not None)
    device = first.device.type
    if policy == "fp32":
        if device == "cuda" and torch.is_autocast_enabled("cuda"):
            return tuple(t.float() if t is not None and t.dtype in _LOW else t for t in tensors)
    elif policy == "lower":
        return autocast_lower(device, *tensors)
    return tensors


def autocast_lower(device_type: str, *tensors):
    """`tensors` as torch's lower-precision autocast list casts them (F.linear, matmul, SDPA):
    floating tensors other than fp64 to the autocast dtype while autocast is on for this device,
    unchanged otherwise (None passes through)."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    low = torch.get_autocast_dtype(device_type)
    return tuple(t.to(low) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


def autocast_to_fp32(device_type: str) -> bool:
    """Whether torch's fp32 policy is in force for this device (CUDA autocast on)."""
    return device_type == "cuda" and torch.is_autocast_enabled("cuda")
