"""A DPO training step: the book's notebook against dpo_finetuning.py, on the same batches.

    python benchmarks/bench_dpo.py            # GPT-2 124M, 6 measured steps a path
    python benchmarks/bench_dpo.py --quick    # a small 2-layer GPT-2, 1 step: the path only

Random weights (no download), batch 8 of the book's preference data in the notebook's shuffled
order, on the CPU. Both paths run the same model class (fused kernels) from the same weights:

- notebook: a policy and a reference model, four forward passes (the policy's and the
  reference's, chosen and rejected) over full logits, `compute_logprobs` on them, the
  reference's without gradients as in the notebook's `compute_dpo_loss_batch`; AdamW;
- script: the reference's log-probabilities precomputed once per entry (timed apart, per
  entry), one forward pass of the policy for chosen and rejected with logits only where a
  response token is predicted, fused AdamW.

Each path runs in a fresh process, which reports its median step and its peak resident memory.
"""

import argparse
import multiprocessing
import resource
import statistics
from functools import partial
from itertools import islice

import tiktoken
import torch
from common import gpt2_config, machine_line, table, timed

from gpt_instruction_finetuning import make_optimizer, split_data
from kit.dpo_data import (
    PreferenceDataset,
    build_loaders,
    custom_collate_fn,
    load_preference_entries,
)
from kit.dpo_loss import (
    PrecomputedReference,
    compute_dpo_loss,
    compute_dpo_loss_batch,
    compute_logprobs,
    pair_logprobs,
)
from previous_chapters import GPTModel

SHARED_PREFERENCES = "../shared/data/instruction-data-with-preference.json"


def config(quick):
    """GPT-2 124M's config, or for --quick a 2-layer one 64 wide."""
    quick_sizes = {"n_layers": 2, "emb_dim": 64, "n_heads": 2}
    return {**gpt2_config("124M"), **(quick_sizes if quick else {})}


def preference_batches(count, data_path, batch_size=8, seed=123):
    """The training dataset and its first `count` batches in the notebook's shuffled order."""
    train, _, _ = split_data(load_preference_entries(data_path), data_path)
    dataset = PreferenceDataset(train, tiktoken.get_encoding("gpt2"))
    torch.manual_seed(seed)
    loader, _ = build_loaders(dataset, dataset, batch_size,
                              partial(custom_collate_fn, allowed_max_length=1024))
    return dataset, list(islice(loader, count))


def notebook_step(policy, reference, optimizer, batch, beta=0.1):
    """The notebook's step: four forward passes over full logits (the reference's without
    gradients), then AdamW."""
    optimizer.zero_grad()
    policy_logprobs = [compute_logprobs(policy(batch[key]), batch[key], batch[f"{key}_mask"])
                       for key in ("chosen", "rejected")]
    with torch.no_grad():
        reference_logprobs = [compute_logprobs(reference(batch[key]), batch[key],
                                               batch[f"{key}_mask"])
                              for key in ("chosen", "rejected")]
    loss, _, _ = compute_dpo_loss(*policy_logprobs, *reference_logprobs, beta=beta)
    loss.backward()
    optimizer.step()


def script_step(policy, reference, optimizer, batch, beta=0.1):
    """dpo_finetuning.py's step: one forward pass, the reference looked up."""
    optimizer.zero_grad()
    loss, _, _ = compute_dpo_loss_batch(batch, policy, reference, beta)
    loss.backward()
    optimizer.step()


def reference_of(model, batches, num_entries):
    """The precomputed reference log-probabilities of the batches' entries, as
    `precompute_reference` computes them (in eval mode, without gradients, once per entry)."""
    chosen, rejected = torch.zeros(num_entries), torch.zeros(num_entries)
    model.eval()
    with torch.no_grad():
        for batch in batches:
            chosen[batch["index"]], rejected[batch["index"]] = pair_logprobs(model, batch)
    return PrecomputedReference(chosen, rejected)


def run_path(path, cfg, steps, data_path):
    """In a fresh process: (median step seconds, peak resident bytes, precompute seconds per
    entry or None) of `steps` steps of `path` after one warm-up step."""
    dataset, batches = preference_batches(steps + 1, data_path)
    torch.manual_seed(0)
    policy = GPTModel(cfg).train()
    precompute = None
    if path == "notebook":
        reference = GPTModel(cfg).eval()
        reference.load_state_dict(policy.state_dict())
        optimizer = torch.optim.AdamW(policy.parameters(), lr=5e-6, weight_decay=0.01)
        step = notebook_step
    else:
        seconds, reference = timed(lambda: reference_of(policy, batches, len(dataset)))
        precompute = seconds / sum(len(batch["index"]) for batch in batches)
        policy.train()
        optimizer = make_optimizer(policy, 5e-6, 0.01)
        step = script_step
    seconds = [timed(partial(step, policy, reference, optimizer, batch))[0] for batch in batches]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return statistics.median(seconds[1:]), peak, precompute


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a 2-layer, 64-wide GPT-2 and 1 step: checks the path, not the "
                             "figures")
    parser.add_argument("--steps", type=int, default=6, help="measured steps per path")
    parser.add_argument("--data_path", default=SHARED_PREFERENCES,
                        help="the book's preference data")
    args = parser.parse_args()
    steps = 1 if args.quick else args.steps
    cfg = config(args.quick)

    print(machine_line())
    results = {}
    for path in ("notebook", "script"):
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            results[path] = pool.apply(run_path, (path, cfg, steps, args.data_path))
    name = "GPT-2 2-layer, 64 wide" if args.quick else "GPT-2 124M"
    (book_s, book_peak, _), (ours_s, ours_peak, precompute) = results.values()
    rows = [
        ["notebook (two models, four passes)", f"{book_s:.2f} s", f"{book_peak / 2**30:.2f} GiB"],
        ["script (precomputed reference, one pass)", f"{ours_s:.2f} s",
         f"{ours_peak / 2**30:.2f} GiB"],
        ["speed-up / memory ratio", f"{book_s / ours_s:.2f}x", f"{ours_peak / book_peak:.2f}"],
        ["reference precompute, per entry (once)", f"{precompute:.3f} s", "-"],
        ["script step + its batch's precompute", f"{ours_s + 8 * precompute:.2f} s", "-"],
        ["speed-up with the precompute (one epoch)", f"{book_s / (ours_s + 8 * precompute):.2f}x",
         "-"],
    ]
    print(table([f"{name}, batch 8, {steps} steps, CPU", "median step", "peak resident"], rows))


if __name__ == "__main__":
    main()
