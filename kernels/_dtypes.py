"""The dtype rules of fasttx, written once (torch only: the kernels, the ops, fasttx.functional and
fasttx.flash all read them from here; the fp64 oracle in fasttx/reference.py keeps its own copy on
purpose, as an oracle shares no code with what it checks).

    FLOATS          the floating dtypes every op accepts (torch's own float set)
    LOW             the 16-bit floats: upcast for math, autocast's fp32 policy, fp32 parameters allowed
    KERNEL_FLOATS   the dtypes the attention kernels take (no fp64)
    acc_dtype(d)    accumulator / statistics dtype: fp64 for fp64, fp32 for everything else
    RMS_NORM_CASTS  RMSNorm's casting orders: "torch" (F.rms_norm), "llama" (HF Llama/Mistral/Qwen:
                    normalise in fp32, cast, then `weight *`), "gemma" (HF Gemma: `* (1 + weight)`
                    in fp32, then cast)
"""
import torch

LOW = (torch.float16, torch.bfloat16)
FLOATS = (*LOW, torch.float32, torch.float64)
KERNEL_FLOATS = (*LOW, torch.float32)
RMS_NORM_CASTS = ("torch", "llama", "gemma")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype fasttx computes and keeps statistics in for inputs of `dtype`: fp64 for fp64, fp32
    for everything else (16-bit inputs are upcast, as torch's fused ops do)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
