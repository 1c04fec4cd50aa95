"""fasttx.integrations.huggingface: apply_fasttx on tiny random BERT and GPT-2 models.

Patched vs unpatched (transformers' own SDPA path) on padded batches, forward and every parameter
gradient, on both fasttx backends (the Triton one runs the interpreter on CPU). Models are built from
configs: nothing is downloaded.
"""
from __future__ import annotations

import copy
import logging

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", minversion="4.48",
    reason="the HuggingFace integration needs transformers>=4.48 (the `hf` extra)",
)

import fasttx  # noqa: E402
import fasttx.nn as fnn  # noqa: E402
from fasttx.integrations.huggingface import apply_fasttx, fasttx_attention_forward  # noqa: E402

from utils import TOL  # noqa: E402

VOCAB, SEQ = 97, 7


def _bert_config(**kw):
    cfg = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=48, max_position_embeddings=32, num_labels=3, pad_token_id=0,
    )
    cfg.update(kw)
    return transformers.BertConfig(**cfg)


def _gpt2_config(**kw):
    # scale_attn_by_inverse_layer_idx: layer i scales by hd**-0.5 / (i + 1), so a `scaling` that is
    # not passed through (hd**-0.5 everywhere) shows up in layer 1.
    cfg = dict(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32, n_inner=48,
        scale_attn_by_inverse_layer_idx=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    cfg.update(kw)
    return transformers.GPT2Config(**cfg)


def _pair(model_cls, config, device):
    """(unpatched, patched) with identical weights; each has its own config object."""
    torch.manual_seed(0)
    ref = model_cls(copy.deepcopy(config)).to(device).eval()
    ours = model_cls(copy.deepcopy(config)).to(device).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, apply_fasttx(ours)


def _batch(device, padding="right"):
    """input_ids (2, SEQ) and an attention_mask with one unpadded row and one padded one.
    (Small: under the Triton interpreter every row and head is a program run one after another.)"""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, SEQ), generator=g)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    if padding == "right":
        mask[1, 3:] = 0
    else:  # left padding, as for batched generation
        mask[1, :4] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids.to(device), mask.to(device)


def _assert_close(actual, expected, what):
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _assert_grads_match(ref, ours):
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    for name, p in ours.named_parameters():
        if ref_grads[name] is None:
            assert p.grad is None, name
            continue
        _assert_close(p.grad, ref_grads[name], f"grad of {name}")


# ----------------------------------------------------------------------------------------------
# Logits and gradients, patched vs unpatched
# ----------------------------------------------------------------------------------------------
def test_bert_padded_logits_and_grads_match(backend, device):
    ref, ours = _pair(transformers.BertForSequenceClassification, _bert_config(), device)
    ids, mask = _batch(device)
    labels = torch.tensor([0, 2], device=device)
    out_ref = ref(input_ids=ids, attention_mask=mask, labels=labels)
    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    # The test sees padding: without the mask the padded rows' logits change.
    assert not torch.allclose(ref(input_ids=ids).logits[1:], out_ref.logits[1:], atol=1e-4)
    _assert_close(out.logits, out_ref.logits, "logits")
    out_ref.loss.backward()
    out.loss.backward()
    _assert_grads_match(ref, ours)


@pytest.mark.parametrize("padding", ["left", None])  # right padding: the BERT test
def test_gpt2_logits_and_grads_match(backend, device, padding):
    ref, ours = _pair(transformers.GPT2LMHeadModel, _gpt2_config(), device)
    ids, mask = _batch(device, padding or "left")
    if padding is None:  # no mask at all: the causal flag alone must mask the future
        mask = None
    out_ref = ref(input_ids=ids, attention_mask=mask)
    out = ours(input_ids=ids, attention_mask=mask)
    # Compare at real tokens only: a left-padded row's leading pad queries see no key at all, and
    # what a fully masked row yields is the attention op's own convention, not the integration's.
    keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    _assert_close(out.logits[keep], out_ref.logits[keep], "logits")
    # Loss over real tokens, so the gradients carry no contribution from pad positions either.
    target = torch.randint(0, VOCAB, ids.shape, generator=torch.Generator().manual_seed(2)).to(device)

    def loss_of(logits):
        return torch.nn.functional.cross_entropy(logits[keep], target[keep])

    loss_of(out_ref.logits).backward()
    loss_of(out.logits).backward()
    _assert_grads_match(ref, ours)


