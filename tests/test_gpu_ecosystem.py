"""On CUDA only: a GPT training step under autocast, captured in a CUDA graph, and compiled.

These need the real kernels (the interpreter has no streams, graphs or autocast on CUDA); they run
in the GPU sessions (`pytest -m gpu`).
"""
import pytest
import torch

import fasttx
from fasttx.models import GPT, GPTConfig

pytestmark = pytest.mark.gpu


def _model(device, dropout=0.0, dtype=torch.float32):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=512, block_size=128, n_layer=2, n_head=4, n_embd=128, dropout=dropout)
    return GPT(cfg).to(device=device, dtype=dtype), cfg


def _batch(device, cfg, B=4, T=128, seed=1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g).to(device)
    return idx[:, :-1].contiguous(), idx[:, 1:].contiguous()


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_gpt_step_under_autocast_matches_torch_built_twin(device, low):
    ours, cfg = _model(device)
    twin = GPT(cfg).to(device)
    twin.load_state_dict(ours.state_dict())
    x, y = _batch(device, cfg)
    losses = []
    for model, backend in ((ours, "auto"), (twin, "torch")):  # the twin runs torch's ops
        with fasttx.use_backend(backend), torch.autocast("cuda", dtype=low):
            _, loss = model(x, y)
        loss.backward()
        losses.append(loss.float())
    assert torch.isfinite(losses[0])
    torch.testing.assert_close(losses[0], losses[1], atol=2e-2, rtol=2e-2)
    for (name, p), q in zip(ours.named_parameters(), twin.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        torch.testing.assert_close(p.grad, q.grad, atol=5e-2, rtol=5e-2, msg=name)


def test_cuda_graph_capture_of_forward_backward(device):
    model, cfg = _model(device)
    x, y = _batch(device, cfg)
    static_x, static_y = x.clone(), y.clone()
    # Warm up on a side stream (autotuning and compilation happen here, never during capture).
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            model.zero_grad(set_to_none=False)
            model(static_x, static_y)[1].backward()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    model.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        static_loss = model(static_x, static_y)[1]
        static_loss.backward()
    x2, y2 = _batch(device, cfg, seed=2)
    static_x.copy_(x2)
    static_y.copy_(y2)
    model.zero_grad(set_to_none=False)
    graph.replay()
    torch.cuda.synchronize()
    graph_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=False)
    loss = model(x2, y2)[1]
    loss.backward()
    torch.testing.assert_close(static_loss, loss)
    for g, p in zip(graph_grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_cuda_graph_replays_of_a_step_with_dropout_draw_new_masks(device):
    # Every dropout (stand-alone, fused into LayerNorm, inside attention) reads its Philox seed
    # from a device tensor that torch's generator redraws on each replay: replays differ from
    # each other (new masks), and each replay's loss is finite.
    model, cfg = _model(device, dropout=0.1)
    x, y = _batch(device, cfg)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            model.zero_grad(set_to_none=False)
            model(x, y)[1].backward()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    model.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        static_loss = model(x, y)[1]
        static_loss.backward()
    losses = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        losses.append(static_loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert len(set(losses)) == 3, losses  # a new mask each replay


def test_torch_compile_fullgraph_gpt_on_cuda(device):
    model, cfg = _model(device)
    x, y = _batch(device, cfg)
    eager = model(x, y)[1]
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    loss = compiled(x, y)[1]
    torch.testing.assert_close(loss, eager, atol=1e-4, rtol=1e-4)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert fasttx.get_backend() == "auto"
