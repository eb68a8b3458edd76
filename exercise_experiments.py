"""The chapter's four exercises as runnable experiments.

    python exercise_experiments.py --exercise_solution baseline           # the chapter's run
    python exercise_experiments.py --exercise_solution phi3_prompt        # exercise 7.1
    python exercise_experiments.py --exercise_solution mask_instructions  # exercise 7.2
    python exercise_experiments.py --exercise_solution alpaca_52k         # exercise 7.3
    python exercise_experiments.py --exercise_solution lora               # exercise 7.4
    python exercise_experiments.py --exercise_solution lora,alpaca_52k    # changes combine

Each experiment is the chapter's finetuning run with one thing changed; everything else comes
from gpt_instruction_finetuning.py, and all of its flags (--test_mode, --model, --epochs, ...)
work here too. Output files carry the experiment's name, e.g. loss-plot-lora.pdf.
"""

import math
import sys
from dataclasses import replace

import torch
import torch.nn as nn

from gpt_instruction_finetuning import (
    ALPACA,
    DataError,
    Experiment,
    InstructionDataset,
    build_parser,
    custom_collate_fn,
    main,
)

ALPACA_URL = "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json"
EXERCISES = ("baseline", "mask_instructions", "alpaca_52k", "phi3_prompt", "lora")


#####################################
# Exercise 7.1: the Phi-3 prompt template
#####################################


class Phi3Prompt:
    """Microsoft's Phi-3 chat template: shorter than Alpaca's, no preamble."""

    name = "phi3"

    def format_input(self, entry):
        """`<|user|>`, the instruction, and the input on its own line when there is one."""
        input_text = f"\n{entry['input']}" if entry["input"] else ""
        return f"<|user|>\n{entry['instruction']}{input_text}"

    def format_response(self, entry):
        """What training appends: the assistant tag and the output."""
        return f"\n<|assistant|>:\n{entry['output']}"

    def extract_response(self, generated_text, input_text):
        """The model's answer: prompt and assistant tag removed."""
        return generated_text[len(input_text):].replace("<|assistant|>:", "").strip()


def mean_prompt_tokens(data, tokenizer, prompt_style):
    """Average token count of prompt + response over `data` under `prompt_style`."""
    return sum(len(tokenizer.encode(prompt_style.format_input(e) + prompt_style.format_response(e)))
               for e in data) / len(data)


def report_token_savings(data, tokenizer):
    """Print how many tokens per entry the Phi-3 template saves over Alpaca's on `data`."""
    alpaca = mean_prompt_tokens(data, tokenizer, ALPACA)
    phi3 = mean_prompt_tokens(data, tokenizer, Phi3Prompt())
    print(f"Phi-3 prompt saves {alpaca - phi3:.1f} tokens per entry on average "
          f"(Alpaca {alpaca:.1f}, Phi-3 {phi3:.1f})")


#####################################
# Exercise 7.2: loss on the response only
#####################################


class InstructionDatasetWithPromptLength(InstructionDataset):
    """The chapter's dataset, whose items also carry the length of their prompt in tokens."""

    def __init__(self, data, tokenizer, prompt_style):
        super().__init__(data, tokenizer, prompt_style)
        self.prompt_lengths = [len(tokenizer.encode(prompt_style.format_input(entry)))
                               for entry in data]

    def __getitem__(self, index):
        return self.prompt_lengths[index], self.encoded_texts[index]


def collate_masking_instructions(batch, pad_token_id=50256, ignore_index=-100,
                                 allowed_max_length=None, device="cpu"):
    """`custom_collate_fn` on the token lists, then -100 on every target inside the prompt.

    Target t predicts token t + 1, so the first `prompt_length - 1` targets are prompt tokens:
    the loss then covers only the response and its end-of-text token.
    """
    inputs, targets = custom_collate_fn([tokens for _, tokens in batch], pad_token_id,
                                        ignore_index, allowed_max_length, device)
    for row, (prompt_length, _) in enumerate(batch):
        targets[row, :prompt_length - 1] = ignore_index
    return inputs, targets


#####################################
# Exercise 7.4: LoRA
#####################################


