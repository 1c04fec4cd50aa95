"""fasttx.models.GPT: the forward pass and every gradient against an fp64 oracle (GPT-2's forward
written out below with torch.nn.functional over the model's parameters), both backends; KV-cache
generation; config presets; the torch-path twin; weight tying; dropout; torch.compile; training;
checkpoint compatibility; errors."""
import math

import pytest
import torch
import torch.nn.functional as F

import fasttx
from fasttx.models import GPT, GPTConfig
from fasttx.nn.positional import PositionalEncoding, sinusoidal_table

from utils import ATOL_FLOOR, DTYPES

V = 37  # odd vocabulary size


def tiny(**overrides) -> GPTConfig:
    cfg = dict(vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    cfg.update(overrides)
    return GPTConfig(**cfg)


TORCH = "torch"  # fasttx's torch path


def make(config, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return GPT(config).to(dtype)


def twin(model, dtype=None):
    """The same weights in a second model (optionally in another dtype)."""
    other = GPT(model.config)
    other.load_state_dict(model.state_dict())
    return other.to(dtype or next(model.parameters()).dtype)


def plain_forward(m, idx):
    """The model's forward written out with torch.nn.functional over m's parameters: GPT-2's
    (pre-LN, tied head) and each Llama-style option (RMSNorm, rotary by HF's rotate_half, SwiGLU,
    grouped-query attention by repeating k/v heads, untied head). No fasttx op and none of the
    model's plumbing, so a misplaced norm or a wrong position in the model shows here. Dropout is
    not modelled (use it with dropout 0 or in eval mode)."""
    tr, cfg = m.transformer, m.config
    B, T = idx.shape
    C, nh = cfg.n_embd, cfg.n_head
    nkv, hd = cfg.n_kv_head or nh, C // nh

    def norm(mod, x):
        if cfg.norm == "rmsnorm":
            return F.rms_norm(x, (C,), mod.weight, cfg.norm_eps)
        return F.layer_norm(x, (C,), mod.weight, mod.bias, cfg.norm_eps)

    def rope(x):  # x (B, heads, T, hd); HF Llama's apply_rotary_pos_emb
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        freqs = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    h = F.embedding(idx, tr.wte.weight)  # (B, T, C)
    if cfg.pos_encoding == "learned":
        h = h + tr.wpe.weight[:T]
    elif cfg.pos_encoding == "sinusoidal":
        h = h + sinusoidal_table(T, C, dtype=h.dtype)
    for blk in tr.h:
        a = norm(blk.ln_1, h)
        q, k, v = F.linear(a, blk.attn.c_attn.weight, blk.attn.c_attn.bias).split([nh * hd, nkv * hd, nkv * hd], 2)
        q = q.reshape(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
        k, v = (t.reshape(B, T, nkv, hd).transpose(1, 2) for t in (k, v))  # (B, nkv, T, hd)
        if cfg.pos_encoding == "rotary":
            q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        att = att.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        h = h + F.linear(y, blk.attn.c_proj.weight, blk.attn.c_proj.bias)
        a = F.linear(norm(blk.ln_2, h), blk.mlp.c_fc.weight, blk.mlp.c_fc.bias)
        if cfg.mlp == "swiglu":
            gate, up = a.chunk(2, dim=-1)
            a = F.silu(gate) * up
        else:
            a = F.gelu(a, approximate="tanh")
        h = h + F.linear(a, blk.mlp.c_proj.weight, blk.mlp.c_proj.bias)
    return F.linear(norm(tr.ln_f, h), m.lm_head.weight)  # (B, T, vocab)


# Each Llama-style option on its own, and all of them together (with grouped-query attention).
LLAMA = dict(norm="rmsnorm", pos_encoding="rotary", mlp="swiglu", bias=False, tie_weights=False)
OPTIONS = {
    "rmsnorm": dict(norm="rmsnorm"),
    "rotary": dict(pos_encoding="rotary"),
    "swiglu": dict(mlp="swiglu"),
    "gqa": dict(n_head=4, n_kv_head=2),
    "untied": dict(tie_weights=False),
    "llama": dict(LLAMA, n_head=4, n_kv_head=1),
}


def plain_loss(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)


def grads(model):
    return {n: p.grad for n, p in model.named_parameters()}


def run(model, idx, targets, g_logits):
    """logits and the gradients of sum(logits * g_logits) + loss w.r.t. every parameter."""
    model.zero_grad(set_to_none=True)
    logits, loss = model(idx, targets, return_logits=True)
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
        GPTConfig(pos_encoding="alibi")
    with pytest.raises(ValueError, match="norm must be one of"):
        GPTConfig(norm="batchnorm")
    with pytest.raises(ValueError, match="mlp must be one of"):
        GPTConfig(mlp="relu")
    with pytest.raises(ValueError, match=r"n_head \(12\) must be a multiple of n_kv_head \(5\)"):
        GPTConfig(n_kv_head=5)
    with pytest.raises(ValueError, match="n_kv_head must be a positive int or None"):
        GPTConfig(n_kv_head=0)
    with pytest.raises(ValueError, match="rotary needs an even head size"):
        GPTConfig(n_embd=36, n_head=4, pos_encoding="rotary")
    with pytest.raises(ValueError, match="dropout must be in"):
        GPTConfig(dropout=1.0)
    with pytest.raises(ValueError, match="n_layer must be a positive int"):
        GPTConfig(n_layer=0)
    with pytest.raises(TypeError, match="config must be a GPTConfig"):
        GPT(dict(n_layer=1))


# ----------------------------------------------------------------------------------------------
# Structure
# ----------------------------------------------------------------------------------------------
def test_one_implementation_on_fasttx_layers():
    # The torch-built twin is the same model under use_backend: there is no second implementation.
    m = make(tiny())
    assert isinstance(m.transformer.h[0].ln_1, fasttx.nn.LayerNorm)
    assert isinstance(m.transformer.ln_f, fasttx.nn.LayerNorm)
    with pytest.raises(TypeError):
        GPT(tiny(), impl="torch")
    b = twin(m)
    assert list(b.state_dict()) == list(m.state_dict())


def test_llama_style_structure():
    cfg = GPTConfig.llama(vocab_size=V, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    assert {k: getattr(cfg, k) for k in LLAMA} == LLAMA
    m = make(cfg)
    C, hd, H = 32, 8, cfg.hidden
    assert H == 96  # 2/3 of 4C = 85.3, rounded up to a multiple of 32
    assert isinstance(m.transformer.h[0].ln_1, torch.nn.RMSNorm)
    assert isinstance(m.transformer.ln_f, fasttx.nn.RMSNorm)
    assert m.lm_head.weight is not m.transformer.wte.weight  # untied
    sd = m.state_dict()
    assert "transformer.wpe.weight" not in sd and not any(k.endswith(".bias") for k in sd)
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == ((4 + 2 * 2) * hd, C)  # q + k + v heads
    assert sd["transformer.h.0.mlp.c_fc.weight"].shape == (2 * H, C)  # gate | up
    assert sd["transformer.h.0.mlp.c_proj.weight"].shape == (C, H)
    # per block: c_attn (8 * hd) * C, c_proj C^2, c_fc 2HC, mlp.c_proj HC, two RMSNorms 2C;
    # wte and lm_head V * C each, ln_f C
    expected = 2 * V * C + C + 2 * (8 * hd * C + C * C + 3 * H * C + 2 * C)
    assert m.num_params() == m.num_params(non_embedding=False) == expected
    twin(m)  # a strict round trip of the state_dict


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
@pytest.mark.parametrize("variant", [dict(pos_encoding="learned", bias=True),
                                     dict(pos_encoding="sinusoidal", bias=False), OPTIONS["llama"]],
                         ids=["gpt2", "sinusoidal-nobias", "llama"])
def test_forward_and_gradients(backend, dtype, variant):
    """Logits, loss and the gradient of every parameter: fasttx (this backend) vs the torch path in
    the same dtype, both against the fp64 plain forward, by the 2x rule (TESTING.md)."""
    cfg = tiny(**{**variant, "n_embd": 24, "block_size": 12})  # hidden 24: not a power of 2
    ours = make(cfg, dtype=dtype)
    pt = twin(ours, dtype)
    oracle = twin(ours, torch.float64)
    torch.manual_seed(1)
    idx = torch.randint(0, V, (2, 11))
    targets = torch.randint(0, V, (2, 11))
    targets[0, 3] = -1  # ignored position
    g = torch.randn(2, 11, V) * 0.1
    lo, so, go = run(ours, idx, targets, g)
    with fasttx.use_backend(TORCH):
        lp, sp, gp = run(pt, idx, targets, g)
    lr = plain_forward(oracle, idx)
    sr = F.cross_entropy(lr.reshape(-1, V), targets.reshape(-1), ignore_index=-1)
    ((lr * g.double()).sum() + sr).backward()
    lr, sr, gr = lr.detach(), sr.detach(), grads(oracle)
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


@pytest.mark.parametrize("variant", [dict(pos_encoding="learned"), dict(pos_encoding="sinusoidal"),
                                     *OPTIONS.values()], ids=["learned", "sinusoidal", *OPTIONS])
def test_torch_path_matches_the_plain_forward(variant):
    # fp32, torch path: every norm in the right place (ln_1 and ln_2 of each block, ln_f last),
    # each option as written out above, with perturbed norm parameters.
    m = make(tiny(**variant))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if ".ln_" in name:
                p.add_(0.5 * torch.randn_like(p))
    idx = torch.randint(0, V, (3, 16))
    with fasttx.use_backend(TORCH), torch.no_grad():
        logits, loss = m(idx, idx, return_logits=True)
        expected = plain_forward(m, idx)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, plain_loss(expected, idx), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tie_weights", [True, False])
def test_training_loss_is_linear_cross_entropy_without_logits(backend, tie_weights):
    """With targets the loss comes from FF.linear_cross_entropy and no logits are returned; the
    loss and every gradient equal cross-entropy over the materialised logits (return_logits=True)."""
    m = make(tiny(tie_weights=tie_weights))
    idx = torch.randint(0, V, (2, 7))
    targets = idx.roll(-1, 1)
    targets[:, -1] = -1
    calls = []
    real = fasttx.functional.linear_cross_entropy

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    FF = fasttx.functional
    had = "linear_cross_entropy" in vars(FF)  # else torch's, reached through FF's __getattr__
    FF.linear_cross_entropy = spy
    try:
        logits, loss = m(idx, targets)
    finally:
        if had:
            FF.linear_cross_entropy = real
        else:
            del FF.linear_cross_entropy
    assert logits is None and loss.dtype == torch.float32 and calls == [(14, 32)]
    loss.backward()
    g_fused = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    logits, expected = m(idx, targets, return_logits=True)
    assert logits.shape == (2, 7, V)
    torch.testing.assert_close(expected, F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-1))
    expected.backward()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    for name, p in m.named_parameters():
        torch.testing.assert_close(g_fused[name], p.grad, atol=1e-5, rtol=1e-5, msg=name)
    assert m(idx)[1] is None and m(idx)[0].shape == (2, 7, V)


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
CACHE_CASES = [(TORCH, dict(pos_encoding="learned")), (TORCH, dict(pos_encoding="sinusoidal")),
               *[(TORCH, OPTIONS[name]) for name in ("rotary", "gqa", "llama")],
               ("triton", dict(pos_encoding="learned")), ("triton", OPTIONS["llama"])]
CACHE_IDS = ["torch-learned", "torch-sinusoidal", "torch-rotary", "torch-gqa", "torch-llama",
             "triton-learned", "triton-llama"]


@pytest.mark.parametrize("backend_name,variant", CACHE_CASES, ids=CACHE_IDS)
def test_decode_path_matches_full_forward(backend_name, variant):
    """Prefill 5 tokens into the cache, then decode the rest one by one: every position's hidden
    state equals the full causal forward's."""
    from fasttx.models.gpt import KVCache

    m = make(tiny(**variant, block_size=10)).eval()
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


@pytest.mark.parametrize("backend_name,variant", CACHE_CASES, ids=CACHE_IDS)
def test_greedy_generation_with_cache_equals_recomputation(backend_name, variant):
    """Greedy decoding with the KV cache == recomputing the whole sequence every step, also past
    block_size (8) where the window slides: 3 prompt tokens + 8 new ones."""
    m = make(tiny(**variant, block_size=8)).eval()
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
    with fasttx.use_backend(TORCH):
        m = make(tiny(dropout=0.0))
        idx = torch.randint(0, V, (2, 10))
        eager_loss = m(idx, idx)[1]
        eager_loss.backward()
        eager_grads = {n: g.clone() for n, g in grads(m).items()}
        m.zero_grad(set_to_none=True)
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
        loss = compiled(idx, idx)[1]
        loss.backward()
    torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5)
    for name, g in grads(m).items():
        torch.testing.assert_close(g, eager_grads[name], atol=1e-5, rtol=1e-5, msg=name)


# ----------------------------------------------------------------------------------------------
# Checkpoint compatibility
# ----------------------------------------------------------------------------------------------
def test_checkpoint_from_before_the_residual_stream_refactor_loads_and_matches(backend):
    """tests/data/gpt_tiny_before_residual_stream.pt was written by the GPT of commit 227ba8b (where
    each block applied the next block's ln_1), on the torch path: a 2-layer model (dropout 0.1,
    LayerNorm parameters perturbed so that a misplaced norm shows), a batch, its eval logits and
    loss, greedy tokens, and a training-mode loss under torch.manual_seed(123) (same dropout masks
    only if the dropout calls happen in the same order). Today's model must load it strictly and
    give the same numbers on both paths."""
    import os

    path = os.path.join(os.path.dirname(__file__), "data", "gpt_tiny_before_residual_stream.pt")
    saved = torch.load(path, weights_only=True)
    m = GPT(GPTConfig(**saved["config"]))
    m.load_state_dict(saved["state_dict"])  # strict: the same keys
    m.eval()
    with torch.no_grad():
        logits, loss = m(saved["idx"], saved["targets"], return_logits=True)
        greedy = m.generate(saved["idx"][:, :3], 8, temperature=0.0)
    torch.testing.assert_close(logits, saved["logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, saved["loss"], atol=1e-5, rtol=1e-5)
    assert torch.equal(greedy, saved["greedy"])
    if backend == TORCH:  # the Triton path draws its dropout masks from Philox, not torch's
        m.train()
        torch.manual_seed(saved["train_seed"])
        with torch.no_grad():
            train_logits, train_loss = m(saved["idx"], saved["targets"], return_logits=True)
        torch.testing.assert_close(train_logits, saved["train_logits"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(train_loss, saved["train_loss"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad", [V, -1, 10 * V])
def test_token_ids_out_of_range(bad):
    m = make(tiny())
    idx = torch.randint(0, V, (2, 5))
    idx[1, 3] = bad
    msg = rf"GPT: idx holds token ids out of range for vocab_size {V} \(allowed: 0 \.\. {V - 1}\): {bad}$"
    with pytest.raises(IndexError, match=msg):
        m(idx)
    with pytest.raises(IndexError, match=msg):
        m.generate(idx, 2)
    good = torch.randint(0, V, (2, 5))
    targets = good.clone()
    targets[0, 0] = -1  # ignored: allowed
    m(good, targets)
    targets[0, 1], targets[1, 1] = V + 1, -2
    with pytest.raises(IndexError, match=rf"targets holds token ids out of range .* -1 \(ignored\)\): -2, {V + 1}$"):
        m(good, targets)
