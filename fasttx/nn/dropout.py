"""Dropout: torch.nn.Dropout with its forward routed through fasttx.functional.dropout."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import functional as FF

__all__ = ["Dropout"]


class Dropout(torch.nn.Dropout):
    """Drop-in for torch.nn.Dropout(p=0.5, inplace=False): same constructor, checks, repr and
    `isinstance(m, torch.nn.Dropout)`. In training each element is zeroed with probability p and
    the rest scaled by 1/(1-p); in eval it is the identity. On the Triton path the mask comes from
    a Philox seed drawn from torch's generator (torch.manual_seed reproduces it) and is regenerated
    in the backward instead of being stored."""

    def forward(self, input: Tensor) -> Tensor:
        return FF.dropout(input, self.p, self.training, self.inplace)
