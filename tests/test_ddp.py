"""GPT under DistributedDataParallel: two CPU ranks (gloo) each train on half of a batch; after
every step their averaged gradients, and the parameters at the end, equal a single process trained
on the whole batch."""
import datetime
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
STEPS = 3
TIMEOUT_S = 120


def _config():
    from fasttx.models import GPTConfig

    return GPTConfig(vocab_size=29, block_size=12, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


def _batch():
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, 29, (STEPS, 2 * WORLD, 12), generator=g)  # (steps, B, T+1)


def _train(model, batches, wrapped=None):
    """STEPS of SGD with momentum; returns each step's gradients (after DDP's all-reduce when
    wrapped). Not Adam: the key bias of attention has a gradient that is zero up to rounding
    (softmax is shift-invariant), and Adam's g / sqrt(v) would blow that rounding up to +-lr."""
    net = wrapped or model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    history = []
    for tokens in batches:
        _, loss = net(tokens[:, :-1], tokens[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        history.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
    return history


def _worker(rank, port, out_path):
    import fasttx
    from fasttx.models import GPT

    torch.set_num_threads(1)
    fasttx.use_backend("torch")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        torch.manual_seed(0)
        model = GPT(_config())
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        half = _batch()[:, rank * 2: (rank + 1) * 2]  # this rank's half of every step's batch
        history = _train(model, half, ddp)
        if rank == 0:
            params = {n: p.detach().clone() for n, p in model.named_parameters()}
            torch.save({"grads": history, "params": params}, out_path)
        dist.barrier()  # nobody tears the group down while the other rank still talks to it
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gradients_equal_single_process(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    import fasttx
    from fasttx.models import GPT

    out_path = str(tmp_path / "rank0.pt")
    ctx = mp.start_processes(_worker, args=(_free_port(), out_path), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"DDP ranks did not finish within {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)

    with fasttx.use_backend("torch"):
        torch.manual_seed(0)
        model = GPT(_config())
        single = _train(model, _batch())
    ddp = torch.load(out_path, weights_only=True)
    assert len(ddp["grads"]) == STEPS
    for step, (g_ddp, g_one) in enumerate(zip(ddp["grads"], single)):
        assert g_ddp.keys() == g_one.keys()
        for name in g_one:
            # same math, different summation order (two half-batch means averaged by all-reduce)
            torch.testing.assert_close(g_ddp[name], g_one[name], atol=1e-6, rtol=1e-5,
                                       msg=f"step {step}: gradient of {name}")
    for name, p in model.named_parameters():
        torch.testing.assert_close(ddp["params"][name], p.detach(), atol=1e-5, rtol=1e-5, msg=name)
