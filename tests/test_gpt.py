"""fasttx.models.GPT: the forward pass and every gradient against an fp64 oracle (the same
architecture built from torch.nn only), both backends; KV-cache generation; config presets; the
torch.nn twin; weight tying; dropout; torch.compile; training; errors."""
import math

import pytest
import torch
import torch.nn.functional as F

import fasttx
from fasttx.models import GPT, GPTConfig
from fasttx.nn.positional import PositionalEncoding

from utils import ATOL_FLOOR, DTYPES

V = 37  # odd vocabulary size


def tiny(**overrides) -> GPTConfig:
    cfg = dict(vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    cfg.update(overrides)
    return GPTConfig(**cfg)


def make(config, impl="fasttx", seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return GPT(config, impl=impl).to(dtype)


def twin(model, impl="torch", dtype=None):
    """The same weights in the other implementation (and optionally another dtype)."""
    other = GPT(model.config, impl=impl)
    other.load_state_dict(model.state_dict())
    return other.to(dtype or next(model.parameters()).dtype)


def grads(model):
    return {n: p.grad for n, p in model.named_parameters()}


def run(model, idx, targets, g_logits):
    """logits and the gradients of sum(logits * g_logits) + loss w.r.t. every parameter."""
    model.zero_grad(set_to_none=True)
    logits, loss = model(idx, targets)
    ((logits.float() * g_logits).sum() + loss).backward()
    return logits.detach(), loss.detach(), grads(model)


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,layers,heads,embd", [
    ("gpt2", 12, 12, 768), ("gpt2-medium", 24, 16, 1024), ("gpt2-large", 36, 20, 1280), ("gpt2-xl", 48, 25, 1600),
])
def test_presets(name, layers, heads, embd):
    cfg = GPTConfig.preset(name)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size, cfg.block_size, cfg.bias) == (
        layers, heads, embd, 50257, 1024, True)
    assert GPTConfig.preset(name, dropout=0.1, vocab_size=50304).dropout == 0.1


def test_gpt2_parameter_count():
    # Built on the meta device: no memory, no time. Per block: c_attn 3C^2+3C, c_proj C^2+C,
    # c_fc 4C^2+4C, mlp.c_proj 4C^2+C, two LayerNorms 4C; plus wte, wpe and ln_f (tied head).
    # For GPT-2 small this is the published 124,439,808.
    cfg = GPTConfig.preset("gpt2")
    with torch.device("meta"):
        model = GPT(cfg)
    C, L = cfg.n_embd, cfg.n_layer
    expected = cfg.vocab_size * C + cfg.block_size * C + L * (12 * C * C + 13 * C) + 2 * C
    assert model.num_params(non_embedding=False) == expected
    assert model.num_params() == expected - cfg.block_size * C


def test_config_errors():
    with pytest.raises(ValueError, match="name must be one of"):
        GPTConfig.preset("gpt3")
    with pytest.raises(TypeError, match=r"unknown field\(s\) \['n_layers'\]"):
        GPTConfig.preset("gpt2", n_layers=3)
    with pytest.raises(ValueError, match=r"n_embd \(30\) must be divisible by n_head \(4\)"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="pos_encoding must be one of"):
        GPTConfig(pos_encoding="rotary")
    with pytest.raises(ValueError, match="dropout must be in"):
        GPTConfig(dropout=1.0)
    with pytest.raises(ValueError, match="n_layer must be a positive int"):
        GPTConfig(n_layer=0)
    with pytest.raises(ValueError, match="impl must be one of"):
        GPT(tiny(), impl="jax")
    with pytest.raises(TypeError, match="config must be a GPTConfig"):
        GPT(dict(n_layer=1))


# ----------------------------------------------------------------------------------------------
# Structure
# ----------------------------------------------------------------------------------------------
def test_torch_twin_has_the_same_state_dict():
    a = make(tiny())
    b = GPT(tiny(), impl="torch")
    assert list(a.state_dict()) == list(b.state_dict())
    b.load_state_dict(a.state_dict())  # strict
    assert not any(type(m).__module__.startswith("fasttx.nn") for m in b.modules())
    assert isinstance(a.transformer.h[0].ln_1, fasttx.nn.LayerNorm)
    assert not isinstance(b.transformer.h[0].ln_1, fasttx.nn.LayerNorm)


