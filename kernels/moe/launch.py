"""The launchers moe_forward / moe_backward and compile_variants (see __init__.py)."""
import torch
import triton

from .._common import INTERPRETING
from .backward import _up_bwd_kernel, _wgrad_kernel
from .config import _NUM_STAGES, ACTIVATIONS, BLOCK_M, BLOCK_N, _dot_flags, _k_and_warps
from .forward import _combine_kernel, _down_kernel, _up_kernel
from .routing import block_m_for, routing


def _w1_view(w1, transposed, interleaved, NI):
    """(stride_e, stride_n, stride_k, up_off, n_step) of gate_up so that element (e, n, h) is W1[e]'s
    output row n, input h, whatever the layout."""
    se, sn, sk = (w1.stride(0), w1.stride(2), w1.stride(1)) if transposed else w1.stride()
    return se, sn, sk, (1 if interleaved else NI), (2 if interleaved else 1)


def _w2_view(w2, transposed):
    """(stride_e, stride_h, stride_i) of down: element (e, h, i) = W2[e]'s output h, input i."""
    return (w2.stride(0), w2.stride(2), w2.stride(1)) if transposed else w2.stride()


def _combine(y, rt, T, k, out_dtype):
    C = y.shape[1]
    out = torch.empty(T, C, device=y.device, dtype=out_dtype)
    if T == 0 or C == 0:
        return out.zero_()
    bt, bc = (32, 128) if INTERPRETING else (16, 128)
    grid = (triton.cdiv(T, bt), triton.cdiv(C, bc))
    n_valid = rt.offsets[-1:]  # on the device: pairs of the experts present
    _combine_kernel[grid](y, rt.inv, n_valid, out, T, C, y.stride(0), out.stride(0), TOP_K=k, BLOCK_T=bt,
                          BLOCK_C=bc)
    return out


def _grouped(a, w_strides, w, bias, scale, rt, nout, E, dtype):
    """y (N, nout) sorted rows = [scale_r] (a[r] W[e]^T + b[e]) with W element (e, n, k) at w_strides."""
    N, K = a.shape
    y = torch.empty(N, nout, device=a.device, dtype=dtype)
    if N == 0 or nout == 0:
        return y
    upcast, prec = _dot_flags(a.dtype)
    grid = (rt.tile_expert.numel(), triton.cdiv(nout, BLOCK_N))
    _down_kernel[grid](
        a, w, bias if bias is not None else a, scale if scale is not None else a, y,
        rt.sorted_pair, rt.tile_expert, rt.tile_row0, rt.offsets,
        E, nout, K, a.stride(0), *w_strides, bias.stride(0) if bias is not None else 0, y.stride(0),
        HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, UPCAST=upcast, DOT_PREC=prec,
        BLOCK_M=rt.block_m, BLOCK_N=BLOCK_N, num_stages=_NUM_STAGES, **_k_and_warps(a.dtype))
    return y


def moe_forward(x, top_k_index, top_k_weights, w1, w2, b1, b2, cfg, expert_ids=None):
    """out (T, H) for x (T, H) contiguous rows; cfg = (activation, alpha, limit, interleaved, transposed).
    expert_ids: see routing (expert parallel: the output is this shard's part of the sum)."""
    activation, alpha, limit, interleaved, transposed = cfg
    T, H = x.shape
    k = top_k_index.shape[1]
    E = w1.shape[0]
    NI = w2.shape[1] if transposed else w2.shape[2]
    assert x.stride(-1) == 1 or H <= 1
    rt = routing(top_k_index, E, block_m_for(T * k, E), expert_ids)
    N = T * k
    a = torch.empty(N, NI, device=x.device, dtype=x.dtype)
    upcast, prec = _dot_flags(x.dtype)
    if N > 0 and NI > 0:
        se, sn, sk, up_off, n_step = _w1_view(w1, transposed, interleaved, NI)
        grid = (rt.tile_expert.numel(), triton.cdiv(NI, BLOCK_N))
        _up_kernel[grid](
            x, w1, b1 if b1 is not None else x, a, rt.sorted_tok, rt.tile_expert, rt.tile_row0, rt.offsets,
            E, NI, H, x.stride(0), se, sn, sk, b1.stride(0) if b1 is not None else 0, a.stride(0),
            up_off, float(alpha), float(limit), N_STEP=n_step, ACT=ACTIVATIONS[activation],
            HAS_BIAS=b1 is not None, UPCAST=upcast, DOT_PREC=prec,
            BLOCK_M=rt.block_m, BLOCK_N=BLOCK_N, num_stages=_NUM_STAGES, **_k_and_warps(x.dtype))
    else:
        a.zero_()
    y = _grouped(a, _w2_view(w2, transposed), w2, b2, top_k_weights.reshape(N), rt, H, E, x.dtype)
    return _combine(y, rt, T, k, x.dtype)


