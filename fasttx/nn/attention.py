"""MultiheadAttention: torch.nn.MultiheadAttention whose attention runs through
fasttx.functional.scaled_dot_product_attention.

This module's name shadows torch.nn.attention inside fasttx.nn, so torch.nn.attention's public API
(sdpa_kernel, SDPBackend, ...) is re-exported here and `fasttx.nn.attention.sdpa_kernel` keeps
working; the sdpa_kernel context only steers torch's own SDPA (the reference path).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import *  # noqa: F401,F403

from .. import functional as FF  # attention and dropout; the projections are torch's linear

__all__ = ["MultiheadAttention"]


class MultiheadAttention(torch.nn.MultiheadAttention):
    """Drop-in for torch.nn.MultiheadAttention: same constructor (embed_dim, num_heads,
    dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False, kdim=None, vdim=None,
    batch_first=False, device=None, dtype=None), parameters (packed `in_proj_weight`, or
    `q/k/v_proj_weight` when kdim/vdim differ from embed_dim), state_dict keys, forward signature,
    return value, mask semantics and errors.

    forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
            average_attn_weights=True, is_causal=False) -> (attn_output, attn_weights | None)

    query (L, N, E) — (N, L, E) with batch_first — or (L, E) unbatched; key (S, N, kdim) and
    value (S, N, vdim) likewise. attn_output has query's layout.
    Masks use torch.nn.MultiheadAttention's polarity, the opposite of SDPA's: a bool True means
    "may NOT attend"; float masks are added to the scores. attn_mask (L, S) or (N*num_heads, L, S);
    key_padding_mask (N, S) (True = padding), (S,) when unbatched.
    is_causal is a hint that attn_mask is the causal mask (attn_mask is then still required, as in
    torch); the causal kernel path is used when no key_padding_mask is given and no weights are
    asked for.

    need_weights=False (what the Transformer layers use) is the fast path: one SDPA call (the
    Triton flash kernel on CUDA), attention dropout through its dropout_p. need_weights=True
    computes softmax(Q K^T / sqrt(d) + mask) explicitly, as torch does, to return the weights: (N, L, S)
    averaged over heads, or (N, num_heads, L, S) with average_attn_weights=False (no N unbatched).
    Fully masked rows give zeros on the fast path and NaN with need_weights=True, as in torch.

    torch's inference fast path (native fused kernels, NestedTensor inputs) is not taken: nested
    tensors raise, as they do on torch's own slow path.
    """

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        if query.is_nested or key.is_nested or value.is_nested:
            raise AssertionError(
                "fasttx.nn.MultiheadAttention does not support NestedTensor inputs; pass padded "
                "tensors with a key_padding_mask instead"
            )
        # torch's own checks, so that bad shapes raise exactly torch's errors.
        is_batched = F._mha_shape_check(
            query, key, value, key_padding_mask, attn_mask, self.num_heads
        )
        # Bool masks become float masks (-inf where True) in query's dtype, with torch's error for
        # other dtypes and its deprecation warning when the two masks' types differ.
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask,
            mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask",
            target_type=query.dtype,
        )
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                "module method `generate_square_subsequent_mask` to create this mask."
            )
        # torch trusts the hint only where SDPA can apply it alone: no padding mask to merge and
        # no weights to return. Otherwise the given attn_mask is what counts.
        causal = is_causal and key_padding_mask is None and not need_weights
        if causal:
            attn_mask = None
        else:
            attn_mask = F._canonical_mask(
                mask=attn_mask,
                mask_name="attn_mask",
                other_type=None,
                other_name="",
                target_type=query.dtype,
                check_other=False,
            )

        # Work batch-first: (N, L, E), (N, S, kdim), (N, S, vdim).
        if not is_batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)  # (1, S)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        out, weights = self._attention(
            query, key, value, key_padding_mask, attn_mask, causal, need_weights,
            average_attn_weights,
        )
        if not is_batched:
            out = out.squeeze(0)  # (L, E)
            if weights is not None:
                weights = weights.squeeze(0)  # (L, S) or (num_heads, L, S)
        elif not self.batch_first:
            out = out.transpose(0, 1)  # (L, N, E)
        return out, weights

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """The input projections: (N, L, E), (N, S, kdim), (N, S, vdim) -> (N, L|S, E) each."""
        E = self.embed_dim
        # The same checks, order and exception types as torch; a wrong key width on the packed
        # path fails inside linear, as in torch.
        if query.size(-1) != E:
            raise AssertionError(
                f"was expecting embedding dimension of {E}, but got {query.size(-1)}"
            )
        if self._qkv_same_embed_dim:
            if key.shape != value.shape:
                raise AssertionError(
                    f"key shape {key.shape} does not match value shape {value.shape}"
                )
            w, b = self.in_proj_weight, self.in_proj_bias
            if query is key and key is value:  # self-attention: one GEMM for q, k and v
                return F.linear(query, w, b).chunk(3, dim=-1)
            w_q, w_k, w_v = w.chunk(3)
        else:
            if key.shape[:2] != value.shape[:2]:
                raise AssertionError(
                    f"key's sequence and batch dims {key.shape[:2]} do not match value's "
                    f"{value.shape[:2]}"
                )
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
            for name, w, t in (("key", w_k, key), ("value", w_v, value)):
                if w.shape != (E, t.size(-1)):
                    raise AssertionError(
                        f"expecting {name} weights shape of {(E, t.size(-1))}, but got {w.shape}"
                    )
            b = self.in_proj_bias
        b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
        return (F.linear(query, w_q, b_q), F.linear(key, w_k, b_k),
                F.linear(value, w_v, b_v))

    def _attention(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor],
        attn_mask: Optional[Tensor],
        causal: bool,
        need_weights: bool,
        average_attn_weights: bool,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """Batch-first core. Masks are float (additive) or None; returns ((N, L, E), weights)."""
        N, L, _ = query.shape
        S = key.size(1)
        H, D = self.num_heads, self.head_dim
        q, k, v = self._project(query, key, value)  # (N, L, E), (N, S, E), (N, S, E)

        # attn_mask to the 4-D form SDPA broadcasts: (1, 1, L, S) or (N, H, L, S).
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (L, S):
                    raise RuntimeError(
                        f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                        f"{(L, S)}."
                    )
                attn_mask = attn_mask.view(1, 1, L, S)
            else:  # 3-D; _mha_shape_check allowed only 2-D and 3-D
                if attn_mask.shape != (N * H, L, S):
                    raise RuntimeError(
                        f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                        f"{(N * H, L, S)}."
                    )
                attn_mask = attn_mask.view(N, H, L, S)

        # add_bias_kv: one learned key/value appended to every sequence (attendable unless masked).
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.expand(N, 1, -1)], dim=1)  # (N, S+1, E)
            v = torch.cat([v, self.bias_v.expand(N, 1, -1)], dim=1)
            attn_mask = _pad_last(attn_mask)
            key_padding_mask = _pad_last(key_padding_mask)
        elif self.bias_k is not None or self.bias_v is not None:
            raise AssertionError("bias_k and bias_v must both be set or both be None")

        q = q.view(N, L, H, D).transpose(1, 2)  # (N, H, L, D)
        k = k.view(N, k.size(1), H, D).transpose(1, 2)  # (N, H, S', D)
        v = v.view(N, v.size(1), H, D).transpose(1, 2)  # (N, H, S', D)

        # add_zero_attn: an all-zero key/value appended after the projections.
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(N, H, 1, D)], dim=2)  # (N, H, S'+1, D)
            v = torch.cat([v, v.new_zeros(N, H, 1, D)], dim=2)
            attn_mask = _pad_last(attn_mask)
            key_padding_mask = _pad_last(key_padding_mask)
        S = k.size(2)

        if key_padding_mask is not None:
            for dim, size in ((0, N), (1, S)):
                if key_padding_mask.shape[dim] != size:
                    raise AssertionError(
                        f"Expected key_padded_mask.shape[{dim}] to be {size}, but got "
                        f"{key_padding_mask.shape[dim]}"
                    )
            kpm = key_padding_mask.view(N, 1, 1, S)
            attn_mask = kpm if attn_mask is None else attn_mask + kpm  # (N, H|1, L|1, S)

        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            # The readable path, to return the weights: softmax(Q K^T / sqrt(D) + mask) V.
            scores = (q * (1.0 / math.sqrt(D))) @ k.transpose(-2, -1)  # (N, H, L, S)
            if attn_mask is not None:
                scores = scores + attn_mask
            weights = torch.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                weights = FF.dropout(weights, dropout_p)  # torch returns the dropped weights too
            out = weights @ v  # (N, H, L, D)
            if average_attn_weights:
                weights = weights.mean(dim=1)  # (N, L, S)
        else:
            out = FF.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=causal
            )  # (N, H, L, D)
            weights = None
        out = out.transpose(1, 2).reshape(N, L, H * D)  # (N, L, E)
        return F.linear(out, self.out_proj.weight, self.out_proj.bias), weights


def _pad_last(mask: Optional[Tensor]) -> Optional[Tensor]:
    """One more (attendable, 0.0) key column on an additive mask."""
    return None if mask is None else F.pad(mask, (0, 1))
