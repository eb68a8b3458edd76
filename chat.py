"""Chat in the terminal with a model that gpt_instruction_finetuning.py finetuned.

    python chat.py gpt2-medium355M-sft-standalone.pth
    python chat.py gpt2-medium355M-sft-standalone.pth --prompt "Name a primary color."
    python chat.py gpt2-medium355M-sft-standalone.pth --prompt "Rewrite in passive voice." \\
        --input "The chef cooked the meal."
    python chat.py gpt2-medium355M-sft-standalone.pth < instructions.txt
    jq -c '.[]' instruction-data.json | python chat.py gpt2-medium355M-sft-standalone.pth

At a terminal it asks for an instruction, then for an input (Enter for none), and prints the
answer while the model writes it. Ctrl-C stops an answer and asks again; Ctrl-D or "exit" leaves.
From a pipe or a file it answers each line, the answers one blank line apart: a line is an
instruction, or, when it starts with "{", a JSON object with "instruction" and an optional
"input" (so dataset entries can be piped in as they are). All lines are read and checked
before the first answer. `--prompt` answers one instruction. `--jsonl` prints each answer
as one line of JSON instead, with its instruction and input, to be read back by a program.

Each answer is asked and cut out as the chapter script answers its test set: in the prompt
style saved beside the weights, greedily, ending at <|endoftext|> or after `--max_new_tokens`.
So the answer to a test entry is the one the script saved for it. `--temperature` and `--top_k`
sample instead, from `--seed` drawn anew for each answer: the same instruction and seed give the
same answer, asked alone, piped or typed.
"""

import argparse
import codecs
import io
import json
import math
import os
import sys

import torch

from gpt_download import END_OF_TEXT, DownloadError, gpt2_tokenizer
from kit.cli import SEED_RANGE, HelpFormatter
from kit.data import check_entry
from kit.device import pick_device
from kit.files import DataError, fail
from kit.saved_model import (
    check_lora_alpha,
    check_vocabulary,
    load_finetuned_model,
    merge_saved_lora,
)
from previous_chapters import generate_stream, text_to_token_ids

INSTRUCTION_PROMPT = "Instruction: "
INPUT_PROMPT = "Input (Enter for none): "
EXIT_WORD = "exit"
MIN_TEMPERATURE = 1e-6  # below it sampling is greedy answering, and logits / it may overflow
INTERRUPTED_EXIT_CODE = 130  # a shell's code for a program stopped by Ctrl-C


