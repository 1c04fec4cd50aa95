"""Mixture-of-experts experts op (fasttx.functional.moe_experts) on both backends against the fp64
oracle (fasttx.reference.moe_experts): every activation and weight layout, biases, odd sizes,
fp32 and bf16, imbalanced and degenerate routing (empty batch, k = 1, E = 1, every token on one
expert, experts with no token), torch.compile, determinism, and bad inputs naming the argument."""
import pytest
import torch

import fasttx
import fasttx.functional as FF
from fasttx import reference as R

from utils import assert_2x_rule

F64 = torch.float64
NAMES = ("hidden_states", "top_k_weights", "gate_up_proj", "down_proj", "gate_up_bias", "down_bias")


def _make(T, H, NI, E, k, dtype=torch.float32, bias=False, transposed=False, index=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    if index is None:
        # k distinct experts per token, as a router's top-k gives
        index = torch.rand(T, E, generator=g).argsort(-1)[:, :k]
    w = torch.rand(T, k, generator=g)
    w1 = torch.randn(E, 2 * NI, H, generator=g) / H ** 0.5
    w2 = torch.randn(E, H, NI, generator=g) / NI ** 0.5
    if transposed:
        w1, w2 = w1.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()
    b1 = torch.randn(E, 2 * NI, generator=g) if bias else None
    b2 = torch.randn(E, H, generator=g) if bias else None
    ts = [t.to(dtype) if t is not None else None for t in (x, w, w1, w2, b1, b2)]
    return ts, index


def _run(fn, ts, index, kw, dout, upcast=None):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in ts]
    x, w, w1, w2, b1, b2 = leaves
    args = (x, index, w, w1, w2)
    if upcast is not None:
        out = fn(*args, gate_up_bias=b1, down_bias=b2, upcast=upcast, **kw)
    else:
        out = fn(*args, gate_up_bias=b1, down_bias=b2, **kw)
    if out.requires_grad:  # the oracle's loop on an empty batch touches no input
        out.backward(dout.to(out.dtype))
    return [out] + [t.grad if t is not None else None for t in leaves]


def _check_fp32(ts, index, kw, seed=1):
    T, H = ts[0].shape
    dout = torch.randn(T, H, generator=torch.Generator().manual_seed(seed))
    ours = _run(FF.moe_experts, ts, index, kw, dout)
    ref = _run(R.moe_experts, ts, index, kw, dout, upcast=F64)
    for name, t, o, r in zip(("out",) + NAMES, [None] + list(ts), ours, ref):
        if name != "out" and t is None:
            assert o is None and r is None, name
            continue
        if r is None:  # the oracle's loop never touched this input (an empty batch): zero gradient
            r = torch.zeros_like(o)
        assert o.dtype == torch.float32 and o.shape == r.shape, name
        torch.testing.assert_close(o.double(), r.double(), atol=2e-5, rtol=2e-5, msg=name)


