"""What the chapter script adds around the book's training loop, kept out of the chapter's code.

- torchrun: joining the process group, dealing the chapter's shuffled batches out over the
  ranks, weighting the loss and counting tokens as one process would, leaving the group cleanly.
- Resuming: a checkpoint of the weights, optimizer, progress (with the metrics rows) and random
  states at every epoch end and when a signal stops training, every field checked before use
  and refused when saved with other settings; a resumed run ends with the same weights as an
  uninterrupted one.
- Stopping: Ctrl-C, SIGTERM or SIGHUP stop training after the running step (saving a
  checkpoint); training stops at the first step whose loss or gradient norm is not finite,
  before any checkpoint or metrics row holds it.
- A progress bar over the training steps, with an ETA, on stderr; lines printed meanwhile
  appear whole above it.
- Precision, micro-batches and the GPU path: the loss computed under the run's autocast
  context (scaled for fp16), a batch computed a few rows at a time with gradients accumulated,
  and where rows are not packed (GPUs) each batch prepared on the CPU for the device.
- A metrics log: one CSV row per evaluation, appended as training goes.
- The run's set-up and bookkeeping: the bf16 autocast context, the attention kernels and
  torch.compile for the training model, the size of generation batches, the settings a
  checkpoint records, and the run's files (`RunFiles`): one run at a time per folder, what a
  killed save left removed, the answers kept as they come, the checkpoint resumed, replaced or
  removed, and every early end (an interrupt, a failed write, a diverging loss) one line that
  says what is saved and how to go on.

`ChapterTraining` bundles the training parts as the `hooks` of
`previous_chapters.train_model_simple`.
"""

import contextlib
import csv
import errno
import hashlib
import json
import math
import os
import reprlib
import signal
import sys
import time
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass
from itertools import islice

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler
from tqdm import tqdm

from accelerator import (
    compiled_for_training,
    device_type,
    eager_model,
    pick_device,
    precision_context,
    prepared_loss,
)
from finetuned_model import all_finite, first_line, read_pth, save_finetuned_model, save_pth
from kit.run_files import check_name_lengths, existing_outputs, names, refuse_foreign_files
from previous_chapters import IGNORE_INDEX, TrainingHooks, plot_losses
from script_utils import (
    DataError,
    Interrupted,
    StopRequests,
    WriteError,
    atomic_write,
    exit_code,
    fail,
    lock_file,
    lock_holder,
    read_json,
    remove_leftover_temporaries,
    save_json,
    signals_held,
    stop_line,
    unlock_file,
)

#####################################
# torchrun
#####################################


def init_distributed(device):
    """Join the process group when torchrun started this process; return (device, rank, world).

    A plain `python` run has no process group: rank 0 of a world of 1 on `device`. Under
    torchrun, GPUs talk through nccl (one GPU per process) and CPUs through gloo, and the
    printing of ranks other than 0 is silenced.
    """
    if "WORLD_SIZE" not in os.environ:
        return device, 0, 1
    if device.type == "cuda":
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend)
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")  # only rank 0 prints
    return device, dist.get_rank(), dist.get_world_size()


@dataclass(frozen=True)
class RunSetup:
    """Where and how a run computes, and where it writes, decided once at its start: the
    device (under torchrun, this process's GPU), this process's rank and the world size, the
    precision context the losses and answers are computed in, and the output paths. The
    chapter's functions get these as their explicit arguments."""

    device: torch.device
    rank: int
    world_size: int
    ctx: object
    paths: dict

    def describe(self):
        """The device line the script prints."""
        if self.world_size == 1:
            return str(self.device)
        return f"{self.device.type} x {self.world_size} processes"


def setup_run(args, paths):
    """The run's `RunSetup` from --device and --precision: joins torchrun's process group when
    torchrun started this process."""
    device, rank, world_size = init_distributed(pick_device(args.device))
    return RunSetup(device, rank, world_size, precision_context(device, args.precision), paths)


def is_distributed():
    """True in a run of several processes started by torchrun."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process():
    """True in a single-process run, and on rank 0 of a distributed one."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@contextmanager
def main_process_first(rank, world_size):
    """Let rank 0 run the block (downloads) before the other ranks, which then find the files."""
    if world_size > 1 and rank != 0:
        dist.barrier()
    yield
    if world_size > 1 and rank == 0:
        dist.barrier()


class ShardedShuffleSampler(Sampler):
    """The chapter's shuffled order, dealt out over the ranks of a distributed run.

    Every rank draws the same permutation, from the global random state as the chapter's
    shuffling loader does, keeps only whole global batches (the chapter drops the last partial
    one), and takes every `world_size`-th index from `rank` on. With per-rank batches of
    `global_batch_size // world_size`, rank r's k-th batch is its share of the k-th batch of a
    single process; with one process the batches are exactly the chapter's.
    """

    def __init__(self, dataset_len, global_batch_size, rank, world_size):
        self.dataset_len = dataset_len
        self.usable = dataset_len // global_batch_size * global_batch_size
        self.rank = rank
        self.world_size = world_size

    def __iter__(self):
        seed = int(torch.empty((), dtype=torch.int64).random_().item())  # RandomSampler's draw
        generator = torch.Generator()
        generator.manual_seed(seed)
        order = torch.randperm(self.dataset_len, generator=generator).tolist()
        yield from order[:self.usable][self.rank::self.world_size]

    def __len__(self):
        return self.usable // self.world_size


def token_loss_sum(input_batch, target_batch, model):
    """(summed cross-entropy over the batch's counted targets, their number).

    Dividing sums by the count of a whole batch weighs every counted token alike, however the
    batch is split: over ranks under torchrun, or into micro-batches.
    """
    keep = target_batch != IGNORE_INDEX  # (b, num_tokens)
    logits = model(input_batch, keep=keep)  # (num_kept, vocab_size)
    return F.cross_entropy(logits.float(), target_batch[keep], reduction="sum"), keep.sum()


def global_batch_tokens(input_batch, device):
    """Tokens of the global batch as one process would count them: rows x the longest row.

    Each rank pads its share to its own longest sequence; one process pads the whole batch to
    the longest of all, so the count is every rank's rows times the longest padded length.
    """
    length = torch.tensor(input_batch.shape[1], device=device)
    dist.all_reduce(length, op=dist.ReduceOp.MAX)
    return input_batch.shape[0] * dist.get_world_size() * int(length.item())


