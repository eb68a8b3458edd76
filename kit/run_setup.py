"""The run's plan: everything a finetuning run takes from its flags, decided once right after the
flags are checked (`setup_run`). Below the function that builds it, the scripts read the plan,
never the flags: the device is picked once, --precision is read once, the data path and the
output paths are computed once. Beside it, what the chapter's run derives from its plan: the
split it trains on (`split_for_run`) and its learning-rate schedule (`learning_rate_schedule`).
"""

from dataclasses import dataclass, fields

import torch

from appendix_d import LearningRateSchedule
from kit.cli import check_batch_sizes, eval_freq, max_new_tokens
from kit.device import Precision
from kit.distributed import init_distributed
from kit.files import DataError
from kit.overlap import overlap_counts, overlap_paragraph, split_overlap


@dataclass(frozen=True, kw_only=True)
class RunPlan:
    """What every finetuning script's run is: where it computes (the device, under torchrun
    this process's GPU; this process's rank and the world size), how (`precision`), on which
    data (`data_path`: the file given, or the script's own, and whether it was given), where
    it writes (`run_name`, `paths`), and the training and answering settings shared by the
    scripts (`lr` the peak learning rate, `eval_freq` and `max_new_tokens` with their test-mode
    defaults applied)."""

    device: torch.device
    rank: int
    world_size: int
    precision: Precision
    data_path: str
    data_given: bool
    run_name: str
    paths: dict
    lr: float
    weight_decay: float
    seed: int
    batch_size: int
    epochs: int | None
    eval_freq: int
    eval_iter: int
    max_new_tokens: int
    gen_batch_size: int | None
    test_mode: bool
    keep_best: bool
    resume: bool
    keep_checkpoint: bool

    @property
    def ctx(self):
        """The context the losses and the answers are computed in (`Precision.ctx`)."""
        return self.precision.ctx

    def describe(self):
        """The device line the script prints."""
        if self.world_size == 1:
            return str(self.device)
        return f"{self.device.type} x {self.world_size} processes"


@dataclass(frozen=True, kw_only=True)
class ChapterPlan(RunPlan):
    """The chapter script's run: the model (its size's name, config and weights' source),
    micro-batches, Appendix D's schedule and clipping, early stopping and torch.compile."""

    model: str
    model_name: str
    config: dict
    weights: str
    models_dir: str
    micro_batch_size: int | None
    warmup_steps: int
    initial_lr: float
    min_lr: float
    lr_schedule: str
    grad_clip: float | None
    early_stopping: int | None
    compile: bool


@dataclass(frozen=True, kw_only=True)
class DPOPlan(RunPlan):
    """The DPO script's run: the SFT model it aligns, β, and how the reference is computed."""

    sft_model: str
    beta: float
    reference: str
    lora_alpha: float | None


DECIDED = {"device", "rank", "world_size", "precision", "eval_freq", "max_new_tokens"}


def setup_run(args, device, plan_class, **decided):
    """The run's plan (`plan_class`) from the checked flags `args` and the `device` they name
    (picked when the flags were checked): joins torchrun's process group when torchrun started
    this process, and makes the precision. `decided` gives the fields the script computes
    (the data path, the run name, the paths, ...); every other field is the flag of its name."""
    device, rank, world_size = init_distributed(device)
    names = {f.name for f in fields(plan_class)} - DECIDED - decided.keys()
    return plan_class(device=device, rank=rank, world_size=world_size,
                      precision=Precision.of(args.precision, device),
                      eval_freq=eval_freq(args), max_new_tokens=max_new_tokens(args),
                      **decided, **{name: getattr(args, name) for name in names})


def split_for_run(plan, batch_size, split):
    """The 85/10/5 `split` (train, test, validation) as the run trains on it: 10 entries of
    each in test mode, checked against the batch size, with the sizes printed; and how many
    test and validation entries of the whole split repeat a training entry (kit/overlap.py),
    printed with their numbers when any do. Returns (split, overlap counts)."""
    train_data, test_data, val_data = split
    overlap = split_overlap(train_data, test_data, val_data)  # the whole split's, test mode too
    paragraph = overlap_paragraph(overlap, len(test_data), len(val_data), plan.data_path)
    if plan.test_mode:  # a very small subset, to run the whole pipeline in seconds
        train_data, val_data, test_data = train_data[:10], val_data[:10], test_data[:10]
    check_batch_sizes(batch_size, plan.micro_batch_size, plan.world_size, len(train_data),
                      plan.data_path)
    print("Training set length:", len(train_data))
    print("Validation set length:", len(val_data))
    print("Test set length:", len(test_data))
    if paragraph:
        print(paragraph)
    print(50 * "-")
    return (train_data, test_data, val_data), overlap_counts(overlap)


def learning_rate_schedule(plan, total_steps):
    """The learning rate of every step of the run's `total_steps`, and its gradient clipping:
    the chapter's constant --lr, or Appendix D's warmup, cosine decay and clipping. A warmup
    longer than the run is refused, except in test mode, whose few steps would refuse a real
    run's recipe: there it is cut to the run's steps, and a line says so."""
    warmup_steps = plan.warmup_steps
    if warmup_steps > total_steps and plan.test_mode:
        print(f"Test mode: --warmup_steps {warmup_steps} cut to this run's {total_steps} "
              "training steps")
        warmup_steps = total_steps
    if warmup_steps > total_steps:
        raise DataError(f"--warmup_steps {warmup_steps} is more than this run's "
                        f"{total_steps} training steps; pass fewer")
    return LearningRateSchedule(peak_lr=plan.lr, total_steps=total_steps,
                                warmup_steps=warmup_steps, initial_lr=plan.initial_lr,
                                min_lr=plan.min_lr, kind=plan.lr_schedule,
                                grad_clip=plan.grad_clip)
