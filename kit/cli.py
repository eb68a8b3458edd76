"""The command line of the chapter script (and of the exercises, which add their own flags):
the flags with the chapter's values as defaults, and every check of them made before any work
starts, each refusal one DataError naming the flag and what to do.
"""

import argparse
import math
import os

from appendix_d import SCHEDULES
from gpt_download import GPT2_SIZES
from kit.device import check_precision, pick_device
from kit.files import DataError, check_writable_folder
from kit.run_names import check_run_name

DEFAULT_EPOCHS = 2  # the chapter's; a resumed run keeps its own


DEFAULT_EVAL_FREQ = 5  # the chapter's; --test_mode evaluates after every step


DEFAULT_RUN_NAME = "standalone"  # the book's name for the chapter script's outputs


DEFAULT_MAX_NEW_TOKENS = 256  # the chapter's longest answer


TEST_MODE_MAX_NEW_TOKENS = 20  # --test_mode's: its random model never ends an answer early


SEED_RANGE = (-2**63, 2**64 - 1)  # the seeds torch.manual_seed accepts


def build_parser(description=None):
    """The chapter script's flags, with the chapter's values as defaults, in --help's groups."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    add_model_and_data_flags(parser.add_argument_group("model and data"))
    add_training_flags(parser.add_argument_group(
        "training", "the chapter's hyperparameters, and how a step is computed"))
    add_appendix_d_flags(parser.add_argument_group(
        "Appendix D", "warmup, cosine decay, clipping, best weights; by default the chapter's"))
    add_answer_flags(parser.add_argument_group("answers", "the test set's, saved with the run"))
    add_device_flags(parser.add_argument_group("device and precision"))
    add_run_flags(parser.add_argument_group("resume and outputs"))
    return parser


def add_model_and_data_flags(parser):
    """Which GPT-2 and which data, on `parser` (a parser or an argument group)."""
    parser.add_argument("--model", default="355M", type=model_size, metavar="SIZE",
                        help="GPT-2 size to finetune: " + ", ".join(GPT2_SIZES) + ", or its "
                             "name (gpt2-small, gpt2-medium, gpt2-large, gpt2-xl)")
    parser.add_argument("--models_dir", default="gpt2",
                        help="folder that holds (or receives) OpenAI's checkpoints")
    parser.add_argument("--weights", default="tf", choices=["tf", "safetensors"],
                        help="read OpenAI's TensorFlow checkpoint (the chapter's way), or the "
                             "same weights as model.safetensors, which needs no TensorFlow")
    parser.add_argument("--data_path", default=None,
                        help="your dataset: a JSON list of instruction/input/output entries, or "
                             "JSON Lines (one entry a line); input may be left out (default: "
                             "the chapter's dataset, downloaded to the working folder when "
                             "missing)")
    parser.add_argument("--test_mode", action="store_true",
                        help="a tiny random model on 10/10/10 entries: the whole pipeline in "
                             "seconds; downloads the dataset only")


def add_training_flags(parser):
    """The chapter's hyperparameters, and how a step is computed."""
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"training epochs (default: {DEFAULT_EPOCHS}; with --resume, the "
                             "interrupted run's own)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="training batch size (default: 8; 4 for the Alpaca 52k exercise)")
    parser.add_argument("--micro_batch_size", type=int, default=None,
                        help="compute each batch this many entries at a time, accumulating "
                             "gradients: the same training with less memory")
    parser.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate")
    parser.add_argument("--weight_decay", type=float, default=0.1, help="AdamW weight decay")
    parser.add_argument("--seed", type=int, default=123,
                        help="seed for shuffling and initialization")
    parser.add_argument("--eval_freq", type=int, default=None,
                        help=f"evaluate every this many steps (default: {DEFAULT_EVAL_FREQ}; 1 "
                             "with --test_mode, so that its curve has a point per step)")
    parser.add_argument("--eval_iter", type=int, default=5, help="batches per loss estimate")


