"""LayerNorm and RMSNorm: torch.nn's modules with their forwards routed through fasttx.functional."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import functional as FF

__all__ = ["LayerNorm", "RMSNorm"]


class LayerNorm(torch.nn.LayerNorm):
    """Drop-in for torch.nn.LayerNorm (same constructor, defaults, parameters, state_dict keys and
    repr; `isinstance(m, torch.nn.LayerNorm)` holds).

    input (*, *normalized_shape) -> output of the same shape and dtype. The statistics are kept in
    fp32 on the Triton path whatever the input dtype.
    """

    def forward(self, input: Tensor) -> Tensor:
        return FF.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """Drop-in for torch.nn.RMSNorm (same constructor, defaults, parameters, state_dict keys and
    repr; `isinstance(m, torch.nn.RMSNorm)` holds).

    input (*, *normalized_shape) -> output of the same shape and dtype; eps=None is
    torch.finfo(float32).eps (float64's for float64 input), as torch's. Statistics in fp32.
    """

    def forward(self, input: Tensor) -> Tensor:
        return FF.rms_norm(input, self.normalized_shape, self.weight, self.eps)
