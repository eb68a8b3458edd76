"""The chapter's main job phase by phase: the book's published code against ours, on one GPU.

    python benchmarks/bench_gpu.py            # one GPU: 355M, 2 epochs, 110 answers (< 10 min)
    python benchmarks/bench_gpu.py --quick    # the GPU path on a CPU: a small GPT-2, two steps

Every variant starts from the same stand-in weights (random, seeded, saved as a .pth with the
real file layout: no download) and trains on the chapter's own batches (dataset, 85/10/5 split,
seed 123, batch 8, 2 epochs, evaluation of 5 + 5 batches every 5 steps), then answers the test
set with up to 256 new tokens, each in a fresh process so that its memory peaks and compiled
code are its own:

- book: `llms_from_scratch` (the book's package): its GPTModel, calc_loss_loader,
  train_model_simple and generate, one test entry at a time; its answers are timed on the first
  10 entries and scaled to the whole test set.
- fp32, tf32, bf16, fp16, fp32+compile, bf16+compile: this repository's path, as
  `gpt_instruction_finetuning.py` runs it with `--precision` and `--compile`.

Phases: load (model built, weights read onto the device), initial losses, training (its steps),
evaluation (the evaluations during training, together), answers; each with its seconds and its
own peak memory (the CUDA allocator's; on a CPU the process's resident memory). Then the median
training step, the initial losses (the same weights give the same numbers), and what the device
waits for: operations and host-device syncs in one training step (eager variants; a GPU counts
the syncs itself, a CPU counts the operations that make a GPU wait), compiled graphs, graph
breaks, CUDA graph recordings, and the distinct lengths the training steps computed.

--quick takes the GPU path on the CPU (rows computed whole, the compile variant with inductor)
on a 2-layer GPT-2 of 64 dimensions, two steps, so that the tests keep this script honest.
"""

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from contextlib import contextmanager, redirect_stdout

import torch
from common import chapter_data, gpt2_config, machine_line, table
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import gpt_instruction_finetuning as ft
from gpt_download import gpt2_tokenizer
from kit import device as kit_device
from kit.chapter_training import ChapterTraining
from kit.device import (
    LENGTH_MULTIPLE,
    choose_attention_kernels,
    compiled_for_training,
    eager_model,
    pad_to_multiple,
    precision_context,
    with_precision,
)
from previous_chapters import GPTModel, calc_loss_loader, train_model_simple

VARIANTS = {"book": None, "fp32": ("fp32", False), "tf32": ("tf32", False),
            "bf16": ("bf16", False), "fp16": ("fp16", False), "fp32+compile": ("fp32", True),
            "bf16+compile": ("bf16", True)}
QUICK_VARIANTS = ["book", "fp32", "fp32+compile"]
BOOK_ANSWERS = 10  # the book's one-at-a-time answers timed, then scaled to the test set
PHASES = ["load", "initial losses", "training", "evaluation", "answers"]
COUNTED_STEP = 1  # the training step whose operations and syncs are counted (after a warm one)
# Operations after which the host waits for the device: reading a value, or sizing an output by
# the data (nonzero and what builds on it). Boolean-mask indexing is counted where it happens.
SYNCING_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal",
               "repeat_interleave", "bincount", "_unique2", "unique_consecutive"}
MASK_INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}  # bool masks: nonzero


def job_settings(quick):
    """The job's size: the chapter's on a GPU; a few steps of a small GPT-2 for --quick."""
    if quick:
        return {"model": "2-layer", "train": 16, "val": 8, "test": 2, "epochs": 1,
                "max_new_tokens": 4, "device": "cpu"}
    return {"model": "355M", "train": None, "val": None, "test": None, "epochs": 2,
            "max_new_tokens": 256, "device": "cuda"}


def model_config(settings):
    """The GPTModel config of the job: GPT-2 355M, or a 2-layer, 64-dimension one."""
    if settings["model"] == "355M":
        return gpt2_config("355M")
    return {**gpt2_config("124M"), "emb_dim": 64, "n_layers": 2, "n_heads": 2}


def chapter_loaders(settings, tokenizer):
    """(train_loader, val_loader, val_data, test_data) of the chapter, cut for --quick; the
    batches stay on the CPU, as the script's do (each step prepares its own copy)."""
    train, test, val = chapter_data()
    train, val, test = train[:settings["train"]], val[:settings["val"]], test[:settings["test"]]
    torch.manual_seed(123)
    train_loader, val_loader = ft.build_loaders(train, val, tokenizer, 8, ft.Experiment())
    return train_loader, val_loader, val, test


