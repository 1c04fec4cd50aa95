"""Transformer, TransformerEncoder(Layer), TransformerDecoder(Layer): torch.nn's modules with the
sub-layers routed through fasttx's fused ops.

Each class subclasses its torch.nn counterpart and lets torch's __init__ build it (so the
constructor, defaults, submodule names, parameter initialisation and state_dict keys are torch's),
then re-classes the attention, LayerNorm and Dropout submodules as ours (see `_adopt`). The
forwards compute what torch's compute, in fewer kernels:

    post-norm (norm_first=False)               pre-norm (norm_first=True)
    x = LN1(x + drop(SA(x)))                   x = x + drop(SA(LN1(x)))
    x = LN2(x + drop(FF(x)))                   x = x + drop(FF(LN2(x)))
    FF(x) = linear2(drop(act(linear1(x))))

  - `LN(x + drop(y))` is one dropout_add_layer_norm; pre-norm uses its second output, the updated
    residual `x + drop(y)`, together with the next sub-layer's LN of it;
  - `act(linear1(x))` is a bias-free GEMM followed by bias_relu / bias_gelu (linear1's bias added in
    the activation kernel), for activation relu or gelu; a custom callable, or bias=False, takes
    the plain path;
  - attention is MultiheadAttention's SDPA path (need_weights=False).

torch's inference fast path (native fused kernels, NestedTensor) is not taken. Its one visible
effect is reproduced: TransformerEncoder, when torch would convert to NestedTensor (eval, no
autograd, left-aligned src_key_padding_mask, ... see `_nested_padding_zeroed`), returns zeros at
padded positions (before the final norm), as torch does.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import functional as FF

__all__ = [
    "Transformer",
    "TransformerEncoder",
    "TransformerDecoder",
    "TransformerEncoderLayer",
    "TransformerDecoderLayer",
]

def _adopt(module: torch.nn.Module) -> torch.nn.Module:
    """Re-class, in place, every submodule of `module` (itself included) whose type is exactly one
    of the torch.nn classes we override (fasttx.nn.TORCH_TO_FASTTX). Ours subclass torch's and
    add no state, so each module keeps its parameters, buffers, hooks, device, dtype and training
    mode as they are. Subclasses of torch's (user code) are left alone."""
    from . import TORCH_TO_FASTTX  # the package, once all its modules are loaded

    for m in module.modules():
        ours = TORCH_TO_FASTTX.get(type(m))
        if ours is not None:
            m.__class__ = ours
    return module


def _mark_converted(module: torch.nn.Module) -> torch.nn.Module:
    """Make every fasttx.nn module inside `module` print as `fasttx.<Name>(...)` (what
    fasttx.convert swapped shows in `print(model)`; a module built from fasttx.nn directly keeps
    torch's repr, as a drop-in should)."""
    from . import TORCH_TO_FASTTX

    ours = tuple(TORCH_TO_FASTTX.values())
    for m in module.modules():
        if type(m) in ours:
            m._get_name = _fasttx_name.__get__(m)
    return module


def _fasttx_name(self) -> str:
    return f"fasttx.{type(self).__name__}"


# ----------------------------------------------------------------------------------------------
# Sub-layer helpers shared by the encoder and decoder layers
# ----------------------------------------------------------------------------------------------
def _drop(module: torch.nn.Module) -> Tuple[float, bool]:
    """(p, training) of a Dropout submodule (its own mode, as torch's layers use it)."""
    return module.p, module.training


def _add_norm(y: Tensor, x: Tensor, dropout: torch.nn.Module, norm: torch.nn.LayerNorm):
    """(norm(x + dropout(y)), x + dropout(y)) in one fused kernel."""
    p, training = _drop(dropout)
    return FF.dropout_add_layer_norm(
        y, x, norm.normalized_shape, norm.weight, norm.bias, norm.eps, p, training
    )


