"""fasttx.nn.MultiheadAttention against torch.nn.MultiheadAttention (loaded from its state_dict):
outputs, attention weights and every gradient, masks, options and errors, on both backends."""
import copy
import warnings

import pytest
import torch

import fasttx
import fasttx.nn as nn
from tests.utils import ATOL_FLOOR, assert_2x_rule, assert_close

E, H, N, L, S = 32, 2, 3, 5, 7


def _pair(device, dtype=torch.float32, **kwargs):
    """(torch's MHA, ours) with identical, non-trivial parameters (biases and bias_k/v nonzero)."""
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(E, H, device=device, dtype=dtype, **kwargs)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0.0, 0.3)
    ours = nn.MultiheadAttention(E, H, device=device, dtype=dtype, **kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def _inputs(device, batch_first=False, kdim=E, vdim=E, dtype=torch.float32, self_attn=False):
    """query (L, N, E), key (S, N, kdim), value (S, N, vdim) (batch-first when asked),
    leaf tensors requiring grad. self_attn: one tensor for all three (L == S)."""
    def make(seq, dim):
        shape = (N, seq, dim) if batch_first else (seq, N, dim)
        return torch.randn(shape, device=device, dtype=dtype, requires_grad=True)

    if self_attn:
        x = make(L, E)
        return x, x, x
    return make(L, E), make(S, kdim), make(S, vdim)


def _masks(kind, device, dtype=torch.float32, L=L, S=S):
    """(attn_mask, key_padding_mask) in torch MHA's polarity (bool True = masked out).
    Every query row keeps at least one key, so no row is fully masked."""
    g = torch.Generator().manual_seed(1)
    attn = key_pad = None
    if "attn" in kind:
        blocked = torch.rand(L, S, generator=g) < 0.4
        blocked[:, 0] = False
        if "3d" in kind:
            blocked = torch.rand(N * H, L, S, generator=g) < 0.4
            blocked[..., 0] = False
        attn = blocked if "bool" in kind else torch.randn(blocked.shape, generator=g).masked_fill(
            blocked, float("-inf"))
        attn = attn.to(device)
        if attn.is_floating_point():
            attn = attn.to(dtype)
    if "kpm" in kind:
        pad = torch.zeros(N, S, dtype=torch.bool)
        pad[1, -3:] = True
        pad[2, -1:] = True
        key_pad = pad if "bool" in kind else torch.zeros(N, S).masked_fill(pad, float("-inf"))
        key_pad = key_pad.to(device)
        if key_pad.is_floating_point():
            key_pad = key_pad.to(dtype)
    return attn, key_pad


def _to64(x):
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def _check_parity(theirs, ours, q, k, v, **kwargs):
    """Forward (output and weights) and the gradients of q, k, v and every parameter, against an
    fp64 copy of torch's module with the flash-attention rule (TESTING.md): our error at most 2x
    (forward) / 3x (gradients) torch's own fp32 error, plus a 1e-5 floor."""
    out_t, w_t = theirs(q, k, v, **kwargs)
    out_o, w_o = ours(q, k, v, **kwargs)
    assert out_o.shape == out_t.shape and out_o.dtype == out_t.dtype
    assert (w_o is None) == (w_t is None)
    inputs = list(dict.fromkeys([q, k, v]))  # the same tensor once for self-attention
    leaves64 = {t: t.detach().double().requires_grad_() for t in inputs}
    theirs64 = copy.deepcopy(theirs).double()
    out64, w64 = theirs64(*(leaves64[t] for t in (q, k, v)),
                          **{key: _to64(val) for key, val in kwargs.items()})
    assert_2x_rule(out_o, out_t, out64, name="attn_output")
    if w_t is not None:
        assert w_o.shape == w_t.shape
        assert_2x_rule(w_o, w_t, w64, name="attn_weights")
    g = torch.randn_like(out_t)
    grads_t = torch.autograd.grad(out_t, inputs + list(theirs.parameters()), g)
    grads_o = torch.autograd.grad(out_o, inputs + list(ours.parameters()), g)
    grads64 = torch.autograd.grad(out64, list(leaves64.values()) + list(theirs64.parameters()),
                                  g.double())
    names = [f"input{i}" for i in range(len(inputs))] + [n for n, _ in theirs.named_parameters()]
    for name, a, b, ref in zip(names, grads_o, grads_t, grads64):
        assert_2x_rule(a, b, ref, mult=3.0, name=f"grad {name}")
    return out_o, w_o


OPTIONS = [
    {},
    {"batch_first": True},
    {"bias": False},
    {"kdim": 24, "vdim": 40},
    {"add_bias_kv": True},
    {"add_zero_attn": True},
    {"add_bias_kv": True, "add_zero_attn": True, "kdim": 24, "vdim": 40, "batch_first": True},
]
# Each option with a mask kind, so that every option and every mask kind appears and SDPA sees
# every mask shape MHA produces: (1, 1, L, S), (N, H, L, S), (N, 1, 1, S), merged, and S grown by
# bias_kv / zero_attn. (The full cross product is 56 interpreter runs for little more coverage.)
CASES = [
    ({}, "none"),
    ({}, "attn-bool"),
    ({}, "kpm-bool"),
    ({}, "attn-3d-kpm-float"),
    ({"batch_first": True}, "attn-float"),
    ({"bias": False}, "kpm-float"),
    ({"kdim": 24, "vdim": 40}, "attn-kpm-bool"),
    ({"add_bias_kv": True}, "attn-3d-bool"),
    ({"add_zero_attn": True}, "kpm-bool"),
    (OPTIONS[-1], "attn-kpm-bool"),
]


# ----------------------------------------------------------------------------------------------
# Construction
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", OPTIONS)
def test_parameters_state_dict_and_init_match_torch(kwargs):
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(E, H, **kwargs)
    torch.manual_seed(0)
    ours = nn.MultiheadAttention(E, H, **kwargs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), name  # same initialisation from the same seed
    assert repr(ours) == repr(theirs)
    separate = "kdim" in kwargs
    assert (ours.in_proj_weight is None) == separate
    assert (ours.q_proj_weight is None) != separate


def test_constructor_errors_match_torch():
    with pytest.raises(AssertionError, match="embed_dim must be divisible by num_heads"):
        nn.MultiheadAttention(30, 4)
    with pytest.raises(ValueError, match="embed_dim and num_heads must be greater than 0"):
        nn.MultiheadAttention(32, 0)


# ----------------------------------------------------------------------------------------------
# Parity: options x masks, the fast path (need_weights=False)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,mask", CASES,
                         ids=[f"{'-'.join(kw) or 'default'}-{m}" for kw, m in CASES])
