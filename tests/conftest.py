"""Test harness. On a machine without CUDA the Triton kernels run through the Triton interpreter,
which has to be switched on before triton is first imported, so this happens at the very top."""
import importlib.util
import os
import sys
import tempfile

# A fresh inductor cache per test run: torch's on-disk FX graph cache (/tmp/torchinductor_<user>)
# was seen to replay code compiled against an older fake (shape) implementation of a fasttx custom
# op, failing an output-size assert; the tests must compile what the tree holds now.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="fasttx-inductor-"))

import torch  # noqa: E402

# Test shapes are small: one thread per test process avoids OpenMP threads spinning against each
# other on a shared CPU and across the `-n` pytest workers. The same for the processes tests start
# (README snippets, examples, probes, torchrun ranks): with two workers busy, a 2-thread child spun
# for minutes (the GPT README snippet, 10 s alone, passed its 300 s limit).
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"
    if importlib.util.find_spec("triton") is not None:
        # fp32 -> bf16 rounds to nearest even in the interpreter as on a GPU (tests/_interpreter_bf16.py)
        import _interpreter_bf16

        _interpreter_bf16.install()

import pytest  # noqa: E402

import fasttx  # noqa: E402
from fasttx._backend import triton_available  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"


def pytest_collection_modifyitems(config, items):
    if ON_GPU:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (GPU-only shape or feature)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    """Run a test once per path; the Triton path runs under the interpreter on CPU."""
    if request.param == "triton" and not triton_available():
        pytest.skip("triton is not installed on this platform")
    with fasttx.use_backend(request.param):
        yield request.param


@pytest.fixture
def bounds_check():
    """Every Triton load/store of the test checked against the tensors of its launch (tests/_bounds.py):
    the test fails on an out-of-bounds access, or when it launched no kernel. Interpreter only: on a
    GPU it yields None and checks nothing (compute-sanitizer does, in make gpu-check)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield None
        return
    import _bounds

    yield from _bounds.bounds_check_fixture()


@pytest.fixture(autouse=True)
def _restore_backend():
    before = fasttx.get_backend()
    yield
    fasttx.use_backend(before)
