"""Tiny transformers models for the coverage test: every causal-LM, masked-LM and
sequence-classification model type of the installed transformers, built from its default config
with the sizes shrunk (no downloads), and the patched-vs-unpatched comparison."""
from __future__ import annotations

import copy
import logging
import re
import signal
import threading

import torch
import transformers
from transformers.models.auto import modeling_auto as MA

from fasttx.integrations.huggingface import apply_fasttx, fasttx_report

VOCAB, B, L = 99, 2, 8
TASKS = (("causal-lm", MA.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), ("masked-lm", MA.MODEL_FOR_MASKED_LM_MAPPING_NAMES),
         ("seq-cls", MA.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES))

# config attribute -> tiny value (only attributes the default config has are set)
SIZES = {
    32: ("d_latents", "hidden_size", "d_model", "n_embd", "embed_dim", "n_embed", "dim", "word_embed_proj_dim",
         "embedding_size", "projection_dim"),
    2: ("linear_num_key_heads", "linear_num_value_heads", "mamba_n_groups", "n_groups",
        "num_hidden_layers", "n_layer", "n_layers", "num_layers", "num_decoder_layers", "num_encoder_layers",
        "encoder_layers", "decoder_layers", "num_key_value_heads", "num_kv_heads", "n_kv_heads",
        "num_experts_per_tok", "moe_topk", "n_group", "topk_group"),
    4: ("num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads",
        "decoder_attention_heads", "mamba_n_heads", "rotary_dim", "num_experts", "num_local_experts",
        "n_routed_experts"),
    48: ("intermediate_size", "ffn_dim", "d_ff", "encoder_ffn_dim", "decoder_ffn_dim", "moe_intermediate_size",
         "shared_expert_intermediate_size", "ffn_hidden_size"),
    8: ("num_latents", "head_dim", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "attention_head_size",
        "kv_channels"),
    16: ("kv_lora_rank", "q_lora_rank", "mamba_d_state", "state_size", "ssm_state_size", "d_state", "mamba_d_head",
         "linear_key_head_dim", "linear_value_head_dim", "time_step_rank"),
    64: ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "mamba_d_ssm"),
    VOCAB: ("vocab_size",),
    1: ("first_k_dense_replace",),  # DeepSeek: the second layer has the experts
}
ZERO = re.compile(r"drop")  # every dropout probability 0: training runs are deterministic


# Other widths (vision towers, state spaces, embedding sizes under other names): any int > 64 whose
# name says it is a size, except the ones that are lengths, counts of positions or ids.
_WIDTH = re.compile(r"(size|dim|hidden|channels|width|d_inner|d_ff)")
_NOT_WIDTH = re.compile(r"(vocab|position|token|max|window|chunk|seq|length|bucket|period|codebook|image|patch|"
                        r"num_|sample|frame|pixel|batch|rate|freq|mel)")


