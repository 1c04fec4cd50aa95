"""The checklist every fasttx op owes, run over the op registry (fasttx._registry.OPS): an op
declared with `@fasttx_op` is picked up here by itself, and fails until it has a CASE (below, or
as CONTRACT_CASES in its own tests/test_<op>.py).

Per op, on both backends: a zero-size call; NaN propagation (a NaN first element in every float
input: where torch's path has NaN, so has ours); non-contiguous inputs and a non-contiguous
grad_output (same values and gradients as the contiguous call); torch.compile(fullgraph=True)
(same result as eager); torch's exception types for bad arguments. Per op, once: each custom op of
its ops module has a DTensor sharding rule declared, the fp64 oracle (fasttx/reference.py) has it,
a bench/bench_<op>.py calls it, and an int64-offset probe test exists (or the CASE says why none
applies). Tiny shapes: the file runs in well under a minute under the Triton interpreter. The
ops' own semantics (numerics against the oracle, dtypes, options) stay in tests/test_<op>.py.
"""
import ast
import os
import glob
import importlib

import pytest
import torch

import fasttx
import fasttx.functional as FF
import fasttx.reference as R
from fasttx import _registry
from utils import Case, noncontig, run_probe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _int(t):
    return torch.arange(6).reshape(2, 3)


_HERE = "tests/test_op_contract.py::test_int64_offset_probe_"  # the probes at the end of this file
CASES = {
    "layer_norm": Case(lambda t: (t(3, 8), (8,), t(8), t(8), 1e-5), lambda t: (t(0, 8), (8,), t(8), t(8), 1e-5),
                       bad=((lambda t: (_int(t), (3,)), (NotImplementedError, RuntimeError)),
                            (lambda t: (t(3, 8), 8), TypeError)),
                       probe=_HERE + "norms"),
    "gelu": Case(lambda t: (t(3, 8), "tanh"), lambda t: (t(0, 8), "none"),
                 bad=((lambda t: (_int(t),), (NotImplementedError, RuntimeError)), (lambda t: (t(3), 1), TypeError)),
                 probe="tests/test_gelu.py::test_int64_row_offset_probe"),
    "relu": Case(lambda t: (t(3, 8),), lambda t: (t(0, 8),), bad=((lambda t: ([1.0],), TypeError),),
                 probe="n/a: torch's own kernel on every path"),
    "dropout": Case(lambda t: (t(3, 8), 0.5, True), lambda t: (t(0, 8), 0.5, True),
                    bad=((lambda t: (t(3), 1.5), ValueError), (lambda t: ([1.0], 0.5), TypeError)),
                    probe="tests/test_dropout.py::test_int64_row_offset_probe", random=True),
    "softmax": Case(lambda t: (t(3, 8), 0), lambda t: (t(0, 8), -1),
                    bad=((lambda t: (t(3), 1), IndexError), (lambda t: (t(3), "a"), TypeError)),
                    probe="tests/test_softmax.py::test_int64_row_offset_probe"),
    "scaled_dot_product_attention": Case(
        lambda t: (t(1, 2, 5, 8), t(1, 2, 6, 8), t(1, 2, 6, 8), None, 0.0, True),
        lambda t: (t(1, 2, 0, 8), t(1, 2, 6, 8), t(1, 2, 6, 8)),
        bad=((lambda t: (t(1, 2, 5, 8), t(1, 2, 6, 4), t(1, 2, 6, 8)), RuntimeError),
             (lambda t: (t(1, 2, 5, 8), [1.0], t(1, 2, 6, 8)), TypeError)),
        probe="n/a: its int64 probe (test_attention.py::test_int64_offsets_long_kv_cache) needs a GPU's memory"),
    "bias_gelu": Case(lambda t: (t(3, 8), t(8)), lambda t: (t(0, 8), t(8)),
                      bad=((lambda t: (t(3, 8), t(5)), RuntimeError),),
                      probe="tests/test_gelu.py::test_int64_row_offset_probe"),
    "bias_relu": Case(lambda t: (t(3, 8), t(8)), lambda t: (t(0, 8), t(8)),
                      bad=((lambda t: (t(3, 8), t(5)), RuntimeError),), probe=_HERE + "activations"),
    "dropout_add_layer_norm": Case(
        lambda t: (t(3, 8), t(3, 8), (8,), t(8), t(8), 1e-5, 0.25), lambda t: (t(0, 8), t(0, 8), (8,)),
        bad=((lambda t: (t(3, 8), t(3, 8), (8,), None, None, 1e-5, 1.5), ValueError),
             (lambda t: (t(3, 8), t(2, 8), (8,)), RuntimeError)),
        probe=_HERE + "norms", oracle="residual_dropout_layer_norm", random=True),
    "rms_norm": Case(lambda t: (t(3, 8), (8,), t(8)), lambda t: (t(0, 8), (8,), t(8)),
                     bad=((lambda t: (t(3, 8), 8), TypeError), (lambda t: (t(3, 8), (5,)), RuntimeError)),
                     probe=_HERE + "norms"),
    "add_rms_norm": Case(lambda t: (t(3, 8), t(3, 8), (8,), t(8)), lambda t: (t(0, 8), t(0, 8), (8,), t(8)),
                         bad=((lambda t: (t(3, 8), t(2, 8), (8,)), RuntimeError),
                              (lambda t: (t(3, 8), [1.0], (8,)), TypeError)),
                         probe=_HERE + "norms"),
    "swiglu": Case(lambda t: (t(3, 8), t(3, 8)), lambda t: (t(0, 8),),
                   bad=((lambda t: (t(3, 7),), RuntimeError), (lambda t: (_int(t), _int(t)), NotImplementedError)),
                   probe=_HERE + "activations", oracle="gated"),
    "geglu": Case(lambda t: (t(3, 8), None, "tanh"), lambda t: (t(0, 8), t(0, 8)),
                  bad=((lambda t: (t(3, 8), None, "x"), RuntimeError), (lambda t: ([1.0],), TypeError)),
                  probe=_HERE + "activations", oracle="gated"),
    "apply_rotary_emb": Case(lambda t: (t(1, 2, 5, 8), t(1, 1, 5, 8), t(5, 4, grad=False), t(5, 4, grad=False)),
                             lambda t: (t(1, 2, 0, 8), t(1, 1, 0, 8), t(0, 4, grad=False), t(0, 4, grad=False)),
                             bad=((lambda t: (t(2, 5, 8), t(2, 5, 8), t(5, 4), t(5, 4)), RuntimeError),
                                  (lambda t: (t(1, 2, 5, 8), [1.0], t(5, 4), t(5, 4)), TypeError)),
                             probe=_HERE + "rotary", oracle="rotary"),
    "cross_entropy": Case(lambda t: (t(4, 5), t(4, kind="index")), lambda t: (t(0, 5), t(0, kind="index")),
                          bad=((lambda t: (t(4, 5), t(3, kind="index")), (ValueError, RuntimeError)),
                               (lambda t: (t(4, 5), t(4, kind="index"), None, None, -100, None, "x"), ValueError)),
                          probe=_HERE + "cross_entropy"),
    "linear_cross_entropy": Case(lambda t: (t(4, 8), t(5, 8), t(4, kind="index")),
                                 lambda t: (t(0, 8), t(5, 8), t(0, kind="index")),
                                 bad=((lambda t: (t(4, 8), t(5, 7), t(4, kind="index")), RuntimeError),
                                      (lambda t: ([1.0], t(5, 8), t(4, kind="index")), TypeError)),
                                 probe=_HERE + "cross_entropy"),
    "moe_experts": Case(lambda t: (t(4, 8), t(4, 2, kind="index"), t(4, 2), t(5, 12, 8), t(5, 8, 6)),
                        lambda t: (t(0, 8), t(0, 2, kind="index"), t(0, 2), t(5, 12, 8), t(5, 8, 6)),
                        bad=((lambda t: (t(4, 8), t(4, 2), t(4, 2), t(5, 12, 8), t(5, 8, 6)), RuntimeError),
                             (lambda t: ([1.0], t(4, 2, kind="index"), t(4, 2), t(5, 12, 8), t(5, 8, 6)), TypeError)),
                        probe=_HERE + "moe"),
    "linear_log_probs": Case(lambda t: (t(4, 8), t(5, 8), t(4, kind="index")),
                             lambda t: (t(0, 8), t(5, 8), t(0, kind="index")),
                             bad=((lambda t: (t(4, 8), t(5, 7), t(4, kind="index")), RuntimeError),
                                  (lambda t: ([1.0], t(5, 8), t(4, kind="index")), TypeError)),
                             probe=_HERE + "cross_entropy"),
    "linear_jsd": Case(lambda t: (t(4, 8), t(5, 8), t(4, 6), t(5, 6)), lambda t: (t(0, 8), t(5, 8), t(0, 6), t(5, 6)),
                       bad=((lambda t: (t(4, 8), t(5, 8), t(4, 6), t(3, 6)), (ValueError, RuntimeError)),
                            (lambda t: ([1.0], t(5, 8), t(4, 6), t(5, 6)), TypeError)),
                       probe="n/a: torch ops only (chunked), no kernel offsets", oracle="generalized_jsd"),
    "linear_kl_div": Case(lambda t: (t(4, 8), t(5, 8), t(4, 6), t(5, 6)),
                          lambda t: (t(0, 8), t(5, 8), t(0, 6), t(5, 6)),
                          bad=((lambda t: (t(4, 8), t(5, 8), t(4, 6), t(3, 6)), (ValueError, RuntimeError)),
                               (lambda t: ([1.0], t(5, 8), t(4, 6), t(5, 6)), TypeError)),
                          probe="n/a: torch ops only (chunked), no kernel offsets", oracle="generalized_jsd"),
}
# An op's CASE may also sit beside its semantics tests, as CONTRACT_CASES in tests/test_<op>.py.
for _path in sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "test_*.py"))):
    if "CONTRACT_CASES" in open(_path).read() and not _path.endswith("test_op_contract.py"):
        CASES.update(importlib.import_module(os.path.basename(_path)[:-3]).CONTRACT_CASES)
