"""python -m bench: run fasttx's benchmark sweep and write results, a markdown table and plots.

On a CUDA machine: the full sweep (fasttx's Triton kernels against torch eager, torch.compile,
SDPA backends, FlexAttention and any importable peer), bf16 and fp16, timed with
triton.testing.do_bench. On a CPU-only machine: tiny sizes, fp32, fasttx's fallback path against
torch.nn on the CPU (the ratio is the point: the fallback must not be slower), about a minute.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from . import harness
from .harness import DTYPES, MODES, OPS, SIZES, Config

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _csv(choices=None):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if choices is not None and t not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad} not in {list(choices)}")
        return items

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__.split("\n\n")[0].rstrip(".") + ". Results go to <out-dir>/<gpu-or-cpu>-<date>.json, "
        ".md and a folder of PNG plots.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--ops", type=_csv(OPS), default=list(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--providers", type=_csv(), default=None,
                   help="comma-separated provider names to keep (e.g. fasttx,torch,sdpa-flash); default all")
    p.add_argument("--dtype", type=_csv(DTYPES), default=None,
                   help="comma-separated dtypes (fp32,fp16,bf16); default bf16,fp16 on CUDA, fp32 on CPU")
    p.add_argument("--modes", type=_csv(MODES), default=list(MODES), help="fwd,bwd,fwd+bwd subset")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="two sizes per sweep (GPU)")
    size.add_argument("--size", choices=SIZES, default=None,
                      help="problem sizes; default full on CUDA, tiny on CPU")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one timed round: checks it runs")
    p.add_argument("--device", default=None, help="cuda or cpu; default cuda when available")
    comp = p.add_mutually_exclusive_group()
    comp.add_argument("--compile", dest="compile", action="store_true", default=None,
                      help="include the torch.compile baselines (default on CUDA only: compiling "
                      "dominates a CPU run)")
    comp.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the baselines")
    p.add_argument("--fasttx-backend", default="auto", choices=("auto", "triton", "reference"),
                   help="fasttx.use_backend for the fasttx provider")
    p.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench warmup (CUDA)")
    p.add_argument("--rep-ms", type=float, default=100.0, help="do_bench rep (CUDA) / time budget per row (CPU)")
    p.add_argument("--out-dir", default=DEFAULT_OUT, help="where the JSON, markdown and plots go")
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
        compile=cuda if args.compile is None else args.compile,
        compile_backend=args.compile_backend,
        fasttx_backend=args.fasttx_backend,
        warmup_ms=args.warmup_ms,
        rep_ms=args.rep_ms,
        rounds=1 if args.smoke else 5,
        max_seconds_per_row=0.0 if args.smoke else 0.25,
        verbose=not args.quiet,
    )


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
    rows = result["rows"]
    print(f"\n{len(rows)} rows in {time.perf_counter() - t0:.1f} s "
          f"({sum(r['status'] == 'ok' for r in rows)} ok, {sum(r['status'] == 'skipped' for r in rows)} "
          f"skipped, {sum(r['status'] == 'error' for r in rows)} errors)")
    path = result["environment"]["fasttx_path"]
    print(f"fasttx ({path} path) speedup over each suite's baseline, geometric mean of medians "
          "(of minima):")
    fastest = harness.summary(rows, key="speedup_min")
    for op, v in harness.summary(rows).items():
        base = next((s.baseline for s in result["suites"] if s.name == op), "?")
        vm = fastest[op]
        print(f"  {op:<24} {'-' if v is None else f'{v:.2f}x'} ({'-' if vm is None else f'{vm:.2f}x'}) "
              f"vs {base}")
    for kind, p in result["paths"].items():
        print(f"{kind}: {p}")
    kinds = {p.name: p.kind for s in result["suites"] for p in s.providers}
    errors = [r for r in rows if r["status"] == "error" and kinds.get(r["provider"]) != "peer"]
    for r in errors:
        print(f"ERROR {r['op']} {r['case']} {r['dtype']} {r['mode']} {r['provider']}: {r['reason']}",
              file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
