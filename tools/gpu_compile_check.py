"""Compile every fasttx kernel variant for a real GPU target, without a GPU.

The Triton interpreter (how the test suite runs kernels on CPU) never compiles: a kernel can pass
every CPU test and still fail to compile for the GPU (a 16-bit tl.dot with K < 16, a type mix the
interpreter's numpy accepts, an autotune config whose shared memory does not fit). This tool runs
the real launchers in kernels/ on small CPU tensors with a stand-in driver that reports an NVIDIA
target (default sm_90, H100/H200): every launch becomes a compile of exactly what the GPU would
compile (the launchers' GPU block sizes, and for autotuned kernels every config that survives the
kernel's own pruning, as the autotuner would benchmark them), through Triton's real
TTIR -> TTGIR -> LLVM -> PTX -> cubin pipeline (ptxas ships with triton). Nothing is launched.

    python tools/gpu_compile_check.py               # all kernels, sm_90
    python tools/gpu_compile_check.py --arch 80     # A100
    python tools/gpu_compile_check.py --quick       # a representative subset (what the test runs)

It reports each compile error and every kernel whose shared memory exceeds the target's per-block
limit, and exits 1 if there is any. Relies on Triton runtime internals (driver.set_active,
JITFunction.run, Autotuner.prune_configs), checked on triton 3.6 to 3.9 APIs; run it with
TRITON_INTERPRET unset.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter

# Shared memory per block (opt-in maximum) by compute capability.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448}


def _tile_size(config) -> int:
    size = config.num_stages or 1
    for value in config.kwargs.values():
        size *= value if isinstance(value, int) else 1
    return size


def install_compile_only_driver(arch: int, max_configs=None, on_compile=None, pruned_too=False):
    """Make every Triton launch in this process a compile for `arch`; returns (compiled, errors).
    Autotuned kernels compile every config their pruning keeps, or only the `max_configs` with the
    largest tiles (block sizes x stages: the ones that risk the shared-memory limit).
    on_compile(jit_fn, args, kwargs, kernel, role) is called after each successful compile (what
    tools/kernel_report.py reads): role "fixed" for the first config an autotuned launch's pruning
    keeps (the FASTTX_AUTOTUNE=0 choice), "autotune" for the others it keeps, "single" for a launch
    without autotuning, and "pruned" for the configs pruning drops (compiled only with pruned_too;
    their compile errors are not recorded: pruning exists to drop them)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("run with TRITON_INTERPRET unset: the interpreter never compiles")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.runtime import driver
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        driver.set_active
        Autotuner.prune_configs
    except (ImportError, AttributeError) as e:
        print(f"UNSUPPORTED: this triton lacks the runtime internals the check relies on: {e}")
        raise SystemExit(2)

    target = GPUTarget("cuda", arch, 32)
    compiled, errors = [], []

    class CompileOnlyDriver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return target

        def get_active_torch_device(self):
            import torch

            return torch.device("cpu")

    driver.set_active(CompileOnlyDriver())
    run = JITFunction.run
    role = ["single"]  # what the launch being compiled is, set by every_pruned_config

    def compile_only(self, *args, grid, warmup, **kwargs):
        meta = {k: v for k, v in kwargs.items() if not hasattr(v, "data_ptr")}
        try:
            kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
            if role[0] != "pruned":
                compiled.append((self.__name__, meta, kernel.metadata.shared))
            if on_compile is not None:
                on_compile(self, args, kwargs, kernel, role[0])
        except Exception as e:  # a compile error: record where it surfaced and its root cause
            if role[0] == "pruned":
                return
            root = e
            while root.__cause__ is not None or root.__context__ is not None:
                root = root.__cause__ or root.__context__
            where = str(e).strip().splitlines()[0] if str(e).strip() else ""
            errors.append((self.__name__, meta, f"{where} ... {type(root).__name__}: {root}"[:1500]))

    def every_pruned_config(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        configs = self.prune_configs(kwargs)
        roles = ["fixed"] + ["autotune"] * (len(configs) - 1) if len(self.configs) > 1 else ["single"]
        if max_configs is not None:
            order = sorted(range(len(configs)), key=lambda i: _tile_size(configs[i]), reverse=True)[:max_configs]
            configs, roles = [configs[i] for i in order], [roles[i] for i in order]
        if pruned_too:
            kept = {id(c) for c in self.prune_configs(kwargs)}
            dropped = [c for c in self.configs if id(c) not in kept]
            configs, roles = configs + dropped, roles + ["pruned"] * len(dropped)
        try:
            for config, role[0] in zip(configs, roles):
                self.fn.run(*args, **kwargs, **config.all_kwargs())
        finally:
            role[0] = "single"
        self.nargs = None

    JITFunction.run = compile_only
    Autotuner.run = every_pruned_config
    return compiled, errors


def launch_all(quick: bool, modules=None):
    """Call `compile_variants(quick)` of every fasttx.kernels module that defines one (or of those
    named in `modules`): each kernel file lists, next to its launchers, the launches that select
    different code (dtypes, flags, paths), so a new kernel is covered by writing that function and
    nothing here."""
    import importlib
    import pkgutil

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a bare checkout
    import fasttx.kernels

    for info in pkgutil.iter_modules(fasttx.kernels.__path__):
        if modules is not None and info.name not in modules:
            continue
        module = importlib.import_module(f"fasttx.kernels.{info.name}")
        if hasattr(module, "compile_variants"):
            module.compile_variants(quick)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (default 90)")
    parser.add_argument("--quick", action="store_true", help="a representative subset")
    parser.add_argument("--configs", type=int, default=None, metavar="N",
                        help="per autotuned launch, only the N pruned configs with the largest tiles")
    args = parser.parse_args(argv)
    compiled, errors = install_compile_only_driver(args.arch, args.configs)
    start = time.perf_counter()
    launch_all(args.quick)
    limit = SHARED_LIMIT.get(args.arch, 232448)
    too_big = [(n, m, s) for n, m, s in compiled if s > limit]
    counts = Counter(n for n, _, _ in compiled)
    print(f"sm_{args.arch}: {len(compiled)} kernel variants compiled in {time.perf_counter() - start:.0f} s "
          f"({', '.join(f'{n} {c}' for n, c in sorted(counts.items()))}); largest shared memory "
          f"{max((s for _, _, s in compiled), default=0)} of {limit} bytes")
    for name, meta, shared in too_big:
        print(f"SHARED MEMORY {name}: {shared} > {limit} bytes with {meta}")
    for name, meta, err in errors:
        print(f"COMPILE ERROR {name} with {meta}:\n  {err}")
    return 1 if errors or too_big else 0


if __name__ == "__main__":
    sys.exit(main())
