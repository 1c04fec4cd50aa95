"""LayerNorm and RMSNorm: torch.nn's modules with their forwards routed through fasttx.functional;
OffsetRMSNorm (torch has none): RMSNorm with a (1 + weight) gain."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import functional as FF

__all__ = ["LayerNorm", "RMSNorm", "OffsetRMSNorm"]


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


class OffsetRMSNorm(torch.nn.Module):
    """RMSNorm whose gain is 1 + weight, weight zero-initialised (Gemma's GemmaRMSNorm, Qwen3-Next's
    zero-centred RMSNorm): torch.nn.RMSNorm's constructor and state_dict key ("weight"), but not a
    torch.nn.RMSNorm (its weight means something else). input (*, *normalized_shape) -> same shape
    and dtype; fasttx.functional.offset_rms_norm."""

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, device=None, dtype=None):
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.normalized_shape, self.eps, self.elementwise_affine = shape, eps, elementwise_affine
        if elementwise_affine:
            self.weight = torch.nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            torch.nn.init.zeros_(self.weight)

    def forward(self, input: Tensor) -> Tensor:
        return FF.offset_rms_norm(input, list(self.normalized_shape), self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
