"""The fasttx forms of transformers' small modules: norms, activations, gated MLPs.

Each form is a plain function `form(module, x) -> Tensor` that computes what some transformers
class computes, from the module's own parameters and attributes. Which form (if any) a class gets
is decided by recognition.py on a probe, never by the class's name: a form here only has to be
right for the classes whose forward it reproduces, and a class it does not reproduce keeps its own
forward.
"""
from __future__ import annotations

import types
from typing import Callable, Optional

import torch
from torch import Tensor, nn

import fasttx.functional as FF
from fasttx._registry import OPS as _OPS


def has_op(op: str) -> bool:
    """Whether this fasttx declares `op` (fasttx.functional passes every other name to torch)."""
    return op in _OPS


def set_forward(module: nn.Module, fn: Callable) -> None:
    """Give this one instance `fn` as its forward (nn.Module.__call__ looks up `self.forward`);
    the class is not touched."""
    if getattr(module.__dict__.get("forward"), "__func__", None) is not fn:
        module.forward = types.MethodType(fn, module)


# ----------------------------------------------------------------------------------------------
# Norms: x (*, H) -> (*, H). The eps attribute has several names across transformers.
# ----------------------------------------------------------------------------------------------
EPS_NAMES = ("variance_epsilon", "eps", "epsilon", "layer_norm_eps")


def norm_eps(module: nn.Module) -> Optional[float]:
    for name in EPS_NAMES:
        v = module.__dict__.get(name)
        if isinstance(v, float) and not isinstance(v, bool):
            return v
    return None


def _w(module: nn.Module, name: str) -> Optional[Tensor]:
    p = module._parameters.get(name)
    return p if isinstance(p, Tensor) else None


def rms_llama(self, x: Tensor) -> Tensor:
    """normalise in fp32, cast to x's dtype, then `weight *` (Llama, Mistral, Qwen, ...)."""
    w = _w(self, "weight")
    return FF.add_rms_norm(x, None, (x.shape[-1],), w, norm_eps(self), cast="llama")[0]


def rms_gemma(self, x: Tensor) -> Tensor:
    """`* (1 + weight)` in fp32, then cast (Gemma 1/2/3)."""
    return FF.add_rms_norm(x, None, (x.shape[-1],), _w(self, "weight"), norm_eps(self), cast="gemma")[0]


def rms_fp32_weight(self, x: Tensor) -> Tensor:
    """`weight *` in fp32, then cast (OLMo 2, F.rms_norm's order)."""
    return FF.add_rms_norm(x, None, (x.shape[-1],), _w(self, "weight"), norm_eps(self), cast="torch")[0]


def layer_norm(self, x: Tensor) -> Tensor:
    """LayerNorm with an optional weight and an optional bias (bias-free LayerNorms included)."""
    return FF.layer_norm(x, (x.shape[-1],), _w(self, "weight"), _w(self, "bias"), norm_eps(self))


# name -> (form, the fasttx op it needs)
NORM_FORMS = {
    "rms_norm(llama cast)": (rms_llama, "add_rms_norm"),
    "rms_norm(gemma 1+w)": (rms_gemma, "add_rms_norm"),
    "rms_norm(fp32 weight)": (rms_fp32_weight, "add_rms_norm"),
    "layer_norm": (layer_norm, "layer_norm"),
}

# ----------------------------------------------------------------------------------------------
# Activations: the torch forms a transformers activation module may compute exactly.
# ----------------------------------------------------------------------------------------------
ACT_FORMS = {
    "gelu": lambda x: FF.gelu(x, approximate="none"),
    "gelu_tanh": lambda x: FF.gelu(x, approximate="tanh"),
    "silu": lambda x: torch.nn.functional.silu(x),
    "relu_squared": lambda x: FF.relu_squared(x),
}


def act_module(kind: str) -> Optional[nn.Module]:
    """The fasttx module that replaces an activation of this kind (None: no module swap; SiLU
    has no fasttx kernel of its own, it is fused into swiglu inside gated MLPs)."""
    import fasttx.nn as fnn

    if kind in ("gelu", "gelu_tanh") and has_op("gelu"):
        return fnn.GELU(approximate="tanh" if kind == "gelu_tanh" else "none")
    if kind == "relu_squared" and has_op("relu_squared"):
        return fnn.ReLUSquared()
    return None


# ----------------------------------------------------------------------------------------------
# Gated MLPs: down(act(gate(x)) * up(x)), the gate/up projections separate or fused.
# ----------------------------------------------------------------------------------------------
ACT_ATTRS = ("act_fn", "activation_fn", "act")


def _glu(kind: str, gate: Tensor, up: Tensor) -> Tensor:
    if kind == "silu":
        return FF.swiglu(gate, up)
    return FF.geglu(gate, up, approximate="tanh" if kind == "gelu_tanh" else "none")


def _kind(self) -> str:
    return self.__dict__["_fasttx_glu"]


def gated_mlp_split(self, x: Tensor) -> Tensor:
    """gate_proj / up_proj / down_proj (Llama, Gemma, OLMo 2, Granite, DeepSeek's dense MLP...)."""
    return self.down_proj(_glu(_kind(self), self.gate_proj(x), self.up_proj(x)))


def gated_mlp_fused(self, x: Tensor) -> Tensor:
    """gate_up_proj (gate first, then up) / down_proj (Phi-3, GLM-4)."""
    gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
    return self.down_proj(_glu(_kind(self), gate, up))


def mlp_layout(module: nn.Module) -> Optional[Callable]:
    """The gated-MLP form whose projections this module has, else None."""
    lin = lambda n: isinstance(getattr(module, n, None), nn.Linear)  # noqa: E731
    if lin("gate_proj") and lin("up_proj") and lin("down_proj"):
        return gated_mlp_split
    if lin("gate_up_proj") and lin("down_proj"):
        return gated_mlp_fused
    return None


def mlp_act(module: nn.Module) -> Optional[nn.Module]:
    for name in ACT_ATTRS:
        act = getattr(module, name, None)
        if isinstance(act, nn.Module):
            return act
    return None
