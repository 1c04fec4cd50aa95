"""Train fasttx's GPT with FSDP2 (one `fully_shard` per block) and activation checkpointing, then
run a tensor + sequence parallel step of a block built from fasttx ops: plain torch.distributed,
no fasttx-specific launcher.

    torchrun --nproc-per-node 2 examples/distributed_gpt.py            # CPU, gloo
    torchrun --nproc-per-node 2 examples/distributed_gpt.py --steps 50 # on GPUs: nccl, Triton kernels

On CPU the fasttx ops of the FSDP2 part run torch's own implementation (backend "auto"); on
CUDA the Triton kernels.
"""
from __future__ import annotations

import argparse
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (see the TP part)
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel, parallelize_module,
)
from torch.utils.checkpoint import checkpoint

import fasttx
import fasttx.functional as FF
import fasttx.nn as fnn
from fasttx.models import GPT, GPTConfig


class Checkpointed(torch.nn.Module):
    """A block whose activations are recomputed in the backward (dropout masks included: fasttx
    draws its seeds from torch's generator, which checkpoint restores)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, *args):
        return checkpoint(self.block, *args, use_reentrant=False)


class Attention(torch.nn.Module):
    """Causal self-attention with separate q/k/v projections, as tensor-parallel plans shard them."""

    def __init__(self, C, n_head):
        super().__init__()
        self.n_head = n_head
        self.q, self.k, self.v, self.o = (torch.nn.Linear(C, C) for _ in range(4))

    def forward(self, x):
        B, T, C = x.shape
        hd = C // self.n_head
        q, k, v = (p(x).view(B, T, -1, hd).transpose(1, 2) for p in (self.q, self.k, self.v))  # (B, nh, T, hd)
        y = FF.scaled_dot_product_attention(q, k, v, is_causal=True)  # heads split over the ranks
        return self.o(y.transpose(1, 2).reshape(B, T, C))


class MLP(torch.nn.Module):
    def __init__(self, C):
        super().__init__()
        self.fc, self.proj = torch.nn.Linear(C, 4 * C), torch.nn.Linear(4 * C, C)

    def forward(self, x):
        return self.proj(FF.gelu(self.fc(x), approximate="tanh"))


class Block(torch.nn.Module):
    """Pre-LN block of fasttx ops: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, C=64, n_head=4):
        super().__init__()
        self.ln_1, self.attn = fnn.LayerNorm(C), Attention(C, n_head)
        self.ln_2, self.mlp = fnn.LayerNorm(C), MLP(C)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,))

    # 1. FSDP2 + activation checkpointing: data parallel, parameters sharded per block.
    torch.manual_seed(0)  # the same initial weights on every rank
    model = GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=64, dropout=0.1)).to(device)
    for i, block in enumerate(model.transformer.h):
        model.transformer.h[i] = Checkpointed(block)
        fully_shard(model.transformer.h[i], mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(rank))  # this rank's shard
    for step in range(args.steps):
        i = torch.randint(0, len(data) - 65, (8,))
        batch = torch.stack([data[j:j + 65] for j in i]).to(device)
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0:
            print(f"FSDP2 step {step}: loss {loss.item():.4f}")

    # 2. Tensor + sequence parallel: attention heads and the MLP split over the ranks, the norms
    #    (and the residual stream) split along the sequence.
    gather = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    torch.manual_seed(0)
    block = parallelize_module(Block().to(device), mesh, {
        "ln_1": SequenceParallel(), "ln_2": SequenceParallel(),
        "attn": gather, "mlp": gather,  # all-gather the sequence before the projections
        "attn.q": ColwiseParallel(use_local_output=False), "attn.k": ColwiseParallel(use_local_output=False),
        "attn.v": ColwiseParallel(use_local_output=False), "attn.o": RowwiseParallel(output_layouts=Shard(1)),
        "mlp.fc": ColwiseParallel(use_local_output=False), "mlp.proj": RowwiseParallel(output_layouts=Shard(1)),
    })
    torch.manual_seed(1)
    x = torch.randn(2, 16, 64, device=device)  # (B, T, C), the same on every rank
    x_local = x.chunk(world, dim=1)[rank]  # this rank's slice of the sequence
    # On CPU, torch's own attention does not take DTensors (its CPU kernel has no sharding rule),
    # so this part runs fasttx's kernels there too, through the Triton interpreter (slow, tiny).
    with fasttx.use_backend("auto" if cuda else "triton"):
        out = block(x_local)
    out.sum().backward()
    if rank == 0:
        print(f"TP+SP block: local output {tuple(out.shape)} of {tuple(x.shape)}, "
              f"ln_1.weight grad {block.ln_1.weight.grad.placements}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
