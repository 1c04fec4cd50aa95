"""fasttx for HuggingFace transformers models (optional extra `hf`: transformers >= 4.48).

    from transformers import AutoModelForCausalLM
    from fasttx.integrations.huggingface import apply_fasttx

    model = apply_fasttx(AutoModelForCausalLM.from_pretrained("path/to/local/dir"))

`apply_fasttx(model)` patches one model instance in place (no class is modified, parameters and
state_dict unchanged) and returns it. It walks any transformers model and swaps what fasttx
reproduces, each piece only after its fasttx form matched the original on a probe
(recognition.py): norms (every casting order, Gemma's `1 + weight`, bias-free LayerNorm, q/k
norms), activations (GELU erf / tanh forms, squared ReLU), gated MLPs (SiLU / GELU, split or
fused projections), the rotary application inside attention modules of transformers 5's layout, the attention
function (transformers' AttentionInterface entry "fasttx", with softcap and per-layer sliding
windows), the ALiBi attention modules outside that interface (BLOOM, MPT) and the causal-LM
loss (linear_cross_entropy, logits-free; a final logit softcap chunked). torch.nn LayerNorm /
Dropout / GELU become fasttx.nn's through `fasttx.convert`.
Pieces left as transformers has them are named, with the reason, in one warning.

The package, by concern: modules.py (the fasttx forms of norms, activations, gated MLPs),
recognition.py (candidates and probes), attention.py (the attention function and policy, the
rotary attention forward), loss.py (the loss and the model-level forward's contracts), experts.py
(MoE experts through transformers' ExpertsInterface, "fasttx"), posttraining.py (hidden states and
the LM head for log-probs without logits), output_attentions.py (the config flag with "fasttx"),
alibi.py (BLOOM's and MPT's attention modules).

transformers' contracts kept:
  - output_attentions=True (argument or config, also under generate) runs that call on
    transformers' eager attention, so the weights are eager's, for every model and its inner
    models; the config flag may be set after patching (output_attentions.py);
  - an attention implementation chosen explicitly (anything but transformers' automatic sdpa /
    eager) is kept; `apply_fasttx(model, attention=True)` overrides it, `attention=False` keeps
    the model's attention (function and modules) wholly;
  - on causal LMs the logits are skipped only while training with labels and gradients on
    (`outputs.logits` None then); in eval() or under no_grad they come back as transformers
    returns them, with the loss. `keep_logits=True` keeps them always.
"""
from __future__ import annotations

import logging

try:
    import transformers
except ImportError as exc:
    if isinstance(exc, ModuleNotFoundError) and exc.name == "transformers":
        raise ImportError(
            "fasttx.integrations.huggingface needs transformers>=4.48: pip install 'fasttx[hf]'"
        ) from exc
    # transformers is installed but failed to import (a broken or shadowed dependency, a version
    # mismatch): say what failed instead of sending the user to reinstall.
    raise ImportError(
        f"fasttx.integrations.huggingface: importing transformers failed: {type(exc).__name__}: {exc}"
    ) from exc

from torch import nn

from fasttx._convert import convert as _convert_torch_modules

from . import experts  # noqa: F401  (registers "fasttx" in transformers' ExpertsInterface)
from . import alibi as A
from . import modules as M
from . import recognition as R
from .attention import (ATTN_IMPLEMENTATION, attention_policy, fasttx_attention_forward, register,
                        rotary_attention_forward, rotary_fn, rotary_fn_forward, set_attention)
from .loss import fasttx_causal_lm_loss, patch_model_forward
from .posttraining import causal_lm_log_probs, hidden_states_and_head

__all__ = [
    "apply_fasttx", "fasttx_attention_forward", "fasttx_causal_lm_loss", "register", "ATTN_IMPLEMENTATION",
    "fasttx_report", "hidden_states_and_head", "causal_lm_log_probs",
]

logger = logging.getLogger(__name__)


def fasttx_report(model: nn.Module) -> dict:
    """What apply_fasttx swapped in this model and what it left, with why:
    {"swapped": [piece, ...], "left": {piece: reason}}."""
    return model.__dict__.get("_fasttx_report", {"swapped": [], "left": {}})


