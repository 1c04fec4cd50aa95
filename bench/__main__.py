"""python -m bench: run fasttx's benchmark sweep and write results, a markdown table and plots.

On a CUDA machine: the full sweep (fasttx's Triton kernels against torch eager, torch.compile,
SDPA backends, FlexAttention and any importable peer), bf16 and fp16, timed with
triton.testing.do_bench. On a CPU-only machine: tiny sizes, fp32, fasttx's fallback path against
torch.nn on the CPU (the ratio is the point: the fallback must not be slower), one torch thread,
about a minute. Runs from any directory as `python -m bench` (repository root on the path) or
`python <repo>/bench`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

if __package__ in (None, ""):  # `python path/to/bench`: run as the package, from any directory
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench.__main__ import main

    sys.exit(main())

import torch  # noqa: E402

from . import harness, report  # noqa: E402
from .harness import DTYPES, MODES, OPS, SIZES, Config  # noqa: E402

# Results go to the current directory, never into the source tree unless asked
# (`--out-dir bench/results` for a run meant to be committed).
DEFAULT_OUT = "bench-results"


def _csv(choices=None):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if choices is not None and t not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad} not in {list(choices)}")
        return items

    return parse


def _value(text: str):
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse_where(text: str):
    """'S=1024,4096;E=64' -> {"S": [1024, 4096], "E": [64]}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, sep, vals = part.partition("=")
        if not sep or not key.strip() or not vals.strip():
            raise argparse.ArgumentTypeError(f"--where wants KEY=V1,V2[;KEY2=...], got {part!r}")
        out[key.strip()] = [_value(v.strip()) for v in vals.split(",") if v.strip()]
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__.split("\n\n")[0].rstrip(".") + ". Results go to <out-dir>/<gpu-or-cpu>-<date>.json, "
        ".md and a folder of PNG plots.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--ops", type=_csv(OPS), default=list(OPS),
                   help=f"comma-separated subset of {','.join(OPS)} (one per bench/bench_<op>.py)")
    p.add_argument("--suites", type=_csv(), default=None,
                   help="comma-separated suite names to keep (e.g. gpt_train); default all of --ops")
    p.add_argument("--providers", type=_csv(), default=None,
                   help="comma-separated provider names to keep (e.g. fasttx,torch,sdpa-flash); default all")
    p.add_argument("--where", type=parse_where, default=None, metavar="KEY=V1,V2[;KEY=...]",
                   help="keep the cases whose parameter KEY is one of the values (cases without KEY are "
                   "kept), e.g. 'S=1024,4096;E=64'")
    p.add_argument("--dtype", type=_csv(DTYPES), default=None,
                   help="comma-separated dtypes (fp32,fp16,bf16); default bf16,fp16 on CUDA, fp32 on CPU")
    p.add_argument("--modes", type=_csv(MODES), default=list(MODES), help="fwd,bwd,fwd+bwd subset")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="two sizes per sweep (GPU)")
    size.add_argument("--size", choices=SIZES, default=None,
                      help="problem sizes; default full on CUDA, tiny on CPU")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes, one timed round: checks it runs (the output says it is no measurement)")
    p.add_argument("--device", default=None, help="cuda or cpu; default cuda when available")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU: torch threads while timing (1 keeps CPU timings stable on a shared machine)")
    comp = p.add_mutually_exclusive_group()
    comp.add_argument("--compile", dest="compile", action="store_true", default=None,
                      help="include the torch.compile baselines (default on CUDA only: compiling "
                      "dominates a CPU run)")
    comp.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the baselines")
    p.add_argument("--fasttx-backend", default="auto", choices=("auto", "triton", "torch", "reference"),
                   help="fasttx.use_backend for the fasttx provider")
    p.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench warmup (CUDA)")
    p.add_argument("--rep-ms", type=float, default=100.0, help="do_bench rep (CUDA) / time budget per row (CPU)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="rows not started within this many seconds are recorded as 'cut'")
    p.add_argument("--no-ceilings", action="store_true", help="skip the copy / matmul ceilings")
    p.add_argument("--out-dir", default=DEFAULT_OUT,
                   help="where the JSON, markdown and plots go (relative to the current directory)")
    p.add_argument("--no-write", action="store_true", help="print only, write nothing")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--list", action="store_true", help="list suites, cases and providers, then exit")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-row output")
    return p


