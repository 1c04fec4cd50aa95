"""fp32 -> bf16 in a kernel rounds to nearest even, as a GPU and torch round (tests/_interpreter_bf16.py
patches the Triton interpreter, which truncates on its own)."""
import numpy as np
import pytest
import torch

from conftest import DEVICE

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from _interpreter_bf16 import f32_to_bf16_bits  # noqa: E402


@triton.jit
def _cast_kernel(X, Y_explicit, Y_store, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n, other=0.0)
    tl.store(Y_explicit + offs, x.to(tl.bfloat16), mask=offs < n)  # an explicit cast
    tl.store(Y_store + offs, x, mask=offs < n)  # the store's implicit cast to the bf16 pointer


def _values():
    one, ulp = 1.0, 2.0 ** -7  # bf16 keeps 7 mantissa bits: its ulp at 1.0 is 2^-7
    cases = [
        one + 0.75 * ulp,     # nearest is 1 + ulp; truncation gives 1.0
        one + 1.5 * ulp,      # a tie between 1 + ulp (odd) and 1 + 2 ulp (even): even wins, truncation gives 1 + ulp
        one + 0.5 * ulp,      # a tie between 1.0 (even) and 1 + ulp: 1.0, as truncation
        -(one + 0.75 * ulp),  # symmetric for negatives: -(1 + ulp), truncation -1.0
        3.0e38,               # rounds to bf16's largest finite value 3.3895e38
        float("inf"), float("-inf"), 0.0, -0.0, 1e-40,  # specials and an fp32 subnormal
    ]
    g = torch.Generator().manual_seed(0)
    return torch.cat([torch.tensor(cases), torch.randn(100, generator=g) * 10.0 ** torch.randint(-3, 4, (100,),
                                                                                                  generator=g)])


def test_kernel_cast_rounds_to_nearest_even():
    x = _values().to(DEVICE)
    y1 = torch.empty(x.shape, dtype=torch.bfloat16, device=DEVICE)
    y2 = torch.empty_like(y1)
    _cast_kernel[(1,)](x, y1, y2, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    want = x.to(torch.bfloat16)  # torch rounds to nearest even
    assert y1[0].item() == 1.0 + 2.0 ** -7 and y1[1].item() == 1.0 + 2.0 ** -6 and y1[3].item() == -(1.0 + 2.0 ** -7)
    assert torch.equal(y1.view(torch.int16), want.view(torch.int16))
    assert torch.equal(y2.view(torch.int16), want.view(torch.int16))


def test_bits_helper_matches_torch():
    x = torch.cat([_values(), torch.tensor([float("nan"), 3.4e38, -3.4e38, 2.0 ** -133])])
    ours = torch.from_numpy(f32_to_bf16_bits(x.numpy()).view(np.int16))
    want = x.to(torch.bfloat16).view(torch.int16)
    finite = ~x.isnan()
    assert torch.equal(ours[finite], want[finite])
    assert torch.from_numpy(f32_to_bf16_bits(x.numpy())).view(torch.bfloat16)[~finite].isnan().all()
