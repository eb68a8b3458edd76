"""The book's DPO training loop, `train_model_dpo_simple`, with the chapter script's engineering.

The loop is the notebook's: for each batch of each epoch, the DPO loss, a backward pass and an
optimizer step; every `eval_freq` steps the loss and rewards over `eval_iter` training and
validation batches, printed as the notebook prints them; after each epoch a sample answer.
`hooks` extend it as `previous_chapters.TrainingHooks` extend the chapter's loop; `DPOTraining`
brings what `kit.chapter_training.ChapterTraining` does there (resuming, stopping on a signal, the
progress bar, the metrics log, the best weights, precision, divergence checks).
"""

import dataclasses
from contextlib import nullcontext

import matplotlib.pyplot as plt
import torch
import torch.distributed as dist

from kit.chapter_training import ChapterTraining
from kit.checkpoint import Progress
from kit.device import eager_model
from kit.distributed import is_distributed
from kit.dpo_loss import compute_dpo_loss_batch, evaluate_dpo_loss_loader
from kit.files import atomic_write, image_format
from previous_chapters import TrainingHooks

REWARD_FIELDS = ("train_chosen_reward", "train_rejected_reward", "val_chosen_reward",
                 "val_rejected_reward")
DPO_METRICS_FIELDS = ("step", "tokens_seen", "train_loss", "val_loss", *REWARD_FIELDS)


@dataclasses.dataclass
class DPOProgress(Progress):
    """The chapter's `Progress` with the DPO curves: the rewards of each evaluation, and the
    precomputed reference log-probabilities (None with a live reference), which a resumed
    run reuses."""

    train_chosen_rewards: list = dataclasses.field(default_factory=list)
    train_rejected_rewards: list = dataclasses.field(default_factory=list)
    val_chosen_rewards: list = dataclasses.field(default_factory=list)
    val_rejected_rewards: list = dataclasses.field(default_factory=list)
    reference_logprobs: dict | None = None


class DPOHooks(TrainingHooks):
    """The points where `train_model_dpo_simple` can be extended; these defaults are the
    notebook's loop. The reward curves are kept in the progress beside the loss curves."""

    def start(self):
        progress = super().start()
        for field in REWARD_FIELDS:
            vars(progress).setdefault(f"{field}s", [])
        return progress

    def dpo_loss(self, batch, policy_model, reference_model, beta):
        """The loss to backpropagate for one batch."""
        loss, _, _ = compute_dpo_loss_batch(batch, policy_model, reference_model, beta)
        return loss

    def evaluate_dpo(self, policy_model, reference_model, train_loader, val_loader, beta,
                     eval_iter):
        """The losses and rewards of an evaluation (`evaluate_dpo_loss_loader`'s dict)."""
        return evaluate_dpo_loss_loader(policy_model, reference_model, train_loader, val_loader,
                                        beta, eval_iter)


def record_evaluation(progress, res):
    """Append an evaluation's losses, rewards and the tokens seen to the progress's curves."""
    progress.train_losses.append(res["train_loss"])
    progress.val_losses.append(res["val_loss"])
    progress.track_tokens_seen.append(progress.tokens_seen)
    for field in REWARD_FIELDS:
        getattr(progress, f"{field}s").append(res[field])


def evaluation_line(epoch, step, res):
    """The notebook's line for an evaluation: losses and reward margins to 3 decimals."""
    train_margin = res["train_chosen_reward"] - res["train_rejected_reward"]
    val_margin = res["val_chosen_reward"] - res["val_rejected_reward"]
    return (f"Ep {epoch + 1} (Step {step:06d}): Train loss {res['train_loss']:.3f}, "
            f"Val loss {res['val_loss']:.3f}, Train reward margins {train_margin:.3f}, "
            f"Val reward margins {val_margin:.3f}")


def tracking(progress):
    """The curves as the notebook's loop returns them: losses, rewards and tokens seen."""
    return {"train_losses": progress.train_losses, "val_losses": progress.val_losses,
            **{f"{field}s": getattr(progress, f"{field}s") for field in REWARD_FIELDS},
            "tokens_seen": progress.track_tokens_seen}


def train_model_dpo_simple(policy_model, reference_model, train_loader, val_loader, optimizer,
                           num_epochs, beta, eval_freq, eval_iter, start_context, tokenizer,
                           hooks=None):
    """Train the policy with DPO for `num_epochs` against `reference_model` (a model, or a
    `PrecomputedReference`); return the curves (`tracking`), one entry per evaluation."""
    hooks = hooks or DPOHooks()
    progress = hooks.start()
    device = next(policy_model.parameters()).device
    for epoch in range(progress.epoch, num_epochs):
        policy_model.train()
        for batch in hooks.epoch_batches(train_loader, progress):
            optimizer.zero_grad()
            loss = hooks.dpo_loss(batch, policy_model, reference_model, beta)
            loss.backward()
            hooks.before_update(policy_model, optimizer, progress)
            optimizer.step()
            progress.tokens_seen += hooks.batch_tokens(batch["chosen"])
            progress.global_step += 1
            if progress.global_step % eval_freq == 0:
                res = hooks.evaluate_dpo(policy_model, reference_model, train_loader,
                                         val_loader, beta, eval_iter)
                record_evaluation(progress, res)
                print(evaluation_line(epoch, progress.global_step, res))
            hooks.step_done(progress)
        progress.epoch = epoch + 1
        hooks.epoch_done(policy_model, tokenizer, device, start_context, progress)
    return tracking(progress)


