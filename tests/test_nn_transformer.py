"""fasttx.nn Transformer* modules against torch.nn's (ours loaded from torch's state_dict):
constructors, state_dict keys, outputs and every gradient, masks, options, the fused ops they use,
dropout, torch's nested-tensor padding behaviour and torch.compile, on both backends."""
import copy
import warnings

import pytest
import torch

import fasttx
import fasttx.nn as nn
from tests.utils import assert_2x_rule, assert_close

D, NHEAD, FF, B, S, T = 32, 2, 48, 2, 6, 5  # d_model, heads, feed-forward, batch, src/tgt length


def _seeded(cls, *args, **kwargs):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # enable_nested_tensor advisories from torch's __init__
        return cls(*args, **kwargs)


def _pair(name, *args, **kwargs):
    """(torch's module, ours), ours loaded from torch's with strict=True. Biases and LayerNorm
    weights are randomised so that every parameter matters."""
    theirs = _seeded(getattr(torch.nn, name), *args, **kwargs)
    with torch.no_grad():
        for pname, p in theirs.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if "norm" in pname and "weight" in pname else 0.0, 0.2)
    ours = _seeded(getattr(nn, name), *args, **kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def _seq(length, batch_first, unbatched=False):
    if unbatched:
        return torch.randn(length, D, requires_grad=True)
    shape = (B, length, D) if batch_first else (length, B, D)
    return torch.randn(shape, requires_grad=True)


def _padding(length, kind="bool", unbatched=False):
    """Key padding mask (True = pad): batch row 1 has its last 2 positions padded."""
    pad = torch.zeros(B, length, dtype=torch.bool)
    pad[1, -2:] = True
    if unbatched:
        pad = pad[1]
    return pad if kind == "bool" else torch.zeros(pad.shape).masked_fill(pad, float("-inf"))


def _blocked(length, kind="bool"):
    """A (length, length) attention mask in torch's polarity that blocks a few pairs."""
    g = torch.Generator().manual_seed(2)
    blocked = torch.rand(length, length, generator=g) < 0.3
    blocked.fill_diagonal_(False)
    return blocked if kind == "bool" else torch.randn(length, length, generator=g).masked_fill(
        blocked, float("-inf"))


def _to64(x):
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def _check(theirs, ours, inputs, **kwargs):
    """Output and the gradients of every input and parameter, against an fp64 copy of torch's
    module with the flash-attention rule (TESTING.md): our error at most 2x (output) / 3x
    (gradients) torch's own fp32 error, plus a 1e-5 floor."""
    out_t = theirs(*inputs, **kwargs)
    out_o = ours(*inputs, **kwargs)
    assert out_o.shape == out_t.shape and out_o.dtype == out_t.dtype
    theirs64 = copy.deepcopy(theirs).double()
    inputs64 = [x.detach().double().requires_grad_() for x in inputs]
    out64 = theirs64(*inputs64, **{k: _to64(v) for k, v in kwargs.items()})
    assert_2x_rule(out_o, out_t, out64, name="output")
    g = torch.randn_like(out_t)
    grads_t = torch.autograd.grad(out_t, list(inputs) + list(theirs.parameters()), g)
    grads_o = torch.autograd.grad(out_o, list(inputs) + list(ours.parameters()), g)
    grads64 = torch.autograd.grad(out64, inputs64 + list(theirs64.parameters()), g.double())
    names = [f"input{i}" for i in range(len(inputs))] + [n for n, _ in theirs.named_parameters()]
    for name, a, b, ref in zip(names, grads_o, grads_t, grads64):
        assert_2x_rule(a, b, ref, mult=3.0, name=f"grad {name}")
    return out_o


# ----------------------------------------------------------------------------------------------
# Construction
# ----------------------------------------------------------------------------------------------
CONSTRUCTORS = [
    ("TransformerEncoderLayer", (D, NHEAD), {}),
    ("TransformerEncoderLayer", (D, NHEAD, FF, 0.2, "gelu", 1e-3, True, True, False), {}),
    ("TransformerDecoderLayer", (D, NHEAD), {"norm_first": True, "bias": False}),
    ("Transformer", (D, NHEAD, 1, 1, FF), {"batch_first": True}),
]


@pytest.mark.parametrize("name,args,kwargs", CONSTRUCTORS)
def test_structure_state_dict_and_init_match_torch(name, args, kwargs):
    theirs = _seeded(getattr(torch.nn, name), *args, **kwargs)
    ours = _seeded(getattr(nn, name), *args, **kwargs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for (key, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), key  # same parameter initialisation from the same seed
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in theirs.named_modules()]
    for (n, mo), mt in zip(ours.named_modules(), theirs.modules()):
        assert isinstance(mo, type(mt)), n
        if type(mt) in (torch.nn.LayerNorm, torch.nn.Dropout, torch.nn.MultiheadAttention):
            assert type(mo).__module__.startswith("fasttx.nn."), n  # ours all the way down
        assert {k: v for k, v in vars(mo).items() if not k.startswith("_")} == \
               {k: v for k, v in vars(mt).items() if not k.startswith("_")}, n


def test_stacks_deep_copy_the_layer():
    layer = nn.TransformerEncoderLayer(D, NHEAD, FF)
    enc = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(D), enable_nested_tensor=False)
    assert len(enc.layers) == 2 and enc.layers[0] is not layer
    assert enc.layers[0] is not enc.layers[1]
    assert list(enc.state_dict()) == list(torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(D, NHEAD, FF), 2, torch.nn.LayerNorm(D),
        enable_nested_tensor=False).state_dict())
    # a torch.nn layer handed to our stack: the copies are ours, the original is untouched
    torch_layer = torch.nn.TransformerDecoderLayer(D, NHEAD, FF)
    dec = nn.TransformerDecoder(torch_layer, 2)
    assert type(dec.layers[1]) is nn.TransformerDecoderLayer
    assert type(torch_layer) is torch.nn.TransformerDecoderLayer


