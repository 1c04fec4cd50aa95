"""GPT: a decoder-only transformer (the architecture of GPT-2 and of today's chat models), built from
fasttx's layers, with KV-cache generation.

    config = GPTConfig.preset("gpt2")                 # or GPTConfig(n_layer=4, n_embd=128, ...)
    model = GPT(config)                               # impl="torch": same model from torch.nn only
    logits, loss = model(idx, targets)                # idx, targets (B, T) int64
    out = model.generate(idx, max_new_tokens=100, temperature=0.8, top_k=50)

Layout (pre-LN, as GPT-2):

    h = drop(wte(idx) + pos(t))
    for each block:  h = h + drop(attn(ln_1(h)));  h = h + drop(mlp(ln_2(h)))
    logits = lm_head(ln_f(h))                         # lm_head.weight is wte.weight (tied)

The residual stream runs through `dropout_add_layer_norm`, which returns both LN(h + drop(y)) and
h + drop(y) in one kernel: every "add the sub-layer output, then normalise for the next sub-layer"
step, including the one that crosses from block i to block i+1 (block i+1 opens with it, so that each
block reads only its own parameters, as FSDP's per-block `fully_shard` needs) and the last one (ln_f),
is a single fused op. Parameter names follow nanoGPT's (transformer.h.0.attn.c_attn...).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as TF
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
_POS_ENCODINGS = ("learned", "sinusoidal")
_IMPLS = ("fasttx", "torch")


@dataclass
class GPTConfig:
    vocab_size: int = 50304
    block_size: int = 1024  # longest context (positions 0 .. block_size - 1)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # embedding, attention-probability and residual dropout
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2
    pos_encoding: str = "learned"  # or "sinusoidal" ("Attention Is All You Need", fixed)

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
        if self.pos_encoding not in _POS_ENCODINGS:
            raise ValueError(
                f"GPTConfig: pos_encoding must be one of {_POS_ENCODINGS}, got {self.pos_encoding!r}"
            )

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


# ----------------------------------------------------------------------------------------------
# The two op sets. impl="fasttx" goes through fasttx.functional (Triton kernels on CUDA, torch's
# native ops elsewhere); impl="torch" is the same math written with torch.nn.functional only, for
# `--compare` and the benchmarks. Both are stateless namespaces over the same parameters.
# ----------------------------------------------------------------------------------------------
class _TorchOps:
    layer_norm = staticmethod(TF.layer_norm)
    dropout = staticmethod(TF.dropout)
    scaled_dot_product_attention = staticmethod(TF.scaled_dot_product_attention)

    @staticmethod
    def bias_gelu(x, bias, approximate):
        return TF.gelu(x + bias, approximate=approximate)

    @staticmethod
    def gelu(x, approximate):
        return TF.gelu(x, approximate=approximate)

    @staticmethod
    def dropout_add_layer_norm(x, residual, normalized_shape, weight, bias, eps, p, training):
        h = TF.dropout(x, p, training)
        if residual is not None:
            h = residual + h
        return TF.layer_norm(h, normalized_shape, weight, bias, eps), h


class _FasttxOps:
    layer_norm = staticmethod(FF.layer_norm)
    dropout = staticmethod(FF.dropout)
    scaled_dot_product_attention = staticmethod(FF.scaled_dot_product_attention)
    bias_gelu = staticmethod(FF.bias_gelu)
    dropout_add_layer_norm = staticmethod(FF.dropout_add_layer_norm)

    @staticmethod
    def gelu(x, approximate):
        return FF.gelu(x, approximate)


def _layer_norm_class(impl: str):
    if impl == "torch":
        return nn.LayerNorm
    from ..nn import LayerNorm  # fasttx.nn.LayerNorm: torch's parameters and state_dict keys

    return LayerNorm


def _norm_args(norm: nn.Module):
    return norm.normalized_shape, norm.weight, norm.bias, norm.eps


class KVCache:
    """Per-layer key/value buffers of (B, n_head, block_size, head_dim), so decoding writes one slot
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
    """Multi-head causal self-attention; q, k, v from one (C, 3C) projection."""

    def __init__(self, config: GPTConfig, ops):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self._ops = ops

    def forward(self, x: Tensor, cache: Optional[KVCache] = None, layer: int = 0, start: int = 0) -> Tensor:
        """x (B, T, C). Without a cache: causal attention over x. With one: x holds positions
        start .. start+T-1; its keys/values are appended to the cache and the queries attend to every
        cached position up to their own (a prefill when start == 0, a decode step when T == 1)."""
        B, T, C = x.shape
        hd = C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_head, hd).transpose(1, 2)  # (B, nh, T, hd)
        v = v.view(B, T, self.n_head, hd).transpose(1, 2)  # (B, nh, T, hd)
        if cache is not None:
            k, v = cache.update(layer, k, v, start)  # (B, nh, start+T, hd)
        p = self.dropout if self.training else 0.0
        if T == 1:
            # Decode: the one new query sees every cached position, itself included; no mask.
            y = self._ops.scaled_dot_product_attention(q, k, v, dropout_p=p)
        elif k.shape[2] == T:
            y = self._ops.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            # T > 1 new queries after `start` cached ones: is_causal is top-left aligned, so spell
            # out the bottom-right causal mask (query i sits at position start + i).
            S = k.shape[2]
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)  # (T, S)
            y = self._ops.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C): heads side by side again
        return self.c_proj(y)


