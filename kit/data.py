"""The chapter's data without PyTorch: dataset entries, checked, and the prompt styles.

A prompt style is a small object with a `name` that turns an entry into the text the model is
trained on and asked with. The finetuning script saves the style's name beside the weights, so
a finetuned model is always asked in the format it learned. The judge script imports this
module too, so it can build the chapter's prompts without loading torch.
"""

import json

from kit.files import DataError, atomic_write, read_json, save_json

END_OF_TEXT_MARK = "<|endoftext|>"  # GPT-2's only special token, as text


def load_json_entries(file_path, fields=("instruction", "input", "output"), training=False):
    """Read a dataset of entries and check that each has string values for `fields`.

    With `training` (a dataset to finetune on), a field holding "<|endoftext|>" is refused
    (`check_entry`).

    The file is the book's JSON list of entries, or JSON Lines: one entry a line (a `.jsonl`
    file, or any file whose first character is "{"). An entry without `input`, or with
    `"input": null`, has no input: it gets the chapter's empty string, so every entry, and the
    answers file written from them, has the book's fields. Other fields are kept as they are.
    Raises DataError naming the file and the entry (its line in JSON Lines) that is wrong.
    """
    if is_json_lines(file_path):
        numbered = read_json_lines(file_path)
        where = "line"
    else:
        data = read_json(file_path)
        if not isinstance(data, list):
            raise DataError(f"{file_path}: expected a JSON list of entries (or JSON Lines, one "
                            f"entry a line), got {type(data).__name__}")
        numbered = list(enumerate(data))
        where = "entry"
    if not numbered:
        raise DataError(f"{file_path}: the dataset is empty")
    for number, entry in numbered:
        check_entry(entry, fields, f"{file_path}: {where} {number}", training)
    return [entry for _, entry in numbered]


def save_entries(entries, path):
    """Write `entries` whole (a temporary file, then a rename): JSON Lines for a .jsonl path,
    else the book's indented JSON list. `load_json_entries` reads either back."""
    if str(path).lower().endswith(".jsonl"):
        with atomic_write(path, "w") as f:
            f.writelines(json.dumps(entry) + "\n" for entry in entries)
    else:
        save_json(entries, path)


def is_json_lines(file_path):
    """True for a JSON Lines file: named .jsonl, or starting with "{" (a JSON list starts with
    "["). An unreadable file is left to the reader, which names the problem."""
    if str(file_path).lower().endswith(".jsonl"):
        return True
    try:
        with open(file_path, encoding="utf-8") as f:
            start = f.read(4096).lstrip("\ufeff \t\r\n")
    except (OSError, UnicodeDecodeError):
        return False
    return start.startswith("{")


def read_json_lines(file_path):
    """The (line number, value) of each non-blank line of a JSON Lines file, numbered from 1."""
    try:
        with open(file_path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise DataError(f"{file_path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{file_path}: is a folder, not a JSON Lines file") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{file_path}: not UTF-8 text ({exc})") from None
    numbered = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            numbered.append((number, json.loads(line)))
        except ValueError as exc:
            raise DataError(f"{file_path}: line {number} is not valid JSON ({exc})") from None
        except RecursionError:
            raise DataError(f"{file_path}: line {number} is nested too deeply") from None
    return numbered


def check_entry(entry, fields, name, training=False):
    """Check one entry in place; `name` says where it is ("data.jsonl: line 3"). A missing or
    null `input` becomes "" (no input); strings must be text that can be tokenized.

    With `training`, "<|endoftext|>" in a field is refused too. The book's InstructionDataset
    encodes each entry with `tokenizer.encode(full_text)`, which raises on it, so the book
    cannot finetune on such an entry either; encoding it as plain text instead would teach the
    model to write the end marker as ordinary tokens, which its answers would then carry (and
    an exported tokenizer reads as the real end). One line naming the entry lets the data be
    fixed.
    """
    if not isinstance(entry, dict):
        raise DataError(f"{name} is not an object")
    if "input" in fields and entry.get("input") is None:
        entry["input"] = ""
    for field in fields:
        if field not in entry:
            raise DataError(f"{name} has no '{field}' field")
        value = entry[field]
        if not isinstance(value, str):
            raise DataError(f"{name} field '{field}' must be a string, "
                            f"got {type(value).__name__}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"{name} field '{field}' holds a lone surrogate escape (such as "
                            "\\ud800), which is not text; fix or remove it") from None
        if training and END_OF_TEXT_MARK in value:
            raise DataError(f"{name} field '{field}' holds {END_OF_TEXT_MARK}, GPT-2's "
                            "end-of-text token, which finetuning puts after every response "
                            "and the tokenizer refuses inside an entry; remove it or write it "
                            "another way")


def warn_if_truncated(dataset, allowed_max_length, split_name):
    """Print one line counting the entries that the collate function will cut short."""
    too_long = sum(len(token_ids(dataset[i])) > allowed_max_length for i in range(len(dataset)))
    if too_long:
        print(f"Warning: {too_long} of {len(dataset)} {split_name} entries are longer than "
              f"{allowed_max_length} tokens and will be truncated")


def token_ids(item):
    """The token ids of a dataset item (the masking exercise stores more beside them)."""
    return item[1] if isinstance(item, tuple) else item


class AlpacaPrompt:
    """The chapter's Alpaca-style prompt template: turn an entry into text, and an answer back."""

    name = "alpaca"
    preamble = (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request."
    )

    def format_input(self, entry):
        """Return the prompt for `entry`: preamble, instruction, and the input when there is one."""
        instruction_text = f"{self.preamble}\n\n### Instruction:\n{entry['instruction']}"
        input_text = f"\n\n### Input:\n{entry['input']}" if entry.get("input") else ""
        return instruction_text + input_text

    def format_response(self, entry):
        """Return what training appends to the prompt: the response header and the output."""
        return f"\n\n### Response:\n{entry['output']}"

    def extract_response(self, generated_text, input_text):
        """Return the model's answer from `generated_text`: prompt and response header removed."""
        return generated_text[len(input_text):].replace("### Response:", "").strip()


class Phi3Prompt:
    """The prompt template of Microsoft's Phi-3 (exercise 7.1): no preamble, fewer tokens."""

    name = "phi3"

    def format_input(self, entry):
        """Return the prompt for `entry`: the user tag, instruction, and input when there is one."""
        input_text = f"\n{entry['input']}" if entry.get("input") else ""
        return f"<|user|>\n{entry['instruction']}{input_text}"

    def format_response(self, entry):
        """Return what training appends to the prompt: the assistant tag and the output."""
        return f"\n<|assistant|>:\n{entry['output']}"

    def extract_response(self, generated_text, input_text):
        """Return the model's answer from `generated_text`: prompt and assistant tag removed."""
        return generated_text[len(input_text):].replace("<|assistant|>:", "").strip()


ALPACA = AlpacaPrompt()


PROMPT_STYLES = {style.name: style for style in (ALPACA, Phi3Prompt())}


def format_input(entry):
    """Return the chapter's Alpaca-style prompt for one dataset entry (the book's function)."""
    return ALPACA.format_input(entry)
