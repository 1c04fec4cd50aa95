"""Small helpers shared by the op wrappers."""
from __future__ import annotations

import torch

_SEED_HIGH = 2**31 - 1


def draw_seed(device: torch.device) -> torch.Tensor:
    """A Philox seed for one dropout call as a (1,) int64 tensor on `device`, drawn by torch's
    generator of that device (torch.manual_seed reproduces a run). The kernel reads it on the
    device, so it is CUDA-graph safe: torch's generator advances its offset on every replay of a
    captured graph, so each replay draws a new seed and a new mask, as torch's own dropout does.
    No host sync, and no `.item()` for torch.compile to trace."""
    return torch.randint(0, _SEED_HIGH, (1,), dtype=torch.int64, device=device)


def draw_philox_seed() -> int:
    """A host Philox seed (the fused LayerNorm and attention kernels still take one), drawn from
    torch's default (CPU) generator, so that
    `torch.manual_seed` reproduces a run. Drawn on the host: no device sync. Call it inside a
    custom op's implementation (not in traced Python) so torch.compile sees no `.item()`.

    A host seed would be baked into a captured CUDA graph, and every replay would then drop the
    same elements: refused with a clear error rather than silently repeating one mask."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "fasttx's fused dropout (p > 0 in training) cannot be captured in a CUDA graph yet: its Philox "
            "seed is drawn on the host, so every replay would reuse one dropout mask. Capture the "
            "model in eval() mode or with dropout p=0, or use fasttx.use_backend('torch') "
            "for the captured region."
        )
    return int(torch.randint(0, _SEED_HIGH, (1,)).item())


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
