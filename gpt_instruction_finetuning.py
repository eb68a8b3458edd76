"""Chapter 7 as one script: instruction finetuning of GPT-2 on an Alpaca-style dataset."""


class AlpacaPrompt:
    """The chapter's Alpaca-style prompt template: one job, turn an entry into text and back."""

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


ALPACA = AlpacaPrompt()


def format_input(entry):
    """Return the chapter's Alpaca-style prompt for one dataset entry (the book's function)."""
    return ALPACA.format_input(entry)
