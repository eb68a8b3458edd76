"""The chapter's data without PyTorch: dataset entries, checked, and the prompt styles.

A prompt style is a small object with a `name` that turns an entry into the text the model is
trained on and asked with. The finetuning script saves the style's name beside the weights, so
a finetuned model is always asked in the format it learned. The judge script imports this
module too, so it can build the chapter's prompts without loading torch.
"""

from script_utils import DataError, read_json


def load_json_entries(file_path, fields=("instruction", "input", "output")):
    """Read a JSON list of entries and check that each has string values for `fields`."""
    data = read_json(file_path)
    if not isinstance(data, list):
        raise DataError(f"{file_path}: expected a JSON list of entries, "
                        f"got {type(data).__name__}")
    if not data:
        raise DataError(f"{file_path}: the dataset is empty")
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise DataError(f"{file_path}: entry {i} is not an object")
        for field in fields:
            if field not in entry:
                raise DataError(f"{file_path}: entry {i} has no '{field}' field")
            if not isinstance(entry[field], str):
                raise DataError(f"{file_path}: entry {i} field '{field}' must be a string, "
                                f"got {type(entry[field]).__name__}")
    return data


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
        input_text = f"\n\n### Input:\n{entry['input']}" if entry["input"] else ""
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
        input_text = f"\n{entry['input']}" if entry["input"] else ""
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
