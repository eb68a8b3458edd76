"""The four exercises of chapter 7 as runnable variations of the chapter's finetuning run.

    python exercise_experiments.py --exercise_solution baseline           # the chapter's run
    python exercise_experiments.py --exercise_solution phi3_prompt        # 7.1: Phi-3 prompt
    python exercise_experiments.py --exercise_solution mask_instructions  # 7.2: mask the prompt
    python exercise_experiments.py --exercise_solution alpaca_52k         # 7.3: Alpaca 52k data
    python exercise_experiments.py --exercise_solution lora               # 7.4: LoRA finetuning
    python exercise_experiments.py --exercise_solution lora --merge_lora  # save a plain GPTModel
    python exercise_experiments.py --exercise_solution lora,alpaca_52k    # changes combine
    python exercise_experiments.py --exercise_solution phi3_prompt --test_mode  # seconds, CPU

Every flag of gpt_instruction_finetuning.py works here too. The output files carry the
experiment's name: loss-plot-lora.pdf, instruction-data-with-response-lora.json,
gpt2-medium355M-sft-lora.pth; a combination joins the names with "_" (alpaca52k_lora).
"""

from dataclasses import replace
from functools import partial

from gpt_instruction_finetuning import (
    ALPACA,
    END_OF_TEXT,
    Experiment,
    InstructionDataset,
    custom_collate_fn,
    main,
)
from kit.cli import build_parser
from kit.data import Phi3Prompt, token_ids
from kit.files import fail
from lora import count_trainable, merge_lora, replace_linear_with_lora
from previous_chapters import IGNORE_INDEX

ALPACA_URL = "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json"


#####################################
# Exercise 7.1: the Phi-3 prompt template
#####################################


def mean_entry_tokens(data, tokenizer, prompt_style):
    """Average number of tokens of prompt + response per entry of `data` in `prompt_style`.

    `<|user|>` is not one of GPT-2's special tokens: plain `encode` splits it like any text.
    """
    total = sum(len(tokenizer.encode(prompt_style.format_input(entry)
                                     + prompt_style.format_response(entry))) for entry in data)
    return total / len(data)


def report_token_savings(data, tokenizer):
    """Print how many tokens per entry the Phi-3 template saves over Alpaca's on `data`.

    Shorter sequences mean less compute and memory per batch: part of what exercise 7.1 asks.
    """
    alpaca = mean_entry_tokens(data, tokenizer, ALPACA)
    phi3 = mean_entry_tokens(data, tokenizer, Phi3Prompt())
    print(f"Phi-3 prompt saves {alpaca - phi3:.1f} tokens per entry on average "
          f"(Alpaca {alpaca:.1f}, Phi-3 {phi3:.1f})")


#####################################
# Exercise 7.2: loss on the response only
#####################################


class InstructionDatasetWithPromptLength(InstructionDataset):
    """The chapter's dataset whose items are (prompt_length, token_ids).

    The prompt length (tokens of `format_input(entry)`) tells the collate function where the
    response starts; the prompt's tokens are the first tokens of the full sequence.
    """

    def __init__(self, data, tokenizer, prompt_style=ALPACA):
        super().__init__(data, tokenizer, prompt_style)
        self.prompt_lengths = [len(tokenizer.encode(prompt_style.format_input(entry)))
                               for entry in data]

    def __getitem__(self, index):
        return self.prompt_lengths[index], self.encoded_texts[index]


def collate_masking_instructions(batch, pad_token_id=END_OF_TEXT, ignore_index=IGNORE_INDEX,
                                 allowed_max_length=None, device="cpu"):
    """The chapter's batch of (prompt_length, token_ids) items, with the prompt's targets ignored.

    Padding, shifting and truncation are `custom_collate_fn`'s. Target j predicts token j + 1,
    so targets[:prompt_length - 1] predict the instruction and input: setting them to
    `ignore_index` leaves the loss on the response and the first end-of-text token.
    """
    inputs, targets = custom_collate_fn([token_ids(item) for item in batch], pad_token_id,
                                        ignore_index, allowed_max_length, device)
    for row, (prompt_length, _) in enumerate(batch):
        targets[row, :prompt_length - 1] = ignore_index
    return inputs, targets


#####################################
# Exercise 7.4: LoRA (the layers are in lora.py)
#####################################


def add_lora(model, rank, alpha):
    """Freeze `model`, add LoRA to its linear layers, print the trainable counts; return it.

    Only the LoRA matrices stay trainable, and the run's optimizer takes only those.
    """
    print(f"Total trainable parameters before: {count_trainable(model):,}")
    model.requires_grad_(False)
    print(f"Total trainable parameters after: {count_trainable(model):,}")
    replace_linear_with_lora(model, rank, alpha)
    print(f"Total trainable LoRA parameters: {count_trainable(model):,}")
    return model


