"""GELU: torch.nn.GELU with its forward routed through fasttx.functional.gelu; ReLUSquared (torch
has no such module) through fasttx.functional.relu_squared."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import functional as FF

__all__ = ["GELU", "ReLUSquared"]


class GELU(torch.nn.GELU):
    """Drop-in for torch.nn.GELU(approximate="none" | "tanh"): same constructor, repr and
    `isinstance(m, torch.nn.GELU)`. input (*) -> output (*), same dtype."""

    def forward(self, input: Tensor) -> Tensor:
        return FF.gelu(input, approximate=self.approximate)


class ReLUSquared(torch.nn.Module):
    """Squared ReLU, relu(x) ** 2 (Primer, Nemotron, nanoGPT speedruns), as an MLP's activation
    module. No parameters. input (*) -> output (*), same dtype."""

    def forward(self, input: Tensor) -> Tensor:
        return FF.relu_squared(input)