def add_appendix_d_flags(parser):
    """The book's Appendix D options (warmup, cosine decay, clipping), and which weights are
    kept; the defaults are the chapter's: a constant --lr, no clipping, the last weights."""
    parser.add_argument("--warmup_steps", type=int, default=0,
                        help="raise the learning rate linearly from --initial_lr to --lr over "
                             "this many steps (Appendix D)")
    parser.add_argument("--initial_lr", type=float, default=3e-5,
                        help="learning rate of the first warmup step")
    parser.add_argument("--lr_schedule", default="constant", choices=SCHEDULES,
                        help="after the warmup: keep --lr, or decay it along a cosine to "
                             "--min_lr at the last step (Appendix D)")
    parser.add_argument("--min_lr", type=float, default=1e-6,
                        help="learning rate of the last step of the cosine schedule")
    parser.add_argument("--grad_clip", type=float, default=None, metavar="MAX_NORM",
                        help="clip the gradients' total norm to this from the end of the "
                             "warmup on (Appendix D uses 1.0)")
    parser.add_argument("--keep_best", action="store_true",
                        help="also keep the weights of the evaluation with the lowest "
                             "validation loss, as ...-best.pth with its JSON")
    parser.add_argument("--early_stopping", type=int, default=None, metavar="K",
                        help="stop training after K evaluations in a row without a new lowest "
                             "validation loss, then write the outputs")


def add_answer_flags(parser):
    """How the test set's answers are generated."""
    parser.add_argument("--max_new_tokens", type=int, default=None,
                        help="longest response generated for a test entry (default: "
                             f"{DEFAULT_MAX_NEW_TOKENS}, the chapter's; "
                             f"{TEST_MODE_MAX_NEW_TOKENS} with --test_mode, whose random model "
                             "never stops early)")
    parser.add_argument("--gen_batch_size", type=int, default=None,
                        help="test entries answered at once (default: 8 on a CPU; on a GPU the "
                             "whole test set, as memory allows); the answers are the same as "
                             "one at a time")


def add_device_flags(parser):
    """Where and in which precision the model computes."""
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N, mps, or auto: cuda, then mps (from torch 2.9 "
                             "on, as the book: older versions compute wrong losses there), "
                             "then cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16", "fp16"],
                        help="fp32: exact float32; tf32: float32 weights, TF32 matrix products "
                             "(NVIDIA GPUs from Ampere on); bf16: bfloat16 autocast for the "
                             "losses and the answers (GPUs with bf16 units, Ampere or newer); "
                             "fp16: float16 autocast with a gradient scaler, for GPUs without "
                             "bf16 (T4, V100)")
    parser.add_argument("--compile", action="store_true",
                        help="compile the training steps with torch.compile (CUDA with "
                             "Triton; the first steps wait while it compiles)")