def _overrides(config_cls, generic: bool = True) -> dict:
    default = config_cls()
    d = default.to_dict()
    out = {}
    if generic:
        for n, v in d.items():
            if not isinstance(v, int) or isinstance(v, bool):
                continue
            if v > 64 and _WIDTH.search(n) and not _NOT_WIDTH.search(n):
                out[n] = 48 if "intermediate" in n or "ffn" in n else 32
            elif v > 1000 and "vocab" in n:  # hashed or auxiliary vocabularies
                out[n] = VOCAB
    for value, names in SIZES.items():
        for n in names:
            if n in d and isinstance(d[n], int) and not isinstance(d[n], bool) and d[n] > 0:
                out[n] = min(value, d[n]) if n in ("num_key_value_heads", "num_kv_heads", "n_kv_heads") else value
    for n, v in d.items():
        if ZERO.search(n) and isinstance(v, float):
            out[n] = 0.0
        if n.endswith("token_id") and isinstance(v, int) and v >= VOCAB:
            out[n] = 2
    if "pad_token_id" in d and d["pad_token_id"] is None:
        out["pad_token_id"] = 0
    if "qk_rope_head_dim" in d:
        out.pop("head_dim", None)  # MLA: the head dims are the rope and nope parts
        out.pop("qk_head_dim", None)
    for kv, heads in (("num_key_value_heads", "num_attention_heads"), ("num_kv_heads", "num_heads")):
        if kv in out and heads in out and d.get(kv) == d.get(heads):
            out[kv] = out[heads]  # no grouped heads by default (MLA): keep it so
    for n in ("sliding_window",):
        if isinstance(d.get(n), int) and d[n] > 0:
            out[n] = 4  # shorter than the sequence: the windows matter
    if isinstance(d.get("layer_types"), list) and d["layer_types"]:
        # one layer of each kind the default has (in its order), at least two layers
        kinds = list(dict.fromkeys(d["layer_types"]))
        kinds += [kinds[-1]] * max(0, 2 - len(kinds))
        out["layer_types"] = kinds
        for n in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
            if n in out:
                out[n] = len(kinds)
    elif "layer_types" in d:
        out["layer_types"] = None  # recomputed from the layer count
    for sub in getattr(config_cls, "sub_configs", {}) or {}:
        sub_default = getattr(default, sub, None)  # AutoConfig entries: the class the default holds
        if sub_default is None or not hasattr(sub_default, "to_dict"):
            continue
        out[sub] = dict(_overrides(type(sub_default), generic), model_type=sub_default.model_type)
    for n in ("image_size", "patch_size"):  # vision towers: 4 x 4 patches of 8 x 8
        if isinstance(d.get(n), int) and not isinstance(d.get(n), bool):
            out[n] = 32 if n == "image_size" else 8
    return out


def tiny_config(model_type: str, generic: bool = True):
    config_cls = transformers.CONFIG_MAPPING[model_type]
    over = _overrides(config_cls, generic)
    try:
        return config_cls(**over)
    except Exception:
        over.pop("layer_types", None)
        return config_cls(**over)


def model_types():
    """[(model_type, task, class name)]: each type once, its first head of TASKS."""
    seen = {}
    for task, mapping in TASKS:
        for mt, cls in mapping.items():
            if mt not in seen and isinstance(cls, str):
                seen[mt] = (task, cls)
    return sorted((mt, t, c) for mt, (t, c) in seen.items())


def _randomize_norms(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name.lower():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + 0.75)


def build_pair(model_type, task, cls_name, generic=True):
    config = tiny_config(model_type, generic)
    if task == "seq-cls":
        config.num_labels = 3
    cls = getattr(transformers, cls_name)
    torch.manual_seed(0)
    ref = cls(copy.deepcopy(config))
    _randomize_norms(ref)
    torch.manual_seed(0)
    ours = cls(copy.deepcopy(config))
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def batch(task, vocab):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[-1, -2:] = 0  # right padding on the last row
    if task == "seq-cls":
        labels = torch.tensor([0, 2])
    else:
        labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def _close(a, b, atol=1e-5, rtol=1e-5):
    return a.shape == b.shape and bool(torch.isclose(a, b, atol=atol, rtol=rtol).all())


def measure(model, task, generate=True) -> dict:
    """Training loss and every parameter gradient, eval logits and loss, greedy generate (decoders)."""
    vocab = model.get_input_embeddings().num_embeddings
    ids, mask, labels = batch(task, vocab)
    res = {}
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    res["train loss"] = out.loss.detach()
    res["grads"] = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    keep = mask.bool() if task != "seq-cls" else slice(None)
    res["eval logits"] = None if out.logits is None else out.logits[keep]
    res["eval loss"] = out.loss
    if generate and task == "causal-lm":
        prompt = ids[:1, :5]
        with torch.no_grad():
            res["generate"] = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3,
                                             do_sample=False, pad_token_id=0)
    return res