OP_NAMES = list(_registry.OPS)


def _maker(layout="contiguous", nan=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    made = []

    def t(*shape, grad=True, kind="float"):
        if kind == "index":
            return torch.randint(0, 5, shape, generator=g)
        x = torch.randn(*shape, generator=g)
        if nan and x.numel():
            x.view(-1)[0] = float("nan")
        if layout == "noncontig" and x.dim():
            x = noncontig(x)
        if grad:
            x = x.requires_grad_(True) if layout == "contiguous" else x.detach().requires_grad_(True)
        made.append(x)
        return x

    t.leaves = made
    return t


def _outputs(out):
    return [o for o in (out if isinstance(out, tuple) else (out,)) if o.is_floating_point()]


def _run(name, args_fn, layout="contiguous", nan=False, grad=True, seed=0):
    t = _maker(layout, nan)
    args = args_fn(t)
    torch.manual_seed(seed)
    outs = _outputs(getattr(FF, name)(*args))
    grads = None
    leaves = [x for x in t.leaves if x.requires_grad]
    if grad and leaves and any(o.requires_grad for o in outs):
        gen = torch.Generator().manual_seed(1)
        gos = [torch.randn(o.shape, generator=gen) for o in outs]
        if layout == "noncontig":
            gos = [noncontig(go) if go.dim() else go for go in gos]
        loss = sum((o * go).sum() for o, go in zip(outs, gos) if o.requires_grad)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [o.detach() for o in outs], grads


@pytest.fixture(params=OP_NAMES)
def op(request):
    if request.param not in CASES:
        pytest.fail(f"fasttx op {request.param} has no CASE in tests/test_op_contract.py: add one")
    return request.param


def test_every_op_has_a_case():
    assert sorted(CASES) == sorted(OP_NAMES)


def test_zero_size(op, backend):
    got, _ = _run(op, CASES[op].zero, grad=False)
    with fasttx.use_backend("torch"):
        want, _ = _run(op, CASES[op].zero, grad=False)
    assert [o.shape for o in got] == [o.shape for o in want]


def test_nan_propagates(op, backend):
    got, _ = _run(op, CASES[op].args, nan=True, grad=False)
    with fasttx.use_backend("torch"):
        want, _ = _run(op, CASES[op].args, nan=True, grad=False)
    assert any(torch.isnan(o).any() for o in want), "the NaN case must put a NaN into some output"
    for g, w in zip(got, want):
        # no NaN of torch's disappears (ours may spread one further: attention turns a NaN query
        # row into NaN where torch's CPU kernel gives NaN in one element and zeros elsewhere)
        assert not (torch.isnan(w) & ~torch.isnan(g)).any()


def test_noncontiguous_input_and_grad(op, backend):
    out, grads = _run(op, CASES[op].args, layout="noncontig")
    want, want_grads = _run(op, CASES[op].args)
    for g, w in zip(out, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    for g, w in zip(grads or (), want_grads or ()):
        if w is not None:
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    if backend == "triton" and not CASES[op].random:  # the two paths agree
        with fasttx.use_backend("torch"):
            ref, ref_grads = _run(op, CASES[op].args)
        for g, w in zip(out + list(grads or ()), ref + list(ref_grads or ())):
            if w is not None:
                torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_compiles_fullgraph(op, backend):
    args = CASES[op].args(_maker())
    fn = getattr(FF, op)
    torch.manual_seed(0)
    want = _outputs(fn(*args))  # eager first: the interpreter's one-time warning is not traced
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: fn(*a), fullgraph=True, backend="eager")
    torch.manual_seed(0)
    got = _outputs(compiled(*args))
    if not CASES[op].random:
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert [g.shape for g in got] == [w.shape for w in want]


def test_bad_arguments_raise_torchs_exception_types(op, backend):
    for args_fn, exc in CASES[op].bad:
        with pytest.raises(exc):
            getattr(FF, op)(*args_fn(_maker()))


def _module_of(name):
    c = _registry.CONTRACTS[name]
    return __import__(c.tensors.__module__, fromlist=["_"])


def test_dtensor_rule_declared_for_each_custom_op(op):
    from torch._library.custom_ops import CustomOpDef

    import fasttx.distributed as D

    customs = [v._name for v in vars(_module_of(op)).values() if isinstance(v, CustomOpDef)]
    assert [n for n in customs if n not in D._declared] == []


def test_oracle_present(op):
    oracle = CASES[op].oracle or op
    if callable(oracle):  # a composition of fasttx.reference's functions, written in the CASE
        assert oracle.__module__.startswith("test_"), oracle
        return
    assert callable(getattr(R, oracle, None)), f"fasttx.reference has no oracle for {op}"


def test_bench_present(op):
    if op == "relu":
        pytest.skip("relu runs torch's own kernel on every path: nothing of fasttx's to time")
    calls = set()
    for f in os.listdir(os.path.join(ROOT, "bench")):
        if f.startswith("bench_") and f.endswith(".py"):
            tree = ast.parse(open(os.path.join(ROOT, "bench", f)).read())
            calls |= {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call)
                      and isinstance(n.func, ast.Attribute) and getattr(n.func.value, "id", "") == "ff"}
    assert op in calls, f"no bench/bench_*.py calls fasttx.functional.{op} (as ff.{op})"