def clock(device):
    """Seconds on a monotonic clock, after the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


class Phases:
    """Seconds and peak memory of each phase; a phase may be entered several times (the
    evaluations within training) and its figures add up (seconds) or take the maximum (peak).

    Peaks are the CUDA allocator's, or on a CPU the resident set's high-water mark, which Linux
    resets on writing 5 to /proc/self/clear_refs. An inner phase's time and peak are its own:
    the outer phase's clock pauses and its peak so far is kept.
    """

    def __init__(self, device):
        self.device = device
        self.seconds = Counter()
        self.peaks = Counter()
        self.open = []

    def peak(self):
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))

    def reset_peak(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def pause(self):
        """Fold the running phase's time and peak so far into its figures."""
        if self.open:
            name, started = self.open[-1]
            now = clock(self.device)
            self.seconds[name] += now - started
            self.peaks[name] = max(self.peaks[name], self.peak())
            self.open[-1] = (name, now)
        self.reset_peak()

    @contextmanager
    def phase(self, name):
        self.pause()
        self.open.append((name, clock(self.device)))
        try:
            yield
        finally:
            self.pause()
            self.open.pop()
            if self.open:
                self.open[-1] = (self.open[-1][0], clock(self.device))


class OpCounter(TorchDispatchMode):
    """Counts the ATen operations dispatched (views left out: they launch no kernel), and those
    that make a GPU's host wait (`SYNCING_OPS`, and indexing with a boolean mask).

    The host's own work on the batch (`kit.device.prepare_batch`, before the copy
    to the device) is left out: on a CPU the counter cannot tell it from the device's.
    """

    def __enter__(self):
        self.prepare = kit_device.prepare_batch
        kit_device.prepare_batch = self.on_the_host(self.prepare)
        return super().__enter__()

    def __exit__(self, *exc_info):
        kit_device.prepare_batch = self.prepare
        return super().__exit__(*exc_info)

    @staticmethod
    def on_the_host(prepare):
        """`prepare` run with the counter suspended."""
        def prepared(*args, **kwargs):
            with _disable_current_modes():
                return prepare(*args, **kwargs)
        return prepared

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if not func.is_view:
            self.ops += 1
        if name in SYNCING_OPS or name in MASK_INDEXING and any(
                t is not None and t.dtype == torch.bool for t in args[1]):
            self.syncs += 1
        return func(*args, **(kwargs or {}))


class CudaSyncCounter:
    """Counts the synchronizing CUDA calls that PyTorch's sync debug mode warns about."""

    def __enter__(self):
        self.caught = warnings.catch_warnings(record=True)
        self.records = self.caught.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc_info):
        torch.cuda.set_sync_debug_mode("default")
        self.syncs = sum("synchroniz" in str(w.message) for w in self.records)
        self.caught.__exit__(*exc_info)


class MeasuredTraining(ChapterTraining):
    """The script's hooks, with the evaluations timed as their own phase, the lengths of the
    training steps recorded, and one step's operations and syncs counted."""

    def __init__(self, *args, phases, count_ops, **kwargs):
        super().__init__(*args, **kwargs)
        self.phases = phases
        self.count_ops = count_ops
        self.lengths = set()
        self.counters = []
        self.step_ops = self.step_syncs = None

    def batch_loss(self, input_batch, target_batch, model, device):
        context_length = eager_model(model).pos_emb.num_embeddings
        self.lengths.add(pad_to_multiple(
            input_batch, LENGTH_MULTIPLE, context_length).shape[1])
        if self.progress.global_step + 1 == COUNTED_STEP:
            if self.count_ops:
                self.counters.append(OpCounter())
            if self.device.type == "cuda":
                self.counters.append(CudaSyncCounter())
            for counter in self.counters:
                counter.__enter__()
        return super().batch_loss(input_batch, target_batch, model, device)

    def step_done(self, progress):
        for counter in reversed(self.counters):
            counter.__exit__(None, None, None)
        if self.counters:
            ops = next((c for c in self.counters if isinstance(c, OpCounter)), None)
            syncs = next((c for c in self.counters if isinstance(c, CudaSyncCounter)), ops)
            self.step_ops = ops and ops.ops
            self.step_syncs = syncs.syncs
            self.counters = []
        super().step_done(progress)

    def evaluate(self, model, train_loader, val_loader, device, eval_iter):
        with self.phases.phase("evaluation"):
            return super().evaluate(model, train_loader, val_loader, device, eval_iter)


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


