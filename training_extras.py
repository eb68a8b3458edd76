"""What the chapter script adds around the book's training loop, kept out of the chapter's code.

- torchrun: joining the process group, dealing the chapter's shuffled batches out over the
  ranks, weighting the loss and counting tokens as one process would, leaving the group cleanly.
- Resuming: a checkpoint of the weights, optimizer, progress and random states at every epoch
  end and on Ctrl-C, refused when it was saved with other settings; a resumed run ends with the
  same weights as an uninterrupted one.
- A progress bar over the training steps, with an ETA, on stderr.

`ChapterTraining` bundles these as the `hooks` of `previous_chapters.train_model_simple`.
"""

import contextlib
import os
import pickle
import signal
import sys
from contextlib import contextmanager
from itertools import islice

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import Sampler
from tqdm import tqdm
from tqdm.contrib import DummyTqdmFile

from instruction_data import DataError
from previous_chapters import IGNORE_INDEX, TrainingHooks
from script_utils import atomic_write

#####################################
# torchrun
#####################################


def init_distributed(device):
    """Join the process group when torchrun started this process; return (device, rank, world).

    A plain `python` run has no process group: rank 0 of a world of 1 on `device`. Under
    torchrun, GPUs talk through nccl (one GPU per process) and CPUs through gloo.
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


def calc_loss_batch_distributed(input_batch, target_batch, model, device):
    """One rank's part of a global batch's mean loss under DistributedDataParallel.

    Ranks hold different numbers of counted targets (their padding differs), so a plain mean per
    rank would weigh tokens unequally. Each rank sums its token losses and divides by the global
    count, times the number of ranks because DDP averages gradients over ranks: the result is
    the gradient of the global batch's mean loss, as one process would compute it.
    """
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    keep = target_batch != IGNORE_INDEX  # (b_local, num_tokens)
    logits = model(input_batch, keep=keep)  # (num_kept, vocab_size)
    loss_sum = F.cross_entropy(logits, target_batch[keep], reduction="sum")
    count = keep.sum()
    dist.all_reduce(count)  # counted targets over all ranks
    return loss_sum * dist.get_world_size() / count


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
    """

    def __init__(self, num_epochs, device, save_checkpoint=None, resume_progress=None):
        self.num_epochs = num_epochs
        self.device = device
        self.save_checkpoint = save_checkpoint
        self.resume_progress = resume_progress
        self.distributed = is_distributed()
        self.bar = None

    def __enter__(self):
        self._exit_stack = contextlib.ExitStack()
        self.interrupt = self._exit_stack.enter_context(stop_on_ctrl_c())
        # The chapter's printed lines go through tqdm.write, so they do not break the bar.
        self._exit_stack.enter_context(contextlib.redirect_stdout(DummyTqdmFile(sys.stdout)))
        return self

    def __exit__(self, *exc_info):
        if self.bar is not None:
            self.bar.close()
        self._exit_stack.close()

    def start(self):
        progress = self.resume_progress or {**super().start(), "batches_done": 0,
                                            "epoch_rng": None, "rng": None}
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
        if self.distributed:
            return calc_loss_batch_distributed(input_batch, target_batch, model, device)
        return super().batch_loss(input_batch, target_batch, model, device)

    def batch_tokens(self, input_batch):
        if self.distributed:
            return global_batch_tokens(input_batch, self.device)
        return super().batch_tokens(input_batch)

    def evaluate(self, model, train_loader, val_loader, device, eval_iter):
        train_loss, val_loss = super().evaluate(model, train_loader, val_loader, device,
                                                eval_iter)
        if self.distributed:  # each rank's loader holds its own share of the training set
            train_loss = mean_across_ranks(train_loss, device)
        return train_loss, val_loss

    def step_done(self, progress):
        progress["batches_done"] += 1
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