def config_from_args(args) -> Config:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.device(device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    size = args.size or ("quick" if args.quick else ("full" if cuda else "tiny"))
    if args.smoke:
        size = "tiny"
    dtypes = [DTYPES[d] for d in args.dtype] if args.dtype else (
        [torch.bfloat16, torch.float16] if cuda else [torch.float32])
    return Config(
        device=device,
        dtypes=tuple(dtypes),
        size=size,
        modes=tuple(args.modes),
        providers=args.providers,
        suites=args.suites,
        where=args.where,
        compile=cuda if args.compile is None else args.compile,
        compile_backend=args.compile_backend,
        fasttx_backend=args.fasttx_backend,
        warmup_ms=args.warmup_ms,
        rep_ms=args.rep_ms,
        rounds=1 if args.smoke else 7,
        max_seconds_per_row=0.0 if args.smoke else 0.25,
        threads=args.threads,
        smoke=args.smoke,
        ceilings=not args.no_ceilings,
        budget_s=args.budget_s,
        verbose=not args.quiet,
    )


def print_summary(result, seconds: float, out=print) -> None:
    rows = result["rows"]
    counts = {st: sum(r["status"] == st for r in rows) for st in harness.STATUSES}
    out(f"\n{len(rows)} rows in {seconds:.1f} s (" + ", ".join(f"{n} {st}" for st, n in counts.items()
                                                         if n or st != "cut") + ")")
    smoke = result["config"].smoke if "config" in result else False
    if smoke:
        out(report.SMOKE_NOTE)
    skips = report.skip_list(rows)
    if skips:
        out("Not measured (grouped; every reason is in the JSON and the markdown):")
        for g in skips:
            out(f"  {g['op']:<22} {g['provider']:<16} {g['status']:<7} x{g['rows']:<3} {g['reason']}")
    path = result["environment"]["fasttx_path"]
    out(f"fasttx ({path} path) speedup over each suite's baseline, geometric mean of medians "
        "(of minima), and the typical noise of one ratio:")
    fastest = harness.summary(rows, key="speedup_min")
    for op, v in harness.summary(rows).items():
        base = next((s.baseline for s in result["suites"] if s.name == op), "?")
        vm, nz = fastest[op], report.ratio_noise(rows, op)
        within = " (within noise of 1.00x)" if v is not None and nz is not None and abs(v - 1) <= nz else ""
        out(f"  {op:<24} {'-' if v is None else f'{v:.2f}x'} ({'-' if vm is None else f'{vm:.2f}x'}) "
            f"{'' if nz is None else f'±{100 * nz:.0f}% '}vs {base}{within}")
    fb = sorted({r["op"] for r in rows if r.get("fallback")})
    if fb:
        out(f"fasttx fell back to torch's implementation in: {', '.join(fb)} (see each row's 'fallback')")
    for kind, p in result["paths"].items():
        out(f"{kind}: {p}")


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    cfg = config_from_args(args)
    if args.list:
        for s in harness.load_suites(args.ops, cfg):
            names = [p.name for p in s.providers]
            print(f"{s.name} ({s.metric}, baseline {s.baseline}): providers {', '.join(names) or '-'}")
            if s.unavailable:
                print(f"  not runnable here: {s.unavailable}")
            for c in s.cases:
                print(f"  {harness.DTYPE_NAMES[c.dtype]:<4} {c.series:<22} {c.label}")
        return 0
    t0 = time.perf_counter()
    result = harness.run(args.ops, cfg, out_dir=None if args.no_write else args.out_dir,
                         plots=not args.no_plots)
    result["config"] = cfg
    print_summary(result, time.perf_counter() - t0)
    kinds = {p.name: p.kind for s in result["suites"] for p in s.providers}
    errors = [r for r in result["rows"] if r["status"] == "error" and kinds.get(r["provider"]) != "peer"]
    for r in errors:
        print(f"ERROR {r['op']} {r['case']} {r['dtype']} {r['mode']} {r['provider']}: {r['reason']}",
              file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