def test_weight_tying_survives_a_state_dict_round_trip(tmp_path):
    a = make(tiny())
    assert a.lm_head.weight is a.transformer.wte.weight
    path = tmp_path / "gpt.pt"
    torch.save(a.state_dict(), path)
    b = make(tiny(), seed=1)
    b.load_state_dict(torch.load(path, weights_only=True))
    assert b.lm_head.weight is b.transformer.wte.weight
    idx = torch.randint(0, V, (2, 9))
    torch.testing.assert_close(b(idx)[0], a(idx)[0], atol=0, rtol=0)


def test_sinusoidal_uses_positional_encoding():
    m = make(tiny(pos_encoding="sinusoidal"))
    assert isinstance(m.transformer.wpe, PositionalEncoding)
    assert not any("wpe" in n for n, _ in m.named_parameters())
    assert not any("wpe" in k for k in m.state_dict())
    assert m.num_params() == m.num_params(non_embedding=False)


def test_configure_optimizers_decays_matrices_only():
    m = make(tiny())
    opt = m.configure_optimizers(weight_decay=0.1, learning_rate=1e-3)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in m.parameters())  # each parameter exactly once


# ----------------------------------------------------------------------------------------------
# Forward and gradients against the fp64 oracle
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pos_encoding,bias", [("learned", True), ("sinusoidal", False)])
def test_forward_and_gradients(backend, dtype, pos_encoding, bias):
    """Logits, loss and the gradient of every parameter: fasttx (this backend) vs torch.nn in the
    same dtype, both against the fp64 torch.nn model, by the 2x rule (TESTING.md)."""
    cfg = tiny(pos_encoding=pos_encoding, bias=bias, n_embd=24, block_size=12)  # hidden 24: not a power of 2
    ours = make(cfg, dtype=dtype)
    pt = twin(ours, "torch", dtype)
    oracle = twin(ours, "torch", torch.float64)
    torch.manual_seed(1)
    idx = torch.randint(0, V, (2, 11))
    targets = torch.randint(0, V, (2, 11))
    targets[0, 3] = -1  # ignored position
    g = torch.randn(2, 11, V) * 0.1
    lo, so, go = run(ours, idx, targets, g)
    lp, sp, gp = run(pt, idx, targets, g)
    lr, sr, gr = run(oracle, idx, targets, g)
    assert lo.dtype == dtype and lo.shape == (2, 11, V)
    assert so.dtype == torch.float32  # cross-entropy in fp32 whatever the model dtype
    floor = ATOL_FLOOR[dtype]

    def check(name, a, p, r, mult):
        err = (a.double() - r).abs().max().item()
        pt_err = (p.double() - r).abs().max().item()
        assert err <= mult * pt_err + floor, (
            f"{name}: max error {err:.3e} vs torch's {pt_err:.3e}")

    check("logits", lo, lp, lr, 2)
    check("loss", so, sp, sr, 2)
    for name in gr:
        check(f"grad {name}", go[name], gp[name], gr[name], 3)


def test_fasttx_and_torch_twins_agree_exactly_on_the_reference_path():
    # On the reference path fasttx's ops are torch's own: the two implementations must give
    # bit-identical results (a test of the fused-op plumbing: every LayerNorm in the right place).
    with fasttx.use_backend("torch"):
        ours = make(tiny())
        pt = twin(ours)
        idx = torch.randint(0, V, (3, 16))
        g = torch.randn(3, 16, V)
        lo, so, go = run(ours, idx, idx, g)
        lp, sp, gp = run(pt, idx, idx, g)
    assert torch.equal(lo, lp) and torch.equal(so, sp)
    for name in go:
        assert torch.equal(go[name], gp[name]), name


def test_loss_matches_cross_entropy():
    m = make(tiny())
    idx = torch.randint(0, V, (2, 7))
    targets = idx.roll(-1, 1)
    targets[:, -1] = -1
    logits, loss = m(idx, targets)
    expected = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-1)
    torch.testing.assert_close(loss, expected)
    assert m(idx)[1] is None


