"""fasttx under torch.distributed: FSDP2, tensor + sequence parallel (DTensor), activation
checkpointing and torch.compile, each against the single-process run of the same seed.

One spawn of 2 gloo CPU ranks runs every multi-process check (`_CHECKS`) one after another and
records each one's outcome; the tests below read those outcomes, one test per check. Inside the
ranks the fasttx backend is "triton" (the real kernels, through the Triton interpreter on CPU),
so the DTensor sharding rules of fasttx's custom ops (fasttx/distributed.py) are what runs.
The single-process references are computed in each rank with the same seeds and plain tensors.
"""
from __future__ import annotations

import copy
import datetime
import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as tnn
from torch.utils.checkpoint import checkpoint

import fasttx
import fasttx.functional as FF

WORLD = 2
TIMEOUT_S = 300
V = 29


def _gpt_config(dropout=0.0, n_layer=2):
    from fasttx.models import GPTConfig

    return GPTConfig(vocab_size=V, block_size=8, n_layer=n_layer, n_head=2, n_embd=16, dropout=dropout)


def _tokens(steps=2, batch=2 * WORLD):
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, V, (steps, batch, 9), generator=g)  # (steps, B, T+1)


class CheckpointedBlocks(tnn.Module):
    """Runs a module through torch.utils.checkpoint (its forward is recomputed in the backward)."""

    def __init__(self, block: tnn.Module, use_reentrant: bool, preserve_rng_state: bool = True):
        super().__init__()
        self.block = block
        self.use_reentrant = use_reentrant
        self.preserve_rng_state = preserve_rng_state

    def forward(self, *args):
        return checkpoint(self.block, *args, use_reentrant=self.use_reentrant,
                          preserve_rng_state=self.preserve_rng_state)


def _checkpoint_blocks(model, use_reentrant, preserve_rng_state=True):
    blocks = model.transformer.h
    for i in range(len(blocks)):
        blocks[i] = CheckpointedBlocks(blocks[i], use_reentrant, preserve_rng_state)
    return model


def _plain_name(name: str) -> str:
    return name.replace(".block.", ".")


def _grads(model):
    out = {}
    for n, p in model.named_parameters():
        g = p.grad
        if g is not None and hasattr(g, "full_tensor"):
            g = g.full_tensor()
        out[_plain_name(n)] = None if g is None else g.detach().clone()
    return out


def _params(model):
    return {_plain_name(n): (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def _assert_dicts_close(a, b, what, atol=1e-5, rtol=1e-5):
    assert a.keys() == b.keys(), (what, sorted(a), sorted(b))
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=rtol, msg=f"{what}: {name}")


# ----------------------------------------------------------------------------------------------
# Single process: activation checkpointing and torch.compile
# ----------------------------------------------------------------------------------------------
def _gpt_grads(use_reentrant=None, preserve_rng_state=True):
    """Gradients of one training step of a GPT with dropout (seed 0 for the weights, seed 7 for
    the step's dropout masks); blocks checkpointed unless use_reentrant is None."""
    from fasttx.models import GPT

    torch.manual_seed(0)
    model = GPT(_gpt_config(dropout=0.25))
    if use_reentrant is not None:
        _checkpoint_blocks(model, use_reentrant, preserve_rng_state)
    tokens = _tokens(steps=1, batch=2)[0]
    torch.manual_seed(7)
    _, loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    return loss.detach(), _grads(model)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpoint_recomputes_the_same_dropout_masks(use_reentrant):
    """The recomputed forward draws its Philox seeds from torch's generator again, and checkpoint
    restores that generator's state first: the same masks, so the same gradients."""
    with fasttx.use_backend("triton"):
        loss, plain = _gpt_grads()
        loss_ckpt, ckpt = _gpt_grads(use_reentrant)
    torch.testing.assert_close(loss_ckpt, loss, atol=0, rtol=0)
    _assert_dicts_close(ckpt, plain, "checkpointed vs plain gradients", atol=1e-6, rtol=1e-6)


def test_checkpoint_without_rng_restore_changes_the_masks():
    """The control that shows the test above can fail: when checkpoint does not restore torch's
    generator, the recomputation draws new seeds, the backward uses other masks than the
    forward did, and the gradients differ."""
    with fasttx.use_backend("triton"):
        _, plain = _gpt_grads()
        _, ckpt = _gpt_grads(use_reentrant=False, preserve_rng_state=False)
    differ = [n for n in plain if not torch.allclose(plain[n], ckpt[n], atol=1e-6, rtol=1e-6)]
    assert len(differ) > len(plain) // 2, differ


def _fasttx_ops_in(gm: torch.fx.GraphModule) -> set:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "fasttx" in str(n.target)}


