"""apply_fasttx keeps transformers' contracts: output_attentions returns eager's weights (also
under generate, GPT-2 and BERT included), an explicitly chosen attention implementation is kept
(attention=False keeps the attention wholly), logits come back in evaluation; and recognition by
behaviour: a module whose forward no fasttx form reproduces is left and named once."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", minversion="5.0")

from fasttx.integrations.huggingface import apply_fasttx, fasttx_report  # noqa: E402
from fasttx.integrations.huggingface import modules as M  # noqa: E402
from utils import assert_generate_attentions_match  # noqa: E402

VOCAB = 61
LOGGER = "fasttx.integrations.huggingface"


def _llama(**kw):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, **kw)
    return transformers.LlamaForCausalLM, cfg


def _gpt2():
    return transformers.GPT2LMHeadModel, transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def _bert():
    return transformers.BertForMaskedLM, transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


KINDS = {"llama": _llama, "gpt2": _gpt2, "bert": _bert}


def _pair(kind, **apply_kw):
    cls, cfg = KINDS[kind]()
    torch.manual_seed(0)
    ref = cls(copy.deepcopy(cfg)).eval()
    ours = cls(copy.deepcopy(cfg)).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, apply_fasttx(ours, **apply_kw)


def _ids(B=2, L=7):
    return torch.randint(3, VOCAB, (B, L), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", list(KINDS))
def test_output_attentions_equal_eager(kind):
    ref, ours = _pair(kind)
    assert ours.config._attn_implementation == "fasttx"
    ref.set_attn_implementation("eager")
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    out_ref = ref(input_ids=ids, attention_mask=mask, output_attentions=True)
    out = ours(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert out.attentions is not None and len(out.attentions) == len(out_ref.attentions) == 2
    for a, r in zip(out.attentions, out_ref.attentions):
        torch.testing.assert_close(a, r, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.logits, out_ref.logits, atol=1e-5, rtol=1e-5)
    assert ours.config._attn_implementation == "fasttx"  # for that call only
    # the config flag set before patching (after patching: tests/test_hf_output_attentions.py)
    cls, cfg = KINDS[kind]()
    model = cls._from_config(cfg, attn_implementation="eager")
    model.config.output_attentions = True
    apply_fasttx(model, attention=True)
    assert len(model(input_ids=ids).attentions) == 2


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generate_output_attentions(kind):
    ref, ours = _pair(kind)
    ref.set_attn_implementation("eager")
    assert_generate_attentions_match(ref, ours, _ids(1, 5))


def test_explicit_attention_choice_is_kept_and_attention_false_keeps_it_wholly(caplog):
    cls, cfg = _llama()
    model = cls._from_config(copy.deepcopy(cfg), attn_implementation="eager")  # chosen explicitly (llama supports sdpa)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        apply_fasttx(model)
    assert model.config._attn_implementation == "eager"
    assert "chosen explicitly" in caplog.text
    assert model.model.layers[0].self_attn.__dict__.get("forward") is not None  # rotary still swapped
    assert apply_fasttx(model, attention=True).config._attn_implementation == "fasttx"

    model = cls(copy.deepcopy(cfg))  # sdpa, transformers' own choice
    apply_fasttx(model, attention=False)
    assert model.config._attn_implementation == "sdpa"
    assert "forward" not in model.model.layers[0].self_attn.__dict__  # attention modules untouched
    assert fasttx_report(model)["left"]["attention"].startswith("apply_fasttx(attention=False)")
    assert "forward" in model.model.layers[0].mlp.__dict__  # the rest is patched
    with pytest.raises(ValueError, match="attention must be"):
        apply_fasttx(model, attention="sdpa")


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_logits_skipped_only_while_training_with_grad(kind):
    ref, ours = _pair(kind)
    ids = _ids()
    out_ref = ref(input_ids=ids, labels=ids)
    for ctx, train in ((torch.enable_grad, False), (torch.no_grad, True), (torch.no_grad, False)):
        ours.train(train)
        with ctx():
            out = ours(input_ids=ids, labels=ids)
        assert out.logits is not None, (ctx, train)
        torch.testing.assert_close(out.logits, out_ref.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.loss, out_ref.loss, atol=1e-5, rtol=1e-5)
    ours.train()
    out = ours(input_ids=ids, labels=ids)
    assert out.logits is None  # training, labels, grad on: the fused loss
    torch.testing.assert_close(out.loss, out_ref.loss, atol=1e-5, rtol=1e-5)


class _OddNorm(nn.Module):
    """Looks like an RMSNorm (a 1-D weight, an eps, one input) but computes something else."""

    def __init__(self, hidden, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.variance_epsilon = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * self.weight + 0.5


def test_a_module_that_no_form_reproduces_is_left_and_named_once(caplog):
    cls, cfg = _llama()
    torch.manual_seed(0)
    ref = cls(copy.deepcopy(cfg))
    ref.model.norm = _OddNorm(32)
    ours = copy.deepcopy(ref)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        apply_fasttx(ours)
    assert "forward" not in ours.model.norm.__dict__
    assert "_OddNorm" in fasttx_report(ours)["left"]
    assert caplog.text.count("apply_fasttx:") == 1 and caplog.text.count("_OddNorm") == 1
    ids = _ids()
    torch.testing.assert_close(ours(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("act, kind", [("gelu", "gelu"), ("gelu_pytorch_tanh", "gelu_tanh"), ("gelu_new", "gelu_tanh"),
                                       ("silu", "silu")])
def test_gated_mlp_activation_recognised_by_behaviour(act, kind):
    cls, cfg = _llama(hidden_act=act)
    model = apply_fasttx(cls(cfg))
    mlp = model.model.layers[0].mlp
    assert mlp.__dict__["forward"].__func__ is M.gated_mlp_split
    assert mlp.__dict__["_fasttx_glu"] == kind


def test_bf16_model_probed_in_its_dtype():
    # Llama's and OLMo 2's RMSNorm differ only in where the cast happens: the bf16 probe tells them apart.
    cls, cfg = _llama()
    model = apply_fasttx(cls(cfg).to(torch.bfloat16))
    assert model.model.norm.__dict__["forward"].__func__ is M.rms_llama
    cfg = transformers.Olmo2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    model = apply_fasttx(transformers.Olmo2ForCausalLM(cfg).to(torch.bfloat16))
    assert model.model.norm.__dict__["forward"].__func__ is M.rms_fp32_weight


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_causal_lm_gets_the_logits_free_loss(dtype):
    # transformers' loss is fp32 cross-entropy of the head's 16-bit logits; the fused loss must give
    # that (it returned the loss rounded to 16 bits, the probe refused it, and 16-bit training
    # silently kept the logits)
    cls, cfg = _llama()
    torch.manual_seed(0)
    ref = cls(copy.deepcopy(cfg)).to(dtype)
    ours = copy.deepcopy(ref)
    apply_fasttx(ours)
    assert any(s.startswith("causal-LM loss") for s in fasttx_report(ours)["swapped"])
    ids = _ids(L=16)
    ref.train()
    ours.train()
    out_ref, out = ref(input_ids=ids, labels=ids), ours(input_ids=ids, labels=ids)
    assert out.logits is None and out.loss.dtype == out_ref.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, out_ref.loss, atol=2e-4, rtol=2e-4)


def test_falcon_alibi_through_the_patched_attention():
    # Falcon with ALiBi hands its bias to the attention function inside the float mask: fasttx's
    # attention takes it on the masked (torch) path; loss, gradients, eval logits, generate exact.
    import hf_tiny as H

    cfg = H.tiny_config("falcon")
    cfg.alibi = True
    torch.manual_seed(0)
    ref = transformers.FalconForCausalLM(copy.deepcopy(cfg))
    ours = copy.deepcopy(ref)
    expected = H.measure(ref, "causal-lm")
    apply_fasttx(ours)
    assert ours.config._attn_implementation == "fasttx"
    assert H.compare(expected, H.measure(ours, "causal-lm")) == []


@pytest.mark.parametrize("model_type", ["gpt_neox", "phi", "llama"])
def test_second_apply_keeps_every_swap(model_type):
    import hf_tiny as H

    (task, cls), = [(t, c) for mt, t, c in H.model_types() if mt == model_type]
    _, model = H.build_pair(model_type, task, cls)
    first = fasttx_report(apply_fasttx(model))
    forwards = {id(m): m.__dict__.get("forward") for m in model.modules()}
    assert fasttx_report(apply_fasttx(model)) == first
    assert {id(m): m.__dict__.get("forward") for m in model.modules()}.keys() == forwards.keys()
    assert any("rotary" in piece for piece in first["swapped"]), first


def test_leaf_probes_run_once_per_class(monkeypatch):
    # Norm and MLP probes are cached per class (and attribute signature, dtype): a deeper model
    # runs no more of them than a shallower one.
    from fasttx.integrations.huggingface import recognition as R

    counts = []
    for layers in (1, 4):
        R._VERDICTS.clear()
        calls = []
        real = R._randomized
        monkeypatch.setattr(R, "_randomized", lambda m, dtype=None: calls.append(type(m).__name__) or real(m, dtype))
        cls, cfg = _llama()
        cfg.num_hidden_layers = layers
        apply_fasttx(cls(cfg))
        monkeypatch.setattr(R, "_randomized", real)
        counts.append(sorted(calls))
    assert counts[0] == counts[1] and "LlamaRMSNorm" in counts[0] and "LlamaMLP" in counts[0]


def test_deepseek_interleaved_rotary_recognised_at_its_function():
    # MLA's module-level rotary form does not apply (its head dim is not the rotary dim), so the
    # modeling file's apply_rotary_pos_emb_interleave is probed and swapped for fasttx's rotary on
    # the de-interleaved pairs; every other form raised or differed there.
    import hf_tiny as H

    ref, ours = H.build_pair("deepseek_v3", "causal-lm", "DeepseekV3ForCausalLM")
    expected = H.measure(ref, "causal-lm")
    apply_fasttx(ours)
    report = fasttx_report(ours)
    assert "DeepseekV3Attention (rotary(deinterleaved) in apply_rotary_pos_emb_interleave)" in report["swapped"]
    assert not any(k.endswith(" rotary") for k in report["left"]), report["left"]
    assert H.compare(expected, H.measure(ours, "causal-lm")) == []
