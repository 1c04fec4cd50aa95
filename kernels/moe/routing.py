"""Routing metadata on the device (no host synchronisation) and the kernels' row-tile lookup
(see __init__.py)."""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .config import BLOCK_M


@triton.jit
def _tile(TILE_EXPERT, TILE_ROW0, OFFSETS, E, pid, BLOCK_M: tl.constexpr):
    """(expert, rows, row mask) of row tile `pid`; expert >= E marks an unused tile."""
    e = tl.load(TILE_EXPERT + pid)
    row0 = tl.load(TILE_ROW0 + pid)
    row_end = tl.load(OFFSETS + tl.minimum(e, E - 1) + 1)
    rows = row0 + tl.arange(0, BLOCK_M)
    return e, rows, rows < row_end


class Routing(NamedTuple):
    sorted_pair: torch.Tensor  # (N,) int32: pair index (t*k + j) of each sorted row
    sorted_tok: torch.Tensor  # (N,) int32: its token
    inv: torch.Tensor  # (N,) int32: sorted row of each pair
    offsets: torch.Tensor  # (E+1,) int32: rows of expert e are offsets[e]:offsets[e+1]; rows from
    # offsets[E] on are pairs of experts absent from this shard (expert_ids given), in no tile
    tile_expert: torch.Tensor  # (n_tiles,) int32: expert of each row tile, E when unused
    tile_row0: torch.Tensor  # (n_tiles,) int32: first row of each tile
    block_m: int  # rows per tile


def local_slots(flat: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """Expert parallel: the local slot (index into the shard's weights) of each global expert id in
    `flat`, or E_local = len(expert_ids) for an expert this shard does not hold. Device ops only
    (sort + searchsorted over the E_local ids), static shapes, no host synchronisation."""
    n_local = expert_ids.numel()
    if n_local == 0:
        return torch.zeros_like(flat)  # slot 0 = E_local: nothing present
    ids_sorted, perm = torch.sort(expert_ids.reshape(-1).to(flat.dtype))
    pos = torch.searchsorted(ids_sorted, flat).clamp_(max=n_local - 1)
    present = ids_sorted[pos] == flat
    return torch.where(present, perm[pos].to(flat.dtype), torch.full_like(flat, n_local))


def routing(top_k_index: torch.Tensor, num_experts: int, block_m: int = BLOCK_M, expert_ids=None) -> Routing:
    """Routing metadata for top_k_index (T, k) with values in [0, num_experts): device ops only,
    static shapes (a function of T, k, E and block_m), no host synchronisation.

    expert_ids (num_experts,) int (expert parallel): the global ids of the experts this shard
    holds, slot i of the weights being expert expert_ids[i]; top_k_index then holds global ids,
    each pair is routed to its local slot, and the pairs of absent experts sort last (slot E, past
    offsets[E]) where no tile covers them: they cost no GEMM work."""
    T, k = top_k_index.shape
    N, E, dev = T * k, num_experts, top_k_index.device
    flat = top_k_index.reshape(N).to(torch.int32)  # any integer dtype; int32 sorts and searches everywhere
    if expert_ids is not None:
        flat = local_slots(flat, expert_ids)
    sorted_e, order = torch.sort(flat, stable=True)  # stable: ties keep pair order
    arange_e = torch.arange(E + 1, device=dev, dtype=sorted_e.dtype)
    offsets = torch.searchsorted(sorted_e, arange_e)  # (E+1,) int64: first row of each expert
    counts = offsets[1:] - offsets[:-1]
    tiles = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    n_tiles = triton.cdiv(N, block_m) + min(E, N)
    t = torch.arange(n_tiles, device=dev, dtype=tile_end.dtype)
    tile_expert = torch.searchsorted(tile_end, t, right=True)  # E past the last used tile
    e_c = tile_expert.clamp(max=E - 1)
    tile_row0 = offsets[e_c] + (t - (tile_end - tiles)[e_c]) * block_m
    inv = torch.empty_like(order).scatter_(0, order, torch.arange(N, device=dev, dtype=order.dtype))
    i32 = torch.int32
    return Routing(order.to(i32), (order // k).to(i32), inv.to(i32), offsets.to(i32),
                   tile_expert.to(i32), tile_row0.to(i32), block_m)


def block_m_for(n_pairs: int, num_experts: int) -> int:
    """Rows per tile: BLOCK_M, or fewer (down to 16, tl.dot's minimum) when the average expert gets
    fewer pairs than that (many small experts, e.g. E = 128, k = 8 at 4k tokens: 256 pairs each, but
    decode batches give a handful), so that partial tiles do not pad the GEMMs with masked rows."""
    avg = triton.cdiv(max(n_pairs, 1), max(num_experts, 1))
    return max(min(BLOCK_M, triton.next_power_of_2(avg)), min(16, BLOCK_M))
