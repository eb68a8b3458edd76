"""Finetuning speed on this machine: test-set generation and training throughput.

    python benchmarks/bench_finetune.py                    # generation and 124M training
    python benchmarks/bench_finetune.py --model 355M --parts train memory
    python benchmarks/bench_finetune.py --parts train memory --precision bf16 --compile  # GPU

generation (on the CPU): the first test entries of the chapter's dataset on a GPT-2 124M model
with random weights (which never produce the end-of-text token, so every answer is 256 tokens
long), answered (a) one at a time recomputing the sequence every step (the book's loop), (b) one
at a time with the KV cache, (c) in batches with the cache, as the chapter script does; the
answers of (c) are checked against (a).

train: the chapter's shuffled training batches (batch 8, real lengths), the same initial weights,
stepping two models in turn: "book" (the book's spelled-out attention, layer norm and GELU, logits
at every position, AdamW's per-tensor loop) and "fast" (fused kernels, each row computed only up
to its last counted target, logits only where the target counts, fused AdamW). Prints the
median step, tokens/s, their ratio, and how far the first losses of the two paths lie apart.
Training runs on the GPU when there is one; `--precision bf16` and `--compile` apply the chapter
script's options of the same names to the fast path (the book path stays float32 and eager).

memory: peak memory of fast training steps, measured in a fresh process (CUDA: the allocator's
peak; CPU: the process's peak resident memory), with the same options.

micro: `--micro_batch_size` 8, 2 and 1 (each batch of 8 computed that many rows at a time,
gradients accumulated: the same update): peak memory against the median step, each in a fresh
process.
"""

import argparse
import multiprocessing
import resource
import statistics
from functools import partial

import tiktoken
import torch
from common import (
    chapter_data,
    gpt2_config,
    machine_line,
    real_batches,
    table,
    timed,
    training_setup,
)

from gpt_instruction_finetuning import format_input, generate_responses
from kit.chapter_training import ChapterTraining
from kit.device import make_optimizer
from previous_chapters import (
    GPTModel,
    generate,
    text_to_token_ids,
    token_ids_to_text,
)


def book_answers(model, entries, tokenizer, max_new_tokens, use_cache):
    """The book's loop: one entry at a time, decode, strip the prompt and the header."""
    answers = []
    for entry in entries:
        prompt = format_input(entry)
        ids = generate(model, text_to_token_ids(prompt, tokenizer), max_new_tokens, 1024,
                       eos_id=50256, use_cache=use_cache)
        text = token_ids_to_text(ids, tokenizer)
        answers.append(text[len(prompt):].replace("### Response:", "").strip())
    return answers


def bench_generation(entries_count, max_new_tokens):
    """Rows of the generation table."""
    tokenizer = tiktoken.get_encoding("gpt2")
    _, test, _ = chapter_data()
    entries = test[:entries_count]
    torch.manual_seed(123)
    model = GPTModel(gpt2_config("124M")).eval()
    recompute, slow = timed(lambda: book_answers(model, entries, tokenizer, max_new_tokens,
                                                 use_cache=False))
    cached, _ = timed(lambda: book_answers(model, entries, tokenizer, max_new_tokens, True))
    batched, fast = timed(lambda: generate_responses(model, entries, tokenizer, 1024,
                                                     max_new_tokens, batch_size=8))
    identical = [e["model_response"] for e in fast] == slow
    label = f"{len(entries)} test entries x {max_new_tokens} new tokens, 124M"
    return [[label, "seconds", "speed-up"],
            ["one at a time, recompute (book)", f"{recompute:.1f}", "1.0x"],
            ["one at a time, KV cache", f"{cached:.1f}", f"{recompute / cached:.1f}x"],
            ["batches of 8, KV cache (script)", f"{batched:.1f}", f"{recompute / batched:.1f}x"],
            ["batched answers identical to recompute", str(identical), ""]]


def device_name():
    """Where the training parts run: the GPU when there is one, as the chapter script does."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def fast_label(precision, compile_forward):
    """The fast path's row name, with the options it runs under."""
    options = [precision] if precision != "fp32" else []
    options += ["compiled"] if compile_forward else []
    return f"fast ({', '.join(options)})" if options else "fast"


def bench_training(size, steps, precision="fp32", compile_forward=False):
    """Rows of the book-vs-fast training table, both paths stepping in turn on the same batches."""
    batches = real_batches(steps + 1)
    device = device_name()
    paths = {"book": training_setup(size, "book", device=device),
             "fast": training_setup(size, "fast", device=device, precision=precision,
                                    compile_forward=compile_forward)}
    seconds = {name: [] for name in paths}
    losses = {name: [] for name in paths}
    for inputs, targets in batches:
        for name, (model, optimizer, step) in paths.items():
            elapsed, loss = timed(partial(step, model, optimizer, inputs, targets))
            seconds[name].append(elapsed)
            losses[name].append(loss)
    tokens = [inputs.numel() for inputs, _ in batches[1:]]
    rows = [[f"GPT-2 {size}, batch 8, real lengths, {device}", "median step", "tokens/s"]]
    speed = {}
    for name in paths:
        speed[name] = sum(tokens) / sum(seconds[name][1:])  # the first step warms up
        label = fast_label(precision, compile_forward) if name == "fast" else name
        rows.append([label, f"{statistics.median(seconds[name][1:]):.2f} s",
                     f"{speed[name]:.0f}"])
    first = min(5, len(batches))
    gap = max(abs(a - b) for a, b in zip(losses["book"][:first], losses["fast"][:first],
                                         strict=True))
    rows.append(["fast / book", "", f"{speed['fast'] / speed['book']:.2f}x"])
    rows.append([f"largest gap in the first {first} losses", f"{gap:.1e}", ""])
    return rows


