"""Mixture-of-experts MLP: a softmax top-k router over E gated experts (fasttx.functional.moe_experts),
an optional always-on shared expert, and the router's auxiliary losses."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from .. import functional as FF

__all__ = ["MoE"]


class MoE(nn.Module):
    """y = sum_j w_j expert_{e_j}(x) (+ shared_expert(x)) per token, (e, w) the router's top-k.

    Args:
        hidden_size: H, the input and output width.
        intermediate_size: I, each expert's inner width (gate_up_proj (E, 2I, H), down_proj (E, H, I),
            transformers' layout and parameter names).
        num_experts: E.
        top_k: experts per token (1 <= top_k <= E).
        activation: the experts' gated activation, "silu" (SwiGLU), "gelu", "gelu_tanh" (GeGLU).
        norm_topk_prob: divide the k routing weights by their sum (Mixtral, Qwen3-MoE); False keeps
            the softmax probabilities (Switch, OLMoE).
        shared_intermediate_size: width of a shared SwiGLU expert every token goes through
            (Qwen2-MoE, DeepSeek); None: no shared expert.
        bias: biases in the experts (gate_up_bias (E, 2I), down_bias (E, H)).

    forward(x (*, H)) -> (*, H). After each forward the module holds, as tensors in the graph:
        aux_loss: the Switch Transformer load-balancing loss E * sum_e f_e P_e, f_e the number of
            the tokens' k choices that went to expert e divided by the token count (no gradient),
            P_e the mean router probability of e: 1 at perfect balance for k = 1, k for top-k (as
            transformers' load_balancing_loss_func);
        z_loss: the router z-loss (ST-MoE), mean over tokens of logsumexp(router logits)^2;
        router_logits: (tokens, E).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int = 2, *,
                 activation: str = "silu", norm_topk_prob: bool = True,
                 shared_intermediate_size: Optional[int] = None, bias: bool = False, device=None, dtype=None):
        super().__init__()
        for name, v in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size),
                        ("num_experts", num_experts), ("top_k", top_k)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"MoE: {name} must be a positive int, got {v!r}")
        if top_k > num_experts:
            raise ValueError(f"MoE: top_k ({top_k}) must be at most num_experts ({num_experts})")
        if activation not in ("silu", "gelu", "gelu_tanh"):
            raise ValueError(f"MoE: activation must be 'silu', 'gelu' or 'gelu_tanh', got {activation!r}")
        kw = dict(device=device, dtype=dtype)
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_experts, self.top_k = num_experts, top_k
        self.activation, self.norm_topk_prob = activation, norm_topk_prob
        self.gate = nn.Linear(hidden_size, num_experts, bias=False, **kw)  # the router
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, **kw))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **kw))
        self.gate_up_bias = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, **kw)) if bias else None
        self.down_bias = nn.Parameter(torch.empty(num_experts, hidden_size, **kw)) if bias else None
        self.shared_expert = None
        if shared_intermediate_size is not None:
            self.shared_expert = nn.ModuleDict(dict(
                gate_up=nn.Linear(hidden_size, 2 * shared_intermediate_size, bias=False, **kw),
                down=nn.Linear(shared_intermediate_size, hidden_size, bias=False, **kw)))
        self.aux_loss: Optional[Tensor] = None
        self.z_loss: Optional[Tensor] = None
        self.router_logits: Optional[Tensor] = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # each expert as an nn.Linear of its shape would be initialised
        for w, fan_in in ((self.gate_up_proj, self.hidden_size), (self.down_proj, self.intermediate_size)):
            nn.init.uniform_(w, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        for b, fan_in in ((self.gate_up_bias, self.hidden_size), (self.down_bias, self.intermediate_size)):
            if b is not None:
                nn.init.uniform_(b, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def route(self, x: Tensor):
        """x (T, H) -> (router logits (T, E), top_k_index (T, k), top_k_weights (T, k) fp32)."""
        logits = self.gate(x)  # (T, E)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, index = torch.topk(probs, self.top_k, dim=-1)  # (T, k)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, index, weights, probs

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, self.hidden_size)  # (T, H)
        logits, index, weights, probs = self.route(x)
        y = FF.moe_experts(x, index, weights, self.gate_up_proj, self.down_proj, activation=self.activation,
                           gate_up_bias=self.gate_up_bias, down_bias=self.down_bias)
        if self.shared_expert is not None:
            y = y + self.shared_expert.down(FF.swiglu(self.shared_expert.gate_up(x)))
        # the losses: static shapes, no host read (counts by comparison, not bincount/one_hot)
        E, T = self.num_experts, max(x.shape[0], 1)
        chosen = (index.unsqueeze(-1) == torch.arange(E, device=x.device)).sum((0, 1))  # (E,)
        f = chosen.float() / T
        self.aux_loss = E * (f * probs.mean(0)).sum() if x.shape[0] else probs.sum() * 0
        self.z_loss = torch.logsumexp(logits.float(), -1).square().mean() if x.shape[0] else probs.sum() * 0
        self.router_logits = logits
        return y.reshape(shape)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
                f"num_experts={self.num_experts}, top_k={self.top_k}, activation={self.activation!r}, "
                f"norm_topk_prob={self.norm_topk_prob}, bias={self.down_bias is not None}")