def _torch_modules(model: nn.Module) -> dict:
    return {id(m): type(m) for m in model.modules()}


_ACT_NAMES = {"gelu_tanh": "gelu tanh"}  # the report's name of an activation kind


def _swap_modules(model: nn.Module, dtype, swapped: set, left: dict) -> None:
    for m in list(model.modules()):
        cls = type(m).__name__
        if M.mlp_layout(m) is not None and M.mlp_act(m) is not None:
            kind, why = R.probe_mlp(m, dtype)
            if kind is None:
                left[f"{cls}"] = why
            else:
                m.__dict__["_fasttx_glu"] = kind
                M.set_forward(m, M.mlp_layout(m))
                swapped.add(f"{cls} ({'swiglu' if kind == 'silu' else 'geglu ' + kind})")
            continue
        if R.is_norm_candidate(m):
            form, why = R.probe_norm(m, dtype)
            if form is not None:
                M.set_forward(m, M.NORM_FORMS[form][0])
                swapped.add(f"{cls} ({form})")
            elif "norm" in cls.lower():
                left[cls] = why
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not R.is_act_candidate(child) or type(child).__module__.startswith("fasttx"):
                continue
            kind, why = R.probe_act(child, dtype)
            new = M.act_module(kind) if kind is not None else None
            if new is not None:
                new.train(child.training)
                setattr(parent, name, new)
                swapped.add(f"{type(child).__name__} ({_ACT_NAMES.get(kind, kind)})")
            elif kind is None and type(child).__module__ == "transformers.activations":
                left[type(child).__name__] = why


def _swap_attention(model: nn.Module, attention, dtype, swapped: set, left: dict) -> None:
    use_fasttx, why_not = attention_policy(model, attention)
    if attention is False:
        left["attention"] = why_not
        return
    candidates = R.rotary_candidates(model)
    alibi_mods = [m for m in model.modules() if A.layout(m) is not None]
    # a rotary candidate whose module-level form fails is tried at its rotary function too (MLA)
    fn_candidates = R.rotary_fn_candidates(model, set(alibi_mods))
    fn_captured = {}
    delegated, matched, captured, failed = R.model_probe(model, use_fasttx, candidates + alibi_mods, fn_candidates,
                                                         fn_captured)
    alibi_swapped = _swap_alibi(alibi_mods, captured, A.capture_unpadded(model, alibi_mods), failed, swapped, left)
    for m in candidates:
        cls = type(m).__name__
        if m not in captured:
            left[f"{cls} rotary"] = failed or "not reached by the probe forward"
            continue
        form, why = R.probe_rotary(m, captured[m])
        if form is None:
            if m not in fn_captured:
                left[f"{cls} rotary"] = why
        else:
            M.set_forward(m, rotary_attention_forward)
            swapped.add(f"{cls} ({form})")
            fn_captured.pop(m, None)
    for m in fn_candidates:
        cls = type(m).__name__
        if m in candidates and m not in fn_captured:
            continue  # swapped above, or left with the module-level reason
        if m not in fn_captured:
            if R.takes_rotary_tables(m):
                left[f"{cls} rotary"] = failed or "its apply_rotary_pos_emb was not reached by the probe forward"
            continue
        form, why = R.probe_rotary_fn(fn_captured[m])
        if form is None:
            left[f"{cls} rotary"] = why
        else:
            single = R.rotary_fn_params(fn_captured[m][0])[:1] == ["tensor"]
            name = fn_captured[m][3]
            m.__dict__["_fasttx_rotary_fn"] = (name, rotary_fn(form, single))
            M.set_forward(m, rotary_fn_forward)
            swapped.add(f"{cls} (rotary({form}) in {name})")
    done = set(candidates) | set(fn_captured)
    for m in model.modules():
        if m not in done and type(m).__name__.endswith("Attention") and R.takes_rotary_tables(m):
            left.setdefault(f"{type(m).__name__} rotary", "its rotary is not a form fasttx reproduces")
    if not use_fasttx:
        if not alibi_swapped:  # (BLOOM, MPT: their attention runs on fasttx through the swapped modules)
            left["attention function"] = why_not
        return
    if failed is not None:
        left["attention function"] = failed
        return
    if not matched:
        left["attention function"] = "the model's output with fasttx attention differs from its own"
        return
    if not set_attention(model):
        left["attention function"] = "transformers refused the implementation"
        return
    for m, why in delegated.items():
        if why is not None:
            left[f"{type(m).__name__} attention"] = why
    names = sorted({type(m).__name__ for m, why in delegated.items() if why is None})
    if names:  # (every call delegated: nothing of the attention runs on fasttx)
        swapped.add(f"attention function ({', '.join(names)})")