@contextmanager
def graph_recordings():
    """Count CUDA graph recordings (captures) in the block: yields a list that receives one
    entry per capture."""
    captures = []
    begin = torch.cuda.CUDAGraph.capture_begin

    def counted(self, *args, **kwargs):
        captures.append(1)
        return begin(self, *args, **kwargs)

    torch.cuda.CUDAGraph.capture_begin = counted
    try:
        yield captures
    finally:
        torch.cuda.CUDAGraph.capture_begin = begin


def book_job(weights, settings, device, tokenizer):
    """The book's way; returns the phase figures."""
    import llms_from_scratch.ch05 as book_ch05
    from llms_from_scratch.ch04 import GPTModel as BookGPTModel
    from llms_from_scratch.ch07 import format_input

    phases = Phases(device)
    train_loader, val_loader, val, test = chapter_loaders(settings, tokenizer)
    config = model_config(settings)
    with phases.phase("load"):
        model = BookGPTModel(config)
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        model.to(device).eval()
    with phases.phase("initial losses"), torch.no_grad():
        initial = (book_ch05.calc_loss_loader(train_loader, model, device, num_batches=5),
                   book_ch05.calc_loss_loader(val_loader, model, device, num_batches=5))
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)
    times = step_times(optimizer, device)
    evaluate = book_ch05.evaluate_model

    def timed_evaluation(*args, **kwargs):
        with phases.phase("evaluation"):
            return evaluate(*args, **kwargs)

    book_ch05.evaluate_model = timed_evaluation  # the loop finds it in its module
    torch.manual_seed(123)
    with phases.phase("training"):
        book_ch05.train_model_simple(model, train_loader, val_loader, optimizer, device,
                                     settings["epochs"], 5, 5, format_input(val[0]), tokenizer)
    del optimizer
    model.eval()
    with phases.phase("answers"):
        for entry in test[:BOOK_ANSWERS]:
            ids = book_ch05.text_to_token_ids(format_input(entry), tokenizer).to(device)
            ids = book_ch05.generate(model, ids, settings["max_new_tokens"],
                                     config["context_length"], eos_id=50256)
            book_ch05.token_ids_to_text(ids, tokenizer)
    phases.seconds["answers"] *= len(test) / min(len(test), BOOK_ANSWERS)
    return phases, {"initial": initial, "median step": median_step_ms(times)}


def our_job(weights, settings, device, tokenizer, precision, compile_model):
    """The chapter script's way with `--precision` and `--compile`; returns the phase figures."""
    phases = Phases(device)
    train_loader, val_loader, val, test = chapter_loaders(settings, tokenizer)
    ctx = precision_context(device, precision)
    choose_attention_kernels(device)
    config = model_config(settings)
    with phases.phase("load"):  # as the script's load_model: initialized, then loaded
        model = GPTModel(config)
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        model.to(device).eval()
        model.pack_on = ()  # rows computed whole on every device, as on a GPU
        train_model = compiled_for_training(model, device) if compile_model else model
    with phases.phase("initial losses"), torch.no_grad(), ctx:
        initial = (calc_loss_loader(train_loader, model, device, num_batches=5),
                   calc_loss_loader(val_loader, model, device, num_batches=5))
    optimizer = with_precision(kit_device.make_optimizer(model, 5e-5, 0.1), precision,
                                           device)
    times = step_times(optimizer, device)
    scaler = optimizer if precision == "fp16" else None
    hooks = MeasuredTraining(settings["epochs"], device, ctx=ctx, loss_scaler=scaler,
                             phases=phases, count_ops=not compile_model)
    torch.manual_seed(123)
    recordings = graph_recordings() if device.type == "cuda" else nullcounter()
    with phases.phase("training"), recordings as captures, hooks:
        train_model_simple(train_model, train_loader, val_loader, optimizer, device,
                           settings["epochs"], 5, 5, ft.format_input(val[0]), tokenizer, hooks)
    counters = torch._dynamo.utils.counters
    figures = {"initial": initial, "median step": median_step_ms(times),
               "ops": hooks.step_ops, "syncs": hooks.step_syncs,
               "graphs": counters["stats"]["unique_graphs"],
               "breaks": sum(counters["graph_break"].values()),
               "recordings": len(captures), "lengths": len(hooks.lengths)}
    del optimizer, hooks, train_model, scaler  # nothing from training alive while answering
    gc.collect()  # the timed step refers to the optimizer that refers to it
    model.zero_grad(set_to_none=True)
    model.eval()
    with phases.phase("answers"), ctx:  # batches sized to the device, as the script sizes them
        ft.generate_responses(model, test, tokenizer, config["context_length"],
                              settings["max_new_tokens"])
    return phases, figures