def test_fast_path_matches_torch(backend, device, kwargs, mask):
    theirs, ours = _pair(device, **kwargs)
    q, k, v = _inputs(device, kwargs.get("batch_first", False), kwargs.get("kdim", E),
                      kwargs.get("vdim", E))
    attn, kpm = _masks(mask, device)
    _check_parity(theirs, ours, q, k, v, attn_mask=attn, key_padding_mask=kpm, need_weights=False)


def test_fast_path_calls_fasttx_sdpa(backend, device, monkeypatch):
    calls = []
    sdpa = fasttx.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("attn_mask"))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(fasttx.functional, "scaled_dot_product_attention", counting)
    _, ours = _pair(device)
    q, k, v = _inputs(device)
    ours(q, k, v, need_weights=False)
    assert len(calls) == 1
    ours(q, k, v, need_weights=True)  # the weights come from the explicit math
    assert len(calls) == 1


@pytest.mark.parametrize("batch_first,need_weights", [(False, False), (True, True)])
def test_self_attention_matches_torch(backend, device, batch_first, need_weights):
    # query is key is value: the packed projection runs as one GEMM
    theirs, ours = _pair(device, batch_first=batch_first)
    q, k, v = _inputs(device, batch_first, self_attn=True)
    attn, kpm = _masks("attn-kpm-bool", device, S=L)
    _check_parity(theirs, ours, q, k, v, attn_mask=attn, key_padding_mask=kpm,
                  need_weights=need_weights)


# ----------------------------------------------------------------------------------------------
# Attention weights (need_weights=True)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("kwargs,mask", [
    ({}, "attn-kpm-bool"),
    ({"batch_first": True, "add_bias_kv": True}, "attn-float"),
    ({"kdim": 24, "vdim": 40, "add_zero_attn": True}, "attn-3d-kpm-float"),
])
def test_need_weights_matches_torch(backend, device, kwargs, mask, average):
    theirs, ours = _pair(device, **kwargs)
    q, k, v = _inputs(device, kwargs.get("batch_first", False), kwargs.get("kdim", E),
                      kwargs.get("vdim", E))
    attn, kpm = _masks(mask, device)
    _, w = _check_parity(theirs, ours, q, k, v, attn_mask=attn, key_padding_mask=kpm,
                         need_weights=True, average_attn_weights=average)
    S_total = S + kwargs.get("add_bias_kv", False) + kwargs.get("add_zero_attn", False)
    assert w.shape == ((N, L, S_total) if average else (N, H, L, S_total))
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))