class DPOTraining(DPOHooks, ChapterTraining):
    """`ChapterTraining` (resuming, signals, the bar, the metrics log, the best weights,
    precision, divergence checks) around `train_model_dpo_simple`.

    The metrics log has the DPO columns (`DPO_METRICS_FIELDS`) at full precision.
    `reference_logprobs` (the precomputed reference's `state()`, None with a live reference)
    goes into the progress, hence the checkpoint, which a resumed run reuses.
    """

    metrics_fields = DPO_METRICS_FIELDS
    progress_class = DPOProgress

    def __init__(self, *args, reference_logprobs=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.reference_logprobs = reference_logprobs

    def start(self):
        progress = super().start()
        if self.reference_logprobs is not None:
            progress.reference_logprobs = self.reference_logprobs
        return progress

    def dpo_loss(self, batch, policy_model, reference_model, beta):
        """The batch's loss under `ctx`, noted for the divergence checks, scaled for fp16.
        Under torchrun, each rank's loss (the mean over its share of the global batch) is
        weighted by its share's size, so that the gradients that DistributedDataParallel
        averages over the ranks are those of the global batch's mean."""
        self.model = policy_model
        with self.ctx:
            loss = super().dpo_loss(batch, policy_model, reference_model, beta)
        if self.distributed:
            loss = loss * share_weight(len(batch["chosen"]), self.device)
        counted = batch["chosen_mask"][:, 1:].sum() + batch["rejected_mask"][:, 1:].sum()
        self.watch.note_loss(loss, counted)
        return self.scaled(loss)

    def evaluate_dpo(self, policy_model, reference_model, train_loader, val_loader, beta,
                     eval_iter):
        """The notebook's evaluation under `ctx`, on the eager model; the step's gradients are
        freed first, their norm noted for the divergence checks."""
        self.watch.note_gradients(policy_model)
        policy_model.zero_grad(set_to_none=True)
        with self.ctx:
            res = super().evaluate_dpo(eager_model(policy_model), reference_model,
                                       train_loader, val_loader, beta, eval_iter)
        return across_ranks(res, train_loader, eval_iter, self.device)

    def metrics_row(self, progress):
        """The chapter's metrics row with the evaluation's rewards."""
        return {**super().metrics_row(progress),
                **{field: getattr(progress, f"{field}s")[-1] for field in REWARD_FIELDS}}


def initial_evaluation(policy_model, train_loader, val_loader, beta, eval_iter, ctx=None):
    """The notebook's check before training, under `ctx`: the losses and rewards of the policy
    against itself, which is the reference before its first update (ln 2 and zero margins)."""
    with ctx or nullcontext():
        res = evaluate_dpo_loss_loader(policy_model, None, train_loader, val_loader, beta,
                                       eval_iter)
    return across_ranks(res, train_loader, eval_iter, next(policy_model.parameters()).device)


def share_weight(count, device):
    """The weight of a rank's mean over its `count` sequences of the global batch: `count`
    times the number of ranks over the global batch's sequences (1 when the shares are equal),
    so that the ranks' average of the weighted means is the global batch's mean."""
    total = torch.tensor(count, device=device)
    dist.all_reduce(total)
    return count * dist.get_world_size() / total


def across_ranks(res, train_loader, eval_iter, device):
    """An evaluation's results (`evaluate_dpo_loss_loader`'s dict) as one process computes
    them. Under torchrun each rank evaluated its share of the first `eval_iter` global training
    batches, so the training loss and rewards are the ranks' values weighted by the sequences
    each evaluated; every rank evaluated the whole validation set, whose values are as they
    are."""
    if not is_distributed():
        return res
    fields = [field for field in res if field.startswith("train_")]
    count = min(eval_iter, len(train_loader)) * train_loader.batch_size
    sums = torch.tensor([res[field] * count for field in fields] + [count],
                        dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    return {**res, **{field: (sums[i] / sums[-1]).item() for i, field in enumerate(fields)}}


def plot_dpo(curves, epochs_trained, save_path):
    """Save a figure of the DPO losses and of the reward margins (chosen - rejected reward),
    training and validation, against epochs; the format comes from the extension."""
    epochs = torch.linspace(0, epochs_trained, len(curves["train_losses"]))
    margins = {split: [c - r for c, r in zip(curves[f"{split}_chosen_rewards"],
                                             curves[f"{split}_rejected_rewards"], strict=True)]
               for split in ("train", "val")}
    fig, (losses_ax, margins_ax) = plt.subplots(1, 2, figsize=(10, 3))
    losses_ax.plot(epochs, curves["train_losses"], label="Training loss")
    losses_ax.plot(epochs, curves["val_losses"], linestyle="-.", label="Validation loss")
    losses_ax.set_ylabel("DPO loss")
    margins_ax.plot(epochs, margins["train"], label="Training reward margin")
    margins_ax.plot(epochs, margins["val"], linestyle="-.", label="Validation reward margin")
    margins_ax.set_ylabel("Reward margin")
    for ax in (losses_ax, margins_ax):
        ax.set_xlabel("Epochs")
        ax.legend()
    fig.tight_layout()
    with atomic_write(save_path) as f:
        fig.savefig(f, format=image_format(save_path, "pdf"))
    plt.close(fig)
    print(f"Plot saved as {save_path}")