def _norm(x: Tensor, norm: torch.nn.LayerNorm) -> Tensor:
    return FF.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _activation_kind(activation) -> Optional[Tuple[str, str]]:
    """("relu", _) or ("gelu", approximate) when `activation` is one we fuse with linear1's bias,
    else None (a custom callable runs as given)."""
    if activation in (F.relu, FF.relu) or isinstance(activation, torch.nn.ReLU):
        return "relu", "none"
    if activation in (F.gelu, FF.gelu):
        return "gelu", "none"
    if isinstance(activation, torch.nn.GELU):
        return "gelu", activation.approximate
    return None


def _feed_forward(layer: torch.nn.Module, x: Tensor) -> Tensor:
    """linear2(dropout(activation(linear1(x)))), linear1's bias fused into the activation."""
    kind = _activation_kind(layer.activation)
    b1 = layer.linear1.bias
    if kind is not None and b1 is not None:
        h = F.linear(x, layer.linear1.weight)  # (*, dim_feedforward), bias not yet added
        h = FF.bias_relu(h, b1) if kind[0] == "relu" else FF.bias_gelu(h, b1, kind[1])
    else:
        h = layer.activation(layer.linear1(x))
    p, training = _drop(layer.dropout)
    return layer.linear2(FF.dropout(h, p, training))


def _self_attention(attn: torch.nn.Module, x: Tensor, mask, key_padding_mask, is_causal) -> Tensor:
    return attn(
        x, x, x, attn_mask=mask, key_padding_mask=key_padding_mask, need_weights=False,
        is_causal=is_causal,
    )[0]


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------
class TransformerEncoderLayer(torch.nn.TransformerEncoderLayer):
    """Drop-in for torch.nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=2048,
    dropout=0.1, activation=relu, layer_norm_eps=1e-5, batch_first=False, norm_first=False,
    bias=True, device=None, dtype=None): self_attn, linear1, dropout, linear2, norm1, norm2,
    dropout1, dropout2, activation, as in torch.

    forward(src, src_mask=None, src_key_padding_mask=None, is_causal=False) -> (S, N, E), or
    (N, S, E) with batch_first, or (S, E) unbatched. Masks as torch.nn.MultiheadAttention's
    (bool True = masked out, float added); is_causal is a hint that src_mask is causal.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: Union[str, Callable[[Tensor], Tensor]] = F.relu,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, batch_first,
            norm_first, bias, device=device, dtype=dtype,
        )
        _adopt(self)

    def forward(
        self,
        src: Tensor,
        src_mask: Optional[Tensor] = None,
        src_key_padding_mask: Optional[Tensor] = None,
        is_causal: bool = False,
    ) -> Tensor:
        # torch's mask canonicalisation (bool -> -inf float, its errors and type-mismatch warning)
        src_key_padding_mask = F._canonical_mask(
            mask=src_key_padding_mask,
            mask_name="src_key_padding_mask",
            other_type=F._none_or_dtype(src_mask),
            other_name="src_mask",
            target_type=src.dtype,
        )
        src_mask = F._canonical_mask(
            mask=src_mask,
            mask_name="src_mask",
            other_type=None,
            other_name="",
            target_type=src.dtype,
            check_other=False,
        )
        x = src
        if self.norm_first:
            a = _self_attention(self.self_attn, _norm(x, self.norm1), src_mask,
                                src_key_padding_mask, is_causal)
            y, x = _add_norm(a, x, self.dropout1, self.norm2)  # y = LN2(x), x = x + drop(SA)
            p, training = _drop(self.dropout2)
            return x + FF.dropout(_feed_forward(self, y), p, training)
        a = _self_attention(self.self_attn, x, src_mask, src_key_padding_mask, is_causal)
        x = _add_norm(a, x, self.dropout1, self.norm1)[0]
        return _add_norm(_feed_forward(self, x), x, self.dropout2, self.norm2)[0]


class TransformerDecoderLayer(torch.nn.TransformerDecoderLayer):
    """Drop-in for torch.nn.TransformerDecoderLayer (same constructor and defaults as the encoder
    layer): self_attn, multihead_attn, linear1, dropout, linear2, norm1..3, dropout1..3, as in
    torch.

    forward(tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
            memory_key_padding_mask=None, tgt_is_causal=False, memory_is_causal=False)
    tgt (T, N, E) / memory (S, N, E) — batch-first or unbatched likewise — -> tgt's shape.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: Union[str, Callable[[Tensor], Tensor]] = F.relu,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, batch_first,
            norm_first, bias, device=device, dtype=dtype,
        )
        _adopt(self)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Optional[Tensor] = None,
        memory_mask: Optional[Tensor] = None,
        tgt_key_padding_mask: Optional[Tensor] = None,
        memory_key_padding_mask: Optional[Tensor] = None,
        tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
    ) -> Tensor:
        x = tgt

        def cross_attention(q: Tensor) -> Tensor:
            return self.multihead_attn(
                q, memory, memory, attn_mask=memory_mask,
                key_padding_mask=memory_key_padding_mask, is_causal=memory_is_causal,
                need_weights=False,
            )[0]

        if self.norm_first:
            a = _self_attention(self.self_attn, _norm(x, self.norm1), tgt_mask,
                                tgt_key_padding_mask, tgt_is_causal)
            y, x = _add_norm(a, x, self.dropout1, self.norm2)  # y = LN2(x), x = x + drop(SA)
            y, x = _add_norm(cross_attention(y), x, self.dropout2, self.norm3)
            p, training = _drop(self.dropout3)
            return x + FF.dropout(_feed_forward(self, y), p, training)
        a = _self_attention(self.self_attn, x, tgt_mask, tgt_key_padding_mask, tgt_is_causal)
        x = _add_norm(a, x, self.dropout1, self.norm1)[0]
        x = _add_norm(cross_attention(x), x, self.dropout2, self.norm2)[0]
        return _add_norm(_feed_forward(self, x), x, self.dropout3, self.norm3)[0]


