"""The same setups through pytest-benchmark, for users who keep benchmark history with it:

    pytest bench/test_bench_pytest_benchmark.py --benchmark-json=out.json   # on a GPU
    pytest-benchmark compare 0001 0002

Each test times one (suite, case, provider, mode) with CUDA synchronisation inside the timed
call. On a GPU the "quick" sizes are used (FASTTX_BENCH_SIZE=full|quick|tiny overrides); on CPU the
tiny ones, one round, fasttx against the suite's baseline only, the last mode (fwd+bwd) only: a
smoke that runs under plain pytest, and with --benchmark-disable or xdist (where pytest-benchmark
switches itself off) each function just runs once.
"""
from __future__ import annotations

import os

import pytest
import torch

from bench import harness
from bench.harness import OPS, Config

CUDA = torch.cuda.is_available()
SIZE = os.environ.get("FASTTX_BENCH_SIZE", "quick" if CUDA else "tiny")
CFG = Config(
    device="cuda" if CUDA else "cpu",
    dtypes=(torch.bfloat16,) if CUDA else (torch.float32,),
    size=SIZE,
    compile=CUDA,
    verbose=False,
)


def _params():
    """(suite, case index, provider, mode) to time. Only the setups are listed here (no tensor is
    allocated at collection); GPT is left out when fasttx.models is missing."""
    out = []
    for op in OPS:
        try:
            suites = harness.load_suites([op], CFG)
        except ImportError as e:  # a bench module whose fasttx part is missing: one visible skip
            out.append(pytest.param(None, 0, None, None, id=f"{op}-unavailable",
                                    marks=pytest.mark.skip(reason=f"bench_{op}: {e}")))
            continue
        for s in suites:
            if not CUDA and s.name == "gpt_train":
                continue  # seconds per step on a loaded CPU; the harness smoke runs it, and
                # gpt_generate covers the same "call" path here
            cases = list(enumerate(s.cases))
            if not CUDA:
                cases = cases[:1]  # CPU: one tiny case per suite
            keep = None if CUDA else ("fasttx", s.baseline)
            for i, c in cases:
                for p in s.providers:
                    if keep is not None and p.name not in keep:
                        continue
                    modes = list(c.modes or s.modes)
                    for mode in (modes if CUDA else modes[-1:]):  # CPU: fwd+bwd covers both ways
                        out.append(pytest.param(s, i, p, mode, id=f"{s.name}-{c.label}-{p.name}-{mode}"))
    return out


@pytest.mark.parametrize("suite,index,provider,mode", _params())
def test_bench(benchmark, suite, index, provider, mode):
    case = suite.cases[index]
    reason = suite.unavailable or provider.available(CFG)
    if reason:
        pytest.skip(reason)
    import fasttx

    with fasttx.use_backend(CFG.fasttx_backend):
        try:
            work = provider.build(case, CFG)
            fn = harness.mode_fn(work, mode)
            fn()  # compile / JIT outside the timed calls
        except harness.Unsupported as e:
            pytest.skip(str(e))

        def timed():
            harness._reset_grads(work.leaves)
            fn()
            if CUDA:
                torch.cuda.synchronize()

        if CUDA:
            benchmark.pedantic(timed, rounds=20 if mode != "call" else 3, iterations=1, warmup_rounds=2)
        else:
            benchmark.pedantic(timed, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(
        op=suite.name, case=case.label, dtype=harness.DTYPE_NAMES[case.dtype], mode=mode,
        provider=provider.name, metric=suite.metric, device=CFG.device,
        bytes=(case.bytes or {}).get(mode), flops=(case.flops or {}).get(mode), tokens=case.tokens,
    )
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        sec = stats.stats.median
        row = {"metric": suite.metric}
        harness._fill_metrics(row, case, mode, sec * 1e3, None)
        benchmark.extra_info[suite.metric] = row["value"]