def test_generate_square_subsequent_mask():
    for sz in (1, 4):
        ours = nn.Transformer.generate_square_subsequent_mask(sz, dtype=torch.float64)
        theirs = torch.nn.Transformer.generate_square_subsequent_mask(sz, dtype=torch.float64)
        assert torch.equal(ours, theirs) and ours.dtype == torch.float64


def test_bad_arguments_raise_like_torch():
    with pytest.raises(RuntimeError, match="activation should be relu/gelu, not swish"):
        nn.TransformerEncoderLayer(D, NHEAD, activation="swish")
    with pytest.raises(AssertionError, match="embed_dim must be divisible by num_heads"):
        nn.TransformerDecoderLayer(D, 5)
    model = _seeded(nn.Transformer, D, NHEAD, 1, 1, FF)
    with pytest.raises(RuntimeError, match="the batch number of src and tgt must be equal"):
        model(torch.randn(S, 2, D), torch.randn(T, 3, D))
    with pytest.raises(RuntimeError, match="the feature number of src and tgt must be equal"):
        model(torch.randn(S, 2, D), torch.randn(T, 2, D + 1))
    layer = nn.TransformerEncoderLayer(D, NHEAD, FF)
    with pytest.raises(AssertionError, match="only bool and floating types of src_mask"):
        layer(torch.randn(S, 2, D), src_mask=torch.zeros(S, S, dtype=torch.int32))


# ----------------------------------------------------------------------------------------------
# Layers: parity in training mode with p=0 (RNG streams differ), outputs and gradients
# ----------------------------------------------------------------------------------------------
ENCODER_CASES = [
    # (constructor kwargs, mask kind, padding kind, unbatched)
    ({}, "bool", "bool", False),
    ({"norm_first": True, "activation": "gelu", "batch_first": True}, "float", "float", False),
    ({"bias": False, "layer_norm_eps": 1e-3}, "causal", None, False),
    ({"activation": torch.tanh, "batch_first": True}, None, "bool", True),
    ({"activation": torch.nn.GELU(approximate="tanh"), "norm_first": True}, "bool", None, False),
]


@pytest.mark.parametrize("kwargs,mask,padding,unbatched", ENCODER_CASES)
def test_encoder_layer_matches_torch(backend, kwargs, mask, padding, unbatched):
    theirs, ours = _pair("TransformerEncoderLayer", D, NHEAD, FF, dropout=0.0, **kwargs)
    x = _seq(S, kwargs.get("batch_first", False), unbatched)
    extra = {}
    if mask == "causal":
        extra = dict(src_mask=nn.Transformer.generate_square_subsequent_mask(S), is_causal=True)
    elif mask is not None:
        extra["src_mask"] = _blocked(S, mask)
    if padding is not None:
        extra["src_key_padding_mask"] = _padding(S, padding, unbatched)
    _check(theirs, ours, (x,), **extra)