@contextmanager
def nullcounter():
    """No CUDA graphs on a CPU: an empty list of recordings."""
    yield []


def run_variant(name, weights, quick):
    """Run one variant's job here and print its figures as one JSON line."""
    settings = job_settings(quick)
    device = torch.device(settings["device"])
    tokenizer = gpt2_tokenizer()
    with redirect_stdout(sys.stderr):  # the chapter's printed lines, out of the table's way
        if VARIANTS[name] is None:
            phases, figures = book_job(weights, settings, device, tokenizer)
        else:
            phases, figures = our_job(weights, settings, device, tokenizer, *VARIANTS[name])
    figures.update({phase: phases.seconds[phase] for phase in PHASES})
    figures.update({f"{phase} peak": phases.peaks[phase] / 2**30 for phase in PHASES})
    print(json.dumps(figures))


def stand_in_weights(folder, settings):
    """Save seeded random weights of the job's model as a .pth; return its path."""
    torch.manual_seed(123)
    path = os.path.join(folder, "stand-in.pth")
    torch.save(GPTModel(model_config(settings)).state_dict(), path)
    return path


def measure(names, quick):
    """Run each variant in a fresh process; return {name: figures}."""
    settings = job_settings(quick)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        weights = stand_in_weights(folder, settings)
        for name in names:
            command = [sys.executable, os.path.abspath(__file__), "--variant", name,
                       "--weights", weights] + (["--quick"] if quick else [])
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
            results[name] = json.loads(done.stdout.splitlines()[-1])
    return results


def count(value):
    """A count for the table: '-' where it was not taken."""
    return "-" if value is None else str(value)


def rows(results, settings):
    """The table's rows: one per phase and figure, one column per variant."""
    names = list(results)
    out = [[f"{phase} (s)", *(f"{results[n][phase]:.2f}" for n in names)] for phase in PHASES]
    out.append(["whole job (s)", *(f"{sum(results[n][p] for p in PHASES):.2f}" for n in names)])
    memory = "CUDA peak" if settings["device"] == "cuda" else "peak resident"
    out += [[f"{phase}: {memory} (GiB)", *(f"{results[n][phase + ' peak']:.2f}" for n in names)]
            for phase in PHASES]
    out.append(["median step (ms)", *(f"{results[n]['median step']:.1f}" for n in names)])
    out.append(["initial losses", *("{:.4f} / {:.4f}".format(*results[n]["initial"])
                                    for n in names)])
    for key, label in [("ops", "operations per step"), ("syncs", "syncs per step"),
                       ("graphs", "compiled graphs"), ("breaks", "graph breaks"),
                       ("recordings", "CUDA graph recordings"),
                       ("lengths", "distinct step lengths")]:
        out.append([label, *(count(results[n].get(key)) for n in names)])
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="the GPU path on the CPU, a small GPT-2, a few steps and short "
                             "answers: checks it runs")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        help=f"default: all on a GPU; {', '.join(QUICK_VARIANTS)} with --quick")
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        run_variant(args.variant, args.weights, args.quick)
        return
    if not args.quick and not torch.cuda.is_available():
        sys.exit("Error: no CUDA GPU here; run on a GPU, or pass --quick for the CPU check")
    names = args.variants or (QUICK_VARIANTS if args.quick else list(VARIANTS))
    settings = job_settings(args.quick)
    results = measure(names, args.quick)
    print(machine_line())
    job = (f"GPT-2 {settings['model']}, {settings['epochs']} epoch(s), "
           f"{settings['max_new_tokens']} new tokens at most")
    print(table([job, *names], rows(results, settings)))


if __name__ == "__main__":
    main()