# ----------------------------------------------------------------------------------------------
# Stacks
# ----------------------------------------------------------------------------------------------
def _is_causal_mask(mask: Optional[Tensor], is_causal: Optional[bool], size: Optional[int]) -> bool:
    """torch's rule: an explicit is_causal wins; with is_causal=None, a mask equal to
    generate_square_subsequent_mask(size) counts as causal."""
    if is_causal is not None or mask is None:
        return is_causal is True
    sz = mask.size(-2) if size is None else size
    causal = Transformer.generate_square_subsequent_mask(sz, device=mask.device, dtype=mask.dtype)
    return mask.size() == causal.size() and bool((mask == causal).all())


def _seq_len(x: Tensor, batch_first: bool) -> int:
    if x.dim() == 2:
        return x.size(0)
    return x.size(1 if batch_first else 0)


class TransformerEncoder(torch.nn.TransformerEncoder):
    """Drop-in for torch.nn.TransformerEncoder(encoder_layer, num_layers, norm=None,
    enable_nested_tensor=True, mask_check=True): `layers` holds num_layers deep copies of
    encoder_layer (torch.nn layers among the copies are re-classed as ours; encoder_layer itself
    and `norm` are used as given).

    forward(src, mask=None, src_key_padding_mask=None, is_causal=None) -> src's shape.
    is_causal=None detects a causal `mask` as torch does. With enable_nested_tensor, in the cases
    where torch runs on a NestedTensor, padded positions come out as zeros (then `norm`), as in
    torch; elsewhere they hold the layer outputs, as in torch.
    """

    def __init__(
        self,
        encoder_layer: torch.nn.TransformerEncoderLayer,
        num_layers: int,
        norm: Optional[torch.nn.Module] = None,
        enable_nested_tensor: bool = True,
        mask_check: bool = True,
    ) -> None:
        super().__init__(encoder_layer, num_layers, norm, enable_nested_tensor, mask_check)
        _adopt(self.layers)

    def forward(
        self,
        src: Tensor,
        mask: Optional[Tensor] = None,
        src_key_padding_mask: Optional[Tensor] = None,
        is_causal: Optional[bool] = None,
    ) -> Tensor:
        src_key_padding_mask = F._canonical_mask(
            mask=src_key_padding_mask,
            mask_name="src_key_padding_mask",
            other_type=F._none_or_dtype(mask),
            other_name="mask",
            target_type=src.dtype,
        )
        mask = F._canonical_mask(
            mask=mask,
            mask_name="mask",
            other_type=None,
            other_name="",
            target_type=src.dtype,
            check_other=False,
        )
        batch_first = self.layers[0].self_attn.batch_first
        is_causal = _is_causal_mask(mask, is_causal, _seq_len(src, batch_first))
        zero_padding = self._nested_padding_zeroed(src, mask, src_key_padding_mask)

        output = src
        for layer in self.layers:
            output = layer(
                output, src_mask=mask, is_causal=is_causal,
                src_key_padding_mask=src_key_padding_mask,
            )
        if zero_padding:
            pad = src_key_padding_mask != 0  # (N, S): True at padding (canonical mask is -inf)
            output = output.masked_fill(pad.unsqueeze(-1), 0.0)
        if self.norm is not None:
            output = self.norm(output)
        return output

    def _nested_padding_zeroed(self, src: Tensor, mask, src_key_padding_mask) -> bool:
        """Whether torch.nn.TransformerEncoder would run this call on a NestedTensor (which drops
        the padded positions and pads the result back with zeros). Mirrors the conditions in
        torch's forward that do not depend on the device."""
        if src_key_padding_mask is None or mask is not None or src.dim() != 3:
            return False
        if not torch.backends.mha.get_fastpath_enabled():
            return False
        if not getattr(self, "use_nested_tensor", False):
            return False
        first = self.layers[0]
        if first.training or src.is_nested or torch.is_autocast_enabled():
            return False
        if getattr(self, "mask_check", True):
            if torch.compiler.is_compiling():
                return False
            keep = src_key_padding_mask.logical_not()  # (N, S): True at real tokens
            if not torch._nested_tensor_from_mask_left_aligned(src, keep):
                return False
        tensors = (
            src, first.self_attn.in_proj_weight, first.self_attn.in_proj_bias,
            first.self_attn.out_proj.weight, first.self_attn.out_proj.bias,
            first.norm1.weight, first.norm1.bias, first.norm2.weight, first.norm2.bias,
            first.linear1.weight, first.linear1.bias, first.linear2.weight, first.linear2.bias,
        )
        return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