def test_int64_probe_present_or_excused(op):
    probe = CASES[op].probe
    assert probe, f"{op}: name its int64-offset probe test, or say why none applies"
    if probe.startswith("n/a:"):
        return
    path, test = probe.split("::")
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == test)
    assert any(isinstance(n, ast.Name) and n.id == "run_probe" for n in ast.walk(fn))


def test_dtensor_rules_registered_by_a_first_call_under_torch_compile():
    # fasttx.functional loads (and declares every rule) before torch.distributed.tensor is imported;
    # the first fasttx call is then a compiled one: route() registers the rules through an import
    # that dynamo runs rather than traces (fasttx/_dtensor_on_import.py), without a graph break.
    code = (
        "import torch, fasttx, fasttx.functional as FF, fasttx.distributed as D\n"
        "import torch.distributed.tensor  # noqa: F401\n"
        "fasttx.use_backend('triton')\n"
        "fasttx._backend._warned_slow = True  # the interpreter's one-time warning is not traceable\n"
        "assert D.registered_ops() == []\n"
        "x = torch.randn(2, 8)\n"
        "y = torch.compile(lambda t: FF.gelu(t), fullgraph=True, backend='eager')(x)\n"
        "assert torch.allclose(y, torch.nn.functional.gelu(x), atol=1e-6), 'wrong result'\n"
        "assert 'bias_act' in D.registered_ops() and 'attention' in D.registered_ops(), D.registered_ops()\n"
        "print('ok')\n"
    )
    run_probe(code, timeout=120)


