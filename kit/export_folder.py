"""The export folder that export_hf.py and export_gguf.py write: the finetuned model loaded for
export (LoRA merged), OUT_DIR checked, and the folder written whole or not at all.

The folder is written under a temporary name beside OUT_DIR and renamed when complete, so an
export that fails or is stopped leaves nothing behind; both exporters share their command-line
arguments and the one-line ending of `run_export`.
"""

import errno
import os
import shutil
import tempfile

from gpt_download import DownloadError
from kit.files import DataError, fail
from kit.locks import folder_locked, hold_folder, remove_abandoned_folders
from kit.saved_model import (
    check_lora_alpha,
    check_vocabulary,
    load_finetuned_model,
    merge_saved_lora,
)
from kit.signals import stop_signals_interrupt
from lora import lora_config

#####################################
# Writing a new folder whole or not at all
#####################################


EXPORT_TEMP_PREFIX = ".tmp-export-"  # the folder written before it is renamed to OUT_DIR


class WriteFailed(Exception):
    """Writing the export failed midway (a full disk, a folder without write permission);
    nothing was left behind. Scripts report it in one line and exit 1."""


def check_out_dir(out_dir):
    """Refuse an OUT_DIR that is a file or a folder with something in it: nothing is replaced."""
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise DataError(f"{out_dir}: the folder exists and is not empty; pass a new folder "
                        "as OUT_DIR or delete this one")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(f"{out_dir}: is a file, not a folder; pass a new folder as OUT_DIR")


def write_new_folder(out_dir, write):
    """Call `write(folder)` on a new temporary folder beside `out_dir`, then rename that folder
    to `out_dir` (checked by `check_out_dir`): the export appears complete or not at all.
    Returns what `write` returns.

    Whatever stops the writing (WriteFailed for an OSError, an interrupt, an error) removes
    the temporary folder first; one left by an export killed outright (SIGKILL, a power cut)
    is removed by the next export beside it, which says so. OUT_DIR is taken as the file
    system resolves it: a link to a folder, or a path through "..", is written where it leads.
    """
    target = os.path.realpath(out_dir)
    parent = os.path.dirname(target)
    try:
        os.makedirs(parent, exist_ok=True)
        with folder_locked(parent):  # no other export beside it removes the new folder
            count, size, unsure = remove_abandoned_folders(parent, EXPORT_TEMP_PREFIX)
            temp = tempfile.mkdtemp(dir=parent, prefix=EXPORT_TEMP_PREFIX)
            held = hold_folder(temp)
    except OSError as exc:
        raise DataError(f"{out_dir}: cannot write in {parent} ({exc.strerror or exc}); pass "
                        "another OUT_DIR") from None
    if count:
        print(f"Removed {count} folder{'s' if count > 1 else ''} ({size / 1e6:.1f} MB) that an "
              f"interrupted export left in {parent}")
    if unsure:
        print(f"Note: {', '.join(unsure)} may be left by an interrupted export; delete "
              f"{'them' if len(unsure) > 1 else 'it'} once no export runs there")
    try:
        os.chmod(temp, 0o777 & ~current_umask())  # mkdtemp makes it private; mkdir would not
        written = write(temp)
        if os.path.isdir(target):
            os.rmdir(target)  # empty (checked before): the finished folder takes its place
        os.rename(temp, target)
    except OSError as exc:
        fix = ("Pass another OUT_DIR" if exc.errno not in (None, errno.ENOSPC, errno.EDQUOT)
               else "Free some space or pass another OUT_DIR")
        raise WriteFailed(f"{out_dir}: could not write the export ({exc.strerror or exc}); "
                          f"nothing was written. {fix}, and run again") from None
    finally:
        shutil.rmtree(temp, ignore_errors=True)
        if held is not None:
            os.close(held)
    return written


def current_umask():
    """The process's file-creation mask (reading it means setting it, so it is set back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def run_export(export, out_dir):
    """Return `export()`, or end the program with one line when it cannot finish: exit 2 for
    bad input, 1 when writing failed, 128 + the signal when interrupted (Ctrl-C, SIGTERM,
    SIGHUP). In each case nothing was written to `out_dir`."""
    try:
        with stop_signals_interrupt(f"nothing was written to {out_dir}",
                                    "run the same command again to export"):
            return export()
    except (DataError, DownloadError) as exc:
        fail(exc)
    except WriteFailed as exc:
        fail(exc, code=1)


#####################################
# The command line of both exporters
#####################################


def add_export_arguments(parser, out_help):
    """The arguments of both exporters: the .pth, the folder to create, --lora_alpha."""
    parser.add_argument("model_path", metavar="MODEL.pth",
                        help="finetuned weights saved by gpt_instruction_finetuning.py or "
                             "exercise_experiments.py (the JSON beside them is read too)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help=out_help)
    parser.add_argument("--lora_alpha", type=float, default=None,
                        help="alpha of unmerged LoRA weights whose JSON is gone (the JSON "
                             "records it; the book trains with 16)")


def check_export_arguments(args):
    """Refuse a bad --lora_alpha before anything is loaded (OUT_DIR is the export's check)."""
    if args.lora_alpha is not None:
        check_lora_alpha(args.lora_alpha, "--lora_alpha")


def load_for_export(model_path, encoding, lora_alpha=None):
    """The finetuned model (LoRA merged into it), its info and its prompt style.

    Refuses a model whose vocabulary is not the tokenizer's (`encoding`): the export pairs the
    two. Says when `lora_alpha` went unused: the JSON's own alpha wins.
    """
    model, info, prompt_style = load_finetuned_model(model_path, lora_alpha=lora_alpha)
    check_vocabulary(model_path, info["config"]["vocab_size"], encoding.n_vocab,
                     "be exported with it")
    lora = lora_config(model)
    if lora_alpha is not None and (lora is None or "lora" in info["config"]):
        reason = ("the weights hold no unmerged LoRA layers" if lora is None
                  else f"the JSON beside the weights records alpha {lora['alpha']}")
        print(f"Note: --lora_alpha {lora_alpha:g} is not used: {reason}")
    if lora is not None:
        merge_saved_lora(model, model_path)
        print(f"Merged the LoRA layers (rank {lora['rank']}, alpha {lora['alpha']}) into the "
              "weights")
    return model, info, prompt_style
