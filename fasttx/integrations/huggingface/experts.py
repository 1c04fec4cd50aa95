"""fasttx's experts for transformers' mixture-of-experts models, through transformers' own hook.

transformers (>= 5) runs the experts of its MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
gpt-oss, DeepSeek-V3, GLM-4-MoE, ...: every experts class decorated with
`@use_experts_implementation`) through `ExpertsInterface`, picked by `config._experts_implementation`.
Importing this module registers `fasttx_experts_forward` there under the name "fasttx", so

    import fasttx.integrations.hf_experts   # (apply_fasttx and fasttx.integrations.huggingface import it;
                                            #  this module is fasttx.integrations.huggingface.experts)
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="fasttx")

runs every expert layer through `fasttx.functional.moe_experts` (the Triton kernels on CUDA, torch's
ops on CPU), and `apply_fasttx(model)` selects it for a model built any other way.

The experts module's layout flags map onto the op's: `is_transposed` -> `transposed`,
`is_concatenated=False` -> `gate_up_interleaved`, `has_bias` -> the two biases; its activation is
read from `act_fn` (SiLU, exact or tanh GELU), and gpt-oss's own `_apply_gate` (clamped SwiGLU,
`alpha`, `limit`) is recognised by name. A layer the op cannot express (no gate, a post-expert
norm, expert parallelism with sentinel indices, another activation or gate) runs transformers'
eager experts instead, said once per reason in a warning.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn as nn

import fasttx.functional as FF

EXPERTS_IMPLEMENTATION = "fasttx"
_warned: set = set()


def _activation(experts: nn.Module) -> Optional[str]:
    """The op's activation name for this experts module, or None when it has no exact one."""
    gate = getattr(type(experts), "_apply_gate", None)
    qualname = getattr(gate, "__qualname__", "")
    if qualname == "GptOssExperts._apply_gate":
        return "clamped_swiglu"
    if qualname != "_default_apply_gate":
        return None
    act = getattr(experts, "act_fn", None)
    name = type(act).__name__
    if isinstance(act, nn.SiLU) or name == "SiLUActivation":
        return "silu"
    if name in ("GELUTanh", "PytorchGELUTanh") or (isinstance(act, nn.GELU) and act.approximate == "tanh"):
        return "gelu_tanh"
    if name == "GELUActivation" or (isinstance(act, nn.GELU) and act.approximate == "none"):
        return "gelu"
    return None


def unsupported(experts: nn.Module) -> Optional[str]:
    """Why this experts module cannot run on fasttx's op (None when it can)."""
    if not getattr(experts, "has_gate", True):
        return "experts without a gate (up_proj only)"
    if getattr(experts, "has_post_expert_norm", False):
        return "a post-expert norm"
    if getattr(experts, "_is_expert_parallel", False):
        return "expert parallelism (sentinel expert ids)"
    if _activation(experts) is None:
        act = type(getattr(experts, "act_fn", None)).__name__
        return f"the activation {act} / {type(experts).__name__}._apply_gate"
    return None


def fasttx_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts forward signature: hidden_states (T, H), top_k_index (T, k),
    top_k_weights (T, k) -> (T, H), through fasttx.functional.moe_experts."""
    reason = unsupported(self)
    if reason is not None:
        if (type(self), reason) not in _warned:
            _warned.add((type(self), reason))
            warnings.warn(f"fasttx experts: {type(self).__name__} has {reason}; running transformers' eager "
                          "experts instead", stacklevel=2)
        # the decorated class's own forward: the first in the MRO that the decorator wrapped (a
        # subclass, as Ergo's, may override forward and call the decorated one through super())
        eager = next(c.__dict__["forward"].__wrapped__ for c in type(self).__mro__
                     if hasattr(c.__dict__.get("forward"), "__wrapped__"))
        return eager(self, hidden_states, top_k_index, top_k_weights)
    activation = _activation(self)
    has_bias = getattr(self, "has_bias", False)
    extra = {}
    if activation == "clamped_swiglu":
        extra = dict(alpha=float(self.alpha), limit=float(self.limit))
    out = FF.moe_experts(
        hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj, activation=activation,
        gate_up_bias=self.gate_up_proj_bias if has_bias else None,
        down_bias=self.down_proj_bias if has_bias else None,
        gate_up_interleaved=not getattr(self, "is_concatenated", True),
        transposed=bool(getattr(self, "is_transposed", False)), **extra)
    return out.to(hidden_states.dtype)


def register() -> bool:
    """Register "fasttx" in transformers' ExpertsInterface (idempotent); False when the installed
    transformers has no such interface (before 5.0)."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:
        return False
    ExpertsInterface.register(EXPERTS_IMPLEMENTATION, fasttx_experts_forward)
    return True


def set_experts(model: nn.Module) -> bool:
    """Point a transformers model's experts at "fasttx"; False when it has none that dispatch."""
    can = getattr(type(model), "_can_set_experts_implementation", None)
    if can is None or not register() or not can():
        return False
    if not any(hasattr(type(m), "_apply_gate") for m in model.modules()):
        return False
    model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    return model.config._experts_implementation == EXPERTS_IMPLEMENTATION


register()