def test_warnings_point_at_the_callers_line(monkeypatch):
    # route() and the contract sit between the caller and the warnings (the interpreter's one-time
    # note, a fallback): both still name the caller's file and line (fasttx/_backend.py: _user_stacklevel)
    monkeypatch.setattr(fasttx._backend, "_warned", set())
    monkeypatch.setattr(fasttx._backend, "_warned_slow", False)
    line = test_warnings_point_at_the_callers_line.__code__.co_firstlineno + 7  # the FF.gelu line
    with fasttx.use_backend("triton"), pytest.warns(UserWarning) as record:
        FF.gelu(torch.randn(3))
        FF.relu_squared(torch.arange(3))
    got = {(w.filename, w.lineno) for w in record
           if "Triton interpreter" in str(w.message) or "relu_squared" in str(w.message)}
    assert got == {(__file__, line), (__file__, line + 1)}, got


# ----------------------------------------------------------------------------------------------
# int64-offset probes (the CASEs above name them). Each runs the op's kernels through their
# launchers, in a fresh Python (run_probe: a wrapped offset may crash the process), on views of one
# 4 GiB virtual buffer whose rows (or heads) sit S = 2^30 + 64 elements apart: the stride fits int32,
# while row 2 starts past 2^31, so an int32 product row * stride wraps. Under the interpreter int32
# arithmetic wraps as on a GPU; only the pages the views touch become real memory. Every result is
# compared with an fp64 computation on the same values. What they do not prove: outputs or Philox
# indices past 2^31 (the outputs are small and contiguous unless a probe says otherwise).
# ----------------------------------------------------------------------------------------------
_FAR = r"""
import torch
import torch.nn.functional as F
dev = "cuda" if torch.cuda.is_available() else "cpu"
S = 2**30 + 64  # row stride that fits int32, while row 2 starts at 2^31 + 128
big = torch.empty(2 * S + 65536, dtype=torch.float16, device=dev)  # untouched pages stay virtual on CPU
_slot = [0]


def far(*shape, fill=True):
    # a view at a fresh offset of `big`: (n,) -> (3, n) with rows S apart; (1, H, L, D) with heads S apart
    shape = (3, shape[0]) if len(shape) == 1 else shape
    stride, width = ((S, 1), shape[1]) if len(shape) == 2 else ((S, S, shape[3], 1), shape[2] * shape[3])
    v = big.as_strided(shape, stride, _slot[0])
    _slot[0] += width
    assert _slot[0] <= 65536 and v.storage_offset() + sum((n - 1) * st for n, st in zip(shape, stride)) >= 2**31
    if fill:
        v.copy_(torch.randn(shape, device=dev))
    return v


def close(ours, ref, tol, what):
    err = (ours.double() - ref.double()).abs().max().item()
    scale = max(1.0, ref.double().abs().max().item())
    assert err <= tol * scale, (what, err, scale)


def small(*shape):
    return torch.randn(*shape, device=dev, dtype=torch.float16)
"""

