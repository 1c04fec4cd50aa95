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


_NO_PROBE = "n/a: no int64-offset probe yet (tests/README.md lists it as owed; see the issue report)"
CASES = {
    "layer_norm": Case(lambda t: (t(3, 8), (8,), t(8), t(8), 1e-5), lambda t: (t(0, 8), (8,), t(8), t(8), 1e-5),
                       bad=((lambda t: (_int(t), (3,)), (NotImplementedError, RuntimeError)),
                            (lambda t: (t(3, 8), 8), TypeError)),
                       probe=_NO_PROBE),
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
                      bad=((lambda t: (t(3, 8), t(5)), RuntimeError),), probe=_NO_PROBE),
    "bias_relu": Case(lambda t: (t(3, 8), t(8)), lambda t: (t(0, 8), t(8)),
                      bad=((lambda t: (t(3, 8), t(5)), RuntimeError),), probe=_NO_PROBE),
    "dropout_add_layer_norm": Case(
        lambda t: (t(3, 8), t(3, 8), (8,), t(8), t(8), 1e-5, 0.25), lambda t: (t(0, 8), t(0, 8), (8,)),
        bad=((lambda t: (t(3, 8), t(3, 8), (8,), None, None, 1e-5, 1.5), ValueError),
             (lambda t: (t(3, 8), t(2, 8), (8,)), RuntimeError)),
        probe=_NO_PROBE, oracle="residual_dropout_layer_norm", random=True),
    "rms_norm": Case(lambda t: (t(3, 8), (8,), t(8)), lambda t: (t(0, 8), (8,), t(8)),
                     bad=((lambda t: (t(3, 8), 8), TypeError), (lambda t: (t(3, 8), (5,)), RuntimeError)),
                     probe=_NO_PROBE),
    "add_rms_norm": Case(lambda t: (t(3, 8), t(3, 8), (8,), t(8)), lambda t: (t(0, 8), t(0, 8), (8,), t(8)),
                         bad=((lambda t: (t(3, 8), t(2, 8), (8,)), RuntimeError),
                              (lambda t: (t(3, 8), [1.0], (8,)), TypeError)),
                         probe=_NO_PROBE),
    "swiglu": Case(lambda t: (t(3, 8), t(3, 8)), lambda t: (t(0, 8),),
                   bad=((lambda t: (t(3, 7),), RuntimeError), (lambda t: (_int(t), _int(t)), NotImplementedError)),
                   probe=_NO_PROBE, oracle="gated"),
    "geglu": Case(lambda t: (t(3, 8), None, "tanh"), lambda t: (t(0, 8), t(0, 8)),
                  bad=((lambda t: (t(3, 8), None, "x"), RuntimeError), (lambda t: ([1.0],), TypeError)),
                  probe=_NO_PROBE, oracle="gated"),
    "apply_rotary_emb": Case(lambda t: (t(1, 2, 5, 8), t(1, 1, 5, 8), t(5, 4, grad=False), t(5, 4, grad=False)),
                             lambda t: (t(1, 2, 0, 8), t(1, 1, 0, 8), t(0, 4, grad=False), t(0, 4, grad=False)),
                             bad=((lambda t: (t(2, 5, 8), t(2, 5, 8), t(5, 4), t(5, 4)), RuntimeError),
                                  (lambda t: (t(1, 2, 5, 8), [1.0], t(5, 4), t(5, 4)), TypeError)),
                             probe=_NO_PROBE, oracle="rotary"),
    "cross_entropy": Case(lambda t: (t(4, 5), t(4, kind="index")), lambda t: (t(0, 5), t(0, kind="index")),
                          bad=((lambda t: (t(4, 5), t(3, kind="index")), (ValueError, RuntimeError)),
                               (lambda t: (t(4, 5), t(4, kind="index"), None, None, -100, None, "x"), ValueError)),
                          probe=_NO_PROBE),
    "linear_cross_entropy": Case(lambda t: (t(4, 8), t(5, 8), t(4, kind="index")),
                                 lambda t: (t(0, 8), t(5, 8), t(0, kind="index")),
                                 bad=((lambda t: (t(4, 8), t(5, 7), t(4, kind="index")), RuntimeError),
                                      (lambda t: ([1.0], t(5, 8), t(4, kind="index")), TypeError)),
                                 probe=_NO_PROBE),
    "moe_experts": Case(lambda t: (t(4, 8), t(4, 2, kind="index"), t(4, 2), t(5, 12, 8), t(5, 8, 6)),
                        lambda t: (t(0, 8), t(0, 2, kind="index"), t(0, 2), t(5, 12, 8), t(5, 8, 6)),
                        bad=((lambda t: (t(4, 8), t(4, 2), t(4, 2), t(5, 12, 8), t(5, 8, 6)), RuntimeError),
                             (lambda t: ([1.0], t(4, 2, kind="index"), t(4, 2), t(5, 12, 8), t(5, 8, 6)), TypeError)),
                        probe=_NO_PROBE),
    "linear_log_probs": Case(lambda t: (t(4, 8), t(5, 8), t(4, kind="index")),
                             lambda t: (t(0, 8), t(5, 8), t(0, kind="index")),
                             bad=((lambda t: (t(4, 8), t(5, 7), t(4, kind="index")), RuntimeError),
                                  (lambda t: ([1.0], t(5, 8), t(4, kind="index")), TypeError)),
                             probe=_NO_PROBE),
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
