"""Argument checks with torch's exception types and messages, for the Triton path's public
entries (torch's own ops check their arguments themselves on the torch path). Each helper names
the op, the argument and the rule, as torch's argument parser does."""
from __future__ import annotations

import numbers

import torch


def _type_name(value) -> str:
    return type(value).__name__


def _where(op: str, name: str, pos) -> str:
    return f"{op}(): argument '{name}'" + (f" (position {pos})" if pos is not None else "")


def check_float(op: str, name: str, pos, value) -> float:
    """A Python number (torch's parser takes bool and int for a float too) -> float."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.requires_grad:
        return float(value)
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{_where(op, name, pos)} must be float, not {_type_name(value)}")
    return float(value)


def check_int(op: str, name: str, pos, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{_where(op, name, pos)} must be int, not {_type_name(value)}")
    return int(value)


def check_bool(op: str, name: str, pos, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{_where(op, name, pos)} must be bool, not {_type_name(value)}")
    return value


def check_str(op: str, name: str, pos, value) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{_where(op, name, pos)} must be str, not {_type_name(value)}")
    return value


def check_dtype(op: str, name: str, pos, value):
    if value is not None and not isinstance(value, torch.dtype):
        raise TypeError(f"{_where(op, name, pos)} must be torch.dtype, not {_type_name(value)}")
    return value


def check_shape(op: str, name: str, pos, value) -> tuple:
    """normalized_shape: an int or a sequence of ints (torch's message for an element of the
    wrong type); returned as a tuple."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return (int(value),)
    if isinstance(value, torch.Size):
        return tuple(value)
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{_where(op, name, pos)} must be tuple of ints, not {_type_name(value)}")
    for i, s in enumerate(value):
        if isinstance(s, bool) or not isinstance(s, numbers.Integral):
            raise TypeError(
                f"{_where(op, name, pos)} must be tuple of ints, but found element of type "
                f"{_type_name(s)} at pos {i}"
            )
    return tuple(int(s) for s in value)


def check_dropout_p(p) -> float:
    """torch.nn.functional.dropout's rule and message (ValueError)."""
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    return float(p)


def check_residual_shape(op: str, input, residual) -> None:
    """A fused op's residual has input's shape (both paths: the add would broadcast otherwise)."""
    if residual is not None and residual.shape != input.shape:
        raise RuntimeError(f"{op}: expected residual of the input's shape {list(input.shape)}, got "
                           f"{list(residual.shape)}")


def check_residual(op: str, input, residual) -> None:
    """A fused op's residual: None, or a floating-point tensor of input's shape on its device."""
    if residual is None:
        return
    check_residual_shape(op, input, residual)
    if not residual.is_floating_point() or residual.device != input.device:
        raise RuntimeError(f"{op}: expected residual a floating-point tensor on {input.device}, got "
                           f"{residual.dtype} on {residual.device}")
