"""Small helpers shared by the op wrappers."""
from __future__ import annotations

import torch

_SEED_HIGH = 2**31 - 1


def draw_philox_seed() -> int:
    """A Philox seed for one dropout call, drawn from torch's default (CPU) generator, so that
    `torch.manual_seed` reproduces a run. Drawn on the host: no device sync. Call it inside a
    custom op's implementation (not in traced Python) so torch.compile sees no `.item()`."""
    return int(torch.randint(0, _SEED_HIGH, (1,)).item())


def check_dropout_p(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
