"""Write the answers of any saved model to a responses file, as the chapter script writes its
test set's answers.

    python generate_answers.py gpt2-medium355M-sft-standalone-best.pth
    python generate_answers.py gpt2-medium355M-sft-lora.pth --data_path my-questions.jsonl
    python generate_answers.py gpt2-medium355M-sft-standalone-best.pth --resume

By default it answers the test split of the data the model was trained on, which the JSON
beside the weights records (the chapter's dataset for a .pth without one), with the run's
longest answer and precision: for the chapter script's own model these are the answers the
script saved, byte for byte. `--data_path` answers every entry of another file instead (a JSON
list or JSON Lines; an entry needs an instruction, its input may be left out). Each entry is
written back with the model's answer as `model_response`, into
instruction-data-with-response-<model name>.json beside the model (`--output` to choose), which
ollama_evaluate.py scores under the model's name.

The answers are generated in batches with the key/value cache, as the chapter script does, and
kept after each batch in a `.partial.json` file beside the output: after Ctrl-C, `--resume`
answers only the rest.
"""

import argparse
import glob
import os
import re
import sys
from collections import namedtuple

from gpt_download import DownloadError, gpt2_tokenizer
from gpt_instruction_finetuning import Experiment, generate_responses, split_data
from kit.answer_log import AnswerLog
from kit.checkpoint import fingerprint
from kit.cli import DEFAULT_MAX_NEW_TOKENS, HelpFormatter
from kit.data import load_json_entries
from kit.device import pick_device, precision_context
from kit.files import DataError, check_writable_folder, fail, read_json, save_json
from kit.locks import lock_file, lock_holder, unlock_file
from kit.saved_model import check_lora_alpha, load_finetuned_model, model_info_path
from kit.signals import exit_code, stop_line, stop_signals_raise

RESPONSES_PREFIX = "instruction-data-with-response-"  # the chapter's name for answers files
TEST_MODE_ENTRIES = 10  # the test entries of a --test_mode run (the chapter script's subset)
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")  # the chapter script's --precision


def build_parser():
    """The flags: the model, what to answer, where the answers go, and how they are generated."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("model_path", help="a .pth saved by the chapter script (the JSON beside "
                                           "it gives config, prompt style and data) or the book")
    parser.add_argument("--data_path", default=None,
                        help="answer every entry of this JSON list or JSON Lines file (default: "
                             "the test split of the data the model was trained on)")
    parser.add_argument("--output", default=None,
                        help="the responses file (default: instruction-data-with-response-"
                             "<model name>.json beside the model)")
    parser.add_argument("--max_new_tokens", type=int, default=None,
                        help="longest answer, in tokens (default: the run's, as its JSON "
                             f"records; {DEFAULT_MAX_NEW_TOKENS} without one)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="entries answered at once (default: 8 on a CPU; on a GPU as many "
                             "as memory allows); the answers are the same as one at a time")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N, mps, or auto: cuda, then mps, then cpu")
    parser.add_argument("--lora_alpha", type=float, default=None,
                        help="alpha of a .pth saved with unmerged LoRA layers and without its "
                             "JSON (the book trains with 16)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the answers that an interrupted run of the same command kept, "
                             "and generate only the rest")
    return parser


def check_args(args):
    """Refuse flag values that cannot work, before anything is loaded. Raises DataError naming
    the flag. Replaces `args.output` with the responses file and `args.device` with the
    device."""
    if not os.path.isfile(args.model_path):
        raise DataError(f"{args.model_path}: file not found; give the path of a saved .pth "
                        "(finetune first: python gpt_instruction_finetuning.py)")
    if args.max_new_tokens is not None and args.max_new_tokens < 0:
        raise DataError(f"--max_new_tokens must not be negative, got {args.max_new_tokens}")
    if args.batch_size is not None and args.batch_size < 1:
        raise DataError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.lora_alpha is not None:
        check_lora_alpha(args.lora_alpha, "--lora_alpha")
    if args.data_path is not None and not os.path.isfile(args.data_path):
        raise DataError(f"--data_path {args.data_path}: file not found; give a JSON list or "
                        "JSON Lines file of entries")
    args.output = args.output or default_output(args.model_path)
    if os.path.isdir(args.output) or not args.output.endswith(".json"):
        raise DataError(f"--output {args.output}: name a .json file (the answers are one JSON "
                        "list, as the chapter script writes them)")
    check_writable_folder("--output", os.path.dirname(args.output) or ".")
    args.device = pick_device(args.device)


#####################################
# What is answered, and where the answers go
#####################################


def run_test_entries(info, info_path):
    """The test entries of the run that saved a model (info: the JSON beside it), and their file.

    They are the test split of the data the JSON records (the chapter's dataset when it records
    none), in test mode the run's first few. When the JSON records a fingerprint of the run's
    training entries, the file must still hold them: an edited file would split differently.
    Raises DataError naming the file and what to do.
    """
    data_path = info.get("data_path") or Experiment().data_file
    if not isinstance(data_path, str):
        raise DataError(f"{info_path}: 'data_path' must be a file's path, got {data_path!r}; "
                        "fix it, or pass --data_path")
    if not os.path.isfile(data_path):
        raise DataError(f"{data_path}: file not found (the data {info_path} records the model "
                        "was trained on); run in the folder the run was started in, or pass "
                        "--data_path to answer the entries of another file")
    train_data, test_data, _ = split_data(load_json_entries(data_path), data_path)
    recorded = run_settings(info).get("training data")
    if recorded is None or recorded == fingerprint(train_data):
        return test_data, data_path
    if recorded == fingerprint(train_data[:TEST_MODE_ENTRIES]):
        return test_data[:TEST_MODE_ENTRIES], data_path
    raise DataError(f"{data_path}: its training split is not the one the model was trained on "
                    f"(as {info_path} records): another file, or one changed since; restore "
                    "it, or pass --data_path to answer the entries of a file as they are")


def run_answer_settings(info, info_path):
    """(longest answer, precision) the run answered its test set with, as the JSON beside the
    model records them: the chapter's 256 tokens and fp32 where it does not. Raises DataError
    naming the JSON when a recorded value is not one."""
    tokens = info.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    precision = run_settings(info).get("--precision", "fp32")
    if not (isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0):
        raise DataError(f"{info_path}: 'max_new_tokens' must be a whole number, 0 or above, got "
                        f"{tokens!r}; fix it, or pass --max_new_tokens")
    if precision not in PRECISIONS:
        raise DataError(f"{info_path}: its '--precision' setting must be one of "
                        f"{', '.join(PRECISIONS)}, got {precision!r}; fix or delete it")
    return tokens, precision


def run_settings(info):
    """The run's settings as its JSON records them (empty where it records none)."""
    settings = info.get("settings")
    return settings if isinstance(settings, dict) else {}


