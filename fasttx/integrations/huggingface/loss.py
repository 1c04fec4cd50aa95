"""The causal-LM loss without logits, and the patched model's forward that keeps transformers'
contracts: logits are skipped only while training with labels and gradients on; a call with
output_attentions=True runs eager attention for that call (loss.py owns the model-level forward).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import fasttx.functional as FF

from .alibi import unpadded as alibi_unpadded
from .alibi import weights_wanted as alibi_weights_wanted
from .attention import eager_for_this_call
from .modules import has_op, set_forward


@contextlib.contextmanager
def head_inputs(head: nn.Module):
    """While inside, `head` (the LM head) returns no logits: each call appends its input (the final
    hidden states) to the yielded list and returns an empty (*, 0) tensor. The instance's own
    forward (if one was set on it) is restored on exit."""
    captured = []

    def capture(hidden):
        captured.append(hidden)
        return hidden.new_empty((*hidden.shape[:-1], 0))

    had = "forward" in head.__dict__
    previous = head.__dict__.get("forward")
    head.forward = capture
    try:
        yield captured
    finally:
        if had:
            head.forward = previous
        else:
            del head.forward

try:
    from transformers.loss.loss_utils import ForCausalLMLoss as _ForCausalLMLoss
except ImportError:  # pragma: no cover - transformers < 4.46 has no loss module
    _ForCausalLMLoss = None


def _shifted(labels: Tensor, shift_labels: Optional[Tensor], ignore_index: int) -> Tensor:
    if shift_labels is None:  # tokens < n predict n; the last position predicts nothing
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.reshape(-1)


def _normalise(loss: Tensor, num_items_in_batch) -> Tensor:
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def fasttx_causal_lm_loss(
    logits: Tensor,
    labels: Tensor,
    vocab_size: int,
    num_items_in_batch=None,
    ignore_index: int = -100,
    shift_labels: Optional[Tensor] = None,
    **kwargs,
) -> Tensor:
    """transformers' ForCausalLMLoss computed by FF.cross_entropy: logits (B, L, V) in fp32,
    labels (B, L) shifted left by one (or `shift_labels` (B, L) as given), ignore_index skipped;
    mean over the counted tokens, or sum / num_items_in_batch when that is given (gradient
    accumulation over micro-batches). The loss of a patched causal LM whenever logits are built
    (evaluation, no_grad, keep_logits=True)."""
    target = _shifted(labels, shift_labels, ignore_index).to(logits.device)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = FF.cross_entropy(logits.float().reshape(-1, vocab_size), target, ignore_index=ignore_index,
                            reduction=reduction)
    return loss if num_items_in_batch is None else _normalise(loss, num_items_in_batch)


_SOFTCAP_CHUNK = 4096  # rows per recomputed chunk: (chunk, V) logits live at a time


def _softcap_chunk_loss(h: Tensor, w: Tensor, b: Optional[Tensor], t: Tensor, cap: float, ignore_index: int) -> Tensor:
    logits = torch.nn.functional.linear(h, w, b).float()  # (n, V)
    logits = torch.tanh(logits / cap) * cap  # Gemma 2/3's final logit softcap
    return FF.cross_entropy(logits, t, ignore_index=ignore_index, reduction="sum")


def _linear_causal_lm_loss(hidden: Tensor, head: nn.Linear, labels: Tensor, num_items_in_batch=None,
                           ignore_index: int = -100, shift_labels: Optional[Tensor] = None,
                           softcap: Optional[float] = None) -> Tensor:
    """The same loss as fasttx_causal_lm_loss(head(hidden), labels, ...) from hidden (B, L, H) and
    the head's (V, H) weight, without the (B * L, V) logits. With a final logit softcap the
    logits are built and discarded chunk by chunk (recomputed in the backward)."""
    target = _shifted(labels, shift_labels, ignore_index).to(hidden.device)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    h = hidden.reshape(-1, hidden.shape[-1])
    if softcap:
        total = h.new_zeros((), dtype=torch.float32)
        for i in range(0, h.shape[0], _SOFTCAP_CHUNK):
            total = total + checkpoint(_softcap_chunk_loss, h[i:i + _SOFTCAP_CHUNK], head.weight, head.bias,
                                       target[i:i + _SOFTCAP_CHUNK], float(softcap), ignore_index,
                                       use_reentrant=False)
        loss = total if reduction == "sum" else total / (target != ignore_index).sum()
    else:
        # transformers computes this loss in fp32 from the head's logits in the model's dtype: what
        # linear_cross_entropy gives under autocast to that dtype (the loss itself never rounded)
        low = h.dtype in (torch.float16, torch.bfloat16)
        with torch.autocast(h.device.type, dtype=h.dtype if low else torch.bfloat16, enabled=low):
            loss = FF.linear_cross_entropy(
                h, head.weight, target, linear_bias=head.bias, reduction=reduction, ignore_index=ignore_index,
            ).float()
    return loss if num_items_in_batch is None else _normalise(loss, num_items_in_batch)


def is_causal_lm(model: nn.Module) -> bool:
    """A causal LM of transformers' auto mapping (or named like one) whose loss is ForCausalLMLoss
    and whose output embedding is a plain Linear."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as names
        listed = type(model).__name__ in set(names.values())
    except ImportError:  # pragma: no cover
        listed = False
    name = type(model).__name__
    if not (listed or name.endswith("ForCausalLM") or name.endswith("LMHeadModel")):
        return False
    loss = getattr(model, "loss_function", None)
    if _ForCausalLMLoss is None or loss not in (fasttx_causal_lm_loss, _ForCausalLMLoss):
        return False
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return type(head) is nn.Linear and getattr(model, "lm_head", None) is head


