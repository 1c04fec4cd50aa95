"""GPT: a decoder-only transformer (the architecture of GPT-2 and of today's chat models), built from
fasttx's layers, with KV-cache generation.

    config = GPTConfig.preset("gpt2")                 # or GPTConfig(n_layer=4, n_embd=128, ...)
    model = GPT(config)                               # its torch-built twin: the same model under
                                                      # fasttx.use_backend("torch")
    logits, loss = model(idx, targets)                # idx, targets (B, T) int64
    out = model.generate(idx, max_new_tokens=100, temperature=0.8, top_k=50)
    GPTConfig.llama(n_layer=4, n_head=8, n_kv_head=2, n_embd=256, vocab_size=...)   # Llama-style

Layout (pre-LN, as GPT-2):

    h = drop(wte(idx) + pos(t))
    for each block:  h = h + drop(attn(ln_1(h)));  h = h + drop(mlp(ln_2(h)))
    logits = lm_head(ln_f(h))                         # lm_head.weight is wte.weight (tied)

A residual stream: the stream is carried between blocks as a pair (h, y) that stands for
h + drop(y), y being the last sub-layer's output not yet added. Each block applies its own norms:
its first step is `ln_1(h + drop(y))` and the new h, from `FF.dropout_add_layer_norm` (one fused
kernel on the Triton path); after attention the same for ln_2; it hands on (h, mlp output). The
embeddings enter as (None, wte + wpe) and ln_f closes the stream the same way, so every
"add, drop, normalise" is one op (2 * n_layer + 1 per forward). Parameter names follow nanoGPT's
(transformer.h.0.attn.c_attn...).

Llama-style options (each on its own; `GPTConfig.llama(...)` sets them all): norm="rmsnorm"
(RMSNorm, the add fused by `FF.add_rms_norm`), pos_encoding="rotary" (rotary embeddings on q and k,
no position table), mlp="swiglu" (c_fc projects to gate|up, `FF.swiglu`), n_kv_head < n_head
(grouped-query attention: c_attn projects to n_head + 2 * n_kv_head heads, the KV cache holds
n_kv_head), tie_weights=False (lm_head has its own weight), bias=False.

The model has one implementation; the path its ops take (Triton kernels on CUDA, torch's own ops
elsewhere) is chosen by `fasttx.use_backend`: its torch-built twin is the same model under
`use_backend("torch")`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional as FF

__all__ = ["GPT", "GPTConfig"]

# GPT-2's four published sizes (Radford et al., 2019). vocab_size is GPT-2's real 50257 so the
# presets can hold GPT-2's weights; the dataclass default 50304 (a multiple of 64) is the faster
# padded size for training from scratch.
_PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}
_POS_ENCODINGS = ("learned", "sinusoidal", "rotary")
_NORMS = ("layernorm", "rmsnorm")
_MLPS = ("gelu", "swiglu")
# The options that make the model Llama-style (Touvron et al., 2023): GPTConfig.llama(...)
LLAMA_STYLE = dict(norm="rmsnorm", pos_encoding="rotary", mlp="swiglu", bias=False, tie_weights=False)


@dataclass
class GPTConfig:
    vocab_size: int = 50304
    block_size: int = 1024  # longest context (positions 0 .. block_size - 1)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # embedding, attention-probability and residual dropout
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2
    pos_encoding: str = "learned"  # or "sinusoidal" ("Attention Is All You Need", fixed) or "rotary"
    norm: str = "layernorm"  # or "rmsnorm"
    mlp: str = "gelu"  # gelu(tanh) MLP of width 4 * n_embd, or "swiglu": silu(gate) * up
    n_kv_head: Optional[int] = None  # key/value heads (grouped-query attention); None: n_head
    tie_weights: bool = True  # lm_head.weight is wte.weight
    mlp_hidden: Optional[int] = None  # MLP width; None: 4 * n_embd (gelu), or 2/3 of it rounded
    #                                   up to a multiple of 32 (swiglu: the same parameter count)
    rope_theta: float = 10000.0  # rotary base
    norm_eps: float = 1e-5
    # Mixture of experts: n_experts > 0 makes every moe_every-th block's MLP (blocks moe_every - 1,
    # 2 moe_every - 1, ...) a fasttx.nn.MoE of n_experts gated experts of width `hidden`, moe_top_k
    # per token (silu experts for mlp="swiglu", tanh-GELU gated ones for "gelu"); the training loss
    # adds moe_aux_loss_coef * the load-balancing loss and moe_z_loss_coef * the router z-loss.
    n_experts: int = 0
    moe_top_k: int = 2
    moe_every: int = 1
    moe_aux_loss_coef: float = 0.01
    moe_z_loss_coef: float = 0.0

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPTConfig: {name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig: dropout must be in [0, 1), got {self.dropout}")
        for name, allowed in (("pos_encoding", _POS_ENCODINGS), ("norm", _NORMS), ("mlp", _MLPS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"GPTConfig: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("n_kv_head", "mlp_hidden"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"GPTConfig: {name} must be a positive int or None, got {value!r}")
        if self.n_head % self.kv_heads != 0:
            raise ValueError(
                f"GPTConfig: n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})"
            )
        if self.pos_encoding == "rotary" and self.head_dim % 2 != 0:
            raise ValueError(f"GPTConfig: rotary needs an even head size, got n_embd / n_head = {self.head_dim}")
        for name in ("n_experts", "moe_top_k", "moe_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "n_experts" else 1):
                raise ValueError(f"GPTConfig: {name} must be a {'non-negative' if name == 'n_experts' else 'positive'} "
                                 f"int, got {value!r}")
        if self.n_experts and self.moe_top_k > self.n_experts:
            raise ValueError(f"GPTConfig: moe_top_k ({self.moe_top_k}) must be at most n_experts ({self.n_experts})")
        if not self.rope_theta > 0 or not self.norm_eps > 0:
            raise ValueError(
                f"GPTConfig: rope_theta and norm_eps must be positive, got {self.rope_theta}, {self.norm_eps}"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def hidden(self) -> int:
        """The MLP's inner width."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp == "swiglu":  # three matrices instead of two: 2/3 the width, as Llama
            return -(-(8 * self.n_embd // 3) // 32) * 32
        return 4 * self.n_embd

    @classmethod
    def llama(cls, **fields_) -> "GPTConfig":
        """A Llama-style config: RMSNorm, rotary, SwiGLU, no biases, untied head (LLAMA_STYLE); any
        field can be set, e.g. llama(n_layer=4, n_head=8, n_kv_head=2, n_embd=256)."""
        return cls(**{**LLAMA_STYLE, **fields_})

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        """GPT-2's sizes: "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl" (vocab 50257, context 1024,
        biases on); any field can be overridden, e.g. preset("gpt2", dropout=0.1)."""
        if name not in _PRESETS:
            raise ValueError(f"GPTConfig.preset: name must be one of {sorted(_PRESETS)}, got {name!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"GPTConfig.preset: unknown field(s) {unknown}; fields are {sorted(known)}")
        return cls(**{"vocab_size": 50257, "block_size": 1024, "bias": True, **_PRESETS[name], **overrides})


def _make_norm(config: GPTConfig) -> nn.Module:
    # fasttx.nn's modules: torch.nn's parameters and state_dict keys
    if config.norm == "rmsnorm":
        from ..nn import RMSNorm

        return RMSNorm(config.n_embd, eps=config.norm_eps)
    from ..nn import LayerNorm

    return LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def _add_norm(norm: nn.Module, y: Tensor, h: Optional[Tensor], p: float, training: bool) -> Tuple[Tensor, Tensor]:
    """h' = h + drop(y) (h None: drop(y)) -> (norm(h'), h'), one fused op. RMSNorm's fused add has
    no dropout: with dropout on, that is a separate op first."""
    if isinstance(norm, nn.LayerNorm):
        return FF.dropout_add_layer_norm(y, h, norm.normalized_shape, norm.weight, norm.bias, norm.eps, p, training)
    if p > 0 and training:
        y = FF.dropout(y, p, True)
    return FF.add_rms_norm(y, h, norm.normalized_shape, norm.weight, norm.eps)


def rotary_tables(block_size: int, head_dim: int, theta: float = 10000.0) -> Tuple[Tensor, Tensor]:
    """cos, sin (block_size, head_dim) fp32 of the half-rotation (NeoX/Llama) rotary embedding:
    angle[t, i] = t * theta^(-2i / head_dim) for i < head_dim / 2, repeated for the second half.
    Computed in fp64 and cast once, so late positions are as exact as fp32 allows."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (hd/2,)
    angle = torch.arange(block_size, dtype=torch.float64)[:, None] * inv_freq  # (T, hd/2)
    angle = torch.cat((angle, angle), dim=-1)  # (T, hd)
    return angle.cos().float(), angle.sin().float()


class KVCache:
    """Per-layer key/value buffers of (B, n_kv_head, block_size, head_dim), so decoding writes one slot
    per step instead of re-concatenating the whole history. Each layer's buffers are allocated at
    its first update, in the dtype of its keys (under autocast that is the autocast dtype, not the
    parameters'). `length` positions (0 .. length-1) are valid."""

    def __init__(self, n_layer: int, block_size: int):
        self.block_size = block_size
        self.k: List[Optional[Tensor]] = [None] * n_layer
        self.v: List[Optional[Tensor]] = [None] * n_layer
        self.length = 0

    def update(self, layer: int, k: Tensor, v: Tensor, start: int) -> Tuple[Tensor, Tensor]:
        """Store k, v (B, nh, T, hd) at positions start .. start+T-1; return the keys and values of
        positions 0 .. start+T-1 as views (B, nh, start+T, hd)."""
        if self.k[layer] is None:
            B, nh, _, hd = k.shape
            self.k[layer] = k.new_empty(B, nh, self.block_size, hd)  # (B, nh, block_size, hd)
            self.v[layer] = v.new_empty(B, nh, self.block_size, v.shape[-1])
        end = start + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; q, k, v from one projection (C -> (nh + 2 * n_kv) * hd;
    3C without grouped-query attention), rotary embeddings on q and k when configured."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv, self.hd = config.n_head, config.kv_heads, config.head_dim
        self.dropout = config.dropout
        qkv = (config.n_head + 2 * config.kv_heads) * config.head_dim
        self.c_attn = nn.Linear(config.n_embd, qkv, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.rotary = config.pos_encoding == "rotary"
        if self.rotary:
            cos, sin = rotary_tables(config.block_size, config.head_dim, config.rope_theta)
            # non-persistent: a pure function of the config, not in the state_dict
            self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, hd)
            self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: Tensor, cache: Optional[KVCache] = None, layer: int = 0, start: int = 0) -> Tensor:
        """x (B, T, C). Without a cache: causal attention over x. With one: x holds positions
        start .. start+T-1; its keys/values are appended to the cache and the queries attend to every
        cached position up to their own (a prefill when start == 0, a decode step when T == 1)."""
        B, T, C = x.shape
        nh, nkv, hd = self.n_head, self.n_kv, self.hd
        q, k, v = self.c_attn(x).split([nh * hd, nkv * hd, nkv * hd], dim=2)
        q = q.view(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, nkv, hd).transpose(1, 2)  # (B, n_kv, T, hd)
        v = v.view(B, T, nkv, hd).transpose(1, 2)  # (B, n_kv, T, hd)
        if self.rotary:  # at the absolute positions start .. start+T-1, before k enters the cache
            cos = self.rope_cos[start: start + T].to(q.dtype)  # (T, hd)
            sin = self.rope_sin[start: start + T].to(q.dtype)
            q, k = FF.apply_rotary_emb(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v, start)  # (B, n_kv, start+T, hd)
        p = self.dropout if self.training else 0.0
        gqa = nkv != nh
        if T == 1:
            # Decode: the one new query sees every cached position, itself included; no mask.
            y = FF.scaled_dot_product_attention(q, k, v, dropout_p=p, enable_gqa=gqa)
        elif k.shape[2] == T:
            y = FF.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, enable_gqa=gqa)
        else:
            # T > 1 new queries after `start` cached ones: is_causal is top-left aligned, so spell
            # out the bottom-right causal mask (query i sits at position start + i).
            S = k.shape[2]
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)  # (T, S)
            y = FF.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C): heads side by side again
        return self.c_proj(y)


