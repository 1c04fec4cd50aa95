"""Bytes the Triton kernels load and store, counted under the Triton interpreter, per launch, against
each op's minimum from the bench's byte formulas (bench/bench_<op>.py: Case.bytes).

    TRITON_INTERPRET=1 python tools/traffic.py [--ops layer_norm rms_norm ...] [--size ci|full]
                                               [--modes fwd bwd] [--dtype fp16]

What is counted. The interpreter runs every tl.load / tl.store (pointer, block-pointer and tensor-
descriptor forms alike) through `InterpreterBuilder.create_masked_load` / `create_masked_store`;
`Counter` wraps those two (and the atomics, counted as a load plus a store) and adds up, per kernel
launch (`GridExecutor.__call__`):
  - all bytes: every element whose mask is true, as many times as it is accessed. This is what the
    SMs request from the memory system (L2 serves repeats; on a GPU it is what the load/store
    units move);
  - distinct bytes: every byte address touched at least once in the measured call (over all its
    launches). This is what DRAM must move at least if every repeat hits in cache.
Torch ops around the kernels (allocations, the fixed-order reduction of fp32 partial sums, casts)
are not kernels and are not counted: the table is the kernels' traffic. It is a count of bytes,
not a measurement of time: the predicted H100 time is bytes / 3.35 TB/s (HBM3 peak).

The GPU's launch configuration, not the interpreter's. Under the interpreter fasttx picks larger
tiles (`kernels/_common.TILE`) and 4 "SMs" (`num_sms`) because every program is a Python call;
`gpu_model()` sets both to the GPU's values for the count (TILE 4096, 132 SMs of an H100 SXM), so
the grid and tiles counted are the ones a GPU launch would run.

The minimum of an op at a size comes from the bench module itself: `cases()` builds the bench's
suites at the chosen size (the module's `_sizes` replaced for the call) and takes each Case's
`bytes[mode]` and its "fasttx" provider's inputs and callable; nothing here restates a formula.

`tl.dot` is counted too (Launch.flops: 2 M N K per tile product; tools/moe_traffic.py reports it).

Importable: `Counter`, `count(fn)`, `gpu_model()`, `measure(op, suite, mode, size)`, `table(rows)`.
TRITON_INTERPRET=1 must be set before triton is first imported; importing this module sets it
when triton is not imported yet and raises if triton was already imported compiled.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import inspect
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence

if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
elif os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    raise RuntimeError("tools/traffic.py counts under the Triton interpreter: set TRITON_INTERPRET=1 "
                       "before triton is first imported")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from triton.runtime import interpreter as _interp  # noqa: E402

H100_BYTES_PER_S = 3.35e12  # H100 SXM HBM3 peak
H100_SMS = 132
GPU_TILE = 4096  # kernels/_common.TILE when compiled


# ----------------------------------------------------------------------------------------------
# The counter
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Launch:
    """One kernel launch: its name and the bytes its masked-in accesses move."""

    kernel: str
    load: int = 0
    store: int = 0
    flops: int = 0  # 2 M N K per tl.dot tile product (issued, padding of partial tiles included)

    @property
    def all(self) -> int:
        return self.load + self.store


@dataclasses.dataclass
class Traffic:
    """The traffic of one measured call: its launches, and the distinct bytes over all of them."""

    launches: List[Launch]
    distinct: int
    distinct_load: int
    distinct_store: int

    @property
    def load(self) -> int:
        return sum(x.load for x in self.launches)

    @property
    def store(self) -> int:
        return sum(x.store for x in self.launches)

    @property
    def all(self) -> int:
        return self.load + self.store

    @property
    def flops(self) -> int:
        return sum(x.flops for x in self.launches)


def _check_signature(fn, first: Sequence[str]):
    """The version guard: the hooks read (ptrs, mask) / (ptrs, value, mask) by position, which holds
    from triton 3.6 (cache_modifier, eviction_policy after them) to 3.9 (cache_policy after them)."""
    names = list(inspect.signature(fn).parameters)[1:1 + len(first)]
    if names != list(first):
        raise RuntimeError(f"tools/traffic.py: InterpreterBuilder.{fn.__name__}{inspect.signature(fn)} "
                           f"no longer starts with {tuple(first)}; update the hooks for this triton")


def _nbytes(ptrs) -> int:
    return ptrs.get_element_ty().primitive_bitwidth // 8


class Counter:
    """Context manager: while active, every interpreted load/store is counted (see the module
    docstring). `Counter.traffic()` returns what was counted since entry (or the last `reset`)."""

    _active: Optional["Counter"] = None

    def __init__(self):
        self.reset()

    def reset(self):
        self.launches: List[Launch] = []
        self._addrs: Dict[str, list] = {"load": [], "store": []}

    # the hooks ------------------------------------------------------------------------------
    def _current(self) -> Launch:
        if not self.launches:  # an access outside a launch (should not happen): its own record
            self.launches.append(Launch("<outside a launch>"))
        return self.launches[-1]

    def _record(self, kind: str, ptrs, mask):
        n = _nbytes(ptrs)
        data = np.asarray(ptrs.data)
        m = np.broadcast_to(np.asarray(mask.data, dtype=bool), data.shape) if mask is not None else None
        addrs = (data[m] if m is not None else data.reshape(-1)).astype(np.int64)
        launch = self._current()
        setattr(launch, kind, getattr(launch, kind) + addrs.size * n)
        self._addrs[kind].append((addrs, n))

    def __enter__(self):
        if Counter._active is not None:
            raise RuntimeError("a traffic Counter is already active")
        B, G = _interp.InterpreterBuilder, _interp.GridExecutor
        _check_signature(B.create_masked_load, ("ptrs", "mask", "other"))
        _check_signature(B.create_masked_store, ("ptrs", "value", "mask"))
        self._saved = {(B, "create_masked_load"): B.create_masked_load,
                       (B, "create_masked_store"): B.create_masked_store,
                       (B, "create_dot"): B.create_dot, (G, "__call__"): G.__call__}
        load, store, dot, launch = B.create_masked_load, B.create_masked_store, B.create_dot, G.__call__
        counter = self

        def masked_load(builder, ptrs, mask, other, *a, **k):
            counter._record("load", ptrs, mask)
            return load(builder, ptrs, mask, other, *a, **k)

        def masked_store(builder, ptrs, value, mask, *a, **k):
            counter._record("store", ptrs, mask)
            return store(builder, ptrs, value, mask, *a, **k)

        def create_dot(builder, a, b, *rest, **k):
            m, kd = a.data.shape[-2:]
            batch = int(np.prod(a.data.shape[:-2])) if a.data.ndim > 2 else 1
            counter._current().flops += 2 * batch * m * kd * b.data.shape[-1]
            return dot(builder, a, b, *rest, **k)

        def call(executor, *a, **k):
            counter.launches.append(Launch(getattr(executor.fn, "__name__", str(executor.fn))))
            return launch(executor, *a, **k)

        B.create_masked_load, B.create_masked_store, B.create_dot = masked_load, masked_store, create_dot
        G.__call__ = call
        # Atomics read and write their element: counted as a load plus a store (names and
        # signatures differ across versions; the (ptr, ..., mask) ones are wrapped where present).
        for name in ("create_atomic_rmw", "create_atomic_cas"):
            if hasattr(B, name):
                self._saved[(B, name)] = getattr(B, name)
                setattr(B, name, self._atomic(getattr(B, name), name))
        Counter._active = self
        return self

    def _atomic(self, orig, name):
        counter = self
        params = list(inspect.signature(orig).parameters)

        def atomic(builder, *a, **k):
            bound = dict(zip(params[1:], a), **k)
            ptr, mask = bound.get("ptr"), bound.get("mask")
            counter._record("load", ptr, mask)
            counter._record("store", ptr, mask)
            return orig(builder, *a, **k)

        return atomic

    def __exit__(self, *exc):
        for (owner, name), fn in self._saved.items():
            setattr(owner, name, fn)
        Counter._active = None
        return False

    # the result -----------------------------------------------------------------------------
    def traffic(self) -> Traffic:
        def distinct(kinds) -> int:
            # distinct byte addresses: each element address expanded to its bytes' addresses would
            # be exact for mixed widths; the tensors of one kernel do not overlap, so per element
            # width the distinct element addresses times the width is the same number
            total = 0
            pairs = [p for kind in kinds for p in self._addrs[kind]]
            for width in {n for _, n in pairs}:
                a = np.sort(np.concatenate([x for x, n in pairs if n == width]))
                # (np.unique is hash-based and slow on millions of int64s in numpy >= 2.3)
                total += (int(np.count_nonzero(a[1:] != a[:-1])) + 1 if a.size else 0) * width
            return total

        return Traffic(list(self.launches), distinct(("load", "store")), distinct(("load",)),
                       distinct(("store",)))


def count(fn: Callable[[], object]) -> Traffic:
    """The traffic of the interpreted kernels `fn()` launches."""
    with Counter() as c:
        fn()
    return c.traffic()


@contextlib.contextmanager
def gpu_model(sms: int = H100_SMS, tile: int = GPU_TILE):
    """Launch configurations as on a GPU with `sms` SMs: kernels/_common.TILE and num_sms (also
    where a kernel module imported num_sms by name) set for the duration."""
    from fasttx.kernels import _common

    orig_sms, orig_tile = _common.num_sms, _common.TILE

    def gpu_num_sms(device):
        return sms

    patched = [(_common, "num_sms", orig_sms), (_common, "TILE", orig_tile)]
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("fasttx.kernels") and mod is not _common:
            if getattr(mod, "num_sms", None) is orig_sms:
                patched.append((mod, "num_sms", orig_sms))
    try:
        for mod, name, _ in patched:
            setattr(mod, name, gpu_num_sms if name == "num_sms" else tile)
        yield
    finally:
        for mod, name, value in patched:
            setattr(mod, name, value)
        # a kernel module first imported inside the model bound its patched num_sms by name: restored
        # too, or every later model would skip it (it is not the original) and it kept these SMs
        for mod in list(sys.modules.values()):
            name = getattr(mod, "__name__", "")
            if name.startswith("fasttx.kernels") and getattr(mod, "num_sms", None) is gpu_num_sms:
                mod.num_sms = orig_sms


# ----------------------------------------------------------------------------------------------
# The ops, at a size, from the bench modules
# ----------------------------------------------------------------------------------------------
# bench module -> {size name: what its _sizes(cfg) returns}. "ci": the one size per op that
# tests/test_traffic.py runs, counted with CI_SMS SMs: every program-count rule scales with the SM
# count, so 128 rows on 4 SMs have the rows per program (and the weight reads per row) of an H100's
# 132 SMs at 128 * 132 / 4 = 4224 rows, at 1/33 of the interpreter's time. "wide": the norms at
# N = 4096 (one row per GPU tile), 256 rows on 8 SMs; "chunked": rows past MAX_BLOCK_N (9000: 17
# full 512-column chunks and a ragged one), 32 rows on CHUNKED_SMS = 1 (again 4224 rows on 132);
# "longest": the same at LayerNorm's largest row (MAX_HIDDEN: the forward's worst ratio);
# "full": the 4096 x 4096 on 132 SMs (minutes).
SIZES = {
    "layer_norm": {"ci": (128, [1024]), "wide": (256, [4096]), "chunked": (32, [9000]), "longest": (32, [65536]),
                   "full": (4096, [4096])},
    "rms_norm": {"ci": (128, [1024]), "wide": (256, [4096]), "chunked": (32, [9000]), "full": (4096, [4096])},
    "gelu": {"ci": (128, [1024]), "full": (4096, [4096])},
    "dropout": {"ci": [2**14], "full": [2**24]},
    "softmax": {"ci": (128, [1024]), "full": (4096, [4096])},
    "rotary": {"ci": [(1, 4, 2, 32, 64)], "full": [(4, 32, 8, 1024, 128)]},
    "cross_entropy": {"ci": [(64, 64, 4096)], "full": [(4096, 2048, 32000)]},
}
CI_SMS = 4
CHUNKED_SMS = 1
# the CLI's default --sms
SIZE_SMS = {"ci": CI_SMS, "wide": 8, "chunked": CHUNKED_SMS, "longest": CHUNKED_SMS, "full": H100_SMS}
MEMORY_BOUND = ("layer_norm", "rms_norm", "gelu", "dropout", "softmax", "rotary", "cross_entropy")


@contextlib.contextmanager
def _bench_sizes(mod, value):
    orig = mod._sizes
    mod._sizes = lambda cfg: value
    try:
        yield
    finally:
        mod._sizes = orig


def cases(op: str, size: str = "ci", dtype: torch.dtype = torch.float16):
    """[(suite, case, fasttx provider)] of bench/bench_<op>.py at SIZES[op][size], the suites with a
    byte count (GB/s) only."""
    from bench.spec import Config

    mod = importlib.import_module(f"bench.bench_{op}")
    cfg = Config(device="cpu", dtypes=(dtype,), size="tiny", compile=False, ceilings=False, verbose=False)
    with _bench_sizes(mod, SIZES[op][size]):
        suites = mod.suites(cfg)
    out = []
    for suite in suites:
        if suite.metric != "GB/s":
            continue
        prov = next(p for p in suite.providers if p.name == "fasttx")
        for case in suite.cases:
            out.append((suite, case, prov))
    return out


@dataclasses.dataclass
class Row:
    op: str
    case: str
    mode: str
    traffic: Traffic
    minimum: float

    @property
    def all_ratio(self) -> float:
        return self.traffic.all / self.minimum

    @property
    def distinct_ratio(self) -> float:
        return self.traffic.distinct / self.minimum

    def predicted_us(self, nbytes: float) -> float:
        return nbytes / H100_BYTES_PER_S * 1e6


def _outputs_and_grads(out):
    from bench.timing import _tensors

    outs = [t for t in _tensors(out) if t.requires_grad and t.is_floating_point()]
    g = torch.Generator().manual_seed(1)
    return outs, [torch.randn(t.shape, generator=g).to(t.dtype) for t in outs]


def measure_case(suite, case, prov, mode: str, sms: int = H100_SMS) -> Row:
    """Count one bench case's fasttx call ("fwd": the forward; "bwd": the backward of one forward,
    the forward not counted) on the Triton path with the GPU's launch configuration."""
    import fasttx
    from bench.spec import Config

    cfg = Config(device="cpu", dtypes=(case.dtype,), size="tiny", compile=False, verbose=False)
    torch.manual_seed(0)
    with gpu_model(sms), fasttx.use_backend("triton"):
        work = prov.build(case, cfg)
        if mode == "fwd":
            traffic = count(work.fn)
        elif mode == "bwd":
            outs, grads = _outputs_and_grads(work.fn())
            traffic = count(lambda: torch.autograd.backward(outs, grads))
        else:
            raise ValueError(f"mode must be 'fwd' or 'bwd', got {mode!r}")
    return Row(suite.name, case.label, mode, traffic, case.bytes[mode])


