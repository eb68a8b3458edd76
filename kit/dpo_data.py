"""Preference data for DPO: entries with a `chosen` and a `rejected` response, tokenized and
batched as the book's DPO notebook does (ch07/04_preference-tuning-with-dpo).

Each entry becomes three token lists: its prompt, the prompt followed by the response header and
the chosen response, and the same with the rejected one. A batch pads both kinds to the longest
of the two (plus one) with the end-of-text token, and its masks mark the response tokens: not
the padding, not the prompt, and not the newline tokens that open the response header (two for
the Alpaca style's "\\n\\n### Response:", one for Phi-3's "\\n<|assistant|>:").
"""

import torch
from torch.utils.data import DataLoader, Dataset

from gpt_download import END_OF_TEXT
from kit.data import ALPACA, check_entry, load_json_entries
from kit.distributed import ShardedShuffleSampler
from kit.files import DataError

PREFERENCE_FIELDS = ("instruction", "input", "output", "chosen", "rejected")
DATA_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/"
            "04_preference-tuning-with-dpo/instruction-data-with-preference.json")
DATA_FILE = "instruction-data-with-preference.json"


def load_preference_entries(file_path):
    """The entries of a preference dataset (a JSON list or JSON Lines), each checked to hold the
    chapter's fields and string `chosen` and `rejected` responses; DataError names the entry."""
    return load_json_entries(file_path, fields=PREFERENCE_FIELDS)


def check_preference_entries(entries, file_path):
    """Check entries read without the preference fields (a downloaded file) as
    `load_preference_entries` does."""
    for number, entry in enumerate(entries):
        check_entry(entry, PREFERENCE_FIELDS, f"{file_path}: entry {number}")
    return entries


def header_newlines(prompt_style):
    """How many newline tokens open the style's response header: the mask leaves them out with
    the prompt (the book's "+2" for Alpaca's two)."""
    header = prompt_style.format_response({"output": ""})
    return len(header) - len(header.lstrip("\n"))


class PreferenceDataset(Dataset):
    """The entries as token ids of the prompt, of prompt + chosen and of prompt + rejected,
    tokenized once up front. `first_index` numbers the entries (`index` in each item), so that
    values computed once per entry (the reference's log-probabilities) can be looked up from a
    batch; the validation set continues the training set's numbers."""

    def __init__(self, data, tokenizer, prompt_style=ALPACA, first_index=0):
        self.data = data
        self.encoded_texts = []
        for number, entry in enumerate(data):
            prompt = prompt_style.format_input(entry)
            self.encoded_texts.append({
                "prompt": tokenizer.encode(prompt),
                "chosen": tokenizer.encode(
                    prompt + prompt_style.format_response({**entry, "output": entry["chosen"]})),
                "rejected": tokenizer.encode(
                    prompt + prompt_style.format_response({**entry, "output": entry["rejected"]})),
                "index": first_index + number,
            })

    def __getitem__(self, index):
        return self.encoded_texts[index]

    def __len__(self):
        return len(self.data)


def custom_collate_fn(batch, pad_token_id=END_OF_TEXT, allowed_max_length=None,
                      mask_prompt_tokens=True, device="cpu", header_tokens=2):
    """Batch preference items as the book does: a dict of the prompts (a list of tensors), the
    `chosen` and `rejected` token ids (b, longest + 1) padded with `pad_token_id`, their masks
    (True on response tokens), and the items' `index` (b,).

    The masks drop the padding and, with `mask_prompt_tokens`, the prompt and the
    `header_tokens` newline tokens after it; every tensor is cut to `allowed_max_length`.
    """
    longest = max((len(item[key]) + 1 for item in batch for key in ("chosen", "rejected")),
                  default=0)
    out = {"prompt": [torch.tensor(item["prompt"]) for item in batch]}
    for key in ("chosen", "rejected"):
        sequences, masks = [], []
        for item in batch:
            sequence = item[key]
            mask = torch.zeros(longest, dtype=torch.bool)
            mask[:len(sequence)] = True
            if mask_prompt_tokens:
                mask[:len(item["prompt"]) + header_tokens] = False
            sequences.append(torch.tensor(sequence + [pad_token_id] * (longest - len(sequence))))
            masks.append(mask)
        out[key] = torch.stack(sequences)[:, :allowed_max_length].to(device)
        out[f"{key}_mask"] = torch.stack(masks)[:, :allowed_max_length].to(device)
    out["index"] = torch.tensor([item["index"] for item in batch], device=device)
    return out


def counted_tokens(item, key, allowed_max_length, header_tokens):
    """How many tokens of the item's `key` response the mask keeps, after the length limit."""
    return min(len(item[key]), allowed_max_length) - (len(item["prompt"]) + header_tokens)


def check_counted(dataset, allowed_max_length, header_tokens, data_path, split_name):
    """Refuse a dataset with an entry whose chosen or rejected response is cut off entirely by
    the model's context length: its mean log-probability would be 0/0."""
    for number, item in enumerate(dataset):
        for key in ("chosen", "rejected"):
            if counted_tokens(item, key, allowed_max_length, header_tokens) < 1:
                raise DataError(f"{data_path}: {split_name} entry {number} has no {key} response "
                                f"token within the model's {allowed_max_length}-token context "
                                "(its prompt fills it); shorten or remove that entry")


def build_loaders(train_dataset, val_dataset, batch_size, collate, rank=0, world_size=1):
    """The book's loaders: training shuffled with its last partial batch dropped, validation
    in order. No workers: every iteration draws its base seed from the global generator, so
    the order of random draws is the notebook's.

    Under torchrun `batch_size` is the global batch: each rank's training loader yields its
    share (`batch_size // world_size` entries) of the batches one process would train on, in
    the same order; every rank evaluates the whole validation set."""
    if world_size > 1:
        sampler = ShardedShuffleSampler(len(train_dataset), batch_size, rank, world_size)
        train_loader = DataLoader(train_dataset, batch_size=batch_size // world_size,
                                  sampler=sampler, collate_fn=collate, drop_last=True,
                                  num_workers=0)
    else:
        train_loader = DataLoader(train_dataset, batch_size=batch_size, collate_fn=collate,
                                  shuffle=True, drop_last=True, num_workers=0)
    val_loader = DataLoader(val_dataset, batch_size=batch_size, collate_fn=collate,
                            shuffle=False, drop_last=False, num_workers=0)
    return train_loader, val_loader
