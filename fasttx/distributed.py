"""DTensor sharding rules for fasttx's custom ops (tensor and sequence parallel).

torch.distributed's tensor parallel (`parallelize_module` with ColwiseParallel / RowwiseParallel /
SequenceParallel) hands ops DTensors. DTensor runs an op on each rank's local shard only if it
knows which input placements give which output placements: this module tells it, for every
`torch.ops.fasttx.*` op, through `torch.distributed.tensor.experimental.register_sharding`. DTensor
then redistributes an input whose placement no rule accepts (e.g. all-gathers a norm's input
sharded on the normalised dim) and runs the kernel on the local shards. FSDP2 (`fully_shard`)
and DDP need none of this: they all-gather parameters before the forward, so the ops see plain
tensors.

The rules, per mesh dimension (every op also accepts all-Replicate):
    elementwise (gelu, bias_gelu, bias_relu)            Shard(d) for any d; the bias of a
                                                        Shard(last) input is Shard(0) (ColwiseParallel)
    dropout                                             Replicate (see below)
    layer_norm, dropout_add_layer_norm, softmax         Shard(d) for d outside the normalised dims;
                                                        backward: weight/bias grads Partial (summed
                                                        over ranks when they are read)
    scaled_dot_product_attention                        Shard on batch (0) or heads (1) of
                                                        (B, H, L, E): q, k, v (and mask) alike
    rms_norm, add_rms_norm                              as layer_norm
    swiglu, geglu                                       Shard(d) for any d (gate and up alike); with
                                                        the concatenated (gate | up) input, not its last dim
    apply_rotary_emb                                    q, k sharded on heads, cos/sin replicated
    linear_cross_entropy, linear_log_probs              rows (tokens) sharded with their targets, the
                                                        head replicated; backward: dW, db Partial
    moe_experts                                         tokens Shard(0) (hidden_states, top_k_index,
                                                        top_k_weights), experts replicated; backward:
                                                        weight/bias grads Partial. Expert parallel (with
                                                        expert_ids): weights, biases, expert_ids Shard(0),
                                                        tokens Replicate -> output Partial; backward:
                                                        d hidden, d top_k_weights Partial, weight grads Shard(0)

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

Registration happens when a fasttx op module loads (on a fasttx op's first call) while
torch.distributed.tensor is loaded, as it is in any program that builds DTensors; neither
`import fasttx` nor this module imports torch.distributed. If a program first runs fasttx's ops
on plain tensors and only then imports torch.distributed.tensor, it calls
`fasttx.distributed.register()` once.
"""
from __future__ import annotations

import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch

__all__ = ["register", "registered_ops"]

_registered: set = set()


# ----------------------------------------------------------------------------------------------
# Rules. Each takes the op's arguments (tensors replaced by DTensor's specs: .ndim, .shape;
# None for absent optional tensors) and returns [(output placements, input placements), ...],
# one placement per output and per schema argument (None for non-tensors and absent tensors).
# ----------------------------------------------------------------------------------------------
def _placements():
    from torch.distributed.tensor import Partial, Replicate, Shard

    return Replicate(), Shard, Partial()


def _opt(t, placement):
    return None if t is None else placement


def _norm_dims(t, N: int) -> int:
    """How many trailing dims of t make up the N normalised elements (all of them if none do)."""
    prod = 1
    for k in range(1, t.ndim + 1):
        prod *= t.shape[-k]
        if prod == N:
            return k
    return t.ndim


def _bias_act(x, bias, activation):
    R, S, _ = _placements()
    out = [([R], [R, _opt(bias, R), None])]
    for d in range(x.ndim):
        b = S(0) if d == x.ndim - 1 else R  # a column-sharded input carries its bias slice
        out.append(([S(d)], [S(d), _opt(bias, b), None]))
    return out


def _bias_act_backward(grad, x, bias, activation):
    R, S, P = _placements()
    out = [([R, R], [R, R, _opt(bias, R), None])]
    for d in range(x.ndim):
        last = d == x.ndim - 1
        # dbias sums the rows: a partial sum per rank unless the columns are what is sharded
        db = R if bias is None else (S(0) if last else P)
        out.append(([S(d), db], [S(d), S(d), _opt(bias, S(0) if last else R), None]))
    return out