def _bind(self, forward, args, kwargs) -> dict:
    if args:  # bind positionals to their names, so that `labels` is found wherever it was passed
        names = [n for n, p in inspect.signature(forward).parameters.items()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        kwargs.update(zip(names, args))
    return kwargs


def _wants_weights(self, kwargs) -> bool:
    v = kwargs.get("output_attentions")
    return bool(getattr(self.config, "output_attentions", False) if v is None else v)


def _model_forward(self, *args, **kwargs):
    """The model class's forward, with the contracts of the module docstring."""
    forward = type(self).forward.__get__(self)
    kwargs = _bind(self, forward, args, kwargs)
    wants = _wants_weights(self, kwargs)
    unpadded = kwargs.get("attention_mask") is None  # (ALiBi modules: the kernel's ALiBi then)
    with eager_for_this_call(self, wants), alibi_weights_wanted(wants), alibi_unpadded(unpadded):
        if self.__dict__.get("_fasttx_fused_loss") and _logits_free(self, kwargs):
            return _fused_loss_forward(self, forward, kwargs)
        return forward(**kwargs)


def _logits_free(self, kwargs) -> bool:
    """Only while training, with labels, gradients on, and the model's loss still ForCausalLMLoss."""
    return (
        kwargs.get("labels") is not None
        and self.training
        and torch.is_grad_enabled()
        and not self.__dict__.get("_fasttx_keep_logits", False)
        and self.loss_function in (fasttx_causal_lm_loss, _ForCausalLMLoss)
        and isinstance(self.lm_head, nn.Linear)
    )


def _fused_loss_forward(self, forward, kwargs):
    labels = kwargs.get("labels")
    kwargs["labels"] = None
    num_items = kwargs.pop("num_items_in_batch", None)
    ignore_index = kwargs.pop("ignore_index", -100)
    shift_labels = kwargs.pop("shift_labels", None)
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    kwargs["return_dict"] = True

    head = self.lm_head
    with head_inputs(head) as captured:
        out = forward(**kwargs)
    (hidden,) = captured
    softcap = getattr(self.config, "final_logit_softcapping", None)
    loss = _linear_causal_lm_loss(hidden, head, labels, num_items, ignore_index, shift_labels, softcap)
    out = type(out)(loss=loss, **{k: v for k, v in out.items() if k not in ("loss", "logits")})
    return out if return_dict else out.to_tuple()


_FORWARDS = {}


def _model_forward_for(cls) -> Callable:
    """_model_forward under the class forward's name and signature (generate and Trainer inspect
    `model.forward`'s parameters), one function per class."""
    fn = _FORWARDS.get(cls)
    if fn is None:
        @functools.wraps(cls.forward)
        def fn(self, *args, **kwargs):
            return _model_forward(self, *args, **kwargs)

        _FORWARDS[cls] = fn
    return fn


def patch_model_forward(model: nn.Module, keep_logits: bool, swapped: list, left: set) -> None:
    """The model-level forward (every model: the attention-weights contract) and, on causal LMs,
    the loss. Inner models (LlamaForCausalLM's `model`) get the attention-weights contract too: a
    user may call them directly."""
    from transformers import PreTrainedModel

    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            set_forward(m, _model_forward_for(type(m)))
    model.__dict__["_fasttx_keep_logits"] = bool(keep_logits)
    if not is_causal_lm(model):
        return
    model.loss_function = fasttx_causal_lm_loss  # instance-level (PreTrainedModel's setter)
    if not has_op("linear_cross_entropy"):
        left.add(f"{type(model).__name__}'s fused loss (this fasttx has no linear_cross_entropy)")
        return
    why = _probe_loss(model)
    if why is not None:
        left[f"{type(model).__name__} loss"] = why
        return
    model.__dict__["_fasttx_fused_loss"] = True
    softcap = getattr(model.config, "final_logit_softcapping", None)
    swapped.append("causal-LM loss (logits-free" + (", final softcap)" if softcap else ")"))


def _probe_loss(model: nn.Module) -> Optional[str]:
    """The fused loss beside the model's own on 8 tokens (eval, no grad): None when they match.
    Catches heads that scale or bias the logits and models whose forward does not shift the labels
    through ForCausalLMLoss."""
    from .recognition import _close, _probe_inputs

    inputs = _probe_inputs(model)
    if inputs is None:
        return "the model takes no input_ids"
    kwargs = dict(inputs, labels=inputs["input_ids"])
    if "use_cache" in inspect.signature(type(model).forward).parameters:
        kwargs["use_cache"] = False
    states = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            forward = type(model).forward.__get__(model)
            ref = forward(**dict(kwargs)).loss
            ours = _fused_loss_forward(model, forward, dict(kwargs)).loss
    except Exception as exc:
        return f"probe failed ({type(exc).__name__})"
    finally:
        for m, t in states.items():
            m.training = t
    if ref is None or not _close(ours.reshape(()), ref.float().reshape(()), torch.float32, scaled=True):
        return "the model's loss is not ForCausalLMLoss of lm_head's logits"
    return None
