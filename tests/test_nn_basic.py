"""fasttx.nn: the torch.nn re-export, and LayerNorm / GELU / Dropout against torch.nn and the
fp64 reference, on both backends."""
import pytest
import torch

import fasttx.nn as nn
from fasttx import reference
from tests.utils import DTYPES, assert_close


def _pair(torch_cls, fasttx_cls, *args, **kwargs):
    """torch's module and ours built with the same arguments, ours loaded from torch's."""
    theirs = torch_cls(*args, **kwargs)
    ours = fasttx_cls(*args, **kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


# ----------------------------------------------------------------------------------------------
# The namespace
# ----------------------------------------------------------------------------------------------
def test_reexports_torch_nn():
    # `import fasttx.nn as nn` must work in place of `import torch.nn as nn`.
    for name in ("Module", "Linear", "Embedding", "Parameter", "ModuleList", "Sequential",
                 "ModuleDict", "Identity", "ReLU", "init", "utils", "parameter", "Buffer"):
        assert getattr(nn, name) is getattr(torch.nn, name), name
    # nn.functional is fasttx's (ours where we have an op, torch's for every other name)
    import fasttx.functional

    assert nn.functional is fasttx.functional
    assert nn.functional.linear is torch.nn.functional.linear
    with pytest.raises(AttributeError, match="no attribute 'not_an_op'"):
        nn.functional.not_an_op
    public = {n for n in dir(torch.nn) if not n.startswith("_")}
    assert public <= set(dir(nn)), sorted(public - set(dir(nn)))
    # fasttx.nn.attention is our module; torch.nn.attention's API stays reachable through it.
    assert nn.attention.sdpa_kernel is torch.nn.attention.sdpa_kernel
    assert nn.attention.SDPBackend is torch.nn.attention.SDPBackend


def test_overrides_are_ours_and_subclass_torch():
    names = ("LayerNorm", "GELU", "Dropout", "MultiheadAttention", "TransformerEncoderLayer",
             "TransformerDecoderLayer", "TransformerEncoder", "TransformerDecoder", "Transformer")
    for name in names:
        ours, theirs = getattr(nn, name), getattr(torch.nn, name)
        assert ours is not theirs and issubclass(ours, theirs), name
        assert ours.__module__.startswith("fasttx.nn."), name
    from fasttx.nn.positional import PositionalEncoding

    assert nn.PositionalEncoding is PositionalEncoding


def test_build_a_model_with_fasttx_nn():
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Dropout(0.1), nn.LayerNorm(16))
    nn.init.zeros_(model[0].bias)
    assert isinstance(model[3], torch.nn.LayerNorm)
    assert model(torch.randn(2, 8)).shape == (2, 16)


# ----------------------------------------------------------------------------------------------
# Constructors, repr, state_dict
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,args,kwargs", [
    ("LayerNorm", (16,), {}),
    ("LayerNorm", ((4, 6),), {"eps": 1e-3, "elementwise_affine": False}),
    ("LayerNorm", (16,), {"bias": False}),
    ("GELU", (), {}),
    ("GELU", (), {"approximate": "tanh"}),
    ("Dropout", (), {}),
    ("Dropout", (0.25,), {"inplace": True}),
])
def test_repr_state_dict_defaults(cls, args, kwargs):
    theirs, ours = _pair(getattr(torch.nn, cls), getattr(nn, cls), *args, **kwargs)
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert vars(ours).keys() == vars(theirs).keys()
    for key, value in vars(theirs).items():
        if not key.startswith("_"):
            assert getattr(ours, key) == value, key


def test_bad_arguments_raise_like_torch(backend, device):
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
        nn.Dropout(1.5)
    # torch accepts any string at construction and rejects it in forward
    gelu = nn.GELU("erf")
    with pytest.raises((RuntimeError, ValueError), match="approximate"):
        gelu(torch.randn(3, device=device))
    with pytest.raises(RuntimeError, match="normalized_shape|shape"):
        nn.LayerNorm(8, device=device)(torch.randn(2, 6, device=device))


