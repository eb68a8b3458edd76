"""The chapter's main job phase by phase: the book's published code against ours, on one GPU.

    python benchmarks/bench_gpu.py            # one GPU: 355M, 2 epochs, 110 answers (< 5 min)
    python benchmarks/bench_gpu.py --quick    # a CPU: 124M, a few steps, a few short answers

Every variant starts from the same stand-in weights (random, seeded, saved as a .pth with the
real file layout: no download) and trains on the chapter's own batches (dataset, 85/10/5 split,
seed 123, batch 8, 2 epochs, evaluation of 5 + 5 batches every 5 steps), then answers the test
set with up to 256 new tokens, each in a fresh process so that its memory peak and compiled code
are its own:

- book: `llms_from_scratch` (the book's package): its GPTModel, calc_loss_loader,
  train_model_simple and generate, one test entry at a time; its answers are timed on the first
  10 entries and scaled to the whole test set.
- fp32, bf16, bf16+compile: this repository's path, as `gpt_instruction_finetuning.py` runs it
  with `--precision` and `--compile`.

Phases: load (model built, weights read onto the device), initial losses, training, answers; the
table adds the whole job, the allocator's peak (CUDA; the process's peak resident memory on a
CPU), the median training step and the initial losses (the same weights give the same numbers).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stdout

import torch
from common import chapter_data, gpt2_config, machine_line, table

import accelerator
import gpt_instruction_finetuning as ft
from gpt_download import gpt2_tokenizer
from previous_chapters import GPTModel, calc_loss_loader, train_model_simple
from training_extras import ChapterTraining

VARIANTS = {"book": None, "fp32": ("fp32", False), "bf16": ("bf16", False),
            "bf16+compile": ("bf16", True)}
BOOK_ANSWERS = 10  # the book's one-at-a-time answers timed, then scaled to the test set


def job_settings(quick):
    """The job's size: the chapter's on a GPU, a few steps of the 124M for --quick."""
    if quick:
        return {"model": "124M", "train": 16, "val": 8, "test": 1, "epochs": 1,
                "max_new_tokens": 4, "device": "cpu"}
    return {"model": "355M", "train": None, "val": None, "test": None, "epochs": 2,
            "max_new_tokens": 256, "device": "cuda"}


def chapter_loaders(settings, tokenizer, device):
    """(train_loader, val_loader, val_data, test_data) of the chapter, cut for --quick."""
    train, test, val = chapter_data()
    train, val, test = train[:settings["train"]], val[:settings["val"]], test[:settings["test"]]
    torch.manual_seed(123)
    train_loader, val_loader = ft.build_loaders(train, val, tokenizer, device, 8,
                                                ft.Experiment())
    return train_loader, val_loader, val, test


def synchronize(device):
    """Wait for the GPU's queued work, so that a clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def clock(device):
    """Seconds on a monotonic clock, after the device's queued work is done."""
    synchronize(device)
    return time.perf_counter()


def step_times(optimizer, device):
    """Record the time of every optimizer step (wrapping `optimizer.step`); return the list."""
    times = []
    step = optimizer.step

    def timed_step(*args, **kwargs):
        result = step(*args, **kwargs)
        times.append(clock(device))
        return result

    optimizer.step = timed_step
    return times


def median_step_ms(times):
    """The median gap between consecutive optimizer steps, in milliseconds (evaluation steps,
    one in five, do not move the median)."""
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return statistics.median(gaps) * 1000 if gaps else float("nan")


def book_job(weights, settings, device, tokenizer):
    """The book's way; returns the phase seconds and figures."""
    from llms_from_scratch.ch04 import GPTModel as BookGPTModel
    from llms_from_scratch.ch05 import calc_loss_loader as book_calc_loss_loader
    from llms_from_scratch.ch05 import generate, text_to_token_ids, token_ids_to_text
    from llms_from_scratch.ch05 import train_model_simple as book_train_model_simple
    from llms_from_scratch.ch07 import format_input

    train_loader, val_loader, val, test = chapter_loaders(settings, tokenizer, device)
    start = clock(device)
    config = gpt2_config(settings["model"])
    model = BookGPTModel(config)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.to(device).eval()
    loaded = clock(device)
    with torch.no_grad():
        initial = (book_calc_loss_loader(train_loader, model, device, num_batches=5),
                   book_calc_loss_loader(val_loader, model, device, num_batches=5))
    checked = clock(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)
    times = step_times(optimizer, device)
    torch.manual_seed(123)
    book_train_model_simple(model, train_loader, val_loader, optimizer, device,
                            settings["epochs"], 5, 5, format_input(val[0]), tokenizer)
    trained = clock(device)
    model.eval()
    for entry in test[:BOOK_ANSWERS]:
        prompt = format_input(entry)
        ids = generate(model, text_to_token_ids(prompt, tokenizer).to(device),
                       settings["max_new_tokens"], config["context_length"], eos_id=50256)
        token_ids_to_text(ids, tokenizer)
    answered = clock(device)
    answers = (answered - trained) * len(test) / min(len(test), BOOK_ANSWERS)
    return {"load": loaded - start, "initial losses": checked - loaded,
            "training": trained - checked, "answers": answers, "initial": initial,
            "median step": median_step_ms(times)}