def moe_backward(dout, x, top_k_index, top_k_weights, w1, w2, b1, b2, cfg, expert_ids=None):
    """Gradients (dx, dw (T, k), dw1, dw2, db1 or None, db2 or None) of moe_forward's output
    (with expert_ids: dx and dw are this shard's parts, 0 from absent experts' pairs)."""
    activation, alpha, limit, interleaved, transposed = cfg
    T, H = x.shape
    k = top_k_index.shape[1]
    E = w1.shape[0]
    NI = w2.shape[1] if transposed else w2.shape[2]
    N = T * k
    dev, dt = x.device, x.dtype
    rt = routing(top_k_index, E, block_m_for(T * k, E), expert_ids)
    rw = top_k_weights.reshape(N)
    a = torch.empty(N, NI, device=dev, dtype=dt)
    dgu = torch.empty(N, 2 * NI, device=dev, dtype=dt)
    n_cb = triton.cdiv(NI, BLOCK_N)
    dw_part = torch.zeros(max(n_cb, 1), N, device=dev, dtype=torch.float32)
    se, sn, sk, up_off, n_step = _w1_view(w1, transposed, interleaved, NI)
    s2 = _w2_view(w2, transposed)
    upcast, prec = _dot_flags(dt)
    if N > 0 and NI > 0:
        grid = (rt.tile_expert.numel(), n_cb)
        _up_bwd_kernel[grid](
            dout, x, w1, b1 if b1 is not None else x, w2, b2 if b2 is not None else x, rw, a, dgu, dw_part,
            rt.sorted_tok, rt.sorted_pair, rt.tile_expert, rt.tile_row0, rt.offsets,
            E, NI, H, N, dout.stride(0), x.stride(0), se, sn, sk, b1.stride(0) if b1 is not None else 0,
            *s2, b2.stride(0) if b2 is not None else 0, a.stride(0), dgu.stride(0),
            up_off, float(alpha), float(limit), N_STEP=n_step, ACT=ACTIVATIONS[activation],
            HAS_B1=b1 is not None, HAS_B2=b2 is not None, UPCAST=upcast, DOT_PREC=prec,
            BLOCK_M=rt.block_m, BLOCK_N=BLOCK_N, num_stages=_NUM_STAGES, **_k_and_warps(x.dtype))
    # d w (T, k): the column-block partials summed in a fixed order, back in pair order
    dw = dw_part.sum(0)[rt.inv.long()].reshape(T, k).to(top_k_weights.dtype)
    # d x: per pair d(gate|up) W1[e], then the fixed-order combine (weight 1)
    w1_as_nk = (se, sk, sn)  # element (e, n=h, k=gate_up row)
    dx_pairs = _grouped(dgu, w1_as_nk, w1, None, None, rt, H, E, dt)
    dx = _combine(dx_pairs, rt, T, k, dt)
    # weight gradients, in the weights' own layouts
    dw1 = torch.empty_like(w1, memory_format=torch.contiguous_format)
    dw2 = torch.empty_like(w2, memory_format=torch.contiguous_format)
    db1 = torch.empty_like(b1) if b1 is not None else None
    db2 = torch.empty_like(b2) if b2 is not None else None
    # dW2[e] (h, i) = sum_r (w_r dout[tok r])^T a_r
    d2 = _w2_view(dw2, transposed)
    _wgrad_launch(dout, a, rw, rt, E, H, NI, dw2, d2, db2, gather_a=True, gather_b=False)
    # dW1[e] (n, h) = sum_r dgu_r^T x[tok r]
    d1 = _w1_view(dw1, transposed, interleaved, NI)[:3]
    _wgrad_launch(dgu, x, None, rt, E, 2 * NI, H, dw1, d1, db1, gather_a=False, gather_b=True)
    return dx, dw, dw1, dw2, db1, db2


