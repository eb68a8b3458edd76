"""GPT-2 124M core speed on this machine: a training step, and generation with/without cache.

    python benchmarks/bench_core.py            # about 4 minutes on 2 CPU cores
    python benchmarks/bench_core.py --quick    # fewer steps and tokens

Random weights, batch 8 of 70-token sequences for training (fused kernels, loss only where
targets count, fused AdamW, as the chapter script trains). The machine's fp32 matmul speed
(a 2048 x 2048 product) is the yardstick: the training step's model FLOP/s divided by it says
how much of the machine's arithmetic the step uses. Model FLOPs per step are counted as
6 x (parameters outside the embeddings) x tokens + 12 x layers x tokens x sequence x emb_dim
(the attention products, forward and backward).
"""

import argparse

import torch
from common import gpt2_config, machine_line, median_seconds, table, timed

from gpt_instruction_finetuning import make_optimizer
from previous_chapters import GPTModel, calc_loss_batch, generate


def matmul_gflops(n=2048, repeats=10):
    """fp32 GFLOP/s of one n x n matrix product, the machine's best case."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / median_seconds(lambda: a @ b, repeats, warmup=2) / 1e9


def train_step_seconds(model, steps, batch=8, seq_len=70):
    """Median seconds of one training step on random token batches."""
    optimizer = make_optimizer(model, 5e-5, 0.1)
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, 50257, (batch, seq_len), generator=gen)
    targets = torch.randint(0, 50257, (batch, seq_len), generator=gen)

    def step():
        optimizer.zero_grad()
        calc_loss_batch(inputs, targets, model, "cpu").backward()
        optimizer.step()

    return median_seconds(step, steps)


def model_flops_per_step(model, cfg, batch, seq_len):
    """Training FLOPs of one step, as described in the module docstring."""
    embeddings = model.tok_emb.weight.numel() + model.pos_emb.weight.numel()
    params = sum(p.numel() for p in model.parameters()) - embeddings
    tokens = batch * seq_len
    return 6 * params * tokens + 12 * cfg["n_layers"] * tokens * seq_len * cfg["emb_dim"]


def generation_ms_per_token(model, new_tokens, use_cache, prompt_len=70):
    """Milliseconds per generated token, greedy, batch 1."""
    prompt = torch.randint(0, 50257, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    seconds, out = timed(lambda: generate(model, prompt, new_tokens, 1024, use_cache=use_cache))
    assert out.shape[1] == prompt_len + new_tokens
    return 1000 * seconds / new_tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and tokens")
    args = parser.parse_args()
    steps, new_tokens = (3, 32) if args.quick else (7, 256)

    torch.manual_seed(123)
    cfg = gpt2_config("124M")
    model = GPTModel(cfg)
    print(machine_line())

    peak = matmul_gflops()
    step = train_step_seconds(model.train(), steps)
    achieved = model_flops_per_step(model, cfg, 8, 70) / step / 1e9
    model.eval()
    cached = generation_ms_per_token(model, new_tokens, use_cache=True)
    recompute = generation_ms_per_token(model, new_tokens, use_cache=False)

    print(table(["GPT-2 124M, random weights", "value"], [
        ["fp32 matmul (2048 x 2048)", f"{peak:.1f} GFLOP/s"],
        ["training step, batch 8 x 70 tokens (median)", f"{step:.2f} s"],
        ["training throughput", f"{8 * 70 / step:.0f} tokens/s"],
        ["training model FLOP/s / matmul FLOP/s", f"{achieved:.1f} / {peak:.1f} GFLOP/s = "
                                                  f"{achieved / peak:.2f}"],
        [f"generation, {new_tokens} new tokens, KV cache", f"{cached:.1f} ms/token"],
        [f"generation, {new_tokens} new tokens, recompute", f"{recompute:.1f} ms/token"],
        ["generation speed-up from the cache", f"{recompute / cached:.1f}x"],
    ]))


if __name__ == "__main__":
    main()