class MLP(nn.Module):
    """Linear -> gelu(tanh) -> Linear, the bias add of the first fused into the activation; or,
    mlp="swiglu", Linear to (gate|up) -> silu(gate) * up -> Linear."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        width = 2 * config.hidden if self.swiglu else config.hidden
        self.c_fc = nn.Linear(config.n_embd, width, bias=config.bias)
        self.c_proj = nn.Linear(config.hidden, config.n_embd, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.swiglu:
            return self.c_proj(FF.swiglu(self.c_fc(x)))  # (B, T, 2H) -> (B, T, H) -> (B, T, C)
        h = F.linear(x, self.c_fc.weight)  # (B, T, 4C), bias added inside the fused activation
        if self.c_fc.bias is not None:
            # .to: under autocast h is in the autocast dtype while the bias stays fp32
            h = FF.bias_gelu(h, self.c_fc.bias.to(h.dtype), "tanh")
        else:
            h = FF.gelu(h, "tanh")
        return self.c_proj(h)


class Block(nn.Module):
    """One pre-LN transformer block on the residual stream (h, y) = h + drop(y) (module docstring):
    it normalises its own input with ln_1 and its attention's with ln_2, each in the fused op that
    also adds the pending sub-layer output to h, and returns (h, mlp output)."""

    def __init__(self, config: GPTConfig, moe: bool = False):
        super().__init__()
        self.ln_1 = _make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = _make_norm(config)
        if moe:
            from ..nn.moe import MoE

            act = "silu" if config.mlp == "swiglu" else "gelu_tanh"
            self.mlp = MoE(config.n_embd, config.hidden, config.n_experts, config.moe_top_k, activation=act)
        else:
            self.mlp = MLP(config)
        self.dropout = config.dropout

    def forward(self, h: Optional[Tensor], y: Tensor, cache: Optional[KVCache] = None, layer: int = 0,
                start: int = 0) -> Tuple[Tensor, Tensor]:
        """(h, y), both (B, T, C), the stream h + drop(y); h None: the stream is drop(y) (the
        embeddings) -> (h', y') for the next block, y' the MLP output (B, T, C)."""
        p, training = self.dropout, self.training
        x, h = _add_norm(self.ln_1, y, h, p, training)
        # The sub-layer outputs join the residual stream in its dtype (under autocast they come out
        # of Linear in bf16 while h stays fp32, as torch's own type promotion would keep it).
        y = self.attn(x, cache, layer, start).to(h.dtype)
        x, h = _add_norm(self.ln_2, y, h, p, training)
        return h, self.mlp(x).to(h.dtype)


