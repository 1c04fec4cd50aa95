"""ALiBi families through the HF path: BLOOM's and MPT's attention modules (outside transformers'
AttentionInterface) recognised by a probe and run on fasttx's scaled_dot_product_attention with the
ALiBi bias and mask added; training loss, every gradient, eval logits and loss, greedy generate (the
cache path) equal to the unpatched twin; left padding (BLOOM counts ALiBi positions over the
non-padded tokens); attention weights equal eager's. (Falcon's ALiBi runs through the attention
function: tests/test_hf_contracts.py.)"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

import hf_tiny as H  # noqa: E402

import fasttx.functional as FF  # noqa: E402
from fasttx.integrations.huggingface import alibi as A  # noqa: E402
from fasttx.integrations.huggingface import apply_fasttx, fasttx_report  # noqa: E402

ATTN = {"bloom": ("transformer", "h", "self_attention"), "mpt": ("transformer", "blocks", "attn")}


def _pair(model_type):
    (task, cls), = [(t, c) for mt, t, c in H.model_types() if mt == model_type]
    ref, ours = H.build_pair(model_type, task, cls)
    return task, ref, ours


def _attn_modules(model, model_type):
    base, blocks, attn = ATTN[model_type]
    return [getattr(b, attn) for b in getattr(getattr(model, base), blocks)]


@pytest.mark.parametrize("model_type", ["bloom", "mpt"])
def test_alibi_attention_swapped_and_exact(model_type, monkeypatch):
    task, ref, ours = _pair(model_type)
    expected = H.measure(ref, task)
    apply_fasttx(ours)
    rep = fasttx_report(ours)
    mods = _attn_modules(ours, model_type)
    assert all(m.__dict__["forward"].__func__ is A.FORWARDS[model_type] for m in mods)
    assert any("ALiBi attention" in piece for piece in rep["swapped"]), rep
    assert not any("attention" in k for k in rep["left"]), rep["left"]
    calls = []
    real = FF.scaled_dot_product_attention
    monkeypatch.setattr(FF, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert H.compare(expected, H.measure(ours, task)) == []
    assert calls  # fasttx's attention ran


@pytest.mark.parametrize("model_type", ["bloom", "mpt"])
def test_alibi_left_padding_and_attention_weights(model_type):
    _, ref, ours = _pair(model_type)
    ref.eval()
    apply_fasttx(ours).eval()
    ids = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: BLOOM's positions start at the first real token
    mask[1, 2] = 0  # a hole in the middle
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, output_attentions=True)
        got = ours(input_ids=ids, attention_mask=mask)
        weights = ours(input_ids=ids, attention_mask=mask, output_attentions=True)
    keep = mask.bool()
    torch.testing.assert_close(got.logits[keep], want.logits[keep], atol=1e-5, rtol=1e-5)
    assert got.attentions is None
    assert len(weights.attentions) == len(want.attentions) == 2
    for a, r in zip(weights.attentions, want.attentions):
        torch.testing.assert_close(a, r, atol=0, rtol=0)  # the module's own forward for that call


def test_alibi_generate_with_left_padded_prompts():
    _, ref, ours = _pair("bloom")
    apply_fasttx(ours)
    prompt = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.eval().generate(prompt, **kw), ref.eval().generate(prompt, **kw))


@pytest.mark.parametrize("model_type", ["bloom", "mpt"])
def test_alibi_without_a_mask_runs_the_kernel_alibi(model_type, monkeypatch):
    # No attention_mask, no cache (training): fasttx.flash with alibi_slopes, no (L, S) bias.
    from fasttx import flash

    _, ref, ours = _pair(model_type)
    apply_fasttx(ours)
    ids = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(4))
    seen = []
    real = flash.flash_attn_func
    monkeypatch.setattr(flash, "flash_attn_func", lambda *a, **k: seen.append(k["alibi_slopes"]) or real(*a, **k))
    monkeypatch.setattr(FF, "scaled_dot_product_attention", None)  # the additive path must not run
    for model in (ref, ours):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
    assert len(seen) == 2 and seen[0].shape == (4,)  # one call per layer, one slope per head
    for (n, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=n)
    # a decoding loop without a mask: the cache appends, the kernel's bottom-right causal alignment
    ref.eval(), ours.eval()
    with torch.no_grad():
        outs = []
        for model in (ref, ours):
            first = model(input_ids=ids[:, :6], use_cache=True)
            step = model(input_ids=ids[:, 6:], cache=first.past_key_values, use_cache=True)
            outs.append((first.logits, step.logits))
    assert len(seen) == 6
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_the_probe_covers_the_kernel_alibi_path(monkeypatch):
    # A kernel path that computed something else (slopes doubled) is caught by the unpadded probe.
    real = A._flash
    monkeypatch.setattr(A, "_flash", lambda q, k, v, slopes, *rest: real(q, k, v, slopes * 2, *rest))
    A._VERDICTS.clear()
    _, _, ours = _pair("bloom")
    apply_fasttx(ours)
    A._VERDICTS.clear()
    assert "differs" in fasttx_report(ours)["left"]["BloomAttention ALiBi attention"]


def test_bloom_variant_it_does_not_reproduce_is_left():
    _, _, ours = _pair("bloom")
    for m in _attn_modules(ours, "bloom"):
        m.pretraining_tp, m.slow_but_exact = 2, True
    apply_fasttx(ours)
    assert "BloomAttention ALiBi attention" in fasttx_report(ours)["left"]
    assert all("forward" not in m.__dict__ for m in _attn_modules(ours, "bloom"))


@pytest.mark.parametrize("model_type", ["mpt"])  # (BLOOM's kernel path on triton: the test below)
def test_alibi_exact_on_the_triton_path(model_type):
    import fasttx

    (task, cls), = [(t, c) for mt, t, c in H.model_types() if mt == model_type]
    with fasttx.use_backend("triton"):
        row = H.run_one(model_type, task, cls, generate=False)
    assert row["status"] == "exact", row
    assert any("ALiBi attention" in piece for piece in row["swapped"]), row


def test_kernel_alibi_on_the_triton_path(monkeypatch):
    # BLOOM's q/k/v are strided views of the fused projection: the kernel takes them as they are.
    import fasttx
    from fasttx import flash

    _, ref, ours = _pair("bloom")
    seen = []
    real = flash.flash_attn_func
    ids = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(5))
    with fasttx.use_backend("triton"):
        apply_fasttx(ours)
        monkeypatch.setattr(flash, "flash_attn_func", lambda *a, **k: seen.append(1) or real(*a, **k))
        for model in (ref, ours):
            model.train()
            model(input_ids=ids, labels=ids).loss.backward()
    assert len(seen) == 2
    for (n, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=n)
