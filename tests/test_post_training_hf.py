"""fasttx.integrations.huggingface.hidden_states_and_head / causal_lm_log_probs: the final hidden
states and the LM head of a (patched or not) causal LM, and per-token log-probs from them, equal
to the model's own logits' log_softmax, gradients included."""
import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="4.48", reason="needs the `hf` extra")

from fasttx.integrations.huggingface import apply_fasttx, causal_lm_log_probs, hidden_states_and_head  # noqa: E402


def _model(patch: bool, **extra):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, **extra)
    model = transformers.LlamaForCausalLM(cfg)
    return apply_fasttx(model) if patch else model


@pytest.mark.parametrize("patch", [False, True])
def test_log_probs_equal_the_models_logits_path(patch):
    model = _model(patch)
    ids = torch.randint(0, 97, (2, 9))
    attn = torch.ones_like(ids)
    comp = torch.zeros_like(ids)
    comp[:, 4:] = 1
    comp[1, -1] = 0
    hidden, head = hidden_states_and_head(model, input_ids=ids, attention_mask=attn)
    assert hidden.shape == (2, 9, 32) and head is model.lm_head and "forward" not in head.__dict__
    lp, ent = causal_lm_log_probs(model, ids, attn, comp, temperature=0.9, return_entropy=True)
    (lp.sum() + ent.sum()).backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float() / 0.9
    logp = torch.log_softmax(logits, -1)
    m = comp[:, 1:].bool()
    want = torch.where(m, logp.gather(-1, ids[:, 1:, None])[..., 0], 0.0)
    want_ent = torch.where(m, -(logp.exp() * logp).sum(-1), 0.0)
    torch.testing.assert_close(lp, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, want_ent, atol=1e-5, rtol=1e-5)
    (want.sum() + want_ent.sum()).backward()
    for a, p in zip(ours, model.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-5, rtol=1e-5)


def test_models_whose_logits_are_not_the_head_of_the_hidden_states_raise():
    model = _model(False)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        hidden_states_and_head(model, input_ids=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        hidden_states_and_head(_model(False), input_ids=torch.zeros(1, 3, dtype=torch.long),
                               labels=torch.zeros(1, 3, dtype=torch.long))