def _wgrad_launch(aop, bop, scale, rt, E, nw, cw, dw, strides, db, gather_a, gather_b):
    if E == 0 or nw == 0 or cw == 0:
        if db is not None:
            db.zero_()
        return
    upcast, prec = _dot_flags(aop.dtype)
    kw = _k_and_warps(aop.dtype)
    grid = (E, triton.cdiv(nw, BLOCK_N), triton.cdiv(cw, kw["BLOCK_K"]))
    _wgrad_kernel[grid](
        aop, bop, scale if scale is not None else aop, dw, db if db is not None else dw,
        rt.sorted_tok, rt.sorted_pair, rt.offsets, nw, cw,
        aop.stride(0), bop.stride(0), *strides, db.stride(0) if db is not None else 0,
        GATHER_A=gather_a, GATHER_B=gather_b, HAS_SCALE=scale is not None, HAS_BIAS=db is not None,
        UPCAST=upcast, DOT_PREC=prec, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_stages=_NUM_STAGES, **kw)


def compile_variants(quick: bool):
    """Every launch that selects different code: each activation, both layouts, with and without
    biases, forward and backward, per dtype, and the row-tile sizes block_m_for picks (64 with many
    pairs per expert, 32, 16 with few) (tools/gpu_compile_check.py compiles them)."""
    dtypes = [torch.bfloat16] if quick else [torch.float16, torch.bfloat16, torch.float32]
    H, NI, k = 64, 64, 2
    shapes = [(64, 16)] if quick else [(256, 4), (64, 4), (64, 16)]  # (T, E): block_m 64, 32, 16
    for dt in dtypes:
        for T, E in shapes:
            x = torch.randn(T, H, dtype=dt)
            idx = torch.randint(0, E, (T, k))
            w = torch.rand(T, k, dtype=dt)
            # (transposed, interleaved, gate_up bias, down bias)
            layouts = ((False, False, False, False), (True, True, True, True), (False, True, True, False),
                       (True, False, False, True))
            combos = [(a, lay) for a in ACTIVATIONS for lay in layouts]
            if quick or (T, E) != (64, 4):  # plain SwiGLU, and gpt-oss's layout and activation
                combos = [("silu", layouts[0]), ("clamped_swiglu", layouts[1])]
            for act, (transposed, interleaved, bias1, bias2) in combos:
                w1 = torch.randn(E, H, 2 * NI, dtype=dt) if transposed else torch.randn(E, 2 * NI, H, dtype=dt)
                w2 = torch.randn(E, NI, H, dtype=dt) if transposed else torch.randn(E, H, NI, dtype=dt)
                b1 = torch.randn(E, 2 * NI, dtype=dt) if bias1 else None
                b2 = torch.randn(E, H, dtype=dt) if bias2 else None
                cfg = (act, 1.702, 7.0, interleaved, transposed)
                moe_forward(x, idx, w, w1, w2, b1, b2, cfg)
                moe_backward(torch.randn(T, H, dtype=dt), x, idx, w, w1, w2, b1, b2, cfg)
            if not quick:  # expert parallel: the same kernels, the combine masking absent experts' rows
                half = torch.arange(E // 2 + 1)
                moe_forward(x, idx, w, w1[half], w2[half], None, None, cfg, half)
