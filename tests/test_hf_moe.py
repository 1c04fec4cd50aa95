"""transformers' MoE models with their experts on fasttx ("fasttx" in transformers' ExpertsInterface):
logits, loss, every gradient (router included) and greedy generate equal to transformers' eager
experts on tiny configs of every MoE family installed, on the torch path; the Triton path on the
tiniest configs (one per weight layout)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.integrations.moe")

import fasttx  # noqa: E402
from fasttx.integrations import hf_experts  # noqa: E402
from fasttx.integrations.huggingface import apply_fasttx  # noqa: E402

TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, tie_word_embeddings=False)


def _configs():
    from transformers import (DeepseekV3Config, Glm4MoeConfig, GptOssConfig, MixtralConfig, OlmoeConfig,
                              Qwen2MoeConfig, Qwen3MoeConfig)

    return {
        "mixtral": MixtralConfig(**TINY, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2),
        "qwen3_moe": Qwen3MoeConfig(**TINY, head_dim=8, moe_intermediate_size=20, num_experts=5,
                                    num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                                    mlp_only_layers=[]),
        "qwen2_moe": Qwen2MoeConfig(**TINY, moe_intermediate_size=20, shared_expert_intermediate_size=24,
                                    num_experts=4, num_experts_per_tok=2),
        "olmoe": OlmoeConfig(**TINY, intermediate_size=20, num_experts=4, num_experts_per_tok=2),
        "glm4_moe": Glm4MoeConfig(**TINY, head_dim=8, intermediate_size=32, moe_intermediate_size=16,
                                  n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                                  first_k_dense_replace=1, n_group=1, topk_group=1),
        # MLA attention: every head has its own k/v (num_key_value_heads = num_attention_heads; fewer
        # makes repeat_kv double the heads); 8 routed experts in 2 groups of 4, the top-1 group kept
        # per token, k = 2 inside it; the first layer dense; no multi-token-prediction head
        "deepseek_v3": DeepseekV3Config(**{**TINY, "num_key_value_heads": 4}, intermediate_size=32,
                                        moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
                                        num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                                        q_lora_rank=16, kv_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=8,
                                        v_head_dim=8, routed_scaling_factor=1.5, num_mtp_layers=0),
        "gpt_oss": GptOssConfig(**{**TINY, "num_attention_heads": 4}, head_dim=8, intermediate_size=16,
                                num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                                swiglu_limit=0.5, swiglu_alpha=1.3,  # small: the clamps are reached
                                layer_types=["sliding_attention", "full_attention"]),
    }


def _model(name, impl):
    torch.manual_seed(0)
    cfg = _configs()[name]
    model = transformers.AutoModelForCausalLM.from_config(cfg, experts_implementation=impl,
                                                          attn_implementation="eager")
    with torch.no_grad():  # biases and weights away from zero, so every term shows in the check
        for n, p in model.named_parameters():
            if "experts" in n or "router" in n or "gate" in n:
                p.normal_(0, 0.2)
    return model.float()


def _run(model, idx):
    out = model(idx, labels=idx)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def _compare(name, backend, generate=True):
    idx = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    eager = _model(name, "eager")
    ours = _model(name, "fasttx")
    experts = [m for m in ours.modules() if hasattr(type(m), "_apply_gate")]
    assert experts and ours.config._experts_implementation == "fasttx"
    assert all(hf_experts.unsupported(m) is None for m in experts), [hf_experts.unsupported(m) for m in experts]
    le, loss_e, ge = _run(eager, idx)
    with fasttx.use_backend(backend):
        lo, loss_o, go = _run(ours, idx)
    torch.testing.assert_close(lo, le, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(loss_o, loss_e, atol=2e-5, rtol=2e-5)
    assert set(go) == set(ge)
    assert any("router" in n or "mlp.gate." in n for n in go), sorted(go)  # the router gets a gradient
    for n in ge:
        torch.testing.assert_close(go[n], ge[n], atol=5e-5, rtol=5e-5, msg=n)
    if generate:
        with torch.no_grad(), fasttx.use_backend(backend):
            a = eager.generate(idx[:, :3], max_new_tokens=4, do_sample=False, pad_token_id=0)
            b = ours.generate(idx[:, :3], max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "glm4_moe", "deepseek_v3", "gpt_oss"])
def test_fasttx_experts_equal_eager_torch_path(name):
    _compare(name, "torch")


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss", "deepseek_v3"])  # both weight layouts; group routing
def test_fasttx_experts_equal_eager_triton_path(name):
    _compare(name, "triton", generate=False)


def test_apply_fasttx_selects_the_fasttx_experts():
    model = _model("qwen3_moe", "eager")
    apply_fasttx(model)
    assert model.config._experts_implementation == "fasttx"
    idx = torch.randint(0, 64, (1, 5))
    out = model(idx, labels=idx)
    assert torch.isfinite(out.loss)


def test_unsupported_experts_fall_back_to_eager_with_a_warning():
    model = _model("mixtral", "fasttx")
    experts = next(m for m in model.modules() if hasattr(type(m), "_apply_gate"))
    experts.act_fn = torch.nn.ReLU()
    x = torch.randn(5, 32)
    idx = torch.randint(0, 4, (5, 2))
    w = torch.rand(5, 2)
    with pytest.warns(UserWarning, match="eager experts"):
        y = experts(x, idx, w)
    want = type(experts).forward.__wrapped__(experts, x, idx, w)
    torch.testing.assert_close(y, want)
