"""Timing and memory: how one callable is timed (CUDA: triton.testing.do_bench; CPU: interleaved
perf_counter rounds on a fixed number of torch threads), how its peak and autograd-saved memory are
measured, how a mode ("fwd", "bwd", "fwd+bwd", "call") becomes a callable, and the two ceilings
(copy bandwidth, matmul throughput) every row is compared with.

Timing
  CUDA: `triton.testing.do_bench` (L2 flushed between runs, grads set to None between runs);
        the median and the 20/80 quantiles in ms.
  CPU:  `time.perf_counter` around each call (after one untimed call), median and 20/80 quantiles,
        all providers of a case in round-robin rounds so that load from other processes falls on
        each alike, with torch limited to `Config.threads` threads (default 1: with all cores,
        OpenMP threads of the timed op compete with the machine's other load and the times swing
        by integer factors from run to run).
  noise: half the 20-80 % spread over the median, the row's relative uncertainty.

Modes
  "fwd"      the forward alone.
  "bwd"      the backward alone: one forward is run first and kept; each timed call back-propagates
             random output gradients through it (retain_graph=True).
  "fwd+bwd"  forward then backward.
  "call"     a whole step given by the provider (a training step, a generate() call).

Memory
  peak_MB   torch.cuda.max_memory_allocated() during one call, after reset_peak_memory_stats(),
            minus what was allocated before the call (CUDA only).
  saved_MB  ("fwd" only) bytes of the tensors autograd keeps for the backward that are neither the
            op's inputs nor its outputs (saved_tensors_hooks; unique storages). Device independent:
            this is where a stored dropout mask shows up.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .spec import DTYPE_NAMES, Config, Unsupported, Work


@contextlib.contextmanager
def cpu_threads(cfg: Config):
    """Torch's intra-op threads fixed for the run on CPU (restored after); a no-op on CUDA."""
    if cfg.cuda:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, cfg.threads or 1))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def noise(ms: Optional[float], q20: Optional[float], q80: Optional[float]) -> Optional[float]:
    """Relative uncertainty of a median: half the 20-80 % spread over the median."""
    if not ms or q20 is None or q80 is None:
        return None
    return max(0.0, (q80 - q20) / (2 * ms))


def _sync(cfg: Config) -> None:
    if cfg.cuda:
        torch.cuda.synchronize()


def reset_grads(leaves) -> None:
    for t in leaves:
        t.grad = None


def time_fn(fn: Callable, cfg: Config, leaves=(), rep_ms: Optional[float] = None):
    """(median, q20, q80, min) in ms."""
    if cfg.cuda:
        from triton.testing import do_bench

        res = do_bench(
            fn, warmup=cfg.warmup_ms, rep=rep_ms or cfg.rep_ms, grad_to_none=list(leaves) or None,
            quantiles=[0.5, 0.2, 0.8, 0.0],
        )
        return tuple(float(v) for v in res)
    name = "fn"
    return time_interleaved({name: fn}, cfg, {name: leaves}, rep_ms)[name]


def peak_memory_mb(fn: Callable, cfg: Config, leaves=()):
    """(peak over what was allocated before the call, absolute peak) in MB; (None, None) on CPU."""
    if not cfg.cuda:
        return None, None
    reset_grads(leaves)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    total = torch.cuda.max_memory_allocated()
    del out
    return (total - base) / 2**20, total / 2**20


def _storage_key(t: torch.Tensor):
    s = t.untyped_storage()
    return (t.device.type, s.data_ptr()), s.nbytes()


def saved_memory_mb(fn: Callable, inputs=()) -> float:
    """MB autograd keeps for the backward beyond the inputs and outputs (unique storages)."""
    seen: Dict[Any, int] = {}

    def pack(t):
        try:
            key, size = _storage_key(t)
            seen[key] = size
        except Exception:  # tensors without storage (e.g. some subclasses): not counted
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    exclude = {_storage_key(t)[0] for t in list(inputs) + _tensors(out)}
    return sum(v for k, v in seen.items() if k not in exclude) / 2**20