CASES = {
    # name: (T, H, NI, E, k, kwargs, bias)
    "silu": (13, 24, 40, 5, 2, {}, False),
    "gelu_odd_bias": (7, 17, 23, 3, 3, {"activation": "gelu"}, True),
    "gelu_tanh_interleaved": (9, 16, 20, 4, 2, {"activation": "gelu_tanh", "gate_up_interleaved": True}, False),
    "gpt_oss": (11, 24, 16, 4, 2, {"activation": "clamped_swiglu", "gate_up_interleaved": True,
                                   "transposed": True, "alpha": 1.702, "limit": 0.7}, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_every_gradient_match_the_fp64_oracle(backend, case):
    T, H, NI, E, k, kw, bias = CASES[case]
    ts, index = _make(T, H, NI, E, k, bias=bias, transposed=kw.get("transposed", False))
    _check_fp32(ts, index, kw)


def test_clamped_swiglu_clamps_in_the_case_above():
    # the gpt_oss case must reach both clamps, or it would not test them
    T, H, NI, E, k, kw, bias = CASES["gpt_oss"]
    ts, index = _make(T, H, NI, E, k, bias=bias, transposed=True)
    x, _, w1, _, b1, _ = ts
    gu = torch.einsum("th,ehn->ten", x, w1) + b1
    assert (gu[..., 0::2] > kw["limit"]).any() and (gu[..., 1::2].abs() > kw["limit"]).any()


@pytest.mark.parametrize("routing", ["empty_batch", "k1", "one_expert", "all_on_one", "imbalanced", "int32", "uint8"])
def test_degenerate_and_imbalanced_routing(backend, routing):
    T, H, NI, E, k = 19, 16, 24, 6, 2
    index = None
    if routing == "empty_batch":
        T = 0
    elif routing == "k1":
        k = 1
    elif routing == "one_expert":
        E, k = 1, 1
    elif routing == "all_on_one":
        index = torch.stack([torch.full((T,), 3), torch.full((T,), 1)], 1)  # experts 0, 2, 4, 5 get nothing
    elif routing == "imbalanced":
        index = torch.stack([torch.where(torch.arange(T) % 7 == 0, 5, 2), torch.full((T,), 4)], 1)
    ts, auto = _make(T, H, NI, E, k, bias=True)
    index = auto if index is None else index
    if routing in ("int32", "uint8"):
        index = index.to(getattr(torch, routing))
    _check_fp32(ts, index, {"activation": "silu"})


def test_bf16_follows_the_2x_rule(backend):
    T, H, NI, E, k = 21, 32, 48, 4, 2
    ts, index = _make(T, H, NI, E, k, dtype=torch.bfloat16, bias=True)
    dout = torch.randn(T, H, generator=torch.Generator().manual_seed(3)).bfloat16()
    ours = _run(FF.moe_experts, ts, index, {}, dout)
    low = _run(R.moe_experts, ts, index, {}, dout)  # PyTorch's own math in bf16
    ref = _run(R.moe_experts, [t.double() if t is not None else None for t in ts], index, {}, dout)
    for name, o, pt, r in zip(("out",) + NAMES, ours, low, ref):
        assert o.dtype == torch.bfloat16, name
        assert_2x_rule(o, pt, r, mult=2.0 if name == "out" else 3.0, name=name)


def test_triton_backward_is_bit_reproducible():
    T, H, NI, E, k = 23, 16, 24, 3, 2
    ts, index = _make(T, H, NI, E, k, bias=True)
    dout = torch.randn(T, H)
    with fasttx.use_backend("triton"):
        a = _run(FF.moe_experts, ts, index, {}, dout)
        b = _run(FF.moe_experts, ts, index, {}, dout)
    for name, x, y in zip(("out",) + NAMES, a, b):
        assert torch.equal(x, y), name


def test_routing_metadata_gives_empty_experts_no_tiles():
    from fasttx.kernels import moe as K

    index = torch.tensor([[3, 1], [3, 0], [1, 3], [3, 1], [3, 0]])  # expert 2 and 4 get nothing
    bm = 2
    rt = K.routing(index, 5, block_m=bm)
    counts = torch.bincount(index.reshape(-1), minlength=5)
    assert rt.offsets.tolist() == [0] + torch.cumsum(counts, 0).tolist()
    used = rt.tile_expert[rt.tile_expert < 5]
    assert torch.bincount(used.long(), minlength=5).tolist() == [(c + bm - 1) // bm for c in counts.tolist()]
    # stable: rows of one expert in pair order; sorted_tok and inv consistent with the sort
    pairs = rt.sorted_pair.long()
    assert torch.equal(index.reshape(-1)[pairs], torch.sort(index.reshape(-1), stable=True).values)
    for e in range(5):
        seg = pairs[rt.offsets[e]:rt.offsets[e + 1]]
        assert torch.equal(seg, seg.sort().values)
    assert torch.equal(rt.sorted_tok.long(), pairs // 2)
    assert torch.equal(pairs[rt.inv.long()], torch.arange(10))
    # every tile's rows lie inside its expert's rows
    for t, e in enumerate(rt.tile_expert.tolist()):
        if e < 5:
            assert rt.offsets[e] <= rt.tile_row0[t] < rt.offsets[e + 1]


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_compiles_fullgraph(backend_name):
    T, H, NI, E, k = 10, 16, 16, 4, 2
    ts, index = _make(T, H, NI, E, k)
    dout = torch.randn(T, H)
    torch._dynamo.reset()
    with fasttx.use_backend(backend_name):
        eager = _run(FF.moe_experts, ts, index, {}, dout)
        compiled = _run(torch.compile(FF.moe_experts, fullgraph=True, backend="aot_eager"), ts, index, {}, dout)
    for name, x, y in zip(("out",) + NAMES, eager, compiled):
        if x is not None:
            torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5, msg=name)


def _bad(**over):
    ts, index = _make(4, 8, 6, 3, 2, bias=True)
    args = dict(zip(("hidden_states", "top_k_weights", "gate_up_proj", "down_proj", "gate_up_bias", "down_bias"), ts))
    args["top_k_index"] = index
    args.update(over)
    pos = [args.pop(n) for n in ("hidden_states", "top_k_index", "top_k_weights", "gate_up_proj", "down_proj")]
    return pos, args


@pytest.mark.parametrize("over, exc, word", [
    ({"top_k_index": torch.tensor([[0, 3], [1, 2], [0, 1], [2, 0]])}, IndexError, "top_k_index"),
    ({"top_k_index": torch.tensor([[0, -1], [1, 2], [0, 1], [2, 0]])}, IndexError, "top_k_index"),
    ({"top_k_index": torch.zeros(4, 2)}, RuntimeError, "top_k_index"),
    ({"top_k_index": torch.zeros(3, 2, dtype=torch.long)}, RuntimeError, "top_k_index"),
    ({"top_k_weights": torch.ones(4, 3)}, RuntimeError, "top_k_weights"),
    ({"top_k_weights": torch.ones(4, 2, dtype=torch.long)}, RuntimeError, "top_k_weights"),
    ({"hidden_states": torch.randn(2, 4, 8)}, RuntimeError, "hidden_states"),
    ({"hidden_states": torch.ones(4, 8, dtype=torch.long)}, RuntimeError, "hidden_states"),
    ({"gate_up_proj": torch.randn(3, 12, 9)}, RuntimeError, "gate_up_proj"),
    ({"gate_up_proj": torch.randn(3, 11, 8)}, RuntimeError, "gate_up_proj"),
    ({"gate_up_proj": torch.randn(3, 12, 8, dtype=torch.float64)}, RuntimeError, "gate_up_proj"),
    ({"down_proj": torch.randn(3, 8, 7)}, RuntimeError, "down_proj"),
    ({"down_proj": torch.randn(2, 8, 6)}, RuntimeError, "down_proj"),
    ({"gate_up_bias": torch.randn(3, 8)}, RuntimeError, "gate_up_bias"),
    ({"down_bias": torch.randn(8)}, RuntimeError, "down_bias"),
    ({"activation": "relu"}, ValueError, "activation"),
    ({"gate_up_proj": [1.0]}, TypeError, "gate_up_proj"),
    ({"transposed": 1}, TypeError, "transposed"),
])
def test_bad_inputs_raise_naming_the_argument(backend, over, exc, word):
    pos, kw = _bad(**over)
    with pytest.raises(exc, match=word):
        FF.moe_experts(*pos, **kw)


def test_fp64_runs_the_torch_path_with_one_warning():
    ts, index = _make(5, 8, 6, 3, 2, dtype=F64)
    with fasttx.use_backend("triton"), pytest.warns(UserWarning, match="moe_experts: fp64"):
        out = FF.moe_experts(ts[0], index, *ts[1:4])
    torch.testing.assert_close(out, R.moe_experts(ts[0], index, *ts[1:4]))


# ----------------------------------------------------------------------------------------------
# fasttx.nn.MoE and the MoE GPT
# ----------------------------------------------------------------------------------------------
def test_moe_module_matches_its_definition_and_trains_the_router(backend):
    import fasttx.nn as fnn

    torch.manual_seed(0)
    m = fnn.MoE(16, 12, 5, 2, shared_intermediate_size=8, bias=True)
    x = torch.randn(2, 7, 16)
    y = m(x)
    # by hand, in fp64: softmax top-2 renormalised, the oracle experts, the shared SwiGLU expert
    xf = x.reshape(-1, 16).double()
    logits = xf @ m.gate.weight.double().T
    probs = logits.softmax(-1)
    w, idx = probs.topk(2, -1)
    w = w / w.sum(-1, keepdim=True)
    want = R.moe_experts(xf, idx, w, m.gate_up_proj.double(), m.down_proj.double(),
                         gate_up_bias=m.gate_up_bias.double(), down_bias=m.down_bias.double())
    gu = xf @ m.shared_expert.gate_up.weight.double().T
    g, u = gu.chunk(2, -1)
    want = want + (torch.nn.functional.silu(g) * u) @ m.shared_expert.down.weight.double().T
    torch.testing.assert_close(y.reshape(-1, 16).double(), want, atol=2e-5, rtol=2e-5)
    f = torch.stack([(idx == e).sum() for e in range(5)]).double() / 14
    torch.testing.assert_close(m.aux_loss.double(), 5 * (f * probs.mean(0)).sum(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(m.z_loss.double(), torch.logsumexp(logits, -1).square().mean(), atol=1e-5, rtol=1e-5)
    # the router learns from the task loss (through the routing weights) and from the aux losses
    (y.square().sum()).backward(retain_graph=True)
    assert m.gate.weight.grad is not None and m.gate.weight.grad.abs().sum() > 0
    m.gate.weight.grad = None
    (m.aux_loss + m.z_loss).backward()
    assert m.gate.weight.grad.abs().sum() > 0


def test_moe_module_argument_rules():
    import fasttx.nn as fnn

    with pytest.raises(ValueError, match="top_k"):
        fnn.MoE(8, 8, 2, 3)
    with pytest.raises(ValueError, match="activation"):
        fnn.MoE(8, 8, 2, 1, activation="relu")
    m = fnn.MoE(8, 8, 4, 1, norm_topk_prob=False)
    m(torch.randn(3, 8))
    _, _, w, probs = m.route(torch.randn(3, 8))
    assert torch.equal(w[:, 0], probs.max(-1).values)  # no renormalisation


def _moe_gpt(**kw):
    from fasttx.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig.llama(vocab_size=37, block_size=12, n_layer=2, n_head=2, n_embd=16, n_experts=3,
                          moe_top_k=2, moe_z_loss_coef=1e-3, **kw)
    return GPT(cfg)


def test_moe_gpt_layers_and_loss():
    from fasttx.nn.moe import MoE

    m = _moe_gpt(moe_every=2)
    assert [isinstance(b.mlp, MoE) for b in m.transformer.h] == [False, True]
    idx = torch.randint(0, 37, (2, 9))
    logits, loss = m(idx, idx, return_logits=True)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 37).float(), idx.reshape(-1))
    moe = m.transformer.h[1].mlp
    torch.testing.assert_close(loss, ce + 0.01 * moe.aux_loss + 1e-3 * moe.z_loss)
    loss.backward()
    assert moe.gate.weight.grad.abs().sum() > 0 and moe.gate_up_proj.grad.abs().sum() > 0


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_moe_gpt_kv_cache_decode_and_greedy_generation_are_exact(backend_name):
    from fasttx.models.gpt import KVCache

    m = _moe_gpt().eval()
    idx = torch.randint(0, 37, (2, 7))
    with fasttx.use_backend(backend_name), torch.no_grad():
        full = m._forward_hidden(idx)
        cache = KVCache(m.config.n_layer, m.config.block_size)
        parts = [m._forward_hidden(idx[:, :5], cache, 0)]
        for t in range(5, 7):
            parts.append(m._forward_hidden(idx[:, t: t + 1], cache, t))
        cached = m.generate(idx[:, :3], 3, temperature=0.0, use_cache=True)
        recomputed = m.generate(idx[:, :3], 3, temperature=0.0, use_cache=False)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=2e-5, rtol=2e-5)
    assert torch.equal(cached, recomputed)


def test_non_contiguous_inputs_and_weight_views(backend):
    T, H, NI, E, k = 9, 16, 12, 3, 2
    ts, index = _make(T, H, NI, E, k, bias=True)
    x, w, w1, w2, b1, b2 = ts
    # hidden_states every other column of a wider buffer, weights as transposed views of other layouts
    xs = torch.empty(T, 2 * H)
    xs[:, ::2] = x
    w1v = w1.transpose(1, 2).contiguous().transpose(1, 2)
    w2v = w2.transpose(1, 2).contiguous().transpose(1, 2)
    assert not xs[:, ::2].is_contiguous() and not w1v.is_contiguous() and not w2v.is_contiguous()
    out = FF.moe_experts(xs[:, ::2], index.t().contiguous().t(), w, w1v, w2v, gate_up_bias=b1, down_bias=b2)
    ref = R.moe_experts(x, index, w, w1, w2, gate_up_bias=b1, down_bias=b2, upcast=F64)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_autocast_runs_in_the_autocast_dtype(backend):
    ts, index = _make(5, 16, 8, 3, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = FF.moe_experts(ts[0], index, *ts[1:4])
    assert out.dtype == torch.bfloat16
    ref = R.moe_experts(ts[0], index, *ts[1:4], upcast=F64)
    torch.testing.assert_close(out.double(), ref, atol=5e-2, rtol=5e-2)  # bf16 inputs and output


@pytest.mark.parametrize("which", ["gate_up_bias", "down_bias"])
def test_only_one_bias(backend, which):
    ts, index = _make(11, 16, 12, 3, 2, bias=True)
    if which == "gate_up_bias":
        ts[5] = None
    else:
        ts[4] = None
    _check_fp32(ts, index, {"activation": "gelu"})


@pytest.mark.gpu
def test_cuda_no_host_sync_and_graph_replay_with_new_routing(device):
    """Forward and backward on the Triton path never synchronise with the host (CUDA's sync debug
    mode raises on any), and a captured CUDA graph replays with routing changed in place."""
    ts, index = _make(64, 64, 96, 8, 2, dtype=torch.bfloat16, bias=True)
    x, w, w1, w2, b1, b2 = [t.to(device) for t in ts]
    index = index.to(device)
    x.requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = FF.moe_experts(x, index, w, w1, w2, gate_up_bias=b1, down_bias=b2)
        out.float().square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    static_idx = index.clone()
    with torch.no_grad():
        FF.moe_experts(x, static_idx, w, w1, w2)  # warm-up (compiles) outside the capture
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_out = FF.moe_experts(x, static_idx, w, w1, w2)
        new = torch.stack([torch.full((64,), 7), torch.arange(64) % 3], 1).to(device)  # imbalanced
        static_idx.copy_(new)
        g.replay()
        torch.testing.assert_close(static_out, FF.moe_experts(x, new, w, w1, w2), atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------
# Expert parallel: expert_ids (the global ids of the experts a shard's weights hold)
# ----------------------------------------------------------------------------------------------
def _ep_run(ts, index, kw, dout, ids, fn=FF.moe_experts, slots=None):
    """The op on the experts `ids` only (weight slots `slots`, default the ids): (out, grads)."""
    part = [ts[0], ts[1]] + [t[ids if slots is None else slots] if t is not None else None for t in ts[2:]]
    return _run(lambda *a, **k: fn(*a, expert_ids=ids, **k), part, index, kw, dout)


@pytest.mark.parametrize("case", ["silu_bias", "gpt_oss"])
def test_expert_parallel_halves_sum_to_the_full_result(backend, case):
    # two shards with unsorted, non-contiguous global ids; each computes only its experts' pairs
    T, H, NI, E, k = 13, 16, 20, 5, 2
    kw = ({"activation": "clamped_swiglu", "gate_up_interleaved": True, "transposed": True, "limit": 0.7}
          if case == "gpt_oss" else {})
    ts, index = _make(T, H, NI, E, k, bias=True, transposed=kw.get("transposed", False))
    index[0] = torch.tensor([4, 3])  # a token whose experts are all on one shard
    dout = torch.randn(T, H, generator=torch.Generator().manual_seed(2))
    full = _run(FF.moe_experts, ts, index, kw, dout)
    halves = [torch.tensor([3, 0, 4]), torch.tensor([1, 2])]
    parts = [_ep_run(ts, index, kw, dout, ids) for ids in halves]
    for i, name in enumerate(("out", "hidden_states", "top_k_weights")):  # sums over the shards
        torch.testing.assert_close(parts[0][i] + parts[1][i], full[i], atol=1e-5, rtol=1e-5, msg=name)
    assert parts[1][0][0].abs().max() == 0 and parts[1][2][0].abs().max() == 0  # token 0: nothing on shard 1
    for i, name in enumerate(NAMES[2:], start=3):  # each shard's experts' own gradients
        for ids, p in zip(halves, parts):
            torch.testing.assert_close(p[i], full[i][ids], atol=1e-5, rtol=1e-5, msg=name)
    # the fp64 oracle of one shard agrees with its own definition
    ref = _ep_run(ts, index, kw, dout, halves[0],
                  fn=lambda *a, **k: R.moe_experts(*a, upcast=F64, **k))
    for name, o, r in zip(("out",) + NAMES, parts[0], ref):
        torch.testing.assert_close(o.double(), r.double(), atol=2e-5, rtol=2e-5, msg=name)


def test_expert_parallel_no_expert_held_gives_zero(backend):
    ts, index = _make(6, 8, 6, 3, 2)
    ids = torch.tensor([7, 9])  # global ids no token is routed to
    out = _ep_run(ts, index, {}, torch.ones(6, 8), ids, slots=torch.tensor([0, 1]))
    assert out[0].abs().max() == 0 and out[1].abs().max() == 0 and out[3].abs().max() == 0


def test_expert_parallel_routing_gives_absent_experts_no_tiles():
    from fasttx.kernels import moe as K

    index = torch.tensor([[3, 1], [3, 0], [1, 3], [2, 1], [3, 0]])
    ids = torch.tensor([3, 0])  # this shard: slot 0 = expert 3, slot 1 = expert 0
    rt = K.routing(index, 2, block_m=2, expert_ids=ids)
    assert rt.offsets.tolist() == [0, 4, 6]  # expert 3: 4 pairs, expert 0: 2, then 4 absent pairs
    assert index.reshape(-1)[rt.sorted_pair.long()[:6]].tolist() == [3, 3, 3, 3, 0, 0]
    used = rt.tile_expert[rt.tile_expert < 2]
    assert torch.bincount(used.long(), minlength=2).tolist() == [2, 1]  # no tile past row 6
    assert all(rt.tile_row0[t] < 6 for t in range(len(rt.tile_expert)) if rt.tile_expert[t] < 2)


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_expert_parallel_compiles_fullgraph(backend_name):
    ts, index = _make(10, 16, 16, 4, 2)
    dout, ids = torch.randn(10, 16), torch.tensor([2, 0])
    torch._dynamo.reset()
    with fasttx.use_backend(backend_name):
        eager = _ep_run(ts, index, {}, dout, ids)
        compiled = _ep_run(ts, index, {}, dout, ids, fn=torch.compile(FF.moe_experts, fullgraph=True,
                                                                       backend="aot_eager"))
    for name, x, y in zip(("out",) + NAMES, eager, compiled):
        if x is not None:
            torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("ids, exc, word", [
    (torch.tensor([0, 1]), RuntimeError, "expert_ids"),  # 2 ids for 3 experts
    (torch.tensor([0.0, 1.0, 2.0]), RuntimeError, "expert_ids"),
    (torch.tensor([0, 1, 1]), RuntimeError, "expert_ids"),  # not distinct
    (torch.tensor([0, -1, 2]), RuntimeError, "expert_ids"),
    ([0, 1, 2], TypeError, "expert_ids"),
])
def test_expert_parallel_bad_expert_ids(backend, ids, exc, word):
    pos, kw = _bad()
    with pytest.raises(exc, match=word):
        FF.moe_experts(*pos, expert_ids=ids, **kw)


def test_expert_parallel_negative_index_still_raises(backend):
    pos, kw = _bad(top_k_index=torch.tensor([[0, -1], [1, 2], [0, 1], [2, 0]]))
    with pytest.raises(IndexError, match="top_k_index"):
        FF.moe_experts(*pos, expert_ids=torch.tensor([5, 6, 7]), **kw)
