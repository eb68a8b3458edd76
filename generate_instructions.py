"""Make new instruction data with a local model, Magpie-style (the book's
ch07/05_dataset-generation/llama3-ollama notebook).

    ollama serve &  ollama pull llama3
    python generate_instructions.py --n 100 --model llama3
    python gpt_instruction_finetuning.py --data_path instruction-data-llama3.jsonl

Magpie gives an aligned chat model only the start of a user turn in its own chat template
(Llama 3's "<|begin_of_text|><|start_header_id|>user<|end_header_id|>", --user_turn), sent
as the assistant's message, so that the model goes on to write what a user would ask: an
instruction (its first non-empty line is kept). The instruction is then asked as usual and the
answer is the entry's output. Both requests of an entry sample with the seed --seed plus the
entry's try number, temperature 1 and top_p 1 (the book's settings), so every try asks for a
different instruction, and the same command writes the same entries.

The model is asked as ollama_evaluate.py asks its judge: the same --url, --backend, --model,
OLLAMA_HOST, --workers, --timeout, --retries and the same check that the server runs (the
server must continue an assistant message, as Ollama does). Entries are written as JSON Lines
as they arrive ({"instruction", "input": "", "output"}), ready for --data_path; every reply is
kept in <output>-replies.jsonl, so a stopped run keeps what it received and a rerun, or one
with a larger --n, asks only for what is missing. Empty replies, instructions that repeat one
already written, and entries longer than --max_length GPT-2 tokens (which finetuning would
cut) are counted and left out; a new try replaces each.
"""

import argparse
import json
import os
import re
from collections import Counter

from tqdm import tqdm

from kit.data import ALPACA, load_json_entries
from kit.files import DataError, WriteError, atomic_write, fail
from kit.judge_cli import add_server_flags, check_server_flags
from kit.judge_client import judge_name
from kit.judge_files import check_writable
from kit.judge_prompts import prompt_sha256
from kit.judge_store import ReplyFile, ask_all
from kit.server_jobs import asking, left_out_line, reply_file_beside, start

LLAMA3_USER_TURN = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>"
SAMPLING = {"temperature": 1.0, "top_p": 1.0}  # the book's sampling; the seed is per try
MAX_LENGTH = 1024  # GPT-2's context, the chapter's allowed_max_length


def extract_instruction(text):
    """The instruction in the model's continuation of a user turn: its first non-empty line,
    stripped ("" when it wrote nothing)."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def normalized(text):
    """`text` compared for repeats: case and runs of spaces ignored."""
    return " ".join(text.lower().split())


class Requests:
    """The two requests of each try (a numbered entry attempt): the instruction, asked by
    continuing --user_turn as the assistant, then its answer, asked as a user. Each is a
    (try, step, text) tuple; `ask` sends it, `key` names its reply in the replies file."""

    def __init__(self, ask, user_turn, seed, model):
        self.query, self.user_turn, self.seed, self.model = ask, user_turn, seed, model

    def how(self, request):
        """The role, prompt and sampling of a request."""
        number, step, text = request
        role = "assistant" if step == "instruction" else "user"
        return role, text, {"seed": self.seed + number, **SAMPLING}

    def key(self, request):
        """The SHA-256 of exactly what is asked: role, prompt and sampling."""
        return prompt_sha256(json.dumps(self.how(request), sort_keys=True))

    def ask(self, request):
        """Send one request; return the reply text."""
        role, prompt, sampling = self.how(request)
        return self.query(prompt, role=role, sampling=sampling)

    def record(self, request, reply):
        """The line that keeps a reply."""
        number, step, _ = request
        return {"model": self.model, "prompt_sha256": self.key(request), "try": number,
                "step": step, "reply": reply}


def entry_tokens(entry, tokenizer):
    """The GPT-2 tokens that finetuning trains on for `entry`: prompt, response header, output."""
    text = ALPACA.format_input(entry) + ALPACA.format_response(entry)
    return len(tokenizer.encode(text, disallowed_special=()))


class Generation:
    """The entries made so far, in try order, and what was left out and why."""

    def __init__(self, args, requests, store, tokenizer):
        self.args, self.requests, self.store, self.tokenizer = args, requests, store, tokenizer
        self.entries = []
        self.seen = set()  # the instructions taken, normalized
        self.left_out = Counter()
        self.tries = 0

    def saved(self, request):
        """The saved reply to `request`, or None."""
        record = self.store.get(self.requests.model, self.requests.key(request))
        return None if record is None else record["reply"]

    def ask(self, requests, keep=None):
        """Ask the requests that have no saved reply; save each reply as it arrives and pass it
        to `keep`. Returns the reply to each request, in order."""
        todo = [r for r in requests if self.saved(r) is None]

        def save(request, reply):
            self.store.append(self.requests.record(request, reply))
            if keep is not None:
                keep(request, reply)

        ask_all(todo, self.requests.ask, save, self.args.workers)
        return [self.saved(r) for r in requests]

    def entry(self, instruction, answer):
        """The entry of an instruction and its answer, or the reason it is left out."""
        entry = {"instruction": instruction, "input": "", "output": answer}
        if not answer.strip():
            return None, "empty replies"
        if entry_tokens(entry, self.tokenizer) > self.args.max_length:
            return None, f"entries longer than {self.args.max_length} tokens"
        return entry, None

    def next_round(self, bar, append):
        """Try once more for each entry still missing: ask the instructions, drop the empty and
        repeated ones (in try order, so the result does not depend on --workers), ask the
        answers, and keep the entries that fit. New entries go to `append` as they arrive."""
        wanted = min(self.args.n - len(self.entries), self.args.max_tries - self.tries)
        numbers = range(self.tries, self.tries + wanted)
        self.tries += wanted
        continuations = self.ask([(i, "instruction", self.args.user_turn) for i in numbers])
        questions = []
        for number, text in zip(numbers, continuations, strict=True):
            instruction = extract_instruction(text)
            if not instruction:
                self.left_out["empty replies"] += 1
            elif normalized(instruction) in self.seen:
                self.left_out["repeated instructions"] += 1
            else:
                self.seen.add(normalized(instruction))
                questions.append((number, "answer", instruction))

        def keep(request, reply):
            entry, _ = self.entry(request[2], reply)
            if entry is not None:
                append(entry)
                bar.update()

        answers = self.ask(questions, keep)
        for (_, _, instruction), answer in zip(questions, answers, strict=True):
            entry, reason = self.entry(instruction, answer)
            if entry is None:
                self.left_out[reason] += 1
            else:
                self.entries.append(entry)
        bar.n = len(self.entries)
        bar.refresh()


def write_lines(entries, path):
    """Write the entries as JSON Lines, whole (temporary file, then rename)."""
    with atomic_write(path, "w") as f:
        f.writelines(json.dumps(entry) + "\n" for entry in entries)


def append_line(entry, path):
    """Append one entry to the JSON Lines file at once; WriteError naming it when it cannot."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
    except OSError as exc:
        raise WriteError(exc.errno, exc.strerror or str(exc), path) from exc


