"""Raise exactly what torch's own op raises for a call, without touching the call's data.

torch's argument checks for ops such as F.cross_entropy and F.rms_norm look at shapes (which sizes
are equal to which, which are 0 or 1, the ranks) and dtypes only, and their meta kernels do not
always agree with them (AssertionError where torch raises RuntimeError or ValueError, missing
dtype rules). So the Triton path runs torch's op itself on tiny CPU stand-ins: every size other
than 0 and 1 is replaced, order kept, by a distinct prime >= 11 (never a rank or a dim index), and
the exception torch raises comes back with its message translated to the real sizes. Eager only:
under torch.compile the ops keep their traceable meta checks.
"""
from __future__ import annotations

import math
import re
from typing import Callable, Iterable, Optional, Sequence

import torch

_PRIMES = (11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71)
_MAX_NUMEL = 1 << 20
_NUMBER = re.compile(r"(?<![\w.])\d+(?![\w.])")


class StandIn:
    """The size map of one call: `shape(s)` for its sizes, `tensor(t)` for a zero CPU tensor of
    t's dtype (fp32 when `fp32` says so: autocast's cast) and t's mapped shape."""

    def __init__(self, sizes: Iterable[int], fp32: bool = False):
        big = sorted({int(n) for n in sizes if n > 1})
        self.ok = len(big) <= len(_PRIMES)
        self._small = dict(zip(big, _PRIMES))
        self._real = {str(v): str(k) for k, v in self._small.items()}
        self._fp32 = fp32

    def shape(self, shape: Sequence[int]) -> tuple:
        return tuple(self._small.get(int(n), int(n)) for n in shape)

    def tensor(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if t is None:
            return None
        dtype = torch.float32 if self._fp32 and t.dtype.is_floating_point else t.dtype
        return torch.zeros(self.shape(t.shape), dtype=dtype)

    def translate(self, message: str) -> str:
        return _NUMBER.sub(lambda m: self._real.get(m.group(0), m.group(0)), message)


def raise_as_torch(call: Callable[[StandIn], object], sizes: Iterable[int], largest: Sequence[int],
                   device_type: str) -> None:
    """Run call(stand_in) (torch's op on the stand-ins) and re-raise what it raises with the real
    sizes. `sizes`: every size of the call; `largest`: the shape whose stand-in is the biggest
    tensor (skipped, silently, past 2^20 elements or 16 distinct sizes)."""
    m = StandIn(sizes, fp32=torch.is_autocast_enabled(device_type))
    if not m.ok or math.prod(m.shape(largest)) > _MAX_NUMEL:
        return
    try:
        with torch.autocast("cpu", enabled=False):
            call(m)
    except (RuntimeError, ValueError, IndexError, TypeError, NotImplementedError) as e:
        raise type(e)(m.translate(str(e))) from None


def rms_norm_shapes_ok(input: torch.Tensor, normalized_shape: Sequence[int], weight: Optional[torch.Tensor]) -> bool:
    """The cheap test that F.rms_norm accepts these arguments (a floating input whose trailing dims
    are normalized_shape, non-empty; weight None or of that shape): only when it fails do the
    callers run torch's op on stand-ins for its exact exception, so the hot path pays nothing."""
    shape = tuple(normalized_shape)
    return (len(shape) > 0 and input.is_floating_point() and input.dim() >= len(shape)
            and tuple(input.shape[input.dim() - len(shape):]) == shape
            and (weight is None or tuple(weight.shape) == shape))

