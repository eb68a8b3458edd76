"""torchrun: joining the process group, dealing the chapter's shuffled batches out over the
ranks, weighting the loss and counting tokens as one process would, and leaving the group
cleanly; the training model, compiled and wrapped for the ranks.
"""

import os
import sys
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler

from kit.device import compiled_for_training
from previous_chapters import IGNORE_INDEX


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
