"""Test-time patch: the Triton interpreter rounds fp32 -> bf16 to nearest even, as a GPU does.

Triton's CPU interpreter (3.6 to 3.9) converts fp32 to bf16 in `InterpreterBuilder.cast_impl` by
dropping the low 16 bits (truncation toward zero), whereas the GPU's `cvt.rn.bf16.f32` and torch's
own casts round to nearest, ties to even. Truncation biases every bf16 result the interpreter
stores toward zero by up to 1 ulp, which would force bf16 tests to be looser here than on a GPU.

Every fp32 -> bf16 conversion in a kernel reaches `cast_impl`: `x.to(tl.bfloat16)` and the
implicit cast of `tl.store` to a bf16 pointer (fp_trunc), fp16 -> bf16 (through fp32) and bf16
constants. `install()` wraps that one method: fp32 -> bf16 is rounded here, every other conversion
goes to triton's own code unchanged. Explicit non-default rounding (`fp_downcast_rounding="rtz"`)
takes a different builder method (create_fp_to_fp) and keeps its own behaviour.

Installed once by tests/conftest.py (only when interpreting); `tests/test_interpreter_bf16.py`
proves that a kernel's cast now rounds. On a GPU nothing is patched.
"""
from __future__ import annotations

import numpy as np


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """fp32 values -> bf16 bit patterns (uint16), round to nearest even. NaN stays NaN (quieted);
    values that round past bf16's largest finite number become inf, as IEEE rounding says."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    lsb = (bits >> np.uint32(16)) & np.uint32(1)  # ties go to the even neighbour
    rounded = ((bits + np.uint32(0x7FFF) + lsb) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded = np.where(nan, ((bits >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16), rounded)
    return rounded.reshape(np.shape(x))


def install() -> bool:
    """Patch the interpreter's fp32 -> bf16 conversion (idempotent). Returns True when patched."""
    from triton.runtime import interpreter
    import triton.language as tl

    builder = interpreter.InterpreterBuilder
    if getattr(builder.cast_impl, "_fasttx_rne", False):
        return True
    original = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(f32_to_bf16_bits(src.data), dst_type.scalar)
        return original(self, src, dst_type)

    cast_impl._fasttx_rne = True
    cast_impl.__wrapped__ = original
    builder.cast_impl = cast_impl
    return True