class MLP(nn.Module):
    """Linear -> gelu(tanh) -> Linear, the bias add of the first fused into the activation."""

    def __init__(self, config: GPTConfig, ops):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self._ops = ops

    def forward(self, x: Tensor) -> Tensor:
        h = TF.linear(x, self.c_fc.weight)  # (B, T, 4C), bias added inside the fused activation
        if self.c_fc.bias is not None:
            # .to: under autocast h is in the autocast dtype while the bias stays fp32
            h = self._ops.bias_gelu(h, self.c_fc.bias.to(h.dtype), "tanh")
        else:
            h = self._ops.gelu(h, "tanh")
        return self.c_proj(h)


class Block(nn.Module):
    """One pre-LN transformer block. It takes the previous step's sub-layer output `y` and the
    residual stream `h` *not yet added*, and opens with the fused add + dropout + ln_1 of them;
    it returns its MLP's output and its residual stream, again not yet added, for the next block
    (or ln_f) to fuse. So every "add the sub-layer output, then normalise" step is one kernel, and
    each block reads only its own parameters: a block is a self-contained unit for FSDP's
    `fully_shard`, activation checkpointing and tensor-parallel plans."""

    def __init__(self, config: GPTConfig, ops, layer_norm_class):
        super().__init__()
        self.ln_1 = layer_norm_class(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, ops)
        self.ln_2 = layer_norm_class(config.n_embd, bias=config.bias)
        self.mlp = MLP(config, ops)
        self.dropout = config.dropout
        self._ops = ops

    def forward(self, y: Tensor, h: Optional[Tensor], cache=None, layer=0, start=0):
        """y (B, T, C) the previous sub-layer's output (the embeddings for block 0), h (B, T, C)
        the residual stream before it (None for block 0) -> (mlp output, residual stream)."""
        p, training = self.dropout, self.training
        x_norm, h = self._ops.dropout_add_layer_norm(y, h, *_norm_args(self.ln_1), p, training)
        # The sub-layer outputs join the residual stream in its dtype (under autocast they come out
        # of Linear in bf16 while h stays fp32, as torch's own type promotion would keep it).
        y = self.attn(x_norm, cache, layer, start).to(h.dtype)
        y_norm, h = self._ops.dropout_add_layer_norm(y, h, *_norm_args(self.ln_2), p, training)
        return self.mlp(y_norm).to(h.dtype), h


class GPT(nn.Module):
    """Decoder-only transformer language model.

    Args:
        config: a GPTConfig.
        impl: "fasttx" (default) builds it from fasttx's layers and fused ops; "torch" builds the
            same architecture from torch.nn / torch.nn.functional only, with the same parameter
            names and state_dict (a state_dict saved from one loads into the other).

    forward(idx (B, T) int64, targets (B, T) int64 or None) -> (logits (B, T, vocab_size), loss):
    loss is the mean cross-entropy over targets != -1, or None without targets.
    """

    def __init__(self, config: GPTConfig, impl: str = "fasttx"):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT: config must be a GPTConfig, got {type(config).__name__}")
        if impl not in _IMPLS:
            raise ValueError(f"GPT: impl must be one of {_IMPLS}, got {impl!r}")
        self.config = config
        self.impl = impl
        ops = _TorchOps if impl == "torch" else _FasttxOps
        self._ops = ops
        norm = _layer_norm_class(impl)
        if config.pos_encoding == "learned":
            wpe = nn.Embedding(config.block_size, config.n_embd)
        else:
            from ..nn.positional import PositionalEncoding

            # dropout=0: the embedding dropout is applied once, in the fused op that also
            # computes the first LayerNorm.
            wpe = PositionalEncoding(config.n_embd, dropout=0.0, max_len=config.block_size, batch_first=True)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=wpe,
                h=nn.ModuleList([Block(config, ops, norm) for _ in range(config.n_layer)]),
                ln_f=norm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf, 2017): the output projection is the token embedding.
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) (two per block) so the
        # variance of the residual stream does not grow with depth.
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

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
            pos = tr.wpe(torch.arange(start, start + T, dtype=torch.long, device=idx.device))  # (T, C)
        else:
            pos = tr.wpe.encoding(T, start).to(tok.dtype)  # (T, C)
        # h = drop(tok + pos) and ln_1(h) are block 0's first fused op (residual None); each
        # block hands its MLP output and residual stream on; ln_f closes with the last add.
        y, h = tok + pos, None
        for i, block in enumerate(tr.h):
            y, h = block(y, h, cache, i, start)
        x, _ = self._ops.dropout_add_layer_norm(y, h, *_norm_args(tr.ln_f), self.config.dropout, self.training)
        return x  # ln_f(h)

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        self._check_idx(idx)
        x = self._forward_hidden(idx)
        logits = self.lm_head(x)  # (B, T, vocab)
        loss = None
        if targets is not None:
            self._check_idx(targets, "targets")
            if targets.shape != idx.shape:
                raise ValueError(
                    f"GPT: targets must have idx's shape {tuple(idx.shape)}, got {tuple(targets.shape)}"
                )
            # (B*T, vocab) vs (B*T,); -1 marks positions to ignore. Computed in fp32 whatever
            # the logits' dtype, as cross-entropy's logsumexp is a statistic.
            loss = TF.cross_entropy(
                logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1
            )
        return logits, loss

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
