"""Coverage, generated: every causal-LM, masked-LM and sequence-classification model type of the
installed transformers, built from a tiny config (tests/hf_tiny.py, no downloads), patched by
apply_fasttx and compared with its unpatched twin (fp32: training loss and every parameter
gradient, eval logits and loss, greedy generate for decoders). The table it produces is committed
(tests/data/hf_coverage.md) and shown in README.md; the test fails when either is stale
(FASTTX_WRITE_COVERAGE=1 rewrites both). The floor families must be exact with nothing left but
the attention-kernel features named in ALLOWED_LEFT; a subset runs on the Triton path as well.
"""
from __future__ import annotations

import os
import re

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

import hf_tiny as H  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE = os.path.join(ROOT, "tests", "data", "hf_coverage.md")
README = os.path.join(ROOT, "README.md")
START, END = "<!-- hf-coverage:start -->", "<!-- hf-coverage:end -->"

FLOOR = ["llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
         "phi3", "olmo2", "granite", "glm4", "smollm3", "gpt_oss", "deepseek_v3", "gpt2", "gpt_neox", "gptj", "phi",
         "falcon", "starcoder2", "bert", "roberta", "xlm-roberta", "distilbert", "modernbert"]
# What a floor family may still leave (the attention-kernel features of issue 24's item 3, sinks
# and Ev != E, are in the kernels now and no longer excused).
ALLOWED_LEFT = ()
MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "deepseek_v3")  # experts through moe_experts
TRITON_SUBSET = ["llama", "gemma2", "gpt2", "bert", "gpt_neox"]


def test_every_model_type_exact_floor_fully_patched_and_the_table_current():
    # One test (not a module fixture shared by several): under pytest-xdist the enumeration then
    # runs once, on one worker (measured: about 50 s on a loaded 2-core machine).
    torch.manual_seed(0)
    rows = [H.run_one(mt, task, cls) for mt, task, cls in H.model_types()]
    _check_floor(rows)
    bad = [(r["type"], r["status"]) for r in rows if r["status"].startswith("MISMATCH")]
    assert not bad, f"patched models differ from transformers': {bad}"
    text = H.table(rows)
    if os.environ.get("FASTTX_WRITE_COVERAGE"):
        open(TABLE, "w", encoding="utf-8").write(text)
        readme = open(README, encoding="utf-8").read()
        readme = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda m: f"{START}\n{text}{END}", readme,
                        flags=re.S)
        open(README, "w", encoding="utf-8").write(readme)
    assert open(TABLE, encoding="utf-8").read() == text, "tests/data/hf_coverage.md is stale: FASTTX_WRITE_COVERAGE=1"
    readme = open(README, encoding="utf-8").read()
    assert f"{START}\n{text}{END}" in readme, "README.md's coverage table is stale: FASTTX_WRITE_COVERAGE=1"


def _check_floor(rows):
    by_type = {r["type"]: r for r in rows}
    for mt in FLOOR:
        if mt not in by_type:
            continue  # not in this transformers
        r = by_type[mt]
        assert r["status"] == "exact", (mt, r["status"])
        allowed = {k for k, v in r["left"].items() if any(a in v for a in ALLOWED_LEFT)}
        # the rotary of an attention module left for those reasons goes with it (MLA's own rotary)
        allowed |= {k.replace(" attention", " rotary") for k in allowed}
        extra = {k: v for k, v in r["left"].items() if k not in allowed}
        assert not extra, (mt, extra)
        assert r["swapped"], mt
        if mt in MOE:
            assert any("(moe_experts)" in piece for piece in r["swapped"]), (mt, r["swapped"])


@pytest.mark.parametrize("model_type", TRITON_SUBSET)
def test_subset_exact_on_the_triton_path(model_type):
    import fasttx

    (task, cls), = [(t, c) for mt, t, c in H.model_types() if mt == model_type]
    with fasttx.use_backend("triton"):
        row = H.run_one(model_type, task, cls, generate=False)
    assert row["status"] == "exact", row
