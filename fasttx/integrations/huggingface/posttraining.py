"""Post-training: the final hidden states and the LM head of a causal LM, for log-probs without the
logits. `hidden_states_and_head(model, input_ids=..., ...)` returns the final hidden states and the
LM head (the model run without its head), and `causal_lm_log_probs(model, input_ids, ...)` the
per-token log-probs (and entropy) of the next tokens through FF.linear_log_probs, so a trainer's
DPO / GRPO / distillation loss (fasttx.losses) never builds the logits.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

import fasttx.functional as FF

from .loss import head_inputs


def hidden_states_and_head(model: nn.Module, *args, **kwargs) -> Tuple[Tensor, nn.Linear]:
    """Run a causal LM (patched by apply_fasttx or not) without its LM head: returns (hidden
    (B, L, H), the head nn.Linear (V, H)) with head(hidden) equal to the model's logits, which are
    never built. Arguments are the model's forward's (input_ids, attention_mask, ...; no labels).
    Feed them to fasttx.functional.linear_log_probs / linear_jsd (see causal_lm_log_probs).

    Raises ValueError for a model whose logits are not head(hidden) (a final logit softcap or a
    logit scale in the config) or whose `lm_head` is not an nn.Linear."""
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"hidden_states_and_head: {type(model).__name__} has no nn.Linear lm_head")
    cfg = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            raise ValueError(f"hidden_states_and_head: {type(model).__name__}'s logits are not lm_head(hidden) "
                             f"(config.{attr} = {getattr(cfg, attr)})")
    if kwargs.get("labels") is not None:
        raise ValueError("hidden_states_and_head: pass no labels (the loss is the caller's)")
    with head_inputs(head) as captured:
        model(*args, **kwargs)
    if len(captured) != 1:
        raise RuntimeError(f"hidden_states_and_head: the LM head was called {len(captured)} times, expected once")
    return captured[0], head


def causal_lm_log_probs(model: nn.Module, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                        completion_mask: Optional[Tensor] = None, *, temperature: float = 1.0,
                        return_entropy: bool = False, **kwargs):
    """Per-token log-probs (B, L - 1) of input_ids[:, 1:] under the model (the next-token
    shift of TRL's trainers), from hidden_states_and_head and fasttx.functional.linear_log_probs:
    no (B, L, V) logits. Positions where completion_mask[:, 1:] (default: attention_mask, or all)
    is 0 are 0 (with return_entropy, the entropy too) and get no gradient."""
    hidden, head = hidden_states_and_head(model, input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    mask = completion_mask if completion_mask is not None else attention_mask
    target = input_ids[:, 1:]
    if mask is not None:
        target = torch.where(mask[:, 1:].bool(), target, torch.full_like(target, -100))
    return FF.linear_log_probs(hidden[:, :-1], head.weight, target, bias=head.bias, temperature=temperature,
                               return_entropy=return_entropy)