def test_gpt2_causal_mask_is_honoured(device):
    # A change to the last token must not move any earlier position's logits.
    _, ours = _pair(transformers.GPT2LMHeadModel, _gpt2_config(), device)
    ids, _ = _batch(device)
    ids2 = ids.clone()
    ids2[:, -1] = (ids2[:, -1] + 1) % VOCAB
    a, b = ours(input_ids=ids).logits, ours(input_ids=ids2).logits
    torch.testing.assert_close(a[:, :-1], b[:, :-1])
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_gpt2_generate_matches(device):
    # Cached decoding: one query against a growing key/value cache, and a left-padded prompt.
    ref, ours = _pair(transformers.GPT2LMHeadModel, _gpt2_config(), device)
    ids, mask = _batch(device, "left")
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(ours.generate(ids, **kw), ref.generate(ids, **kw), rtol=0, atol=0)


def test_output_attentions_match_eager(device):
    torch.manual_seed(0)
    eager_cfg = _bert_config()
    eager_cfg._attn_implementation = "eager"  # transformers' explicit softmax(QK^T)V path
    eager = transformers.BertModel(eager_cfg, add_pooling_layer=False).to(device).eval()
    assert eager.config._attn_implementation == "eager"
    ours = transformers.BertModel(_bert_config(), add_pooling_layer=False).to(device).eval()
    ours.load_state_dict(eager.state_dict())
    apply_fasttx(ours)
    ids, mask = _batch(device)
    a = eager(input_ids=ids, attention_mask=mask, output_attentions=True)
    b = ours(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert len(b.attentions) == 2
    for wa, wb in zip(a.attentions, b.attentions):
        assert wb is not None and wb.shape == (2, 2, SEQ, SEQ)
        _assert_close(wb, wa, "attention probabilities")
    _assert_close(b.last_hidden_state, a.last_hidden_state, "hidden states")


# ----------------------------------------------------------------------------------------------
# What apply_fasttx changes, and what it must leave alone
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_patch_swaps_modules_keeps_state_and_is_idempotent(kind):
    model_cls, cfg = (
        (transformers.BertForSequenceClassification, _bert_config())
        if kind == "bert" else (transformers.GPT2LMHeadModel, _gpt2_config())
    )
    model = model_cls(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n: p for n, p in model.named_parameters()}
    assert apply_fasttx(model) is model
    assert model.config._attn_implementation == "fasttx"

    kinds = {type(m) for m in model.modules()}
    assert fnn.LayerNorm in kinds and fnn.Dropout in kinds and fnn.GELU in kinds
    assert not kinds & {torch.nn.LayerNorm, torch.nn.Dropout, torch.nn.GELU}
    gelus = [m for m in model.modules() if isinstance(m, fnn.GELU)]
    # BERT's "gelu" is the exact erf form; GPT-2's "gelu_new" (NewGELUActivation) is the tanh form.
    assert {m.approximate for m in gelus} == {"none" if kind == "bert" else "tanh"}
    for m in model.modules():
        if isinstance(m, fnn.Dropout):
            assert m.p == 0.1

    after = model.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert torch.equal(after[k], before[k]), k
    # The same Parameter objects: optimizers built before patching keep working, ties survive.
    assert all(p is params[n] for n, p in model.named_parameters())
    if kind == "gpt2":
        assert model.lm_head.weight is model.transformer.wte.weight

    modules = list(model.modules())
    apply_fasttx(model)
    assert list(model.modules()) == modules  # idempotent: nothing swapped twice

    # Instance patching only: torch.nn and a fresh model are untouched.
    # (`cfg` itself is now the patched model's config, which says "fasttx": build a new one.)
    fresh = model_cls(_bert_config() if kind == "bert" else _gpt2_config())
    fresh_kinds = {type(m) for m in fresh.modules()}
    assert torch.nn.LayerNorm in fresh_kinds and fnn.LayerNorm not in fresh_kinds
    assert fresh.config._attn_implementation != "fasttx"
    assert torch.nn.LayerNorm.forward is not fnn.LayerNorm.forward


@pytest.mark.parametrize(
    "act, approximate",
    [
        ("gelu", "none"),               # GELUActivation
        ("gelu_python", "none"),        # GELUActivation(use_gelu_python=True)
        ("gelu_new", "tanh"),           # NewGELUActivation
        ("gelu_pytorch_tanh", "tanh"),  # GELUTanh
        ("gelu_fast", "tanh"),          # FastGELUActivation
        ("gelu_accurate", "tanh"),      # AccurateGELUActivation
        ("quick_gelu", None),           # x * sigmoid(1.702 x): no fasttx equivalent
        ("gelu_10", None),              # clipped GELU: no fasttx equivalent
        ("relu", None),                 # nothing to fuse: left to torch
    ],
)
def test_activation_mapping(act, approximate, caplog):
    model = transformers.BertModel(_bert_config(hidden_act=act), add_pooling_layer=False)
    original = model.encoder.layer[0].intermediate.intermediate_act_fn
    with caplog.at_level(logging.WARNING, logger="fasttx.integrations.huggingface"):
        apply_fasttx(model)
    patched = model.encoder.layer[0].intermediate.intermediate_act_fn
    if approximate is None:
        assert patched is original
        if act != "relu":
            assert type(original).__name__ in caplog.text  # said, not silent
    else:
        assert type(patched) is fnn.GELU and patched.approximate == approximate
        x = torch.linspace(-6, 6, 1001)
        _assert_close(patched(x), original(x), f"{act} activation")


def test_from_pretrained_roundtrip(tmp_path, device):
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(_bert_config()).to(device).eval()
    ids, mask = _batch(device)
    expected = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path / "plain")

    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "plain")
    keys = list(loaded.state_dict())
    loaded = apply_fasttx(loaded.to(device).eval())
    assert loaded.config._attn_implementation == "fasttx"
    assert list(loaded.state_dict()) == keys
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    _assert_close(loaded(input_ids=ids, attention_mask=mask).logits, expected, "logits")

    # A patched model saves as an ordinary one: the same tensors, and no "fasttx" in its config
    # (loading must not need fasttx).
    loaded.save_pretrained(tmp_path / "patched")
    again = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "patched")
    assert again.config._attn_implementation != "fasttx"
    assert "fasttx" not in (tmp_path / "patched" / "config.json").read_text()
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k].to(v.device), v), k


