"""LayerNorm and the fused residual + dropout + LayerNorm op, on both backends.

Every case runs through fasttx.functional (the `backend` fixture picks the path) and is checked
against fasttx.reference computed in float64, forward and every gradient. Dropout cases replay the
kernel's own keep-mask (the launcher's return_mask hook) through the reference.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import fasttx.functional as FF
from fasttx import reference as R
from fasttx.ops._common import draw_seed

from utils import DTYPES, TOL, assert_2x_rule, assert_close, noncontig

try:  # triton (Linux only) for the kernel-level probes; the tests needing it skip without it
    import triton
    import triton.language as tl

    from fasttx.kernels._math import dropout_keep
except ImportError:
    triton = None

F64 = torch.float64


@pytest.fixture
def K():
    """The kernel launchers (need triton)."""
    return pytest.importorskip("fasttx.kernels.layer_norm")


@pytest.fixture
def ops():
    """The Triton-path custom ops (need triton)."""
    pytest.importorskip("triton")
    import fasttx.ops.layer_norm as m

    return m


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _ln_case(x, normalized_shape, w, b, dy, eps=1e-5):
    """(y, dx, dw, db) of FF.layer_norm and of the float64 reference."""
    xs, ws, bs = _leaf(x), _leaf(w) if w is not None else None, _leaf(b) if b is not None else None
    y = FF.layer_norm(xs, normalized_shape, ws, bs, eps)
    y.backward(dy)
    xr, wr, br = _leaf(x), _leaf(w) if w is not None else None, _leaf(b) if b is not None else None
    yr = R.layer_norm(xr, normalized_shape, wr, br, eps, upcast=F64)
    yr.backward(dy.to(F64))
    ours = (y, xs.grad, ws.grad if w is not None else None, bs.grad if b is not None else None)
    ref = (yr, xr.grad, wr.grad if w is not None else None, br.grad if b is not None else None)
    return ours, ref


def _check_all(ours, ref, dtype, names=("y", "dx", "dweight", "dbias"), dx_scale=1.0):
    """Per-dtype tolerance on every output; dx's atol times dx_scale (see _dx_scale)."""
    for name, o, r in zip(names, ours, ref):
        if r is None:
            assert o is None, name
            continue
        atol = TOL[dtype][0] * dx_scale if name == "dx" else None
        assert_close(o, r, dtype=dtype, atol=atol, msg=f"{name} ({dtype})")


def _dx_scale(x, normalized_shape, eps=1e-5):
    """dx = rstd * (...): its absolute rounding error grows with rstd, up to 1/sqrt(eps) = 316
    for a constant row (hidden size 1), where torch's own fp32 dx is off by ~3e-5. The dx atol
    is scaled by max(1, rstd) so that only this conditioning, not the tolerance, is relaxed."""
    n = len(normalized_shape) if not isinstance(normalized_shape, int) else 1
    dims = tuple(range(-n, 0))
    rstd = torch.rsqrt(x.to(F64).var(dim=dims, unbiased=False) + eps)
    return max(1.0, rstd.max().item()) if x.numel() else 1.0