def default_output(model_path):
    """The responses file named after the model, beside it: gpt2-medium355M-sft-standalone-
    best.pth -> instruction-data-with-response-gpt2-medium355M-sft-standalone-best.json."""
    stem = os.path.splitext(os.path.basename(model_path))[0]
    return os.path.join(os.path.dirname(model_path), f"{RESPONSES_PREFIX}{stem}.json")


def partial_path(output):
    """Where the answers are kept as they come: the output's name with .partial.json."""
    return output[:-len(".json")] + ".partial.json"


def check_not_a_run_output(output):
    """Raise DataError when `output` is the responses file (or its kept answers) of a chapter
    script run in that folder, which writing here would replace: a model named after another
    run (a --run_name that is this model's name) would give such a name."""
    match = re.fullmatch(re.escape(RESPONSES_PREFIX) + r"(.+?)(\.partial)?\.json",
                         os.path.basename(output))
    if match is None:
        return
    run_name = match.group(1)
    folder = os.path.dirname(output) or "."
    for info_path in glob.glob(os.path.join(glob.escape(folder),
                                            f"*-sft-{glob.escape(run_name)}.json")):
        info = read_json(info_path)
        if isinstance(info, dict) and info.get("run_name") == run_name:
            raise DataError(f"--output {output}: is the answers file of the run "
                            f"'{run_name}' ({info_path}), which this would replace; pass "
                            "another --output")


class KeptAnswers(AnswerLog):
    """The answers kept as they come (`AnswerLog`), reused only with --resume: a run
    without it answers everything, and replaces what an earlier run kept at its first batch."""

    def __init__(self, path, key, total, resume):
        super().__init__(path, key, total)
        self.resume = resume

    def load(self):
        """The kept answers to reuse, one per entry (None where there is none); says why none
        are reused where a file is there."""
        if not os.path.exists(self.path):
            if self.resume:
                print(f"No answers kept at {self.path}; answering all {self.total} entries")
            return [None] * self.total
        if not self.resume:
            print(f"Note: {self.path} holds answers kept by an earlier run; this run answers "
                  "every entry and replaces them. To continue that run instead, stop now "
                  "(Ctrl-C) and run the same command with --resume.")
            return [None] * self.total
        answers = super().load()
        if not self.count:
            print(f"{self.path} holds no answers of this model, these entries and "
                  f"--max_new_tokens; answering all {self.total} entries")
        return answers