class LoRALayer(nn.Module):
    """The low-rank update alpha * (x @ A @ B): A starts random, B at zero, so it adds nothing
    until training moves B."""

    def __init__(self, in_dim, out_dim, rank, alpha):
        super().__init__()
        self.A = nn.Parameter(torch.empty(in_dim, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear initializes its weights
        self.B = nn.Parameter(torch.zeros(rank, out_dim))
        self.alpha = alpha

    def forward(self, x):
        return self.alpha * (x @ self.A @ self.B)


class LinearWithLoRA(nn.Module):
    """A frozen nn.Linear plus a trainable LoRA update of the same shape."""

    def __init__(self, linear, rank, alpha):
        super().__init__()
        self.linear = linear
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha)

    def forward(self, x):
        return self.linear(x) + self.lora(x)


def replace_linear_with_lora(model, rank, alpha):
    """Wrap every nn.Linear inside `model` (attention, feedforward, output head) in place."""
    for name, module in model.named_children():
        if isinstance(module, nn.Linear):
            setattr(model, name, LinearWithLoRA(module, rank, alpha))
        else:
            replace_linear_with_lora(module, rank, alpha)


def merge_lora(model):
    """Fold each LoRA update into its linear layer (W += alpha * (A @ B).T) and unwrap it, so the
    model is a plain GPTModel again and its weights load without the LoRA classes."""
    for name, module in model.named_children():
        if isinstance(module, LinearWithLoRA):
            with torch.no_grad():
                delta = module.lora.alpha * (module.lora.A @ module.lora.B)  # (in, out)
                module.linear.weight += delta.T  # nn.Linear holds (out, in)
            setattr(model, name, module.linear)
        else:
            merge_lora(module)
    return model


def count_trainable(model):
    """Number of parameters that receive gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def add_lora(model, rank, alpha):
    """Freeze the model, add LoRA layers, and print the trainable parameter counts."""
    print(f"Total trainable parameters before: {count_trainable(model):,}")
    for param in model.parameters():
        param.requires_grad = False
    print(f"Total trainable parameters after: {count_trainable(model):,}")
    replace_linear_with_lora(model, rank, alpha)
    print(f"Total trainable LoRA parameters: {count_trainable(model):,}")
    return model


#####################################
# Putting an experiment together
#####################################


def parse_exercises(text):
    """Split 'lora,alpaca_52k' into names; refuse unknown names and the one clash."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        if name not in EXERCISES:
            raise DataError(f"unknown exercise '{name}'; choose from {', '.join(EXERCISES)}")
    if "mask_instructions" in names and "phi3_prompt" in names:
        raise DataError("mask_instructions cannot be combined with phi3_prompt: the masking "
                        "exercise is defined on the Alpaca prompt; run them one at a time")
    if not names:
        raise DataError(f"no exercise given; choose from {', '.join(EXERCISES)}")
    return names


def build_experiment(names, args):
    """The chapter's Experiment with each named exercise's change applied."""
    experiment = Experiment(name="-".join(
        {"mask_instructions": "mask-instructions", "alpaca_52k": "alpaca52k",
         "phi3_prompt": "phi3-prompt"}.get(name, name) for name in names))
    if "phi3_prompt" in names:
        experiment = replace(experiment, prompt_style=Phi3Prompt(),
                             inspect_data=report_token_savings)
    if "mask_instructions" in names:
        experiment = replace(experiment, dataset_class=InstructionDatasetWithPromptLength,
                             collate_fn=collate_masking_instructions)
    if "alpaca_52k" in names:
        experiment = replace(experiment, data_file="alpaca_data.json", data_url=ALPACA_URL,
                             batch_size=4, allowed_max_length=512)
    if "lora" in names:
        experiment = replace(
            experiment,
            prepare_model=lambda model: add_lora(model, args.lora_rank, args.lora_alpha),
            finish_model=merge_lora if args.merge_lora else None)
    return experiment


def build_exercise_parser():
    """The main script's flags plus the exercise's own."""
    parser = build_parser(description=__doc__)
    parser.add_argument("--exercise_solution", default="baseline",
                        help=f"one of {', '.join(EXERCISES)}, or several joined by commas "
                             "(default: baseline)")
    parser.add_argument("--lora_rank", type=int, default=16, help="LoRA rank (default: 16)")
    parser.add_argument("--lora_alpha", type=float, default=16,
                        help="LoRA scaling factor (default: 16)")
    parser.add_argument("--merge_lora", action="store_true",
                        help="fold the LoRA weights into the model before saving, so the .pth "
                             "loads into a plain GPTModel")
    return parser


def run_exercises(argv=None):
    """Parse the flags, assemble the experiment and run it with the main script."""
    parser = build_exercise_parser()
    args = parser.parse_args(argv)
    try:
        names = parse_exercises(args.exercise_solution)
    except DataError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    main(argv, build_experiment(names, args), parser)


if __name__ == "__main__":
    run_exercises()