# ----------------------------------------------------------------------------------------------
# Unbatched inputs, is_causal, fully masked rows
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("need_weights", [False, True])
def test_unbatched_matches_torch(backend, device, need_weights):
    theirs, ours = _pair(device, batch_first=True)  # batch_first is ignored for 2-D inputs
    q = torch.randn(L, E, device=device, requires_grad=True)
    k = torch.randn(S, E, device=device, requires_grad=True)
    v = torch.randn(S, E, device=device, requires_grad=True)
    blocked = torch.rand(H, L, S) < 0.3
    blocked[..., 0] = False
    kpm = torch.zeros(S, dtype=torch.bool, device=device)
    kpm[-2:] = True
    out, w = _check_parity(theirs, ours, q, k, v, attn_mask=blocked.to(device),
                           key_padding_mask=kpm, need_weights=need_weights,
                           average_attn_weights=False)
    assert out.shape == (L, E)
    if need_weights:
        assert w.shape == (H, L, S)


@pytest.mark.parametrize("need_weights,with_kpm", [(False, False), (False, True), (True, False)])
def test_is_causal_matches_torch(backend, device, need_weights, with_kpm):
    theirs, ours = _pair(device, batch_first=True)
    q, k, v = _inputs(device, batch_first=True, self_attn=True)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L, device=device)
    kpm = _masks("kpm-float", device, S=L)[1] if with_kpm else None  # float, like the mask
    _check_parity(theirs, ours, q, k, v, attn_mask=causal, key_padding_mask=kpm,
                  need_weights=need_weights, is_causal=True)


def test_is_causal_hint_overrides_the_mask_like_torch(backend, device):
    # torch trusts the hint on the SDPA path: with no padding mask and no weights, a causal
    # mask is applied whatever attn_mask says. With weights asked for, attn_mask counts.
    theirs, ours = _pair(device)
    q, k, v = _inputs(device, self_attn=True)
    not_causal = torch.zeros(L, L, device=device)
    a = _check_parity(theirs, ours, q, k, v, attn_mask=not_causal, need_weights=False,
                      is_causal=True)[0]
    b = ours(q, k, v, attn_mask=not_causal, need_weights=False)[0]
    assert (a - b).abs().max() > 1e-3  # the hint changed the result, as it does in torch
    _check_parity(theirs, ours, q, k, v, attn_mask=not_causal, need_weights=True, is_causal=True)


@pytest.mark.parametrize("need_weights", [False, True])
def test_fully_masked_rows_like_torch(backend, device, need_weights):
    # torch: zeros (SDPA) on the fast path, NaN from the explicit softmax with weights.
    theirs, ours = _pair(device, bias=False)
    q, k, v = _inputs(device)
    kpm = torch.zeros(N, S, dtype=torch.bool, device=device)
    kpm[1] = True
    out_t, w_t = theirs(q, k, v, key_padding_mask=kpm, need_weights=need_weights)
    out_o, w_o = ours(q, k, v, key_padding_mask=kpm, need_weights=need_weights)
    assert_close(out_o, out_t)  # equal_nan
    assert out_o[:, 1].isnan().all() == need_weights
    assert out_o[:, [0, 2]].isfinite().all()
    if need_weights:
        assert_close(w_o, w_t)


# ----------------------------------------------------------------------------------------------
# Dropout on the attention weights
# ----------------------------------------------------------------------------------------------
def test_train_mode_p0_matches_torch(backend, device):
    theirs, ours = _pair(device, dropout=0.0)
    theirs.train(), ours.train()
    q, k, v = _inputs(device)
    _check_parity(theirs, ours, q, k, v, need_weights=False)


def test_dropout_on_returned_weights(backend, device):
    p = 0.5
    _, ours = _pair(device, dropout=p)
    q, k, v = _inputs(device)
    with torch.no_grad():
        w_eval = ours.eval()(q, k, v, average_attn_weights=False)[1]
        w_train = ours.train()(q, k, v, average_attn_weights=False)[1]
    kept = w_train != 0
    # N*H*L*S = 210 draws: std of the kept fraction ~0.035; 0.15 is four sigma
    assert abs(kept.float().mean().item() - (1 - p)) < 0.15
    torch.testing.assert_close(w_train[kept], w_eval[kept] / (1 - p))