def mean_across_ranks(value, device):
    """Average a Python float over all ranks."""
    tensor = torch.tensor(value, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.item() / dist.get_world_size()


def any_rank(flag, device):
    """True when `flag` is True on any rank, so that all ranks take the same decision."""
    tensor = torch.tensor(int(flag), device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def leave_process_group(rank):
    """End the distributed part after training; only rank 0 goes on to generate and save.

    The ranks meet at a barrier and close the group together, so none of them waits through
    rank 0's generation (a long wait would hit the group's timeout). The other ranks then end
    with `os._exit`: gloo's worker threads may still be releasing the last gradient all-reduce,
    which needs the GIL, and a thread that asks for it while Python shuts down aborts the whole
    process ("terminate called without an active exception"). Those ranks have nothing left to
    write, and skipping the shutdown leaves no such thread behind.
    """
    dist.barrier()
    dist.destroy_process_group()
    if rank != 0:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


#####################################
# Resuming: the checkpoint, checked field by field
#####################################


def rng_states():
    """The random number generator states that decide shuffling and dropout."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states):
    """Restore states saved by `rng_states`."""
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path, model, optimizer, progress, settings):
    """Save what resuming needs: weights, optimizer moments, progress, random states, and the
    settings the run was started with."""
    save_pth({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
              "progress": progress, "settings": settings}, path)


def is_count(value):
    """A whole number from 0 (to Python a bool is an int too, but not a count)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_number(value):
    """An int or a float, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_rng_state(value):
    """None, or random states as `rng_states` returns them."""
    if value is None:
        return True
    if not isinstance(value, dict):
        return False
    states = [value.get("torch"), *value.get("cuda", [])]
    return all(isinstance(state, torch.Tensor) and state.dtype == torch.uint8
               for state in states)


PROGRESS_FIELDS = {  # field of a checkpoint's progress -> (check, what the field must be)
    "epoch": (is_count, "a whole number"),
    "global_step": (lambda v: is_number(v) and is_count(v + 1), "a whole number from -1"),
    "tokens_seen": (is_count, "a whole number"),
    "train_losses": (lambda v: isinstance(v, list) and all(map(is_number, v)),
                     "a list of numbers"),
    "val_losses": (lambda v: isinstance(v, list) and all(map(is_number, v)),
                   "a list of numbers"),
    "track_tokens_seen": (lambda v: isinstance(v, list) and all(map(is_count, v)),
                          "a list of whole numbers"),
    "batches_done": (is_count, "a whole number"),
    "num_epochs": (lambda v: is_count(v) and v > 0, "a whole number from 1"),
    "seconds": (is_number, "a number"),
    "started": (is_number, "a number"),
    "epoch_rng": (is_rng_state, "random states or None"),
    "rng": (is_rng_state, "random states or None"),
    "metrics": (lambda v: isinstance(v, list) and all(map(is_metrics_row, v)),
                "a list of metrics rows"),
    "best": (lambda v: v is None or is_metrics_row(v), "a metrics row or None"),
    "evals_since_best": (is_count, "a whole number"),
    "stopped_early": (lambda v: isinstance(v, bool), "true or false"),
    "schedule": (lambda v: isinstance(v, dict) and is_count(v.get("total_steps")),
                 "a learning-rate schedule"),
}


def is_metrics_row(value):
    """Whether `value` is a metrics row: a dict with a number in every metrics column."""
    return isinstance(value, dict) and all(is_number(value.get(k)) for k in METRICS_FIELDS)


def check_checkpoint(path, checkpoint, settings):
    """Raise DataError naming `path` (and the field) unless `checkpoint` is a whole checkpoint
    of this script saved with `settings`: every field that resuming reads is there with the
    right type, checked before anything is built from it."""
    fix = "delete it or run without --resume"
    parts = ("model", "optimizer", "progress", "settings")
    if not (isinstance(checkpoint, dict) and set(parts) <= checkpoint.keys()):
        raise DataError(f"{path}: not a checkpoint of this script; {fix}")
    for part in parts:
        if not isinstance(checkpoint[part], dict):
            raise DataError(f"{path}: the checkpoint's '{part}' is not a dict but "
                            f"{type(checkpoint[part]).__name__}; {fix}")
    progress = checkpoint["progress"]
    for name, (check, what) in PROGRESS_FIELDS.items():
        if name not in progress:
            raise DataError(f"{path}: the checkpoint's progress has no field '{name}'; {fix}")
        if not check(progress[name]):
            raise DataError(f"{path}: the checkpoint's progress field '{name}' must be {what}, "
                            f"not {reprlib.repr(progress[name])}; {fix}")
    lengths = [len(progress[name]) for name in
               ("train_losses", "val_losses", "track_tokens_seen", "metrics")]
    if len(set(lengths)) > 1:
        raise DataError(f"{path}: the checkpoint's progress fields train_losses, val_losses, "
                        f"track_tokens_seen and metrics differ in length "
                        f"({', '.join(map(str, lengths))}); {fix}")
    saved = checkpoint["settings"]
    for name, value in settings.items():
        if name not in saved:
            raise DataError(f"{path}: the checkpoint's settings have no field '{name}'; {fix}")
        if saved[name] != value:
            raise DataError(f"{path} was saved with {name} {saved[name]}, this run has {name} "
                            f"{value}; {fix}, or resume with the same settings")


def restore_checkpoint(path, checkpoint, model, optimizer):
    """Load a checked `checkpoint`'s weights and optimizer state into `model` and `optimizer`;
    return its progress. Raises DataError naming `path` when it was made for another model."""
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: the checkpoint does not fit this model ({first_line(exc)}); "
                        "delete it or run without --resume") from None
    return checkpoint["progress"]



#####################################
# The training model: compiled, and wrapped for torchrun
#####################################


def training_model(model, compile_model, device):
    """The model the training loop calls: compiled with --compile, and wrapped in
    DistributedDataParallel under torchrun. Generation and saving use `model` as it is."""
    if compile_model:
        model = compiled_for_training(model, device)
    if not dist.is_initialized():
        return model
    # Gradients are averaged over the processes after each backward.
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        broadcast_buffers=False)  # the only buffers are constant causal masks


#####################################
# The run's bookkeeping: its settings, its files, and what of them is saved
#####################################


def run_settings(args, experiment, model_name, train_data, val_data, test_data):
    """What a checkpoint's run depended on: resuming with anything else would mix runs. The
    validation entries decide the losses and the best weights, the test entries the answers;
    --keep_best decides whether the best-weights file holds the run's best evaluation."""
    return {"--model": model_name, "--seed": args.seed, "--lr": args.lr,
            "--weight_decay": args.weight_decay, "--batch_size": experiment.batch_size,
            "--precision": args.precision, "--warmup_steps": args.warmup_steps,
            "--initial_lr": args.initial_lr, "--lr_schedule": args.lr_schedule,
            "--min_lr": args.min_lr, "--grad_clip": args.grad_clip,
            "--keep_best": args.keep_best, "training data": fingerprint(train_data),
            "validation data": fingerprint(val_data), "test data": fingerprint(test_data),
            "experiment": experiment.name, **experiment.settings}


def fingerprint(entries):
    """A short hash of the entries' content: any edit to the training data changes it."""
    text = json.dumps(entries, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def will_resume(resume, checkpoint):
    """Whether this run continues `checkpoint` (--resume; `RunFiles` has refused --resume
    without one). Without --resume an existing checkpoint is about to be replaced: say so
    before any training, and how to continue it."""
    exists = os.path.exists(checkpoint)
    if not resume and exists:
        print(f"Note: {checkpoint} holds an earlier run's progress; this run starts over and "
              "replaces it at its first epoch end. To continue that run instead, stop now "
              "(Ctrl-C) and run the same command with --resume.")
    return resume and exists


def epochs_to_train(requested, checkpoint, progress, default):
    """The epoch count to train to: --epochs (`requested`), else the resumed run's own
    (`default` for a new run). Raises DataError when --epochs is below the epochs the
    checkpoint has already trained."""
    if progress is None:
        return requested or default
    done, planned = progress["epoch"], progress["num_epochs"]
    if requested is not None and requested < done:
        raise DataError(f"--epochs {requested}: {checkpoint} has already trained {done} "
                        f"epochs; pass --epochs {done} or more, or leave --epochs out to "
                        f"finish its {planned}")
    epochs = requested or planned
    if progress["stopped_early"]:
        print(f"Resuming from {checkpoint}: training stopped early after step "
              f"{progress['global_step']}, so this run writes the outputs")
    elif done >= epochs:
        print(f"Resuming from {checkpoint}: training finished at epoch {done}, so this run "
              f"writes the outputs (--epochs {done + 1} or more would train further)")
    else:
        print(f"Resuming from {checkpoint}: epoch {done + 1} of {epochs}, "
              f"{progress['global_step'] + 1} steps done")
    return epochs


def remove_checkpoint(checkpoint, keep):
    """Delete the checkpoint once every output of the run is written (it is as large as the
    model and its optimizer state together), unless --keep_checkpoint."""
    if keep or not os.path.exists(checkpoint):
        return
    os.remove(checkpoint)
    print(f"Removed {checkpoint}: the run is complete (--keep_checkpoint keeps it)")


def plural(count, noun):
    """'1 step', '2 steps': `count` and `noun`, in the plural unless the count is 1."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


class RunFiles:
    """The files of one run in its output folder (`paths`, from `output_paths`), and what of
    them is saved at any moment.

    Entered around the run, it
    - keeps a second run of the same outputs out of the folder while this one runs: a lock file
      that the operating system releases when the process ends, however it ends;
    - refuses, before any work, a run name too long for the file system, an output that is a
      link or a folder, and --resume without a checkpoint (saying what of the run is there);
    - removes the temporary files that a save left when its process was killed;
    - reads the checkpoint to resume from, checked before anything is built from it
      (`check_resume`), and saves this run's checkpoints (`saver`); an earlier run's
      checkpoint, metrics and best weights stay until this run's first epoch end (the best
      weights found before then wait in memory), and its other outputs until this run writes
      its own (an earlier best file that this run does not replace goes with them);
    - keeps the test set answers as they come (`answer_log`);
    - ends an interrupt (Ctrl-C, SIGTERM, SIGHUP), a failed write or a diverging loss with one
      line that says what is saved and how to go on: exit code 128 + the signal, or 1.
    Under torchrun rank 0 holds the lock, writes and reports; all ranks exit alike.
    """

    def __init__(self, setup, args, run_name=None):
        self.paths = setup.paths
        self.run_name = run_name
        self.checkpoint = setup.paths["checkpoint"]
        self.args = args
        self.device, self.rank, self.world_size = setup.device, setup.rank, setup.world_size
        self.lock = None
        self.resuming = False  # continues the checkpoint (--resume, and one is there)
        self.earlier = False  # a checkpoint that this run did not write is at `checkpoint`
        self.saved_steps = None  # the training steps that the checkpoint holds for this run
        self.trained = False  # the checkpoint holds the finished training
        self.best_step = None  # the step whose weights the best-weights file holds
        self.earlier_outputs = []  # the outputs that an earlier run of this name left
        self.pending_best = None  # best weights that wait for this run's first checkpoint
        self.answers = None
        self.settings = None
        self.resume_from = None
        self.epochs = None

    def __enter__(self):
        problem = None
        if self.rank == 0:
            try:
                self.check_files()
            except DataError as exc:
                problem = exc
        refused = problem is not None
        if self.world_size > 1:
            refused = any_rank(refused, self.device)
        if refused:
            self.release_lock()
            if problem is not None:
                raise problem
            raise SystemExit(2)
        self.earlier = os.path.exists(self.checkpoint)
        self.earlier_outputs = existing_outputs(self.paths)
        if self.rank == 0:
            self.remove_leftovers()
        return self

    def __exit__(self, exc_type, exc, traceback):
        try:
            if isinstance(exc, KeyboardInterrupt):
                if self.rank == 0:
                    print(stop_line(exc, *self.kept()), file=sys.stderr)
                raise SystemExit(exit_code(exc)) from None
            if isinstance(exc, OSError):
                self.end(self.write_failure(exc))
            if isinstance(exc, TrainingDiverged):
                self.end(self.divergence(exc))
        finally:
            self.release_lock()
        return False

    def check_files(self):
        """Refuse this run before any work when its files cannot be its own: a name too long
        for the file system, an output that is a link or a folder, another run holding the
        lock, or --resume without a checkpoint to continue."""
        folder = os.path.dirname(self.checkpoint) or "."
        if self.run_name is not None:
            check_name_lengths(self.paths, self.run_name, folder)
        refuse_foreign_files(self.paths)
        if not self.take_lock():
            raise DataError(self.lock_refusal())
        if self.args.resume and not os.path.exists(self.checkpoint):
            existing = existing_outputs(self.paths)
            if not existing:
                raise DataError(f"--resume: there is no checkpoint {self.checkpoint} to "
                                f"continue, and no other file of this run is in {folder}; run "
                                "without --resume to start the run")
            raise DataError(f"--resume: there is no checkpoint {self.checkpoint} to continue; "
                            f"of this run, {folder} holds only {names(existing)} (a finished "
                            "run's checkpoint is removed unless --keep_checkpoint); run without "
                            "--resume to train anew, replacing them, or pass another --run_name")

    def release_lock(self):
        """Release the lock on this run's outputs, when this process holds it."""
        if self.lock is not None:
            unlock_file(self.lock)
            self.lock = None

    def take_lock(self):
        """Hold the lock on this run's outputs; False when another run holds it."""
        self.lock = lock_file(self.paths["lock"])
        return self.lock is not None

    def lock_refusal(self):
        """The line that refuses this run while another holds the lock."""
        holder = lock_holder(self.paths["lock"])
        who = "another run" if holder is None else f"another run (process {holder})"
        return (f"{who} is writing these outputs in {os.path.dirname(self.paths['lock']) or '.'} "
                f"({self.paths['lock']} is locked); wait for it to end, or pass another "
                "--output_dir")

    def remove_leftovers(self):
        """Remove what saves of these outputs left when their process was killed (a
        checkpoint's is as large as the checkpoint), saying so in one line."""
        count, size = remove_leftover_temporaries(self.paths.values())
        if count:
            print(f"Removed {plural(count, 'temporary file')} ({size / 1e6:.1f} MB) that an "
                  f"interrupted save left in {os.path.dirname(self.checkpoint) or '.'}")

    def check_resume(self, settings, requested_epochs, default_epochs):
        """Before anything is built: say what becomes of a checkpoint that is there, read and
        check the one to continue (--resume), and decide the epochs to train (`epochs`)."""
        self.settings = settings
        progress = None
        self.resuming = will_resume(self.args.resume, self.checkpoint)
        if self.earlier_outputs and not self.resuming:
            self.say_replaced()
        if self.resuming:
            self.resume_from = read_pth(self.checkpoint, "delete it or run without --resume")
            check_checkpoint(self.checkpoint, self.resume_from, settings)
            progress = self.resume_from["progress"]
            self.saved_steps = progress["global_step"] + 1
        self.epochs = epochs_to_train(requested_epochs, self.checkpoint, progress,
                                      default_epochs)
        self.trained = progress is not None and (progress["epoch"] >= self.epochs
                                                 or progress["stopped_early"])

    def check_schedule(self, schedule):
        """Refuse to resume a cosine schedule over another number of steps than it was started
        with (another --epochs): its rates so far belong to that length."""
        saved = self.resume_from["progress"]["schedule"] if self.resume_from else None
        if schedule.kind == "cosine" and saved is not None and \
                saved["total_steps"] != schedule.total_steps:
            raise DataError(f"{self.checkpoint}: its cosine schedule spans "
                            f"{saved['total_steps']} steps and this run's "
                            f"{schedule.total_steps}; resume with the --epochs it was started "
                            "with (leave --epochs out)")

    def say_replaced(self):
        """Say, before a new run trains, which outputs of an earlier run of its name it
        replaces, and when."""
        best = self.paths["best"]
        dropped = ""
        if best in self.earlier_outputs and not self.args.keep_best:
            dropped = (f", and removes {os.path.basename(best)} with them (without --keep_best "
                       "it keeps no best weights)")
        print(f"Note: {os.path.dirname(best) or '.'} holds the outputs of an earlier run of "
              f"this name ({names(self.earlier_outputs)}); this run replaces them as it writes "
              f"its own, none before its first epoch end{dropped}. To keep them, stop now "
              "(Ctrl-C) and pass another --run_name or --output_dir.")

    @property
    def keeps_earlier(self):
        """Whether an earlier run's checkpoint or outputs are here that this new run replaces
        only from its first epoch end: a stop before then keeps them, and saves nothing of
        this run."""
        return (self.earlier or bool(self.earlier_outputs)) and not self.resuming

    def restore(self, model, optimizer):
        """The progress to resume from, with `model` and `optimizer` restored to it; None for
        a run that starts over."""
        if self.resume_from is None:
            return None
        checkpoint, self.resume_from = self.resume_from, None
        return restore_checkpoint(self.checkpoint, checkpoint, model, optimizer)

    def saver(self, model, optimizer):
        """The `save_checkpoint(progress)` of `ChapterTraining`: rank 0 saves, others do not."""
        if self.rank != 0:
            return None
        return lambda progress: self.save_checkpoint(model, optimizer, progress)

    def save_checkpoint(self, model, optimizer, progress):
        """Save this run's checkpoint (the first one replaces an earlier run's), and note what
        it holds before any signal held meanwhile is acted on."""
        with signals_held(f"Saving checkpoint {self.checkpoint} (do not interrupt); stopping "
                          "once it is written"):
            save_checkpoint(self.checkpoint, model, optimizer, progress, self.settings)
            self.earlier = False
            self.earlier_outputs = []
            if self.pending_best is not None:
                self.write_best(*self.pending_best)
                self.pending_best = None
            self.saved_steps = progress["global_step"] + 1
            self.trained = ((progress["epoch"] >= progress["num_epochs"]
                             and progress["batches_done"] == 0) or progress["stopped_early"])

    def best_saver(self, model, describe):
        """The `save(progress)` of `BestWeights`: the weights of `model` as they are now, with
        the JSON `describe(model, progress, weights="best")`, written whole at once (rank 0).

        While an earlier run's files are kept (`keeps_earlier`), a copy of the weights waits
        in CPU memory instead and is written with this run's first checkpoint, so that a stop
        before then leaves the earlier best weights as they were.
        """
        if self.rank != 0:
            return None

        def save(progress):
            info = describe(model, progress, weights="best")
            if self.keeps_earlier:
                weights = {name: tensor.detach().to("cpu", copy=True)
                           for name, tensor in model.state_dict().items()}
                self.pending_best = (weights, info, progress["global_step"])
            else:
                self.write_best(model, info, progress["global_step"])
        return save

    def write_best(self, weights, info, step):
        """Write the best weights (a model or its state dict) of `step` with their JSON."""
        with signals_held(f"Saving the best weights {self.paths['best']} (do not "
                          "interrupt); stopping once they are written"):
            save_finetuned_model(weights, self.paths["best"], info)
            self.best_step = step

    def holds_best(self, best):
        """Whether the best-weights file holds the weights of the evaluation `best` (a
        metrics row), as the JSON beside it says."""
        if not os.path.isfile(self.paths["best"]):
            return False
        try:
            info = read_json(self.paths["best_info"])
        except DataError:
            return False
        return (isinstance(info, dict) and info.get("losses_step") == best["step"]
                and info.get("val_loss") == best["val_loss"])

    def answer_log(self, progress, max_new_tokens, test_data):
        """Where the test set answers of the weights of `progress` are kept as they come."""
        key = fingerprint([progress["started"], progress["global_step"], max_new_tokens,
                           test_data])
        self.answers = AnswerLog(self.paths["answers"], key, len(test_data))
        return self.answers

    def finish(self, keep_checkpoint):
        """Once every output is written: remove the kept answers, and the checkpoint unless
        --keep_checkpoint."""
        if self.answers is not None:
            self.answers.remove()
        if not self.args.keep_best:
            self.remove_earlier_best()
        remove_checkpoint(self.checkpoint, keep_checkpoint)

    def remove_earlier_best(self):
        """Remove best weights left by an earlier run of this name, which this run (without
        --keep_best) does not replace: beside this run's outputs they would pass as its own."""
        removed = [path for path in (self.paths["best"], self.paths["best_info"])
                   if os.path.exists(path)]
        for path in removed:
            os.remove(path)
        if removed:
            print(f"Removed {names(removed)} from {os.path.dirname(removed[0]) or '.'}: an "
                  "earlier run's best weights (--keep_best keeps this run's)")

    def kept(self):
        """(what of the run is saved now, how to go on), for the line that ends it early."""
        what, how = self.kept_training()
        if self.best_step is not None:
            what += (f"; the best weights so far (step {self.best_step}) are in "
                     f"{self.paths['best']}")
        return what, how

    def kept_training(self):
        """(what of the training is saved now, how to go on)."""
        if self.trained:
            what = f"the trained weights are saved in {self.checkpoint}"
            if self.answers is not None and self.answers.count:
                what += (f", and {self.answers.count} of {self.answers.total} test set answers "
                         f"in {self.answers.path}")
            return what, "run the same command with --resume to write the outputs"
        if self.saved_steps is not None:
            return (f"the training so far ({plural(self.saved_steps, 'step')}) is saved in "
                    f"{self.checkpoint}", "run the same command with --resume to continue")
        if self.earlier and self.args.resume:
            return f"{self.checkpoint} is unchanged", "run the same command to continue it"
        if self.earlier:
            return (f"this run's steps were not kept, and {self.checkpoint} still holds the "
                    "earlier run's progress", "run the same command with --resume to continue "
                    "that run, or without --resume to start over")
        if self.earlier_outputs:
            return (f"nothing of this run was saved, and the earlier run's outputs in "
                    f"{os.path.dirname(self.checkpoint) or '.'} are unchanged",
                    "run the same command to start again")
        return "nothing of this run was saved", "run the same command to start again"

    def write_failure(self, exc):
        """The line for a write that failed (`exc`, an OSError)."""
        where = f" {exc.filename}" if exc.filename else ""
        fix = "free space" if exc.errno in (errno.ENOSPC, None) else "fix this"
        what, how = self.kept()
        return f"could not write{where} ({exc.strerror or exc}); {what}; {fix}, then {how}"

    def divergence(self, exc):
        """The line for training that diverged (`exc`, a TrainingDiverged)."""
        what, _ = self.kept()
        if exc.empty_batch:
            advice = ("check the masking and the length limit, which leave some entries "
                      "nothing to learn")
        else:
            advice = f"try a lower --lr than {self.args.lr}"
            if self.args.precision == "bf16":
                advice += " or --precision fp32"
        return f"training stopped at step {exc.step}: {exc.problem}; {what}; {advice}"

    def end(self, message):
        """End the run with exit code 1; rank 0 says why in one line."""
        if self.rank == 0:
            fail(message, code=1)
        raise SystemExit(1)


class AnswerLog:
    """The test set answers generated so far, in a JSON file rewritten after each generation
    batch, so that a run that continues an interrupted one (--resume) answers only the rest.

    `key` names what the answers came from (the weights, the test set, --max_new_tokens):
    answers kept for another key are not reused.
    """

    def __init__(self, path, key, total):
        self.path, self.key, self.total = path, key, total
        self.count = 0

    def load(self):
        """The answers kept for this key, one per test entry (None where there is none)."""
        answers = [None] * self.total
        kept = {}
        if os.path.exists(self.path):
            with suppress(DataError):  # a damaged file: answer everything again
                kept = read_json(self.path)
        if (isinstance(kept, dict) and kept.get("key") == self.key
                and isinstance(kept.get("answers"), list) and len(kept["answers"]) == self.total
                and all(a is None or isinstance(a, str) for a in kept["answers"])):
            answers = kept["answers"]
        self.count = sum(answer is not None for answer in answers)
        if self.count:
            print(f"Reusing {self.count} of {self.total} answers kept in {self.path}")
        return answers

    def save(self, answers):
        """Keep `answers` (None where not answered yet)."""
        save_json({"key": self.key, "answers": answers}, self.path)
        self.count = sum(answer is not None for answer in answers)

    def remove(self):
        with suppress(FileNotFoundError):
            os.remove(self.path)


#####################################
# The metrics log, printing above the bar
#####################################


METRICS_FIELDS = ("epoch", "step", "tokens_seen", "train_loss", "val_loss", "lr", "seconds")
COUNT_FIELDS = ("epoch", "step", "tokens_seen")  # whole numbers; the other columns are floats


def write_metrics_log(path, rows, fields=METRICS_FIELDS):
    """Write the metrics CSV at `path` whole: its header of `fields` and those of `rows`."""
    with atomic_write(path, "w") as f:
        writer = csv.DictWriter(f, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def rebuild_metrics_log(path, rows, fields=METRICS_FIELDS):
    """Rewrite a resumed run's metrics CSV from its checkpoint's `rows`, the evaluations of the
    weights it holds (rows logged after it belong to training that is done again). A missing
    or damaged file, whose curve the checkpoint restores, is said so in one line."""
    problem = None
    if not os.path.exists(path):
        problem = f"{path} was missing"
    else:
        try:
            read_metrics(path, fields)
        except DataError as exc:
            problem = str(exc)
    write_metrics_log(path, rows, fields)
    if problem is not None and rows:
        print(f"{problem}; rebuilt its {plural(len(rows), 'row')} from the checkpoint")


def append_metrics_row(path, row, fields=METRICS_FIELDS):
    """Append one evaluation's row (its `fields`) to the metrics CSV and flush it to disk; a
    failed write raises WriteError naming the file."""
    try:
        with open(path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fields, extrasaction="ignore").writerow(row)
    except OSError as exc:
        raise WriteError(exc.errno, exc.strerror or str(exc), path) from exc


def read_metrics(path, fields=METRICS_FIELDS):
    """The rows of a metrics CSV with the columns `fields` as dicts of numbers. Raises
    DataError naming a damaged file (one cut short by a crash mid-line, too)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if tuple(reader.fieldnames or ()) != tuple(fields):
                raise ValueError(f"expected the columns {', '.join(fields)}")
            rows = []
            for r in reader:
                if None in r or None in r.values():
                    raise ValueError(f"line {reader.line_num} does not have the "
                                     f"{len(fields)} columns")
                rows.append({name: int(r[name]) if name in COUNT_FIELDS else float(r[name])
                             for name in fields})
            return rows
    except (ValueError, KeyError) as exc:
        raise DataError(f"{path}: not a metrics log of this script ({exc})") from None


def plot_losses_from_metrics(metrics_path, save_path="loss-plot.pdf"):
    """Draw the chapter's loss plot (`plot_losses`) from a metrics CSV, with the epochs axis
    the script gives it. Raises DataError naming a damaged or empty file."""
    rows = read_metrics(metrics_path)
    if not rows:
        raise DataError(f"{metrics_path}: holds no evaluation yet")
    epochs_seen = torch.linspace(0, rows[-1]["epoch"], len(rows))
    plot_losses(epochs_seen, [row["tokens_seen"] for row in rows],
                [row["train_loss"] for row in rows], [row["val_loss"] for row in rows],
                save_path=save_path)


class PrintAboveBar:
    """Stands in for stdout while a progress bar runs on stderr: each whole line printed is
    written after the bar is cleared, and the bar is drawn again below it. Both streams in one
    terminal then never share a line, and stdout carries exactly the printed lines."""

    def __init__(self, stream, hooks):
        self.stream = stream
        self.hooks = hooks
        self.pending = ""

    def write(self, text):
        *lines, self.pending = (self.pending + text).split("\n")
        if lines:
            bar = self.hooks.bar
            if bar is not None:
                bar.clear()
            self.stream.write("".join(line + "\n" for line in lines))
            self.stream.flush()
            if bar is not None:
                bar.refresh()
        return len(text)

    def flush(self):
        """Write what is left of an unfinished line."""
        if self.pending:
            self.stream.write(self.pending)
            self.pending = ""
        self.stream.flush()


#####################################
# The hooks: all of the above around the book's loop
#####################################


def check_counted_tokens(train_loader, data_path):
    """Refuse a training set none of whose entries has a target that the loss counts (a masking
    or a length limit that leaves only IGNORE_INDEX targets): every step's loss would be 0/0.
    The entries are collated in order, a few at a time, drawing no random numbers."""
    dataset, collate = train_loader.dataset, train_loader.collate_fn
    for start in range(0, len(dataset), 64):
        _, targets = collate([dataset[i] for i in range(start, min(start + 64, len(dataset)))])
        if (targets != IGNORE_INDEX).any():
            return
    raise DataError(f"{data_path}: no training entry has a token that the loss counts (every "
                    "target is masked or cut off by the length limit); check the entries' "
                    "responses and the masking")


class TrainingDiverged(Exception):
    """Training produced a number that is not finite at `step` (`problem` says which);
    `empty_batch`: the step's batch had no target that the loss counts."""

    def __init__(self, step, problem, empty_batch=False):
        super().__init__(f"step {step}: {problem}")
        self.step, self.problem, self.empty_batch = step, problem, empty_batch


class FiniteWatch:
    """Finds the first training step whose loss or gradient norm is not finite.

    Each step is recorded on the device that computed it, without waiting for it; `check`
    reads the records since the last check at once and raises TrainingDiverged for the first
    bad step. Checked before a metrics row is logged and before a checkpoint is saved (with
    the weights themselves, which an update too large can overflow from finite gradients), so
    that neither ever holds a diverged step. Under torchrun every rank finds the same step.

    With `skips_nonfinite` (fp16's gradient scaler) a step whose gradients are not finite was
    skipped, not applied: the scaler lowers its scale and goes on, so such a step is a
    divergence only as the last of more than `MAX_SKIPPED_STEPS` in a row.
    """

    MAX_SKIPPED_STEPS = 16  # fp16's scale has come down from 2**16 to 1 by then

    def __init__(self, device, skips_nonfinite=False):
        self.device = device
        self.skips_nonfinite = skips_nonfinite
        self.skipped_in_a_row = 0
        self.records = []
        self.loss = self.counted = self.last_step = self.norm = None

    def note_loss(self, loss, counted):
        """The running step's loss (the whole batch's) and its count of counted targets."""
        self.loss, self.counted = loss.detach().clone(), counted

    def note_gradients(self, model):
        """The running step's gradient norm, taken before an evaluation frees the gradients."""
        self.norm = gradient_norm(model)

    def record(self, step, model):
        """Record the step just taken: its loss, and the norm of the gradients it applied (as
        noted before they were freed, else as `model` holds them)."""
        norm = gradient_norm(model) if self.norm is None else self.norm
        self.records.append((step, self.loss, norm, self.counted))
        self.last_step, self.norm = step, None

    def check(self, model=None):
        """Raise TrainingDiverged for the first bad step recorded since the last check; with
        `model`, also when its weights are not all finite (after the last recorded step)."""
        records, self.records = self.records, []
        finite = torch.stack([torch.isfinite(loss) & torch.isfinite(norm)
                              for _, loss, norm, _ in records]).tolist() if records else []
        bad = []
        for record, ok in zip(records, finite, strict=True):
            if self.skips_nonfinite:  # a run of skipped steps, and whether it is too long
                self.skipped_in_a_row = 0 if ok else self.skipped_in_a_row + 1
                ok = self.skipped_in_a_row <= self.MAX_SKIPPED_STEPS
            if not ok:
                bad.append(record)
        step = bad[0][0] if bad else None
        if step is None and model is not None and not all_finite(model.parameters()):
            step = self.last_step
        if is_distributed():  # the earliest bad step of any rank
            none = torch.iinfo(torch.int64).max
            found = torch.tensor(none if step is None else step, device=self.device)
            dist.all_reduce(found, op=dist.ReduceOp.MIN)
            step = None if found.item() == none else int(found.item())
        if step is None:
            return
        _, loss, norm, counted = next((r for r in bad if r[0] == step), (step, None, None, 1))
        if int(counted) == 0:
            raise TrainingDiverged(step, "its batch has no token that the loss counts (every "
                                         "target is masked)", empty_batch=True)
        if loss is None:
            raise TrainingDiverged(step, "the weights after it are not finite numbers")
        if self.skips_nonfinite:
            raise TrainingDiverged(step, f"it is the {self.MAX_SKIPPED_STEPS + 1}th step in a "
                                         "row whose gradients are not finite numbers even at "
                                         "fp16's lowest scales; use --precision bf16 or fp32")
        if not math.isfinite(loss.item()):
            raise TrainingDiverged(step, f"the loss is {loss.item()}")
        raise TrainingDiverged(step, f"the gradient norm is {norm.item()}")


def gradient_norm(model):
    """The total norm of `model`'s gradients (a tensor on their device, not waited for)."""
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters()
                                          if p.grad is not None])


class EarlyStopped(Exception):
    """Training stopped because the validation loss stopped improving (--early_stopping)."""


class BestWeights:
    """The evaluation with the lowest validation loss so far (--keep_best, --early_stopping).

    `observe(progress)` follows each evaluation: a new lowest validation loss becomes
    `progress["best"]` (so a resumed run knows it) and, with `save`, its weights are written at
    once (`save(progress)`, `RunFiles.best_saver`). `patience` evaluations in a row without a
    new lowest one end training.
    """

    def __init__(self, save=None, patience=None):
        self.save = save
        self.patience = patience

    def observe(self, progress):
        """Note the evaluation just logged; return whether training should stop now."""
        row, best = progress["metrics"][-1], progress["best"]
        if best is None or row["val_loss"] < best["val_loss"]:
            progress["best"] = dict(row)
            progress["evals_since_best"] = 0
            if self.save is not None:
                self.save(progress)
        else:
            progress["evals_since_best"] += 1
        return self.patience is not None and progress["evals_since_best"] >= self.patience

    def stop_line(self, progress):
        """The line that says training stopped early, and where the best was."""
        best = progress["best"]
        return (f"Early stopping after step {progress['global_step']}: the validation loss has "
                f"not improved for {plural(self.patience, 'evaluation')} (lowest "
                f"{best['val_loss']:.3f}, at step {best['step']})")


class ChapterTraining(TrainingHooks):
    """The book's training loop, resumable, stoppable by a signal, under torchrun, with a bar.

    Use it as a context manager around `train_model_simple(..., hooks=...)`.
    `save_checkpoint(progress)` is called at every epoch end, and when Ctrl-C, SIGTERM or SIGHUP
    stops training after the running step (Interrupted is raised afterwards; a second signal
    stops at once). With `save_on_interrupt` False such a stop saves nothing before the run's
    first epoch end (an earlier run's checkpoint stays). Passing that progress back as
    `resume_progress`, with the model and optimizer restored to the same moment, continues the
    run so that it ends with the same weights as an uninterrupted one. Training stops with
    TrainingDiverged at the first step whose loss or gradient norm is not finite (`FiniteWatch`).
    Under torchrun, `model` is wrapped in DistributedDataParallel and the train loader yields
    each rank's share of the global batches.

    `schedule` (`appendix_d.LearningRateSchedule`) sets each step's learning rate and clips
    the gradients as Appendix D does. `best` (`BestWeights`) follows the lowest validation
    loss, keeps its weights, and ends training early with EarlyStopped, after a checkpoint that
    a resumed run finishes from.

    `ctx` (e.g. a bf16 autocast) is entered wherever the model computes a loss.
    `loss_scaler` (fp16's `accelerator.ScaledOptimizer`, the optimizer of the loop) scales the
    losses before their backward passes and unscales the gradients before they are clipped;
    the steps it skips are not divergences (`FiniteWatch`). Where rows are computed whole (a
    GPU), each batch's loss comes from `accelerator.prepare_batch`: padded to a few lengths,
    the counted positions as indices, copied without making the device wait.
    `micro_batch_size` computes each batch that many rows at a time, accumulating gradients:
    the same update as the whole batch at once, with less memory. `metrics_path` receives one
    CSV row per evaluation; the rows are also kept in the progress, so a resumed run rewrites
    the file from its checkpoint, and a new run replaces an existing file only at its first
    checkpoint.
    """

    metrics_fields = METRICS_FIELDS  # the metrics CSV's columns

    def __init__(self, num_epochs, device, save_checkpoint=None, resume_progress=None,
                 ctx=None, micro_batch_size=None, metrics_path=None, save_on_interrupt=True,
                 schedule=None, best=None, loss_scaler=None):
        self.num_epochs = num_epochs
        self.schedule = schedule
        self.best = best
        self.lr = None
        self.device = device
        self.save_checkpoint = save_checkpoint
        self.resume_progress = resume_progress
        self.ctx = ctx or nullcontext()
        self.micro_batch_size = micro_batch_size
        self.metrics_path = metrics_path if is_main_process() else None
        self.save_on_interrupt = save_on_interrupt
        self.distributed = is_distributed()
        self.loss_scaler = loss_scaler
        self.watch = FiniteWatch(device, skips_nonfinite=loss_scaler is not None)
        self.bar = None

    def __enter__(self):
        self._exit_stack = contextlib.ExitStack()
        self.stops = self._exit_stack.enter_context(StopRequests())
        stdout = PrintAboveBar(sys.stdout, self)
        self._exit_stack.callback(stdout.flush)
        self._exit_stack.enter_context(contextlib.redirect_stdout(stdout))
        return self

    def __exit__(self, exc_type, *exc_info):
        if self.bar is not None:
            self.bar.close()
        self._exit_stack.close()
        if exc_type is None and self.stops.signum is not None:
            raise Interrupted(self.stops.signum)  # arrived after the last epoch's check

    def start(self):
        progress = self.resume_progress or {
            **super().start(), "batches_done": 0, "epoch_rng": None, "rng": None,
            "seconds": 0.0, "started": time.time(), "metrics": [], "best": None,
            "evals_since_best": 0, "stopped_early": False,
            "schedule": None if self.schedule is None else self.schedule.describe()}
        progress["num_epochs"] = self.num_epochs  # what a resumed run trains to by default
        self.progress = progress
        self.started = time.monotonic() - progress["seconds"]
        self.saved_once = self.resume_progress is not None
        self.metrics_live = False  # whether rows go to the file as they come
        if self.metrics_path is not None:
            if self.resume_progress is not None:
                rebuild_metrics_log(self.metrics_path, progress["metrics"],
                                    self.metrics_fields)
                self.metrics_live = True
            elif self.save_checkpoint is None or not os.path.exists(self.metrics_path):
                write_metrics_log(self.metrics_path, [], self.metrics_fields)
                self.metrics_live = True
        return progress

    def epoch_batches(self, train_loader, progress):
        """The epoch's batches; a run resumed mid-epoch replays the epoch's shuffle and skips
        the batches already trained on, then restores the random state of the interruption."""
        if self.bar is None:
            self.bar = tqdm(total=self.num_epochs * len(train_loader),
                            initial=progress["global_step"] + 1, desc="Training", unit="step",
                            file=sys.stderr, disable=not is_main_process())
        if progress["stopped_early"]:  # a resumed run that had stopped early
            raise EarlyStopped()
        resuming_mid_epoch = progress["batches_done"] > 0
        if resuming_mid_epoch:
            set_rng_states(progress["epoch_rng"])
        elif progress["rng"] is not None:
            set_rng_states(progress["rng"])
        progress["epoch_rng"] = rng_states()
        batches = iter(train_loader)
        if resuming_mid_epoch:
            for _ in islice(batches, progress["batches_done"]):
                pass
            set_rng_states(progress["rng"])
        return batches

    def batch_loss(self, input_batch, target_batch, model, device):
        """The batch's loss, under `ctx`. With micro-batches, all but the last micro-batch are
        backpropagated here; the returned loss is the last one's share, whose backward in the
        training loop completes the batch's gradient."""
        self.model = model
        if self.micro_batch_size is None and not self.distributed:
            with self.ctx:
                loss = self.whole_batch_loss(input_batch, target_batch, model, device)
            self.watch.note_loss(loss, (target_batch != IGNORE_INDEX).sum())
            return self.scaled(loss)
        input_batch, target_batch = input_batch.to(device), target_batch.to(device)
        counted = (target_batch != IGNORE_INDEX).sum()  # the whole batch's counted targets
        ranks = 1
        if self.distributed:  # DDP averages gradients over ranks: scale the sums back up
            dist.all_reduce(counted)
            ranks = dist.get_world_size()
        size = self.micro_batch_size or len(input_batch)
        parts = list(zip(input_batch.split(size), target_batch.split(size), strict=True))
        shares = []
        for inputs, targets in parts[:-1]:
            with model.no_sync() if self.distributed else nullcontext():  # sync on the last
                with self.ctx:
                    loss_sum, _ = token_loss_sum(inputs, targets, model)
                share = loss_sum * ranks / counted
                self.scaled(share).backward()
            shares.append(share.detach())
        with self.ctx:
            loss_sum, _ = token_loss_sum(*parts[-1], model)
        loss = loss_sum * ranks / counted
        self.watch.note_loss(sum(shares, loss.detach()), counted)
        return self.scaled(loss)

    def whole_batch_loss(self, input_batch, target_batch, model, device):
        """The book's `calc_loss_batch` where rows are packed (a CPU); elsewhere the same loss
        from the batch as `accelerator.prepare_batch` prepares it on the CPU."""
        eager = eager_model(model)
        if device_type(device) in eager.pack_on:
            return super().batch_loss(input_batch, target_batch, model, device)
        return prepared_loss(input_batch, target_batch, model, device,
                             eager.pos_emb.num_embeddings)

    def scaled(self, loss):
        """`loss` as it is backpropagated: times fp16's loss scale, or as it is."""
        return loss if self.loss_scaler is None else self.loss_scaler.scale(loss)

    def batch_tokens(self, input_batch):
        if self.distributed:
            return global_batch_tokens(input_batch, self.device)
        return super().batch_tokens(input_batch)

    def evaluate(self, model, train_loader, val_loader, device, eval_iter):
        """The chapter's evaluation under `ctx`, batch by batch as the book computes it, on the
        eager model (a compiled model's graphs are the training steps'). The step's gradients
        are freed first, their norm noted for `FiniteWatch`: the next step sets them anew."""
        self.watch.note_gradients(model)
        model.zero_grad(set_to_none=True)
        with self.ctx:
            train_loss, val_loss = super().evaluate(eager_model(model), train_loader, val_loader,
                                                    device, eval_iter)
        if self.distributed:  # each rank's loader holds its own share of the training set
            train_loss = mean_across_ranks(train_loss, device)
        return train_loss, val_loss

    def before_update(self, model, optimizer, progress):
        """Appendix D's learning rate for the step, and its clipping (`schedule`), of the
        gradients as computed (fp16's are unscaled first)."""
        if self.loss_scaler is not None:
            self.loss_scaler.unscale()
        if self.schedule is None:
            self.lr = optimizer.param_groups[0]["lr"]
        else:
            self.lr = self.schedule.apply(progress["global_step"] + 1, model, optimizer)

    def step_done(self, progress):
        progress["batches_done"] += 1
        progress["seconds"] = time.monotonic() - self.started
        self.watch.record(progress["global_step"], self.model)
        stop_early = False
        if len(progress["train_losses"]) > len(progress["metrics"]):
            self.watch.check()
            if not math.isfinite(progress["train_losses"][-1]):
                raise TrainingDiverged(progress["global_step"], "the training loss after it is "
                                       f"{progress['train_losses'][-1]}")
            self.log_metrics(progress)
            stop_early = self.best is not None and self.best.observe(progress)
            if self.distributed:
                stop_early = any_rank(stop_early, self.device)
        self.bar.update()
        if stop_early:
            self.watch.check(self.model)
            progress.update(stopped_early=True, rng=rng_states())
        if self.stop_requested():
            self.watch.check(self.model)
            progress["rng"] = rng_states()
            if self.save_on_interrupt or self.saved_once:
                self.save(progress, f"Stopping after step {progress['global_step']}: saving "
                                    "the checkpoint (do not interrupt)")
            raise Interrupted(self.stops.signum or signal.SIGINT)
        if stop_early:
            self.save(progress)
            raise EarlyStopped(self.best.stop_line(progress))

    def curves(self):
        """(train_losses, val_losses, track_tokens_seen) so far, as `train_model_simple`
        returns them."""
        return (self.progress["train_losses"], self.progress["val_losses"],
                self.progress["track_tokens_seen"])

    def epoch_done(self, model, tokenizer, device, start_context, progress):
        self.watch.check(model)
        if is_main_process():
            super().epoch_done(getattr(model, "module", model),  # DDP wraps the model
                               tokenizer, device, start_context, progress)
        progress.update(batches_done=0, rng=rng_states())
        self.save(progress)
        if self.stop_requested():  # a signal during the sample or the save
            raise Interrupted(self.stops.signum or signal.SIGINT)

    def stop_requested(self):
        """Whether a signal asked training to stop (on any rank, under torchrun)."""
        stop = self.stops.signum is not None
        return any_rank(stop, self.device) if self.distributed else stop

    def log_metrics(self, progress):
        """Keep the evaluation just made as a metrics row, and append it to the file."""
        row = self.metrics_row(progress)
        progress["metrics"].append(row)
        if self.metrics_live:
            append_metrics_row(self.metrics_path, row, self.metrics_fields)

    def metrics_row(self, progress):
        """The metrics row of the evaluation just made."""
        return {"epoch": progress["epoch"] + 1, "step": progress["global_step"],
                "tokens_seen": progress["tokens_seen"],
                "train_loss": progress["train_losses"][-1],
                "val_loss": progress["val_losses"][-1], "lr": self.lr,
                "seconds": round(progress["seconds"], 3)}

    def save(self, progress, note=None):
        """Save a checkpoint of `progress` where this process saves (printing `note` first);
        the metrics log, held back until a new run's first checkpoint, is written whole then."""
        if self.save_checkpoint is None:
            return
        if note is not None:
            print(note)
        self.save_checkpoint(progress)
        self.saved_once = True
        if self.metrics_path is not None and not self.metrics_live:
            write_metrics_log(self.metrics_path, progress["metrics"], self.metrics_fields)
            self.metrics_live = True


