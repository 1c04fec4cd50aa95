"""fasttx.flash's S_dmask (return_attn_probs with dropout, a debugging output): the keep-mask that
the attention kernels drew, regenerated from the seed `fasttx::flash_attention` returned."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor



def flash_dropout_keep(seed: Tensor, shape: Sequence[int], dropout_p: float) -> Tensor:
    """The bool keep-mask (True = kept) of a `fasttx::flash_attention` call with this seed (its third
    output). Dense q: shape (B, H, Lq, Lk). Packed q (cu_seqlens): shape (1, H, total_q, max_seqlen_k),
    where sequence b's query i and key j sit at [0, h, cu_seqlens_q[b] + i, j] (the kernels'
    dropout index; kernels/attention.py). One host sync: a test and debugging path."""
    from fasttx.kernels import attention as K  # lazy: importing fasttx.ops needs no triton

    with torch.no_grad():
        return K.dropout_mask(tuple(int(n) for n in shape), seed, dropout_p, seed.device)
