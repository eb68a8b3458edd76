"""When training stops early: a loss or gradient that is not finite, and early stopping with the
best weights kept.
"""

import math

import torch
import torch.distributed as dist

from kit.distributed import is_distributed
from kit.files import plural
from kit.saved_model import all_finite


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
    `progress.best` (so a resumed run knows it) and, with `save`, its weights are written at
    once (`save(progress)`, `RunFiles.best_saver`). `patience` evaluations in a row without a
    new lowest one end training.
    """

    def __init__(self, save=None, patience=None):
        self.save = save
        self.patience = patience

    @classmethod
    def for_run(cls, plan, files, model, describe):
        """The chapter run's: None unless `plan` has --keep_best or --early_stopping; the
        weights of `model` are saved (`files.best_saver`, described by `describe`) only with
        --keep_best."""
        if not (plan.keep_best or plan.early_stopping):
            return None
        return cls(files.best_saver(model, describe) if plan.keep_best else None,
                   plan.early_stopping)

    def observe(self, progress):
        """Note the evaluation just logged; return whether training should stop now."""
        row, best = progress.metrics[-1], progress.best
        if best is None or row["val_loss"] < best["val_loss"]:
            progress.best = dict(row)
            progress.evals_since_best = 0
            if self.save is not None:
                self.save(progress)
        else:
            progress.evals_since_best += 1
        return self.patience is not None and progress.evals_since_best >= self.patience

    def stop_line(self, progress):
        """The line that says training stopped early, and where the best was."""
        best = progress.best
        return (f"Early stopping after step {progress.global_step}: the validation loss has "
                f"not improved for {plural(self.patience, 'evaluation')} (lowest "
                f"{best['val_loss']:.3f}, at step {best['step']})")
