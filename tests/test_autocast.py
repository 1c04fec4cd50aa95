"""torch.autocast: fasttx's ops give torch's dtypes (and values, to the autocast dtype's tolerance).

torch applies a per-op autocast policy before its kernels; fasttx.functional applies the same policy
before the Triton custom ops: layer_norm and softmax in fp32 under CUDA autocast (CPU autocast
leaves them alone), scaled_dot_product_attention in the autocast dtype on both devices.
"""
import pytest
import torch
import torch.nn.functional as F

import fasttx.functional as FF
from utils import assert_close


def _ops(x, w, b, q, mask):
    return {
        "layer_norm": lambda f: f.layer_norm(x, (x.shape[-1],), w, b),
        "softmax": lambda f: f.softmax(x, -1),
        "gelu": lambda f: f.gelu(x),
        "sdpa": lambda f: f.scaled_dot_product_attention(q, q, q),
        "sdpa_float_mask": lambda f: f.scaled_dot_product_attention(q, q, q, attn_mask=mask),
        # the linear in the autocast dtype, the loss in fp32 (torch >= 2.13 has the composite)
        **({"linear_cross_entropy": lambda f: f.linear_cross_entropy(
            x, w.reshape(-1, 8)[:5].repeat(1, 5), torch.arange(6) % 5, reduction="none")}
           if hasattr(F, "linear_cross_entropy") else {}),
    }


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_dtype", [torch.float32, "low"])
def test_cpu_autocast_matches_torch(backend, device, low, in_dtype):
    if device != "cpu":
        pytest.skip("CPU autocast policy; CUDA's is test_cuda_autocast_matches_torch")
    dtype = low if in_dtype == "low" else in_dtype
    torch.manual_seed(0)
    x, w, b = torch.randn(6, 40, dtype=dtype), torch.randn(40), torch.randn(40)
    if dtype != torch.float32:
        w, b = w.to(dtype), b.to(dtype)
    q = torch.randn(2, 3, 9, 16, dtype=dtype)
    mask = torch.randn(9, 9)
    for name, run in _ops(x, w, b, q, mask).items():
        with torch.autocast("cpu", dtype=low):
            ours, theirs = run(FF), run(F)
        assert ours.dtype == theirs.dtype, f"{name}: {ours.dtype} != torch's {theirs.dtype}"
        assert_close(ours, theirs, dtype=low, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_dtype", [torch.float32, "low"])
def test_cuda_autocast_matches_torch(device, low, in_dtype):
    dtype = low if in_dtype == "low" else in_dtype
    torch.manual_seed(0)
    x, w, b = (torch.randn(*s, device=device, dtype=dtype) for s in ((64, 1024), (1024,), (1024,)))
    q = torch.randn(2, 4, 128, 64, device=device, dtype=dtype)
    mask = torch.randn(128, 128, device=device)
    for name, run in _ops(x, w, b, q, mask).items():
        with torch.autocast("cuda", dtype=low):
            ours, theirs = run(FF), run(F)
        assert ours.dtype == theirs.dtype, f"{name}: {ours.dtype} != torch's {theirs.dtype}"
        assert_close(ours, theirs, dtype=low, msg=name)
    # The fused sub-layer: y as layer_norm(residual + x) gives it under autocast (fp32), h promoted.
    r = torch.randn_like(x)
    with torch.autocast("cuda", dtype=low):
        y, h = FF.dropout_add_layer_norm(x, r, (1024,), w, b, p=0.0)
        h_t = r + x
        y_t = F.layer_norm(h_t, (1024,), w, b)
    assert (y.dtype, h.dtype) == (y_t.dtype, h_t.dtype)
    assert_close(y, y_t, dtype=low)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_loss_is_not_rounded_to_the_autocast_dtype(backend, device, reduction):
    """Under autocast the linear runs on 16-bit operands and the loss comes back in fp32: the fp32
    cross-entropy of the 16-bit logits (torch's composite), not that loss rounded to bf16 and
    widened (a 0.03 step at loss 4)."""
    torch.manual_seed(0)
    x, w = torch.randn(12, 32, device=device), torch.randn(50, 32, device=device)
    t = torch.randint(0, 50, (12,), device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        ours = FF.linear_cross_entropy(x, w, t, reduction=reduction)
    exact = F.cross_entropy(F.linear(x.bfloat16(), w.bfloat16()).float(), t, reduction=reduction)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, exact, rtol=1e-5, atol=1e-5)