def test_non_contiguous_idx():
    m = make(tiny())
    wide = torch.randint(0, V, (2, 14))
    idx = wide[:, ::2]
    assert not idx.is_contiguous()
    torch.testing.assert_close(m(idx)[0], m(idx.contiguous())[0], atol=0, rtol=0)


def test_zero_size_batch(backend):
    m = make(tiny())
    logits, loss = m(torch.empty(0, 5, dtype=torch.long))
    assert logits.shape == (0, 5, V) and loss is None


def test_nan_propagates(backend):
    m = make(tiny())
    with torch.no_grad():
        m.transformer.wte.weight[3, 0] = float("nan")
    idx = torch.tensor([[1, 2, 3, 4, 5]])
    logits = m(idx)[0]
    # token 3 sits at position 2: it and every later position attend to it. (Earlier positions
    # are not checked: torch's own math path multiplies the masked NaN value by 0 -> NaN too.)
    assert torch.isnan(logits[0, 2:]).all()


# ----------------------------------------------------------------------------------------------
# Dropout
# ----------------------------------------------------------------------------------------------
def test_dropout_is_reproducible_and_deterministic(backend):
    m = make(tiny(dropout=0.2, n_layer=1))
    idx = torch.randint(0, V, (1, 6))

    def step(seed):
        m.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        loss = m(idx, idx)[1]
        loss.backward()
        return loss.detach(), grads(m)

    l1, g1 = step(5)
    l2, g2 = step(5)
    l3, _ = step(6)
    assert torch.equal(l1, l2), "same seed, same dropout masks"
    for name in g1:
        assert torch.equal(g1[name], g2[name]), f"backward not deterministic: {name}"
    assert not torch.equal(l1, l3), "a different seed must drop different units"
    m.eval()
    a, b = m(idx, idx)[1], m(idx, idx)[1]
    assert torch.equal(a, b), "no dropout in eval mode"


# ----------------------------------------------------------------------------------------------
# Generation and the KV cache
# ----------------------------------------------------------------------------------------------
# Each KV-cache test runs the cache logic on both backends; the positional-encoding variants
# differ only in the embedding, so the Triton interpreter (slow) runs one of them.
CACHE_CASES = [("reference", "learned"), ("reference", "sinusoidal"), ("triton", "learned")]


