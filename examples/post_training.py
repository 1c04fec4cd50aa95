"""Post-training without the logits: a few DPO steps and a few GRPO steps on a tiny Llama, CPU.

The policy's and the reference's per-token log-probs come from the final hidden states and the LM
head (fasttx.integrations.huggingface.causal_lm_log_probs -> fasttx.functional.linear_log_probs),
never from (batch, length, vocab) logits; the losses are fasttx.losses' formulas (TRL's). At the
end the script measures the peak memory (RSS growth) of one policy log-prob forward + backward with
the logits materialised (TRL's selective_log_softmax on model(...).logits) and without.

    python examples/post_training.py                   # 4 DPO steps, 4 GRPO steps, memory report
    python examples/post_training.py --vocab 32000 --steps 2
"""
from __future__ import annotations

import argparse
import copy
import resource
import sys

import torch

from fasttx import losses
from fasttx.integrations.huggingface import apply_fasttx, causal_lm_log_probs


def tiny_llama(vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return apply_fasttx(LlamaForCausalLM(cfg))


def preference_batch(pairs: int, prompt: int, completion: int, vocab: int, seed: int = 1):
    """[chosen; rejected] rows (2 * pairs, prompt + completion): the chosen completions repeat a
    small 'preferred' vocabulary, the rejected ones are uniform. completion_mask marks the completions."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randint(3, vocab, (pairs, prompt), generator=g)
    chosen = torch.randint(3, 3 + 16, (pairs, completion), generator=g)
    rejected = torch.randint(3, vocab, (pairs, completion), generator=g)
    ids = torch.cat([torch.cat([p, chosen], 1), torch.cat([p, rejected], 1)], 0)
    mask = torch.zeros_like(ids)
    mask[:, prompt:] = 1
    return ids, mask


def dpo_steps(policy, reference, steps: int, vocab: int, lr: float = 3e-3):
    ids, mask = preference_batch(pairs=4, prompt=6, completion=10, vocab=vocab)
    attn = torch.ones_like(ids)
    opt = torch.optim.AdamW(policy.parameters(), lr=lr)
    with torch.no_grad():
        ref_logps = causal_lm_log_probs(reference, ids, attn, mask)  # (2B, L - 1)
    history = []
    for _ in range(steps):
        logps = causal_lm_log_probs(policy, ids, attn, mask)
        loss = losses.dpo_loss(logps, ref_logps, mask[:, 1:], beta=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    return history


def reward(completions: torch.Tensor) -> torch.Tensor:
    """A verifiable toy reward: the fraction of completion tokens that are even ids."""
    return (completions % 2 == 0).float().mean(-1)


def grpo_steps(policy, reference, steps: int, vocab: int, group: int = 4, lr: float = 3e-3):
    g = torch.Generator().manual_seed(2)
    prompts = torch.randint(3, vocab, (2, 6), generator=g).repeat_interleave(group, 0)  # (2 * group, 6)
    opt = torch.optim.AdamW(policy.parameters(), lr=lr)
    history = []
    for step in range(steps):
        torch.manual_seed(100 + step)
        with torch.no_grad():  # sample a group of completions per prompt from the current policy
            seqs = policy.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, top_k=0,
                                   max_new_tokens=8, min_new_tokens=8, pad_token_id=0)
        completion = seqs[:, prompts.shape[1]:]
        r = reward(completion).reshape(-1, group)
        adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).reshape(-1)  # group-normalised
        mask = torch.zeros_like(seqs)
        mask[:, prompts.shape[1]:] = 1
        attn = torch.ones_like(seqs)
        with torch.no_grad():
            ref_logps = causal_lm_log_probs(reference, seqs, attn, mask)
        logps = causal_lm_log_probs(policy, seqs, attn, mask)
        loss = losses.grpo_loss(logps, adv, mask[:, 1:], ref_per_token_logps=ref_logps, beta=0.04,
                                loss_type="grpo")
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append((loss.item(), r.mean().item()))
    return history


def _peak_rss_growth_mib(fn) -> float:
    """Peak RSS growth of fn() in a fresh child process (Linux: ru_maxrss in KiB)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    q = ctx.Queue()

    def run():
        torch.set_num_threads(1)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        q.put((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)

    p = ctx.Process(target=run)
    p.start()
    out = q.get(timeout=600)
    p.join()
    return out


def memory_report(vocab: int, rows: int = 8, length: int = 128):
    """One policy log-prob forward + backward, logits materialised vs not."""
    model = tiny_llama(vocab)
    ids = torch.randint(3, vocab, (rows, length))
    mask = torch.ones_like(ids)

    def materialised():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # (B, L - 1, V)
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]  # TRL's selective_log_softmax
        lp.sum().backward()

    def fused():
        causal_lm_log_probs(model, ids, mask).sum().backward()

    logits_mib = rows * (length - 1) * vocab * 4 / 2 ** 20
    fused_mib, mat_mib = _peak_rss_growth_mib(fused), _peak_rss_growth_mib(materialised)
    print(f"memory: one log-prob forward + backward, {rows}x{length} tokens, vocab {vocab} "
          f"(fp32 logits {logits_mib:.0f} MiB): peak RSS growth {mat_mib:.0f} MiB with the logits, "
          f"{fused_mib:.0f} MiB without ({fused_mib / max(mat_mib, 1e-9):.2f}x)")
    return fused_mib, mat_mib


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--no-memory", action="store_true", help="skip the memory comparison")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    policy = tiny_llama(args.vocab)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    dpo = dpo_steps(policy, reference, args.steps, args.vocab)
    print("DPO loss per step:", " ".join(f"{v:.4f}" for v in dpo))
    policy = tiny_llama(args.vocab)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    grpo = grpo_steps(policy, reference, args.steps, args.vocab)
    print("GRPO (loss, mean reward) per step:", " ".join(f"({a:.4f}, {b:.3f})" for a, b in grpo))
    mem = None if args.no_memory else memory_report(args.vocab)
    return dpo, grpo, mem


if __name__ == "__main__":
    main(sys.argv[1:])
