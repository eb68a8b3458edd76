"""What the chapter script adds around the book's training loop, kept out of the chapter's code.

- torchrun: joining the process group, dealing the chapter's shuffled batches out over the
  ranks, weighting the loss and counting tokens as one process would, leaving the group cleanly.
- Resuming: a checkpoint of the weights, optimizer, progress and random states at every epoch
  end and on Ctrl-C, refused when it was saved with other settings; a resumed run ends with the
  same weights as an uninterrupted one.
- A progress bar over the training steps, with an ETA, on stderr; lines printed meanwhile
  appear whole above it.
- Precision, micro-batches and the evaluation in one pass: the loss computed under the run's
  autocast context, a batch computed a few rows at a time with gradients accumulated, and the
  chapter's 5 + 5 evaluation batches in one forward pass where rows are not packed (GPUs).
- A metrics log: one CSV row per evaluation, appended as training goes.
- The run's set-up and bookkeeping: the bf16 autocast context, the attention kernels and
  torch.compile for the training model, the size of generation batches, the settings a
  checkpoint records, and what becomes of the checkpoint (resumed, replaced, removed).

`ChapterTraining` bundles these as the `hooks` of `previous_chapters.train_model_simple`.
"""

import contextlib
import csv
import hashlib
import json
import os
import pickle
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from itertools import islice

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler
from tqdm import tqdm

from previous_chapters import IGNORE_INDEX, TrainingHooks, plot_losses
from script_utils import DataError, atomic_write, fail

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
# Resuming
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


def read_pth(path, what_to_do):
    """`torch.load` a .pth file safely, turning a damaged or foreign file into one DataError.

    `what_to_do` ends the message: how the user gets a good file back.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: damaged or not a PyTorch weight file ({reason}); "
                        f"{what_to_do}") from None


def save_checkpoint(path, model, optimizer, progress, settings):
    """Save what resuming needs: weights, optimizer moments, progress, random states, and the
    settings the run was started with."""
    with atomic_write(path) as f:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "progress": progress, "settings": settings}, f)


def load_checkpoint(path, model, optimizer, settings):
    """Restore model and optimizer from `path`; return the progress to resume from.

    Raises DataError naming the file when it is damaged, not this script's checkpoint, saved
    with other `settings` (resuming would mix two runs), or made for another model.
    """
    fix = "delete it or run without --resume"
    checkpoint = read_pth(path, fix)
    if not (isinstance(checkpoint, dict)
            and {"model", "optimizer", "progress", "settings"} <= checkpoint.keys()):
        raise DataError(f"{path}: not a checkpoint of this script; {fix}")
    for name, value in settings.items():
        saved = checkpoint["settings"].get(name)
        if saved != value:
            raise DataError(f"{path} was saved with {name} {saved}, this run has {name} "
                            f"{value}; {fix}, or resume with the same settings")
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise DataError(f"{path}: the checkpoint does not fit this model "
                        f"({str(exc).splitlines()[0]}); {fix}") from None
    return checkpoint["progress"]


@contextmanager
def stop_on_ctrl_c():
    """Let Ctrl-C finish the current training step: yield a flag that a first Ctrl-C sets.

    A second Ctrl-C interrupts at once, as usual. Outside the main thread nothing changes.
    """
    flag = {"stop": False}
    try:
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            flag["stop"] = True
            signal.signal(signal.SIGINT, previous)

        signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: signals cannot be handled here
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


#####################################
# Precision, compiling, and the size of generation batches
#####################################


def precision_context(device, precision):
    """The context the loss and the generation are computed in: bf16 autocast, or nothing.

    Under autocast the matrix products run in bfloat16 while the weights, the optimizer and
    the loss stay float32 (cross-entropy runs in float32 under autocast). Entered where the
    loss is computed (`ChapterTraining`, `print_initial_losses`) and around generation.
    """
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def choose_attention_kernels(device):
    """On CUDA, leave the cuDNN kernel out of `scaled_dot_product_attention`.

    PyTorch picks it first under bf16 on recent GPUs, and it builds a graph for every new shape:
    generation meets a new one at every step, and each batch brings its own length. The flash
    and memory-efficient kernels, chosen instead, need no such preparation.
    """
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


def compiled_for_training(model, device):
    """`model` compiled with torch.compile, for the training loop only (generation runs the
    eager model, whose KV cache changes shape every step).

    Rows come padded to a few lengths (`GPTModel.length_multiple`), so after the second shape
    one dynamic-shape graph serves them all; on CUDA, "reduce-overhead" replays each step as
    CUDA graphs instead of launching hundreds of small kernels from Python.
    """
    mode = "reduce-overhead" if device.type == "cuda" else None
    return torch.compile(model, mode=mode)


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


def default_gen_batch_size(model, prompt_lengths, max_new_tokens):
    """Test entries answered at once when --gen_batch_size is not given: 8 on a CPU; on CUDA
    the whole test set, or as many as half the free memory holds float32 keys and values for."""
    device = model.pos_emb.weight.device
    if device.type != "cuda":
        return 8
    positions = min(model.pos_emb.num_embeddings, max(prompt_lengths) + max_new_tokens)
    emb_dim, vocab_size = model.tok_emb.embedding_dim, model.tok_emb.num_embeddings
    row_bytes = 2 * len(model.trf_blocks) * positions * emb_dim * 4
    row_bytes += 2 * vocab_size * 4  # the last position's logits, twice over
    free_bytes, _ = torch.cuda.mem_get_info(device)
    return max(1, min(len(prompt_lengths), free_bytes // 2 // row_bytes))


#####################################
# The run's bookkeeping: its settings, and what becomes of its checkpoint
#####################################


def run_settings(args, experiment, model_name, train_data):
    """What a checkpoint's training depended on: resuming with anything else would mix runs."""
    return {"--model": model_name, "--seed": args.seed, "--lr": args.lr,
            "--weight_decay": args.weight_decay, "--batch_size": experiment.batch_size,
            "--precision": args.precision, "training data": fingerprint(train_data),
            "experiment": experiment.name, **experiment.settings}


