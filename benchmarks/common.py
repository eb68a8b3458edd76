"""Helpers shared by the benchmarks: the machine line, timing, the chapter's real batches."""

import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from functools import partial
from itertools import islice

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gpt_instruction_finetuning as ft  # noqa: E402
from kit.device import (  # noqa: E402
    compiled_for_training,
    eager_model,
    make_optimizer,
    precision_context,
    prepared_loss,
)
from previous_chapters import GPTModel, calc_loss_batch  # noqa: E402

SHARED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "shared", "data", "instruction-data.json")


def machine_line():
    """What the figures were measured on."""
    cpu = platform.processor() or "unknown CPU"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}, "
            f"{os.cpu_count()} cores")


def timed(fn):
    """Run `fn()` once and return (seconds, its result); waits for the GPU when there is one."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def median_seconds(fn, repeats, warmup=1):
    """Median wall time of `fn()` over `repeats` runs after `warmup` unmeasured ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn)[0] for _ in range(repeats))


def chapter_data(path=None):
    """The chapter's dataset split 85/10/5: (train, test, val)."""
    path = path or (SHARED_DATA if os.path.exists(SHARED_DATA) else "instruction-data.json")
    return ft.split_data(ft.download_and_load_file(path, ft.DATA_URL), path)


def real_batches(count, batch_size=8, seed=123):
    """The first `count` batches of the chapter's shuffled training loader."""
    import tiktoken

    train, _, _ = chapter_data()
    torch.manual_seed(seed)
    loader = DataLoader(ft.InstructionDataset(train, tiktoken.get_encoding("gpt2")),
                        batch_size=batch_size, shuffle=True, drop_last=True,
                        collate_fn=partial(ft.custom_collate_fn, allowed_max_length=1024))
    return list(islice(loader, count))


def gpt2_config(size, fused=True):
    """The config of a GPT-2 size ("124M", "355M", ...), fused kernels on or off."""
    return {**ft.BASE_CONFIG, **ft.MODEL_CONFIGS[size][1], "fused": fused}


def table(header, rows):
    """A Markdown table as a string."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def book_step(model, optimizer, inputs, targets):
    """The book's training step: logits everywhere, cross-entropy skips -100 targets."""
    device = model.out_head.weight.device
    inputs, targets = inputs.to(device), targets.to(device)
    optimizer.zero_grad()
    loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), ignore_index=-100)
    loss.backward()
    optimizer.step()
    return loss.item()


def fast_step(model, optimizer, inputs, targets, ctx=None):
    """The chapter script's training step, its loss computed under `ctx` (the precision): rows
    packed on a CPU, the batch prepared on the CPU for whole rows elsewhere (a GPU)."""
    eager = eager_model(model)
    device = eager.out_head.weight.device
    optimizer.zero_grad()
    with ctx or nullcontext():
        if device.type in eager.pack_on:
            loss = calc_loss_batch(inputs, targets, model, device)
        else:
            loss = prepared_loss(inputs, targets, model, device,
                                             eager.pos_emb.num_embeddings)
    loss.backward()
    optimizer.step()
    return loss.item()


def training_setup(size, path, seed=0, device="cpu", precision="fp32", compile_forward=False):
    """(model, optimizer, step function) of the "book" or the "fast" path, same initial weights.

    book: the spelled-out attention, layer norm and GELU, and AdamW's per-tensor loop (PyTorch's
    default on a CPU); fast: fused kernels, the loss through `calc_loss_batch` (rows packed up
    to their last counted target) and fused AdamW, as the chapter script trains, with its
    `--precision` and `--compile` options. The book path is always float32 and eager.
    """
    torch.manual_seed(seed)
    fast = path == "fast"
    model = GPTModel(gpt2_config(size, fused=fast)).to(device).train()
    if fast:
        device = torch.device(device)
        train_model = compiled_for_training(model, device) if compile_forward else model
        return (train_model, make_optimizer(model, 5e-5, 0.1),
                partial(fast_step, ctx=precision_context(device, precision)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1, foreach=False)
    return model, optimizer, book_step
