"""fasttx's benchmark suite: `python -m bench --help` (or `make bench`; `make gpu-check` on a GPU).

Each bench/bench_<op>.py only defines its setups (cases, providers, byte/FLOP formulas) through a
`suites(cfg)` function and is found by its file name; spec.py holds what they describe, timing.py
times and measures memory, report.py writes the results, harness.py discovers and runs.
"""
