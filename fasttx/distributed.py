"""DTensor sharding rules for fasttx's custom ops (tensor and sequence parallel).

torch.distributed's tensor parallel (`parallelize_module` with ColwiseParallel / RowwiseParallel /
SequenceParallel) hands ops DTensors. DTensor runs an op on each rank's local shard only if it
knows which input placements give which output placements: this module tells it, for every
`torch.ops.fasttx.*` op, through `torch.distributed.tensor.experimental.register_sharding`. DTensor
then redistributes an input whose placement no rule accepts (e.g. all-gathers a norm's input
sharded on the normalised dim) and runs the kernel on the local shards. FSDP2 (`fully_shard`)
and DDP need none of this: they all-gather parameters before the forward, so the ops see plain
tensors.

Each custom op's rule is declared beside the op, in its fasttx/ops/<op>.py, with `@sharding_rule(op)`
(its comment says which placements it accepts); this module holds only the machinery: the
decorator, the placement helpers the rules share, and `register`. Every op also accepts all-Replicate.

Dropout masks under sharding. Each rank draws the Philox seed from its own torch generator (ranks
seeded alike draw the same seed, as a Replicate DTensor needs) and masks the local tensors by
their local element index:
  - `dropout` takes Replicate inputs only: a sharded input is all-gathered first (a one-time
    warning says so), and every rank's mask is then exactly the single-process mask.
  - the dropout fused into `dropout_add_layer_norm` (sequence-parallel norms) and attention's
    `dropout_p` (heads sharded) run on the shards: each shard gets the mask a tensor of the
    shard's shape would get, which is NOT the slice of the single-process mask, and is the same
    pattern on every rank. Each element is still kept with probability 1 - p and scaled by
    1 / (1 - p), and the backward masks in the forward's placement (its rule follows the saved
    statistics), so the gradients are those of the masks drawn. To decorrelate the shards, seed
    each tensor-parallel rank differently after building the model (Replicate dropouts then
    differ across ranks too).

Registration happens at the first Triton-path call of a fasttx op (fasttx._registry.route, also
under torch.compile) made while torch.distributed.tensor is loaded, as it is in any program that
builds DTensors; neither `import fasttx` nor this module imports torch.distributed. A program that
compiles its first fasttx call before importing torch.distributed.tensor calls
`fasttx.distributed.register()` once.
"""
from __future__ import annotations

import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch

__all__ = ["register", "registered_ops", "sharding_rule"]

_registered: set = set()


# ----------------------------------------------------------------------------------------------
# Declaring rules. A rule takes the op's arguments (tensors replaced by DTensor's specs: .ndim,
# .shape, .placements; None for absent optional tensors) and returns
# [(output placements, input placements), ...], one placement per output and per schema argument
# (None for non-tensors and absent tensors). The helpers below are what the rules share.
# ----------------------------------------------------------------------------------------------
_declared: Dict[str, Callable[..., List[Tuple[list, list]]]] = {}


def sharding_rule(custom_op):
    """Decorator: the rule below is `custom_op`'s (a torch.library.custom_op of namespace fasttx).
    Registered at once when torch.distributed.tensor is loaded, else by `register`."""
    name = custom_op._name

    def declare(rule):
        _declared[name] = rule
        if "torch.distributed.tensor" in sys.modules:
            _register_one(name, rule)
        return rule

    return declare


def placements():
    """(Replicate(), Shard, Partial()): imported when a rule runs, i.e. when DTensor is in use."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    return Replicate(), Shard, Partial()


def opt(t, placement):
    return None if t is None else placement


def _norm_dims(t, N: int) -> int:
    """How many trailing dims of t make up the N normalised elements (all of them if none do)."""
    prod = 1
    for k in range(1, t.ndim + 1):
        prod *= t.shape[-k]
        if prod == N:
            return k
    return t.ndim


def matching(strategies, spec, index):
    """Only the strategies whose input `index` keeps `spec`'s placement: the backward of an op
    with dropout must mask in the placement its forward masked in (its mask depends on it)."""
    kept = [st for st in strategies if st[1][index] in spec.placements]
    return kept or strategies


def row_dims(t, N) -> range:
    """The dims a row-wise op (norm over the trailing N elements) may be sharded on."""
    return range(t.ndim - _norm_dims(t, N))


def heads(t, S):
    """ALiBi slopes (H,) or (B, H) sharded with the heads (their last dim)."""
    return None if t is None else S(t.ndim - 1)


_warned: set = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        import warnings

        warnings.warn(message, stacklevel=2)


def _op(name: str) -> Optional[torch._ops.OpOverload]:
    try:
        return getattr(torch.ops.fasttx, name).default
    except (AttributeError, RuntimeError):
        return None


def registered_ops() -> List[str]:
    """Names of the fasttx custom ops that have a DTensor sharding rule registered."""
    return sorted(_registered)


def register() -> List[str]:
    """Register the sharding rule of every fasttx custom op defined so far (idempotent); return
    the names registered by this call. Imports torch.distributed.tensor."""
    from ._registry import load_contracts

    load_contracts()  # every fasttx/ops/<op>.py loaded: each has declared its rules
    new = [name for name, rule in _declared.items() if _register_one(name, rule)]
    missing = [n for n in _defined_fasttx_ops() if n not in _declared]
    if missing:
        # a new custom op without a rule: DTensor will say "no sharding strategy" for it
        import warnings

        warnings.warn(f"fasttx.distributed: no DTensor sharding rule for fasttx ops {missing}", stacklevel=2)
    return new


def _register_one(name: str, rule) -> bool:
    """Register one declared rule with DTensor (once); True when this call registered it."""
    op = _op(name)
    if name in _registered or op is None:
        return False
    from torch.distributed.tensor.experimental import register_sharding

    register_sharding(op)(rule)
    _registered.add(name)
    return True


def _defined_fasttx_ops() -> List[str]:
    ns = torch.ops.fasttx
    return [n for n in dir(ns) if not n.startswith("_") and _op(n) is not None and n != "name"]


def register_if_dtensor_loaded() -> bool:
    """Register the rules now if DTensor is in use (a program that builds DTensors has imported
    torch.distributed.tensor; this never imports it). True when it is (the rules are registered)."""
    if "torch.distributed.tensor" in sys.modules:
        register()
        return True
    return False