def test_compiled_gpt_training_step_matches_eager_without_graph_breaks():
    """A GPT training step (forward, loss, backward, SGD step) with forward and backward compiled
    by inductor (fullgraph), on fasttx's custom ops, equals eager; dynamo sees no graph break and
    every fasttx op in one graph."""
    from fasttx.models import GPT

    tokens = _tokens(steps=2, batch=2)
    with fasttx.use_backend("triton"):
        torch.manual_seed(0)
        eager = GPT(_gpt_config())
        compiled_model = copy.deepcopy(eager)
        # One eager call first: on CPU the first Triton-path call warns once that the interpreter
        # is slow (a Python warning, which dynamo would have to break the graph for). On CUDA
        # there is no such warning.
        with torch.no_grad():
            eager(tokens[0, :, :-1])
        explanation = torch._dynamo.explain(compiled_model)(tokens[0, :, :-1], tokens[0, :, 1:])
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1
        ops = set().union(*(_fasttx_ops_in(g) for g in explanation.graphs))
        assert {"fasttx.attention.default", "fasttx.dropout_add_layer_norm.default",
                "fasttx.bias_act.default"} <= ops, ops

        compiled = torch.compile(compiled_model, fullgraph=True, backend="inductor")
        runs = []
        for model, fwd in ((eager, eager), (compiled_model, compiled)):
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            losses = []
            for step in tokens:
                _, loss = fwd(step[:, :-1], step[:, 1:])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.detach())
            runs.append((torch.stack(losses), _params(model)))
    torch.testing.assert_close(runs[1][0], runs[0][0], atol=1e-5, rtol=1e-5)
    _assert_dicts_close(runs[1][1], runs[0][1], "parameters after 2 steps")


# ----------------------------------------------------------------------------------------------
# Multi-process checks (run inside the ranks)
# ----------------------------------------------------------------------------------------------
def _dt_compare(mesh, fn, tensors, placements, expect=None, atol=1e-5):
    """fn on DTensors (tensors distributed with `placements`) vs fn on the plain tensors: every
    output (full tensor) and every input gradient. `expect`: the output placements required (so
    a rule that silently all-gathers would fail)."""
    from torch.distributed.tensor import distribute_tensor

    plain = [t.clone().requires_grad_(t.is_floating_point()) for t in tensors]
    dts = [distribute_tensor(t.clone(), mesh, [pl]).requires_grad_(t.is_floating_point())
           for t, pl in zip(tensors, placements)]
    out_plain, out_dt = fn(*plain), fn(*dts)
    if not isinstance(out_plain, tuple):
        out_plain, out_dt = (out_plain,), (out_dt,)
    if expect is not None:
        got = [tuple(o.placements) for o in out_dt]
        assert got == [tuple(e) for e in expect], (fn, got, expect)
    g = torch.Generator().manual_seed(3)
    dys = [torch.randn(o.shape, generator=g) for o in out_plain]
    sum((o * dy).sum() for o, dy in zip(out_plain, dys)).backward()
    sum((o.full_tensor() * dy).sum() for o, dy in zip(out_dt, dys)).backward()
    for o_dt, o in zip(out_dt, out_plain):
        torch.testing.assert_close(o_dt.full_tensor(), o.detach(), atol=atol, rtol=atol)
    for i, (t_dt, t) in enumerate(zip(dts, plain)):
        if t.requires_grad:
            torch.testing.assert_close(t_dt.grad.full_tensor(), t.grad, atol=atol, rtol=atol, msg=f"grad {i}")