_PROBE_NORMS = _FAR + r"""
from fasttx.kernels import layer_norm as K
N = 4096
x, res, dy, dho = far(N), far(N), far(N), far(N)
w, b = small(N), small(N)
xd, wd, bd = (t.double().requires_grad_(True) for t in (x, w, b))
# layer_norm: forward and backward read x, dy at the far rows
y, _, mean, rstd = K.layer_norm_forward(x, N, w, b, 1e-5)
ref = F.layer_norm(xd, (N,), wd, bd, 1e-5)
close(y, ref, 1e-2, "layer_norm y")
dx, _, dw, db = K.layer_norm_backward(dy, x, N, w, b, mean, rstd)
for ours, theirs, what in zip((dx, dw, db), torch.autograd.grad(ref, (xd, wd, bd), dy.double()), "x w b"):
    close(ours, theirs, 1e-2, "layer_norm d" + what)
# dropout_add_layer_norm: h = res + dropout(x), the stored h and dh_out read back at far rows
p = 0.25
y, h, mean, rstd, keep = K.layer_norm_forward(x, N, w, b, 1e-5, residual=res, p=p, seed=7, store_h=True,
                                              return_mask=True)
h_ref = res.double() + x.double() * keep / (1 - p)
close(h, h_ref, 1e-2, "dropout_add h")
hd = h.double().requires_grad_(True)
ref = F.layer_norm(hd, (N,), w.double(), b.double(), 1e-5)
close(y, ref, 1e-2, "dropout_add y")
h_far = far(N, fill=False)
h_far.copy_(h)
dx, dh, dw, db = K.layer_norm_backward(dy, h_far, N, w, b, mean, rstd, dh_out=dho, p=p, seed=7, store_dh=True)
gh = torch.autograd.grad(ref, hd, dy.double())[0] + dho.double()
close(dh, gh, 1e-2, "dropout_add dh")
close(dx, gh * keep / (1 - p), 1e-2, "dropout_add dx")
# rms_norm
y, _, rstd = K.rms_norm_forward(x, N, w, 1e-6)
xd = x.double().requires_grad_(True)
ref = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * wd
close(y, ref, 1e-2, "rms_norm y")
dx, _, dw = K.rms_norm_backward(dy, x, N, w, rstd)
gx, gw = torch.autograd.grad(ref, (xd, wd), dy.double())
close(dx, gx, 1e-2, "rms_norm dx")
close(dw, gw, 1e-2, "rms_norm dw")
# offset_rms_norm: the (1 + weight) gain (cast "gemma")
y, _, rstd = K.rms_norm_forward(x, N, w, 1e-6, cast="gemma")
ref = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + wd)
close(y, ref, 1e-2, "offset_rms_norm y")
dx, _, dw = K.rms_norm_backward(dy, x, N, w, rstd, cast="gemma")
gx, gw = torch.autograd.grad(ref, (xd, wd), dy.double())
close(dx, gx, 1e-2, "offset_rms_norm dx")
close(dw, gw, 1e-2, "offset_rms_norm dw")
# add_rms_norm: h = x + res (rounded to fp16), the stored h and dh_out read back at far rows
y, h, rstd = K.rms_norm_forward(x, N, w, 1e-6, residual=res)
h_ref = (x.double() + res.double()).half().double()
close(h, h_ref, 1e-3, "add_rms_norm h")
hd = h_ref.clone().requires_grad_(True)
ref = hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
close(y, ref, 1e-2, "add_rms_norm y")
h_far = far(N, fill=False)
h_far.copy_(h)
dx, dh, _ = K.rms_norm_backward(dy, h_far, N, w, rstd, dh_out=dho, store_dh=True)
gh = torch.autograd.grad(ref, hd, dy.double())[0] + dho.double()
close(dh, gh, 1e-2, "add_rms_norm dh")
close(dx, gh, 1e-2, "add_rms_norm dx")
print("ok")
"""