def measure(op: str, suite: Optional[str] = None, modes: Sequence[str] = ("fwd", "bwd"), size: str = "ci",
            dtype: torch.dtype = torch.float16, sms: int = H100_SMS) -> List[Row]:
    """Rows for every (suite, case, mode) of bench/bench_<op>.py at `size` (one suite if named)."""
    rows = []
    for s, case, prov in cases(op, size, dtype):
        if suite is not None and s.name != suite:
            continue
        for mode in modes:
            if mode in (case.modes or s.modes):
                rows.append(measure_case(s, case, prov, mode, sms))
    return rows


def table(rows: Sequence[Row]) -> str:
    """Markdown table: all and distinct bytes against the minimum, and H100 times predicted from them."""
    head = ("| op | case | mode | launches | load MB | store MB | all / min | distinct / min | min MB "
            "| H100 us (all) | H100 us (distinct) | H100 us (min) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        t = r.traffic
        lines.append(
            f"| {r.op} | {r.case} | {r.mode} | {len(t.launches)} | {t.load / 1e6:.2f} | {t.store / 1e6:.2f} "
            f"| {r.all_ratio:.3f} | {r.distinct_ratio:.3f} | {r.minimum / 1e6:.2f} "
            f"| {r.predicted_us(t.all):.1f} | {r.predicted_us(t.distinct):.1f} | {r.predicted_us(r.minimum):.1f} |")
    return "\n".join(lines)


def main(argv=None):
    from bench.spec import DTYPES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", nargs="+", default=list(MEMORY_BOUND), choices=sorted(SIZES))
    p.add_argument("--suite", default=None, help="one suite of the op (e.g. add_rms_norm)")
    p.add_argument("--size", default="ci", help="a key of SIZES[op] (ci, chunked, full)")
    p.add_argument("--modes", nargs="+", default=["fwd", "bwd"], choices=["fwd", "bwd"])
    p.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    p.add_argument("--sms", type=int, default=None, help="SMs of the GPU model (default: SIZE_SMS[size])")
    p.add_argument("--launches", action="store_true", help="also print every launch's bytes")
    a = p.parse_args(argv)
    a.sms = a.sms or SIZE_SMS.get(a.size, H100_SMS)
    rows = []
    for op in a.ops:
        if a.size not in SIZES[op]:
            print(f"# {op}: no size {a.size!r} (has {sorted(SIZES[op])})")
            continue
        rows += measure(op, a.suite, a.modes, a.size, DTYPES[a.dtype], a.sms)
    print(f"# counted under the Triton interpreter (triton {_triton_version()}), GPU launch configuration "
          f"of {a.sms} SMs; a count of bytes, not a measurement; times = bytes / 3.35 TB/s")
    print(table(rows))
    if a.launches:
        for r in rows:
            for x in r.traffic.launches:
                print(f"  {r.op} {r.mode}: {x.kernel}: load {x.load:,} B, store {x.store:,} B")


def _triton_version() -> str:
    import triton

    return triton.__version__


if __name__ == "__main__":
    main()
