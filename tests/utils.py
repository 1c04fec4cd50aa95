"""Shared test helpers: tolerances, the 2x rule, non-contiguous views, the op-contract Case."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Callable, NamedTuple, Tuple

import torch

# (atol, rtol) per dtype for elementwise ops and norms (tests/README.md).
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
}
# Floors for the 2x rule.
ATOL_FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_close(actual, expected, dtype=None, atol=None, rtol=None, msg=""):
    """torch.testing.assert_close with the per-dtype tolerance of `dtype` (default: actual's)."""
    dtype = dtype or actual.dtype
    a, r = TOL[dtype]
    torch.testing.assert_close(
        actual.float(), expected.float(), atol=a if atol is None else atol,
        rtol=r if rtol is None else rtol, equal_nan=True, msg=msg or None,
    )


def assert_2x_rule(ours, torch_low, ref, mult=2.0, atol=None, name="output"):
    """The flash-attention rule: max|ours - ref| <= mult * max|pt - ref| + atol, where ref is an
    fp64/fp32 oracle and pt is PyTorch's own result in the same low dtype as ours."""
    atol = ATOL_FLOOR[ours.dtype] if atol is None else atol
    ref = ref.double()
    err = (ours.double() - ref).abs().max().item()
    pt_err = (torch_low.double() - ref).abs().max().item()
    assert err <= mult * pt_err + atol, (
        f"{name}: max error {err:.3e} > {mult} * torch's {pt_err:.3e} + {atol:.1e}"
    )


def noncontig(x: torch.Tensor) -> torch.Tensor:
    """Same values as x, laid out non-contiguously (every other element of a wider buffer)."""
    wide = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    view = wide[..., ::2]
    assert not view.is_contiguous() or x.numel() <= 1
    return view


def run_probe(code: str, timeout: int = 300) -> None:
    """Run `code` in a fresh Python (the interpreter on CPU) and require it to print "ok" last.
    For probes that may crash the process when they find a bug (e.g. an int32 offset that wraps
    into unmapped memory): the crash becomes a test failure instead of killing pytest."""
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (r.returncode, r.stdout, r.stderr[-2000:])


class Case(NamedTuple):
    """args(t): the op's positional arguments, tensors made by t(*shape, grad=True, kind="float")
    (kind "index": int64 class indices < 5); zero(t): the same for a zero-size call; bad: (args
    function, torch's exception type) pairs; probe: "tests/test_x.py::test_name" of the op's
    int64-offset probe, or "n/a: why"; oracle: the fasttx.reference function's name."""
    args: Callable
    zero: Callable
    bad: Tuple = ()
    probe: str = ""
    oracle: object = ""  # a name in fasttx.reference, or a function composing them
    random: bool = False  # a dropout draws its mask: compare a call with the same seed, not the paths


def assert_generate_attentions_match(ref, ours, prompt, steps=3, layers=2):
    """Greedy `generate` with output_attentions on both (transformers) models: the same tokens, and
    for each of the `steps` new tokens every one of the `layers` attention-weight tensors equal."""
    kw = dict(max_new_tokens=steps, do_sample=False, pad_token_id=0, output_attentions=True,
              return_dict_in_generate=True, attention_mask=torch.ones_like(prompt))
    g_ref, g = ref.generate(prompt, **kw), ours.generate(prompt, **kw)
    assert torch.equal(g.sequences, g_ref.sequences)
    assert len(g.attentions) == len(g_ref.attentions) == steps  # one tuple of layers per step
    for step, step_ref in zip(g.attentions, g_ref.attentions):
        assert len(step) == len(step_ref) == layers
        for a, r in zip(step, step_ref):
            assert a is not None
            torch.testing.assert_close(a, r, atol=1e-6, rtol=1e-5)
