"""Recognition by behaviour: which modules of a transformers model fasttx reproduces.

Candidates are found by structure (a norm: one 1-D weight, an eps, one input; an activation: no
parameters, one input; a gated MLP: gate/up/down projections and an activation; an attention
module: q/k/v/o projections and rotary tables in its forward; the attention function of the
AttentionInterface), then each candidate form runs beside the original forward on a small probe
and is kept only when the results match: fp32 (atol = rtol = 1e-5) on a copy with random
parameters, then the model's dtype and bf16 (the casting orders differ there; the closest form
within the dtype's tolerance wins). Norms, activations and MLPs are probed once per class (and
attribute signature: eps, shapes) and dtype; attention modules and the attention function on the
inputs they receive in one no-grad forward of the model on 8 tokens. A mismatch leaves the module
as transformers has it, named once in apply_fasttx's warning.
"""
from __future__ import annotations

import copy
import inspect
import sys
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import modules as M
from .attention import (ATTN_IMPLEMENTATION, ROTARY_FNS, ROTARY_FORMS, attention_layout, fasttx_attention_forward,
                        rotary_attention_forward, rotary_fn)
from .attention import _delegate_reason as delegate_reason

_TOL = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-7, 1e-7), torch.float16: (1e-2, 1e-2),
        torch.bfloat16: (2e-2, 2e-2)}

_VERDICTS: Dict[tuple, Tuple[Optional[str], str]] = {}  # probe key -> (form name or None, why not)


def _err(a, b) -> float:
    """max(|a - b| - rtol-free) helper: the max abs difference, inf on a shape or dtype mismatch."""
    if not isinstance(a, Tensor) or not isinstance(b, Tensor) or a.shape != b.shape or a.dtype != b.dtype:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    d = (a.double() - b.double()).abs()
    d = torch.where(torch.isnan(a) & torch.isnan(b), torch.zeros_like(d), d)
    return float(d.max())


def _close(a, b, dtype, scaled: bool = False) -> bool:
    """|a - b| <= rtol |b| + atol (scaled: atol * max|b|, relative to the output's scale, so that
    the tiny outputs of freshly initialised projections cannot pass whatever they hold)."""
    atol, rtol = _TOL.get(dtype, _TOL[torch.float32])
    if _err(a, b) == float("inf"):
        return False
    if a.numel() == 0:
        return True
    b64 = b.double()
    scale = (float(b64.abs().max()) if b64.numel() else 0.0) if scaled else 1.0
    return bool(((a.double() - b64).abs() <= atol * max(scale, 1e-30) + rtol * b64.abs()).all())


def _key(module: nn.Module, dtype) -> tuple:
    simple = tuple(sorted(
        (k, v) for k, v in module.__dict__.items()
        if isinstance(v, (int, float, str, bool, type(None))) and not k.startswith("_") and k != "training"
    ))
    shapes = tuple(sorted((n, None if p is None else tuple(p.shape)) for n, p in module._parameters.items()))
    return (type(module), dtype, simple, shapes)