def build_parser():
    """The flags: the model, what to ask, and the book's generation options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("model_path", help="a .pth saved by the chapter script (the JSON beside "
                                           "it gives config and prompt style) or by the book")
    parser.add_argument("--prompt", default=None,
                        help="answer this one instruction and exit")
    parser.add_argument("--input", default=None,
                        help="the input that goes with --prompt (default: none)")
    parser.add_argument("--max_new_tokens", type=int, default=256,
                        help="longest answer, in tokens, as in the chapter script")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 answers greedily, as the chapter script does; from 1e-6 on "
                             "samples, more freely the higher it is")
    parser.add_argument("--top_k", type=int, default=None,
                        help="sample only among the k most likely tokens")
    parser.add_argument("--seed", type=int, default=123,
                        help="seed of the random draws, set anew before each answer")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N, mps, or auto: cuda, then mps, then cpu")
    parser.add_argument("--models_dir", default="gpt2",
                        help="folder of GPT-2's downloads (the chapter script's --models_dir): "
                             "without a network or tiktoken's cache, GPT-2's tokenizer is read "
                             "from the encoder.json and vocab.bpe in its 124M, 355M, 774M or "
                             "1558M folder")
    parser.add_argument("--lora_alpha", type=float, default=None,
                        help="alpha of a .pth saved with unmerged LoRA layers and without its "
                             "JSON (the book trains with 16)")
    parser.add_argument("--jsonl", action="store_true",
                        help="for piped input and --prompt: print each answer as one line of "
                             'JSON, {"instruction", "input", "model_response"}, which reads '
                             "back whatever the answer holds")
    return parser


def check_args(args):
    """Refuse flag values that cannot work, before the model is loaded.

    Raises DataError naming the flag. Replaces `args.device` with the device.
    """
    if args.max_new_tokens < 1:
        raise DataError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise DataError(f"--temperature must be a finite number, 0 or above, got "
                        f"{args.temperature}")
    if 0 < args.temperature < MIN_TEMPERATURE:
        raise DataError(f"--temperature {args.temperature:g} is too small to sample with (the "
                        "logits divided by it overflow); pass 0 for greedy answers, which it "
                        f"approaches, or at least {MIN_TEMPERATURE:g}")
    if args.top_k is not None and args.top_k < 1:
        raise DataError(f"--top_k must be at least 1, got {args.top_k}")
    if not SEED_RANGE[0] <= args.seed <= SEED_RANGE[1]:
        raise DataError(f"--seed must be from {SEED_RANGE[0]} to {SEED_RANGE[1]}, got {args.seed}")
    if args.lora_alpha is not None:
        check_lora_alpha(args.lora_alpha, "--lora_alpha")
    if args.prompt is not None and not args.prompt.strip():
        raise DataError("--prompt is empty; give the instruction to answer")
    if args.input is not None and args.prompt is None:
        raise DataError("--input goes with --prompt; give the instruction with --prompt")
    if os.path.exists(args.models_dir) and not os.path.isdir(args.models_dir):
        raise DataError(f"--models_dir {args.models_dir}: is a file, not a folder; pass the "
                        "folder that holds GPT-2's downloads")
    args.device = pick_device(args.device)


#####################################
# What is asked: piped lines
#####################################


def read_piped_entries(stream):
    """The entries that the lines of `stream` ask, one per line that is not blank.

    Raises DataError naming the line when one cannot be read, and when there is none at all.
    """
    try:
        lines = stream.read().splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"standard input: not {stream.encoding} text ({exc.reason}); pipe in "
                        "text, one instruction a line") from None
    entries = [parse_line(line, number) for number, line in enumerate(lines, 1) if line.strip()]
    if not entries:
        raise DataError("standard input holds no instruction; pipe in one instruction a line, "
                        "pass --prompt, or run at a terminal to type them")
    return entries


def parse_line(line, number):
    """The entry asked by one line: the line itself as the instruction (surrounding blanks
    dropped), or, for a line that starts with "{", the JSON object's "instruction" and
    optional "input", as they are."""
    text = line.strip()
    if not text.startswith("{"):
        return {"instruction": text, "input": ""}
    where = f"standard input, line {number}"
    try:
        entry = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise DataError(f"{where}: starts with '{{' but is not a JSON object ({exc}); write "
                        'it as {"instruction": "...", "input": "..."}') from None
    check_entry(entry, ("instruction", "input"), where)
    if not entry["instruction"].strip():
        raise DataError(f"{where}: the instruction is empty")
    return {"instruction": entry["instruction"], "input": entry["input"]}


#####################################
# The answer, shown while it is written
#####################################


def response_header(prompt_style):
    """The header that training puts before each output and `extract_response` removes from an
    answer: "### Response:" (Alpaca) or "<|assistant|>:" (Phi-3)."""
    return prompt_style.format_response({"instruction": "", "input": "", "output": ""}).strip()


class AnswerText:
    """One prompt's answer, built from its generated tokens and given out as it becomes final.

    The whole answer is `prompt_style.extract_response(prompt + generated text, prompt)`, as
    the chapter script cuts it out once generation has ended. While tokens come in, only text
    that later tokens cannot change is given out: bytes of an unfinished UTF-8 character, a
    tail that may still grow into the response header (which is removed) and trailing
    whitespace (which is stripped unless more text follows) wait for the next tokens.
    """

    def __init__(self, tokenizer, prompt_style, prompt):
        self.tokenizer = tokenizer
        self.prompt_style = prompt_style
        self.prompt = prompt
        self.header = response_header(prompt_style)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # the generated text decoded so far
        self.given = 0  # characters of the answer given out so far

    def add(self, token_id):
        """The characters of the answer that token `token_id` makes final ("" when none)."""
        self.text += self.decoder.decode(self.tokenizer.decode_single_token_bytes(token_id))
        return self._give(self._unsettled_start())

    def finish(self):
        """The rest of the answer, once generation has ended."""
        self.text += self.decoder.decode(b"", final=True)  # an unfinished character: U+FFFD
        return self._give(len(self.text))

    def _unsettled_start(self):
        """Where the tail of the text that may still become the header begins (its length when
        there is no such tail). The headers have no part that is both their start and their
        end, so no header found before that tail can be one that later text would change."""
        first = max(len(self.text) - len(self.header) + 1, 0)
        return next((i for i in range(first, len(self.text))
                     if self.header.startswith(self.text[i:])), len(self.text))

    def _give(self, end):
        """The part of the answer that the text up to `end` makes final and is not given yet."""
        answer = self.prompt_style.extract_response(self.prompt + self.text[:end], self.prompt)
        new = answer[self.given:]
        self.given = len(answer)
        return new


class Chat:
    """A finetuned model ready to answer, with the generation options of the command line."""

    def __init__(self, model, tokenizer, prompt_style, context_size, args):
        self.model = model
        self.tokenizer = tokenizer
        self.prompt_style = prompt_style
        self.context_size = context_size
        self.args = args

    def answer(self, entry, write=None):
        """Hand the answer to `entry` (instruction and input) to `write` piece by piece as it
        is generated; by default print it so, without a line end."""
        write = write or show
        prompt = self.prompt_style.format_input(entry)
        idx = text_to_token_ids(prompt, self.tokenizer).to(self.args.device)  # (1, num_tokens)
        check_in_vocabulary(idx, self.model.tok_emb.num_embeddings, self.tokenizer)
        answer = AnswerText(self.tokenizer, self.prompt_style, prompt)
        torch.manual_seed(self.args.seed)
        for token_id in generate_stream(self.model, idx, self.args.max_new_tokens,
                                        self.context_size, self.args.temperature,
                                        self.args.top_k, eos_id=END_OF_TEXT):
            write(answer.add(token_id))
        write(answer.finish())


def check_in_vocabulary(idx, vocab_size, tokenizer):
    """Raise DataError when the prompt's token ids `idx` hold one that a model with a smaller
    vocabulary than GPT-2's lacks (its embedding has no row for it)."""
    largest = int(idx.max())
    if largest >= vocab_size:
        token = tokenizer.decode_single_token_bytes(largest).decode("utf-8", errors="replace")
        raise DataError(f"the prompt holds the token {token!r} (id {largest}), which the "
                        f"model's vocabulary of {vocab_size} tokens lacks (GPT-2's has "
                        f"{tokenizer.n_vocab}); ask without it, or chat with a model finetuned "
                        "from GPT-2")


