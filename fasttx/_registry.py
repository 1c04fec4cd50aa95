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
from typing import Callable, Dict, Optional

import torch

POLICIES = (None, "fp32", "lower")
_LOW = (torch.float16, torch.bfloat16)


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
        if torch.is_autocast_enabled(device):
            low = torch.get_autocast_dtype(device)
            return tuple(
                t.to(low) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                for t in tensors
            )
    return tensors


def autocast_to_fp32(device_type: str) -> bool:
    """Whether torch's fp32 policy is in force for this device (CUDA autocast on)."""
    return device_type == "cuda" and torch.is_autocast_enabled("cuda")