def test_rejects_non_transformers_model():
    with pytest.raises(TypeError, match="expects a transformers PreTrainedModel"):
        apply_fasttx(torch.nn.Sequential(torch.nn.LayerNorm(4)))


def test_mask_function_registered():
    apply_fasttx(transformers.BertModel(_bert_config()))
    masking_utils = pytest.importorskip("transformers.masking_utils")
    # Without this entry transformers builds no mask for "fasttx" and padding would be dropped.
    assert "fasttx" in masking_utils.ALL_MASK_ATTENTION_FUNCTIONS
    assert "fasttx" in transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS


# ----------------------------------------------------------------------------------------------
# Training: dropout is live, seeded and differentiable
# ----------------------------------------------------------------------------------------------
def test_training_dropout_seeded(backend, device):
    cfg = _bert_config(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2, num_hidden_layers=1)
    _, ours = _pair(transformers.BertForSequenceClassification, cfg, device)
    ours.train()
    ids, mask = _batch(device)
    labels = torch.tensor([0, 2], device=device)

    def run(seed, backward=True):
        torch.manual_seed(seed)
        ours.zero_grad(set_to_none=True)
        out = ours(input_ids=ids, attention_mask=mask, labels=labels)
        if backward:
            out.loss.backward()
        grads = [p.grad.clone() for p in ours.parameters() if p.grad is not None]
        return out.logits.detach(), grads

    logits_a, grads_a = run(3)
    logits_b, grads_b = run(3)
    torch.testing.assert_close(logits_a, logits_b, rtol=0, atol=0)
    assert len(grads_a) == len(list(ours.parameters()))
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, rtol=0, atol=0)
    assert not torch.allclose(logits_a, run(4, backward=False)[0])