def _dropout(x, p):
    # Replicate only: the backward op sees nothing of the forward but the seed, so it could not
    # tell which placement the mask was drawn in. A sharded input is all-gathered (said once).
    R, _, _ = _placements()
    if any(not pl.is_replicate() for pl in x.placements):
        _warn_once("dropout", "fasttx dropout on a sharded DTensor: DTensor all-gathers the input "
                   "so that the mask is the single-process mask on every rank")
    return [([R, R], [R, None])]


def _dropout_backward(grad, seed, p):
    R, _, _ = _placements()
    return [([R], [R, R, None])]


def _matching(strategies, spec, index):
    """Only the strategies whose input `index` keeps `spec`'s placement: the backward of an op
    with dropout must mask in the placement its forward masked in (its mask depends on it)."""
    kept = [st for st in strategies if st[1][index] in spec.placements]
    return kept or strategies


def _softmax(x):  # over the last dim
    R, S, _ = _placements()
    return [([R], [R])] + [([S(d)], [S(d)]) for d in range(x.ndim - 1)]


def _softmax_backward(grad, y):
    R, S, _ = _placements()
    return [([R], [R, R])] + [([S(d)], [S(d), S(d)]) for d in range(y.ndim - 1)]


def _row_dims(t, N) -> range:
    """The dims a row-wise op (norm over the trailing N elements) may be sharded on."""
    return range(t.ndim - _norm_dims(t, N))


# The (rows,) statistics of a norm on an input sharded on a row dim are the local rows' statistics:
# labelled Shard(0) (exact for d == 0; for d > 0 only the matching backward reads them).
def _layer_norm_fwd(input, N, weight, bias, eps):
    R, S, _ = _placements()
    out = [([R, R, R], [R, None, _opt(weight, R), _opt(bias, R), None])]
    for d in _row_dims(input, N):
        out.append(([S(d), S(0), S(0)], [S(d), None, _opt(weight, R), _opt(bias, R), None]))
    return out


def _dropout_add_layer_norm_fwd(input, residual, N, weight, bias, eps, p):
    R, S, _ = _placements()
    out = [([R, R, R, R, R], [R, _opt(residual, R), None, _opt(weight, R), _opt(bias, R), None, None])]
    for d in _row_dims(input, N):
        out.append(([S(d), S(d), S(0), S(0), R],
                    [S(d), _opt(residual, S(d)), None, _opt(weight, R), _opt(bias, R), None, None]))
    return out


def _layer_norm_bwd(dy, dh_out, h, N, weight, bias, mean, rstd, seed, p, store_dh, dx_dtype):
    R, S, P = _placements()
    tail = [None, None, None]  # p, store_dh, dx_dtype
    out = [([R, R, R, R], [R, _opt(dh_out, R), R, None, _opt(weight, R), _opt(bias, R), R, R,
                           _opt(seed, R), *tail])]
    for d in _row_dims(h, N):
        outs = [S(d), S(d) if store_dh else R, P if weight is not None else R, P if bias is not None else R]
        ins = [S(d), _opt(dh_out, S(d)), S(d), None, _opt(weight, R), _opt(bias, R), S(0), S(0),
               _opt(seed, R), *tail]
        out.append((outs, ins))
    return _matching(out, mean, 6) if p > 0.0 else out


def _sdpa_fwd(q, k, v, mask, dropout_p, is_causal, scale, fp32_out, *causal_offset):
    # -> (out, lse, seed, out32); out32 is the fp32 output (16-bit inputs under autograd) or empty
    R, S, _ = _placements()
    tail = [None] * (4 + len(causal_offset))  # dropout_p, is_causal, scale, fp32_out[, causal_offset]
    out = [([R, R, R, R], [R, R, R, _opt(mask, R), *tail])]
    for d in (0, 1):  # batch, heads of (B, H, L, E)
        out.append(([S(d), S(d), R, S(d) if fp32_out else R], [S(d), S(d), S(d), _opt(mask, S(d)), *tail]))
    return out


