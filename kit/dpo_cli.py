"""The command line of dpo_finetuning.py: the book's DPO settings as defaults, and every check
of the flags made before any work starts, each refusal one DataError naming the flag."""

import argparse
import math
import os

from kit.cli import SEED_RANGE, HelpFormatter, add_answer_flags, add_run_flags
from kit.device import check_precision, pick_device
from kit.files import DataError, check_writable_folder
from kit.run_names import check_run_name
from kit.saved_model import check_lora_alpha

DEFAULT_EPOCHS = 1  # the notebook's: DPO soon overfits the preferences
DEFAULT_RUN_NAME = "dpo"


def build_parser(description=None):
    """The DPO script's flags, with the notebook's values as defaults, in --help's groups."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    parser.add_argument("sft_model", metavar="SFT_MODEL.pth",
                        help="the instruction-finetuned model to align (its JSON beside it "
                             "gives the config and the prompt style)")
    data = parser.add_argument_group("data")
    data.add_argument("--data_path", default=None,
                      help="a preference dataset: a JSON list or JSON Lines of entries with "
                           "instruction, input, output, chosen and rejected (default: the "
                           "book's, downloaded to the working folder when missing)")
    data.add_argument("--test_mode", action="store_true",
                      help="10/10/10 entries and an evaluation every step: the whole pipeline "
                           "in seconds with the test-mode model of gpt_instruction_finetuning.py")
    add_dpo_flags(parser.add_argument_group("DPO", "the notebook's settings"))
    add_answer_flags(parser.add_argument_group("answers", "the test set's answers"))
    device = parser.add_argument_group("device and precision")
    device.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N, mps, or auto (cuda, then mps, then cpu)")
    device.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16", "fp16"],
                        help="as for gpt_instruction_finetuning.py: exact float32, TF32 "
                             "matrix products, bfloat16 autocast, or float16 autocast with a "
                             "gradient scaler")
    add_run_flags(parser.add_argument_group("resume and outputs"), DEFAULT_RUN_NAME)
    return parser


def add_dpo_flags(parser):
    """The notebook's hyperparameters, the reference, and which weights are kept."""
    parser.add_argument("--beta", type=float, default=0.1,
                        help="how far the policy may move from the reference (0.1 to 0.5; "
                             "higher keeps it closer)")
    parser.add_argument("--lr", type=float, default=5e-6, help="AdamW learning rate")
    parser.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"training epochs (default: {DEFAULT_EPOCHS}; with --resume, the "
                             "interrupted run's own)")
    parser.add_argument("--batch_size", type=int, default=8,
                        help="training batch size (under torchrun the global batch, a multiple "
                             "of the processes)")
    parser.add_argument("--seed", type=int, default=123,
                        help="seed for the shuffling, set again before the optimizer is made")
    parser.add_argument("--eval_freq", type=int, default=None,
                        help="evaluate every this many steps (default: 5; 1 with --test_mode)")
    parser.add_argument("--eval_iter", type=int, default=5,
                        help="batches per loss and reward estimate")
    parser.add_argument("--reference", default="precompute", choices=["precompute", "live"],
                        help="precompute: the reference's log-probabilities once per entry "
                             "before training, one model in memory; live: a second, frozen "
                             "copy of the model computes them for every batch (the notebook's "
                             "way); the numbers are the same")
    parser.add_argument("--keep_best", action="store_true",
                        help="also keep the weights of the evaluation with the lowest "
                             "validation DPO loss, as ...-best.pth with its JSON")
    parser.add_argument("--lora_alpha", type=float, default=None,
                        help="the LoRA alpha of an SFT model saved with unmerged LoRA layers "
                             "and no JSON beside it (the JSON records it otherwise)")


def check_args(args):
    """Refuse flag values that cannot work, before anything is read or loaded; return the
    device --device names (picked once, here)."""
    for name in ("epochs", "batch_size", "gen_batch_size", "eval_freq", "eval_iter"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise DataError(f"--{name} must be at least 1, got {value}")
    for name in ("beta", "lr"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            raise DataError(f"--{name} must be a finite number above 0, got {value}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise DataError(f"--weight_decay must be a finite number, not negative, got "
                        f"{args.weight_decay}")
    if not SEED_RANGE[0] <= args.seed <= SEED_RANGE[1]:
        raise DataError(f"--seed must be from {SEED_RANGE[0]} to {SEED_RANGE[1]}, got "
                        f"{args.seed}")
    if args.max_new_tokens is not None and args.max_new_tokens < 0:
        raise DataError(f"--max_new_tokens must not be negative, got {args.max_new_tokens}")
    if args.lora_alpha is not None:
        check_lora_alpha(args.lora_alpha, "--lora_alpha")
    check_run_name(args.run_name)
    device = pick_device(args.device)
    check_precision(args.precision, False, device)
    check_paths(args)
    return device


def check_paths(args):
    """Refuse a model or data file that is not a readable file, and an output folder that
    cannot take files (it is created when missing)."""
    for flag, path in (("SFT_MODEL", args.sft_model), ("--data_path", args.data_path)):
        if path is None:
            continue
        if not os.path.exists(path):
            raise DataError(f"{path}: file not found ({flag})" + (
                "; finetune first (python gpt_instruction_finetuning.py) or give the path of "
                "a saved .pth" if flag == "SFT_MODEL" else ""))
        if not os.path.isfile(path):
            raise DataError(f"{flag} {path}: not a regular file")
    check_writable_folder("--output_dir", args.output_dir, create=True)