def _qkv(device, B=2, H=2, L=5, S=5, E=8):
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, H, n, E, generator=g).to(device) for n in (L, S, S))
    return q, k, v


class _Module(torch.nn.Module):
    def __init__(self, is_causal):
        super().__init__()
        self.is_causal = is_causal


def test_attention_dropout_in_training(backend, device):
    q, k, v = _qkv(device)
    module = _Module(is_causal=False).train()
    no_drop, _ = fasttx_attention_forward(module, q, k, v, None, dropout=0.0)
    torch.manual_seed(7)
    a, _ = fasttx_attention_forward(module, q, k, v, None, dropout=0.5)
    torch.manual_seed(7)
    b, _ = fasttx_attention_forward(module, q, k, v, None, dropout=0.5)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, no_drop)
    if backend == "torch":
        # The reference path is torch's SDPA, which draws the same mask from the same seed.
        torch.manual_seed(7)
        pt = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
        _assert_close(a, pt.transpose(1, 2), "attention with dropout")


# ----------------------------------------------------------------------------------------------
# The attention function's contract, called directly
# ----------------------------------------------------------------------------------------------
def _sdpa(q, k, v, **kw):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw).transpose(1, 2)


def test_attention_layout_scaling_and_masks(backend, device):
    q, k, v = _qkv(device)
    out, weights = fasttx_attention_forward(_Module(False), q, k, v, None, scaling=0.3)
    assert weights is None and out.shape == (2, 5, 2, 8) and out.is_contiguous()
    _assert_close(out, _sdpa(q, k, v, scale=0.3), "scaled")
    # is_causal from the module, or overridden by the keyword
    _assert_close(fasttx_attention_forward(_Module(True), q, k, v, None)[0],
                  _sdpa(q, k, v, is_causal=True), "causal module")
    _assert_close(fasttx_attention_forward(_Module(True), q, k, v, None, is_causal=False)[0],
                  _sdpa(q, k, v), "is_causal=False")
    # bool (True = attend) and additive float masks, broadcast over heads
    keep = torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(6)).to(device) > 0.3
    keep[..., 0] = True  # no fully masked row
    _assert_close(fasttx_attention_forward(_Module(False), q, k, v, keep)[0],
                  _sdpa(q, k, v, attn_mask=keep), "bool mask")
    bias = torch.randn(2, 1, 5, 5, generator=torch.Generator().manual_seed(8)).to(device)
    _assert_close(fasttx_attention_forward(_Module(False), q, k, v, bias)[0],
                  _sdpa(q, k, v, attn_mask=bias), "float mask")


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_attention_padding_only_mask_on_causal_module(backend, device, mask_dtype):
    # transformers < 4.53 gave causal modules a (B, 1, 1, S) padding mask and applied causality
    # itself; the causal part must then be added here.
    q, k, v = _qkv(device)
    pad = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool, device=device)
    pad = pad[:, None, None, :]  # (B, 1, 1, S)
    mask = pad if mask_dtype == torch.bool else torch.zeros(pad.shape, device=device).masked_fill(
        ~pad, torch.finfo(torch.float32).min)
    full = pad & torch.ones(5, 5, dtype=torch.bool, device=device).tril()
    _assert_close(fasttx_attention_forward(_Module(True), q, k, v, mask)[0],
                  _sdpa(q, k, v, attn_mask=full), "padding + causal")


def test_attention_head_mask(backend, device):
    q, k, v = _qkv(device)
    head_mask = torch.tensor([1.0, 0.0], device=device).view(1, 2, 1, 1)
    out, _ = fasttx_attention_forward(_Module(False), q, k, v, None, head_mask=head_mask)
    _assert_close(out, _sdpa(q, k, v) * head_mask.transpose(1, 2), "head_mask")
    with pytest.raises(ValueError, match="head_mask only as per-head multipliers"):
        fasttx_attention_forward(_Module(False), q, k, v, None, head_mask=torch.ones(1, 2, 5, 5))


