"""Where a training step's time goes, for the GPT-2 124M and 355M shapes on the CPU.

    python benchmarks/profile_step.py                 # 124M and 355M, book and fast paths
    python benchmarks/profile_step.py --sizes 124M

Each part of the step is timed on its own, forward and backward, on hidden states of the
chapter's real batch shapes (batch 8; the first batches of the shuffled training loader; for
the fast path the rows packed up to each one's last counted target, as the model computes them):
  attention   norm1 + the attention sublayer, times the number of layers
  MLP         norm2 + the feedforward sublayer, times the number of layers
  head + loss final norm + output head + cross-entropy
  optimizer   one AdamW step over all parameters
  data        building the batch with the collate function
  other       the whole step minus the parts above (embeddings, residual adds, zero_grad);
              each part timed on its own carries its own start-up cost, so when the rest of
              the step is small this comes out slightly below zero
The whole step is timed as the chapter script (fast) or the book's code (book) runs it.
"""

import argparse
import statistics
from functools import partial

import tiktoken
import torch
import torch.nn.functional as F
from common import chapter_data, machine_line, real_batches, table, timed, training_setup

from gpt_instruction_finetuning import InstructionDataset, custom_collate_fn
from previous_chapters import needed_lengths, pack_rows


def backward_seconds(fn, x):
    """Seconds of fn(x) forward plus backward of its sum."""
    def run():
        fn(x).float().sum().backward()
    return timed(run)[0]


def part_seconds(model, inputs, targets, fast):
    """Seconds of each part of one step on this batch's shape (see the module docstring)."""
    b, t = inputs.shape
    emb = model.tok_emb.embedding_dim
    block = model.trf_blocks[0]
    layers = len(model.trf_blocks)
    if fast:  # the rows packed into one sequence, up to each row's last counted target
        keep = targets != -100
        lengths = needed_lengths(keep)
        segments = lengths.tolist()
        x = torch.randn(1, sum(segments), emb, requires_grad=True)
        packed_keep = pack_rows(keep, lengths)

        def attention(h):
            return block.att(block.norm1(h), segments=segments)

        def head(h):
            logits = model.out_head(model.final_norm(h[0])[packed_keep])
            return F.cross_entropy(logits, targets[keep])
    else:
        x = torch.randn(b, t, emb, requires_grad=True)

        def attention(h):
            return block.att(block.norm1(h))

        def head(h):
            logits = model.out_head(model.final_norm(h))
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    return {"attention": backward_seconds(attention, x) * layers,
            "MLP": backward_seconds(lambda h: block.ff(block.norm2(h)), x) * layers,
            "head + loss": backward_seconds(head, x)}


def profile(size, batches, items):
    """Median seconds per part for the book and the fast path: {path: {part: seconds}}."""
    results = {}
    for path in ("book", "fast"):
        model, optimizer, step = training_setup(size, path)
        fused = path == "fast"
        samples = []
        for inputs, targets in batches:
            parts = part_seconds(model, inputs, targets, fused)
            step_time, _ = timed(partial(step, model, optimizer, inputs, targets))
            parts["optimizer"] = timed(optimizer.step)[0]
            parts["data"] = timed(lambda: custom_collate_fn(items))[0]
            parts["step"] = step_time
            samples.append(parts)
        medians = {part: statistics.median(s[part] for s in samples[1:]) for part in samples[0]}
        medians["other"] = medians["step"] - sum(v for k, v in medians.items() if k != "step")
        results[path] = medians
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["124M", "355M"], choices=["124M", "355M"])
    parser.add_argument("--batches", type=int, default=8, help="batches measured (1 warms up)")
    args = parser.parse_args()

    print(machine_line())
    batches = real_batches(args.batches)
    train, _, _ = chapter_data()
    items = [InstructionDataset(train[:8], tiktoken.get_encoding("gpt2"))[i] for i in range(8)]
    for size in args.sizes:
        results = profile(size, batches, items)
        rows = []
        for part in ["attention", "MLP", "head + loss", "optimizer", "data", "other", "step"]:
            row = [part]
            for path in ("book", "fast"):
                seconds = results[path][part]
                share = 100 * seconds / results[path]["step"]
                row.append(f"{1000 * seconds:.0f} ms ({share:.0f}%)")
            rows.append(row)
        print(table([f"GPT-2 {size} step", "book", "fast"], rows))


if __name__ == "__main__":
    main()
