"""fasttx.functional: drop-ins for torch.nn.functional ops, plus the fused sub-layer ops.

Every public op here has torch.nn.functional's exact signature and semantics, and is declared
once with `@fasttx_op` (fasttx/_registry.py: exports, autocast policy). Each entry is its signature,
its docstring and one call to the one router, `route(name, *arguments)` (fasttx/_registry.py),
which runs the op's contract declared in fasttx/ops/<op>.py:

    args = prepare(*args)                  # fasttx's own argument rules, both paths
    if use_triton(*tensors(*args)):        # backend + device (fasttx/_backend.py)
        if unsupported(*args) is None:     # the kernels cover this call
            return triton(*args)           # torch's checks and exception types, autocast, custom op
        warn_fallback(name, reason)        # one warning per reason, then torch's path
    return torch(*args)                    # torch's own op, which checks its own arguments

so both paths accept the same inputs: a call the kernel cannot serve runs torch's op instead of
failing, and a bad argument raises what torch raises. The ops modules import the Triton kernels
only on the Triton path. fasttx/reference.py is not a path: it is the fp64 oracle the tests check
both paths against.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ._registry import OPS, fasttx_op, load_contracts, route

load_contracts()  # every fasttx/ops/<op>.py declares its ops' contracts as it loads (torch only)


@fasttx_op(autocast="fp32")
def layer_norm(
    input: Tensor,
    normalized_shape: Union[int, List[int], torch.Size],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    """torch.nn.functional.layer_norm. input (*, *normalized_shape)."""
    return route("layer_norm", input, normalized_shape, weight, bias, eps)


@fasttx_op()
def gelu(input: Tensor, approximate: str = "none") -> Tensor:
    """torch.nn.functional.gelu: exact (erf) when approximate="none", else the tanh form."""
    return route("gelu", input, approximate)


@fasttx_op()
def relu(input: Tensor, inplace: bool = False) -> Tensor:
    """torch.nn.functional.relu (torch's own kernel on every path: there is nothing to fuse)."""
    return route("relu", input, inplace)


@fasttx_op()
def relu_squared(input: Tensor) -> Tensor:
    """Squared ReLU, relu(input) ** 2 (Primer's activation; Nemotron's and nanoGPT speedrun MLPs).
    input (*) -> (*), input's dtype and layout; one pass forward and backward on the Triton path
    (fp32 math), torch.square(F.relu(input)) on torch's."""
    return route("relu_squared", input)


@fasttx_op()
def dropout(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
    """torch.nn.functional.dropout. Triton path: Philox mask regenerated in the backward, never
    stored; seeds drawn from torch's generator so torch.manual_seed reproduces a run."""
    return route("dropout", input, p, training, inplace)


@fasttx_op(autocast="fp32")
def softmax(
    input: Tensor,
    dim: Optional[int] = None,
    _stacklevel: int = 3,
    dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """torch.nn.functional.softmax along `dim`, computed in `dtype` when given."""
    return route("softmax", input, dim, _stacklevel, dtype)


@fasttx_op(autocast="lower")
def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention.

    query (N, ..., Hq, L, E), key (N, ..., H, S, E), value (N, ..., H, S, Ev) -> (N, ..., Hq, L, Ev).
    attn_mask: bool (True = attend) or float (added to the scores), broadcastable to (N, Hq, L, S).
    is_causal: top-left aligned causal mask. Fully masked rows give zeros.
    """
    return route("scaled_dot_product_attention", query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


@fasttx_op()
def bias_gelu(input: Tensor, bias: Tensor, approximate: str = "none") -> Tensor:
    """gelu(input + bias) in one pass; bias (hidden,) broadcast over input's last dim."""
    return route("bias_gelu", input, bias, approximate)


@fasttx_op()
def bias_relu(input: Tensor, bias: Tensor) -> Tensor:
    """relu(input + bias) in one pass; bias (hidden,) broadcast over input's last dim."""
    return route("bias_relu", input, bias)


@fasttx_op(autocast="fp32")
def dropout_add_layer_norm(
    input: Tensor,
    residual: Optional[Tensor],
    normalized_shape: Union[int, Sequence[int], torch.Size],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    p: float = 0.0,
    training: bool = True,
) -> Tuple[Tensor, Tensor]:
    """h = residual + dropout(input, p, training); returns (layer_norm(h), h).

    One kernel on the Triton path. The first output is the post-norm sub-layer `LN(x + drop(y))`;
    the second is the updated residual stream that a pre-norm block carries on.
    input, residual (*, hidden); `residual=None` means h = dropout(input).
    Under CUDA autocast it gives the unfused sequence's dtypes: h in the promoted dtype of input
    and residual, layer_norm(h) in fp32 (the norm's autocast policy applies to the norm only).
    """
    return route("dropout_add_layer_norm", input, residual, normalized_shape, weight, bias, eps, p, training)


@fasttx_op(autocast="fp32")
def rms_norm(
    input: Tensor,
    normalized_shape: List[int],
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
) -> Tensor:
    """torch.nn.functional.rms_norm. input (*, *normalized_shape) -> same shape and dtype.

    y = x / sqrt(mean(x^2) + eps) * weight over the trailing normalized_shape dims, computed in
    fp32 (fp64 for fp64) and cast at the end; eps=None is torch.finfo(float32).eps (float64's for
    float64 input), as torch's own op. Past the kernel's hidden-size limit (65536) torch's op runs,
    with one warning."""
    return route("rms_norm", input, normalized_shape, weight, eps)


@fasttx_op()
def offset_rms_norm(
    input: Tensor,
    normalized_shape: List[int],
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
) -> Tensor:
    """Offset RMSNorm, y = x / sqrt(mean(x^2) + eps) * (1 + weight): the gain is stored as its
    offset from 1 (zero-initialised, so weight decay pulls it to 1), as Gemma's GemmaRMSNorm and
    Qwen3-Next's zero-centred RMSNorm. Computed in fp32 (fp64 for fp64) and cast once at the end;
    input (*, *normalized_shape) -> same shape and dtype; eps=None as F.rms_norm. Arguments as
    F.rms_norm's."""
    return route("offset_rms_norm", input, normalized_shape, weight, eps)


@fasttx_op(autocast="fp32")
def add_rms_norm(
    input: Tensor,
    residual: Optional[Tensor],
    normalized_shape: Union[int, Sequence[int], torch.Size],
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
    *,
    cast: str = "torch",
) -> Tuple[Tensor, Tensor]:
    """h = input + residual; returns (rms_norm(h), h): the pre-norm block's fused residual add
    and norm (vLLM's and Liger's fused add-RMSNorm), in one kernel on the Triton path.

    input, residual (*, *normalized_shape), residual None: h = input. h in the promoted dtype of
    input and residual, rounded to it before the norm (as the unfused add). `cast` picks the
    model family's casting order, so a patched model matches its own module in 16-bit too:
      "torch": F.rms_norm(h): fp32 math, `* weight` in fp32, cast to h's dtype;
      "llama": normalize in fp32, cast to h's dtype, then `weight *` (HF Llama, Mistral, Qwen):
               the output takes promote(h, weight)'s dtype;
      "gemma": `* (1 + weight)` in fp32, then cast to h's dtype (HF Gemma).
    eps=None: torch.finfo(float32).eps (float64's for float64), as F.rms_norm."""
    return route("add_rms_norm", input, residual, normalized_shape, weight, eps, cast)


@fasttx_op()
def swiglu(gate: Tensor, up: Optional[Tensor] = None) -> Tensor:
    """SwiGLU's activation, silu(gate) * up (Llama's MLP: down(silu(gate_proj(x)) * up_proj(x))).

    gate, up (*, N) of one dtype -> (*, N); up=None: gate is the concatenated (*, 2N) tensor
    (gate|up) on its last dim (one fused gate_up projection), split in the middle. One pass
    forward and backward on the Triton path, fp32 math, one rounding."""
    return route("swiglu", gate, up)


@fasttx_op()
def geglu(gate: Tensor, up: Optional[Tensor] = None, approximate: str = "none") -> Tensor:
    """GeGLU's activation, gelu(gate, approximate) * up; approximate "none" (erf) or "tanh"
    (Gemma's gelu_pytorch_tanh). Shapes and layouts as swiglu."""
    return route("geglu", gate, up, approximate)


@fasttx_op()
def apply_rotary_emb(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    *,
    position_ids: Optional[Tensor] = None,
    interleaved: bool = False,
    seq_dim: int = -2,
) -> Tuple[Tensor, Tensor]:
    """Rotary position embedding of q and k: (x * cos + rotate(x) * sin for the first R dims,
    the rest unchanged), both in one kernel launch on the Triton path, forward and backward.

    q (B, Hq, L, D) and k (B, Hk, L, D) with seq_dim=-2 (default), or (B, L, H, D) with
    seq_dim=-3; any strides (views into a fused qkv projection run without a copy); Hk may differ
    from Hq (GQA). cos, sin: the model's own tables, so every rope scaling (linear, dynamic,
    llama3, yarn) is honoured: (L, R), (1, L, R) or (B, L, R) — HF's cos/sin as its rotary
    embedding returns them, the full rotary width R (each frequency twice) — or, with
    position_ids (L,) / (B, L), (P, R) tables whose rows the ids select. R = cos.shape[-1] is the
    rotary dim: even, <= D (R < D: partial rotary, as GPT-NeoX and Phi). interleaved=False rotates
    the halves (x_i, x_{i+R/2}) (GPT-NeoX, Llama: HF's rotate_half); True the pairs (x_2i, x_2i+1)
    (GPT-J's rotate_every_two, with cos/sin repeat-interleaved). Math in fp32 (fp64 for fp64),
    outputs in q's/k's dtype; cos and sin take no gradient on the Triton path (tables that
    require one run torch's ops, with a warning)."""
    return route("apply_rotary_emb", q, k, cos, sin, position_ids, interleaved, seq_dim)


@fasttx_op(autocast="fp32")
def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    size_average: Optional[bool] = None,
    ignore_index: int = -100,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """torch.nn.functional.cross_entropy. input (C,), (N, C) or (N, C, d1, ...) logits; target
    class indices (), (N) or (N, d1, ...) (int64), or class probabilities of input's shape.
    Triton path: one row kernel (online logsumexp in fp32, the true-class gradient via expm1),
    per-row losses reduced as torch does; the backward recomputes the softmax from the logits."""
    return route("cross_entropy", input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing)


@fasttx_op()
def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    options=None,
) -> Tensor:
    """torch.nn.functional.linear_cross_entropy (torch 2.13's signature; present here on any
    torch): cross_entropy(linear(input, linear_weight, linear_bias), target, ...) without the
    (N, C) logits, on every path, chunked over rows (the forward keeps per-row losses, the
    backward recomputes each chunk's logits and turns them into their gradient in place;
    the weight gradient accumulates in fp32 across chunks).

    input (H,) or (N, H); linear_weight (C, *out_features, H); linear_bias (C, *out_features);
    target (N, *out_features) class indices or (N, C, *out_features) probabilities; weight (C,).
    ignore_index None means -100 (and must be None for probability targets). `options` (torch's
    LinearCrossEntropyOptions) is accepted for compatibility and ignored: fasttx always chunks.
    """
    return route("linear_cross_entropy", input, linear_weight, target, linear_bias, weight, reduction,
                 ignore_index, label_smoothing, options)


@fasttx_op()
def linear_log_probs(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Per-token log-probabilities of `target` under linear(input, weight, bias) / temperature,
    without the (N, V) logits: log_softmax(F.linear(input, weight, bias) / temperature, -1)
    .gather(-1, target[..., None])[..., 0] (TRL's selective_log_softmax of those logits), and with
    return_entropy=True also the per-token entropy -sum_v p_v log p_v (TRL's entropy_from_logits).

    input (*, H) final hidden states; weight (V, H) the LM head; bias (V,) or None; target (*)
    integer token ids. Returns logp (*) (and ent (*)) in fp32 (fp64 for fp64 inputs); both are 0
    where target == ignore_index, with zero gradient there. Differentiable in input, weight and
    bias for any upstream gradient on either output. Chunked over rows (and the vocabulary inside
    the row kernel) as linear_cross_entropy is: the forward keeps (N,) vectors only, the backward
    recomputes each chunk's logits; fp32 accumulation, no atomics (deterministic)."""
    return route("linear_log_probs", input, weight, target, bias, temperature, ignore_index, return_entropy)


@fasttx_op()
def linear_jsd(
    student_input: Tensor,
    student_weight: Tensor,
    teacher_input: Tensor,
    teacher_weight: Tensor,
    target: Optional[Tensor] = None,
    *,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    num_items_in_batch=None,
) -> Tensor:
    """Generalised Jensen-Shannon divergence between the student's and the teacher's next-token
    distributions, softmax(linear(input, weight, bias) / temperature) of each, without the logits
    of either (TRL's GKDTrainer.generalized_jsd_loss on those logits): beta = 0 is KL(teacher ||
    student) (forward KL), beta = 1 is KL(student || teacher) (reverse KL), in between
    beta KL(teacher || mix) + (1 - beta) KL(student || mix), mix = (1 - beta) student + beta teacher.

    student_input (*, Hs), student_weight (V, Hs); teacher_input (*, Ht), teacher_weight (V, Ht)
    (the same vocabulary; the hidden sizes and dtypes may differ); target (*) labels or None:
    tokens where target == ignore_index are left out. reduction: 'batchmean' (sum / kept tokens,
    or / input.shape[0] without target, as TRL), 'sum', 'mean' (sum / (kept tokens * V), as TRL's
    mean over the (tokens, V) elements), 'none' (per token, (*), 0 where ignored: the vocabulary
    summed); num_items_in_batch: sum / num_items_in_batch (gradient accumulation), as TRL.
    Result in fp32 (fp64 for fp64 inputs). Gradients reach the student; a teacher tensor that
    requires grad gets its exact gradient too (run the teacher under torch.no_grad() or freeze its
    head to skip that work). Chunked over rows on every backend (fasttx/ops/distill.py)."""
    return route("linear_jsd", student_input, student_weight, teacher_input, teacher_weight, target,
                 student_bias, teacher_bias, beta, temperature, ignore_index, reduction, num_items_in_batch)


@fasttx_op()
def linear_kl_div(
    student_input: Tensor,
    student_weight: Tensor,
    teacher_input: Tensor,
    teacher_weight: Tensor,
    target: Optional[Tensor] = None,
    *,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    num_items_in_batch=None,
) -> Tensor:
    """KL(teacher || student) per token, the distillation loss of F.kl_div(student_log_probs,
    teacher_log_probs, log_target=True) summed over the vocabulary (named after F.kl_div, whose
    argument roles it keeps: the student is the input, the teacher the target), without the logits
    of either model. Exactly linear_jsd(..., beta=0); reverse KL is linear_jsd(..., beta=1).
    Arguments, reductions and gradients as linear_jsd."""
    return route("linear_kl_div", student_input, student_weight, teacher_input, teacher_weight, target,
                 student_bias, teacher_bias, temperature, ignore_index, reduction, num_items_in_batch)


# ----------------------------------------------------------------------------------------------
# Mixture-of-experts MLP (fasttx's own; its argument rules: the contract in fasttx/ops/moe.py, both backends)
# ----------------------------------------------------------------------------------------------
@fasttx_op(autocast="lower")
def moe_experts(
    hidden_states: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    gate_up_proj: Tensor,
    down_proj: Tensor,
    *,
    activation: str = "silu",
    gate_up_bias: Optional[Tensor] = None,
    down_bias: Optional[Tensor] = None,
    gate_up_interleaved: bool = False,
    transposed: bool = False,
    alpha: float = 1.702,
    limit: float = 7.0,
    expert_ids: Optional[Tensor] = None,
) -> Tensor:
    """The routed experts of a mixture-of-experts MLP (transformers' experts layout):

        out[t] = sum_j top_k_weights[t, j] * down[e](act(gate[e] x_t, up[e] x_t)),  e = top_k_index[t, j]

    hidden_states (T, H); top_k_index (T, k) integer in [0, E); top_k_weights (T, k);
    gate_up_proj (E, 2I, H), rows [gate; up] (gate_up_interleaved: gate0, up0, gate1, up1, ...);
    down_proj (E, H, I); transposed=True: gate_up_proj (E, H, 2I) and down_proj (E, I, H) (gpt-oss);
    gate_up_bias (E, 2I), down_bias (E, H) (added before the routing weight). activation: "silu"
    (silu(g) u), "gelu", "gelu_tanh" (gelu(g) u), "clamped_swiglu" (gpt-oss:
    (clamp(u, -limit, limit) + 1) * gc * sigmoid(alpha gc), gc = min(g, limit)). Returns (T, H).
    Gradients flow to hidden_states, top_k_weights (the router) and every weight and bias.
    expert_ids (E,) integer (expert parallel; default None = arange(E)): the global ids of the
    experts the weights hold (slot i is expert expert_ids[i]); top_k_index then holds global ids and
    pairs routed to experts not in expert_ids contribute zero, so the sum of the outputs over shards
    that split the experts is the full result. With DTensors, weights, biases and expert_ids
    Shard(0) and the rest Replicate run expert parallel (the rule beside the op, fasttx/ops/moe.py).
    Triton path: grouped GEMMs over the pairs sorted by expert, no host synchronisation
    (kernels/moe/); torch path: per-expert F.linear (fasttx/_moe.py)."""
    return route("moe_experts", hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, activation,
                 gate_up_bias, down_bias, gate_up_interleaved, transposed, alpha, limit, expert_ids)


__all__ = list(OPS)


def __getattr__(name: str):
    # Every other torch.nn.functional name is torch's own, so `import fasttx.functional as FF`
    # can stand in for `import torch.nn.functional as F` (and fasttx.nn.functional is this module).
    try:
        return getattr(F, name)
    except AttributeError:
        raise AttributeError(f"module 'fasttx.functional' has no attribute {name!r}") from None