DECODER_CASES = [
    ({}, True),
    ({"norm_first": True, "activation": "gelu", "batch_first": True}, False),
    ({"bias": False, "activation": torch.nn.functional.silu, "norm_first": True}, True),
]


@pytest.mark.parametrize("kwargs,causal", DECODER_CASES)
def test_decoder_layer_matches_torch(backend, kwargs, causal):
    theirs, ours = _pair("TransformerDecoderLayer", D, NHEAD, FF, dropout=0.0, **kwargs)
    bf = kwargs.get("batch_first", False)
    tgt, memory = _seq(T, bf), _seq(S, bf)
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(T) if causal else _blocked(T, "float")
    memory_mask = torch.zeros(T, S).masked_fill(torch.rand(T, S) < 0.2, float("-inf"))
    memory_mask[:, 0] = 0.0
    _check(theirs, ours, (tgt, memory), tgt_mask=tgt_mask, memory_mask=memory_mask,
           tgt_key_padding_mask=_padding(T, "float"), memory_key_padding_mask=_padding(S, "float"),
           tgt_is_causal=causal)


def test_eval_no_grad_matches_torch_fast_path(backend):
    # In eval under no_grad torch takes its native fused path; the results must agree.
    theirs, ours = _pair("TransformerEncoderLayer", D, NHEAD, FF, batch_first=True)
    theirs.eval(), ours.eval()
    x = torch.randn(B, S, D)
    with torch.no_grad():
        pad = _padding(S)
        assert_close(ours(x, src_key_padding_mask=pad), theirs(x, src_key_padding_mask=pad))


# ----------------------------------------------------------------------------------------------
# The fused ops are what the layers run
# ----------------------------------------------------------------------------------------------
def _spy(monkeypatch, names):
    calls = {n: 0 for n in names}
    for n in names:
        fn = getattr(fasttx.functional, n)

        def counting(*args, _fn=fn, _n=n, **kwargs):
            calls[_n] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(fasttx.functional, n, counting)
    return calls


FUSED = ["dropout_add_layer_norm", "bias_relu", "bias_gelu", "layer_norm",
         "scaled_dot_product_attention", "dropout"]


@pytest.mark.parametrize("kwargs,expected", [
    ({}, dict(dropout_add_layer_norm=2, bias_relu=1, scaled_dot_product_attention=1, dropout=1)),
    ({"norm_first": True, "activation": "gelu"},
     dict(dropout_add_layer_norm=1, bias_gelu=1, layer_norm=1, scaled_dot_product_attention=1,
          dropout=2)),
    ({"activation": torch.nn.GELU("tanh")}, dict(dropout_add_layer_norm=2, bias_gelu=1,
                                                 scaled_dot_product_attention=1, dropout=1)),
    # a custom activation or bias=False: linear1 with its bias, then the activation as given
    ({"activation": torch.tanh}, dict(dropout_add_layer_norm=2, scaled_dot_product_attention=1,
                                      dropout=1)),
    ({"bias": False}, dict(dropout_add_layer_norm=2, scaled_dot_product_attention=1, dropout=1)),
])
def test_encoder_layer_uses_fused_ops(monkeypatch, kwargs, expected):
    calls = _spy(monkeypatch, FUSED)
    layer = _seeded(nn.TransformerEncoderLayer, D, NHEAD, FF, **kwargs)
    layer(torch.randn(S, B, D))
    assert calls == {n: expected.get(n, 0) for n in FUSED}


def test_decoder_layer_uses_fused_ops(monkeypatch):
    calls = _spy(monkeypatch, FUSED)
    for norm_first, expected in [(False, dict(dropout_add_layer_norm=3, layer_norm=0, dropout=1)),
                                 (True, dict(dropout_add_layer_norm=2, layer_norm=1, dropout=2))]:
        for n in calls:
            calls[n] = 0
        layer = _seeded(nn.TransformerDecoderLayer, D, NHEAD, FF, norm_first=norm_first)
        layer(torch.randn(T, B, D), torch.randn(S, B, D))
        assert calls == dict(expected, bias_relu=1, bias_gelu=0, scaled_dot_product_attention=2)


