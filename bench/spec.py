"""What a benchmark describes: the run's Config, and the Case / Provider / Work / Suite records a
bench/bench_<op>.py builds in its `suites(cfg)`; plus the small helpers those modules share
(optional peers, the torch.compile twin of an eager provider, input and byte-count helpers).
Nothing here times, measures or writes anything (timing.py, report.py, harness.py do)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
METRICS = ("GB/s", "TFLOP/s", "tokens/s")
SIZES = ("tiny", "quick", "full")
STATUSES = ("ok", "skipped", "error", "cut")  # cut: not run, the run's time budget was spent


class Unsupported(Exception):
    """Raised by a provider's build (or by a run, for providers marked `errors_are_skips`) when it
    cannot run a case; the row is recorded as skipped with this message as the reason."""


@dataclass
class Config:
    """One run of the suite. `size`: "tiny" (CPU, smoke), "quick" or "full" (GPU sweep)."""

    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes: Sequence[torch.dtype] = (torch.bfloat16, torch.float16)
    size: str = "full"
    modes: Sequence[str] = MODES
    providers: Optional[Sequence[str]] = None  # None = every provider
    suites: Optional[Sequence[str]] = None  # None = every suite of the chosen ops
    where: Optional[Dict[str, Sequence[Any]]] = None  # keep cases whose params[k] is in where[k]
    compile: bool = True  # include the torch.compile baselines
    compile_backend: str = "inductor"
    fasttx_backend: str = "auto"  # "auto" = Triton on CUDA, torch's ops on CPU
    warmup_ms: float = 25.0  # do_bench's warmup/rep on CUDA
    rep_ms: float = 100.0
    rounds: int = 5  # timed calls at least (CPU)
    max_seconds_per_row: float = 0.5  # CPU: stop adding rounds past this
    threads: Optional[int] = None  # CPU: torch threads during the run (None = 1: stable timings)
    smoke: bool = False  # one round on tiny sizes: checks that it runs, measures nothing
    ceilings: bool = True  # measure the copy / matmul ceilings first
    budget_s: Optional[float] = None  # rows not started within this many seconds are "cut"
    verbose: bool = True

    @property
    def cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"


@dataclass
class Case:
    """One problem size. `bytes` / `flops` map a mode to the count the throughput is computed
    from; `x` is the plot's x value within `series` (e.g. the hidden size)."""

    label: str
    x: int
    dtype: torch.dtype
    params: Dict[str, Any] = field(default_factory=dict)
    series: str = ""
    bytes: Optional[Dict[str, float]] = None
    flops: Optional[Dict[str, float]] = None
    tokens: Optional[int] = None
    modes: Optional[Sequence[str]] = None  # None = the suite's modes


@dataclass
class Work:
    """What a provider built for one case: `fn()` runs the forward (or the whole step, mode
    "call") and returns its output(s); `leaves` are the tensors whose .grad the harness resets."""

    fn: Callable[[], Any]
    leaves: Sequence[torch.Tensor] = ()
    inputs: Sequence[torch.Tensor] = ()  # excluded from saved_MB (defaults to leaves)


@dataclass
class Provider:
    """An implementation. `build(case, cfg) -> Work` allocates inputs and returns the callable;
    `available(cfg) -> reason or None` says up front whether it can run at all here."""

    name: str
    build: Callable[[Case, Config], Work]
    available: Callable[[Config], Optional[str]] = lambda cfg: None
    kind: str = "torch"  # "fasttx" | "torch" | "compile" | "peer"
    errors_are_skips: bool = False  # a failure means "this backend can't run this case"


@dataclass
class Suite:
    """One benchmark: cases x providers x modes, one metric, speedups against `baseline`.
    The provider named "fasttx" is fasttx's public function; the smoke test and `make gpu-check`
    also run it on the Triton path (interpreter on CPU) for every suite whose modes are not "call"."""

    name: str
    metric: str
    cases: List[Case]
    providers: List[Provider]
    modes: Sequence[str] = MODES
    baseline: str = "torch"
    unavailable: Optional[str] = None  # the whole suite cannot run here (e.g. a missing module)
    xlabel: str = "size"
    description: str = ""
    rep_ms: Optional[float] = None  # timing budget override (long steps: the model benchmark)

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")


# ----------------------------------------------------------------------------------------------
# Provider helpers shared by the bench modules
# ----------------------------------------------------------------------------------------------
def importable(module: str, cuda_only: bool = True) -> Callable[[Config], Optional[str]]:
    """Availability check of an optional peer (Liger-Kernel, flash-attn, Apex): never a
    dependency, so a missing one is a skip with the reason recorded."""

    def check(cfg: Config) -> Optional[str]:
        if cuda_only and not cfg.cuda:
            return "needs a CUDA device"
        try:
            __import__(module)
        except Exception as e:  # ImportError, or a broken build raising something else
            return f"{module} not importable ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
        return None

    return check


def compile_available(cfg: Config) -> Optional[str]:
    if not cfg.compile:
        return "torch.compile baselines off (--no-compile, or CPU default; pass --compile)"
    return None


def compiled(fn: Callable, cfg: Config) -> Callable:
    """torch.compile of the same eager code, freshly for this case (dynamic=False: one graph per
    shape, as a user with a fixed shape would get). Dynamo's caches are reset first so that a
    sweep over many shapes never hits the recompile limit and silently falls back to eager."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False, backend=cfg.compile_backend)


def torch_and_compile(name: str, build: Callable[[Case, Config], Work]) -> List[Provider]:
    """The eager torch provider and its torch.compile twin, built from the same code: `build`
    returns the eager Work; the compiled one wraps its fn."""

    def build_compiled(case: Case, cfg: Config) -> Work:
        work = build(case, cfg)
        return dataclasses.replace(work, fn=compiled(work.fn, cfg))

    return [
        Provider(name, build, kind="torch"),
        Provider(f"{name}.compile", build_compiled, available=compile_available, kind="compile"),
    ]


def randn(*shape, dtype, device, requires_grad=False, scale=1.0) -> torch.Tensor:
    t = torch.randn(*shape, dtype=torch.float32, device=device).mul_(scale).to(dtype)
    return t.requires_grad_(requires_grad)


def nbytes(*counts_and_dtypes) -> float:
    """nbytes((numel, dtype), ...) -> total bytes; dtype may be a torch.dtype or a byte width."""
    total = 0
    for numel, dt in counts_and_dtypes:
        width = dt if isinstance(dt, int) else torch.empty((), dtype=dt).element_size()
        total += numel * width
    return float(total)
