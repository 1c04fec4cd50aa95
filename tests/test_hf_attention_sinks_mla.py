"""The transformers integration's attention function with the two kernel features the families
need: attention sinks (`s_aux`: gpt-oss, granite_swa) and a value head dim different from the
query/key one (DeepSeek's MLA, MiniCPM3, GLM-4-MoE-Lite), against each family's own
`eager_attention_forward` (forward and every gradient, the sinks' included), both backends.

The test module's attention class lives in this file, which has no eager attention: were the call
delegated to eager instead of computed by fasttx, it would raise."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

from fasttx.integrations.huggingface import fasttx_attention_forward  # noqa: E402


class _Attn(torch.nn.Module):
    def __init__(self, H, Hkv, sinks=True):
        super().__init__()
        self.is_causal = True
        self.num_key_value_groups = H // Hkv
        if sinks:
            self.sinks = torch.nn.Parameter(torch.randn(H, generator=torch.Generator().manual_seed(3)) * 2)


def _inputs(device, B=2, H=4, Hkv=2, L=9, E=16, Ev=16):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(device).requires_grad_()  # noqa: E731
    return mk(B, H, L, E), mk(B, Hkv, L, E), mk(B, Hkv, L, Ev)


def _masks(L, device, window=None, pad=3):
    """(bool (B, 1, L, L) True = attend, what the "fasttx" mask builder gives; the additive float
    mask transformers' eager functions take): causal, row 1 right-padded by `pad`, optional window."""
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    keep = j <= i
    if window is not None:
        keep = keep & (j > i - window)
    keep = keep[None, None].repeat(2, 1, 1, 1)
    keep[1, :, :, L - pad:] = False
    keep = keep.to(device)
    return keep, torch.zeros(keep.shape, device=device).masked_fill(~keep, torch.finfo(torch.float32).min)


def _grads(out, tensors, seed=5):
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device)
    return torch.autograd.grad(out, tensors, do)


def _compare(ours, ref, tensors, atol=2e-5):
    torch.testing.assert_close(ours, ref, atol=atol, rtol=1e-4)
    for a, b in zip(_grads(ours, tensors), _grads(ref, tensors)):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("family,case", [("gpt_oss", "causal"), ("gpt_oss", "padded"), ("gpt_oss", "window-no-mask"),
                                         ("granite_swa", "window-padded")])
def test_sinks_match_the_familys_eager(backend, device, family, case):
    import importlib

    eager = importlib.import_module(f"transformers.models.{family}.modeling_{family}").eager_attention_forward
    module = _Attn(4, 2).to(device).eval()
    q, k, v = _inputs(device)
    L = q.shape[-2]
    window = 4 if case.startswith("window") else None
    keep, additive = _masks(L, device, window=window, pad=3 if case.endswith("padded") else 0)
    mask = keep if case.endswith("padded") else None  # no mask: causal (and the window) from the flags
    kw = dict(sliding_window=window) if window is not None else {}
    ours, _ = fasttx_attention_forward(module, q, k, v, mask, scaling=0.3, s_aux=module.sinks, **kw)
    ref, _ = eager(module, q, k, v, additive, scaling=0.3, dropout=0.0, s_aux=module.sinks, **kw)
    _compare(ours, ref, (q, k, v, module.sinks))


def test_sinks_change_the_result(device):
    module = _Attn(4, 2).to(device).eval()
    q, k, v = _inputs(device)
    with torch.no_grad():
        a, _ = fasttx_attention_forward(module, q, k, v, None, s_aux=module.sinks)
        b, _ = fasttx_attention_forward(module, q, k, v, None)
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("family,padded", [("deepseek_v3", True), ("minicpm3", False)])
def test_value_head_dim_matches_the_familys_eager(backend, device, family, padded):
    import importlib

    eager = importlib.import_module(f"transformers.models.{family}.modeling_{family}").eager_attention_forward
    module = _Attn(4, 4, sinks=False).to(device).eval()
    q, k, v = _inputs(device, Hkv=4, E=24, Ev=16)  # qk head dim (nope + rope) 24, v head dim 16
    keep, additive = _masks(q.shape[-2], device, pad=3 if padded else 0)
    ours, _ = fasttx_attention_forward(module, q, k, v, keep if padded else None, scaling=0.25)
    ref, _ = eager(module, q, k, v, additive, scaling=0.25, dropout=0.0)
    assert ours.shape == (2, 9, 4, 16)
    _compare(ours, ref, (q, k, v))


def test_sinks_with_output_attentions_use_the_models_eager(device):
    # the weights are defined by the model's own eager attention (gpt-oss's include the sink in the
    # normaliser, granite_swa's do not): such a call goes there, with its s_aux
    module = _Attn(4, 2).to(device).eval()
    q, k, v = _inputs(device)
    with pytest.raises(NotImplementedError, match="attention weights with sinks"):
        fasttx_attention_forward(module, q, k, v, None, s_aux=module.sinks, output_attentions=True)