def compare(expected: dict, actual: dict) -> list:
    """The names of the results that differ (fp32: atol = rtol = 1e-5; gradients rtol 1e-4)."""
    problems = []
    for key in ("train loss", "eval logits", "eval loss"):
        a, e = actual[key], expected[key]
        if (a is None) != (e is None) or (e is not None and not _close(a, e)):
            problems.append(key)
    bad = [n for n, e in expected["grads"].items()
           if (actual["grads"][n] is None) != (e is None) or (e is not None and not _close(actual["grads"][n], e,
                                                                                           1e-5, 1e-4))]
    if bad:
        problems.append(f"grad of {bad[0]}" + (f" and {len(bad) - 1} more" if len(bad) > 1 else ""))
    if "generate" in expected and not torch.equal(actual["generate"], expected["generate"]):
        problems.append("generate")
    return problems


BUDGET_S = 60  # per model type: a guard; a tiny model near it has a size this file does not shrink


class _OverBudget(BaseException):  # not caught by the `except Exception` around each step
    pass


def _alarm(signum, frame):
    raise _OverBudget(f"over the {BUDGET_S} s budget per model type")


def run_one(model_type, task, cls_name, generate=True) -> dict:
    """A coverage row: {type, task, class, status, swapped, left}."""
    row = {"type": model_type, "task": task, "class": cls_name, "swapped": [], "left": {}}
    logging.disable(logging.WARNING)
    timed = threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGALRM")
    if timed:
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(BUDGET_S)
    try:
        return _run_one(row, model_type, task, cls_name, generate)
    except _OverBudget as exc:
        row["status"] = f"skipped: {exc} (a size this test does not shrink)"
        return row
    finally:
        if timed:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        logging.disable(logging.NOTSET)


# Types this test does not build, and why (measured: each alone exceeds BUDGET_S on a 2-core CPU).
SLOW = {"blt": "its weight initialisation alone takes over 60 s on CPU even at these sizes"}


def _run_one(row, model_type, task, cls_name, generate):
    if model_type in SLOW:
        row["status"] = f"skipped: {SLOW[model_type]}"
        return row
    for generic in (True, False):  # the named sizes only, when shrinking every width breaks the config
        try:
            ref, ours = build_pair(model_type, task, cls_name, generic)
        except Exception as exc:
            row["status"] = f"skipped: cannot build from a tiny config ({_short(exc)})"
            continue
        try:
            expected = measure(ref, task, generate)
        except Exception as exc:
            row["status"] = f"skipped: the unpatched model fails on this test's batch ({_short(exc)})"
            continue
        break
    else:
        return row
    apply_fasttx(ours)
    rep = fasttx_report(ours)
    row["swapped"], row["left"] = rep["swapped"], rep["left"]
    try:
        problems = compare(expected, measure(ours, task, generate))
    except Exception as exc:
        problems = [f"error {_short(exc)}"]
    row["status"] = "exact" if not problems else "MISMATCH: " + ", ".join(problems)
    return row


def _short(exc) -> str:
    msg = " ".join(line.strip() for line in str(exc).splitlines())
    msg = re.sub(r"0x[0-9a-f]+", "0x..", msg)
    return f"{type(exc).__name__}: {msg}"[:160].replace("|", "/")


def table(rows) -> str:
    ok = [r for r in rows if r["status"] == "exact"]
    full = [r for r in ok if not r["left"]]
    skipped = [r for r in rows if r["status"].startswith("skipped")]
    bad = [r for r in rows if r["status"].startswith("MISMATCH")]
    lines = [
        f"{len(rows)} model types (causal LM, masked LM or sequence classification, one head each) of "
        f"transformers {transformers.__version__}: {len(ok)} exact after apply_fasttx ({len(full)} with "
        f"nothing left), {len(bad)} mismatched, {len(skipped)} not built. Generated by "
        "tests/test_hf_coverage.py (FASTTX_WRITE_COVERAGE=1 rewrites it).",
        "",
        "| model type | class | status | swapped | left (why) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        left = "; ".join(f"{k}: {v}" for k, v in r["left"].items()).replace("|", "/")
        lines.append(f"| {r['type']} | {r['class']} | {r['status']} | {', '.join(r['swapped'])} | {left} |")
    return "\n".join(lines) + "\n"