@pytest.mark.parametrize("backend_name,pos_encoding", CACHE_CASES)
def test_decode_path_matches_full_forward(backend_name, pos_encoding):
    """Prefill 5 tokens into the cache, then decode the rest one by one: every position's hidden
    state equals the full causal forward's."""
    from fasttx.models.gpt import KVCache

    m = make(tiny(pos_encoding=pos_encoding, block_size=10)).eval()
    idx = torch.randint(0, V, (2, 9))
    with fasttx.use_backend(backend_name), torch.no_grad():
        full = m._forward_hidden(idx)  # (B, T, C)
        cache = KVCache(m.config.n_layer, m.config.block_size)
        parts = [m._forward_hidden(idx[:, :5], cache, 0)]
        for t in range(5, 9):
            parts.append(m._forward_hidden(idx[:, t: t + 1], cache, t))
        # a chunk of several new tokens after cached ones (bottom-right causal mask)
        cache2 = KVCache(m.config.n_layer, m.config.block_size)
        m._forward_hidden(idx[:, :5], cache2, 0)
        chunk = m._forward_hidden(idx[:, 5:], cache2, 5)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(chunk, full[:, 5:], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend_name,pos_encoding", CACHE_CASES)
def test_greedy_generation_with_cache_equals_recomputation(backend_name, pos_encoding):
    """Greedy decoding with the KV cache == recomputing the whole sequence every step, also past
    block_size (8) where the window slides: 3 prompt tokens + 8 new ones."""
    m = make(tiny(pos_encoding=pos_encoding, block_size=8)).eval()
    idx = torch.randint(0, V, (2, 3))
    with fasttx.use_backend(backend_name):
        cached = m.generate(idx, 8, temperature=0.0, use_cache=True)
        recomputed = m.generate(idx, 8, temperature=0.0, use_cache=False)
    assert cached.shape == (2, 11) and cached.dtype == torch.long
    assert torch.equal(cached[:, :3], idx)
    assert torch.equal(cached, recomputed)


def test_recomputation_is_the_cropped_full_forward():
    """use_cache=False, the oracle above, by hand: each greedy token is the argmax of the full
    forward on the prefix cropped to its last block_size tokens."""
    m = make(tiny(block_size=8)).eval()
    out = m.generate(torch.randint(0, V, (2, 3)), 8, temperature=0.0, use_cache=False)
    for t in range(3, 11):
        ctx = out[:, max(0, t - 8): t]
        assert torch.equal(m(ctx)[0][:, -1].argmax(-1), out[:, t])


def test_sampling():
    m = make(tiny()).eval()
    idx = torch.randint(0, V, (3, 4))
    greedy = m.generate(idx, 8, temperature=0.0)
    assert torch.equal(m.generate(idx, 8, temperature=1.5, top_k=1), greedy)  # top-1 is greedy
    torch.manual_seed(3)
    a = m.generate(idx, 8, temperature=2.0)
    torch.manual_seed(3)
    b = m.generate(idx, 8, temperature=2.0, use_cache=False)
    assert torch.equal(a, b), "torch.manual_seed reproduces sampling, cache or not"
    assert ((a >= 0) & (a < V)).all()
    # top_k restricts the choice to the k most likely tokens of each step
    torch.manual_seed(4)
    out = m.generate(idx, 6, temperature=5.0, top_k=3)
    for t in range(4, 10):
        top3 = m(out[:, :t])[0][:, -1].topk(3, dim=-1).indices
        assert (top3 == out[:, t: t + 1]).any(-1).all()
    assert torch.equal(m.generate(idx, 0), idx)


def test_generate_keeps_training_mode_and_grads():
    m = make(tiny()).train()
    m.generate(torch.zeros(1, 1, dtype=torch.long), 3)
    assert m.training
    assert all(p.grad is None for p in m.parameters())


def test_bad_inputs():
    m = make(tiny())
    idx = torch.randint(0, V, (2, 5))
    with pytest.raises(ValueError, match=r"idx must be an int64 tensor of shape \(B, T\)"):
        m(idx.int())
    with pytest.raises(ValueError, match=r"idx must be an int64 tensor of shape \(B, T\)"):
        m(idx[0])
    with pytest.raises(ValueError, match="targets must have idx's shape"):
        m(idx, idx[:, :3])
    with pytest.raises(ValueError, match="block_size is 16"):
        m(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        m.generate(idx, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        m.generate(idx, 2, top_k=0)
    with pytest.raises(ValueError, match="max_new_tokens must be a non-negative int"):
        m.generate(idx, -1)
    with pytest.raises(ValueError, match="at least one token"):
        m.generate(idx[:, :0], 2)


# ----------------------------------------------------------------------------------------------
# Training and torch.compile
# ----------------------------------------------------------------------------------------------
def test_training_loss_decreases_on_random_tokens(backend):
    torch.manual_seed(0)
    m = make(tiny(dropout=0.1))
    opt = m.configure_optimizers(weight_decay=0.01, learning_rate=2e-2)
    idx = torch.randint(0, V, (2, 9))
    losses = []
    for _ in range(10):
        _, loss = m(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(V), abs=0.3)  # starts near chance
    assert losses[-1] < 0.6 * losses[0], losses  # memorises the batch


def test_torch_compile_fullgraph():
    with fasttx.use_backend("torch"):
        m = make(tiny(dropout=0.0))
        idx = torch.randint(0, V, (2, 10))
        eager_logits, eager_loss = m(idx, idx)
        eager_loss.backward()
        eager_grads = {n: g.clone() for n, g in grads(m).items()}
        m.zero_grad(set_to_none=True)
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
        logits, loss = compiled(idx, idx)
        loss.backward()
    torch.testing.assert_close(logits, eager_logits, atol=1e-5, rtol=1e-5)
    for name, g in grads(m).items():
        torch.testing.assert_close(g, eager_grads[name], atol=1e-5, rtol=1e-5, msg=name)
