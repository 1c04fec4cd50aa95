"""Every ```python block of README.md runs as written (in a fresh interpreter, from the repository
root, on torch's CPU path) and prints something."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_blocks():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    return blocks


BLOCKS = _python_blocks()


def test_the_readme_has_python_snippets():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_snippet_runs_as_written(index):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # as a user runs it
    env["FASTTX_BACKEND"] = "auto"
    r = subprocess.run([sys.executable, "-c", BLOCKS[index]], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, f"README snippet {index} failed:\n{BLOCKS[index]}\n{r.stderr[-3000:]}"
    assert r.stdout.strip(), f"README snippet {index} prints nothing:\n{BLOCKS[index]}"
