"""`ChapterTraining`: everything the script adds around the book's loop (progress bar, metrics
log, checkpoints, stop signals, finite checks, precision, micro-batches, torchrun, Appendix D's
schedule, the best weights), bundled as the `hooks` of `previous_chapters.train_model_simple`.
"""

import contextlib
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from itertools import islice

import torch.distributed as dist
from tqdm import tqdm

from kit.checkpoint import Progress, rng_states, set_rng_states
from kit.device import (
    device_type,
    eager_model,
    prepared_loss,
)
from kit.distributed import (
    any_rank,
    global_batch_tokens,
    is_distributed,
    is_main_process,
    mean_across_ranks,
    token_loss_sum,
)
from kit.files import DataError
from kit.metrics_log import (
    METRICS_FIELDS,
    PrintAboveBar,
    append_metrics_row,
    rebuild_metrics_log,
    write_metrics_log,
)
from kit.signals import Interrupted, StopRequests
from kit.stopping import EarlyStopped, FiniteWatch, TrainingDiverged
from previous_chapters import IGNORE_INDEX, TrainingHooks


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
    `loss_scaler` (fp16's `kit.device.ScaledOptimizer`, the optimizer of the loop) scales the
    losses before their backward passes and unscales the gradients before they are clipped;
    the steps it skips are not divergences (`FiniteWatch`). Where rows are computed whole (a
    GPU), each batch's loss comes from `kit.device.prepare_batch`: padded to a few lengths,
    the counted positions as indices, copied without making the device wait.
    `micro_batch_size` computes each batch that many rows at a time, accumulating gradients:
    the same update as the whole batch at once, with less memory. `metrics_path` receives one
    CSV row per evaluation; the rows are also kept in the progress, so a resumed run rewrites
    the file from its checkpoint, and a new run replaces an existing file only at its first
    checkpoint.
    """

    metrics_fields = METRICS_FIELDS  # the metrics CSV's columns
    progress_class = Progress  # what `start` makes, and a checkpoint holds

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

    @classmethod
    def for_run(cls, plan, files, model, optimizer, progress, schedule=None, best=None,
                **options):
        """The hooks of the run of `plan` (`kit.run_setup.RunPlan`) whose files are `files`
        (`RunFiles`): checkpoints of `model` and `optimizer` (the one the loop steps, from
        `plan.precision.stepping`), resumed from `progress` (None for a new run), under the
        plan's precision; `options` are the other keyword arguments of the hooks."""
        return cls(files.epochs, plan.device, files.saver(model, optimizer), progress,
                   ctx=plan.ctx, metrics_path=files.paths["metrics"],
                   save_on_interrupt=not files.keeps_earlier, schedule=schedule, best=best,
                   loss_scaler=plan.precision.loss_scaler(optimizer), **options)

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
        progress = self.resume_progress or self.progress_class(
            num_epochs=self.num_epochs, started=time.time(),
            schedule=None if self.schedule is None else self.schedule.describe())
        progress.num_epochs = self.num_epochs  # what a resumed run trains to by default
        self.progress = progress
        self.started = time.monotonic() - progress.seconds
        self.saved_once = self.resume_progress is not None
        self.metrics_live = False  # whether rows go to the file as they come
        if self.metrics_path is not None:
            if self.resume_progress is not None:
                rebuild_metrics_log(self.metrics_path, progress.metrics,
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
                            initial=progress.global_step + 1, desc="Training", unit="step",
                            file=sys.stderr, disable=not is_main_process())
        if progress.stopped_early:  # a resumed run that had stopped early
            raise EarlyStopped()
        resuming_mid_epoch = progress.batches_done > 0
        if resuming_mid_epoch:
            set_rng_states(progress.epoch_rng)
        elif progress.rng is not None:
            set_rng_states(progress.rng)
        progress.epoch_rng = rng_states()
        batches = iter(train_loader)
        if resuming_mid_epoch:
            for _ in islice(batches, progress.batches_done):
                pass
            set_rng_states(progress.rng)
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
        from the batch as `kit.device.prepare_batch` prepares it on the CPU."""
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
            self.lr = self.schedule.apply(progress.global_step + 1, model, optimizer)

    def step_done(self, progress):
        progress.batches_done += 1
        progress.seconds = time.monotonic() - self.started
        self.watch.record(progress.global_step, self.model)
        stop_early = False
        if len(progress.train_losses) > len(progress.metrics):
            self.watch.check()
            if not math.isfinite(progress.train_losses[-1]):
                raise TrainingDiverged(progress.global_step, "the training loss after it is "
                                       f"{progress.train_losses[-1]}")
            self.log_metrics(progress)
            stop_early = self.best is not None and self.best.observe(progress)
            if self.distributed:
                stop_early = any_rank(stop_early, self.device)
        self.bar.update()
        if stop_early:
            self.watch.check(self.model)
            progress.stopped_early, progress.rng = True, rng_states()
        if self.stop_requested():
            self.watch.check(self.model)
            progress.rng = rng_states()
            if self.save_on_interrupt or self.saved_once:
                self.save(progress, f"Stopping after step {progress.global_step}: saving "
                                    "the checkpoint (do not interrupt)")
            raise Interrupted(self.stops.signum or signal.SIGINT)
        if stop_early:
            self.save(progress)
            raise EarlyStopped(self.best.stop_line(progress))

    def curves(self):
        """(train_losses, val_losses, track_tokens_seen) so far, as `train_model_simple`
        returns them."""
        return (self.progress.train_losses, self.progress.val_losses,
                self.progress.track_tokens_seen)

    def epoch_done(self, model, tokenizer, device, start_context, progress):
        self.watch.check(model)
        if is_main_process():
            super().epoch_done(getattr(model, "module", model),  # DDP wraps the model
                               tokenizer, device, start_context, progress)
        progress.batches_done, progress.rng = 0, rng_states()
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
        progress.metrics.append(row)
        if self.metrics_live:
            append_metrics_row(self.metrics_path, row, self.metrics_fields)

    def metrics_row(self, progress):
        """The metrics row of the evaluation just made."""
        return {"epoch": progress.epoch + 1, "step": progress.global_step,
                "tokens_seen": progress.tokens_seen,
                "train_loss": progress.train_losses[-1],
                "val_loss": progress.val_losses[-1], "lr": self.lr,
                "seconds": round(progress.seconds, 3)}

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
            write_metrics_log(self.metrics_path, progress.metrics, self.metrics_fields)
            self.metrics_live = True