def check_dtensor_ops(mesh, rank):
    """Every fasttx op on DTensors: elementwise on any placement, norms and softmax sharded off
    the normalised dim (on it: DTensor all-gathers first, still correct), attention on batch and
    heads, with forward and backward through the sharding rules; dropout's masks."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    R, S = Replicate(), Shard
    torch.manual_seed(0)
    x, res = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    w, b = torch.randn(8), torch.randn(8)
    ln = lambda x, w, b: FF.layer_norm(x, (8,), w, b)  # noqa: E731
    for d in (0, 1):
        _dt_compare(mesh, ln, [x, w, b], [S(d), R, R], expect=[[S(d)]])
    _dt_compare(mesh, ln, [x, w, b], [S(2), R, R])  # normalised dim: redistributed, same result
    daln = lambda x, r, w, b: FF.dropout_add_layer_norm(x, r, (8,), w, b, 1e-5, 0.0, True)  # noqa: E731
    _dt_compare(mesh, daln, [x, res, w, b], [S(1), S(1), R, R], expect=[[S(1)], [S(1)]])
    for d in (0, 1):
        _dt_compare(mesh, lambda x: FF.softmax(x, -1), [x], [S(d)], expect=[[S(d)]])
    for d in (0, 2):
        _dt_compare(mesh, lambda x: FF.gelu(x, "tanh"), [x], [S(d)], expect=[[S(d)]])
    # column-parallel: input and bias sharded alike on the hidden dim; row-sharded: bias replicated
    _dt_compare(mesh, lambda x, b: FF.bias_gelu(x, b, "tanh"), [x, b], [S(2), S(0)], expect=[[S(2)]])
    _dt_compare(mesh, FF.bias_relu, [x, b], [S(1), R], expect=[[S(1)]])
    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))  # (B, H, L, E)
    for d, causal in ((1, True), (0, False)):
        sdpa = lambda q, k, v: FF.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
        _dt_compare(mesh, sdpa, [q, k, v], [S(d)] * 3, expect=[[S(d)]])

    # decoder ops: RMSNorm (plain and fused add), gated MLP activations, rotary on heads
    for d in (0, 1):
        _dt_compare(mesh, lambda x, w: FF.rms_norm(x, (8,), w, 1e-6), [x, w], [S(d), R], expect=[[S(d)]])
    add_rms = lambda x, r, w: FF.add_rms_norm(x, r, (8,), w, 1e-6, cast="llama")  # noqa: E731
    _dt_compare(mesh, add_rms, [x, res, w], [S(1), S(1), R], expect=[[S(1)], [S(1)]])
    _dt_compare(mesh, FF.swiglu, [x, res], [S(2), S(2)], expect=[[S(2)]])  # column-parallel gate, up
    _dt_compare(mesh, FF.swiglu, [x], [S(1)], expect=[[S(1)]])  # concatenated (gate | up)
    _dt_compare(mesh, FF.swiglu, [x], [S(2)])  # ... on the concatenated dim: gathered, same result
    cos, sin = torch.randn(6, 8), torch.randn(6, 8)
    rope = lambda q, k, c, s_: FF.apply_rotary_emb(q, k, c, s_)  # noqa: E731
    _dt_compare(mesh, rope, [q, k, cos, sin], [S(1), S(1), R, R], expect=[[S(1)], [S(1)]])

    # cross-entropy on the batch (rows), the LM head replicated; the reduction runs on DTensors
    logits, tgt = torch.randn(8, 11), torch.randint(0, 11, (8,))
    ce_rows = lambda z, t: FF.cross_entropy(z, t, reduction="none", label_smoothing=0.1)  # noqa: E731
    _dt_compare(mesh, ce_rows, [logits, tgt], [S(0), S(0)], expect=[[S(0)]])
    _dt_compare(mesh, FF.cross_entropy, [logits, tgt], [S(0), S(0)])  # mean
    xh, head = torch.randn(8, 6), torch.randn(11, 6)
    lce_rows = lambda a, w, t: FF.linear_cross_entropy(a, w, t, reduction="none")  # noqa: E731
    _dt_compare(mesh, lce_rows, [xh, head, tgt], [S(0), R, S(0)], expect=[[S(0)]])
    _dt_compare(mesh, FF.linear_cross_entropy, [xh, head, tgt], [S(0), R, S(0)])  # mean; dW a partial sum
    llp = lambda a, w, t: FF.linear_log_probs(a, w, t, temperature=0.7, return_entropy=True)  # noqa: E731
    _dt_compare(mesh, llp, [xh, head, tgt], [S(0), R, S(0)], expect=[[S(0)], [S(0)]])  # dW a partial sum
    # mixture-of-experts experts: tokens sharded, experts replicated; expert-sharded weights are
    # all-gathered by DTensor (no expert-parallel rule), still the single-process result
    gen = torch.Generator().manual_seed(4)
    xm, wm = torch.randn(8, 6, generator=gen), torch.rand(8, 2, generator=gen)
    im = torch.rand(8, 3, generator=gen).argsort(-1)[:, :2]
    w1m, w2m = torch.randn(3, 10, 6, generator=gen), torch.randn(3, 6, 5, generator=gen)
    _dt_compare(mesh, FF.moe_experts, [xm, im, wm, w1m, w2m], [S(0), S(0), S(0), R, R], expect=[[S(0)]])
    _dt_compare(mesh, FF.moe_experts, [xm, im, wm, w1m, w2m], [R, R, R, S(0), S(0)])
    # expert parallel: weights, biases and the global expert ids Shard(0), tokens replicated: each
    # rank runs its own experts' pairs and the output is a partial sum (Partial, no all-gather of
    # the weights); d hidden and d top_k_weights partial, weight and bias grads sharded
    from torch.distributed.tensor import Partial

    w1e, w2e = torch.randn(4, 10, 6, generator=gen), torch.randn(4, 6, 5, generator=gen)
    b1e, b2e = torch.randn(4, 10, generator=gen), torch.randn(4, 6, generator=gen)
    ie = torch.rand(8, 4, generator=gen).argsort(-1)[:, :2]
    ep = lambda x, i, w, w1, w2, b1, b2, ids: FF.moe_experts(  # noqa: E731
        x, i, w, w1, w2, gate_up_bias=b1, down_bias=b2, expert_ids=ids)
    _dt_compare(mesh, ep, [xm, ie, wm, w1e, w2e, b1e, b2e, torch.arange(4)], [R, R, R] + [S(0)] * 5,
                expect=[[Partial()]])
    dts = [distribute_tensor(t, mesh, [pl]).requires_grad_(t.is_floating_point())
           for t, pl in zip([xm, ie, wm, w1e, w2e, b1e, b2e, torch.arange(4)], [R, R, R] + [S(0)] * 5)]
    ep(*dts).to_local().sum().backward()
    assert tuple(dts[0].grad.placements) == (Partial(),) and tuple(dts[2].grad.placements) == (Partial(),)
    assert all(tuple(t.grad.placements) == (S(0),) for t in dts[3:7]), [t.grad.placements for t in dts[3:7]]
    # fasttx.flash on heads ((B, L, H, D): dim 2), window and softcap in the kernel
    from fasttx.flash import flash_attn_func

    qf, kf, vf = (torch.randn(2, 6, 4, 8) for _ in range(3))
    fl = lambda q, k, v: flash_attn_func(q, k, v, causal=True, window_size=(2, 0), softcap=5.0)  # noqa: E731
    _dt_compare(mesh, fl, [qf, kf, vf], [S(2)] * 3, expect=[[S(2)]])

    # Dropout: every rank's mask is the single-process mask, for a Replicate input and for a
    # sharded one (which DTensor all-gathers first, with a one-time warning).
    torch.manual_seed(5)
    y_single = FF.dropout(x, 0.5)
    keep = (y_single != 0).float()
    assert 0.2 < keep.mean().item() < 0.8
    for placement in (R, S(1)):
        xd = distribute_tensor(x.clone(), mesh, [placement]).requires_grad_()
        torch.manual_seed(5)
        yd = FF.dropout(xd, 0.5)
        assert yd.placements == (R,)
        torch.testing.assert_close(yd.to_local(), y_single, atol=0, rtol=0)
        yd.sum().backward()  # the gradient arrives replicated, whatever the input's placement
        torch.testing.assert_close(xd.grad.full_tensor(), keep * 2.0, atol=0, rtol=0)

    # Dropout fused into the sequence-parallel norm (documented in fasttx/distributed.py): each
    # shard is masked as a tensor of the shard's shape, with the rank's seed; the backward masks
    # in the same placement even when the gradient arrives replicated.
    xs, rs = (distribute_tensor(t.clone(), mesh, [S(1)]).requires_grad_() for t in (x, res))
    xl, rl = (t.to_local().detach().clone().requires_grad_() for t in (xs, rs))
    torch.manual_seed(5)
    y_sh, h_sh = FF.dropout_add_layer_norm(xs, rs, (8,), None, None, 1e-5, 0.5, True)
    assert y_sh.placements == h_sh.placements == (S(1),)
    torch.manual_seed(5)
    y_l, h_l = FF.dropout_add_layer_norm(xl, rl, (8,), None, None, 1e-5, 0.5, True)
    torch.testing.assert_close(y_sh.to_local(), y_l, atol=0, rtol=0)
    torch.testing.assert_close(h_sh.to_local(), h_l, atol=0, rtol=0)
    (y_sh.sum() + (h_sh * 3).sum()).backward()
    (y_l.sum() + (h_l * 3).sum()).backward()
    torch.testing.assert_close(xs.grad.full_tensor().chunk(WORLD, 1)[rank], xl.grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rs.grad.full_tensor().chunk(WORLD, 1)[rank], rl.grad, atol=1e-6, rtol=1e-6)

    # Attention dropout on heads: the same, and the backward follows the forward's placement.
    qs = distribute_tensor(q.clone(), mesh, [S(1)]).requires_grad_()
    ql = qs.to_local().detach().clone().requires_grad_()
    torch.manual_seed(5)
    o_sh = FF.scaled_dot_product_attention(qs, qs, qs, dropout_p=0.5)
    torch.manual_seed(5)
    o_l = FF.scaled_dot_product_attention(ql, ql, ql, dropout_p=0.5)
    torch.testing.assert_close(o_sh.to_local(), o_l, atol=1e-6, rtol=1e-6)
    o_sh.sum().backward()
    o_l.sum().backward()
    torch.testing.assert_close(qs.grad.full_tensor().chunk(WORLD, 1)[rank], ql.grad, atol=1e-5, rtol=1e-5)


class _Attention(tnn.Module):
    """Causal self-attention with separate q, k, v projections (a tensor-parallel plan shards each
    on its output dim, i.e. on heads)."""

    def __init__(self, C, n_head):
        super().__init__()
        self.n_head = n_head
        self.q, self.k, self.v, self.o = (tnn.Linear(C, C) for _ in range(4))

    def forward(self, x):
        B, T, C = x.shape
        hd = C // self.n_head
        q, k, v = (p(x).view(B, T, -1, hd).transpose(1, 2) for p in (self.q, self.k, self.v))  # (B, nh, T, hd)
        y = FF.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hd)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, C)


class _MLP(tnn.Module):
    def __init__(self, C):
        super().__init__()
        self.fc, self.proj = tnn.Linear(C, 4 * C), tnn.Linear(4 * C, C)

    def forward(self, x):
        # fc's bias is added inside the fused activation (column-sharded with fc's output)
        return self.proj(FF.bias_gelu(torch.nn.functional.linear(x, self.fc.weight), self.fc.bias, "tanh"))


class TPBlock(tnn.Module):
    """Pre-LN transformer block of fasttx ops: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, C=16, n_head=4):
        super().__init__()
        import fasttx.nn as fnn

        self.ln_1, self.attn = fnn.LayerNorm(C), _Attention(C, n_head)
        self.ln_2, self.mlp = fnn.LayerNorm(C), _MLP(C)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def tp_plan():
    """Megatron-style tensor parallel with sequence parallel norms: the residual stream is split
    on the sequence dim (1), attention on heads, the MLP on its hidden dim."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel,
    )

    gather = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    return {
        "ln_1": SequenceParallel(), "ln_2": SequenceParallel(),
        "attn": gather, "mlp": gather,
        "attn.q": ColwiseParallel(use_local_output=False),
        "attn.k": ColwiseParallel(use_local_output=False),
        "attn.v": ColwiseParallel(use_local_output=False),
        "attn.o": RowwiseParallel(output_layouts=Shard(1)),
        "mlp.fc": ColwiseParallel(use_local_output=False),
        "mlp.proj": RowwiseParallel(output_layouts=Shard(1)),
    }


def check_tp_block(mesh, rank):
    """A tensor + sequence parallel block equals the single-process block: outputs, the input's
    and every parameter's gradient."""
    from torch.distributed.tensor.parallel import parallelize_module

    torch.manual_seed(0)
    single = TPBlock()
    tp = parallelize_module(copy.deepcopy(single), mesh, tp_plan())
    x = torch.randn(2, 6, 16)
    dy = torch.randn(2, 6, 16)
    x1 = x.clone().requires_grad_()
    out = single(x1)
    (out * dy).sum().backward()
    # this rank's sequence slice in, its slice out (the residual stream stays sequence-sharded)
    x_local = x.chunk(WORLD, dim=1)[rank].clone().requires_grad_()
    out_local = tp(x_local)
    assert isinstance(out_local, torch.Tensor) and out_local.shape == (2, 6 // WORLD, 16)
    (out_local * dy.chunk(WORLD, dim=1)[rank]).sum().backward()
    torch.testing.assert_close(out_local, out.detach().chunk(WORLD, dim=1)[rank], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_local.grad, x1.grad.chunk(WORLD, dim=1)[rank], atol=1e-5, rtol=1e-5)
    _assert_dicts_close(_grads(tp), _grads(single), "TP vs single-process gradients")


def _fsdp_train(mesh, rank, dropout=0.0, use_reentrant=None, steps=2, config=None):
    """GPT with fully_shard per block (and the root), each rank on its half of every batch;
    SGD with momentum. Returns (per-step full-batch losses, parameters after the steps, the
    gradients of the last step), gathered to full tensors."""
    from torch.distributed.fsdp import fully_shard

    from fasttx.models import GPT

    torch.manual_seed(0)
    model = GPT(config or _gpt_config(dropout=dropout))
    if use_reentrant is not None:
        _checkpoint_blocks(model, use_reentrant)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for tokens in _tokens(steps):
        half = tokens[rank * 2:(rank + 1) * 2]
        torch.manual_seed(11)
        _, loss = model(half[:, :-1], half[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = _grads(model)
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)  # the two half-batch means average to the full-batch mean
        losses.append(mean / WORLD)
    return torch.stack(losses), _params(model), grads


def check_fsdp_gpt(mesh, rank):
    """FSDP2 per block equals one process on the whole batch: losses, parameters after 2 steps."""
    from fasttx.models import GPT

    losses, params, _ = _fsdp_train(mesh, rank)
    torch.manual_seed(0)
    model = GPT(_gpt_config())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref = []
    for tokens in _tokens(2):
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ref.append(loss.detach())
    torch.testing.assert_close(losses, torch.stack(ref), atol=1e-5, rtol=1e-5)
    _assert_dicts_close(params, _params(model), "FSDP2 vs single-process parameters")


def check_fsdp_checkpoint(mesh, rank):
    """Under FSDP2, checkpointed blocks with dropout (both use_reentrant modes) give the gradients
    and losses of the same run without checkpointing: the recomputation redraws the same seeds."""
    losses, _, grads = _fsdp_train(mesh, rank, dropout=0.25, steps=1)
    for reentrant in (False, True):
        losses_c, _, grads_c = _fsdp_train(mesh, rank, dropout=0.25, use_reentrant=reentrant, steps=1)
        torch.testing.assert_close(losses_c, losses, atol=0, rtol=0)
        _assert_dicts_close(grads_c, grads, f"use_reentrant={reentrant}", atol=1e-6, rtol=1e-6)


def check_fsdp_hf_gpt2(mesh, rank):
    """A HuggingFace GPT-2 patched with apply_fasttx, fully_shard per block: loss and gradients
    equal the single-process patched model on the whole batch."""
    transformers = pytest.importorskip("transformers")
    from torch.distributed.fsdp import fully_shard

    from fasttx.integrations.huggingface import apply_fasttx

    cfg = transformers.GPT2Config(vocab_size=V, n_embd=16, n_layer=2, n_head=2, n_positions=16,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    single = apply_fasttx(transformers.GPT2LMHeadModel(cfg))
    sharded = copy.deepcopy(single)
    for block in sharded.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    ids = _tokens(1)[0]
    loss = single(input_ids=ids, labels=ids).loss
    loss.backward()
    half = ids[rank * 2:(rank + 1) * 2]
    loss_half = sharded(input_ids=half, labels=half).loss
    loss_half.backward()
    mean = loss_half.detach().clone()
    dist.all_reduce(mean)
    torch.testing.assert_close(mean / WORLD, loss.detach(), atol=1e-5, rtol=1e-5)
    _assert_dicts_close(_grads(sharded), _grads(single), "HF GPT-2 FSDP2 vs single-process gradients")


def check_compile_dtensor(mesh, rank):
    """torch.compile(fullgraph) of fasttx ops on DTensor inputs: no graph break, eager's result."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    torch.manual_seed(0)
    x = distribute_tensor(torch.randn(2, 4, 8), mesh, [Shard(1)])
    w = distribute_tensor(torch.randn(8), mesh, [Replicate()])
    q = distribute_tensor(torch.randn(2, 4, 6, 8), mesh, [Shard(1)])

    def f(x, w, q):
        y = FF.gelu(FF.layer_norm(x, (8,), w, None), "tanh")
        return y, FF.scaled_dot_product_attention(q, q, q, is_causal=True)

    explanation = torch._dynamo.explain(f)(x, w, q)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(x, w, q), f(x, w, q)):
        assert got.placements == want.placements
        torch.testing.assert_close(got.full_tensor(), want.full_tensor(), atol=1e-6, rtol=1e-6)


def check_moe_all_to_all(mesh, rank):
    """Expert parallel with the token exchange (fasttx.expert_parallel): each rank holds half the
    tokens and half the experts; output and every gradient equal one process on all of them
    (this rank's rows and experts), with a gpt-oss layout and biases; routing uneven (a rank can
    receive more pairs than it sends)."""
    from fasttx.expert_parallel import moe_experts_all_to_all

    gen = torch.Generator().manual_seed(6)
    T, H, NI, E, k = 10, 8, 6, 4, 2
    x, w = torch.randn(T, H, generator=gen), torch.rand(T, k, generator=gen)
    idx = torch.rand(T, E, generator=gen).argsort(-1)[:, :k]
    idx[:3] = torch.tensor([0, 1])  # three tokens whose experts both live on rank 0
    w1, w2 = torch.randn(E, H, 2 * NI, generator=gen), torch.randn(E, NI, H, generator=gen)
    b1, b2 = torch.randn(E, 2 * NI, generator=gen), torch.randn(E, H, generator=gen)
    kw = dict(activation="clamped_swiglu", gate_up_interleaved=True, transposed=True, limit=1.5)
    dy = torch.randn(T, H, generator=gen)
    full = [t.clone().requires_grad_() for t in (x, w, w1, w2, b1, b2)]
    out = FF.moe_experts(full[0], idx, full[1], full[2], full[3], gate_up_bias=full[4], down_bias=full[5], **kw)
    (out * dy).sum().backward()
    rows = slice(rank * T // WORLD, (rank + 1) * T // WORLD)
    exps = slice(rank * E // WORLD, (rank + 1) * E // WORLD)
    mine = [t[sl].clone().requires_grad_() for t, sl in zip((x, w, w1, w2, b1, b2), (rows, rows) + (exps,) * 4)]
    got = moe_experts_all_to_all(mine[0], idx[rows], mine[1], mine[2], mine[3], gate_up_bias=mine[4],
                                 down_bias=mine[5], **kw)
    (got * dy[rows]).sum().backward()
    torch.testing.assert_close(got, out[rows].detach(), atol=1e-5, rtol=1e-5)
    for name, m, f, sl in zip(("x", "w", "w1", "w2", "b1", "b2"), mine, full, (rows, rows) + (exps,) * 4):
        torch.testing.assert_close(m.grad, f.grad[sl], atol=1e-5, rtol=1e-5, msg=name)


def check_fsdp_moe_gpt(mesh, rank):
    """A mixture-of-experts GPT (fasttx.nn.MoE blocks, the moe_experts kernels) under FSDP2 equals
    one process: losses and parameters after 2 steps. The load-balancing loss is left out
    (coefficient 0): it is not a mean over tokens, so two half-batch values do not average to the
    full batch's."""
    import dataclasses

    from fasttx.models import GPT

    config = dataclasses.replace(_gpt_config(), n_experts=3, moe_top_k=2, moe_aux_loss_coef=0.0)
    losses, params, _ = _fsdp_train(mesh, rank, config=config)
    torch.manual_seed(0)
    model = GPT(config)
    assert type(model.transformer.h[0].mlp).__name__ == "MoE"
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref = []
    for tokens in _tokens(2):
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ref.append(loss.detach())
    torch.testing.assert_close(losses, torch.stack(ref), atol=1e-5, rtol=1e-5)
    _assert_dicts_close(params, _params(model), "FSDP2 vs single-process parameters (MoE)")


_CHECKS = {
    "dtensor_ops": check_dtensor_ops,
    "tp_block": check_tp_block,
    "fsdp_gpt": check_fsdp_gpt,
    "fsdp_moe_gpt": check_fsdp_moe_gpt,
    "moe_all_to_all": check_moe_all_to_all,
    "fsdp_checkpoint": check_fsdp_checkpoint,
    "fsdp_hf_gpt2": check_fsdp_hf_gpt2,
    "compile_dtensor": check_compile_dtensor,
}


def _worker(rank, port, out_dir):
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    results = {}
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        for name, check in _CHECKS.items():
            t0 = time.perf_counter()
            try:
                with fasttx.use_backend("triton"):
                    check(mesh, rank)
                results[name] = ("ok", time.perf_counter() - t0)
            except pytest.skip.Exception as e:
                results[name] = ("skip", str(e))
            except Exception:
                results[name] = ("fail", traceback.format_exc())
            torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
            dist.barrier()  # both ranks enter the next check's collectives together
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    out_dir = str(tmp_path_factory.mktemp("dist"))
    ctx = mp.start_processes(_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                break
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)
    results = []
    for rank in range(WORLD):
        path = os.path.join(out_dir, f"rank{rank}.pt")
        results.append(torch.load(path, weights_only=False) if os.path.exists(path) else {})
    return results


@pytest.mark.parametrize("check", list(_CHECKS))
def test_multi_process(rank_results, check):
    outcomes = [r.get(check) for r in rank_results]
    for rank, outcome in enumerate(outcomes):
        assert outcome is not None, f"rank {rank} never finished check {check!r} (crash or timeout)"
        if outcome[0] == "skip":
            pytest.skip(outcome[1])
        assert outcome[0] == "ok", f"rank {rank}:\n{outcome[1]}"


@pytest.mark.gpu
def test_fsdp2_mixed_precision_on_cuda():
    """FSDP2 with a bf16 MixedPrecisionPolicy (fp32 reductions) on the Triton kernels, one NCCL
    rank: the losses follow the same run on torch's ops within bf16 tolerance, and fall."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from fasttx.models import GPT

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        tokens = _tokens(steps=8, batch=8).cuda()
        runs = {}
        for backend in ("triton", "torch"):
            with fasttx.use_backend(backend):
                torch.manual_seed(0)
                model = GPT(_gpt_config()).cuda()
                mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                for block in model.transformer.h:
                    fully_shard(block, mp_policy=mp_policy)
                fully_shard(model, mp_policy=mp_policy)
                opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
                losses = []
                for step in tokens:
                    _, loss = model(step[:, :-1], step[:, 1:])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    losses.append(loss.item())
                runs[backend] = torch.tensor(losses)
        torch.testing.assert_close(runs["triton"], runs["torch"], atol=3e-2, rtol=3e-2)
        assert runs["triton"][-1] < runs["triton"][0]
    finally:
        dist.destroy_process_group()


def test_every_fasttx_custom_op_has_a_sharding_rule_registered_when_dtensor_loads():
    # A new custom op without a rule (or an op module that does not register its rules as it
    # loads) would make DTensor fail with "no sharding strategy" only for users of that op.
    code = (
        "import importlib, pkgutil, torch, torch.distributed.tensor\n"
        "import fasttx.ops, fasttx.distributed as D\n"
        "for m in pkgutil.iter_modules(fasttx.ops.__path__):\n"
        "    importlib.import_module('fasttx.ops.' + m.name)\n"
        "defined = set(D._defined_fasttx_ops())\n"
        "missing = sorted(defined - set(D.registered_ops()))\n"
        "print('missing', missing, len(defined))\n"
    )
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().startswith("missing []"), r.stdout