def our_job(weights, settings, device, tokenizer, precision, compile_model):
    """The chapter script's way with `--precision` and `--compile`; returns the figures."""
    train_loader, val_loader, val, test = chapter_loaders(settings, tokenizer, device)
    ctx = accelerator.precision_context(device, precision)
    accelerator.choose_attention_kernels(device)
    start = clock(device)
    config = gpt2_config(settings["model"])
    model = GPTModel(config)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.to(device).eval()
    train_model = accelerator.compiled_for_training(model, device) if compile_model else model
    loaded = clock(device)
    with torch.no_grad(), ctx:
        initial = (calc_loss_loader(train_loader, model, device, num_batches=5),
                   calc_loss_loader(val_loader, model, device, num_batches=5))
    checked = clock(device)
    optimizer = ft.make_optimizer(model, 5e-5, 0.1)
    times = step_times(optimizer, device)
    torch.manual_seed(123)
    with ChapterTraining(settings["epochs"], device, ctx=ctx) as hooks:
        train_model_simple(train_model, train_loader, val_loader, optimizer, device,
                           settings["epochs"], 5, 5, ft.format_input(val[0]), tokenizer, hooks)
    trained = clock(device)
    model.eval()
    with ctx:  # batches sized to the device, as the script sizes them
        ft.generate_responses(model, test, tokenizer, config["context_length"],
                              settings["max_new_tokens"])
    answered = clock(device)
    return {"load": loaded - start, "initial losses": checked - loaded,
            "training": trained - checked, "answers": answered - trained, "initial": initial,
            "median step": median_step_ms(times)}


def run_variant(name, weights, quick):
    """Run one variant's job here and print its figures as one JSON line."""
    settings = job_settings(quick)
    device = torch.device(settings["device"])
    tokenizer = gpt2_tokenizer()
    with redirect_stdout(sys.stderr):  # the chapter's printed lines, out of the table's way
        if VARIANTS[name] is None:
            figures = book_job(weights, settings, device, tokenizer)
        else:
            figures = our_job(weights, settings, device, tokenizer, *VARIANTS[name])
    if device.type == "cuda":
        figures["peak"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        figures["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(figures))


def stand_in_weights(folder, size):
    """Save seeded random weights of GPT-2 `size` as a .pth; return its path."""
    torch.manual_seed(123)
    path = os.path.join(folder, f"stand-in-{size}.pth")
    torch.save(GPTModel(gpt2_config(size)).state_dict(), path)
    return path


def measure(names, quick):
    """Run each variant in a fresh process; return {name: figures}."""
    settings = job_settings(quick)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        weights = stand_in_weights(folder, settings["model"])
        for name in names:
            command = [sys.executable, os.path.abspath(__file__), "--variant", name,
                       "--weights", weights] + (["--quick"] if quick else [])
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
            results[name] = json.loads(done.stdout.splitlines()[-1])
    return results


def rows(results, settings):
    """The table's rows: one per phase and figure, one column per variant."""
    names = list(results)
    phases = ["load", "initial losses", "training", "answers"]
    out = [[f"{phase} (s)", *(f"{results[n][phase]:.2f}" for n in names)] for phase in phases]
    out.append(["whole job (s)", *(f"{sum(results[n][p] for p in phases):.2f}" for n in names)])
    memory = "CUDA peak (GiB)" if settings["device"] == "cuda" else "peak resident (GiB)"
    out.append([memory, *(f"{results[n]['peak']:.2f}" for n in names)])
    out.append(["median step (ms)", *(f"{results[n]['median step']:.1f}" for n in names)])
    out.append(["initial losses", *("{:.4f} / {:.4f}".format(*results[n]["initial"])
                                    for n in names)])
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="124M on the CPU, a few steps and short answers: checks it runs")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        help="default: all on a GPU; book, fp32 and bf16 with --quick")
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        run_variant(args.variant, args.weights, args.quick)
        return
    if not args.quick and not torch.cuda.is_available():
        sys.exit("Error: no CUDA GPU here; run on a GPU, or pass --quick for the CPU check")
    names = args.variants or (["book", "fp32", "bf16"] if args.quick else list(VARIANTS))
    settings = job_settings(args.quick)
    results = measure(names, args.quick)
    print(machine_line())
    job = (f"GPT-2 {settings['model']}, {settings['epochs']} epoch(s), "
           f"{settings['max_new_tokens']} new tokens at most")
    print(table([job, *names], rows(results, settings)))


if __name__ == "__main__":
    main()
