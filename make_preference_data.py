"""Make a preference dataset for DPO with a local model: each output made more polite or more
impolite (the book's ch07/04_preference-tuning-with-dpo/create-preference-data-ollama).

    ollama serve &  ollama pull llama3.1:70b     # the book uses Llama 3.1 70B (llama3.1 is 8B)
    python make_preference_data.py --data_path instruction-data.json --model llama3.1:70b

For each entry a seeded draw (--seed) picks "polite" or "impolite", and the model is asked, with
the book's prompt, to rewrite the entry's output slightly to be more so. A polite rewrite is
`chosen` over the original output (`rejected`); the original output is `chosen` over an
impolite rewrite. The entries are written with the two fields added, as the book's
instruction-data-with-preference.json has them, ready for DPO.

The model is asked as ollama_evaluate.py asks its judge: the same --url, --backend, --model,
OLLAMA_HOST, --workers, --timeout, --retries and the same check that the server runs. Every
reply is saved as it arrives in <output>-replies.jsonl, keyed by the model and the exact
prompt, so a stopped run keeps what it received and a rerun asks only for what is missing
(another --model or --seed asks again). A reply that is empty, or only repeats the output, is
no preference: it is counted, and its entry is left out.
"""

import argparse
import os
import random
from collections import Counter

from tqdm import tqdm

from kit.data import format_input, load_json_entries, save_entries
from kit.files import DataError, fail
from kit.judge_cli import add_server_flags, check_server_flags
from kit.judge_client import judge_name
from kit.judge_files import check_writable, same_file
from kit.judge_prompts import prompt_sha256
from kit.judge_store import ReplyFile, ask_all
from kit.server_jobs import asking, left_out_line, reply_file_beside, start

STYLES = ("polite", "impolite")
DEFAULT_DATA = "instruction-data.json"  # the chapter's data, as the training script downloads it


def rewrite_prompt(entry, politeness):
    """The book's prompt, word for word (its missing spaces and "return return" included, so
    that a model answers it as it answered the book): rewrite the output to be more
    `politeness`."""
    return (f"Given the input `{format_input(entry)}` "
            f"and correct output `{entry['output']}`, "
            f"slightly rewrite the output to be more {politeness}."
            "Keep the modification minimal."
            "Only return return the generated response and nothing else.")


def draw_styles(num_entries, seed):
    """One "polite" or "impolite" per entry, in entry order, from a generator seeded by `seed`:
    the book's random.choice per entry, made reproducible."""
    rng = random.Random(seed)
    return [rng.choice(STYLES) for _ in range(num_entries)]


def same_text(a, b):
    """Whether two texts are the same but for spaces and line breaks."""
    return " ".join(a.split()) == " ".join(b.split())


def with_preference(entry, politeness, reply):
    """The entry with `chosen` and `rejected` added in the book's order: a polite rewrite is
    chosen over the output, the output over an impolite rewrite."""
    if politeness == "polite":
        return {**entry, "chosen": reply, "rejected": entry["output"]}
    return {**entry, "rejected": reply, "chosen": entry["output"]}


def preference_entries(entries, prompts, styles, store, model):
    """The entries with a preference pair, and a Counter of why the others were left out. An
    entry whose reply is missing (not asked yet) is left out and not counted."""
    kept, left_out = [], Counter()
    for entry, prompt, politeness in zip(entries, prompts, styles, strict=True):
        record = store.get(model, prompt_sha256(prompt))
        if record is None:
            continue
        reply = record["reply"]
        if not reply.strip():
            left_out["empty replies"] += 1
        elif same_text(reply, entry["output"]):
            left_out["replies that repeat the output"] += 1
        else:
            kept.append(with_preference(entry, politeness, reply))
    return kept, left_out


def default_output(data_path):
    """instruction-data.json -> instruction-data-preference.json, beside the input."""
    return os.path.splitext(data_path)[0] + "-preference.json"


def build_parser():
    """The command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", default=DEFAULT_DATA,
                        help="the entries to rewrite: a JSON list or JSON Lines of instruction, "
                             f"input, output (default: {DEFAULT_DATA}, the chapter's data)")
    parser.add_argument("--output", default=None,
                        help="where to write the entries with chosen and rejected (default: "
                             "beside --data_path, its name with -preference.json; .jsonl writes "
                             "JSON Lines); the replies are kept beside it in -replies.jsonl")
    parser.add_argument("--seed", type=int, default=123,
                        help="seed of the per-entry choice of polite or impolite (default: 123)")
    add_server_flags(parser, "model", "none: the whole rewrite")
    return parser


def check_paths(args):
    """Exit with one Error line when the input cannot be read or an output not written."""
    if not os.path.exists(args.data_path):
        hint = (" (the training script downloads it: run gpt_instruction_finetuning.py once)"
                if args.data_path == DEFAULT_DATA else "")
        fail(f"--data_path {args.data_path}: file not found{hint}; pass --data_path")
    try:
        entries = load_json_entries(args.data_path)
    except DataError as exc:
        fail(str(exc))
    replies = reply_file_beside(args.output)
    for flag, path in (("--output", args.output), ("replies file", replies)):
        if same_file(path, args.data_path):
            fail(f"{flag} {path}: is the input --data_path, which writing there would damage; "
                 "pass another --output")
        check_writable(flag, path)
    return entries, replies


def main(argv=None):
    """Rewrite each entry's output, keep the replies as they arrive, write the preference
    entries and say what was left out. Exit 2 on bad input, 1 when the server is down or fails,
    130 (143) when stopped: a rerun continues."""
    args = build_parser().parse_args(argv)
    check_server_flags(args)
    args.output = args.output or default_output(args.data_path)
    entries, replies = check_paths(args)
    styles = draw_styles(len(entries), args.seed)
    prompts = [rewrite_prompt(entry, style) for entry, style in zip(entries, styles, strict=True)]
    model = judge_name(args.backend, args.model)
    store = ReplyFile(replies)
    todo = list(dict.fromkeys(p for p in prompts if store.get(model, prompt_sha256(p)) is None))
    if len(todo) < len(prompts):
        print(f"Reusing saved replies for {len(prompts) - len(todo)} of {len(prompts)} entries "
              f"from {replies}; asking the model about {len(todo)}")
    ask = start(args, needed=bool(todo))
    index = {prompt: i for i, prompt in reversed(list(enumerate(prompts)))}
    copies = Counter(prompts)  # entries that repeat another's instruction, input and output

    with asking(replies), tqdm(total=len(prompts), initial=len(prompts) - len(todo),
                               desc="Writing entries") as bar:
        def keep(prompt, reply):
            """Save one reply the moment it arrives."""
            i = index[prompt]
            store.append({"model": model, "prompt_sha256": prompt_sha256(prompt), "index": i,
                          "politeness": styles[i], "reply": reply})
            bar.update(copies[prompt])

        ask_all(todo, ask, keep, args.workers)

    kept, left_out = preference_entries(entries, prompts, styles, store, model)
    with asking(replies):
        save_entries(kept, args.output)
    polite = sum(style == "polite" for style in styles)
    print(f"{len(kept)} entries with a preference pair saved as {args.output} "
          f"({polite} asked to be more polite, {len(styles) - polite} more impolite)")
    line = left_out_line(left_out, len(entries))
    if line:
        print(f"{line}; their replies are in {replies}")


if __name__ == "__main__":
    main()
