"""Inputs as torch takes them, on both paths: the exception types (and the argument named) are
torch's; calls the Triton kernels cannot serve run torch's op. Each case was found by feeding the
same bad or unusual input to both backends."""
import os
import subprocess
import sys

import pytest
import torch

import fasttx
import fasttx.functional as FF


_F = torch.nn.functional


@pytest.mark.parametrize("ours, theirs", [
    (lambda: FF.layer_norm([1.0, 2.0], (2,)), lambda: _F.layer_norm([1.0, 2.0], (2,))),
    (lambda: FF.gelu([1.0, 2.0]), lambda: _F.gelu([1.0, 2.0])),
    (lambda: FF.dropout([1.0, 2.0], 0.5), lambda: _F.dropout([1.0, 2.0], 0.5)),
    (lambda: FF.softmax([1.0, 2.0], 0), lambda: _F.softmax([1.0, 2.0], 0)),
    (lambda: FF.bias_gelu([1.0, 2.0], torch.zeros(2)), lambda: _F.gelu([1.0, 2.0] + torch.zeros(2))),
], ids=["layer_norm", "gelu", "dropout", "softmax", "bias_gelu"])
def test_a_list_instead_of_a_tensor_raises_what_torch_raises(backend, ours, theirs):
    with pytest.raises(Exception) as expected:
        theirs()
    with pytest.raises(type(expected.value)):
        ours()


@pytest.mark.parametrize("call, match", [
    (lambda x: FF.layer_norm(x, (4,), eps="abc"), "argument 'eps'"),
    (lambda x: FF.layer_norm(x, (4.0,)), "normalized_shape"),
    (lambda x: FF.softmax(x, dim="x"), "argument 'dim'"),
    (lambda x: FF.softmax(x, dim=(0, 1)), "argument 'dim'"),
    (lambda x: FF.softmax(x, dim=1.0), "argument 'dim'"),
    (lambda x: FF.softmax(x, 1, dtype="float32"), "argument 'dtype'"),
    (lambda x: FF.gelu(x, approximate=None), "argument 'approximate'"),
    (lambda x: FF.dropout(x, 0.5, training="yes"), "argument 'train'"),
], ids=["ln_eps", "ln_shape", "softmax_dim_str", "softmax_dim_tuple", "softmax_dim_float",
        "softmax_dtype_str", "gelu_approximate_none", "dropout_training_str"])
def test_wrong_argument_types_raise_torchs_type_error(backend, device, call, match):
    x = torch.randn(3, 4, device=device)
    with pytest.raises(TypeError, match=match):
        call(x)


def test_both_paths_accept_what_torch_accepts(backend, device):
    x = torch.randn(3, 4, device=device)
    ref = torch.nn.functional
    torch.testing.assert_close(FF.layer_norm(x, (4,), eps=1), ref.layer_norm(x, (4,), eps=1))
    torch.testing.assert_close(FF.layer_norm(x, [4], eps=True), ref.layer_norm(x, [4], eps=True))
    torch.testing.assert_close(FF.softmax(x, dim=-1, dtype=torch.float64), ref.softmax(x, -1, dtype=torch.float64))
    torch.testing.assert_close(FF.layer_norm(x, torch.Size([4])), ref.layer_norm(x, (4,)))


def _outcome(fn, *args, **kwargs) -> str:
    try:
        fn(*args, **kwargs)
        return "accepted"
    except Exception as e:  # noqa: BLE001 - the type and message are what is compared
        return f"{type(e).__name__}: {e}"


def _compare_to_torch(cases, ours, theirs):
    """Run every case through torch's op and ours (the backend fixture's path): the same exception
    type and message, or both accept. All mismatches are reported at once."""
    bad = []
    for args, kwargs in cases:
        want, got = _outcome(theirs, *args, **kwargs), _outcome(ours, *args, **kwargs)
        if want != got:
            bad.append(f"{[tuple(a.shape) + (a.dtype,) if isinstance(a, torch.Tensor) else a for a in args]} "
                       f"{kwargs}:\n  torch: {want[:160]}\n  ours:  {got[:160]}")
    assert not bad, f"{len(bad)} of {len(cases)} differ:\n" + "\n".join(bad[:10])


_INT_DTYPES = (torch.int64, torch.int32, torch.uint8, torch.bool)


