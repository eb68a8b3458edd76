"""Find near-duplicate entries in an instruction dataset, field by field (the book's
ch07/02_dataset-utilities method).

    python find_near_duplicates.py instruction-data.json
    python find_near_duplicates.py instruction-data.json --split test --against_split train \
        --fields prompt
    python find_near_duplicates.py data.json --remove_duplicates --json_output_file clean.json

Each field's texts (the book's instruction, input and output, and with --fields also `prompt`,
the instruction and input together) are lowercased, stripped of punctuation and turned into
TF-IDF vectors of character 1- to 3-grams; a pair of entries whose cosine similarity is above
--threshold is printed with its similarity and both entries' numbers (counted from 0, within
the part with --split). Empty and one-character values pair with nothing. --against compares
the entries of DATA with those of another file (or another split of DATA) instead of with each
other. --remove_duplicates writes DATA without the entries that the book's rule removes: of
each pair found in `input`, `output` or `prompt` (never `instruction` alone: the same task
with another input is no copy), the later entry, or with --against the entry of DATA.
"""

import argparse
import os
import re
from dataclasses import dataclass

import numpy as np
from sklearn import __version__ as sklearn_version
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics.pairwise import cosine_similarity
from tqdm import tqdm

from kit.data import load_json_entries, save_entries
from kit.files import DataError, WriteError, check_writable_folder, fail
from kit.signals import stop_signals_interrupt

FIELDS = ("instruction", "input", "output")  # the book's, searched by default
PROMPT = "prompt"  # the instruction and input together: what the model is asked
REMOVED_BY = ("input", "output", PROMPT)  # the fields whose pairs remove an entry (the book's)
SPLITS = ("train", "val", "test")  # the finetuning script's split: 85% train, 10% test, 5% val
BLOCK_CELLS = 2**24  # similarities computed at once (128 MB): larger datasets go in row blocks
SEPARATOR = 50 * "="


@dataclass
class Entries:
    """Entries being searched: `numbers` are their entry numbers in the file (or split) they
    came from, `label` names that source in a pair across two sources ("test", "a.json")."""

    entries: list
    numbers: list
    label: str
    description: str

    def without(self, positions):
        """These entries less those at `positions` (positions in this list)."""
        kept = [k for k in range(len(self.entries)) if k not in positions]
        return Entries([self.entries[k] for k in kept], [self.numbers[k] for k in kept],
                       self.label, self.description)


def preprocess(text):
    """The book's text preparation: lowercase, punctuation removed."""
    return re.sub(r"[^\w\s]", "", text.lower())


