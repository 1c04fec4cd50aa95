"""fasttx's benchmark suite: `python -m bench --help` (or `make bench`).

bench/harness.py times, measures memory and writes results; each bench/bench_<op>.py only defines
its setups (cases, providers, byte/FLOP formulas) through a `suites(cfg)` function.
"""