def _tensors(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []


def _grad_outputs(out):
    outs = [t for t in _tensors(out) if t.requires_grad and t.is_floating_point()]
    if not outs:
        raise Unsupported("no output requires grad (nothing to back-propagate)")
    return outs, [torch.randn_like(t) for t in outs]


def mode_fn(work: Work, mode: str) -> Callable:
    """The callable that runs `mode` of `work`."""
    if mode in ("fwd", "call"):
        return work.fn
    if mode == "fwd+bwd":

        def fwd_bwd():
            outs, grads = _grad_outputs(work.fn())
            torch.autograd.backward(outs, grads)

        return fwd_bwd
    if mode == "bwd":
        outs, grads = _grad_outputs(work.fn())  # one forward, kept

        def bwd():
            torch.autograd.backward(outs, grads, retain_graph=True)

        return bwd
    raise ValueError(f"unknown mode {mode!r}")


# ----------------------------------------------------------------------------------------------
# Ceilings
# ----------------------------------------------------------------------------------------------
def measure_ceilings(cfg: Config) -> Dict[str, Any]:
    """Device-to-device copy bandwidth and a large matmul, measured with the same timer as the
    rows: the denominators of the 'fraction of ceiling' column."""
    dev = cfg.device
    if cfg.cuda:
        copy_numel, mm_n, mm_dtype = 2**28, 8192, torch.bfloat16  # 1 GiB fp32 copy; 8192^3 bf16
    else:
        copy_numel, mm_n, mm_dtype = 2**23, 512, torch.float32  # 32 MiB; CPU bf16 matmul is slow
    src = torch.empty(copy_numel, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), cfg)[0]
    copy_bytes = 2 * src.numel() * src.element_size()  # read once, written once
    src = dst = None  # free the copy buffers before the matmul
    a = torch.randn(mm_n, mm_n, device=dev, dtype=mm_dtype)
    b = torch.randn(mm_n, mm_n, device=dev, dtype=mm_dtype)
    mm_ms = time_fn(lambda: a @ b, cfg)[0]
    return {
        "copy_GBps": copy_bytes / (ms * 1e-3) / 1e9,
        "copy_bytes": copy_bytes,
        "matmul_TFLOPs": 2 * mm_n**3 / (mm_ms * 1e-3) / 1e12,
        "matmul_shape": [mm_n, mm_n, mm_n],
        "matmul_dtype": DTYPE_NAMES[mm_dtype],
    }


def time_interleaved(fns: Dict[str, Callable], cfg: Config, leaves: Dict[str, Sequence[torch.Tensor]],
                     rep_ms: Optional[float] = None) -> Dict[str, tuple]:
    """CPU: time several callables in round-robin rounds; {name: (median, q20, q80, min)} in ms.
    At least cfg.rounds rounds, more while the round budget lasts."""
    times: Dict[str, List[float]] = {n: [] for n in fns}
    budget = min(cfg.max_seconds_per_row * max(1, len(fns)), (rep_ms or cfg.rep_ms) / 1e3 * max(1, len(fns)))
    start = time.perf_counter()
    rounds = 0
    while rounds < max(1, cfg.rounds) or (time.perf_counter() - start < budget and rounds < 1000):
        for name, fn in fns.items():
            reset_grads(leaves[name])
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
        if rounds >= 1 and time.perf_counter() - start > 4 * budget:
            break  # slow cases (a big CPU step): stop early rather than stall the run
    return {n: _quantiles(ts) for n, ts in times.items()}


def _quantiles(times: List[float]):
    if len(times) == 1:
        return times[0], times[0], times[0], times[0]
    q = statistics.quantiles(times, n=10, method="inclusive")  # deciles: q[1] = 20 %, q[7] = 80 %
    return statistics.median(times), q[1], q[7], min(times)