def test_cross_entropy_raises_what_torch_raises(backend):
    # Logits of rank 0 to 3, targets of many shapes and dtypes (class indices and probabilities,
    # right and wrong: the wrong-shape probability target used to raise AssertionError on the
    # Triton path, a 0-D input IndexError, int32 indices were accepted), with and without label
    # smoothing and class weights.
    cases = []
    for shape in [(), (5,), (3, 5), (3, 5, 2)]:
        for tshape in [(), (1,), (2,), (3,), (3, 2), (3, 3), (3, 5), (5,), (3, 5, 2), (3, 2, 2), (3, 6), (3, 5, 1)]:
            for dt in (*_INT_DTYPES, torch.float32):
                for kw in (dict(), dict(label_smoothing=0.1), dict(weight=torch.ones(5)), dict(weight=torch.ones(4))):
                    cases.append(((torch.randn(shape), torch.zeros(tshape, dtype=dt)), kw))
    _compare_to_torch(cases, FF.cross_entropy, _F.cross_entropy)


def test_linear_cross_entropy_raises_what_torch_raises(backend):
    if not hasattr(_F, "linear_cross_entropy"):
        pytest.skip("torch has no linear_cross_entropy before 2.13")
    cases = []
    for shape in [(3,), (4, 3)]:
        for wshape in [(5, 3), (5, 2, 3), (5, 4)]:
            for tshape in [(), (1,), (4,), (3,), (4, 5), (4, 6), (4, 2), (4, 5, 2), (4, 2, 5)]:
                for dt in (torch.int64, torch.int32, torch.float32):
                    for kw in (dict(), dict(ignore_index=1), dict(weight=torch.ones(4))):
                        cases.append(((torch.randn(shape), torch.randn(wshape), torch.zeros(tshape, dtype=dt)), kw))
    _compare_to_torch(cases, FF.linear_cross_entropy, _F.linear_cross_entropy)


@pytest.mark.parametrize("cast", ["torch", "llama", "gemma"])
def test_rms_norm_raises_what_torch_raises(backend, cast):
    # Inputs of rank 0 to 3 (and an empty one) against normalized shapes of rank 0 to 4 (a 1-D input
    # with a 2-D shape: torch's ValueError, once a RuntimeError on the Triton path), weights right
    # and wrong, float and integer inputs; add_rms_norm's three casts follow F.rms_norm's rules.
    cases = []
    for shape in [(), (4,), (2, 4), (3, 2, 4), (0, 4)]:
        for ns in [(), (4,), (2, 4), (3, 2, 4), (5,), (4, 4), (2, 2, 2, 4)]:
            for w in (None, "same", (5,)):
                for dt in (torch.float32, torch.int64):
                    weight = torch.ones(ns) if w == "same" else (torch.ones(w) if w else None)
                    cases.append(((torch.randn(shape).to(dt), ns, weight), {}))
    if cast == "torch":
        _compare_to_torch(cases, FF.rms_norm, _F.rms_norm)
    _compare_to_torch(cases, lambda x, ns, w: FF.add_rms_norm(x, None, ns, w, cast=cast)[0], _F.rms_norm)


def _run(code: str, **env):
    full = dict(os.environ, **env)
    full.pop("TRITON_INTERPRET", None)
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300)


def test_interpreter_switched_on_after_the_kernels_were_imported_says_what_to_do():
    code = (
        "import os, torch, fasttx, fasttx.functional as FF\n"
        "import fasttx.kernels.gelu\n"  # decorated for a GPU: TRITON_INTERPRET unset
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "fasttx.use_backend('triton')\n"
        "try:\n"
        "    FF.gelu(torch.randn(4))\n"
        "except RuntimeError as e:\n"
        "    print('raised:', e)\n"
    )
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert "raised: TRITON_INTERPRET=1 was set after fasttx's kernels had been imported" in r.stdout


def test_forcing_triton_on_cpu_warns_once_that_the_interpreter_is_slow():
    code = (
        "import warnings, torch, fasttx, fasttx.functional as FF\n"
        "fasttx.use_backend('triton')\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    FF.gelu(torch.randn(4)); FF.gelu(torch.randn(4)); FF.softmax(torch.randn(4), 0)\n"
        "print(sum('100-1000x slower' in str(x.message) for x in w))\n"
    )
    r = _run(code, TRITON_INTERPRET="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1"


def test_convert_refuses_torchscript_and_marks_what_it_swapped():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.GELU())
    for scripted in (torch.jit.script(model), torch.jit.trace(model, torch.randn(2, 4))):
        with pytest.raises(TypeError, match="TorchScript"):
            fasttx.convert(scripted)
    outer = torch.nn.Sequential(torch.jit.script(torch.nn.LayerNorm(4)))
    with pytest.raises(TypeError, match="TorchScript"):
        fasttx.convert(outer)
    text = repr(fasttx.convert(model))
    assert "fasttx.LayerNorm((4,)" in text and "fasttx.GELU(" in text
    assert "(0): Linear(" in text  # torch's modules print as before
    import fasttx.nn as nn

    assert repr(nn.LayerNorm(4)) == repr(torch.nn.LayerNorm(4))  # built directly: torch's repr