# ----------------------------------------------------------------------------------------------
# LayerNorm
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kwargs", [{}, {"bias": False}, {"elementwise_affine": False}])
def test_layer_norm_matches_reference_and_torch(backend, device, dtype, kwargs):
    torch.manual_seed(0)
    H = 24
    theirs, ours = _pair(torch.nn.LayerNorm, nn.LayerNorm, H, device=device, dtype=dtype, **kwargs)
    with torch.no_grad():  # non-trivial affine parameters
        for p in ours.parameters():
            p.normal_()
        theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 5, H, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(3, 5, H, device=device, dtype=dtype)
    y = ours(x)
    assert y.dtype == dtype and y.shape == x.shape
    ref = reference.layer_norm(x, (H,), ours.weight, ours.bias, ours.eps, upcast=torch.float64)
    assert_close(y, ref, dtype)
    assert_close(y, theirs(x), dtype)

    params = [x] + list(ours.parameters())
    grads = torch.autograd.grad(y, params, g)
    x64 = x.detach().double().requires_grad_()
    p64 = [p.detach().double().requires_grad_() for p in ours.parameters()]
    w64 = p64[0] if ours.weight is not None else None
    b64 = p64[-1] if ours.bias is not None else None
    ref = reference.layer_norm(x64, (H,), w64, b64, ours.eps)
    ref_grads = torch.autograd.grad(ref, [x64] + p64, g.double())
    for name, got, want in zip(["x", "weight", "bias"], grads, ref_grads):
        # weight/bias grads sum over 15 rows: an fp16/bf16 accumulation of that length
        # carries proportionally more rounding, so compare against torch's own error instead
        # of the elementwise tolerance.
        if name != "x" and dtype != torch.float32:
            pt = torch.autograd.grad(theirs(x), list(theirs.parameters()), g)
            pt_err = max((a.double() - b).abs().max().item() for a, b in zip(pt, ref_grads[1:]))
            assert (got.double() - want).abs().max().item() <= 2 * pt_err + 1e-2, name
        else:
            assert_close(got, want, dtype, msg=f"grad {name}")


def test_layer_norm_multi_dim_normalized_shape(backend, device):
    torch.manual_seed(0)
    theirs, ours = _pair(torch.nn.LayerNorm, nn.LayerNorm, (3, 8), device=device)
    x = torch.randn(4, 3, 8, device=device)
    assert_close(ours(x), theirs(x))


# ----------------------------------------------------------------------------------------------
# GELU
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_matches_reference_and_torch(backend, device, dtype, approximate):
    torch.manual_seed(0)
    theirs, ours = _pair(torch.nn.GELU, nn.GELU, approximate=approximate)
    x = (3 * torch.randn(4, 37, device=device, dtype=dtype)).requires_grad_()
    g = torch.randn_like(x)
    y = ours(x)
    assert y.dtype == dtype
    x64 = x.detach().double().requires_grad_()
    ref = reference.gelu(x64, approximate)
    assert_close(y, ref, dtype)
    assert_close(y, theirs(x), dtype)
    (gx,) = torch.autograd.grad(y, x, g)
    (ref_gx,) = torch.autograd.grad(ref, x64, g.double())
    assert_close(gx, ref_gx, dtype)


# ----------------------------------------------------------------------------------------------
# Dropout
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.2, 0.6])
def test_dropout_training_drops_and_scales(backend, device, p):
    torch.manual_seed(0)
    drop = nn.Dropout(p)
    x = torch.ones(64, 64, device=device, requires_grad=True)
    y = drop(x)
    kept = y != 0
    frac = kept.float().mean().item()
    # 4096 Bernoulli draws: std of the kept fraction <= 0.008, so 0.04 is five sigma.
    assert abs(frac - (1 - p)) < 0.04, frac
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / (1 - p)))
    # the backward applies the forward's mask and scale
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    torch.testing.assert_close(gx, y.detach())


def test_dropout_seeded_by_torch_generator(backend, device):
    drop = nn.Dropout(0.5)
    x = torch.randn(16, 32, device=device)
    torch.manual_seed(1)
    a = drop(x)
    torch.manual_seed(1)
    b = drop(x)
    c = drop(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


def test_dropout_eval_and_p0_are_identity(backend, device):
    x = torch.randn(8, 16, device=device)
    drop = nn.Dropout(0.5).eval()
    torch.testing.assert_close(drop(x), x, rtol=0, atol=0)
    torch.testing.assert_close(nn.Dropout(0.0).train()(x), x, rtol=0, atol=0)
    assert drop.train().training and not torch.equal(drop(x), x)


def test_dropout_inplace(backend, device):
    torch.manual_seed(0)
    x = torch.randn(8, 16, device=device)
    before = x.clone()
    y = nn.Dropout(0.5, inplace=True)(x)
    assert y.data_ptr() == x.data_ptr()
    assert ((y == 0) | torch.isclose(y, before * 2)).all()
    assert (y == 0).any()