def test_dropout_on_fast_path(backend, device):
    _, ours = _pair(device, dropout=0.5)
    q, k, v = _inputs(device)
    ours.train()
    torch.manual_seed(3)
    a = ours(q, k, v, need_weights=False)[0]
    torch.manual_seed(3)
    b = ours(q, k, v, need_weights=False)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # seeded by torch's generator
    ref = ours.eval()(q, k, v, need_weights=False)[0]
    assert (a - ref).abs().max() > 1e-3  # something was dropped
    (gq,) = torch.autograd.grad(a, q, torch.ones_like(a))
    assert gq.isfinite().all()


# ----------------------------------------------------------------------------------------------
# Low precision: the flash-attention 2x rule against an fp64 copy of torch's module
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_fast_path(backend, device, dtype):
    theirs64, _ = _pair(device, dtype=torch.float64, batch_first=True)
    theirs, ours = _pair(device, dtype=dtype, batch_first=True)
    theirs.load_state_dict(theirs64.state_dict())
    ours.load_state_dict(theirs64.state_dict())
    q, k, v = _inputs(device, batch_first=True, dtype=dtype)
    attn, kpm = _masks("attn-kpm-bool", device)
    kw = dict(attn_mask=attn, key_padding_mask=kpm, need_weights=False)
    out = ours(q, k, v, **kw)[0]
    assert out.dtype == dtype
    ref = theirs64(q.double(), k.double(), v.double(), **kw)[0]
    assert_2x_rule(out, theirs(q, k, v, **kw)[0], ref, atol=ATOL_FLOOR[dtype])


# ----------------------------------------------------------------------------------------------
# Errors and warnings: torch's exception types, clear messages
# ----------------------------------------------------------------------------------------------
def _bad_calls(device):
    q, k, v = _inputs(device)
    return [
        ("is_causal without attn_mask", RuntimeError, "Need attn_mask",
         lambda m: m(q, k, v, is_causal=True)),
        ("int mask", AssertionError, "only bool and floating types of attn_mask",
         lambda m: m(q, k, v, attn_mask=torch.zeros(L, S, dtype=torch.int64, device=device))),
        ("2-D mask shape", RuntimeError, "The shape of the 2D attn_mask",
         lambda m: m(q, k, v, attn_mask=torch.zeros(L, S + 1, device=device))),
        ("3-D mask shape", RuntimeError, "The shape of the 3D attn_mask",
         lambda m: m(q, k, v, attn_mask=torch.zeros(N, L, S, device=device))),
        ("4-D mask", AssertionError, "expected `attn_mask` to be `None`, 2-D or 3-D",
         lambda m: m(q, k, v, attn_mask=torch.zeros(1, 1, L, S, device=device))),
        ("padding mask batch", AssertionError, r"key_padded_mask.shape\[0\]",
         lambda m: m(q, k, v, key_padding_mask=torch.zeros(N + 1, S, dtype=torch.bool,
                                                           device=device))),
        ("padding mask length", AssertionError, r"key_padded_mask.shape\[1\]",
         lambda m: m(q, k, v, key_padding_mask=torch.zeros(N, S + 1, dtype=torch.bool,
                                                           device=device))),
        ("4-D query", AssertionError, "query should be unbatched 2D or batched 3D",
         lambda m: m(q[None], k[None], v[None])),
        ("query width", AssertionError, "was expecting embedding dimension of 32",
         lambda m: m(q[..., :16], k, v)),
        ("key/value shapes", AssertionError, "does not match value shape",
         lambda m: m(q, k, v[:-1])),
    ]


@pytest.mark.parametrize("case", range(10))
def test_bad_inputs_raise_like_torch(backend, device, case):
    name, exc, match, call = _bad_calls(device)[case]
    theirs, ours = _pair(device)
    with pytest.raises(exc):
        call(theirs)
    with pytest.raises(exc, match=match):
        call(ours)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_nested_tensor_input_raises(device):
    _, ours = _pair(device, batch_first=True)
    x = torch.nested.nested_tensor([torch.randn(3, E), torch.randn(5, E)], device=device)
    with pytest.raises(AssertionError, match="NestedTensor"):
        ours(x, x, x)


def test_mismatched_mask_types_warn_like_torch(device):
    theirs, ours = _pair(device)
    q, k, v = _inputs(device)
    attn, _ = _masks("attn-float", device)
    _, kpm = _masks("kpm-bool", device)
    for m in (theirs, ours):
        with pytest.warns(UserWarning, match="mismatched key_padding_mask and attn_mask"):
            m(q, k, v, attn_mask=attn, key_padding_mask=kpm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _check_parity(theirs, ours, q, k, v, attn_mask=attn, key_padding_mask=kpm)