def _swap_alibi(mods, captured: dict, unpadded: dict, failed, swapped: set, left: dict) -> bool:
    """ALiBi attention modules outside the AttentionInterface (alibi.py), each after its probe."""
    done = False
    for m in mods:
        cls = type(m).__name__
        if m in captured:
            form, why = A.probe(m, captured[m], unpadded.get(m))
        else:
            form, why = None, failed or "not reached by the probe forward"
        if form is None:
            left[f"{cls} ALiBi attention"] = why
        else:
            M.set_forward(m, A.FORWARDS[form])
            swapped.add(f"{cls} ({form} ALiBi attention)")
            done = True
    return done


def _swap_experts(model: nn.Module, swapped: set, left: dict) -> None:
    """MoE experts: transformers' ExpertsInterface entry "fasttx" (experts.py, issue 25's op)."""
    mods = [m for m in model.modules() if hasattr(type(m), "_apply_gate")]
    if not mods:
        return
    if not experts.set_experts(model):
        left["experts"] = "the model does not dispatch its experts through transformers' ExpertsInterface"
        return
    for m in mods:
        why = experts.unsupported(m)
        if why is None:
            swapped.add(f"{type(m).__name__} (moe_experts)")
        else:
            left[type(m).__name__] = f"{why}: transformers' eager experts"


def apply_fasttx(model: nn.Module, *, keep_logits: bool = False, attention=None) -> nn.Module:
    """Patch a transformers model instance in place to run fasttx's ops; returns the model.

    keep_logits: causal LMs build logits even while training with labels (the loss then comes
        from FF.cross_entropy of them).
    attention: None (default) replaces transformers' automatic attention choice (sdpa, or eager
        where sdpa is unsupported) by "fasttx" and keeps an explicitly chosen one; True replaces
        any; False leaves the model's attention (function and modules) wholly as it is.

    Idempotent. Parameters, buffers and state_dict are unchanged, so a patched model saves and
    loads like the unpatched one. `fasttx_report(model)` lists what was swapped and left.
    """
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(
            "apply_fasttx expects a transformers PreTrainedModel (e.g. BertForSequenceClassification), "
            f"got {type(model).__name__}; for a plain torch.nn model use fasttx.convert(model)"
        )
    if attention not in (None, True, False):
        raise ValueError(f"apply_fasttx: attention must be None, True or False, got {attention!r}")
    register()
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None) or model.dtype
    swapped, left = set(), {}
    before = _torch_modules(model)
    _convert_torch_modules(model)
    for m in model.modules():
        if before.get(id(m)) is not None and before[id(m)] is not type(m):
            swapped.add(f"{before[id(m)].__name__} (fasttx.nn)")
    _swap_modules(model, dtype, swapped, left)
    _swap_attention(model, attention, dtype, swapped, left)
    _swap_experts(model, swapped, left)
    swapped_list = []
    patch_model_forward(model, keep_logits, swapped_list, left)
    swapped.update(swapped_list)
    swapped.update(fasttx_report(model)["swapped"])  # a second call: what the first one swapped stays
    model.__dict__["_fasttx_report"] = {"swapped": sorted(swapped), "left": dict(sorted(left.items()))}
    shown = {k: v for k, v in left.items() if not (k == "attention" and attention is False)}
    if shown:
        logger.warning(
            "apply_fasttx: left as transformers has them: %s", "; ".join(f"{k} ({v})" for k, v in sorted(shown.items()))
        )
    return model