def show(text):
    """Print `text` at once (no line end), so the answer appears while it is written."""
    if text:
        print(text, end="", flush=True)


def load_chat(args):
    """The model of `args.model_path` with LoRA layers merged, its tokenizer and prompt style.

    Raises DataError (or DownloadError for the tokenizer) when they cannot be loaded, when the
    model's vocabulary is larger than the tokenizer's (a smaller one answers prompts whose
    tokens it has: `check_in_vocabulary`), when merging its LoRA layers makes weights that
    are not finite, and when --top_k asks for more tokens than the model has.
    """
    model, info, prompt_style = load_finetuned_model(args.model_path, args.device,
                                                     lora_alpha=args.lora_alpha)
    config = info["config"]
    tokenizer = gpt2_tokenizer(args.models_dir)
    if config["vocab_size"] > tokenizer.n_vocab:  # it would write tokens the tokenizer lacks
        check_vocabulary(args.model_path, config["vocab_size"], tokenizer.n_vocab,
                         "chat with it")
    merge_saved_lora(model, args.model_path)
    if args.top_k is not None and args.top_k > config["vocab_size"]:
        raise DataError(f"--top_k {args.top_k}: the model has only {config['vocab_size']} "
                        "tokens; give a smaller value")
    return Chat(model, tokenizer, prompt_style, config["context_length"], args)