_PROBE_ACTIVATIONS = _FAR + r"""
from fasttx.kernels import gelu as K
N = 4096
x, dy, g, u = far(N), far(N), far(N), far(N)
b = small(N)
# bias_relu
xd, bd = x.double().requires_grad_(True), b.double().requires_grad_(True)
ref = torch.relu(xd + bd)
close(K.bias_act_forward(x, b, "relu"), ref, 1e-2, "bias_relu y")
dx, db = K.bias_act_backward(dy, x, b, "relu")
gx, gb = torch.autograd.grad(ref, (xd, bd), dy.double())
close(dx, gx, 1e-2, "bias_relu dx")
close(db, gb, 1e-2, "bias_relu db")
# relu_squared: no bias, the squared-ReLU activation (its own constexpr)
xd = x.double().requires_grad_(True)
ref = torch.relu(xd) ** 2
close(K.bias_act_forward(x, None, "relu2"), ref, 1e-2, "relu_squared y")
dx, _ = K.bias_act_backward(dy, x, None, "relu2")
close(dx, torch.autograd.grad(ref, xd, dy.double())[0], 1e-2, "relu_squared dx")
# swiglu: gate and up as two far views
gd, ud = g.double().requires_grad_(True), u.double().requires_grad_(True)
ref = F.silu(gd) * ud
close(K.gated_act_forward(g, u, "silu"), ref, 1e-2, "swiglu y")
dg, du = K.gated_act_backward(dy, g, u, "silu")
for ours, theirs, what in zip((dg, du), torch.autograd.grad(ref, (gd, ud), dy.double()), ("gate", "up")):
    close(ours, theirs, 1e-2, "swiglu d" + what)
# geglu (both forms): (gate|up) as one far (3, 2N) view
gu = far(2 * N)
gud = gu.double().requires_grad_(True)
for act, approximate in (("gelu", "none"), ("gelu_tanh", "tanh")):
    ref = F.gelu(gud[:, :N], approximate=approximate) * gud[:, N:]
    close(K.gated_act_forward(gu, None, act), ref, 1e-2, act + " y")
    dgu, _ = K.gated_act_backward(dy, gu, None, act)
    close(dgu, torch.autograd.grad(ref, gud, dy.double())[0], 1e-2, act + " d(gate|up)")
print("ok")
"""

