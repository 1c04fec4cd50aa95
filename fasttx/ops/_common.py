"""Small helpers shared by the op wrappers."""
from __future__ import annotations

import torch

_SEED_HIGH = 2**31 - 1


def draw_philox_seed() -> int:
    """A Philox seed for one dropout call, drawn from torch's default (CPU) generator, so that
    `torch.manual_seed` reproduces a run. Drawn on the host: no device sync. Call it inside a
    custom op's implementation (not in traced Python) so torch.compile sees no `.item()`.

    A host seed would be baked into a captured CUDA graph, and every replay would then drop the
    same elements: refused with a clear error rather than silently repeating one mask."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "fasttx dropout (p > 0 in training) cannot be captured in a CUDA graph yet: its Philox "
            "seed is drawn on the host, so every replay would reuse one dropout mask. Capture the "
            "model in eval() mode or with dropout p=0, or use fasttx.use_backend('reference') "
            "for the captured region."
        )
    return int(torch.randint(0, _SEED_HIGH, (1,)).item())


def check_dropout_p(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
