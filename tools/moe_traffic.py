"""Bytes and FLOPs the MoE experts kernels (kernels/moe/) move and issue per routed (token, expert)
pair, counted under the Triton interpreter, against the minimum.

Method: tools/traffic.py's Counter (the interpreter's masked loads/stores and tl.dot, hooked): the
bytes of the elements whose mask is true (what the kernels request from global memory; on a GPU,
repeated reads of a weight tile by many row tiles are partly served by L2, so this is the request
volume, an upper bound on DRAM traffic), the distinct bytes addressed over the pass (every byte any
kernel touches, once: the traffic if every reuse hit in cache, intermediates included), and 2 M N K
per tile product (issued FLOPs, padding of partial tiles included). The GPU tile sizes
(BLOCK_M/N/K = 64, rows per tile from block_m_for) are set for the count.

    TRITON_INTERPRET=1 python tools/moe_traffic.py [--T 256 --H 256 --I 192 --E 8 --k 2]

Minimum: forward reads x, top_k_index, top_k_weights, W1, W2 once and writes out once; the useful
FLOPs are 6 N H I forward and 12 N H I backward (N = T k pairs).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from traffic import count  # noqa: E402  (sets TRITON_INTERPRET=1 before triton is imported)

import torch  # noqa: E402

from fasttx.kernels import moe as K  # noqa: E402


def _measure(fn):
    t = count(fn)
    return {"load": t.load, "store": t.store, "flops": t.flops}, t.distinct


def main(argv=None):
    p = argparse.ArgumentParser()
    for name, default in (("T", 256), ("H", 256), ("I", 192), ("E", 8), ("k", 2)):
        p.add_argument(f"--{name}", type=int, default=default)
    a = p.parse_args(argv)
    T, H, NI, E, k = a.T, a.H, a.I, a.E, a.k
    K.launch.BLOCK_M, K.launch.BLOCK_N, K.config.BLOCK_K = 64, 64, 64  # the GPU tiles, where the launchers read them
    dt = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=g).to(dt)
    idx = torch.rand(T, E, generator=g).argsort(-1)[:, :k]
    w = torch.rand(T, k, generator=g).to(dt)
    w1 = (torch.randn(E, 2 * NI, H, generator=g) / 16).to(dt)
    w2 = (torch.randn(E, H, NI, generator=g) / 16).to(dt)
    dout = torch.randn(T, H, generator=g).to(dt)
    cfg = ("silu", 1.702, 7.0, False, False)
    N, e = T * k, 2
    fwd, fwd_u = _measure(lambda: K.moe_forward(x, idx, w, w1, w2, None, None, cfg))
    bwd, bwd_u = _measure(lambda: K.moe_backward(dout, x, idx, w, w1, w2, None, None, cfg))
    weights = E * 3 * NI * H * e
    min_fwd = (2 * T * H) * e + weights + T * k * (8 + e)
    # backward minimum: read dout, x, idx, w, W1, W2; write dx, dw, dW1, dW2
    min_bwd = (3 * T * H) * e + 2 * weights + T * k * (8 + 2 * e)
    print(f"T={T} H={H} I={NI} E={E} k={k} bf16, N={N} routed pairs, tiles "
          f"{K.block_m_for(N, E)} x 64 x 64 (block_m_for)")
    for name, c, u, mn, useful in (("forward", fwd, fwd_u, min_fwd, 6 * N * H * NI),
                                   ("backward", bwd, bwd_u, min_bwd, 12 * N * H * NI)):
        moved = c["load"] + c["store"]
        print(f"{name}: requested {moved / N:,.0f} B/pair (loads {c['load'] / N:,.0f}, stores {c['store'] / N:,.0f}), "
              f"distinct {u / N:,.0f} B/pair, minimum {mn / N:,.0f} B/pair "
              f"(requested / minimum {moved / mn:.2f}); issued {c['flops'] / N:,.0f} FLOP/pair, "
              f"useful {useful / N:,.0f} (issued / useful {c['flops'] / useful:.2f})")


if __name__ == "__main__":
    main()