def answers_key(args, info, entries, max_new_tokens, precision):
    """What the answers depend on: the weights file as it is now (its size and time of last
    change), the JSON beside it, the LoRA alpha, the entries, the answers' length and the
    precision. Kept answers are reused only for the same."""
    stat = os.stat(args.model_path)
    return fingerprint([stat.st_size, stat.st_mtime_ns, info, args.lora_alpha, entries,
                               max_new_tokens, precision])


#####################################
# Answering
#####################################


Job = namedtuple("Job", "model prompt_style entries source max_new_tokens precision log")


def plan(args):
    """Load the model (LoRA layers kept as saved: the chapter script answers with them
    unmerged) and the entries, and decide how they are answered: with the run's answer length
    and precision, as the JSON beside the model records them. Returns a Job."""
    if args.data_path is not None:  # read before the model: a bad file is refused at once
        entries = load_json_entries(args.data_path, fields=("instruction", "input"))
        source = f"{len(entries)} entries of {args.data_path}"
    model, info, prompt_style = load_finetuned_model(args.model_path, args.device,
                                                     lora_alpha=args.lora_alpha)
    if args.data_path is None:
        entries, data_path = run_test_entries(info, model_info_path(args.model_path))
        source = f"the {len(entries)} test entries of {data_path}"
    recorded_tokens, precision = run_answer_settings(info, model_info_path(args.model_path))
    max_new_tokens = recorded_tokens if args.max_new_tokens is None else args.max_new_tokens
    log = KeptAnswers(partial_path(args.output),
                      answers_key(args, info, entries, max_new_tokens, precision), len(entries),
                      args.resume)
    return Job(model, prompt_style, entries, source, max_new_tokens, precision, log)


def write_answers(args, job):
    """Answer the job's entries in batches, keeping the answers as they come, then write the
    responses file whole and drop the kept answers."""
    print(f"Answering {job.source} with {args.model_path} ({job.prompt_style.name} prompts, "
          f"greedy, up to {job.max_new_tokens} new tokens, {args.device}, {job.precision})")
    with precision_context(args.device, job.precision):
        responses = generate_responses(job.model, job.entries, gpt2_tokenizer(),
                                       job.model.pos_emb.num_embeddings, job.max_new_tokens,
                                       args.batch_size, job.prompt_style, job.log)
    save_json(responses, args.output)
    job.log.remove()
    print(f"Responses saved as {args.output}")


def take_lock(output):
    """Hold the lock on `output` while answering; DataError when another process holds it."""
    path = output[:-len(".json")] + ".lock"
    lock = lock_file(path)
    if lock is None:
        holder = lock_holder(path)
        raise DataError(f"--output {output}: another process"
                        f"{'' if holder is None else f' ({holder})'} is writing it ({path} is "
                        "locked); wait for it to end, or pass another --output")
    return lock


def interrupted_line(exc, log):
    """The line that ends a run stopped by `exc`: the answers kept in `log`, how to go on."""
    if log is None or not log.count:
        return stop_line(exc, "no answer was kept", "run the same command to start again")
    return stop_line(exc, f"{log.count} of {log.total} answers are kept in {log.path}",
                     "run the same command with --resume to answer the rest")


def main(argv=None):
    """Answer as the flags say; bad input ends with one 'Error:' line and exit 2; Ctrl-C,
    SIGTERM or SIGHUP end with a line saying what is kept, and exit 128 + the signal."""
    args = build_parser().parse_args(argv)
    lock = job = None
    try:
        with stop_signals_raise():
            check_args(args)
            check_not_a_run_output(args.output)
            lock = take_lock(args.output)
            job = plan(args)
            write_answers(args, job)
    except (DataError, DownloadError) as exc:
        fail(exc)
    except OSError as exc:  # a full disk: the answers kept before stay
        where = f" {exc.filename}" if exc.filename else ""
        fail(f"could not write{where} ({exc.strerror or exc}); free space, then run the same "
             "command with --resume", code=1)
    except KeyboardInterrupt as exc:
        print(interrupted_line(exc, job and job.log), file=sys.stderr)
        raise SystemExit(exit_code(exc)) from None
    finally:
        if lock is not None:
            unlock_file(lock)


if __name__ == "__main__":
    main()
