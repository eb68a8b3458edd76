"""The DPO loss of the book's notebook, computed with less work and memory.

The book's functions keep their names, signatures and numbers: `compute_logprobs`,
`compute_dpo_loss`, `compute_dpo_loss_batch`, `compute_dpo_loss_loader` and
`evaluate_dpo_loss_loader`. What changes is how the log-probabilities are reached:

- the policy's chosen and rejected sequences go through the model in one forward pass, and
  logits are computed only where a response token is predicted (on a CPU the rows are also
  packed up to their last response token), so the output head, the largest matrix, and the
  log-softmax over the vocabulary run on a few hundred positions instead of every one;
- the reference model is either a model (the notebook's way, computed live for each batch),
  or its log-probabilities computed once per entry before training (`precompute_reference`),
  so that only the policy is in memory while training.
"""

from itertools import islice

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from kit.distributed import is_distributed, is_main_process


def compute_dpo_loss(model_chosen_logprobs, model_rejected_logprobs, reference_chosen_logprobs,
                     reference_rejected_logprobs, beta=0.1):
    """The DPO loss of a batch from its per-sequence mean log-probabilities (each (b,)):
    -log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r))), averaged over the batch. Returns
    (loss, mean chosen reward, mean rejected reward), a reward being pi - ref, detached."""
    model_logratios = model_chosen_logprobs - model_rejected_logprobs
    reference_logratios = reference_chosen_logprobs - reference_rejected_logprobs
    losses = -F.logsigmoid(beta * (model_logratios - reference_logratios))
    chosen_rewards = (model_chosen_logprobs - reference_chosen_logprobs).detach()
    rejected_rewards = (model_rejected_logprobs - reference_rejected_logprobs).detach()
    return losses.mean(), chosen_rewards.mean(), rejected_rewards.mean()


def compute_logprobs(logits, labels, selection_mask=None):
    """The book's per-sequence mean log-probability of `labels` (b, num_tokens) under `logits`
    (b, num_tokens, vocab_size): labels shifted by one, averaged over the tokens that
    `selection_mask` keeps (all without one). Returns (b,)."""
    labels = labels[:, 1:]
    log_probs = F.log_softmax(logits[:, :-1, :], dim=-1)
    selected = torch.gather(log_probs, -1, labels.unsqueeze(-1)).squeeze(-1)  # (b, n - 1)
    if selection_mask is None:
        return selected.mean(-1)
    mask = selection_mask[:, 1:]
    return (selected * mask).sum(-1) / mask.sum(-1)


def pair_logprobs(model, batch):
    """(chosen, rejected) mean log-probabilities (each (b,)) of a batch's responses, both in one
    forward pass of `model`, logits computed only where a response token is predicted.

    A model without `keep=` (the book's GPTModel) gets the book's computation over full logits.
    """
    device = next(model.parameters()).device
    inputs = torch.cat([batch["chosen"], batch["rejected"]]).to(device)  # (2b, num_tokens)
    masks = torch.cat([batch["chosen_mask"], batch["rejected_mask"]]).to(device)
    if not hasattr(getattr(model, "module", model), "packed_features"):
        return compute_logprobs(model(inputs).float(), inputs, masks).chunk(2)
    counted = masks[:, 1:]  # (2b, num_tokens - 1): the labels that count
    keep = F.pad(counted, (0, 1))  # position t predicts token t + 1
    logits = model(inputs, keep=keep).float()  # (num_counted, vocab_size)
    token_logprobs = logits.log_softmax(-1).gather(
        -1, inputs[:, 1:][counted].unsqueeze(-1)).squeeze(-1)  # (num_counted,)
    rows = torch.arange(len(inputs), device=device).unsqueeze(1).expand_as(counted)[counted]
    sums = torch.zeros(len(inputs), device=device).index_add_(0, rows, token_logprobs)
    return (sums / counted.sum(-1)).chunk(2)


class PrecomputedReference:
    """The reference model's (chosen, rejected) mean log-probabilities of every entry, looked
    up by the `index` of a batch's items: the frozen reference computes the same for an entry
    whatever batch it comes in, so it is computed once (`precompute_reference`)."""

    def __init__(self, chosen, rejected):
        self.chosen, self.rejected = chosen, rejected  # (num_entries,) each, on the CPU

    def lookup(self, batch, device):
        """(chosen, rejected) reference log-probabilities of the batch's entries on `device`."""
        index = batch["index"].cpu()
        return self.chosen[index].to(device), self.rejected[index].to(device)

    def state(self):
        """What a checkpoint keeps of it (it belongs to the SFT weights, not to the policy)."""
        return {"chosen": self.chosen, "rejected": self.rejected}

    @classmethod
    def from_state(cls, state, num_entries):
        """The table kept by `state`, or None when `state` is not one for `num_entries`."""
        if not isinstance(state, dict):
            return None
        chosen, rejected = state.get("chosen"), state.get("rejected")
        if not all(isinstance(t, torch.Tensor) and t.shape == (num_entries,)
                   for t in (chosen, rejected)):
            return None
        return cls(chosen.float(), rejected.float())