_PROBE_ROTARY = _FAR + r"""
from fasttx.kernels import rotary as K
from fasttx.reference import rotary
B, H, L, D, R = 1, 3, 4, 64, 32  # heads S apart: head 2 starts past 2^31; R < D: the pass-through too
q, k, dq, dk = (far(B, H, L, D) for _ in range(4))
ang = torch.randn(L, R // 2, device=dev, dtype=torch.float64)
cos, sin = torch.cat([ang.cos()] * 2, -1).half(), torch.cat([ang.sin()] * 2, -1).half()
pos = torch.tensor([[3, 0, 2, 1]], device=dev)
for tables, ids in (((cos[None], sin[None]), None), ((cos, sin), pos)):
    c, s = (t.double() if ids is None else t.double()[ids] for t in tables)
    qo, ko = K.rotary_forward(q, k, *tables, ids)
    qd, kd = q.double().requires_grad_(True), k.double().requires_grad_(True)
    rq, rk = rotary(qd, c, s), rotary(kd, c, s)
    close(qo, rq, 1e-2, "rotary q")
    close(ko, rk, 1e-2, "rotary k")
    dqi, dki = K.rotary_backward(dq, dk, *tables, ids)
    close(dqi, torch.autograd.grad(rq, qd, dq.double())[0], 1e-2, "rotary dq")
    close(dki, torch.autograd.grad(rk, kd, dk.double())[0], 1e-2, "rotary dk")
print("ok")
"""

_PROBE_CROSS_ENTROPY = _FAR + r"""
from fasttx.kernels import cross_entropy as K
C, Hd = 4096, 16
x = far(C)
t = torch.tensor([5, 4000, 17], device=dev)
xd = x.double().requires_grad_(True)
ref = F.cross_entropy(xd, t, reduction="none")
g_ref = torch.autograd.grad(ref.sum(), xd)[0]
# cross_entropy: the row kernels read the far logits; the forward's in-place gradient is written to far rows
loss, lse = K.cross_entropy_forward(x, t)
close(loss, ref, 1e-4, "cross_entropy loss")
close(K.cross_entropy_backward(torch.ones(3, device=dev), x, t, None, lse), g_ref, 1e-2, "cross_entropy dx")
dlogits = far(C, fill=False)
K.cross_entropy_forward(x, t, None, -100, 0.0, torch.ones(1, device=dev), dlogits=dlogits)
close(dlogits, g_ref, 1e-2, "cross_entropy in-place dlogits")
# linear_cross_entropy / linear_log_probs: their loop's chunk of logits (one chunk of 3 rows here)
# is placed at far rows, as a chunk whose row * C passes 2^31 would be; the kernels read it and
# write d(logits) into it in place, the loop's matmuls then read it back.
real_linear = F.linear
chunk = far(C, fill=False)


def linear_far(a, w, b=None):
    chunk.copy_(real_linear(a, w, b))
    return chunk


xs, W, bb = small(3, Hd), small(C, Hd) * 0.5, small(C)
xsd, Wd, bbd = (v.double().requires_grad_(True) for v in (xs, W, bb))
z = (xs.double() @ W.double().t() + bb.double()).half().double()  # the logits as the fp16 chunk holds them
zd = z.clone().requires_grad_(True)
torch.nn.functional.linear = linear_far
try:
    loss, _ = K.linear_cross_entropy_forward(xs, W, bb, t)
    dx, dw, db = K.linear_cross_entropy_backward(torch.ones(3, device=dev), xs, W, bb, t)
    logp, ent = K.linear_log_probs_forward(xs, W, bb, t, temperature=0.7, entropy=True)
    g1, g2 = torch.randn(3, device=dev), torch.randn(3, device=dev)
    dx2, dw2, db2 = K.linear_log_probs_backward(g1, g2, xs, W, bb, t, temperature=0.7, entropy=True)
finally:
    torch.nn.functional.linear = real_linear
ref = F.cross_entropy(zd, t, reduction="none")
close(loss, ref, 1e-4, "linear_cross_entropy loss")
gz = torch.autograd.grad(ref.sum(), zd)[0]  # d/dz; dx = gz W, dW = gz^T x, db = colsum(gz)
close(dx, gz @ W.double(), 1e-2, "linear_cross_entropy dx")
close(dw, gz.t() @ xs.double(), 1e-2, "linear_cross_entropy dw")
close(db, gz.sum(0), 1e-2, "linear_cross_entropy db")
lp_all = torch.log_softmax(zd / 0.7, -1)
ref_logp = lp_all.gather(1, t[:, None])[:, 0]
ref_ent = -(lp_all.exp() * lp_all).sum(-1)
close(logp, ref_logp, 1e-4, "linear_log_probs logp")
close(ent, ref_ent, 1e-4, "linear_log_probs entropy")
gz = torch.autograd.grad((g1.double() * ref_logp + g2.double() * ref_ent).sum(), zd)[0]
close(dx2, gz @ W.double(), 1e-2, "linear_log_probs dx")
close(dw2, gz.t() @ xs.double(), 1e-2, "linear_log_probs dw")
close(db2, gz.sum(0), 1e-2, "linear_log_probs db")
print("ok")
"""


