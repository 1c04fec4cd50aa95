"""Losses: torch.nn.CrossEntropyLoss and torch.nn.LinearCrossEntropyLoss with their forwards
routed through fasttx.functional (LinearCrossEntropyLoss exists here even on a torch that lacks
it: same constructor, parameters and state_dict keys as torch 2.13's)."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import functional as F

__all__ = ["CrossEntropyLoss", "LinearCrossEntropyLoss"]


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """Drop-in for torch.nn.CrossEntropyLoss (constructor, defaults, buffers, repr; isinstance
    holds). input (C,), (N, C) or (N, C, d1, ...); target class indices or probabilities."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing)


_TorchLinearCrossEntropyLoss = getattr(torch.nn, "LinearCrossEntropyLoss", None)


if _TorchLinearCrossEntropyLoss is not None:
    _Base = _TorchLinearCrossEntropyLoss
else:  # torch < 2.13: torch 2.13's constructor, written out

    class _Base(torch.nn.modules.loss._WeightedLoss):
        def __init__(self, in_features: int, num_classes: int, *, out_features: Tuple[int, ...] = (),
                     bias: bool = False, device=None, dtype=None, reduction: str = "mean",
                     weight: Optional[Tensor] = None, ignore_index: Optional[int] = None,
                     label_smoothing: float = 0.0, options=None) -> None:
            if weight is not None and weight.shape != (num_classes,):
                raise RuntimeError(
                    f"expected weight shape to be {(num_classes,)}, got {tuple(weight.shape)}"
                )
            if label_smoothing < 0 or label_smoothing > 1.0:
                raise RuntimeError(
                    f"expected label_smoothing to be in range [0, 1], got {label_smoothing}"
                )
            super().__init__(weight=weight, size_average=None, reduce=None, reduction=reduction)
            self.num_classes = num_classes
            self.out_features = out_features
            self.ignore_index = ignore_index
            self.label_smoothing = label_smoothing
            # flat (C * prod(out_features), in_features) storage, reshaped in forward, as torch's
            self.linear = torch.nn.Linear(in_features, math.prod(out_features, start=num_classes),
                                          bias=bias, device=device, dtype=dtype)
            self.options = options

        def extra_repr(self) -> str:
            return (
                f"in_features={self.linear.in_features}, num_classes={self.num_classes},"
                f" out_features={self.out_features}, bias={self.linear.bias is not None},"
                f" reduction={self.reduction}, ignore_index={self.ignore_index},"
                f" label_smoothing={self.label_smoothing}, options={self.options}"
            )


class LinearCrossEntropyLoss(_Base):
    """Drop-in for torch.nn.LinearCrossEntropyLoss (torch 2.13): cross-entropy of
    `self.linear(input)` without the (N, C) logits. input (H,) or (N, H); target (N,
    *out_features) class indices or (N, C, *out_features) probabilities. `options` is kept for
    compatibility; fasttx always chunks."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        linear_weight = self.linear.weight.reshape(
            (self.num_classes, *self.out_features, self.linear.in_features)
        )
        linear_bias = (self.linear.bias.reshape((self.num_classes, *self.out_features))
                       if self.linear.bias is not None else None)
        return F.linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=self.weight,
            reduction=self.reduction, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, options=self.options,
        )
