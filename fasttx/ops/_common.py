"""Small helpers shared by the op wrappers."""
from __future__ import annotations

import torch

# the dtype rules (accumulator dtype, 16-bit and float sets, RMSNorm casts) are written once, in
# kernels/_dtypes.py (torch only); re-exported here for the ops modules and fasttx.flash
from fasttx.kernels._dtypes import FLOATS, KERNEL_FLOATS, LOW, RMS_NORM_CASTS, acc_dtype  # noqa: F401

_SEED_HIGH = 2**31 - 1


def draw_seed(device: torch.device) -> torch.Tensor:
    """A Philox seed for one dropout call as a (1,) int64 tensor on `device`, drawn by torch's
    generator of that device (torch.manual_seed reproduces a run). The kernel reads it on the
    device, so it is CUDA-graph safe: torch's generator advances its offset on every replay of a
    captured graph, so each replay draws a new seed and a new mask, as torch's own dropout does.
    No host sync, and no `.item()` for torch.compile to trace."""
    return torch.randint(0, _SEED_HIGH, (1,), dtype=torch.int64, device=device)


def keep_layout(fn, input: torch.Tensor) -> torch.Tensor:
    """fn(input) for an elementwise fn whose kernel writes contiguous outputs, with the output in
    input's layout, as torch's elementwise ops give it (memory_format=torch.preserve_format).

    A permuted but dense input (e.g. x.transpose(0, 1) of a contiguous x) runs on its contiguous
    permutation, a view, and the result is permuted back: same strides as input, no copy. Other
    inputs (contiguous, or strided with gaps) go straight to fn, whose output is contiguous as
    torch's is for them."""
    if input.dim() < 2 or input.is_contiguous():
        return fn(input)
    order = sorted(range(input.dim()), key=lambda d: -input.stride(d))
    dense = input.permute(order)
    if not dense.is_contiguous():
        return fn(input)
    inverse = sorted(range(input.dim()), key=order.__getitem__)
    return fn(dense).permute(inverse)