class GPT(nn.Module):
    """Decoder-only transformer language model.

    Args:
        config: a GPTConfig.

    Its ops go through fasttx.functional, so `fasttx.use_backend` picks their path: Triton kernels
    for CUDA tensors under "auto", torch's own ops under "torch" (the torch-built twin).

    forward(idx (B, T) int64, targets (B, T) int64 or None, *, return_logits=False) -> (logits, loss):
      - without targets: (logits (B, T, vocab_size), None);
      - with targets: (None, loss), loss the mean cross-entropy over targets != -1, computed by
        `FF.linear_cross_entropy` from the final hidden states and lm_head.weight in row chunks,
        so the (B, T, vocab_size) logits (and their gradient) never exist in memory;
      - with targets and return_logits=True: (logits, loss), the logits computed once and the
        loss from them (the memory saving is then gone: ask for logits only when you need them).
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT: config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        wpe = None  # rotary: positions enter in the attention
        if config.pos_encoding == "learned":
            wpe = nn.Embedding(config.block_size, config.n_embd)
        elif config.pos_encoding == "sinusoidal":
            from ..nn.positional import PositionalEncoding

            # dropout=0: the embedding dropout is applied once, in the fused op of the first
            # block's ln_1.
            wpe = PositionalEncoding(config.n_embd, dropout=0.0, max_len=config.block_size, batch_first=True)
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if wpe is not None:
            modules["wpe"] = wpe
        every = config.moe_every
        modules["h"] = nn.ModuleList([Block(config, moe=config.n_experts > 0 and i % every == every - 1)
                                      for i in range(config.n_layer)])
        modules["ln_f"] = _make_norm(config)
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            # Weight tying (Press & Wolf, 2017): the output projection is the token embedding.
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) (two per block) so the
        # variance of the residual stream does not grow with depth.
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight") or name.endswith("mlp.down_proj"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
            elif name.endswith("mlp.gate_up_proj"):
                nn.init.normal_(param, mean=0.0, std=0.02)

    def moe_loss(self) -> Optional[Tensor]:
        """moe_aux_loss_coef * load-balancing + moe_z_loss_coef * z-loss of the last forward's MoE
        blocks (None without any)."""
        losses = [self.config.moe_aux_loss_coef * b.mlp.aux_loss + self.config.moe_z_loss_coef * b.mlp.z_loss
                  for b in self.transformer.h if getattr(b.mlp, "aux_loss", None) is not None]
        return torch.stack(losses).sum() if losses else None

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (tied weights counted once); without the position embedding by default,
        as the token embedding is also the output layer."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.config.pos_encoding == "learned":
            n -= self.transformer.wpe.weight.numel()
        return n

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas=(0.9, 0.95),
                             device_type: Optional[str] = None) -> torch.optim.AdamW:
        """AdamW with weight decay on the matrices (Linear and embedding weights) only; biases and
        LayerNorm parameters are not decayed."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        device_type = device_type or next(self.parameters()).device.type
        extra = {"fused": True} if device_type == "cuda" else {}
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)

    # ------------------------------------------------------------------------------------------
    def _check_idx(self, idx: Tensor, what: str = "idx") -> None:
        if not isinstance(idx, Tensor) or idx.dtype != torch.long or idx.dim() != 2:
            got = f"{idx.dtype} tensor of shape {tuple(idx.shape)}" if isinstance(idx, Tensor) else type(idx).__name__
            raise ValueError(f"GPT: {what} must be an int64 tensor of shape (B, T), got {got}")

    def _check_range(self, idx: Tensor, targets: Optional[Tensor] = None) -> None:
        """Token ids in [0, vocab_size) (targets may also be -1, ignored), else an IndexError that
        names the ids, instead of torch's bare "index out of range in self" (or, on CUDA, a
        device-side assert that ends the process). One min/max per tensor and one host read; skipped
        while torch.compile traces and while a CUDA graph is captured (no host reads there)."""
        if torch.compiler.is_compiling() or (idx.is_cuda and torch.cuda.is_current_stream_capturing()):
            return
        V = self.config.vocab_size
        checks = [(name, t, low) for name, t, low in (("idx", idx, 0), ("targets", targets, -1))
                  if t is not None and t.numel() > 0]
        if not checks:
            return
        bounds = torch.stack([torch.stack(torch.aminmax(t)) for _, t, _ in checks]).tolist()  # one sync
        for (name, t, low), (lo, hi) in zip(checks, bounds):
            if lo < low or hi >= V:
                bad = t[(t < low) | (t >= V)].unique()
                shown = ", ".join(str(i) for i in bad[:8].tolist()) + (", ..." if bad.numel() > 8 else "")
                allowed = f"0 .. {V - 1}" + (" or -1 (ignored)" if low < 0 else "")
                raise IndexError(
                    f"GPT: {name} holds token ids out of range for vocab_size {V} (allowed: {allowed}): {shown}"
                )

    def _forward_hidden(self, idx: Tensor, cache: Optional[KVCache] = None, start: int = 0) -> Tensor:
        """idx (B, T) at positions start .. start+T-1 -> ln_f(h) (B, T, C)."""
        T = idx.shape[1]
        if start + T > self.config.block_size:
            raise ValueError(
                f"GPT: cannot run a sequence of length {start + T}, block_size is {self.config.block_size}"
            )
        tr = self.transformer
        tok = tr.wte(idx)  # (B, T, C)
        if self.config.pos_encoding == "learned":
            y = tok + tr.wpe(torch.arange(start, start + T, dtype=torch.long, device=idx.device))  # (T, C)
        elif self.config.pos_encoding == "sinusoidal":
            y = tok + tr.wpe.encoding(T, start).to(tok.dtype)  # (T, C)
        else:
            y = tok  # rotary: positions are applied to q and k
        h = None  # the residual stream h + drop(y): the embeddings, not yet dropped
        for i, block in enumerate(tr.h):
            h, y = block(h, y, cache, i, start)
        x, _ = _add_norm(tr.ln_f, y, h, self.config.dropout, self.training)
        return x  # ln_f(h)

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None, *,
                return_logits: bool = False) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        self._check_idx(idx)
        if targets is not None:
            self._check_idx(targets, "targets")
            if targets.shape != idx.shape:
                raise ValueError(
                    f"GPT: targets must have idx's shape {tuple(idx.shape)}, got {tuple(targets.shape)}"
                )
        self._check_range(idx, targets)
        x = self._forward_hidden(idx)  # (B, T, C)
        if targets is None:
            return self.lm_head(x), None  # (B, T, vocab)
        if return_logits:
            logits = self.lm_head(x)  # (B, T, vocab)
            # (B*T, vocab) vs (B*T,); -1 marks positions to ignore. In fp32 whatever the logits'
            # dtype, as cross-entropy's logsumexp is a statistic.
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                                   ignore_index=-1)
            return logits, self._add_moe_loss(loss)
        # (B*T, C) hidden states, (vocab, C) head weight, (B*T,) targets: no logits in memory.
        # The loss is returned in fp32 (the op accumulates in fp32; a 16-bit model rounds it).
        loss = FF.linear_cross_entropy(x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1),
                                       ignore_index=-1)
        return None, self._add_moe_loss(loss.float())

    def _add_moe_loss(self, loss: Tensor) -> Tensor:
        extra = self.moe_loss() if self.config.n_experts else None
        return loss if extra is None else loss + extra

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, use_cache: bool = True) -> Tensor:
        """Autoregressive sampling: idx (B, T) int64 -> (B, T + max_new_tokens).

        temperature: logits are divided by it; 0 means greedy (argmax). top_k: sample only among
        the k most likely tokens. Sampling draws from torch's generator (torch.manual_seed
        reproduces it).

        use_cache=True keeps a KV cache: one prefill over the prompt (causal attention), then one
        decode step per token whose single query attends to the cached keys (the attention decode
        path). Once the sequence outgrows block_size the context is cropped to its last block_size
        tokens; every token's absolute position then shifts by one each step, so no cached key
        stays valid and each such step recomputes the window in full. The result is therefore
        exactly what use_cache=False (recompute the whole cropped sequence every step) gives, up
        to floating-point summation order.
        """
        self._check_idx(idx)
        if idx.shape[1] == 0:
            raise ValueError("GPT.generate: idx must hold at least one token per row, got T=0")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"GPT.generate: max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        if temperature < 0 or math.isnan(temperature):
            raise ValueError(f"GPT.generate: temperature must be >= 0 (0 = greedy), got {temperature}")
        if top_k is not None and (not isinstance(top_k, int) or top_k <= 0):
            raise ValueError(f"GPT.generate: top_k must be a positive int or None, got {top_k!r}")
        self._check_range(idx)  # the prompt only: sampled tokens are in range by construction

        block = self.config.block_size
        cache: Optional[KVCache] = None
        pending = idx[:, -1:]  # (B, 1): the newest token, not yet in the cache
        for _ in range(max_new_tokens):
            if not use_cache:
                x = self._forward_hidden(idx[:, -block:])[:, -1:]  # (B, 1, C)
            elif cache is not None and cache.length < block:
                # Decode step: one new token at position cache.length.
                x = self._forward_hidden(pending, cache, cache.length)
                cache.length += 1
            else:
                # Prefill (first step, or after the window shifted): the whole cropped context.
                ctx = idx[:, -block:]
                if cache is None:
                    cache = KVCache(self.config.n_layer, block)
                x = self._forward_hidden(ctx, cache, 0)[:, -1:]  # (B, 1, C)
                cache.length = ctx.shape[1]
            logits = self.lm_head(x)[:, -1, :].float()  # (B, vocab)
            nxt = self._sample(logits, temperature, top_k)  # (B, 1)
            idx = torch.cat((idx, nxt), dim=1)
            pending = nxt
        return idx

    @staticmethod
    def _sample(logits: Tensor, temperature: float, top_k: Optional[int]) -> Tensor:
        """logits (B, vocab) fp32 -> next tokens (B, 1) int64."""
        if temperature == 0:
            return logits.argmax(dim=-1, keepdim=True)
        logits = logits / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, num_samples=1)