def _sdpa_bwd(dout, q, k, v, mask, out_, lse, seed, dropout_p, is_causal, scale, *causal_offset):
    R, S, _ = _placements()
    tail = [None] * (3 + len(causal_offset))  # dropout_p, is_causal, scale[, causal_offset]
    out = [([R, R, R], [R, R, R, R, _opt(mask, R), R, R, R, *tail])]
    for d in (0, 1):
        out.append(([S(d)] * 3, [S(d)] * 4 + [_opt(mask, S(d)), S(d), S(d), R, *tail]))
    return _matching(out, lse, 6)  # dropout_p is not part of DTensor's cache key: always match


def _add_rms_norm(input, residual, N, weight, eps, cast):
    R, S, _ = _placements()
    out = [([R, R, R], [R, _opt(residual, R), None, _opt(weight, R), None, None])]
    for d in _row_dims(input, N):
        out.append(([S(d), S(d), S(0)], [S(d), _opt(residual, S(d)), None, _opt(weight, R), None, None]))
    return out


def _add_rms_norm_backward(dy, dh_out, h, N, weight, rstd, cast, store_dh, dx_dtype):
    R, S, P = _placements()
    tail = [None, None, None]  # cast, store_dh, dx_dtype
    out = [([R, R, R], [R, _opt(dh_out, R), R, None, _opt(weight, R), R, *tail])]
    for d in _row_dims(h, N):
        outs = [S(d), S(d) if store_dh else R, P if weight is not None else R]
        out.append((outs, [S(d), _opt(dh_out, S(d)), S(d), None, _opt(weight, R), S(0), *tail]))
    return out


def _gated_dims(gate, up):
    # up=None: gate holds (gate | up) side by side on the last dim, which must stay whole
    return range(gate.ndim if up is not None else gate.ndim - 1)


def _gated_act(gate, up, activation):
    R, S, _ = _placements()
    return [([R], [R, _opt(up, R), None])] + [
        ([S(d)], [S(d), _opt(up, S(d)), None]) for d in _gated_dims(gate, up)]


def _gated_act_backward(dy, gate, up, activation):
    R, S, _ = _placements()
    return [([R, R], [R, R, _opt(up, R), None])] + [
        ([S(d), S(d) if up is not None else R], [S(d), S(d), _opt(up, S(d)), None])
        for d in _gated_dims(gate, up)]


def _rotary(q, k, cos, sin, position_ids, interleaved):
    # q, k (B, H, L, D): heads sharded, the cos/sin tables (and position ids) replicated
    R, S, _ = _placements()
    return [([R, R], [R, R, R, R, _opt(position_ids, R), None]),
            ([S(1), S(1)], [S(1), S(1), R, R, _opt(position_ids, R), None])]


def _cross_entropy(logits, target, weight, ignore_index, label_smoothing):
    # logits (M, C) row-wise: rows (the batch) sharded with their targets; the class weight
    # replicated. -> (per-row loss (M,), lse (M,)); the reduction runs outside the op on DTensors.
    R, S, _ = _placements()
    return [([R, R], [R, R, _opt(weight, R), None, None]),
            ([S(0), S(0)], [S(0), S(0), _opt(weight, R), None, None])]


def _cross_entropy_backward(grad, logits, target, weight, lse, ignore_index, label_smoothing):
    R, S, _ = _placements()
    return [([R], [R, R, R, _opt(weight, R), R, None, None]),
            ([S(0)], [S(0), S(0), S(0), _opt(weight, R), S(0), None, None])]


def _linear_cross_entropy(x, w, b, target, weight, ignore_index, label_smoothing):
    # x (M, H) rows sharded (the batch), the LM head w (C, H) and bias replicated -> (loss, lse) (M,)
    R, S, _ = _placements()
    return [([R, R], [R, R, _opt(b, R), R, _opt(weight, R), None, None]),
            ([S(0), S(0)], [S(0), R, _opt(b, R), S(0), _opt(weight, R), None, None])]


