"""Test and validation entries that repeat a training entry: the exact overlap of a split.

A test entry whose instruction and input are a training entry's is answered from memory, so
part of the test score measures memory rather than generalisation. The finetuning script
reports this before training, without changing the split. Texts are compared after folding
case and collapsing whitespace; near-duplicates (TF-IDF similarity) are find_near_duplicates.py's
work. Pure Python: a dictionary lookup per entry, milliseconds on the chapter's 1,100 entries.
"""

import shlex
import textwrap

SHOWN_NUMBERS = 5  # entry numbers named per split in the printed paragraph
PARAGRAPH_WIDTH = 100


def normalise(text):
    """`text` with case folded and every run of whitespace made one space, ends trimmed."""
    return " ".join(text.casefold().split())


def prompt_key(entry):
    """What the model is asked for an entry, normalised: its instruction and its input (a
    missing or null input counts as none)."""
    return normalise(entry["instruction"]), normalise(entry.get("input") or "")


def repeated_entries(train_data, entries):
    """{entry number in `entries`: [training entry numbers]} for each entry whose instruction
    and input repeat one or more training entries'; numbers count from 0 in list order."""
    by_key = {}
    for number, entry in enumerate(train_data):
        by_key.setdefault(prompt_key(entry), []).append(number)
    return {number: by_key[key] for number, entry in enumerate(entries)
            if (key := prompt_key(entry)) in by_key}


def split_overlap(train_data, test_data, val_data):
    """The repeated entries of the test and the validation set: {"test": {...}, "val": {...}},
    each as `repeated_entries` returns it."""
    return {"test": repeated_entries(train_data, test_data),
            "val": repeated_entries(train_data, val_data)}


def overlap_counts(overlap):
    """How many test and validation entries repeat a training entry: {"test": n, "val": n}."""
    return {name: len(repeated) for name, repeated in overlap.items()}


def overlap_paragraph(overlap, test_size, val_size, data_path):
    """The few lines the finetuning script prints when entries repeat a training entry, or None
    when none do; `test_size` and `val_size` count the entries of the test and validation set."""
    parts = [f"{len(repeated)} of the {size} {label} entries ({numbers(repeated)})"
             for repeated, size, label in ((overlap["test"], test_size, "test"),
                                           (overlap["val"], val_size, "validation"))
             if repeated]
    if not parts:
        return None
    sentence = (f"Overlap: in the split of {data_path}, {' and '.join(parts)} repeat a "
                "training entry's instruction and input (case and spacing ignored), so part "
                "of their score is memory, not generalisation. The split is kept as it is; to see "
                "these and the near-duplicates (--split val for validation), run:")
    command = (f"python find_near_duplicates.py {shlex.quote(str(data_path))} --split test "
               "--against_split train --fields prompt")
    return textwrap.fill(sentence, PARAGRAPH_WIDTH) + "\n  " + command

def numbers(repeated):
    """The first entry numbers of `repeated`, comma-separated, "..." when there are more."""
    shown = [str(number) for number in list(repeated)[:SHOWN_NUMBERS]]
    return ", ".join(shown) + (", ..." if len(repeated) > SHOWN_NUMBERS else "")