def peak_memory(device):
    """The peak memory so far, in bytes: the CUDA allocator's, or the process's resident set."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory_of_training(size, precision, compile_forward, steps=2):
    """Run in a fresh process: peak memory (bytes, label) of `steps` fast training steps."""
    device = device_name()
    model, optimizer, step = training_setup(size, "fast", device=device, precision=precision,
                                            compile_forward=compile_forward)
    for inputs, targets in real_batches(steps):
        step(model, optimizer, inputs, targets)
    label = "CUDA allocator peak" if device == "cuda" else "CPU peak resident memory"
    return peak_memory(device), label


def micro_batch_training(size, micro_batch_size, steps):
    """Run in a fresh process: the peak memory (bytes) of forward and backward passes alone, of
    whole training steps, and their median time (seconds), each batch computed
    `micro_batch_size` rows at a time as the chapter script does.

    The forward and backward passes come first, before AdamW has made its moments: their peak
    is the weights, the gradients and the activations, the part micro-batches shrink."""
    device = device_name()
    torch.manual_seed(0)
    model = GPTModel(gpt2_config(size)).to(device).train()
    optimizer = make_optimizer(model, 5e-5, 0.1)
    hooks = ChapterTraining(1, torch.device(device), micro_batch_size=micro_batch_size)
    batches = real_batches(steps)
    for inputs, targets in batches[:2]:
        optimizer.zero_grad()
        hooks.batch_loss(inputs, targets, model, device).backward()
    backward_peak = peak_memory(device)

    def step(inputs, targets):
        optimizer.zero_grad()
        hooks.batch_loss(inputs, targets, model, device).backward()
        optimizer.step()

    seconds = [timed(partial(step, inputs, targets))[0] for inputs, targets in batches]
    return backward_peak, peak_memory(device), statistics.median(seconds[1:])


def bench_micro_batches(size, steps):
    """Rows of the micro-batch table: peak memory and step time for 8, 2 and 1 rows at a time."""
    rows = [[f"GPT-2 {size}, batch 8, {device_name()}", "peak, forward + backward",
             "peak, whole step", "median step"]]
    for micro in (8, 2, 1):
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            backward_peak, step_peak, seconds = pool.apply(micro_batch_training,
                                                           (size, micro, steps))
        rows.append([f"--micro_batch_size {micro}", f"{backward_peak / 2**30:.2f} GiB",
                     f"{step_peak / 2**30:.2f} GiB", f"{seconds:.2f} s"])
    return rows


def bench_memory(size, precision="fp32", compile_forward=False):
    """Rows of the memory table."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        peak, label = pool.apply(peak_memory_of_training, (size, precision, compile_forward))
    name = fast_label(precision, compile_forward)
    return [[f"GPT-2 {size} training step, batch 8, {name}", "peak memory"],
            [label, f"{peak / 2**30:.2f} GiB"]]


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["generation", "train"],
                        choices=["generation", "train", "memory", "micro"])
    parser.add_argument("--model", default="124M", choices=["124M", "355M"],
                        help="model shape for the train, memory and micro parts (default: 124M)")
    parser.add_argument("--entries", type=int, default=8,
                        help="test entries to answer (default: 8, one batch of the script)")
    parser.add_argument("--max_new_tokens", type=int, default=256,
                        help="the chapter's answer length; random weights never stop earlier")
    parser.add_argument("--steps", type=int, default=6, help="measured training steps per path")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="the fast path's training precision (bf16: autocast, for GPUs)")
    parser.add_argument("--compile", action="store_true",
                        help="compile the fast path's forward pass; it recompiles for the first "
                             "batch shapes, so give it more --steps")
    args = parser.parse_args()

    print(machine_line())
    if "generation" in args.parts:
        rows = bench_generation(args.entries, args.max_new_tokens)
        print(table(rows[0], rows[1:]))
    if "train" in args.parts:
        rows = bench_training(args.model, args.steps, args.precision, args.compile)
        print(table(rows[0], rows[1:]))
    if "memory" in args.parts:
        rows = bench_memory(args.model, args.precision, args.compile)
        print(table(rows[0], rows[1:]))
    if "micro" in args.parts:
        rows = bench_micro_batches(args.model, args.steps)
        print(table(rows[0], rows[1:]))


if __name__ == "__main__":
    main()