# ----------------------------------------------------------------------------------------------
# layer_norm: shapes, dtypes, affine variants
# ----------------------------------------------------------------------------------------------
SHAPES = [
    (1, 1), (7, 1), (7, 7), (1151, 7), (7, 64), (1, 1000), (7, 1023), (1, 4096),
    (2, 10000),   # > 8192 columns: the chunked (multi-pass) path
    (1, 65536),   # the largest supported hidden size
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,hidden", SHAPES)
def test_layer_norm_matches_reference(backend, device, rows, hidden, dtype):
    torch.manual_seed(0)
    x = torch.randn(rows, hidden, device=device).to(dtype)
    w = (1 + 0.5 * torch.randn(hidden, device=device)).to(dtype)
    b = (0.5 * torch.randn(hidden, device=device)).to(dtype)
    dy = torch.randn(rows, hidden, device=device).to(dtype)
    ours, ref = _ln_case(x, (hidden,), w, b, dy)
    assert ours[0].dtype == dtype and ours[0].shape == x.shape
    assert ours[2].dtype == dtype and ours[3].dtype == dtype
    scale = _dx_scale(x, (hidden,))
    if dtype == torch.float32:
        _check_all(ours, ref, dtype, dx_scale=scale)
    else:
        # 16-bit: the per-dtype tolerance for y and dx; dweight/dbias are sums over `rows` rows of
        # values rounded to 16 bits in the output, so compare them by the 2x rule against torch
        # itself in the same dtype (its own rounding is the yardstick).
        _check_all(ours[:2], ref[:2], dtype, dx_scale=scale)
        xt, wt, bt = _leaf(x), _leaf(w), _leaf(b)
        F.layer_norm(xt, (hidden,), wt, bt).backward(dy)
        assert_2x_rule(ours[2], wt.grad, ref[2], name="dweight")
        assert_2x_rule(ours[3], bt.grad, ref[3], name="dbias")


@pytest.mark.parametrize("affine", ["none", "weight", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_norm_without_weight_or_bias(backend, device, affine, dtype):
    torch.manual_seed(1)
    x = torch.randn(7, 33, device=device).to(dtype)
    w = torch.randn(33, device=device).to(dtype) if affine == "weight" else None
    b = torch.randn(33, device=device).to(dtype) if affine == "bias" else None
    dy = torch.randn(7, 33, device=device).to(dtype)
    ours, ref = _ln_case(x, (33,), w, b, dy)
    _check_all(ours, ref, dtype)


@pytest.mark.parametrize(
    "shape,normalized_shape",
    [
        ((5,), (5,)),                 # 1-D input: a single row
        ((3, 5, 17), (17,)),          # 3-D
        ((2, 3, 4, 5), (5,)),         # 4-D
        ((2, 3, 4, 5), (4, 5)),       # multi-dim normalized_shape
        ((2, 3, 4, 5), (3, 4, 5)),
        ((2, 3, 4, 5), torch.Size([2, 3, 4, 5])),
        ((2, 3, 4, 5), [5]),
    ],
)
def test_layer_norm_leading_and_normalized_dims(backend, device, shape, normalized_shape):
    torch.manual_seed(2)
    ns = tuple(normalized_shape)
    x = torch.randn(shape, device=device)
    w, b = torch.randn(ns, device=device), torch.randn(ns, device=device)
    dy = torch.randn(shape, device=device)
    ours, ref = _ln_case(x, normalized_shape, w, b, dy)
    assert ours[0].shape == x.shape and ours[2].shape == ns
    _check_all(ours, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_layer_norm_fp32_params_with_16bit_input(backend, device, dtype):
    # torch allows float32 weight/bias with a float16/bfloat16 input: output in the input's
    # dtype, gradients in each tensor's own dtype.
    torch.manual_seed(3)
    x = torch.randn(7, 40, device=device).to(dtype)
    w, b = torch.randn(40, device=device), torch.randn(40, device=device)
    dy = torch.randn(7, 40, device=device).to(dtype)
    ours, ref = _ln_case(x, (40,), w, b, dy)
    assert ours[0].dtype == dtype and ours[1].dtype == dtype
    assert ours[2].dtype == torch.float32 and ours[3].dtype == torch.float32
    _check_all(ours, ref, dtype)


@pytest.mark.parametrize("hidden", [100, 9000])  # 9000: long rows (held columns merged in fp64)
def test_layer_norm_float64(backend, device, hidden):
    # float64 input: statistics and accumulation in float64 too, so fp64 accuracy.
    torch.manual_seed(4)
    x = torch.randn(7, hidden, device=device, dtype=F64) + 3
    w, b = torch.randn(hidden, device=device, dtype=F64), torch.randn(hidden, device=device, dtype=F64)
    dy = torch.randn(7, hidden, device=device, dtype=F64)
    ours, ref = _ln_case(x, (hidden,), w, b, dy)
    for name, o, r in zip(("y", "dx", "dw", "db"), ours, ref):
        assert o.dtype == F64
        torch.testing.assert_close(o, r, atol=1e-12, rtol=1e-12, msg=name)


# ----------------------------------------------------------------------------------------------
# layout, edge cases, accuracy
# ----------------------------------------------------------------------------------------------
def test_layer_norm_noncontiguous_input_and_grad(backend, device):
    torch.manual_seed(5)
    x = torch.randn(3, 5, 48, device=device)
    w, b = torch.randn(48, device=device), torch.randn(48, device=device)
    dy = torch.randn(3, 5, 48, device=device)
    ours, ref = _ln_case(noncontig(x), (48,), w, b, noncontig(dy))  # strided columns: a copy
    _check_all(ours, ref, torch.float32)
    # strided rows, contiguous columns (a row stride, no copy), and permuted leading dims
    wide = torch.randn(7, 100, device=device)
    ours, ref = _ln_case(wide[:, :48], (48,), w, b, noncontig(torch.randn(7, 48, device=device)))
    _check_all(ours, ref, torch.float32)
    ours, ref = _ln_case(x.transpose(0, 1), (48,), w, b, dy.transpose(0, 1))
    _check_all(ours, ref, torch.float32)
    # non-contiguous weight and bias
    ours, ref = _ln_case(x, (48,), noncontig(w), noncontig(b), dy)
    _check_all(ours, ref, torch.float32)


@pytest.mark.parametrize("shape,normalized_shape", [((0, 8), (8,)), ((2, 0, 8), (8,)), ((3, 0), (0,))])
def test_layer_norm_zero_size(backend, device, shape, normalized_shape):
    x = torch.randn(shape, device=device, requires_grad=True)
    w = torch.randn(normalized_shape, device=device, requires_grad=True)
    b = torch.randn(normalized_shape, device=device, requires_grad=True)
    y = FF.layer_norm(x, normalized_shape, w, b)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def test_layer_norm_nan_propagates_to_its_row_only(backend, device):
    torch.manual_seed(6)
    x = torch.randn(4, 19, device=device)
    x[1, 3] = float("nan")
    w, b = torch.randn(19, device=device), torch.randn(19, device=device)
    dy = torch.randn(4, 19, device=device)
    ours, _ = _ln_case(x, (19,), w, b, dy)
    xt, wt, bt = _leaf(x), _leaf(w), _leaf(b)
    yt = F.layer_norm(xt, (19,), wt, bt)
    yt.backward(dy)
    y, dx, dw, db = ours
    assert torch.isnan(y[1]).all() and torch.isnan(dx[1]).all()
    assert not torch.isnan(y[[0, 2, 3]]).any() and not torch.isnan(dx[[0, 2, 3]]).any()
    # like torch: dweight is NaN (the NaN row's xhat enters the sum), dbias is not (it sums dy)
    for o, t, name in ((y, yt, "y"), (dx, xt.grad, "dx"), (dw, wt.grad, "dw"), (db, bt.grad, "db")):
        assert_close(o, t, msg=name)


def test_long_rows_walk_several_tiles_per_program(device):
    # Rows past MAX_BLOCK_N are walked in (CHUNK_M, CHUNK_N) tiles, several per program: 37 rows
    # on the interpreter's 4 "SMs" give 12 rows (3 tiles) per program and 1 row to the last; the
    # weight chunk and the fp32 dweight/dbias partials are held across the tiles (the forward's
    # 1-row tiles: 10 rows per program, 7 to the last; the weight and bias of the held first
    # 8192 columns with them). LayerNorm and RMSNorm against the fp64 reference, forward and every
    # gradient.
    import fasttx

    torch.manual_seed(3)
    rows, hidden = 37, 9000
    x = torch.randn(rows, hidden, device=device)
    w = 1 + 0.5 * torch.randn(hidden, device=device)
    b = 0.5 * torch.randn(hidden, device=device)
    dy = torch.randn(rows, hidden, device=device)
    with fasttx.use_backend("triton"):
        ours, ref = _ln_case(x, (hidden,), w, b, dy)
        _check_all(ours, ref, torch.float32)
        xs, ws = _leaf(x), _leaf(w)
        y = FF.rms_norm(xs, (hidden,), ws, 1e-6)
        y.backward(dy)
    xr, wr = _leaf(x.to(F64)), _leaf(w.to(F64))
    yr = R.rms_norm(xr, (hidden,), wr, 1e-6)
    gx, gw = torch.autograd.grad(yr, (xr, wr), dy.to(F64))
    assert_close(y, yr, dtype=torch.float32, msg="rms y")
    assert_close(xs.grad, gx, dtype=torch.float32, msg="rms dx")
    assert_close(ws.grad, gw, dtype=torch.float32, msg="rms dweight")


@pytest.mark.parametrize("hidden", [1000, 10000])
def test_layer_norm_large_mean_accuracy(backend, device, hidden):
    # h = 1000 + noise: E[h^2] - E[h]^2 in fp32 would be off by ~10% (the naive one-pass
    # formula below); a variance from centred values is as accurate as torch's own fp32 result.
    torch.manual_seed(7)
    x = torch.randn(3, hidden, device=device) + 1000.0
    dy = torch.randn(3, hidden, device=device)
    ours, ref = _ln_case(x, (hidden,), None, None, dy)
    xt = _leaf(x)
    yt = F.layer_norm(xt, (hidden,))
    yt.backward(dy)
    assert_2x_rule(ours[0], yt, ref[0], name="y")
    assert_2x_rule(ours[1], xt.grad, ref[1], name="dx")
    m = x.mean(-1, keepdim=True)
    naive = (x - m) * torch.rsqrt((x * x).mean(-1, keepdim=True) - m * m + 1e-5)
    assert (naive - ref[0]).abs().max() > 100 * (ours[0] - ref[0]).abs().max()  # the probe bites


def test_layer_norm_int64_row_offsets(K, device):
    # A (3, 64) view with a row stride of 2^30 + 64 elements over an untouched 4 GiB buffer:
    # row 2 starts at element 2^31 + 128, past int32. The kernels must form row * stride in
    # int64 (an int32 product wraps and reads the wrong, or unmapped, memory). Only the three
    # rows' pages are ever touched. This proves the forward's and backward's row offsets; the
    # dropout index row * N + col is formed the same way but is not probed at that size here.
    N, stride = 64, 2**30 + 64
    try:
        buf = torch.empty(2 * stride + N, dtype=torch.float16, device=device)
    except (RuntimeError, MemoryError) as e:
        pytest.skip(f"cannot reserve a 4 GiB buffer here: {e}")
    x = buf.as_strided((3, N), (stride, 1))
    torch.manual_seed(8)
    x.copy_(torch.randn(3, N))
    y, _, mean, rstd = K.layer_norm_forward(x, N, None, None, 1e-5)
    ref = R.layer_norm(x, (N,), upcast=F64)
    assert_close(y, ref)
    dy = torch.randn(3, N, device=device, dtype=torch.float16)
    dx, _, _, _ = K.layer_norm_backward(dy, x, N, None, None, mean, rstd)
    xr = _leaf(x.to(F64))
    R.layer_norm(xr, (N,)).backward(dy.to(F64))
    assert_close(dx, xr.grad)


def test_layer_norm_backward_is_deterministic(device):
    # dweight/dbias come from per-program partial sums reduced in a fixed order (no atomics):
    # two backward passes give bit-identical gradients.
    import fasttx

    pytest.importorskip("triton")
    torch.manual_seed(9)
    x = torch.randn(1151, 7, device=device)
    w, b = torch.randn(7, device=device), torch.randn(7, device=device)
    dy = torch.randn(1151, 7, device=device)
    grads = []
    with fasttx.use_backend("triton"):
        for _ in range(2):
            xs, ws, bs = _leaf(x), _leaf(w), _leaf(b)
            FF.layer_norm(xs, (7,), ws, bs).backward(dy)
            grads.append((xs.grad, ws.grad, bs.grad))
    for a, c in zip(*grads):
        assert torch.equal(a, c)


def test_layer_norm_bad_inputs(backend, device):
    x = torch.randn(3, 4, device=device)
    with pytest.raises(RuntimeError, match=r"expected input with shape \[\*, 5\]"):
        FF.layer_norm(x, (5,))
    with pytest.raises(RuntimeError, match="Expected weight to be of same shape as normalized_shape"):
        FF.layer_norm(x, (4,), torch.randn(5, device=device))
    with pytest.raises(RuntimeError, match="Expected bias to be of same shape as normalized_shape"):
        FF.layer_norm(x, (4,), None, torch.randn(2, 2, device=device))
    with pytest.raises(RuntimeError, match="normalized_shape to be at least 1-dimensional"):
        FF.layer_norm(x, ())
    # dtype rules: torch raises for these; so must we (messages differ: ours names the rule)
    for w in (torch.randn(4, device=device, dtype=F64), torch.randn(4, device=device).half()):
        with pytest.raises(RuntimeError, match="dtype"):
            FF.layer_norm(x, (4,), w)
    with pytest.raises(RuntimeError):
        FF.layer_norm(x.half(), (4,), torch.randn(4, device=device), torch.randn(4, device=device).half())
    with pytest.raises(NotImplementedError):
        FF.layer_norm(x.int(), (4,))


def test_layer_norm_hidden_limit(device, K):
    # Past the kernel's MAX_HIDDEN the Triton path runs torch's op, with one warning naming the
    # reason (both backends accept the same inputs); the block-size helper itself raises.
    import fasttx

    x = torch.randn(2, K.MAX_HIDDEN + 1, device=device)
    w = torch.randn(K.MAX_HIDDEN + 1, device=device)
    with fasttx.use_backend("triton"):
        with pytest.warns(UserWarning, match=f"limit of {K.MAX_HIDDEN}"):
            y = FF.layer_norm(x, (K.MAX_HIDDEN + 1,), w)
        y2, h = FF.dropout_add_layer_norm(x, None, x.shape[-1:], p=0.0)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (K.MAX_HIDDEN + 1,), w))
    torch.testing.assert_close(y2, torch.nn.functional.layer_norm(x, (K.MAX_HIDDEN + 1,)))
    with pytest.raises(ValueError, match=f"at most {K.MAX_HIDDEN}"):
        K.calc_settings(K.MAX_HIDDEN + 1)
    # the block-size helper: one block up to MAX_BLOCK_N columns, then (CHUNK_M, CHUNK_N) tiles
    _, block_n, _, single = K.calc_settings(1000)
    assert block_n == 1024 and single
    assert K.calc_settings(K.MAX_BLOCK_N)[1:] == (K.MAX_BLOCK_N, 16, True)
    block_m, block_n, _, single = K.calc_settings(K.MAX_BLOCK_N + 1)
    assert (block_m, block_n, single) == (K.CHUNK_M, K.CHUNK_N, False)
    assert K.calc_settings(K.MAX_HIDDEN)[:2] == (K.CHUNK_M, K.CHUNK_N)


# ----------------------------------------------------------------------------------------------
# dropout_add_layer_norm
# ----------------------------------------------------------------------------------------------
def _fused_case(x, res, w, b, dy, dh, p, training=True, seed=0, eps=1e-5, normalized_shape=None):
    """FF.dropout_add_layer_norm under torch.manual_seed(seed), backward with (dy, dh):
    returns (y, h, d_input, d_residual, dweight, dbias), None for absent tensors."""
    ns = normalized_shape or x.shape[-1:]
    xs = _leaf(x)
    rs = _leaf(res) if res is not None else None
    ws = _leaf(w) if w is not None else None
    bs = _leaf(b) if b is not None else None
    torch.manual_seed(seed)
    y, h = FF.dropout_add_layer_norm(xs, rs, ns, ws, bs, eps, p, training)
    torch.autograd.backward([y, h], [dy, dh])
    grads = tuple(t.grad if t is not None else None for t in (xs, rs, ws, bs))
    return (y, h) + grads


def _kernel_mask(K, x, p, seed):
    """The keep-mask the Triton path draws after torch.manual_seed(seed): the same Philox seed
    (drawn the way the op draws it), replayed through the launcher's return_mask hook."""
    torch.manual_seed(seed)
    philox = draw_seed(x.device)
    N = x.shape[-1]
    return K.layer_norm_forward(x, N, None, None, 1e-5, p=p, seed=philox, return_mask=True)[-1]


def _fused_ref(x, res, w, b, dy, dh, p, keep, eps=1e-5):
    xr = _leaf(x)
    rr = _leaf(res) if res is not None else None
    wr = _leaf(w) if w is not None else None
    br = _leaf(b) if b is not None else None
    y, h = R.residual_dropout_layer_norm(xr, rr, wr, br, eps, keep_mask=keep, p=p, upcast=F64)
    torch.autograd.backward([y, h], [dy.to(F64), dh.to(F64)])
    return (y, h) + tuple(t.grad if t is not None else None for t in (xr, rr, wr, br))


NAMES = ("y", "h", "d_input", "d_residual", "dweight", "dbias")


def _inputs(rows, hidden, dtype, device, residual=True, affine=True):
    x = torch.randn(rows, hidden, device=device).to(dtype)
    res = torch.randn(rows, hidden, device=device).to(dtype) if residual else None
    w = (1 + 0.5 * torch.randn(hidden, device=device)).to(dtype) if affine else None
    b = (0.5 * torch.randn(hidden, device=device)).to(dtype) if affine else None
    dy = torch.randn(rows, hidden, device=device).to(dtype)
    dh = torch.randn(rows, hidden, device=device).to(dtype)
    return x, res, w, b, dy, dh


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_p0_matches_reference(backend, device, dtype, residual):
    torch.manual_seed(10)
    args = _inputs(7, 129, dtype, device, residual=residual)
    ours = _fused_case(*args, p=0.0)
    ref = _fused_ref(*args, p=0.0, keep=None)
    assert ours[0].dtype == dtype and ours[1].dtype == dtype
    _check_all(ours, ref, dtype, NAMES)


@pytest.mark.parametrize(
    "rows,hidden,dtype,residual,affine",
    [
        (7, 129, torch.float32, True, True),
        (7, 129, torch.float32, False, True),
        (1151, 7, torch.float32, True, False),
        (3, 1000, torch.float16, True, True),
        (3, 1000, torch.bfloat16, True, True),
        (2, 10000, torch.float32, True, True),  # chunked rows: h stored in fp32, read back
        (2, 10000, torch.float16, True, True),  # chunked rows: x, residual and mask regenerated
    ],
)
def test_fused_dropout_replays_kernel_mask(device, K, rows, hidden, dtype, residual, affine):
    import fasttx

    torch.manual_seed(11)
    p = 0.3
    args = _inputs(rows, hidden, dtype, device, residual=residual, affine=affine)
    with fasttx.use_backend("triton"):
        ours = _fused_case(*args, p=p, seed=123)
    keep = _kernel_mask(K, args[0], p, seed=123)
    assert keep.dtype == torch.bool and keep.shape == args[0].shape
    n = keep.numel()
    # kept fraction within 5 standard deviations of 1 - p
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n) + 1e-6
    ref = _fused_ref(*args, p=p, keep=keep)
    _check_all(ours, ref, dtype, NAMES)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_long_rows_y_does_not_depend_on_storing_h(device, K, dtype):
    # Chunked rows: the second pass reads the stored h back where it holds exactly the h that is
    # normalized (fp32 here), else it recomputes h from x and the residual with the same dropout
    # mask (16-bit: h is stored rounded but normalized unrounded, so reading it back would change
    # y). Either way y is bit-identical to the launch that does not store h.
    torch.manual_seed(12)
    x, res, w, b, _, _ = _inputs(5, 9000, dtype, device)
    y, h, mean, rstd = K.layer_norm_forward(x, 9000, w, b, 1e-5, residual=res, p=0.2, seed=5, store_h=True)
    y0, h0, mean0, rstd0 = K.layer_norm_forward(x, 9000, w, b, 1e-5, residual=res, p=0.2, seed=5)
    assert h0 is None and h.dtype == dtype
    assert torch.equal(y, y0) and torch.equal(mean, mean0) and torch.equal(rstd, rstd0)


if triton is not None:

    @triton.jit
    def _keep_probe(OUT, n, seed, p, BLOCK: tl.constexpr):
        # the mask any fasttx dropout kernel draws for element idx of a flat tensor
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(OUT + idx, dropout_keep(seed, 0, idx, p).to(tl.int8), mask=idx < n)


def test_fused_mask_is_dropout_keep(device, K):
    # The fused kernel's mask is dropout_keep(seed, 0, flat index, p): what every fasttx dropout
    # kernel draws for the same seed. Checked against a one-line kernel around dropout_keep.
    x = torch.randn(5, 77, device=device)
    seed, p = 987654, 0.25
    keep = K.layer_norm_forward(x, 77, None, None, 1e-5, residual=x, p=p, seed=seed, return_mask=True)[-1]
    expected = torch.empty(x.numel(), dtype=torch.int8, device=device)
    _keep_probe[(triton.cdiv(x.numel(), 128),)](expected, x.numel(), seed, p, BLOCK=128)
    assert torch.equal(keep.flatten(), expected.bool())


def test_fused_seed_reproducibility(device):
    import fasttx

    pytest.importorskip("triton")
    x = torch.randn(4, 64, device=device)
    res = torch.randn(4, 64, device=device)
    with fasttx.use_backend("triton"):
        torch.manual_seed(0)
        a = FF.dropout_add_layer_norm(x, res, (64,), p=0.5)
        torch.manual_seed(0)
        b = FF.dropout_add_layer_norm(x, res, (64,), p=0.5)
        torch.manual_seed(1)
        c = FF.dropout_add_layer_norm(x, res, (64,), p=0.5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
def test_fused_eval_and_p1(backend, device, residual):
    torch.manual_seed(12)
    args = _inputs(5, 48, torch.float32, device, residual=residual)
    args[0][2, 5] = float("nan")
    # training=False: no dropout at all
    ours = _fused_case(*args, p=0.7, training=False)
    _check_all(ours, _fused_ref(*args, p=0.0, keep=None), torch.float32, NAMES)
    # p == 1: every element dropped (zeros, a NaN stays NaN as in torch), zero input gradient
    ours = _fused_case(*args, p=1.0)
    ref = _fused_ref(*args, p=1.0, keep=torch.zeros(args[0].shape, dtype=torch.bool, device=device))
    _check_all(ours, ref, torch.float32, NAMES)
    if residual:
        assert torch.isnan(ours[1][2, 5]) and not torch.isnan(ours[1][0]).any()


def test_fused_multi_dim_normalized_shape_and_4d(backend, device):
    torch.manual_seed(13)
    x, res = torch.randn(2, 3, 4, 5, device=device), torch.randn(2, 3, 4, 5, device=device)
    w, b = torch.randn(4, 5, device=device), torch.randn(4, 5, device=device)
    dy, dh = torch.randn_like(x), torch.randn_like(x)
    ours = _fused_case(x, res, w, b, dy, dh, p=0.0, normalized_shape=(4, 5))
    xr, rr, wr, br = _leaf(x), _leaf(res), _leaf(w), _leaf(b)
    h = (rr + xr).to(F64)
    y = R.layer_norm(h, (4, 5), wr, br, upcast=F64)
    torch.autograd.backward([y, h], [dy.to(F64), dh.to(F64)])
    _check_all(ours, (y, h, xr.grad, rr.grad, wr.grad, br.grad), torch.float32, NAMES)


def test_fused_noncontiguous_and_promoted_residual(backend, device):
    torch.manual_seed(14)
    x, res, w, b, dy, dh = _inputs(6, 40, torch.bfloat16, device)
    res32 = res.float()
    ours = _fused_case(noncontig(x), noncontig(res32), w.float(), b.float(), noncontig(dy.float()),
                       dh.float(), p=0.0)
    # h and y take the promoted dtype (float32), each gradient its tensor's dtype
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.float32
    assert ours[2].dtype == torch.bfloat16 and ours[3].dtype == torch.float32
    ref = _fused_ref(x, res32, w.float(), b.float(), dy.float(), dh.float(), p=0.0, keep=None)
    _check_all(ours[:2], ref[:2], torch.float32, NAMES)
    _check_all(ours[2:], ref[2:], torch.bfloat16, NAMES[2:])


def test_fused_zero_size_and_bad_inputs(backend, device):
    x = torch.randn(0, 8, device=device, requires_grad=True)
    y, h = FF.dropout_add_layer_norm(x, torch.zeros(0, 8, device=device), (8,), p=0.5)
    assert y.shape == (0, 8) and h.shape == (0, 8)
    (y.sum() + h.sum()).backward()
    assert x.grad.shape == x.shape
    x = torch.randn(3, 8, device=device)
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
        FF.dropout_add_layer_norm(x, None, (8,), p=1.5)
    with pytest.raises(RuntimeError, match="Expected weight to be of same shape"):
        FF.dropout_add_layer_norm(x, None, (8,), torch.randn(7, device=device))
    with pytest.raises(RuntimeError, match="expected input with shape"):
        FF.dropout_add_layer_norm(x, None, (9,))


def test_fused_residual_shape_mismatch_raises(device):
    import fasttx

    pytest.importorskip("triton")
    x = torch.randn(3, 8, device=device)
    with fasttx.use_backend("triton"):
        with pytest.raises(RuntimeError, match="expected residual of the input's shape"):
            FF.dropout_add_layer_norm(x, torch.randn(1, 8, device=device), (8,))


# ----------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["triton"], indirect=True)  # replays the kernel's mask
def test_compile_fullgraph(backend, device):
    # The public functions traced whole: on the Triton path the custom ops are opaque to dynamo
    # and the seed is drawn inside the op, so no graph break.
    torch._dynamo.reset()
    torch.manual_seed(15)
    x, res, w, b, dy, dh = _inputs(5, 32, torch.float32, device)
    ln = torch.compile(lambda x, w, b: FF.layer_norm(x, (32,), w, b), fullgraph=True, backend="aot_eager")
    xs, ws, bs = _leaf(x), _leaf(w), _leaf(b)
    y = ln(xs, ws, bs)
    y.backward(dy)
    xr, wr, br = _leaf(x), _leaf(w), _leaf(b)
    yr = R.layer_norm(xr, (32,), wr, br, upcast=F64)
    yr.backward(dy.to(F64))
    _check_all((y, xs.grad, ws.grad, bs.grad), (yr, xr.grad, wr.grad, br.grad), torch.float32)

    fused = torch.compile(
        lambda x, r, w, b: FF.dropout_add_layer_norm(x, r, (32,), w, b, 1e-5, 0.3, True),
        fullgraph=True, backend="aot_eager",
    )
    xs, rs, ws, bs = _leaf(x), _leaf(res), _leaf(w), _leaf(b)
    torch.manual_seed(77)
    y, h = fused(xs, rs, ws, bs)
    torch.autograd.backward([y, h], [dy, dh])
    keep = _kernel_mask(pytest.importorskip("fasttx.kernels.layer_norm"), x, 0.3, seed=77)
    ref = _fused_ref(x, res, w, b, dy, dh, p=0.3, keep=keep)
    _check_all((y, h, xs.grad, rs.grad, ws.grad, bs.grad), ref, torch.float32, NAMES)


@pytest.mark.parametrize("hidden", [64, 9000])  # one block, and chunked rows
def test_huge_rows_normalize_exactly_instead_of_overflowing(device, hidden):
    # Rows of +-1e20 (and 3e19, past fp32's sqrt(max)): the variance's squares overflow fp32, which
    # torch turns into NaN; the exact answer is +-1 (and the fp64 oracle gives it). The Triton
    # path scales before squaring, so it gives the exact answer, forward and backward; ordinary
    # rows are bit-identical to the unscaled formula (the other tests hold them to the oracle).
    import fasttx
    import fasttx.reference as R

    sign = torch.where(torch.arange(hidden, device=device) % 2 == 0, 1.0, -1.0)
    x = torch.stack([sign * 1e20, sign * 3e19 + 5e18, torch.randn(hidden, device=device)])
    x.requires_grad_(True)
    w = torch.randn(hidden, device=device, requires_grad=True)
    dy = torch.randn_like(x)
    with fasttx.use_backend("triton"):
        y = FF.layer_norm(x, (hidden,), w)
        y2, _ = FF.add_rms_norm(x, None, (hidden,), w)  # RMSNorm's mean(h^2) likewise
    y.backward(dy)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = R.layer_norm(xr, (hidden,), wr, None, 1e-5)
    ref.backward(dy.double())
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad[:2].double(), xr.grad[:2], atol=1e-24, rtol=1e-4)  # dx ~ rstd ~ 1e-20
    torch.testing.assert_close(x.grad[2].double(), xr.grad[2], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w.grad.double(), wr.grad, atol=1e-5, rtol=1e-5)
    rms_ref = xr.detach() * torch.rsqrt(xr.detach().pow(2).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)
    torch.testing.assert_close(y2.double(), rms_ref * wr.detach(), atol=1e-5, rtol=1e-5)
