"""apply_fasttx on tiny random Llama, Mistral, Qwen2, Qwen3 and Gemma causal LMs, and the fused
causal-LM loss (GPT-2 too).

Patched vs unpatched (transformers' own SDPA path): logits, loss and every parameter gradient with
right and left padding on both fasttx backends (the Triton one runs the interpreter on CPU),
cached generation, gradient accumulation with `num_items_in_batch`, packed sequences. Models are
built from configs: nothing is downloaded.
"""
from __future__ import annotations

import copy
import logging

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", minversion="5.0",
    reason="the decoder-family patching copies transformers 5's attention layout",
)

from fasttx.integrations import huggingface as hf  # noqa: E402
from fasttx.integrations.huggingface import apply_fasttx  # noqa: E402

from utils import TOL  # noqa: E402

VOCAB, SEQ = 97, 9
LOGGER = "fasttx.integrations.huggingface"

# family -> (config class, causal LM class, config overrides). Mistral and Qwen2 get a window (4)
# shorter than the sequence, so the sliding-window masks matter; Qwen2 only on layer 1 (layer_types).
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),  # q_norm / k_norm on the head dim
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {}),  # (1 + weight) norms, tanh-GELU gated MLP
}


def _config(family, **kw):
    config_cls, _, extra = FAMILIES[family]
    cfg = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=32,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    cfg.update(extra)
    cfg.update(kw)
    return getattr(transformers, config_cls)(**cfg)


def _model_cls(family):
    return getattr(transformers, FAMILIES[family][1])


def _init_norm_weights(model):
    # Fresh RMSNorm weights are all ones (Gemma: zeros), which would hide a cast that drops or
    # misplaces the weight: make them random.
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (0.0 if "gemma" in type(model).__module__ else 1.0))


def _pair(model_cls, config, device, **apply_kw):
    """(unpatched, patched) with identical weights; each has its own config object."""
    torch.manual_seed(0)
    ref = model_cls(copy.deepcopy(config)).eval()
    _init_norm_weights(ref)
    ref = ref.to(device)
    ours = model_cls(copy.deepcopy(config)).to(device).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, apply_fasttx(ours, **apply_kw)


def _batch(device, padding, B=2, L=SEQ):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    if padding == "right":  # the last row padded
        mask[-1, 5:] = 0
    else:  # left padding, as for batched generation
        mask[-1, :4] = 0
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    return ids.to(device), mask.to(device), labels.to(device)


def _assert_close(actual, expected, what):
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _assert_grads_match(ref, ours):
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    for name, p in ours.named_parameters():
        assert (p.grad is None) == (ref_grads[name] is None), name
        if p.grad is not None:
            _assert_close(p.grad, ref_grads[name], f"grad of {name}")


# ----------------------------------------------------------------------------------------------
# Logits, loss and gradients, patched vs unpatched
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_decoder_logits_loss_and_grads_match(backend, device, family, padding):
    ref, ours = _pair(_model_cls(family), _config(family), device)
    ids, mask, labels = _batch(device, padding)
    keep = mask.bool()
    with torch.no_grad():  # logits: at real tokens (a left-padded row's pad queries see no key)
        _assert_close(ours(input_ids=ids, attention_mask=mask).logits[keep],
                      ref(input_ids=ids, attention_mask=mask).logits[keep], "logits")
    ref.train(), ours.train()  # the fused loss runs while training (no dropout in these configs)
    out_ref = ref(input_ids=ids, attention_mask=mask, labels=labels)
    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None  # the fused loss never built them
    _assert_close(out.loss, out_ref.loss, "loss")
    out_ref.loss.backward()
    out.loss.backward()
    _assert_grads_match(ref, ours)


