"""Resuming: a checkpoint of the weights, optimizer, progress (with the metrics rows) and random
states, every field checked before use and refused when saved with other settings, so that a
resumed run ends with the same weights as an uninterrupted one.
"""

import hashlib
import json
import os
import reprlib
from dataclasses import dataclass, field, fields

import torch

from kit.files import DataError
from kit.metrics_log import METRICS_FIELDS
from kit.saved_model import first_line, save_pth


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
    """Save what resuming needs: weights, optimizer moments, progress (a `Progress`, stored as
    a plain dict), random states, and the settings the run was started with."""
    save_pth({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
              "progress": progress.saved(), "settings": settings}, path)


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


@dataclass
class Progress:
    """Where a run stands: the book's counters and curves (`epoch`, `global_step`,
    `tokens_seen`, the losses and the tokens seen at each evaluation) and what resuming needs
    besides: the batches done of the running epoch, the random states, the time trained, the
    metrics rows, the best evaluation and the learning-rate schedule.

    A checkpoint stores it as a plain dict (`saved`), which loads with weights_only=True;
    `from_saved` builds it back from one, checking every field first.
    """

    num_epochs: int
    started: float
    schedule: dict | None = None
    epoch: int = 0
    global_step: int = -1
    tokens_seen: int = 0
    train_losses: list = field(default_factory=list)
    val_losses: list = field(default_factory=list)
    track_tokens_seen: list = field(default_factory=list)
    batches_done: int = 0
    seconds: float = 0.0
    epoch_rng: dict | None = None
    rng: dict | None = None
    metrics: list = field(default_factory=list)
    best: dict | None = None
    evals_since_best: int = 0
    stopped_early: bool = False

    def saved(self):
        """The fields as the dict a checkpoint stores (the values themselves, not copies: the
        random states and curves are written as they are)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_saved(cls, path, saved):
        """The progress of the checkpoint `path` from its stored dict `saved`. Raises
        DataError naming `path` and the field unless every field in `PROGRESS_FIELDS` is there
        with the right type and the curves and metrics rows are as many; a field of a subclass
        that the dict lacks takes its default."""
        fix = "delete it or run without --resume"
        for name, (check, what) in PROGRESS_FIELDS.items():
            if name not in saved:
                raise DataError(f"{path}: the checkpoint's progress has no field '{name}'; {fix}")
            if not check(saved[name]):
                raise DataError(f"{path}: the checkpoint's progress field '{name}' must be "
                                f"{what}, not {reprlib.repr(saved[name])}; {fix}")
        lengths = [len(saved[name]) for name in
                   ("train_losses", "val_losses", "track_tokens_seen", "metrics")]
        if len(set(lengths)) > 1:
            raise DataError(f"{path}: the checkpoint's progress fields train_losses, val_losses, "
                            f"track_tokens_seen and metrics differ in length "
                            f"({', '.join(map(str, lengths))}); {fix}")
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})

    def epochs_trained(self, batches_per_epoch):
        """The epochs trained, counting the running epoch's batches done as a fraction."""
        return self.epoch + self.batches_done / batches_per_epoch


def check_checkpoint(path, checkpoint, settings, progress_class=Progress):
    """Return the progress (a `progress_class`) of `checkpoint`, read from `path`; raise
    DataError naming `path` (and the field) unless it is a whole checkpoint of this script
    saved with `settings`: every field that resuming reads is there with the right type,
    checked before anything is built from it."""
    fix = "delete it or run without --resume"
    parts = ("model", "optimizer", "progress", "settings")
    if not (isinstance(checkpoint, dict) and set(parts) <= checkpoint.keys()):
        raise DataError(f"{path}: not a checkpoint of this script; {fix}")
    for part in parts:
        if not isinstance(checkpoint[part], dict):
            raise DataError(f"{path}: the checkpoint's '{part}' is not a dict but "
                            f"{type(checkpoint[part]).__name__}; {fix}")
    progress = progress_class.from_saved(path, checkpoint["progress"])
    saved = checkpoint["settings"]
    for name, value in settings.items():
        if name not in saved:
            raise DataError(f"{path}: the checkpoint's settings have no field '{name}'; {fix}")
        if saved[name] != value:
            raise DataError(f"{path} was saved with {name} {saved[name]}, this run has {name} "
                            f"{value}; {fix}, or resume with the same settings")
    return progress


def restore_checkpoint(path, checkpoint, model, optimizer):
    """Load a checked `checkpoint`'s weights and optimizer state into `model` and `optimizer`;
    return its progress (the `Progress` that `check_checkpoint` returned, put in its place).
    Raises DataError naming `path` when it was made for another model."""
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: the checkpoint does not fit this model ({first_line(exc)}); "
                        "delete it or run without --resume") from None
    return checkpoint["progress"]


def run_settings(plan, experiment, train_data, val_data, test_data):
    """What a checkpoint's run (`plan`, a `kit.run_setup.ChapterPlan`) depended on: resuming
    with anything else would mix runs. The validation entries decide the losses and the best
    weights, the test entries the answers; --keep_best decides whether the best-weights file
    holds the run's best evaluation."""
    return {"--model": plan.model_name, "--seed": plan.seed, "--lr": plan.lr,
            "--weight_decay": plan.weight_decay, "--batch_size": experiment.batch_size,
            "--precision": plan.precision.name, "--warmup_steps": plan.warmup_steps,
            "--initial_lr": plan.initial_lr, "--lr_schedule": plan.lr_schedule,
            "--min_lr": plan.min_lr, "--grad_clip": plan.grad_clip,
            "--keep_best": plan.keep_best, "training data": fingerprint(train_data),
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
    done, planned = progress.epoch, progress.num_epochs
    if requested is not None and requested < done:
        raise DataError(f"--epochs {requested}: {checkpoint} has already trained {done} "
                        f"epochs; pass --epochs {done} or more, or leave --epochs out to "
                        f"finish its {planned}")
    epochs = requested or planned
    if progress.stopped_early:
        print(f"Resuming from {checkpoint}: training stopped early after step "
              f"{progress.global_step}, so this run writes the outputs")
    elif done >= epochs:
        print(f"Resuming from {checkpoint}: training finished at epoch {done}, so this run "
              f"writes the outputs (--epochs {done + 1} or more would train further)")
    else:
        print(f"Resuming from {checkpoint}: epoch {done + 1} of {epochs}, "
              f"{progress.global_step + 1} steps done")
    return epochs


def remove_checkpoint(checkpoint, keep):
    """Delete the checkpoint once every output of the run is written (it is as large as the
    model and its optimizer state together), unless --keep_checkpoint."""
    if keep or not os.path.exists(checkpoint):
        return
    os.remove(checkpoint)
    print(f"Removed {checkpoint}: the run is complete (--keep_checkpoint keeps it)")