def similar_pairs(texts, threshold, other_texts=None):
    """(i, j, similarity) of each pair of texts whose TF-IDF cosine similarity is above
    `threshold`: i < j within `texts`, or i in `texts` and j in `other_texts` when given; in
    the order of i, then j.

    Only non-empty texts get vectors (the vocabulary and IDF weights come from those of both
    lists), and each pair keeps its texts' own positions; a pair where either text has one
    character at most is left out, as the book does. Similarities are computed in row blocks,
    so a large dataset needs no square matrix of them in memory.
    """
    rows = [i for i, text in enumerate(texts) if text]
    column_texts = texts if other_texts is None else other_texts
    columns = rows if other_texts is None else [j for j, text in enumerate(other_texts) if text]
    documents = [texts[i] for i in rows]
    if other_texts is not None:
        documents += [other_texts[j] for j in columns]
    if not rows or not columns or not any(preprocess(document) for document in documents):
        return []  # nothing to pair, or nothing but punctuation: no character n-grams
    vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), preprocessor=preprocess)
    vectors = vectorizer.fit_transform(documents)
    row_vectors = vectors[:len(rows)]
    column_vectors = row_vectors if other_texts is None else vectors[len(rows):]
    block = max(1, BLOCK_CELLS // max(1, len(columns)))
    starts = range(0, len(rows), block)
    pairs = []
    for start in tqdm(starts, desc="Comparing", unit="block", disable=len(starts) < 2):
        similarity = cosine_similarity(row_vectors[start:start + block], column_vectors)
        if other_texts is None:
            similarity = np.triu(similarity, k=start + 1)  # each pair once: column after row
        for r, c in np.argwhere(similarity > threshold):
            i, j = rows[start + r], columns[c]
            if len(texts[i]) > 1 and len(column_texts[j]) > 1:
                pairs.append((i, j, float(similarity[r, c])))
    return pairs


def field_text(entry, field):
    """An entry's text of `field`; "prompt" is its instruction, then its input when it has
    one, on the next line."""
    if field == PROMPT:
        return "\n".join(text for text in (entry["instruction"], entry["input"]) if text)
    return entry[field]


def search_field(data, field, threshold, other=None):
    """The near-duplicate pairs of `field` within `data` (or between `data` and `other`), as
    (position in data, position in data or other, similarity)."""
    texts = [field_text(entry, field) for entry in data.entries]
    other_texts = (None if other is None
                   else [field_text(entry, field) for entry in other.entries])
    return similar_pairs(texts, threshold, other_texts)


def pair_heading(similarity, first, second, data, other):
    """"Duplicate pair found with similarity 0.94 (entries 3 and 17):", naming each source in
    a pair across two sources."""
    if other is None:
        where = f"entries {data.numbers[first]} and {data.numbers[second]}"
    else:
        where = (f"{data.label} entry {data.numbers[first]}, "
                 f"{other.label} entry {other.numbers[second]}")
    return f"Duplicate pair found with similarity {similarity:.2f} ({where}):"


def find_print_and_remove(data, fields, threshold, remove, other=None):
    """Search each of `fields` in turn and print its pairs as the book does, with entry
    numbers; with `remove`, each field is searched in what the previous ones left. Returns (the
    entries left, {field: number of pairs})."""
    found = {}
    for field in fields:
        pairs = search_field(data, field, threshold, other)
        found[field] = len(pairs)
        print(f"\n\n{SEPARATOR}\nSearching '{field}' for duplicates ...\n{SEPARATOR}")
        if not pairs:
            print("No duplicates found")
        for first, second, similarity in pairs:
            second_entry = (data if other is None else other).entries[second]
            print(f"{pair_heading(similarity, first, second, data, other)}\n"
                  f"1. {field_text(data.entries[first], field)}\n"
                  f"2. {field_text(second_entry, field)}\n")
        if remove and field in REMOVED_BY:
            data = data.without({first if other is not None else second
                                 for first, second, _ in pairs})
    return data, found


def load_entries(path, split):
    """The entries of `path`, or of one part of its 85/10/5 split (the finetuning script's)."""
    entries = load_json_entries(path)
    name = os.path.basename(path)
    if split is None:
        return Entries(entries, list(range(len(entries))), name, name)
    from gpt_instruction_finetuning import split_data  # PyTorch loads only for a split

    train_data, test_data, val_data = split_data(entries, path)
    part = {"train": train_data, "val": val_data, "test": test_data}[split]
    return Entries(part, list(range(len(part))), split, f"the {split} split of {name}")


def build_parser():
    """The flags; DATA is the dataset to search."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", metavar="DATA",
                        help="the dataset: a JSON list of entries, or JSON Lines")
    parser.add_argument("--threshold", type=float, default=0.9,
                        help="report pairs with a cosine similarity above this, between 0 and "
                             "1 where 1 is strictest (default: 0.9)")
    parser.add_argument("--fields", nargs="+", choices=(*FIELDS, PROMPT), default=list(FIELDS),
                        metavar="FIELD",
                        help="the fields to search, in order: instruction, input, output (the "
                             "book's, the default), and prompt: the instruction and input "
                             "together, what the model is asked")
    parser.add_argument("--split", choices=SPLITS,
                        help="search only this part of DATA's 85/10/5 split, as the finetuning "
                             "script splits it; entries are numbered within the part")
    parser.add_argument("--against", metavar="OTHER",
                        help="pair DATA's entries with OTHER's (a dataset file) instead of with "
                             "each other")
    parser.add_argument("--against_split", choices=SPLITS,
                        help="use only this part of OTHER's split (OTHER is DATA when "
                             "--against is not given)")
    parser.add_argument("--remove_duplicates", action="store_true",
                        help="write DATA (or its --split part) without the entries the book's "
                             "rule removes to --json_output_file")
    parser.add_argument("--json_output_file", metavar="PATH",
                        help="where --remove_duplicates writes the entries left: JSON Lines "
                             "for a .jsonl name, else a JSON list")
    return parser


def check_args(args):
    """Refuse flags that cannot work together, before any file is read."""
    if not 0 <= args.threshold <= 1:
        raise DataError(f"--threshold {args.threshold}: pass a value between 0 and 1")
    if args.remove_duplicates and not args.json_output_file:
        raise DataError("--remove_duplicates needs --json_output_file, the file to write the "
                        "entries left to")
    if args.json_output_file and not args.remove_duplicates:
        raise DataError("--json_output_file is written only with --remove_duplicates; add it")
    if args.against_split and args.against is None:
        args.against = args.data
    if args.json_output_file:
        output = os.path.realpath(args.json_output_file)
        if output in {os.path.realpath(path) for path in (args.data, args.against) if path}:
            raise DataError(f"--json_output_file {args.json_output_file}: is an input file; "
                            "pass another path, so the data is not overwritten")
        if os.path.isdir(output):
            raise DataError(f"--json_output_file {args.json_output_file}: is a folder; pass a "
                            "file path")
        check_writable_folder("--json_output_file", os.path.dirname(output))


def run(args):
    """Search DATA (against OTHER when given), print the pairs, and write what is left."""
    print("scikit-learn version:", sklearn_version)
    data = load_entries(args.data, args.split)
    other = None
    if args.against is not None:
        other = load_entries(args.against, args.against_split)
        if other.label == data.label:  # e.g. two files of the same name in other folders
            data.label, other.label = "1st", "2nd"
    if other is None:
        print(f"{len(data.entries)} entries of {data.description}, numbered from 0")
    else:
        print(f"1. {len(data.entries)} entries of {data.description}, numbered from 0\n"
              f"2. {len(other.entries)} entries of {other.description}, numbered from 0")
    left, found = find_print_and_remove(data, args.fields, args.threshold,
                                        args.remove_duplicates, other)
    counts = ", ".join(f"{field} {n}" for field, n in found.items())
    print(f"\nPairs with a similarity above {args.threshold}: {counts}")
    if args.remove_duplicates:
        save_entries(left.entries, args.json_output_file)
        removed = len(data.entries) - len(left.entries)
        print(f"Removed {removed} of {len(data.entries)} entries; the {len(left.entries)} left "
              f"saved as {args.json_output_file}")


def main(argv=None):
    """Parse and check the flags, then run; bad input ends with one 'Error:' line and exit 2."""
    args = build_parser().parse_args(argv)
    with stop_signals_interrupt():
        try:
            check_args(args)
            run(args)
        except DataError as exc:
            fail(exc)
        except WriteError as exc:
            fail(f"{exc.filename}: cannot be written ({exc.strerror}); free space or pass "
                 "another --json_output_file", code=1)


if __name__ == "__main__":
    main()
