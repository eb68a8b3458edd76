"""The names of a finetuning run's files, checked before any work starts.

Every file of a run carries the run's name (`output_paths`). Two
of the script's own suffixes make a name that is another name plus a suffix: the best
weights are the model's name + `-best`, the answers kept while the test set is answered are
the responses' name + `.partial`. A run name ending in one of them would make its files those
of another run, so such names are refused (`check_run_name`). A run name so long that a file
name (with the temporary name a save uses) passes the file system's limit is refused too
(`check_name_lengths`), and so is an output that is a link or a folder the script did not
make (`refuse_foreign_files`). `existing_outputs` lists what an earlier run of the same name
left, for the lines that say what a rerun or a resume does with it.

Imports no PyTorch.
"""

import os
import re

from kit.files import DataError

BEST_SUFFIX = "-best"  # the best weights: <model>-best.pth beside <model>.pth
PARTIAL_SUFFIX = ".partial"  # the answers kept so far: <responses>.partial.json
RESERVED_SUFFIXES = (BEST_SUFFIX, PARTIAL_SUFFIX)
TEMPORARY_NAME_EXTRA = len(".tmp-") + 8  # atomic_write's prefix and mkstemp's random letters
DEFAULT_NAME_MAX = 255  # where the file system does not say (Windows)
FINISHED_OUTPUTS = ("model", "best", "responses", "answers", "plot", "metrics")  # what a run
# leaves besides its checkpoint and its lock (each model's JSON goes with its weights)


def output_paths(output_dir, run_name, model_name):
    """The files a chapter run writes, named after the run (the book's "standalone" by default).

    Only the best weights and the kept answers add a suffix to another of the run's names
    (BEST_SUFFIX, PARTIAL_SUFFIX): run names may not end in them (`check_run_name`), so no
    file of one run is ever a file of another.
    """
    stem = re.sub(r"[ ()]", "", model_name)  # "gpt2-medium (355M)" -> "gpt2-medium355M"
    model = os.path.join(output_dir, f"{stem}-sft-{run_name}")
    responses = os.path.join(output_dir, f"instruction-data-with-response-{run_name}")
    return {
        "plot": os.path.join(output_dir, f"loss-plot-{run_name}.pdf"),
        "responses": f"{responses}.json",
        "model": f"{model}.pth",
        "model_info": f"{model}.json",  # beside the weights: how to rebuild and prompt them
        "best": f"{model}{BEST_SUFFIX}.pth",  # --keep_best
        "best_info": f"{model}{BEST_SUFFIX}.json",
        "checkpoint": os.path.join(output_dir, f"checkpoint-{stem}-{run_name}.pth"),
        "metrics": os.path.join(output_dir, f"metrics-{run_name}.csv"),
        "answers": f"{responses}{PARTIAL_SUFFIX}.json",  # kept until the responses are saved
        "lock": os.path.join(output_dir, f"finetuning-{run_name}.lock"),  # one run at a time
    }


def check_run_name(name):
    """Raise DataError unless `name` (--run_name) can name a run's files: letters, digits, '.',
    '_' and '-', and not ending in a suffix that the script adds to another run's names."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise DataError(f"--run_name {name!r}: use letters, digits, '.', '_' and '-' only (it "
                        "becomes part of file names)")
    suffix = next((s for s in RESERVED_SUFFIXES if name.lower().endswith(s)), None)
    if suffix is not None:
        raise DataError(f"--run_name {name}: a name may not end in '{suffix}', which the script "
                        f"adds to the files of run {name[:-len(suffix)]!r} (its "
                        f"{'best weights' if suffix == BEST_SUFFIX else 'answers kept so far'}); "
                        "pick another name")


def name_max(folder):
    """The longest file name, in bytes, that the file system of `folder` takes."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):  # no pathconf (Windows), or no answer
        return DEFAULT_NAME_MAX


def check_name_lengths(paths, run_name, folder):
    """Raise DataError when the longest file name of `paths` (as the temporary file a save
    writes first) is longer than the file system of `folder` takes: such a run would train and
    then fail to write its outputs."""
    key = max(paths, key=lambda k: len(os.path.basename(paths[k]).encode()))
    length = TEMPORARY_NAME_EXTRA + len(os.path.basename(paths[key]).encode())
    limit = name_max(folder)
    if length > limit:
        room = len(run_name) - (length - limit)
        raise DataError(f"--run_name: a name of {len(run_name)} characters makes file names "
                        f"too long for {folder} (the temporary copy of the run's {key} file "
                        f"would have {length} characters, the file system takes {limit}); use "
                        f"at most {max(room, 0)} characters")


def refuse_foreign_files(paths):
    """Raise DataError for the first of `paths` that is a symbolic link or not a regular file
    (a folder, a pipe): the script writes and removes its own files only, and a link could make
    it write into, or delete, a file of another run or anyone's."""
    for path in paths.values():
        if os.path.islink(path):
            raise DataError(f"{path}: is a symbolic link (to {os.readlink(path)}), not a file "
                            "that this script wrote; remove the link, or pass another "
                            "--run_name or --output_dir")
        if os.path.exists(path) and not os.path.isfile(path):
            kind = "a folder" if os.path.isdir(path) else "not a regular file"
            raise DataError(f"{path}: is {kind}, where this run writes a file; move it away, "
                            "or pass another --run_name or --output_dir")


def existing_outputs(paths):
    """The paths of `paths` that an earlier run of the same name left (its checkpoint and lock
    aside), in the order of FINISHED_OUTPUTS."""
    return [paths[key] for key in FINISHED_OUTPUTS if key in paths and os.path.exists(paths[key])]


def names(paths):
    """'a.pth, b.json': the file names of `paths`, for a line that lists them."""
    return ", ".join(os.path.basename(path) for path in paths)
