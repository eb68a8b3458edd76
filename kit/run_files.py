"""`RunFiles`: a finetuning run's files in its output folder through the run: one run at a time
per folder, what a killed save left removed, the answers kept as they come, the checkpoint
resumed, replaced or removed, nothing of an earlier run replaced before the first epoch ends,
and every early end (an interrupt, a failed write, a diverging loss) one line that says what
is saved and how to go on. The names themselves are checked in kit/run_names.py.
"""

import errno
import os
import sys

from kit.answer_log import AnswerLog
from kit.checkpoint import (
    Progress,
    check_checkpoint,
    epochs_to_train,
    fingerprint,
    remove_checkpoint,
    restore_checkpoint,
    save_checkpoint,
    will_resume,
)
from kit.distributed import any_rank
from kit.files import DataError, fail, plural, read_json
from kit.locks import lock_file, lock_holder, remove_leftover_temporaries, unlock_file
from kit.run_names import check_name_lengths, existing_outputs, names, refuse_foreign_files
from kit.saved_model import read_pth, save_finetuned_model
from kit.signals import exit_code, signals_held, stop_line
from kit.stopping import TrainingDiverged


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
    `progress_class` is the `Progress` (or subclass) that the training's checkpoints hold.
    """

    def __init__(self, plan, progress_class=Progress):
        self.progress_class = progress_class
        self.paths = plan.paths
        self.run_name = plan.run_name
        self.checkpoint = plan.paths["checkpoint"]
        self.plan = plan
        self.device, self.rank, self.world_size = plan.device, plan.rank, plan.world_size
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
        check_name_lengths(self.paths, self.run_name, folder)
        refuse_foreign_files(self.paths)
        if not self.take_lock():
            raise DataError(self.lock_refusal())
        if self.plan.resume and not os.path.exists(self.checkpoint):
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
        self.resuming = will_resume(self.plan.resume, self.checkpoint)
        if self.earlier_outputs and not self.resuming:
            self.say_replaced()
        if self.resuming:
            self.resume_from = read_pth(self.checkpoint, "delete it or run without --resume")
            progress = check_checkpoint(self.checkpoint, self.resume_from, settings,
                                        self.progress_class)
            self.resume_from["progress"] = progress
            self.saved_steps = progress.global_step + 1
        self.epochs = epochs_to_train(requested_epochs, self.checkpoint, progress,
                                      default_epochs)
        self.trained = progress is not None and (progress.epoch >= self.epochs
                                                 or progress.stopped_early)

    def check_schedule(self, schedule):
        """Refuse to resume a cosine schedule over another number of steps than it was started
        with (another --epochs): its rates so far belong to that length."""
        saved = self.resume_from["progress"].schedule if self.resume_from else None
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
        if best in self.earlier_outputs and not self.plan.keep_best:
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
            self.saved_steps = progress.global_step + 1
            self.trained = ((progress.epoch >= progress.num_epochs
                             and progress.batches_done == 0) or progress.stopped_early)

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
                self.pending_best = (weights, info, progress.global_step)
            else:
                self.write_best(model, info, progress.global_step)
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

    def say_best(self, best):
        """Say which evaluation had the lowest validation loss (`best`, a metrics row; nothing
        when None: not followed) and whether its weights are kept."""
        if best is None:
            return
        if not self.plan.keep_best:
            kept = "--keep_best would keep its weights"
        elif self.holds_best(best):
            kept = f"saved as {self.paths['best']}"
        else:  # removed meanwhile, or a save killed outright
            kept = f"its weights are not in {self.paths['best']}"
        print(f"Lowest validation loss {best['val_loss']:.3f} at step {best['step']} "
              f"(epoch {best['epoch']}): {kept}")

    def answer_log(self, progress, max_new_tokens, test_data):
        """Where the test set answers of the weights of `progress` are kept as they come."""
        key = fingerprint([progress.started, progress.global_step, max_new_tokens,
                           test_data])
        self.answers = AnswerLog(self.paths["answers"], key, len(test_data))
        return self.answers

    def finish(self, keep_checkpoint):
        """Once every output is written: remove the kept answers, and the checkpoint unless
        --keep_checkpoint."""
        if self.answers is not None:
            self.answers.remove()
        if not self.plan.keep_best:
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
        if self.earlier and self.plan.resume:
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
            advice = f"try a lower --lr than {self.plan.lr}"
            if self.plan.precision.name == "bf16":
                advice += " or --precision fp32"
        return f"training stopped at step {exc.step}: {exc.problem}; {what}; {advice}"

    def end(self, message):
        """End the run with exit code 1; rank 0 says why in one line."""
        if self.rank == 0:
            fail(message, code=1)
        raise SystemExit(1)