#####################################
# The three ways of asking
#####################################


def answer_entries(chat, entries):
    """Answer each entry in turn, each answer on its own lines, one blank line between them."""
    for i, entry in enumerate(entries):
        if i:
            print()
        chat.answer(entry)
        print()


def answer_entries_jsonl(chat, entries):
    """Answer each entry in turn, each as one line of JSON once it is whole: the instruction,
    the input and the answer as `model_response`, as in a responses file. Everything beyond
    ASCII is escaped, so no answer (blank lines, quotes, U+2028) can split a line or fail to
    print in the terminal's encoding."""
    for entry in entries:
        pieces = []
        chat.answer(entry, pieces.append)
        print(json.dumps({"instruction": entry["instruction"], "input": entry["input"],
                          "model_response": "".join(pieces)}), flush=True)


def converse(chat, banner):
    """The terminal session: ask, answer, again, until Ctrl-D or "exit". Ctrl-C while the
    model writes stops that answer; at a prompt it starts the question afresh."""
    print(banner)
    while True:
        try:
            entry = ask_entry()
        except KeyboardInterrupt:
            print()
            continue
        except EOFError:
            print()
            return
        if entry is None:
            return
        try:
            chat.answer(entry)
            print()
        except KeyboardInterrupt:
            print("\n[answer stopped]")
        print()


def ask_entry():
    """The instruction and optional input typed at the prompts; None when the user types exit.

    Ctrl-D raises EOFError and Ctrl-C KeyboardInterrupt, as `input` does.
    """
    instruction = ""
    while not instruction:
        instruction = input(INSTRUCTION_PROMPT).strip()
    if instruction == EXIT_WORD:
        return None
    return {"instruction": instruction, "input": input(INPUT_PROMPT).strip()}


def describe(args, prompt_style):
    """The banner of a terminal session: the model, how it answers, and how to leave."""
    if args.temperature > 0:
        top_k = "" if args.top_k is None else f", top-k {args.top_k}"
        decoding = f"sampling at temperature {args.temperature}{top_k}, seed {args.seed}"
    else:
        decoding = "greedy"
    return (f"Chatting with {args.model_path} ({prompt_style.name} prompts, {decoding}, "
            f"{args.device}).\nType an instruction, then an input or Enter for none. Ctrl-C "
            f'stops an answer; Ctrl-D or "{EXIT_WORD}" leaves.\n')


def main(argv=None):
    """Answer as the flags and standard input say; bad input ends with one 'Error:' line and
    exit 2, Ctrl-C outside a terminal session with one line and exit 130."""
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        stdin = sys.stdin or io.StringIO()  # None when the shell closed it
        at_terminal = args.prompt is None and stdin.isatty()
        if at_terminal and args.jsonl:
            raise DataError("--jsonl is for piped input and --prompt; pipe the instructions "
                            "in, one a line, or pass --prompt")
        entries = None
        if args.prompt is not None:
            entries = [{"instruction": args.prompt, "input": args.input or ""}]
        elif not at_terminal:
            entries = read_piped_entries(stdin)
        chat = load_chat(args)
        if at_terminal:
            converse(chat, describe(args, chat.prompt_style))
        else:
            (answer_entries_jsonl if args.jsonl else answer_entries)(chat, entries)
    except (DataError, DownloadError) as exc:
        fail(exc)
    except KeyboardInterrupt:
        print("\nStopped by Ctrl-C; run chat.py again to ask more.", file=sys.stderr)
        raise SystemExit(INTERRUPTED_EXIT_CODE) from None
    except BrokenPipeError:
        # The reader of the answers has gone (as with `| head`): stop without a word, and keep
        # Python from failing to flush the closed pipe once more at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