#####################################
# The experiments and the command line
#####################################


def baseline(experiment, args):
    """The chapter's finetuning, unchanged."""
    return experiment


def mask_instructions(experiment, args):
    """Exercise 7.2: compute the loss on the response only, not on the instruction and input."""
    return replace(experiment, dataset_class=InstructionDatasetWithPromptLength,
                   collate_fn=collate_masking_instructions)


def alpaca_52k(experiment, args):
    """Exercise 7.3: Stanford's 52,002-entry Alpaca dataset, in batches of 4 cut at 512 tokens."""
    return replace(experiment, data_file="alpaca_data.json", data_url=ALPACA_URL,
                   batch_size=4, allowed_max_length=512)


def phi3_prompt(experiment, args):
    """Exercise 7.1: the Phi-3 prompt template instead of Alpaca's, and the tokens it saves."""
    return replace(experiment, prompt_style=Phi3Prompt(), inspect_data=report_token_savings)


def lora(experiment, args):
    """Exercise 7.4: train LoRA matrices only; with --merge_lora, save them folded in."""
    return replace(experiment, prepare_model=partial(add_lora, rank=args.lora_rank,
                                                     alpha=args.lora_alpha),
                   finish_model=merge_lora if args.merge_lora else None,
                   settings={"--lora_rank": args.lora_rank, "--lora_alpha": args.lora_alpha})


EXERCISES = {  # option -> (name in the output files, change to the experiment)
    "baseline": ("baseline", baseline),
    "mask_instructions": ("mask-instructions", mask_instructions),
    "alpaca_52k": ("alpaca52k", alpaca_52k),
    "phi3_prompt": ("phi3-prompt", phi3_prompt),
    "lora": ("lora", lora),
}


def parse_exercises(value):
    """The options in a comma-separated --exercise_solution value, in the order of EXERCISES.

    baseline adds nothing to other exercises. An unknown option, or mask_instructions with
    phi3_prompt, ends the program with one 'Error:' line.
    """
    names = [part.strip() for part in value.split(",")]
    unknown = [name for name in names if name not in EXERCISES]
    if unknown:
        fail(f"unknown exercise '{unknown[0]}'; choose from {', '.join(EXERCISES)}")
    if {"mask_instructions", "phi3_prompt"} <= set(names):
        fail("mask_instructions cannot be combined with phi3_prompt: exercises 7.1 and 7.2 are "
             "each compared with the Alpaca-prompt baseline; run them one at a time")
    return [name for name in EXERCISES if name in names and name != "baseline"] or ["baseline"]


def build_experiment(names, args):
    """The chapter's Experiment with the changes of the exercises `names` applied."""
    experiment = Experiment(name="_".join(EXERCISES[name][0] for name in names))
    for name in names:
        experiment = EXERCISES[name][1](experiment, args)
    return experiment


def check_lora_flags(names, args):
    """Refuse LoRA settings that cannot work, before anything is loaded."""
    if args.merge_lora and "lora" not in names:
        fail("--merge_lora needs the lora exercise (--exercise_solution lora)")
    if args.lora_rank < 1:
        fail(f"--lora_rank must be at least 1, got {args.lora_rank}")
    if not args.lora_alpha > 0:  # also refuses nan
        fail(f"--lora_alpha must be above 0, got {args.lora_alpha}")


def build_exercise_parser():
    """The main script's flags plus the exercises' own, in a --help group of their own."""
    parser = build_parser(description=__doc__)
    group = parser.add_argument_group("exercises")
    group.add_argument("--exercise_solution", default="baseline",
                       help=f"{', '.join(EXERCISES)}, or several joined by commas, e.g. "
                            "lora,alpaca_52k")
    group.add_argument("--lora_rank", type=int, default=16,
                       help="rank of the LoRA matrices")
    group.add_argument("--lora_alpha", type=float, default=16,
                       help="scale of the LoRA update")
    group.add_argument("--merge_lora", action="store_true",
                       help="fold the LoRA weights into the linear layers before saving, so "
                            "the .pth loads into a plain GPTModel")
    return parser


def run_exercises(argv=None):
    """Parse the flags once, check the exercises' own, and run the experiment with the main
    script's main(), which checks the shared flags before anything is loaded."""
    args = build_exercise_parser().parse_args(argv)
    names = parse_exercises(args.exercise_solution)
    check_lora_flags(names, args)
    main(experiment=build_experiment(names, args), args=args)


if __name__ == "__main__":
    run_exercises()