def default_output(model):
    """instruction-data-<model>.jsonl, the model's name made fit for a file name."""
    return f"instruction-data-{re.sub(r'[^A-Za-z0-9._-]+', '-', model)}.jsonl"


def build_parser():
    """The command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, required=True, help="how many entries to make")
    parser.add_argument("--output", default=None,
                        help="the JSON Lines file of entries (default: instruction-data-<model>"
                             ".jsonl); the replies are kept beside it in -replies.jsonl")
    parser.add_argument("--seed", type=int, default=123,
                        help="seed of the first try; each further try adds 1 (default: 123)")
    parser.add_argument("--user_turn", default=LLAMA3_USER_TURN,
                        help="the start of a user turn in the model's chat template (default: "
                             "Llama 3's); Phi-3's is '<|user|>\\n', Qwen's '<|im_start|>user\\n'")
    parser.add_argument("--max_length", type=int, default=MAX_LENGTH,
                        help="leave out entries longer than this many GPT-2 tokens in the "
                             f"chapter's prompt format (default: {MAX_LENGTH}, GPT-2's context)")
    parser.add_argument("--max_tries", type=int, default=None,
                        help="stop after this many tries, for a model that repeats itself "
                             "(default: 3 x --n)")
    add_server_flags(parser, "model", "none: whole replies")
    return parser


def check_args(args):
    """Exit with one Error line naming the flag or file that cannot work."""
    check_server_flags(args)
    if args.n < 1:
        fail(f"--n must be at least 1, got {args.n}")
    if args.max_length < 1:
        fail(f"--max_length must be at least 1, got {args.max_length}")
    args.max_tries = 3 * args.n if args.max_tries is None else args.max_tries
    if args.max_tries < args.n:
        fail(f"--max_tries must be at least --n ({args.n}), got {args.max_tries}")
    if not args.user_turn.strip():
        fail("--user_turn is empty; give the start of a user turn in the model's chat template")
    args.output = args.output or default_output(args.model)
    replies = reply_file_beside(args.output)
    for flag, path in (("--output", args.output), ("replies file", replies)):
        check_writable(flag, path)
    if os.path.exists(args.output) and not os.path.exists(replies):
        fail(f"--output {args.output}: exists, but not the {replies} it was made from, so "
             "rewriting it would lose its entries; pass another --output")
    if os.path.exists(args.output) and os.path.getsize(args.output):
        try:
            load_json_entries(args.output)
        except DataError as exc:
            fail(f"{exc}; it is no file of this script's entries: pass another --output")
    return replies


def main(argv=None):
    """Make --n entries, keeping every reply as it arrives, and write them as JSON Lines. Exit
    2 on bad input, 1 when the server is down or fails or --max_tries ran out first, 130 (143)
    when stopped: a rerun continues."""
    args = build_parser().parse_args(argv)
    replies = check_args(args)
    import tiktoken

    tokenizer = tiktoken.get_encoding("gpt2")
    store = ReplyFile(replies)
    model = judge_name(args.backend, args.model)
    requests = Requests(start(args), args.user_turn, args.seed, model)
    generation = Generation(args, requests, store, tokenizer)
    with asking(replies), tqdm(total=args.n, desc="Generating entries") as bar:
        while len(generation.entries) < args.n and generation.tries < args.max_tries:
            generation.next_round(bar, lambda entry: append_line(entry, args.output))
            write_lines(generation.entries, args.output)  # whole, in try order
    print(f"{len(generation.entries)} entries saved as {args.output} "
          f"({generation.tries} tries)")
    line = left_out_line(generation.left_out, generation.tries, "tries")
    if line:
        print(f"{line}; their replies are in {replies}")
    if len(generation.entries) < args.n:
        fail(f"only {len(generation.entries)} of --n {args.n} entries after --max_tries "
             f"{args.max_tries}; pass a larger --max_tries to go on", code=1)


if __name__ == "__main__":
    main()