def add_run_flags(parser, run_name=None):
    """Where the outputs go, what they are named, and resuming. `run_name` is --run_name's
    default; None (the chapter script's) leaves the name to the script: the book's
    DEFAULT_RUN_NAME, or an exercise's own name."""
    parser.add_argument("--output_dir", default=".",
                        help="where the plot, metrics, responses, weights and checkpoint go")
    parser.add_argument("--run_name", default=run_name, metavar="NAME",
                        help="name carried by every output file, so that runs side by side in "
                             "one folder keep their files: letters, digits, '.', '_' and '-', "
                             "not ending in '-best' or '.partial', which the script adds to a "
                             "run's own names" + (
                                 f" (default: {DEFAULT_RUN_NAME}, the book's; an exercise's "
                                 "own name in exercise_experiments.py)" if run_name is None
                                 else ""))
    parser.add_argument("--resume", action="store_true",
                        help="continue from the checkpoint that an interrupted run left")
    parser.add_argument("--keep_checkpoint", action="store_true",
                        help="keep the checkpoint after a finished run (it is removed once "
                             "all outputs are written)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter,
                    argparse.RawDescriptionHelpFormatter):
    """--help keeps the usage examples' line breaks and shows each flag's default; switches
    (default off) and flags whose help explains their default show none."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def check_args(args):
    """Refuse flag values that cannot work, before anything is downloaded or loaded.

    Raises DataError naming the flag and its value. Returns the device --device names (picked
    here, once, to check --precision against it); the run's plan is made from the flags and it
    (`kit.run_setup.setup_run`).
    """
    for name in ("epochs", "batch_size", "micro_batch_size", "gen_batch_size", "eval_freq",
                 "eval_iter", "early_stopping"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise DataError(f"--{name} must be at least 1, got {value}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise DataError(f"--lr must be a finite number above 0, got {args.lr}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise DataError(f"--weight_decay must be a finite number, not negative, got "
                        f"{args.weight_decay}")
    if not SEED_RANGE[0] <= args.seed <= SEED_RANGE[1]:
        raise DataError(f"--seed must be from {SEED_RANGE[0]} to {SEED_RANGE[1]} (what "
                        f"torch.manual_seed takes), got {args.seed}")
    if args.max_new_tokens is not None and args.max_new_tokens < 0:
        raise DataError(f"--max_new_tokens must not be negative, got {args.max_new_tokens}")
    check_appendix_d_flags(args)
    if args.run_name is not None:
        check_run_name(args.run_name)
    device = pick_device(args.device)
    check_precision(args.precision, args.compile, device)
    check_paths(args)
    return device


def check_appendix_d_flags(args):
    """Refuse a warmup, learning rates or a clipping norm that cannot work."""
    if args.warmup_steps < 0:
        raise DataError(f"--warmup_steps must not be negative, got {args.warmup_steps}")
    for name in ("initial_lr", "min_lr"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            raise DataError(f"--{name} must be a finite number, not negative, got {value}")
    if args.lr_schedule == "cosine" and args.min_lr > args.lr:
        raise DataError(f"--min_lr {args.min_lr} is above --lr {args.lr}: the cosine schedule "
                        "decays from --lr down to --min_lr; pass a lower --min_lr")
    if args.grad_clip is not None and not (math.isfinite(args.grad_clip) and args.grad_clip > 0):
        raise DataError(f"--grad_clip must be a finite number above 0, got {args.grad_clip}")


def model_size(name):
    """The GPT2_SIZES key of --model: a size (355M) or the name the script prints
    (gpt2-medium, or gpt2-medium (355M))."""
    for size, spec in GPT2_SIZES.items():
        if name in (size, spec["name"], spec["name"].split()[0]):
            return size
    raise argparse.ArgumentTypeError(
        f"{name!r} is not a GPT-2 size; use one of {', '.join(GPT2_SIZES)} or a name: "
        + ", ".join(spec["name"].split()[0] for spec in GPT2_SIZES.values()))


def eval_freq(args):
    """Steps between evaluations: --eval_freq, else the chapter's 5 (1 with --test_mode, whose
    two steps would otherwise leave the loss plot empty)."""
    return args.eval_freq or (1 if args.test_mode else DEFAULT_EVAL_FREQ)


def max_new_tokens(args):
    """Longest answer to a test entry: --max_new_tokens, else the chapter's 256 (20 with
    --test_mode, whose random model never writes the end-of-text token and would spend most of
    the run writing 256 tokens of noise)."""
    if args.max_new_tokens is not None:
        return args.max_new_tokens
    return TEST_MODE_MAX_NEW_TOKENS if args.test_mode else DEFAULT_MAX_NEW_TOKENS


def check_paths(args):
    """Refuse a data file, output folder or models folder that cannot be used, before training.

    The output folder is created when missing and must take a file.
    """
    if args.data_path is not None:
        if not os.path.exists(args.data_path):
            raise DataError(f"{args.data_path}: file not found (--data_path)")
        if os.path.isdir(args.data_path):
            raise DataError(f"--data_path {args.data_path}: is a folder, not a JSON file")
        if not os.path.isfile(args.data_path):
            raise DataError(f"--data_path {args.data_path}: not a regular file (a device or "
                            "pipe); save the dataset as a JSON or JSON Lines file")
    if os.path.exists(args.models_dir) and not os.path.isdir(args.models_dir):
        raise DataError(f"--models_dir {args.models_dir}: is a file, not a folder; "
                        "pass another folder with --models_dir")
    check_writable_folder("--output_dir", args.output_dir, create=True)


def check_batch_sizes(size, micro, world_size, num_train, data_path):
    """Refuse a batch of `size` that the training set, the processes or --micro_batch_size
    `micro` cannot be split into."""
    if num_train < size:
        raise DataError(f"{data_path}: {num_train} training entries are fewer than one "
                        f"batch of {size}")
    if size % world_size:
        raise DataError(f"--batch_size {size} is the global batch: it must be a multiple "
                        f"of the {world_size} processes")
    if micro is not None and (size // world_size) % micro:
        share = "" if world_size == 1 else f" per process ({world_size} processes)"
        raise DataError(f"--micro_batch_size {micro}: the batch of {size // world_size}{share} "
                        "must be a multiple of it; pick a divisor of --batch_size")