def test_attention_gqa(backend, device):
    q, _, _ = _qkv(device, H=4)
    _, k, v = _qkv(device, H=2)
    out, _ = fasttx_attention_forward(_Module(True), q, k, v, None)
    _assert_close(out, _sdpa(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True), "gqa")


def test_attention_sliding_window(backend, device):
    # Mistral / Qwen2: key j visible from query i when i - window < j <= i. Without a mask (what
    # transformers passes when the window cuts nothing) a window that does cut is applied here;
    # with a mask, the mask (which transformers builds with the window in it) is used as it is.
    q, k, v = _qkv(device, L=6, S=6)
    i, j = torch.arange(6)[:, None], torch.arange(6)[None, :]
    banded = ((j <= i) & (j > i - 3)).to(device)
    out, _ = fasttx_attention_forward(_Module(True), q, k, v, None, sliding_window=3)
    _assert_close(out, _sdpa(q, k, v, attn_mask=banded), "window 3, no mask")
    assert not torch.allclose(out, _sdpa(q, k, v, is_causal=True), atol=1e-4)  # the window cut
    out, _ = fasttx_attention_forward(_Module(True), q, k, v, None, sliding_window=6)
    _assert_close(out, _sdpa(q, k, v, is_causal=True), "window past the sequence")
    # decoding: the last query of 6 positions against the cache, bottom-right aligned
    out, _ = fasttx_attention_forward(_Module(True), q[:, :, -1:], k, v, None, sliding_window=3)
    _assert_close(out, _sdpa(q[:, :, -1:], k, v, attn_mask=banded[-1:]), "window, one query")


@pytest.mark.parametrize("name", ["position_bias", "cache"])  # s_aux (sinks): tests/test_hf_attention_sinks_mla.py
def test_attention_unsupported_arguments_go_to_eager_or_raise(name):
    # Arguments fasttx's attention does not implement run the module's own eager attention (its
    # modeling file's eager_attention_forward, with one warning); without one, a clear error.
    q, k, v = _qkv("cpu")
    with pytest.raises(NotImplementedError, match="no eager attention to fall back to"):
        fasttx_attention_forward(_Module(False), q, k, v, None, **{name: torch.zeros(q.shape[1])})
    with pytest.raises(ValueError, match=r"\(batch, heads, seq, head_dim\)"):
        fasttx_attention_forward(_Module(False), q[0], k[0], v[0], None)


@pytest.mark.parametrize("masked", [False, True])
def test_attention_softcap_and_window(backend, device, masked):
    # Gemma 2/3: scores softcap * tanh(s / softcap) before the mask; without a mask (the kernel's
    # softcap and window flags) and with one (the torch path), against the formula.
    q, k, v = _qkv(device)
    L = q.shape[-2]
    keep = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    keep &= ~torch.ones(L, L, dtype=torch.bool, device=device).tril(-3)  # window 3
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = torch.tanh(s / 2.0) * 2.0
    ref = torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ v
    mask = keep[None, None].expand(q.shape[0], 1, L, L) if masked else None
    out, _ = fasttx_attention_forward(_Module(True), q, k, v, mask, softcap=2.0, sliding_window=3)
    _assert_close(out, ref.transpose(1, 2), "softcap + window")


# ----------------------------------------------------------------------------------------------
# Low precision on a GPU: the flash-attention 2x rule against an fp64 copy of the model
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_low_precision_2x_rule_gpu(kind, dtype):
    from utils import assert_2x_rule

    model_cls, cfg = (
        (transformers.BertForSequenceClassification, _bert_config(hidden_size=64, num_attention_heads=2))
        if kind == "bert" else (transformers.GPT2LMHeadModel, _gpt2_config(n_embd=64))
    )
    ref, ours = _pair(model_cls, cfg, "cuda")
    ids, mask = _batch("cuda")
    exact = copy.deepcopy(ref).double()
    with torch.no_grad():
        truth = exact(input_ids=ids, attention_mask=mask).logits
        pt = ref.to(dtype)(input_ids=ids, attention_mask=mask).logits
        with fasttx.use_backend("auto"):
            got = ours.to(dtype)(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    if kind == "bert":
        keep = slice(None)
    assert_2x_rule(got[keep], pt[keep], truth[keep], name="logits")