def _one_input(module: nn.Module) -> bool:
    try:
        params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    required = [p for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(required) == 1


def _randomized(module: nn.Module, dtype=None) -> nn.Module:
    """A copy with random parameters (matrices scaled by 1/sqrt(fan-in)): initial values (ones,
    zeros) can hide a form that differs."""
    c = copy.deepcopy(module)
    if dtype is not None:
        c = c.to(dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in c.parameters():
            r = torch.randn(p.shape, generator=g)
            r = r / p.shape[-1] ** 0.5 if p.dim() > 1 else r * 0.5 + 0.25
            p.copy_(r.to(p.dtype))
    return c


def _original(module: nn.Module, *args, **kwargs):
    return type(module).forward(module, *args, **kwargs)


def _probe_dtypes(dtype) -> List[torch.dtype]:
    return list(dict.fromkeys([torch.float32, dtype, torch.bfloat16]))


# ----------------------------------------------------------------------------------------------
# Norms
# ----------------------------------------------------------------------------------------------
def is_norm_candidate(m: nn.Module) -> bool:
    if type(m).__module__.startswith(("fasttx.", "torch.")):  # torch's run through fasttx.convert
        return False
    if list(m.children()) or M.norm_eps(m) is None or not _one_input(m):
        return False
    if set(m._parameters) - {"weight", "bias"} or m._buffers:
        return False
    w = m._parameters.get("weight")
    return w is None or w.dim() == 1


def probe_norm(m: nn.Module, dtype) -> Tuple[Optional[str], str]:
    key = _key(m, dtype)
    if key in _VERDICTS:
        return _VERDICTS[key]
    w = m._parameters.get("weight")
    H = w.shape[0] if w is not None else 24
    forms = {n: fn for n, (fn, op) in M.NORM_FORMS.items() if M.has_op(op)}
    g = torch.Generator().manual_seed(1)
    x32 = torch.randn(2, 3, H, generator=g) * 2.0 + 0.3
    dev = w.device if w is not None else torch.device("cpu")
    best = None
    try:
        for dt in _probe_dtypes(dtype):
            c = _randomized(m, dt).to(dev)
            x = x32.to(dev, dt)
            with torch.no_grad():
                ref = _original(c, x)
                errs = {n: _err(fn(c, x), ref) for n, fn in forms.items()
                        if _close(fn(c, x), ref, dt)}
            forms = {n: forms[n] for n in errs}
            if not forms:
                break
            best = min(errs, key=errs.get) if dt != torch.float32 else best
        if forms and best is None:
            best = next(iter(forms))
    except Exception as exc:  # a forward that needs more than one tensor, say
        verdict = (None, f"probe failed ({type(exc).__name__})")
    else:
        verdict = (best, "") if forms else (None, "no fasttx norm form matches its forward")
    _VERDICTS[key] = verdict
    return verdict


# ----------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------
def is_act_candidate(m: nn.Module) -> bool:
    if list(m.children()) or m._parameters or m._buffers or not _one_input(m):
        return False
    mod = type(m).__module__
    return mod.startswith("transformers.") or mod == "torch.nn.modules.activation"


def probe_act(m: nn.Module, dtype) -> Tuple[Optional[str], str]:
    key = _key(m, dtype)
    if key in _VERDICTS:
        return _VERDICTS[key]
    g = torch.Generator().manual_seed(2)
    x32 = torch.cat([torch.linspace(-8, 8, 161), torch.linspace(-60, 60, 25), torch.randn(64, generator=g) * 3])
    kinds = dict(M.ACT_FORMS)
    try:
        for dt in _probe_dtypes(dtype):
            x = x32.to(dt)
            with torch.no_grad():
                ref = _original(m, x)
                kinds = {k: fn for k, fn in kinds.items() if _close(fn(x), ref, dt)}
    except Exception as exc:
        verdict = (None, f"probe failed ({type(exc).__name__})")
    else:
        verdict = (next(iter(kinds)), "") if kinds else (None, "no fasttx activation matches it")
    _VERDICTS[key] = verdict
    return verdict


# ----------------------------------------------------------------------------------------------
# Gated MLPs
# ----------------------------------------------------------------------------------------------
def probe_mlp(m: nn.Module, dtype) -> Tuple[Optional[str], str]:
    """(activation kind, why not) for a module with a gated-MLP layout."""
    layout = M.mlp_layout(m)
    act = M.mlp_act(m)
    if layout is None or act is None:
        return None, "not a gated MLP"
    key = _key(m, dtype) + (type(act), _key(act, dtype))
    if key in _VERDICTS:
        return _VERDICTS[key]
    kind, why = probe_act(act, dtype) if is_act_candidate(act) else (None, "its activation is not a module")
    if kind is None:
        verdict = (None, f"activation {type(act).__name__}: {why}")
    elif kind not in ("silu", "gelu", "gelu_tanh"):  # (its activation module is swapped on its own)
        verdict = (None, f"no fused gated form for {kind}")
    elif not M.has_op("swiglu" if kind == "silu" else "geglu"):
        verdict = (None, "this fasttx has no swiglu / geglu")
    else:
        first = layout is M.gated_mlp_split and m.gate_proj or m.gate_up_proj
        g = torch.Generator().manual_seed(3)
        x32 = torch.randn(2, 3, first.in_features, generator=g)
        ok = True
        try:
            for dt in _probe_dtypes(dtype):
                c = _randomized(m, dt)
                c.__dict__["_fasttx_glu"] = kind
                x = x32.to(first.weight.device, dt)
                with torch.no_grad():
                    ok = ok and _close(layout(c, x), _original(c, x), dt, scaled=True)
                del c
        except Exception as exc:
            verdict = (None, f"probe failed ({type(exc).__name__})")
        else:
            verdict = (kind, "") if ok else (None, "the gated form does not match its forward")
    _VERDICTS[key] = verdict
    return verdict


# ----------------------------------------------------------------------------------------------
# The model-level probe: the attention function and the rotary attention modules
# ----------------------------------------------------------------------------------------------
_PROBE_IMPL = "fasttx_probe"


def _probe_inputs(model: nn.Module) -> Optional[dict]:
    """Two rows of 8 tokens, the second right-padded by 2 (so masks matter; no query row is fully
    masked, for causal and bidirectional models alike)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(emb, nn.Embedding) or getattr(model, "main_input_name", "input_ids") != "input_ids":
        return None
    V = emb.num_embeddings
    ids = (torch.arange(16, device=emb.weight.device).reshape(2, 8) * 7 + 3) % V
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _first_tensor(out) -> Optional[Tensor]:
    for v in (out.values() if hasattr(out, "values") else out):
        if isinstance(v, Tensor):
            return v
    return None


def _run(model: nn.Module, inputs: dict):
    kwargs = dict(inputs)
    if "use_cache" in inspect.signature(type(model).forward).parameters:
        kwargs["use_cache"] = False
    with torch.no_grad():
        return _first_tensor(type(model).forward(model, **kwargs))


def model_probe(model: nn.Module, want_attention_fn: bool, rotary_candidates: List[nn.Module],
                fn_candidates: List[nn.Module] = (), fn_captured: Optional[dict] = None):
    """Eval, no-grad forwards on a padded batch of 2 x 8 tokens: the model as it is (capturing the
    inputs of the rotary candidates), then with "fasttx" attention (through a recording alias with
    the same mask builder). Returns (delegated: {module: reason or None} for every module that
    called the attention function, the reason when its calls go to the model's eager attention;
    whether the outputs matched; captured (args, kwargs) per rotary candidate; why the probe could
    not run, or None). fn_captured (filled): {module: (its file's apply_rotary_pos_emb, args, kwargs)}
    for the first call each fn_candidate makes."""
    fn_captured = {} if fn_captured is None else fn_captured
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    inputs = _probe_inputs(model)
    if inputs is None:
        return {}, False, {}, "the model takes no input_ids"
    config = model.config
    original = getattr(config, "_attn_implementation", None)
    delegated: Dict[nn.Module, Optional[str]] = {}
    captured: Dict[nn.Module, tuple] = {}
    calls = []

    def probe_fn(module, query, key, value, attention_mask, **kwargs):
        calls.append(module)
        why = delegate_reason(module, query, key, value, dict(kwargs, _mask=attention_mask))
        if why is not None or module not in delegated:
            delegated[module] = why
        return fasttx_attention_forward(module, query, key, value, attention_mask, **kwargs)

    hooks = []
    for m in rotary_candidates:
        def pre(mod, args, kwargs):
            captured.setdefault(mod, (args, dict(kwargs)))
        hooks.append(m.register_forward_pre_hook(pre, with_kwargs=True))
    # the modeling files' apply_rotary_pos_emb, recorded per calling module (fn_candidates)
    stack: List[nn.Module] = []
    def enter(mod, args):
        stack.append(mod)

    def leave(mod, args, out):  # returns None: the output is kept
        stack.pop()

    for m in fn_candidates:
        hooks.append(m.register_forward_pre_hook(enter))
        hooks.append(m.register_forward_hook(leave))
    files = {sys.modules[type(m).__module__] for m in fn_candidates}
    originals = {(f, name): getattr(f, name) for f in files for name in ROTARY_FNS
                 if callable(getattr(f, name, None))}

    def recorder(name, original):
        def record(*args, **kwargs):
            if stack:
                fn_captured.setdefault(stack[-1], (original, args, dict(kwargs), name))
            return original(*args, **kwargs)
        return record
    states = {m: m.training for m in model.modules()}
    matched = False
    try:
        model.eval()
        # a second apply_fasttx: the class forwards run (an instance forward would swap the recorder out)
        own = {m: m.__dict__.pop("forward") for m in fn_candidates if "forward" in m.__dict__}
        try:
            for (f, name), fn in originals.items():
                setattr(f, name, recorder(name, fn))
            ref = _run(model, inputs)
        finally:
            for (f, name), fn in originals.items():
                setattr(f, name, fn)
            for m, fwd in own.items():
                m.forward = fwd
            for h in hooks:
                h.remove()
        if want_attention_fn:
            AttentionInterface.register(_PROBE_IMPL, probe_fn)
            AttentionMaskInterface.register(_PROBE_IMPL, sdpa_mask)  # what "fasttx" registers
            config._attn_implementation = _PROBE_IMPL
            try:
                ours = _run(model, inputs)
            finally:
                config._attn_implementation = original
            matched = bool(calls) and ref is not None and _close(ours, ref, ref.dtype, scaled=True)
        why = None
    except Exception as exc:
        why = f"the probe forward failed ({type(exc).__name__}: {str(exc)[:80]})"
    finally:
        for m, t in states.items():
            m.training = t
    if want_attention_fn and why is None and not calls:
        why = "no attention call reached the AttentionInterface in the probe"
    return delegated, matched, captured, why


def probe_rotary(m: nn.Module, captured: tuple) -> Tuple[Optional[str], str]:
    """Replays the module's probe inputs through its own forward and each rotary form."""
    args, kwargs = captured
    q_norm = getattr(m, "q_norm", None)
    w = getattr(q_norm, "weight", None)
    per_head = not (isinstance(w, Tensor) and w.numel() != m.head_dim)
    m.__dict__["_fasttx_qk_norm_per_head"] = per_head
    key = (type(m), "rotary")
    failure = None

    def matches(module, ref):  # a form that raises (tables it cannot take) does not match
        nonlocal failure
        try:
            return _close(rotary_attention_forward(module, *args, **dict(kwargs))[0], ref, dtype, scaled=True)
        except Exception as exc:
            failure = failure or f"probe failed ({type(exc).__name__}: {str(exc)[:60]})"
            return False

    try:
        with torch.no_grad():
            ref = _original(m, *args, **kwargs)[0]
            dtype = ref.dtype
            for name, tables in ROTARY_FORMS.items():
                m.__dict__["_fasttx_rotary"] = tables
                if not matches(m, ref):
                    continue
                if key not in _VERDICTS:  # once per class: also with random parameters
                    c = _randomized(m)
                    ok = matches(c, _original(c, *args, **kwargs)[0])
                    _VERDICTS[key] = (name, "") if ok else (None, "its forward computes more than the rotary layout")
                    del c
                if _VERDICTS[key][0] == name:
                    return name, ""
                return _VERDICTS[key][0] and None, _VERDICTS[key][1] or "forms differ between instances"
    except Exception as exc:
        return None, f"probe failed ({type(exc).__name__}: {str(exc)[:60]})"
    return None, failure or "no rotary form matches its forward"


def rotary_fn_candidates(model: nn.Module, exclude) -> List[nn.Module]:
    """Modules whose class forward calls one of their modeling file's rotary functions (ROTARY_FNS)."""
    out = []
    for m in model.modules():
        mod = sys.modules.get(type(m).__module__)
        names = [n for n in ROTARY_FNS if callable(getattr(mod, n, None))]
        if m in exclude or not names:
            continue
        try:
            source = inspect.getsource(type(m).forward)
        except (OSError, TypeError):
            continue
        if any(n + "(" in source for n in names):
            out.append(m)
    return out


def _randn_like(x, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(x.shape, generator=g).to(x.device, x.dtype) if isinstance(x, Tensor) else x


def rotary_fn_params(fn) -> List[str]:
    """Parameter names of a modeling file's apply_rotary_pos_emb (hub-kernel decorated ones are
    modules whose forward is the function)."""
    return list(inspect.signature(fn.forward if isinstance(fn, nn.Module) else fn).parameters)


def _tuple(x) -> tuple:
    return (x,) if isinstance(x, Tensor) else tuple(x)


def probe_rotary_fn(captured: tuple) -> Tuple[Optional[str], str]:
    """(form, why not): the fasttx apply_rotary_pos_emb form that reproduces the recorded call,
    on the recorded tables with the recorded and with random queries/keys."""
    original, args, kwargs = captured[:3]
    try:
        params = rotary_fn_params(original)
    except (TypeError, ValueError):
        return None, "its apply_rotary_pos_emb has no signature"
    single = params[:3] == ["tensor", "sin", "cos"]  # GPT-J
    if not single and params[:4] != ["q", "k", "cos", "sin"]:
        return None, f"its apply_rotary_pos_emb takes ({', '.join(params)})"
    n = 1 if single else 2  # the leading tensors to rotate
    trials = [args, tuple(_randn_like(a, i) for i, a in enumerate(args[:n])) + tuple(args[n:])]
    forms = ("pairs",) if single else ("halves", "interleaved", "half tables", "deinterleaved")
    failure = None
    for form in forms:  # a form that raises (tables it cannot take) does not match; the next is tried
        fn = rotary_fn(form, single)
        ok = True
        try:
            with torch.no_grad():
                for a in trials:
                    ref, ours = _tuple(original(*a, **kwargs)), _tuple(fn(*a, **kwargs))
                    ok = ok and len(ref) == len(ours) and all(
                        _close(o, r, r.dtype, scaled=True) for o, r in zip(ours, ref))
        except Exception as exc:
            ok, failure = False, failure or f"probe failed ({type(exc).__name__}: {str(exc)[:60]})"
        if ok:
            return form, ""
    return None, failure or "no fasttx rotary form matches its apply_rotary_pos_emb"


def takes_rotary_tables(m: nn.Module) -> bool:
    try:
        return "position_embeddings" in inspect.signature(type(m).forward).parameters
    except (TypeError, ValueError):
        return False


def rotary_candidates(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if attention_layout(m)]


__all__ = ["ATTN_IMPLEMENTATION"]