def _linear_cross_entropy_backward(grad, x, w, b, target, weight, ignore_index, label_smoothing):
    # dx follows the rows; dw and db sum over rows: a partial sum on each rank (reduced by DTensor)
    R, S, P = _placements()
    db = P if b is not None else R  # an empty stand-in without a bias
    return [([R, R, R], [R, R, R, _opt(b, R), R, _opt(weight, R), None, None]),
            ([S(0), P, db], [S(0), S(0), R, _opt(b, R), S(0), _opt(weight, R), None, None])]


def _linear_log_probs(x, w, b, target, ignore_index, temperature, entropy):
    # as linear_cross_entropy: rows (tokens) sharded with their targets, the head replicated
    # -> (logp (M,), ent (M,) or an empty stand-in)
    R, S, _ = _placements()
    e = S(0) if entropy else R
    return [([R, R], [R, R, _opt(b, R), R, None, None, None]),
            ([S(0), e], [S(0), R, _opt(b, R), S(0), None, None, None])]


def _linear_log_probs_backward(grad_logp, grad_ent, x, w, b, target, ignore_index, temperature, entropy):
    # dx follows the rows; dw and db sum over rows: partial sums (reduced by DTensor)
    R, S, P = _placements()
    db = P if b is not None else R
    return [([R, R, R], [R, _opt(grad_ent, R), R, R, _opt(b, R), R, None, None, None]),
            ([S(0), P, db], [S(0), _opt(grad_ent, S(0)), S(0), R, _opt(b, R), S(0), None, None, None])]


def _heads(t, S):
    """ALiBi slopes (H,) or (B, H) sharded with the heads (their last dim)."""
    return None if t is None else S(t.ndim - 1)


def _flash_fwd(q, k, v, cu_q, k_start, k_len, alibi, dropout_p, scale, causal, left, right, softcap,
               max_q, max_k, fp32_out):
    # fasttx.flash: q (B, H, L, E) (packed: (1, H, total, E)), k/v likewise with Hkv heads: sharded on
    # heads, the sequence tables replicated. -> (out, lse (B, H, L), seed, out32 or empty)
    R, S, _ = _placements()
    tail = [None] * 9
    seq = [_opt(cu_q, R), _opt(k_start, R), _opt(k_len, R)]
    return [([R, R, R, R], [R, R, R, *seq, _opt(alibi, R), *tail]),
            ([S(1), S(1), R, S(1) if fp32_out else R], [S(1), S(1), S(1), *seq, _heads(alibi, S), *tail])]


def _flash_bwd(dout, q, k, v, out_, lse, seed, cu_q, k_start, k_len, alibi, *scalars):
    R, S, _ = _placements()
    tail = [None] * len(scalars)
    seq = [_opt(cu_q, R), _opt(k_start, R), _opt(k_len, R)]
    out = [([R, R, R], [R] * 7 + seq + [_opt(alibi, R), *tail]),
           ([S(1)] * 3, [S(1)] * 6 + [R] + seq + [_heads(alibi, S), *tail])]
    return _matching(out, lse, 5)  # the backward keeps the forward's placement (its dropout mask)


def _flash_kvcache_fwd(q, k, v, cu_q, k_start, k_len, block_table, page_size, alibi, *scalars):
    R, S, _ = _placements()
    tail = [None] * len(scalars)
    seq = [_opt(cu_q, R), R, R, _opt(block_table, R), None]
    return [([R, R], [R, R, R, *seq, _opt(alibi, R), *tail]),
            ([S(1), S(1)], [S(1), S(1), S(1), *seq, _heads(alibi, S), *tail])]


def _moe_experts(x, idx, w, w1, w2, b1, b2, eids, *scalars):
    # Tokens sharded (Shard(0) of hidden_states, top_k_index, top_k_weights) with the experts
    # replicated: each rank runs its tokens. Expert parallel: with expert_ids (the global ids of the
    # weights' experts) sharded like the weights, each rank's local expert_ids say which experts its
    # shard holds; the tokens replicated, each rank runs the pairs routed to its experts and the
    # output is the sum over ranks (Partial). Without expert_ids, expert-sharded weights are
    # all-gathered by DTensor (a rank could not tell which global experts its shard holds).
    R, S, P = _placements()
    tail = [None] * len(scalars)
    out = [([R], [R, R, R, R, R, _opt(b1, R), _opt(b2, R), _opt(eids, R), *tail]),
           ([S(0)], [S(0), S(0), S(0), R, R, _opt(b1, R), _opt(b2, R), _opt(eids, R), *tail])]
    if eids is not None:
        out.append(([P], [R, R, R, S(0), S(0), _opt(b1, S(0)), _opt(b2, S(0)), S(0), *tail]))
    return out


