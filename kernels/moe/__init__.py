"""Mixture-of-experts MLP: routing metadata, grouped expert GEMMs with the gated activation fused,
a fixed-order combine back to tokens, and the backward, all without a host synchronisation.

For T tokens x (T, H), each routed to k experts (top_k_index (T, k), top_k_weights w (T, k)), with
gate_up W1 (E, 2I, H) ([gate; up] rows, or interleaved gate0, up0, gate1, ...) and down W2 (E, H, I)
(`transposed`: W1 (E, H, 2I), W2 (E, I, H), gpt-oss's layout), optional biases b1 (E, 2I), b2 (E, H):

    for pair p = (t, j), e = top_k_index[t, j]:
        g_p = x_t W1g[e]^T + b1g[e],  u_p = x_t W1u[e]^T + b1u[e]          (I each)
        a_p = act(g_p, u_p)          silu(g) u | gelu(g) u | gelu_tanh(g) u |
                                     clamped swiglu: (clamp(u, -L, L) + 1) gc sigmoid(alpha gc), gc = min(g, L)
        y_p = a_p W2[e]^T + b2[e]                                           (H)
    out_t = sum_j w[t, j] y_(t, j)                                          (j = 0..k-1, in that order)

Routing metadata (`routing`, torch ops on the device, no .item()/.tolist(), static shapes): the
N = T*k (token, slot) pairs are stably sorted by expert (torch.sort(stable=True): ties keep pair
order, so the layout is a function of top_k_index alone); per-expert row offsets come from
searchsorted on the sorted ids; each expert's rows are cut into BLOCK_M-row tiles and a tile ->
(expert, first row) map of static length cdiv(N, BLOCK_M) + min(E, N) (an upper bound on
sum_e cdiv(count_e, BLOCK_M)) is built with cumsum/searchsorted. The GEMM grids run over those
tiles: an expert with no token owns no tile and costs no GEMM work; unused tiles (expert id E)
return at once.

Kernels (each a grouped GEMM over row tiles of the sorted pairs, the expert read per tile):
    _up_kernel       h[r] = act(x[tok r] W1g[e]^T + b1g, x[tok r] W1u[e]^T + b1u)   gather in the prologue,
                     activation in the epilogue (gate and up accumulate side by side)
    _down_kernel     y[r] = s_r (a[r] W[e]^T + b[e]) -- forward down (s = w of pair r, in its epilogue) and
                     the backward's d(x) pairs (a = d(gate|up), W = W1 read transposed, s = 1)
    _combine_kernel  out[t] = sum_j y[inv[t k + j]]  fp32, j in order: no atomics
    _up_bwd_kernel   one pass over H per tile: G = dout[tok] W2[e] (the unweighted d a), and the
                     recomputed g, u (same K loop); writes a[r] (for dW2), d(gate|up)[r] in W1's row
                     order, and per column-block partials of d w_p = G . a_p + dout_t . b2[e]
    _wgrad_kernel    dW[e] = sum over the expert's rows r of A[r]^T B[r] (+ db[e] = sum_r A[r]): for
                     dW2 (A = w_r dout[tok r], B = a) and dW1 (A = d(gate|up), B = x[tok r]); the
                     rows are walked in order by one program per output tile: no atomics

Backward math (da = w_p G, G = dout_t W2[e]):
    d w_p    = dout_t . y_p = G . a_p + dout_t . b2[e]
    dW2[e]   = sum_p (w_p dout_t)^T a_p,   db2[e] = sum_p w_p dout_t
    dg, du   = da * d act / d(g, u)        (silu: u s (1 + g (1 - s)), s(g) | gelu: u gelu'(g) |
               clamped: dg = da (uc + 1) (s + alpha gc s (1 - s)) [g <= L], du = da gc s [-L <= u <= L])
    dW1[e]   = sum_p d(gate|up)_p^T x_t,   db1[e] = sum_p d(gate|up)_p
    dx_t     = sum_j d(gate|up)_(t,j) W1[e]    (per pair, then the same fixed-order combine)
Every sum runs in fp32 registers in a fixed order (tile by tile, rows in sorted order), so two
backward runs are bit-identical. d w sums its column-block partials with torch's sum (no atomics).

Memory: the forward keeps nothing of (N, 2I) or (N, I): the backward recomputes g and u from x in
the same K loop that computes G = dout W2 (both read H), so the recompute costs one gate/up GEMM
(4 N H I FLOPs, a third on top of the backward's 12 N H I) but keeps N * 2I elements from living
between forward and backward. Storing them is not faster at equal memory: at equal memory there is
nothing to store, and storing them (the alternative) trades N * 2I elements of activation memory per
layer for that third. The routing metadata is also
recomputed (a sort of N ints) instead of saved.

Expert parallel (expert_ids given): the weights hold E_local experts, expert_ids[i] the global id
of slot i, top_k_index global ids. Routing maps each pair's id to its slot on the device (sort +
searchsorted over the E_local ids, `local_slots`); pairs of absent experts get slot E_local, sort
after every present pair and own no tile (no GEMM work, rows never written); the combine reads
rows from offsets[E_local] on as zero. The output, d(x) and d(w) are then this shard's share of
a sum over shards; the weight and bias gradients are the local experts' own.

Launchers:
    routing(top_k_index, num_experts, block_m, expert_ids=None) -> Routing
    moe_forward(x, top_k_index, top_k_weights, w1, w2, b1, b2, cfg, expert_ids=None) -> out (T, H)
    moe_backward(dout, x, top_k_index, top_k_weights, w1, w2, b1, b2, cfg, expert_ids=None)
        -> (dx, dw, dw1, dw2, db1, db2)
cfg = (activation, alpha, limit, interleaved, transposed).

A package (kernels/moe/):
    config.py      activation ids, tile sizes, the dot flags
    activation.py  the gated activations and their gradients (Triton helpers)
    routing.py     Routing, routing(), local_slots, block_m_for, and the kernels' tile lookup (_tile)
    forward.py     _up_kernel, _down_kernel, _combine_kernel
    backward.py    _up_bwd_kernel, _wgrad_kernel
    launch.py      moe_forward, moe_backward (and their launch helpers), compile_variants
"""
from .config import ACTIVATIONS, BLOCK_K, BLOCK_M, BLOCK_N  # noqa: F401
from .launch import compile_variants, moe_backward, moe_forward  # noqa: F401
from .routing import Routing, block_m_for, local_slots, routing  # noqa: F401