def precompute_reference(model, datasets, collate, batch_size, ctx):
    """The reference log-probabilities of every entry of `datasets` (numbered one after
    another by their `index`), computed by `model` in eval mode under `ctx`, `batch_size`
    entries at a time in file order: no random number is drawn.

    Under torchrun the ranks take turns with these batches and then add up their tables, in
    which the entries of the others' batches are zeros: every rank ends with the table one
    process computes, each value from the same batch, hence bit for bit the same."""
    items = [item for dataset in datasets for item in dataset]
    chosen, rejected = torch.zeros(len(items)), torch.zeros(len(items))
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)
    starts = range(rank * batch_size, len(items), world_size * batch_size)  # this rank's turns
    model.eval()
    with (torch.no_grad(), ctx,
          tqdm(total=sum(len(items[start:start + batch_size]) for start in starts),
               desc="Reference log-probabilities", disable=not is_main_process()) as bar):
        for start in starts:
            batch = collate(items[start:start + batch_size])
            pair = pair_logprobs(model, batch)
            chosen[batch["index"]], rejected[batch["index"]] = (t.cpu() for t in pair)
            bar.update(len(batch["index"]))
    if world_size > 1:
        device = next(model.parameters()).device  # nccl adds up GPU tensors, gloo CPU ones
        table = torch.stack([chosen, rejected]).to(device)
        dist.all_reduce(table)
        chosen, rejected = table.cpu()
    return PrecomputedReference(chosen, rejected)


def reference_logprobs(reference_model, batch, policy_pair):
    """(chosen, rejected) reference log-probabilities of the batch.

    `reference_model` is a model (computed live, without gradients), a PrecomputedReference,
    or None before the policy's first update, when the policy is the reference: its own
    log-probabilities are then the reference's, bit for bit, as the notebook's two copies of
    the same weights compute them.
    """
    if reference_model is None:
        return tuple(t.detach() for t in policy_pair)
    if isinstance(reference_model, PrecomputedReference):
        return reference_model.lookup(batch, policy_pair[0].device)
    with torch.no_grad():
        return pair_logprobs(reference_model, batch)


def compute_dpo_loss_batch(batch, policy_model, reference_model, beta):
    """The DPO loss of one batch and its mean chosen and rejected rewards (the book's
    function; `reference_model` as `reference_logprobs` takes it)."""
    policy_chosen, policy_rejected = pair_logprobs(policy_model, batch)
    ref_chosen, ref_rejected = reference_logprobs(reference_model, batch,
                                                  (policy_chosen, policy_rejected))
    return compute_dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta)


def compute_dpo_loss_loader(data_loader, policy_model, reference_model, beta, num_batches=None):
    """(loss, chosen reward, rejected reward) averaged over the first `num_batches` batches of
    `data_loader` (all when None), as the book computes them; NaN for an empty loader."""
    if len(data_loader) == 0:
        return float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    total_loss = total_chosen = total_rejected = 0.0
    for batch in islice(data_loader, num_batches):
        loss, chosen_rewards, rejected_rewards = compute_dpo_loss_batch(
            batch, policy_model, reference_model, beta)
        total_loss += loss.item()
        total_chosen += chosen_rewards.item()
        total_rejected += rejected_rewards.item()
    return total_loss / num_batches, total_chosen / num_batches, total_rejected / num_batches


def evaluate_dpo_loss_loader(policy_model, reference_model, train_loader, val_loader, beta,
                             eval_iter):
    """The DPO loss and rewards over `eval_iter` training and validation batches, in eval mode
    and without gradients (the book's function): a dict of train_loss, train_chosen_reward,
    train_rejected_reward, val_loss, val_chosen_reward, val_rejected_reward."""
    policy_model.eval()
    with torch.no_grad():
        train = compute_dpo_loss_loader(train_loader, policy_model, reference_model, beta,
                                        num_batches=eval_iter)
        val = compute_dpo_loss_loader(val_loader, policy_model, reference_model, beta,
                                      num_batches=eval_iter)
    policy_model.train()
    return {"train_loss": train[0], "train_chosen_reward": train[1],
            "train_rejected_reward": train[2], "val_loss": val[0],
            "val_chosen_reward": val[1], "val_rejected_reward": val[2]}