def test_encoder_detects_causal_mask(monkeypatch):
    # is_causal=None and a mask equal to generate_square_subsequent_mask: torch passes
    # is_causal=True down, and MHA hands SDPA the causal flag instead of the mask.
    seen = []
    sdpa = fasttx.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append((kwargs["is_causal"], kwargs["attn_mask"] is None))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(fasttx.functional, "scaled_dot_product_attention", spy)
    layer = torch.nn.TransformerEncoderLayer(D, NHEAD, FF, 0.0)
    theirs, ours = _pair("TransformerEncoder", layer, 2, enable_nested_tensor=False)
    mask = nn.Transformer.generate_square_subsequent_mask(S)
    x = _seq(S, False)
    assert_close(ours(x, mask=mask), theirs(x, mask=mask))
    assert seen == [(True, True), (True, True)]


# ----------------------------------------------------------------------------------------------
# Stacks and the whole Transformer
# ----------------------------------------------------------------------------------------------
def test_encoder_stack_matches_torch(backend):
    layer = torch.nn.TransformerEncoderLayer(D, NHEAD, FF, 0.0, norm_first=True)
    theirs, ours = _pair("TransformerEncoder", layer, 2, norm=torch.nn.LayerNorm(D),
                         enable_nested_tensor=False)
    ours.norm = nn.LayerNorm(D)  # the norm is used as given; make it ours for this test
    ours.norm.load_state_dict(theirs.norm.state_dict())
    x = _seq(S, False)
    _check(theirs, ours, (x,), mask=_blocked(S), src_key_padding_mask=_padding(S))


def test_transformer_matches_torch(backend):
    # one layer each: the stacks' chaining of layers is tested above
    theirs, ours = _pair("Transformer", D, NHEAD, 1, 1, FF, 0.0, batch_first=True)
    src, tgt = _seq(S, True), _seq(T, True)
    _check(theirs, ours, (src, tgt), tgt_mask=nn.Transformer.generate_square_subsequent_mask(T),
           src_key_padding_mask=_padding(S), memory_key_padding_mask=_padding(S),
           tgt_is_causal=True)


@pytest.mark.parametrize("grad", [False, True])
def test_encoder_padding_outputs_like_torch_nested_path(backend, grad):
    # torch (eval, enable_nested_tensor, left-aligned padding, no autograd) runs on a
    # NestedTensor and returns zeros at padded positions; with autograd it does not.
    layer = torch.nn.TransformerEncoderLayer(D, NHEAD, FF, batch_first=True)
    theirs, ours = _pair("TransformerEncoder", layer, 2)
    theirs.eval(), ours.eval()
    x, pad = torch.randn(B, S, D), _padding(S)
    with torch.set_grad_enabled(grad):
        out_t, out_o = theirs(x, src_key_padding_mask=pad), ours(x, src_key_padding_mask=pad)
    assert theirs.use_nested_tensor
    assert bool((out_t[pad] == 0).all()) == (not grad)  # what torch does
    assert_close(out_o, out_t)


# ----------------------------------------------------------------------------------------------
# Dropout in training mode
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,norm_first", [("TransformerEncoderLayer", False),
                                             ("TransformerDecoderLayer", True)])
def test_layer_dropout_in_training(backend, name, norm_first):
    layer = _seeded(getattr(nn, name), D, NHEAD, FF, dropout=0.3, norm_first=norm_first)
    inputs = [_seq(T, False)] + ([_seq(S, False)] if "Decoder" in name else [])
    torch.manual_seed(5)
    a = layer(*inputs)
    torch.manual_seed(5)
    b = layer(*inputs)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # seeded by torch's generator
    assert (a - layer.eval()(*inputs)).abs().max() > 1e-2  # dropout changed the result
    grads = torch.autograd.grad(a, inputs + list(layer.parameters()), torch.ones_like(a))
    assert all(g.isfinite().all() for g in grads)


# ----------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------
def test_encoder_layer_compiles_without_graph_breaks(backend):
    torch._dynamo.reset()
    layer = _seeded(nn.TransformerEncoderLayer, D, NHEAD, FF, dropout=0.1, batch_first=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x, pad = torch.randn(B, S, D, requires_grad=True), _padding(S)
    out = compiled(x, src_key_padding_mask=pad)  # training mode: dropout seeds inside the ops
    out.sum().backward()
    assert x.grad.isfinite().all()
    layer.eval()
    assert_close(compiled(x, src_key_padding_mask=pad), layer(x, src_key_padding_mask=pad))
