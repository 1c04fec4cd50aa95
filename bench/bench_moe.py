"""Mixture-of-experts experts (fasttx.functional.moe_experts): Mixtral-like (H 4096, I 14336, E 8,
k 2) and Qwen3-MoE-like (H 2048, I 768, E 128, k 8) SwiGLU experts at 4k and 16k tokens, forward
and forward + backward, against the eager per-expert loop (transformers' "eager" experts), its
torch.compile twin, and, when importable, transformers' "grouped_mm" (torch._grouped_mm) and
"sonicmoe" experts through transformers' own ExpertsInterface functions, Liger-Kernel's fused MoE
(`LigerFusedMoEFunction`: our weight layout, int32 indices; its routing makes one host sync) and
SonicMoE's own API (`moe_general_routing_inputs` on the flattened (token, expert) pairs, weights as
the (2I, H, E) / (H, I, E) views of our (E, 2I, H) / (E, H, I) tensors, which it reads as
interleaved gate/up rows: random weights, so the same work). Not importable -> skipped, reason kept.

FLOP counts, from the routed (token, expert) pairs only (N = T k pairs, hidden H, expert width I):
  fwd      gate|up = x W1^T (2 N H 2I), down (2 N I H)                         6NHI
  bwd      dx (4NHI), dW1 (4NHI), d a = dout W2 (2NHI), dW2 (2NHI)              12NHI
fasttx's Triton backward also recomputes gate|up (4NHI more done than counted); routing, the
activation and the combine are not counted. Routing is uniform random top-k (distinct experts).
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

import fasttx.functional as ff

from .harness import Case, Config, Provider, Suite, Unsupported, Work, importable, randn, torch_and_compile

# (name, H, NI, E, k)
SHAPES = {"mixtral": (4096, 14336, 8, 2), "qwen3_moe": (2048, 768, 128, 8)}


def _sizes(cfg: Config):
    if cfg.size == "tiny":
        return [("tiny", 16, 32, 24, 4, 2)]
    tokens = [4096] if cfg.size == "quick" else [4096, 16384]
    return [(name, T, *SHAPES[name]) for name in SHAPES for T in tokens]


def _inputs(case: Case, cfg: Config):
    p, dt, dev = case.params, case.dtype, cfg.device
    T, H, NI, E, k = p["T"], p["H"], p["NI"], p["E"], p["k"]
    x = randn(T, H, dtype=dt, device=dev, requires_grad=True)
    g = torch.Generator(device=dev).manual_seed(0)
    idx = torch.rand(T, E, device=dev, generator=g).argsort(-1)[:, :k]
    w = torch.rand(T, k, device=dev, generator=g).softmax(-1).to(dt).requires_grad_(True)
    w1 = randn(E, 2 * NI, H, dtype=dt, device=dev, requires_grad=True, scale=H ** -0.5)
    w2 = randn(E, H, NI, dtype=dt, device=dev, requires_grad=True, scale=NI ** -0.5)
    return x, idx, w, w1, w2


def _fasttx(case, cfg):
    x, idx, w, w1, w2 = _inputs(case, cfg)
    return Work(lambda: ff.moe_experts(x, idx, w, w1, w2), leaves=(x, w, w1, w2))


def _eager(case, cfg):
    """transformers' eager experts, written out: per expert hit, gather, two linears, index_add_."""
    x, idx, w, w1, w2 = _inputs(case, cfg)
    E = w1.shape[0]

    def run():
        out = torch.zeros_like(x)
        mask = F.one_hot(idx, num_classes=E).permute(2, 1, 0)  # (E, k, T)
        for e in range(E):
            pos, tok = torch.where(mask[e])
            gate, up = F.linear(x[tok], w1[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, w2[e]) * w[tok, pos, None]
            out = out.index_add(0, tok, y.to(out.dtype))
        return out

    return Work(run, leaves=(x, w, w1, w2))


class _HFExperts(nn.Module):
    """The attributes transformers' ExpertsInterface functions read from an experts module."""

    def __init__(self, w1, w2):
        super().__init__()
        self.gate_up_proj, self.down_proj = w1, w2
        self.num_experts = w1.shape[0]
        self.act_fn = nn.SiLU()
        self.has_gate, self.has_bias, self.is_transposed, self.is_concatenated = True, False, False, True
        self.has_post_expert_norm, self._is_expert_parallel = False, False
        self.config = None

    def _apply_gate(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate) * up


def _hf(impl):
    def build(case, cfg):
        try:
            from transformers.integrations.moe import ExpertsInterface
        except ImportError as e:
            raise Unsupported(f"transformers has no ExpertsInterface ({e})")
        fn = ExpertsInterface._global_mapping.get(impl)
        if fn is None:
            raise Unsupported(f"transformers has no {impl!r} experts")
        x, idx, w, w1, w2 = _inputs(case, cfg)
        experts = _HFExperts(w1, w2)
        return Work(lambda: fn(experts, x, idx, w), leaves=(x, w, w1, w2))

    return build


def _peer(module: str):
    """Availability of an optional peer: not importable (the reason recorded), or no CUDA device."""

    def check(cfg: Config):
        try:
            __import__(module)
        except Exception as e:  # ImportError, or a broken build raising something else
            return f"{module} not importable ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})"
        return None if cfg.cuda else "needs a CUDA device"

    return check


def _liger(case, cfg):
    from liger_kernel.ops.fused_moe import LigerFusedMoEFunction

    x, idx, w, w1, w2 = _inputs(case, cfg)
    idx32 = idx.to(torch.int32)
    return Work(lambda: LigerFusedMoEFunction.apply(x, w1, w2, idx32, w), leaves=(x, w, w1, w2))


def _sonicmoe(case, cfg):
    from sonicmoe.enums import ActivationType
    from sonicmoe.functional import moe_general_routing_inputs

    x, idx, w, w1, w2 = _inputs(case, cfg)
    T, k = idx.shape
    E = w1.shape[0]
    tokens = torch.arange(T, device=idx.device, dtype=torch.int32).repeat_interleave(k)  # sorted, as it requires
    experts = idx.reshape(-1).to(torch.int32)
    stream = torch.cuda.current_stream().cuda_stream

    def run():
        out, _ = moe_general_routing_inputs(x, w.reshape(-1).float(), tokens, experts, w1.permute(1, 2, 0), None,
                                            w2.permute(1, 2, 0), None, E, stream, ActivationType.SWIGLU)
        return out

    return Work(run, leaves=(x, w, w1, w2))


def suites(cfg: Config) -> List[Suite]:
    cases = []
    for dt in cfg.dtypes:
        for name, T, H, NI, E, k in _sizes(cfg):
            N = T * k
            fwd = 6.0 * N * H * NI
            cases.append(Case(f"{name} T={T}", T, dt, {"T": T, "H": H, "NI": NI, "E": E, "k": k}, series=name,
                              flops={"fwd": fwd, "bwd": 2 * fwd, "fwd+bwd": 3 * fwd}, tokens=T))
    hf = importable("transformers.integrations.moe")
    return [Suite(
        "moe", "TFLOP/s", cases,
        [Provider("fasttx", _fasttx, kind="fasttx"), *torch_and_compile("torch", _eager),
         Provider("hf.grouped_mm", _hf("grouped_mm"), hf, kind="peer", errors_are_skips=True),
         Provider("hf.sonicmoe", _hf("sonicmoe"), hf, kind="peer", errors_are_skips=True),
         Provider("liger", _liger, _peer("liger_kernel.ops.fused_moe"), kind="peer", errors_are_skips=True),
         Provider("sonicmoe", _sonicmoe, _peer("sonicmoe.functional"), kind="peer", errors_are_skips=True)],
        modes=("fwd", "fwd+bwd"),
        xlabel="tokens T",
        description="SwiGLU experts, uniform top-k routing; TFLOP/s from the routed pairs only (6NHI fwd, "
                    "18NHI fwd+bwd); torch = transformers' eager per-expert loop.",
    )]