def _moe_experts_backward(dout, x, idx, w, w1, w2, b1, b2, eids, *scalars):
    # token-sharded: d x and d top_k_weights stay sharded, the weight and bias grads are partial sums;
    # expert parallel: d x and d top_k_weights are partial sums (each rank's experts' share), the
    # weight and bias grads sharded as the weights (each rank's experts' own)
    R, S, P = _placements()
    tail = [None] * len(scalars)
    rep = [R, R, R, R, R, R, _opt(b1, R), _opt(b2, R), _opt(eids, R), *tail]
    shard = [S(0), S(0), S(0), S(0), R, R, _opt(b1, R), _opt(b2, R), _opt(eids, R), *tail]
    out = [([R] * 6, rep), ([S(0), S(0), P, P, P if b1 is not None else R, P if b2 is not None else R], shard)]
    if eids is not None:
        ep = [R, R, R, R, S(0), S(0), _opt(b1, S(0)), _opt(b2, S(0)), S(0), *tail]
        out.append(([P, P, S(0), S(0), S(0) if b1 is not None else R, S(0) if b2 is not None else R], ep))
    return out


_RULES: Dict[str, Callable[..., List[Tuple[list, list]]]] = {
    "layer_norm": _layer_norm_fwd,
    "dropout_add_layer_norm": _dropout_add_layer_norm_fwd,
    "layer_norm_backward": _layer_norm_bwd,
    "add_rms_norm": _add_rms_norm,
    "add_rms_norm_backward": _add_rms_norm_backward,
    "gated_act": _gated_act,
    "gated_act_backward": _gated_act_backward,
    "rotary": _rotary,
    "rotary_backward": _rotary,
    "bias_act": _bias_act,
    "bias_act_backward": _bias_act_backward,
    "dropout": _dropout,
    "dropout_backward": _dropout_backward,
    "softmax": _softmax,
    "softmax_backward": _softmax_backward,
    "attention": _sdpa_fwd,
    "attention_backward": _sdpa_bwd,
    "flash_attention": _flash_fwd,
    "flash_attention_backward": _flash_bwd,
    "flash_attention_kvcache": _flash_kvcache_fwd,
    "cross_entropy": _cross_entropy,
    "cross_entropy_backward": _cross_entropy_backward,
    "linear_cross_entropy": _linear_cross_entropy,
    "linear_cross_entropy_backward": _linear_cross_entropy_backward,
    "linear_log_probs": _linear_log_probs,
    "linear_log_probs_backward": _linear_log_probs_backward,
    "moe_experts": _moe_experts,
    "moe_experts_backward": _moe_experts_backward,
}


_warned: set = set()


def _warn_once(key: str, message: str) -> None:
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
    from torch.distributed.tensor.experimental import register_sharding

    new = []
    for name, rule in _RULES.items():
        op = _op(name)
        if name in _registered or op is None:
            continue
        register_sharding(op)(rule)
        _registered.add(name)
        new.append(name)
    missing = [n for n in _defined_fasttx_ops() if n not in _RULES]
    if missing:
        # a new custom op without a rule: DTensor will say "no sharding strategy" for it
        import warnings

        warnings.warn(f"fasttx.distributed: no DTensor sharding rule for fasttx ops {missing}", stacklevel=2)
    return new


def _defined_fasttx_ops() -> List[str]:
    ns = torch.ops.fasttx
    return [n for n in dir(ns) if not n.startswith("_") and _op(n) is not None and n != "name"]


def register_if_dtensor_loaded() -> None:
    """Called by each fasttx.ops module as it loads: register the rules now if DTensor is in use
    (a program that builds DTensors has imported torch.distributed.tensor); never import it."""
    if "torch.distributed.tensor" in sys.modules:
        register()