class TransformerDecoder(torch.nn.TransformerDecoder):
    """Drop-in for torch.nn.TransformerDecoder(decoder_layer, num_layers, norm=None): `layers`
    holds num_layers deep copies of decoder_layer (torch.nn layers among the copies re-classed as
    ours). forward(tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
    memory_key_padding_mask=None, tgt_is_causal=None, memory_is_causal=False) is torch's own:
    it only chains the layers and the final norm."""

    def __init__(
        self,
        decoder_layer: torch.nn.TransformerDecoderLayer,
        num_layers: int,
        norm: Optional[torch.nn.Module] = None,
    ) -> None:
        super().__init__(decoder_layer, num_layers, norm)
        _adopt(self.layers)


class Transformer(torch.nn.Transformer):
    """Drop-in for torch.nn.Transformer(d_model=512, nhead=8, num_encoder_layers=6,
    num_decoder_layers=6, dim_feedforward=2048, dropout=0.1, activation=relu, custom_encoder=None,
    custom_decoder=None, layer_norm_eps=1e-5, batch_first=False, norm_first=False, bias=True,
    device=None, dtype=None). The encoder and decoder it builds are ours (custom ones are used as
    given); forward and the static generate_square_subsequent_mask(sz, device, dtype) are torch's.
    """

    def __init__(
        self,
        d_model: int = 512,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: Union[str, Callable[[Tensor], Tensor]] = F.relu,
        custom_encoder: Optional[Any] = None,
        custom_decoder: Optional[Any] = None,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout,
            activation, custom_encoder, custom_decoder, layer_norm_eps, batch_first, norm_first,
            bias, device=device, dtype=dtype,
        )
        if custom_encoder is None:
            _adopt(self.encoder)
        if custom_decoder is None:
            _adopt(self.decoder)
