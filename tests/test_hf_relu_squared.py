"""transformers' ReLUSquaredActivation (arcee, persimmon, jais2, nanochat, bitnet, ...) is recognised by
what it computes and swapped for fasttx.nn.ReLUSquared (fasttx.functional.relu_squared); an
activation that only looks like it stays transformers'."""
from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", minversion="5.0")

import hf_tiny as H  # noqa: E402

import fasttx.functional as FF  # noqa: E402
import fasttx.nn as fnn  # noqa: E402
from fasttx.integrations.huggingface import apply_fasttx, fasttx_report  # noqa: E402
from fasttx.integrations.huggingface import recognition as R  # noqa: E402


def test_arcee_relu_squared_swapped_and_exact(monkeypatch):
    (task, cls), = [(t, c) for mt, t, c in H.model_types() if mt == "arcee"]
    ref, ours = H.build_pair("arcee", task, cls)
    assert isinstance(ref.model.layers[0].mlp.act_fn, transformers.activations.ReLUSquaredActivation)
    expected = H.measure(ref, task)
    apply_fasttx(ours)
    assert all(type(layer.mlp.act_fn) is fnn.ReLUSquared for layer in ours.model.layers)
    assert "ReLUSquaredActivation (relu_squared)" in fasttx_report(ours)["swapped"]
    assert not any("ReLUSquared" in k for k in fasttx_report(ours)["left"])
    calls = []
    real = FF.relu_squared
    monkeypatch.setattr(FF, "relu_squared", lambda x: calls.append(x.shape) or real(x))
    assert H.compare(expected, H.measure(ours, task)) == []
    assert calls  # the patched model ran fasttx's op


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swapped_module_equals_transformers_on_both_paths(backend, dtype):
    x = torch.randn(3, 17, 33, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    ours, ref = fnn.ReLUSquared()(x), transformers.activations.ReLUSquaredActivation()(x_ref)
    g = torch.randn_like(ref)
    ours.backward(g)
    ref.backward(g)
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)
    tol = 0 if dtype == torch.float32 else 1e-2  # bf16 grad: 2 x relu(x) x g rounded once (ours) or twice (torch)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=tol, rtol=tol)


class _ReLUCubed(nn.Module):
    """Parameter-free and one input like ReLUSquaredActivation, but relu(x) ** 3."""

    __module__ = "transformers.activations"  # a candidate, as transformers' own would be

    def forward(self, x):
        return torch.relu(x) ** 3


def test_a_lookalike_activation_is_left():
    R._VERDICTS.clear()
    kind, why = R.probe_act(_ReLUCubed(), torch.float32)
    assert kind is None and why == "no fasttx activation matches it"
    kind, _ = R.probe_act(transformers.activations.ReLUSquaredActivation(), torch.bfloat16)
    assert kind == "relu_squared"