def _check_generate(device, family):
    # Cached decoding (one query against a growing cache; Mistral's window then cuts the cache)
    # from a left-padded prompt.
    ref, ours = _pair(_model_cls(family), _config(family), device)
    ids, mask, _ = _batch(device, "left")
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(ours.generate(ids, **kw), ref.generate(ids, **kw), rtol=0, atol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_decoder_generate_matches(device, family):
    _check_generate(device, family)


def test_decoder_generate_matches_both_backends(backend, device):
    _check_generate(device, "mistral")


# ----------------------------------------------------------------------------------------------
# What is patched, and what is left alone
# ----------------------------------------------------------------------------------------------
def _instance_forward(module):
    bound = module.__dict__.get("forward")
    return None if bound is None else bound.__func__


@pytest.mark.parametrize("family", list(FAMILIES))
def test_decoder_patch_is_per_instance_keeps_state_and_is_idempotent(family, caplog):
    model_cls = _model_cls(family)
    model = model_cls(_config(family))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    class_forwards = {type(m): type(m).forward for m in model.modules()}
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert apply_fasttx(model) is model
    layer = model.model.layers[0]
    from fasttx.integrations.huggingface import modules as M
    norm = M.rms_gemma if family == "gemma" else M.rms_llama
    for m in (layer.input_layernorm, layer.post_attention_layernorm, model.model.norm):
        assert _instance_forward(m) is norm
    if family == "qwen3":
        assert _instance_forward(layer.self_attn.q_norm) is norm
        assert _instance_forward(layer.self_attn.k_norm) is norm
    assert _instance_forward(layer.mlp) is M.gated_mlp_split
    assert layer.mlp.__dict__["_fasttx_glu"] == ("gelu_tanh" if family == "gemma" else "silu")
    assert _instance_forward(layer.self_attn) is hf.attention.rotary_attention_forward
    assert hf.fasttx_report(model)["left"] == {}
    assert "apply_fasttx:" not in caplog.text  # nothing left unpatched, nothing to say
    assert model.config._attn_implementation == "fasttx"
    assert _instance_forward(model).__name__ == "forward"  # the fused-loss forward, under its name
    assert model.loss_function is hf.fasttx_causal_lm_loss

    after = model.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert torch.equal(after[k], before[k]), k
    assert all(p is params[n] for n, p in model.named_parameters())

    patched = {id(m): _instance_forward(m) for m in model.modules()}
    apply_fasttx(model)
    assert {id(m): _instance_forward(m) for m in model.modules()} == patched  # idempotent

    # Instance patching only: the classes and a fresh model are untouched.
    assert all(cls.forward is fwd for cls, fwd in class_forwards.items())
    fresh = model_cls(_config(family))
    assert all(_instance_forward(m) is None for m in fresh.modules())
    assert fresh.config._attn_implementation != "fasttx"
    assert fresh.loss_function is not hf.fasttx_causal_lm_loss


def test_unsupported_mlp_activation_is_left_and_said(caplog):
    model = transformers.LlamaForCausalLM(_config("llama", hidden_act="relu"))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        apply_fasttx(model)
    assert _instance_forward(model.model.layers[0].mlp) is None
    assert "LlamaMLP (activation ReLU" in caplog.text
    assert caplog.text.count("apply_fasttx:") == 1  # one warning for the model


def test_softcap_attention_runs_on_fasttx(device):
    # Gemma 2's attention logit softcap and its per-layer sliding windows run in fasttx's
    # attention (the kernel's softcap / window flags without a mask, the torch path with one).
    cfg = transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, attn_logit_softcapping=50.0, sliding_window=4,
    )
    ref, ours = _pair(transformers.Gemma2ForCausalLM, cfg, device)
    assert ours.config._attn_implementation == "fasttx"
    ids, mask, _ = _batch(device, "right")
    for m in (None, mask):
        _assert_close(ours(input_ids=ids, attention_mask=m).logits, ref(input_ids=ids, attention_mask=m).logits,
                      "softcap logits")


# ----------------------------------------------------------------------------------------------
# The causal-LM loss: gradient accumulation, the logits switch, return_dict=False
# ----------------------------------------------------------------------------------------------
def _gpt2_config():
    return transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                   n_inner=48, pad_token_id=0)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_loss_gradient_accumulation_num_items_in_batch(backend, device, kind):
    # Two micro-batches with different numbers of counted tokens (padding and -100), normalised
    # by the total (what Trainer passes as num_items_in_batch): the summed loss and the
    # accumulated gradients equal the unpatched model's.
    model_cls, cfg = ((transformers.GPT2LMHeadModel, _gpt2_config()) if kind == "gpt2"
                      else (transformers.LlamaForCausalLM, _config("llama")))
    ref, ours = _pair(model_cls, cfg, device)
    micro = [_batch(device, "right", L=7), _batch(device, "left", B=1, L=7)]
    micro[1][2][0, 5] = -100  # an ignored label inside a row
    counts = [int((lab[..., 1:] != -100).sum()) for _, _, lab in micro]
    assert counts == [6 + 4, 2]  # unequal: a mean per micro-batch would weigh tokens differently
    num_items = torch.tensor(sum(counts), device=device)
    totals = []
    for model in (ref, ours):
        total = 0.0
        for ids, mask, labels in micro:
            out = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=num_items)
            out.loss.backward()
            total = total + out.loss.detach()
        totals.append(total)
    _assert_close(totals[1], totals[0], "accumulated loss")
    _assert_grads_match(ref, ours)