_PROBE_MOE = _FAR + r"""
from fasttx.kernels import moe as K
from fasttx.reference import moe_experts
T, H, I, E = 3, 32, 32, 3


def far_experts(n, k):  # (E, n, k) weights whose experts sit S apart: expert 2 starts past 2^31
    v = big.as_strided((E, n, k), (S, k, 1), _slot[0])
    _slot[0] += n * k
    v.copy_(0.2 * torch.randn(E, n, k, device=dev))
    return v


x, dout = far(H), far(H)  # tokens S apart
w1, w2 = far_experts(2 * I, H), far_experts(H, I)
b1, b2 = 0.2 * small(E, 2 * I), 0.2 * small(E, H)
idx = torch.tensor([[0, 2], [2, 1], [1, 2]], device=dev)
w = torch.rand(T, 2, device=dev).half()
cfg = ("silu", 1.702, 7.0, False, False)
out = K.moe_forward(x, idx, w, w1, w2, b1, b2, cfg)
dx, dw, dw1, dw2, db1, db2 = K.moe_backward(dout, x, idx, w, w1, w2, b1, b2, cfg)
leaves = [v.double().requires_grad_(True) for v in (x, w, w1, w2, b1, b2)]
ref = moe_experts(
    leaves[0], idx, leaves[1], leaves[2], leaves[3], gate_up_bias=leaves[4], down_bias=leaves[5])
close(out, ref, 2e-2, "moe out")
grads = torch.autograd.grad(ref, leaves, dout.double())
for ours, theirs, what in zip((dx, dw, dw1, dw2, db1, db2), grads, ("x", "w", "w1", "w2", "b1", "b2")):
    close(ours, theirs, 2e-2, "moe d" + what)
print("ok")
"""


def test_int64_offset_probe_norms():
    """layer_norm, dropout_add_layer_norm, rms_norm, add_rms_norm, offset_rms_norm: the forward and backward kernels
    read x, residual, dy, the stored h and dh_out at rows past 2^31 (int64 row offsets)."""
    run_probe(_PROBE_NORMS, timeout=300)


def test_int64_offset_probe_activations():
    """bias_relu, relu_squared, swiglu, geglu (concatenated gate|up too): both kernels read their inputs
    and dy at rows past 2^31. (bias_gelu: tests/test_gelu.py::test_int64_row_offset_probe.)"""
    run_probe(_PROBE_ACTIVATIONS, timeout=300)


def test_int64_offset_probe_rotary():
    """apply_rotary_emb: q, k and their gradients with heads past 2^31, with and without position ids,
    partial rotary (the pass-through columns too)."""
    run_probe(_PROBE_ROTARY, timeout=300)


def test_int64_offset_probe_cross_entropy():
    """cross_entropy, linear_cross_entropy, linear_log_probs: the row kernels read logits at rows past
    2^31 and write the in-place d(logits) there (the linear ops' chunk placed at far rows)."""
    run_probe(_PROBE_CROSS_ENTROPY, timeout=300)


def test_int64_offset_probe_moe():
    """moe_experts: tokens (x, dout) and experts (gate_up, down weights) past 2^31, forward and every
    gradient (the kernels index x[tok] and W[e] in int64)."""
    run_probe(_PROBE_MOE, timeout=300)
