"""Sinusoidal positional encoding, as in "Attention Is All You Need" (Vaswani et al., 2017, sec. 3.5).

    PE[pos, 2i]   = sin(pos / 10000^(2i / d_model))
    PE[pos, 2i+1] = cos(pos / 10000^(2i / d_model))

torch.nn has no such module; this one follows the layout conventions of torch.nn.Transformer
(`batch_first=False` by default).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import functional as FF

__all__ = ["PositionalEncoding", "sinusoidal_table"]


def sinusoidal_table(max_len: int, d_model: int, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """The (max_len, d_model) table PE above. Computed in float64 and cast once, so long positions
    (pos ~ 5000, where fp32 `pos * freq` loses digits) are as accurate as the output dtype allows.
    An odd d_model has ceil(d/2) sine columns and floor(d/2) cosine columns."""
    pos = torch.arange(max_len, dtype=torch.float64, device=device).unsqueeze(1)  # (L, 1)
    freq = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float64, device=device) * (-math.log(10000.0) / d_model)
    )  # (ceil(d/2),)
    angle = pos * freq  # (L, ceil(d/2))
    pe = torch.empty(max_len, d_model, dtype=torch.float64, device=device)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle[:, : d_model // 2])
    return pe.to(dtype)


class PositionalEncoding(torch.nn.Module):
    """Adds the fixed sinusoidal encoding to a sequence of embeddings, then applies dropout.

    Args:
        d_model: embedding size E.
        dropout: dropout probability applied to `x + PE` (the paper uses 0.1).
        max_len: longest sequence supported (positions 0 .. max_len - 1).
        batch_first: input layout (N, S, E) when True, (S, N, E) when False (torch.nn.Transformer's
            default). An unbatched (S, E) input is accepted either way.

    forward(x, offset=0): x (S, N, E) / (N, S, E) / (S, E) -> same shape and dtype. `offset` is the
    position of x's first token (for incremental decoding with a KV cache: the new token at
    position t is encoded with offset=t).

    The table is a non-persistent buffer: it is a pure function of (d_model, max_len), so it is not
    written to the state_dict (which stays empty and round-trips), follows `.to(device)`, and a
    checkpoint never pins a max_len. It is kept in float32 and cast to x's dtype at the add.
    The paper also multiplies the token embeddings by sqrt(d_model); that belongs to the embedding
    and is left to the caller.
    """

    def __init__(self, d_model: int, dropout: float = 0.1, max_len: int = 5000, batch_first: bool = False,
                 device=None, dtype=None):
        super().__init__()
        if not isinstance(d_model, int) or d_model <= 0:
            raise ValueError(f"PositionalEncoding: d_model must be a positive int, got {d_model!r}")
        if not isinstance(max_len, int) or max_len <= 0:
            raise ValueError(f"PositionalEncoding: max_len must be a positive int, got {max_len!r}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {dropout}")
        self.d_model = d_model
        self.p = float(dropout)
        self.max_len = max_len
        self.batch_first = batch_first
        pe = sinusoidal_table(max_len, d_model, dtype=dtype or torch.float32, device=device)
        self.register_buffer("pe", pe, persistent=False)  # (max_len, E)

    def encoding(self, seq_len: int, offset: int = 0) -> Tensor:
        """PE rows offset .. offset + seq_len - 1, shape (seq_len, E)."""
        if offset < 0 or offset + seq_len > self.max_len:
            raise ValueError(
                f"PositionalEncoding: positions {offset}..{offset + seq_len - 1} exceed max_len="
                f"{self.max_len}; build the module with a larger max_len"
            )
        return self.pe[offset: offset + seq_len]

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        if x.dim() not in (2, 3) or x.shape[-1] != self.d_model:
            raise ValueError(
                f"PositionalEncoding: expected x of shape (S, E), (S, N, E) or (N, S, E) with "
                f"E={self.d_model}, got {tuple(x.shape)}"
            )
        seq_dim = 1 if (self.batch_first and x.dim() == 3) else 0
        pe = self.encoding(x.shape[seq_dim], offset).to(x.dtype)  # (S, E)
        if x.dim() == 3 and seq_dim == 0:
            pe = pe.unsqueeze(1)  # (S, 1, E): broadcast over the batch
        return FF.dropout(x + pe, self.p, self.training)

    def extra_repr(self) -> str:
        return f"{self.d_model}, dropout={self.p}, max_len={self.max_len}, batch_first={self.batch_first}"
