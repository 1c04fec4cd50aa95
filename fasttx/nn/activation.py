"""GELU: torch.nn.GELU with its forward routed through fasttx.functional.gelu."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import functional as FF

__all__ = ["GELU"]


class GELU(torch.nn.GELU):
    """Drop-in for torch.nn.GELU(approximate="none" | "tanh"): same constructor, repr and
    `isinstance(m, torch.nn.GELU)`. input (*) -> output (*), same dtype."""

    def forward(self, input: Tensor) -> Tensor:
        return FF.gelu(input, approximate=self.approximate)
