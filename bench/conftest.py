"""pytest setup for bench/ (the CPU smoke and the pytest-benchmark entry). As in tests/conftest.py,
the Triton interpreter has to be switched on before triton is first imported when there is no GPU,
so that `pytest bench tests` works in either order."""
import os
import sys

import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before bench/conftest.py could set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (GPU-only benchmark check)")
    for item in items:
        if "gpu" in item.keywords and item.fspath.dirname == os.path.dirname(__file__):
            item.add_marker(skip_gpu)
