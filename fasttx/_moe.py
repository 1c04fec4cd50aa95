"""fasttx.functional.moe_experts' argument rules and its torch path (no kernel code here).

The torch path is what the "torch" backend and CPU tensors under "auto" run: per-expert
F.linear calls on the pairs sorted by expert, then the same fixed-order combine as the kernels
(the k weighted outputs of a token summed in slot order, in fp32). Eagerly it gathers each
expert's rows (a host synchronisation, as transformers' eager experts do); under torch.compile it
runs every expert on every token and masks by the routing weight (static shapes, no graph break,
E times the FLOPs: it is the readable fallback, not the fast path).

Expert parallel (`expert_ids`, the global ids of the experts the weights hold): pairs routed to an
expert the weights do not hold contribute zero; the result is this shard's share of the sum.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fasttx.kernels._dtypes import FLOATS as _FLOAT

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "clamped_swiglu")
_INDEX = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_OP = "moe_experts"


def _shape(t) -> list:
    return list(t.shape)


def check(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, activation, gate_up_bias,
          down_bias, gate_up_interleaved, transposed, alpha, limit, expert_ids=None) -> None:
    """Raise (TypeError for a wrong type, RuntimeError for a wrong dtype, shape or device, as torch's
    F.linear does, ValueError for an unknown activation) naming the argument and the rule."""
    named = (("hidden_states", hidden_states), ("top_k_index", top_k_index), ("top_k_weights", top_k_weights),
             ("gate_up_proj", gate_up_proj), ("down_proj", down_proj), ("gate_up_bias", gate_up_bias),
             ("down_bias", down_bias))
    for name, t in named:
        if not isinstance(t, Tensor) and not (t is None and name.endswith("bias")):
            raise TypeError(f"{_OP}(): argument '{name}' must be Tensor, not {type(t).__name__}")
    for name, v in (("gate_up_interleaved", gate_up_interleaved), ("transposed", transposed)):
        if not isinstance(v, bool):
            raise TypeError(f"{_OP}(): argument '{name}' must be bool, not {type(v).__name__}")
    for name, v in (("alpha", alpha), ("limit", limit)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{_OP}(): argument '{name}' must be float, not {type(v).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{_OP}(): argument 'activation' must be one of {ACTIVATIONS}, got {activation!r}")
    x = hidden_states
    if x.dim() != 2:
        raise RuntimeError(f"{_OP}: hidden_states must be 2-D (tokens, hidden), got shape {_shape(x)}")
    if x.dtype not in _FLOAT:
        raise RuntimeError(f"{_OP}: hidden_states must be a floating-point tensor, got {x.dtype}")
    T, H = x.shape
    if top_k_index.dtype not in _INDEX:
        raise RuntimeError(f"{_OP}: top_k_index must be an integer tensor, got {top_k_index.dtype}")
    if top_k_index.dim() != 2 or top_k_index.shape[0] != T:
        raise RuntimeError(f"{_OP}: top_k_index must be (tokens, k) = ({T}, k) for hidden_states of shape "
                           f"{_shape(x)}, got shape {_shape(top_k_index)}")
    if top_k_weights.dtype not in _FLOAT:
        raise RuntimeError(f"{_OP}: top_k_weights must be a floating-point tensor, got {top_k_weights.dtype}")
    if top_k_weights.shape != top_k_index.shape:
        raise RuntimeError(f"{_OP}: top_k_weights must have top_k_index's shape {_shape(top_k_index)}, got "
                           f"{_shape(top_k_weights)}")
    for name, w in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        if w.dim() != 3:
            raise RuntimeError(f"{_OP}: {name} must be 3-D (experts, out, in), got shape {_shape(w)}")
        if w.dtype != x.dtype:
            raise RuntimeError(f"{_OP}: {name} must have hidden_states' dtype {x.dtype}, got {w.dtype}")
    E = gate_up_proj.shape[0]
    two_i, h1 = (gate_up_proj.shape[2], gate_up_proj.shape[1]) if transposed else gate_up_proj.shape[1:]
    layout = "(E, H, 2I) (transposed=True)" if transposed else "(E, 2I, H)"
    if h1 != H or two_i % 2:
        raise RuntimeError(f"{_OP}: gate_up_proj must be {layout} with H = {H} and an even 2I, got shape "
                           f"{_shape(gate_up_proj)}")
    want = (E, two_i // 2, H) if transposed else (E, H, two_i // 2)
    if tuple(down_proj.shape) != want:
        raise RuntimeError(f"{_OP}: down_proj must be {'(E, I, H)' if transposed else '(E, H, I)'} = {list(want)} "
                           f"for gate_up_proj of shape {_shape(gate_up_proj)}, got {_shape(down_proj)}")
    for name, b, shape in (("gate_up_bias", gate_up_bias, (E, two_i)), ("down_bias", down_bias, (E, H))):
        if b is not None and (tuple(b.shape) != shape or b.dtype != x.dtype):
            raise RuntimeError(f"{_OP}: {name} must be {list(shape)} of dtype {x.dtype}, got {_shape(b)} {b.dtype}")
    for name, t in named[1:]:
        if t is not None and t.device != x.device:
            raise RuntimeError(f"{_OP}: {name} must be on hidden_states' device {x.device}, got {t.device}")
    if expert_ids is not None:
        if not isinstance(expert_ids, Tensor):
            raise TypeError(f"{_OP}(): argument 'expert_ids' must be Tensor, not {type(expert_ids).__name__}")
        if expert_ids.dtype not in _INDEX or tuple(expert_ids.shape) != (E,):
            raise RuntimeError(f"{_OP}: expert_ids must be an integer tensor of shape [{E}] (one global id per "
                               f"expert of gate_up_proj), got {_shape(expert_ids)} {expert_ids.dtype}")
        if expert_ids.device != x.device:
            raise RuntimeError(f"{_OP}: expert_ids must be on hidden_states' device {x.device}, got "
                               f"{expert_ids.device}")
        check_expert_ids(top_k_index, expert_ids)
        return
    if E == 0 and top_k_index.numel():
        raise IndexError(f"{_OP}: top_k_index selects experts, but gate_up_proj has 0 experts")
    check_index(top_k_index, E)


def check_expert_ids(top_k_index: Tensor, expert_ids: Tensor) -> None:
    """Expert parallel: top_k_index and expert_ids hold global ids >= 0, expert_ids distinct (a
    pair routed to an id absent from expert_ids belongs to another shard: not an error). Host check
    on CPU eagerly (IndexError / RuntimeError), a device-side assertion elsewhere (as check_index)."""
    ids = expert_ids.reshape(-1)
    if ids.numel() > 1:
        s = torch.sort(ids).values
        distinct = (s[1:] != s[:-1]).all()
    else:
        distinct = None
    nonneg_idx = (top_k_index >= 0).all() if top_k_index.numel() else None
    nonneg_ids = (ids >= 0).all() if ids.numel() else None
    if top_k_index.device.type == "cpu" and not torch.compiler.is_compiling():
        if nonneg_idx is not None and not bool(nonneg_idx):
            raise IndexError(f"{_OP}: top_k_index must be >= 0 (global expert ids), got {int(top_k_index.min())}")
        if nonneg_ids is not None and not bool(nonneg_ids):
            raise RuntimeError(f"{_OP}: expert_ids must be >= 0 (global expert ids), got {int(ids.min())}")
        if distinct is not None and not bool(distinct):
            raise RuntimeError(f"{_OP}: expert_ids must be distinct (each global expert held once)")
    else:
        for ok, rule in ((nonneg_idx, "top_k_index must be >= 0"), (nonneg_ids, "expert_ids must be >= 0"),
                         (distinct, "expert_ids must be distinct")):
            if ok is not None:
                torch._assert_async(ok, f"{_OP}: {rule}")


def check_index(top_k_index: Tensor, num_experts: int) -> None:
    """Every index in [0, num_experts). On CPU eagerly, a host check and an IndexError (there is no
    asynchrony to lose); on CUDA and under torch.compile a device-side assertion
    (torch._assert_async: no host synchronisation, the error surfaces at the next sync, as torch's
    own out-of-range indexing on CUDA does)."""
    if top_k_index.numel() == 0:
        return
    if top_k_index.device.type == "cpu" and not torch.compiler.is_compiling():
        lo, hi = int(top_k_index.min()), int(top_k_index.max())
        if lo < 0 or hi >= num_experts:
            raise IndexError(f"{_OP}: top_k_index must be in [0, {num_experts}) (num_experts = gate_up_proj.shape[0]), "
                             f"got values in [{lo}, {hi}]")
    else:
        ok = ((top_k_index >= 0) & (top_k_index < num_experts)).all()
        torch._assert_async(ok, f"{_OP}: top_k_index must be in [0, {num_experts})")


def _act(g: Tensor, u: Tensor, activation: str, alpha: float, limit: float) -> Tensor:
    if activation == "silu":
        return F.silu(g) * u
    if activation in ("gelu", "gelu_tanh"):
        return F.gelu(g, approximate="tanh" if activation == "gelu_tanh" else "none") * u
    g, u = g.clamp(max=limit), u.clamp(-limit, limit)
    return (u + 1) * (g * torch.sigmoid(g * alpha))


def _expert(x, e, w1, w2, b1, b2, activation, alpha, limit, interleaved):
    """y = act(x W1[e]^T + b1[e]) W2[e]^T + b2[e] for rows x of expert e (W1 (E, 2I, H), W2 (E, H, I))."""
    gu = F.linear(x, w1[e], b1[e] if b1 is not None else None)  # (n, 2I)
    g, u = (gu[:, 0::2], gu[:, 1::2]) if interleaved else gu.chunk(2, dim=-1)
    return F.linear(_act(g, u, activation, alpha, limit), w2[e], b2[e] if b2 is not None else None)


def moe_torch(x: Tensor, top_k_index: Tensor, top_k_weights: Tensor, w1: Tensor, w2: Tensor,
              b1: Optional[Tensor], b2: Optional[Tensor], activation: str, alpha: float, limit: float,
              interleaved: bool, transposed: bool, expert_ids: Optional[Tensor] = None) -> Tensor:
    if transposed:
        w1, w2 = w1.transpose(1, 2), w2.transpose(1, 2)  # (E, 2I, H), (E, H, I) views
    T, k = top_k_index.shape
    E = w1.shape[0]
    opts = (activation, alpha, limit, interleaved)
    if torch.compiler.is_compiling():
        acc = x.new_zeros(T, x.shape[1], dtype=torch.float32)
        for e in range(E):
            gid = e if expert_ids is None else expert_ids[e]
            we = (top_k_weights * (top_k_index == gid)).sum(-1, dtype=torch.float32)  # (T,): 0 unless routed to e
            acc = acc + we[:, None] * _expert(x, e, w1, w2, b1, b2, *opts).float()
        return acc.to(x.dtype)
    flat = top_k_index.reshape(-1)
    if expert_ids is not None:  # global id -> local slot, E for the pairs of experts held elsewhere
        from .kernels.moe import local_slots

        flat = local_slots(flat.to(torch.int64), expert_ids)
    order = torch.sort(flat, stable=True).indices  # pairs sorted by expert, ties in pair order
    counts = torch.bincount(flat, minlength=E + 1).tolist()  # host sync (eager torch path only)
    ys, start = [], 0
    for e, n in enumerate(counts[:E]):
        # an expert with no rows still runs (0-row matmuls): every weight gets a (zero) gradient
        pairs = order[start:start + n]
        y = _expert(x[pairs // k], e, w1, w2, b1, b2, *opts)
        ys.append(y.float() * top_k_weights.reshape(-1)[pairs, None].float())
        start += n
    ys.append(x.new_zeros(counts[E], x.shape[1], dtype=torch.float32))  # pairs of absent experts add 0
    y_sorted = torch.cat(ys)
    inv = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=x.device))
    return y_sorted[inv].view(T, k, x.shape[1]).sum(1, dtype=torch.float32).to(x.dtype)
