"""LayerNorm: torch.nn.LayerNorm with its forward routed through fasttx.functional.layer_norm."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import functional as FF

__all__ = ["LayerNorm"]


class LayerNorm(torch.nn.LayerNorm):
    """Drop-in for torch.nn.LayerNorm (same constructor, defaults, parameters, state_dict keys and
    repr; `isinstance(m, torch.nn.LayerNorm)` holds).

    input (*, *normalized_shape) -> output of the same shape and dtype. The statistics are kept in
    fp32 on the Triton path whatever the input dtype.
    """

    def forward(self, input: Tensor) -> Tensor:
        return FF.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
