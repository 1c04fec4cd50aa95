"""fasttx.convert: swaps torch.nn's transformer modules for fasttx.nn's anywhere in a model,
keeping parameters, buffers, device, dtype and training mode; outputs unchanged."""
import warnings

import pytest
import torch

import fasttx
import fasttx.nn as nn
from tests.utils import assert_close

D, NHEAD, FF = 32, 2, 48

SWAPS = {
    torch.nn.LayerNorm: nn.LayerNorm,
    torch.nn.GELU: nn.GELU,
    torch.nn.Dropout: nn.Dropout,
    torch.nn.MultiheadAttention: nn.MultiheadAttention,
    torch.nn.TransformerEncoderLayer: nn.TransformerEncoderLayer,
    torch.nn.TransformerDecoderLayer: nn.TransformerDecoderLayer,
    torch.nn.TransformerEncoder: nn.TransformerEncoder,
    torch.nn.TransformerDecoder: nn.TransformerDecoder,
    torch.nn.Transformer: nn.Transformer,
}


class MyLayerNorm(torch.nn.LayerNorm):
    """A user subclass with its own forward: convert() must leave it alone."""

    def forward(self, x):
        return super().forward(x) * 2


class Model(torch.nn.Module):
    """Nests every swapped type inside containers: Sequential, ModuleDict, ModuleList."""

    def __init__(self):
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # enable_nested_tensor advisory (norm_first layer)
            encoder = torch.nn.TransformerEncoder(
                torch.nn.TransformerEncoderLayer(D, NHEAD, FF, activation=torch.nn.GELU(),
                                                 norm_first=True), 2, torch.nn.LayerNorm(D))
        self.body = torch.nn.Sequential(
            torch.nn.Linear(16, D), torch.nn.GELU(approximate="tanh"), torch.nn.Dropout(0.2),
            encoder,
        )
        self.heads = torch.nn.ModuleDict({
            "attn": torch.nn.MultiheadAttention(D, NHEAD, kdim=24, vdim=24),
            "norm": torch.nn.LayerNorm(D, eps=1e-3),
            "mine": MyLayerNorm(D),
            "decoder": torch.nn.ModuleList([
                torch.nn.TransformerDecoder(torch.nn.TransformerDecoderLayer(D, NHEAD, FF), 1)]),
        })
        self.register_buffer("offset", torch.randn(D))

    def forward(self, x, ctx):
        h = self.body(x)  # (S, N, D)
        h = h + self.heads["attn"](h, ctx, ctx, need_weights=False)[0] + self.offset
        h = self.heads["decoder"][0](self.heads["norm"](h), h)
        return self.heads["mine"](h)


def _types(model):
    return {name: type(m) for name, m in model.named_modules()}


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("inplace", [True, False])
def test_convert_swaps_types_and_keeps_everything(inplace):
    torch.manual_seed(0)
    model = Model().to(torch.float64)
    model.heads.train(False)  # mixed training modes must survive
    x, ctx = torch.randn(5, 2, 16, dtype=torch.float64), torch.randn(7, 2, 24, dtype=torch.float64)
    before_types, before_state = _types(model), _snapshot(model)
    before_modes = {n: m.training for n, m in model.named_modules()}
    params = {n: p for n, p in model.named_parameters()}
    model.eval()
    expected = model(x, ctx)
    model.train()
    for n, m in model.named_modules():
        m.train(before_modes[n])

    out = fasttx.convert(model, inplace=inplace)
    assert (out is model) == inplace
    after = _types(out)
    assert after.keys() == before_types.keys()
    for name, cls in before_types.items():
        assert after[name] is SWAPS.get(cls, cls), name  # MyLayerNorm (a subclass) is kept
    # every swappable type but Transformer (tested below) occurs in the model
    assert {SWAPS[c] for c in before_types.values() if c in SWAPS} == \
        set(SWAPS.values()) - {nn.Transformer}
    assert type(out.heads["mine"]) is MyLayerNorm
    # parameters, buffers, dtype, device, training mode
    assert list(out.state_dict()) == list(before_state)
    for key, value in out.state_dict().items():
        assert torch.equal(value, before_state[key]) and value.dtype == torch.float64, key
        assert value.device == before_state[key].device
    assert {n: m.training for n, m in out.named_modules()} == before_modes
    same_objects = all(p is params[n] for n, p in out.named_parameters())
    assert same_objects == inplace
    if not inplace:
        assert all(type(m) is before_types[n] for n, m in model.named_modules())  # untouched
    # outputs unchanged in eval
    out.eval()
    torch.testing.assert_close(out(x, ctx), expected, atol=1e-12, rtol=1e-12)


def test_convert_transformer_outputs_unchanged():
    torch.manual_seed(0)
    model = torch.nn.Transformer(D, NHEAD, 1, 1, FF, batch_first=True).eval()
    src, tgt = torch.randn(2, 6, D), torch.randn(2, 5, D)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(5)
    expected = model(src, tgt, tgt_mask=mask)
    assert type(fasttx.convert(model)) is nn.Transformer
    assert type(model.decoder.layers[0].multihead_attn) is nn.MultiheadAttention
    assert_close(model(src, tgt, tgt_mask=mask), expected)


def test_convert_keeps_device_and_low_precision_dtype(device):
    model = torch.nn.Sequential(torch.nn.LayerNorm(D), torch.nn.Dropout(0.1))
    model.to(device, torch.bfloat16)
    fasttx.convert(model)
    assert type(model[0]) is nn.LayerNorm and type(model[1]) is nn.Dropout
    assert model[0].weight.device.type == torch.device(device).type
    assert model[0].weight.dtype == torch.bfloat16


def test_convert_root_module_and_shared_submodules():
    shared = torch.nn.LayerNorm(D)
    model = torch.nn.Sequential(shared, torch.nn.GELU(), shared)
    fasttx.convert(model)
    assert model[0] is model[2] and type(model[0]) is nn.LayerNorm
    root = fasttx.convert(torch.nn.Dropout(0.3))
    assert type(root) is nn.Dropout and root.p == 0.3


def test_converted_model_trains_with_fasttx_ops(backend):
    # the converted model runs through fasttx.functional on the selected backend, with gradients
    torch.manual_seed(0)
    theirs = torch.nn.Sequential(torch.nn.Linear(16, D), torch.nn.GELU(), torch.nn.LayerNorm(D))
    ours = fasttx.convert(theirs, inplace=False)
    x = torch.randn(4, 16, requires_grad=True)
    a, b = theirs(x), ours(x)
    assert_close(b, a)
    ga = torch.autograd.grad(a.sum(), [x] + list(theirs.parameters()))
    gb = torch.autograd.grad(b.sum(), [x] + list(ours.parameters()))
    for u, v in zip(gb, ga):
        assert_close(u, v)


def test_convert_rejects_non_modules():
    with pytest.raises(TypeError, match="convert\\(\\) expects a torch.nn.Module"):
        fasttx.convert(lambda x: x)