def test_keep_logits_and_return_dict_false(device):
    ref, ours = _pair(transformers.LlamaForCausalLM, _config("llama"), device, keep_logits=True)
    ids, mask, labels = _batch(device, "right")
    out_ref = ref(input_ids=ids, attention_mask=mask, labels=labels)
    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    _assert_close(out.logits, out_ref.logits, "kept logits")
    _assert_close(out.loss, out_ref.loss, "loss from the kept logits")
    apply_fasttx(ours)  # back to the fused loss: keep_logits=False
    ours.train()  # (only while training: in eval the logits come back)
    loss, *rest = ours(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    _assert_close(loss, out_ref.loss, "fused loss, tuple output")
    assert all(not (torch.is_tensor(r) and r.shape[-1] == VOCAB) for r in rest)  # no logits in it
    # A loss_function the user set is theirs: their loss, and the logits with it.
    ours.loss_function = lambda logits, labels, **kw: logits.sum() * 0
    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is not None and out.loss.item() == 0


def test_positional_labels_and_shift_labels(device):
    ref, ours = _pair(transformers.LlamaForCausalLM, _config("llama"), device)
    ids, mask, labels = _batch(device, "right")
    # labels as the sixth positional argument (input_ids, attention_mask, position_ids, cache,
    # inputs_embeds, labels), as the class's signature allows
    out = ours(ids, mask, None, None, None, labels)
    _assert_close(out.loss, ref(input_ids=ids, attention_mask=mask, labels=labels).loss, "positional labels")
    shift = torch.roll(labels, -1, dims=1)  # already shifted labels are used as given
    shift[:, -1] = -100
    _assert_close(ours(input_ids=ids, attention_mask=mask, labels=labels, shift_labels=shift).loss,
                  ref(input_ids=ids, attention_mask=mask, labels=labels, shift_labels=shift).loss,
                  "shift_labels")


# ----------------------------------------------------------------------------------------------
# Packed sequences (DataCollatorWithFlattening): position_ids that restart at 0, no mask
# ----------------------------------------------------------------------------------------------
def test_packed_sequences_match_padded(backend, device):
    ref, ours = _pair(transformers.LlamaForCausalLM, _config("llama"), device)
    g = torch.Generator().manual_seed(4)
    a, b = torch.randint(3, VOCAB, (5,), generator=g), torch.randint(3, VOCAB, (4,), generator=g)
    # padded: (2, 5), right padding
    ids = torch.zeros(2, 5, dtype=torch.long)
    ids[0], ids[1, :4] = a, b
    mask = (torch.arange(5) < torch.tensor([[5], [4]])).long()
    labels = ids.masked_fill(mask == 0, -100)
    # packed: (1, 9); each sequence's first label is -100 so no position predicts across the seam
    packed = torch.cat([a, b])[None]
    position_ids = torch.cat([torch.arange(5), torch.arange(4)])[None]
    packed_labels = packed.clone()
    packed_labels[0, [0, 5]] = -100
    ids, mask, labels, packed, position_ids, packed_labels = (
        t.to(device) for t in (ids, mask, labels, packed, position_ids, packed_labels))

    padded_loss = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
    padded_loss.backward()
    # use_cache=False: transformers looks for packing only without a cache (a training setup)
    out = ours(input_ids=packed, position_ids=position_ids, labels=packed_labels, use_cache=False)
    _assert_close(out.loss, padded_loss, "packed loss")
    out.loss.backward()
    _assert_grads_match(ref, ours)


# ----------------------------------------------------------------------------------------------
# bf16 on a GPU: the flash-attention 2x rule against an fp64 copy of the model
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("family", list(FAMILIES))
def test_decoder_bf16_2x_rule_gpu(family):
    from utils import assert_2x_rule

    cfg = _config(family, hidden_size=64, intermediate_size=128, head_dim=16)
    ref, ours = _pair(_model_cls(family), cfg, "cuda")
    ids, mask, labels = _batch("cuda", "right")
    exact = copy.deepcopy(ref).double()
    with torch.no_grad():
        truth = exact(input_ids=ids, attention_mask=mask).logits
        pt = ref.to(torch.bfloat16)(input_ids=ids, attention_mask=mask).logits
        got = ours.to(torch.bfloat16)(input_ids=ids, attention_mask=mask).logits
        keep = mask.bool()
        assert_2x_rule(got[keep], pt[keep], truth[keep], name="logits")
        loss_truth = exact(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss_pt = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss = ours(input_ids=ids, attention_mask=mask, labels=labels).loss
        assert loss.dtype == loss_pt.dtype == torch.float32  # transformers' loss is fp32 in bf16 too
        # the loss is fp32 from bf16 hidden states: bf16's floor (1e-2), not fp32's
        assert_2x_rule(loss, loss_pt, loss_truth, atol=1e-2, name="fused loss")
