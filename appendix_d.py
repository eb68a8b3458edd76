"""The book's Appendix D training options: linear warmup, cosine decay, gradient clipping.

Appendix D's `train_model` sets each step's learning rate before the update and clips the
gradients from the end of the warmup on; `LearningRateSchedule` does the same, step for step,
for the chapter script's training loop (`kit.chapter_training.ChapterTraining.before_update`):

    --warmup_steps 20 --lr_schedule cosine --grad_clip 1.0   # Appendix D's run

Without these flags the schedule is the chapter's: a constant --lr and no clipping.
"""

import math
from dataclasses import dataclass

import torch

SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class LearningRateSchedule:
    """The learning rate of every training step, and when the gradients are clipped.

    The rate rises linearly from `initial_lr` to `peak_lr` (the optimizer's --lr) over
    `warmup_steps`, then stays at `peak_lr` ("constant") or decays along half a cosine to
    `min_lr` at the last of `total_steps` ("cosine"). With `grad_clip`, the gradients' total
    norm is clipped to it on every step from the end of the warmup on.
    """

    peak_lr: float
    total_steps: int
    warmup_steps: int = 0
    initial_lr: float = 3e-5
    min_lr: float = 1e-6
    kind: str = "constant"
    grad_clip: float | None = None

    def lr_at(self, step):
        """The learning rate of step `step` (0 is the first), computed as Appendix D does."""
        if step < self.warmup_steps:
            increment = (self.peak_lr - self.initial_lr) / self.warmup_steps
            return self.initial_lr + step * increment
        if self.kind == "constant":
            return self.peak_lr
        progress = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))

    def clips_at(self, step):
        """Whether the gradients of step `step` are clipped."""
        return self.grad_clip is not None and step >= self.warmup_steps

    def apply(self, step, model, optimizer):
        """Set step `step`'s learning rate on `optimizer` and clip `model`'s gradients when the
        schedule says so; called between the backward pass and the optimizer step. Returns
        the learning rate."""
        lr = self.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if self.clips_at(step):
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=self.grad_clip)
        return lr

    def describe(self):
        """The schedule as the JSON beside a model and the checkpoint's settings record it."""
        return {"lr_schedule": self.kind, "peak_lr": self.peak_lr,
                "warmup_steps": self.warmup_steps, "initial_lr": self.initial_lr,
                "min_lr": self.min_lr, "total_steps": self.total_steps,
                "grad_clip": self.grad_clip}
