"""output_attentions asked through the config after apply_fasttx (transformers' own setter refuses the
flag for every implementation but eager): the weights are eager's, for the top-level model, its inner
model called directly and under generate; the config validates and saves; and the call-kwarg route
gives the same weights."""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

from fasttx.integrations.huggingface import apply_fasttx  # noqa: E402
from utils import assert_generate_attentions_match  # noqa: E402

VOCAB = 61


def _llama():
    return transformers.LlamaForCausalLM, transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0), "model"


def _gpt2():
    return transformers.GPT2LMHeadModel, transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), "transformer"


def _bert():
    return transformers.BertForMaskedLM, transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), "bert"


KINDS = {"llama": _llama, "gpt2": _gpt2, "bert": _bert}


def _pair(kind):
    """(eager twin, patched model, name of the inner model) with the same weights."""
    cls, cfg, inner = KINDS[kind]()
    torch.manual_seed(0)
    ref = cls._from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    ours = cls(copy.deepcopy(cfg)).eval()
    ours.load_state_dict(ref.state_dict())
    apply_fasttx(ours)
    assert ours.config._attn_implementation == "fasttx"
    return ref, ours, inner


def _inputs():
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _same(got, want):
    assert got is not None and want is not None and len(got) == len(want) == 2
    for a, r in zip(got, want):
        assert a is not None
        torch.testing.assert_close(a, r, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", list(KINDS))
def test_config_flag_after_patching_returns_eager_weights(kind, tmp_path):
    ref, ours, inner = _pair(kind)
    x = _inputs()
    want = ref(**x, output_attentions=True)
    _same(ours(**x, output_attentions=True).attentions, want.attentions)  # the call-kwarg route

    ours.config.output_attentions = True  # transformers' setter alone raises ValueError here
    ref.config.output_attentions = True
    assert ours.config._attn_implementation == "fasttx"
    out = ours(**x)
    _same(out.attentions, want.attentions)
    torch.testing.assert_close(out.logits, want.logits, atol=1e-5, rtol=1e-5)
    _same(getattr(ours, inner)(**x).attentions, getattr(ref, inner)(**x).attentions)  # the inner model directly
    assert ours.config._attn_implementation == "fasttx"  # eager for those calls only

    ours.config.validate()  # save_pretrained runs it
    ours.save_pretrained(tmp_path)
    ours.config.output_attentions = False
    assert ours(**x).attentions is None


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_config_flag_after_patching_under_generate(kind):
    ref, ours, _ = _pair(kind)
    ours.config.output_attentions = True
    ref.config.output_attentions = True
    assert_generate_attentions_match(ref, ours, _inputs()["input_ids"][:1, :5])


def test_other_implementations_keep_transformers_rule():
    # Only "fasttx" accepts the flag: sdpa still raises transformers' own error.
    _, cfg, _ = _llama()
    model = transformers.LlamaForCausalLM(cfg)
    apply_fasttx(model)  # installs the hook
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="output_attentions"):
        model.config.output_attentions = True