def fingerprint(entries):
    """A short hash of the entries' content: any edit to the training data changes it."""
    text = json.dumps(entries, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def will_resume(resume, checkpoint):
    """Whether this run continues `checkpoint` (--resume). Without --resume an existing
    checkpoint is about to be replaced: say so before any training, and how to continue it."""
    exists = os.path.exists(checkpoint)
    if resume and not exists:
        print(f"No checkpoint at {checkpoint}; starting from the beginning")
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
    planned = progress.get("num_epochs", default)
    print(f"Resuming from {checkpoint}: epoch {progress['epoch'] + 1} of "
          f"{requested or planned}, {progress['global_step'] + 1} steps done")
    if requested is not None and requested < progress["epoch"]:
        raise DataError(f"--epochs {requested}: {checkpoint} has already trained "
                        f"{progress['epoch']} epochs; pass --epochs {progress['epoch']} or "
                        f"more, or leave --epochs out to finish its {planned}")
    return requested or planned


def remove_checkpoint(checkpoint, keep):
    """Delete the checkpoint once every output of the run is written (it is as large as the
    model and its optimizer state together), unless --keep_checkpoint."""
    if keep or not os.path.exists(checkpoint):
        return
    os.remove(checkpoint)
    print(f"Removed {checkpoint}: the run is complete (--keep_checkpoint keeps it)")


@contextmanager
def saving_failures_reported(checkpoint, what_is_kept):
    """Turn a failed write into one line that says where the finished work is kept."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc)
        where = f" {exc.filename}" if exc.filename else ""
        fail(f"could not write{where} ({reason}); {what_is_kept} are saved in {checkpoint}: "
             "fix this, then run the same command with --resume", code=1)


#####################################
# Evaluation in one pass, the metrics log, printing above the bar
#####################################


def mean_batch_losses(batches, model):
    """The mean loss of each (input_batch, target_batch) in `batches`, from one forward pass.

    The batches are padded at the end to a common length and stacked, so a GPU runs one pass
    instead of one per batch. Each batch's value is its own mean over its counted targets, as
    `calc_loss_batch` gives it (up to float rounding).
    """
    width = max(inputs.shape[1] for inputs, _ in batches)
    inputs = torch.cat([F.pad(x, (0, width - x.shape[1])) for x, _ in batches])  # (rows, width)
    targets = torch.cat([F.pad(y, (0, width - y.shape[1]), value=IGNORE_INDEX)
                         for _, y in batches])  # (rows, width)
    sizes = torch.tensor([len(x) for x, _ in batches], device=inputs.device)
    batch_of_row = torch.repeat_interleave(torch.arange(len(batches), device=inputs.device),
                                           sizes)  # (rows,)
    keep = targets != IGNORE_INDEX
    logits = model(inputs, keep=keep)  # (num_kept, vocab_size)
    losses = F.cross_entropy(logits.float(), targets[keep], reduction="none")  # (num_kept,)
    batch_of_token = batch_of_row[:, None].expand_as(keep)[keep]  # (num_kept,)
    sums = torch.zeros(len(batches), device=inputs.device).index_add_(0, batch_of_token, losses)
    counts = torch.bincount(batch_of_token, minlength=len(batches))
    return (sums / counts).tolist()


def evaluate_in_one_pass(model, train_loader, val_loader, eval_iter):
    """(train_loss, val_loss) over `eval_iter` batches of each loader, as `evaluate_model` gives
    them, in one forward pass. The loaders are iterated as `calc_loss_loader` iterates them,
    so the random draws of the shuffled training loader stay the same."""
    train = list(islice(train_loader, eval_iter))
    val = list(islice(val_loader, eval_iter))
    model.eval()
    with torch.no_grad():
        losses = mean_batch_losses(train + val, model) if train or val else []
    model.train()
    train_losses, val_losses = losses[:len(train)], losses[len(train):]
    return (sum(train_losses) / len(train) if train else float("nan"),
            sum(val_losses) / len(val) if val else float("nan"))


METRICS_FIELDS = ("epoch", "step", "tokens_seen", "train_loss", "val_loss", "seconds")


def start_metrics_log(path, last_step=None):
    """Begin the metrics CSV at `path`: a new file with its header, or, when resuming from
    `last_step`, the rows of the run up to that step (later ones belong to training that the
    checkpoint does not hold)."""
    rows = []
    if last_step is not None and os.path.exists(path):
        rows = [row for row in read_metrics(path) if row["step"] <= last_step]
    with atomic_write(path, "w") as f:
        writer = csv.DictWriter(f, METRICS_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def append_metrics_row(path, row):
    """Append one evaluation's row to the metrics CSV and flush it to disk."""
    with open(path, "a", newline="", encoding="utf-8") as f:
        csv.DictWriter(f, METRICS_FIELDS).writerow(row)


def read_metrics(path):
    """The rows of a metrics CSV as dicts of numbers. Raises DataError naming a damaged file."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if tuple(reader.fieldnames or ()) != METRICS_FIELDS:
                raise ValueError(f"expected the columns {', '.join(METRICS_FIELDS)}")
            return [{"epoch": int(r["epoch"]), "step": int(r["step"]),
                     "tokens_seen": int(r["tokens_seen"]), "train_loss": float(r["train_loss"]),
                     "val_loss": float(r["val_loss"]), "seconds": float(r["seconds"])}
                    for r in reader]
    except (ValueError, TypeError, KeyError) as exc:
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


class ChapterTraining(TrainingHooks):
    """The book's training loop, resumable, stoppable with Ctrl-C, under torchrun, with a bar.

    Use it as a context manager around `train_model_simple(..., hooks=...)`.
    `save_checkpoint(progress)` is called at every epoch end and when Ctrl-C stops training
    (after the running step completes; KeyboardInterrupt is raised afterwards). Passing that
    progress back as `resume_progress`, with the model and optimizer restored to the same
    moment, continues the run so that it ends with the same weights as an uninterrupted one.
    Under torchrun, `model` is wrapped in DistributedDataParallel and the train loader yields
    each rank's share of the global batches.

    `ctx` (e.g. a bf16 autocast) is entered wherever the model computes a loss.
    `micro_batch_size` computes each batch that many rows at a time, accumulating gradients:
    the same update as the whole batch at once, with less memory. `metrics_path` receives one
    CSV row per evaluation.
    """

    def __init__(self, num_epochs, device, save_checkpoint=None, resume_progress=None,
                 ctx=None, micro_batch_size=None, metrics_path=None):
        self.num_epochs = num_epochs
        self.device = device
        self.save_checkpoint = save_checkpoint
        self.resume_progress = resume_progress
        self.ctx = ctx or nullcontext()
        self.micro_batch_size = micro_batch_size
        self.metrics_path = metrics_path if is_main_process() else None
        self.distributed = is_distributed()
        self.bar = None

    def __enter__(self):
        self._exit_stack = contextlib.ExitStack()
        self.interrupt = self._exit_stack.enter_context(stop_on_ctrl_c())
        stdout = PrintAboveBar(sys.stdout, self)
        self._exit_stack.callback(stdout.flush)
        self._exit_stack.enter_context(contextlib.redirect_stdout(stdout))
        return self

    def __exit__(self, *exc_info):
        if self.bar is not None:
            self.bar.close()
        self._exit_stack.close()

    def start(self):
        progress = self.resume_progress or {**super().start(), "batches_done": 0,
                                            "epoch_rng": None, "rng": None}
        progress["num_epochs"] = self.num_epochs  # what a resumed run trains to by default
        self.progress = progress
        self.started = time.monotonic() - progress.get("seconds", 0.0)
        self.rows_logged = len(progress["train_losses"])
        if self.metrics_path is not None:
            start_metrics_log(self.metrics_path,
                              progress["global_step"] if self.resume_progress else None)
        return progress

    def epoch_batches(self, train_loader, progress):
        """The epoch's batches; a run resumed mid-epoch replays the epoch's shuffle and skips
        the batches already trained on, then restores the random state of the interruption."""
        if self.bar is None:
            self.bar = tqdm(total=self.num_epochs * len(train_loader),
                            initial=progress["global_step"] + 1, desc="Training", unit="step",
                            file=sys.stderr, disable=not is_main_process())
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
        if self.micro_batch_size is None and not self.distributed:
            with self.ctx:
                return super().batch_loss(input_batch, target_batch, model, device)
        input_batch, target_batch = input_batch.to(device), target_batch.to(device)
        counted = (target_batch != IGNORE_INDEX).sum()  # the whole batch's counted targets
        ranks = 1
        if self.distributed:  # DDP averages gradients over ranks: scale the sums back up
            dist.all_reduce(counted)
            ranks = dist.get_world_size()
        size = self.micro_batch_size or len(input_batch)
        parts = list(zip(input_batch.split(size), target_batch.split(size), strict=True))
        for inputs, targets in parts[:-1]:
            with model.no_sync() if self.distributed else nullcontext():  # sync on the last
                with self.ctx:
                    loss_sum, _ = token_loss_sum(inputs, targets, model)
                (loss_sum * ranks / counted).backward()
        with self.ctx:
            loss_sum, _ = token_loss_sum(*parts[-1], model)
        return loss_sum * ranks / counted

    def batch_tokens(self, input_batch):
        if self.distributed:
            return global_batch_tokens(input_batch, self.device)
        return super().batch_tokens(input_batch)

    def evaluate(self, model, train_loader, val_loader, device, eval_iter):
        """The chapter's evaluation under `ctx`; where rows are not packed (GPUs), its batches
        go through the model in one pass."""
        with self.ctx:
            if device_type(device) in getattr(model, "module", model).pack_on:
                train_loss, val_loss = super().evaluate(model, train_loader, val_loader,
                                                        device, eval_iter)
            else:
                train_loss, val_loss = evaluate_in_one_pass(model, train_loader, val_loader,
                                                            eval_iter)
        if self.distributed:  # each rank's loader holds its own share of the training set
            train_loss = mean_across_ranks(train_loss, device)
        return train_loss, val_loss

    def step_done(self, progress):
        progress["batches_done"] += 1
        progress["seconds"] = time.monotonic() - self.started
        if self.metrics_path is not None and len(progress["train_losses"]) > self.rows_logged:
            self.rows_logged += 1
            append_metrics_row(self.metrics_path, {
                "epoch": progress["epoch"] + 1, "step": progress["global_step"],
                "tokens_seen": progress["tokens_seen"],
                "train_loss": progress["train_losses"][-1],
                "val_loss": progress["val_losses"][-1], "seconds": round(progress["seconds"], 3)})
        self.bar.update()
        stop = self.interrupt["stop"]
        if self.distributed:
            stop = any_rank(stop, self.device)
        if stop:
            progress["rng"] = rng_states()
            if self.save_checkpoint is not None:
                self.save_checkpoint(progress)
            raise KeyboardInterrupt

    def epoch_done(self, model, tokenizer, device, start_context, progress):
        if is_main_process():
            super().epoch_done(getattr(model, "module", model),  # DDP wraps the model
                               tokenizer, device, start_context, progress)
        progress.update(batches_done=0, rng=rng_states())
        if self.save_checkpoint is not None:
            self.save_checkpoint(progress)


def device_type(device):
    """'cpu', 'cuda', ... of a torch.device or a device name."""
    return torch.device(device).type
