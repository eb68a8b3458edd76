"""Side-by-side judging: which of two responses to each entry is better (ollama_evaluate.py
--pairwise).

The judge sees an entry's instruction, input and correct output with two responses, A and B,
and ends its reply with a verdict in MT-Bench's format: [[A]], [[B]] or [[C]] for a tie. Every
entry is asked twice, once with each response first: a verdict counts only when both orders
agree, otherwise the entry is a tie, so a judge's preference for a position (many prefer the
first response) cancels out instead of deciding the result. The summary gives wins, losses and
ties of A over B, the win rate (ties counting half) with a 95% bootstrap interval, how many
entries were inconsistent (the verdict flipped with the order) and the most one-sided entries.

Verdicts are saved as they arrive, through the judge's ScoreStore and score_prompts (the
same worker pool, deadlines, retries and Ctrl-C handling as scoring): each saved line's "score"
is the verdict as a number, +1 when the response shown first is better, -1 the second, 0 a
tie, null a reply without a verdict. A rerun reuses a saved verdict when the judge was sent
exactly the same prompt (the same entry, pair of responses in the same order and criterion).
"""

import os
import re
import sys
from collections import namedtuple

from kit.data import load_json_entries
from kit.files import DataError, fail
from kit.judge_cli import asker, judge_url, require_judge
from kit.judge_client import judge_name, one_line
from kit.judge_files import Run, check_outputs, check_writable, label_by_run_name, open_stores
from kit.judge_prompts import JudgePrompt, warn_long_prompts
from kit.judge_store import reported_failures, score_prompts, unanswered
from kit.judge_summary import bootstrap_interval, keyed_scores

DEFAULT_CRITERION = ("which response follows the instruction more helpfully and correctly, "
                     "with the reference answer as the correct output")
VERDICT = re.compile(r"\[\[([ABC])\]\]")
POINTS = {"A": 1, "B": -1, "C": 0}  # a verdict as seen from the response shown first
MAX_REPLY_TOKENS = 512  # room for a few sentences of explanation before the verdict
SHOWN = 3  # the most one-sided entries the summary names, for each side

Side = namedtuple("Side", "label entries key")  # one side of the comparison


def pairwise_prompt(entry, response_a, response_b, criterion=DEFAULT_CRITERION):
    """The prompt that asks which of two responses to `entry` is better by `criterion`, with
    the entry's correct output as the reference answer, and asks for an explanation first (so
    the judge reasons before it decides) and the verdict [[A]], [[B]] or [[C]] last."""
    task = f"<instruction>\n{entry['instruction']}\n</instruction>\n"
    if entry["input"]:
        task += f"<input>\n{entry['input']}\n</input>\n"
    return ("Compare two responses to an instruction and decide which one is better by this "
            f"criterion: {criterion}.\n\n"
            f"{task}<reference_answer>\n{entry['output']}\n</reference_answer>\n"
            f"<response_a>\n{response_a}\n</response_a>\n"
            f"<response_b>\n{response_b}\n</response_b>\n\n"
            "Judge by the criterion only: neither the order of the responses nor their length "
            "may sway you. Explain your decision in one or two sentences, then give your "
            'verdict on the last line: "[[A]]" if response A is better, "[[B]]" if response B '
            'is better, "[[C]]" for a tie.')


def parse_verdict(reply):
    """"A", "B" or "C" when the reply holds that verdict and no other, else None: "[[A]]" and
    "A is clearer. [[A]]" are verdicts; "[[A]] ... [[B]]" (which one is meant?), "[A]",
    "[[a]]" and no verdict at all are not."""
    found = set(VERDICT.findall(reply))
    return found.pop() if len(found) == 1 else None


def verdict_points(reply):
    """The reply's verdict as saved: +1 for [[A]], -1 for [[B]], 0 for [[C]], None for none."""
    verdict = parse_verdict(reply)
    return None if verdict is None else POINTS[verdict]


STYLE = JudgePrompt(build=pairwise_prompt, parse=verdict_points, low=-1, high=1,
                       scale_note="", bins=None, max_tokens=MAX_REPLY_TOKENS)


def default_output(file_path):
    """responses.json -> responses-verdicts.jsonl, beside the first input (kept apart from its
    scores, so that the numbers of a score file stay scores)."""
    return os.path.splitext(file_path)[0] + "-verdicts.jsonl"


def load_sides(args):
    """The two sides, A and B: two files' --json_key, or one file's two --json_key, checked;
    labelled by run name, path or key. Exits on bad input."""
    try:
        loaded = [load_json_entries(path, fields=("instruction", "input", "output",
                                                  *args.json_key))
                  for path in args.file_path]
    except DataError as exc:
        fail(str(exc))
    if len(loaded) == 1:
        return [Side(key, loaded[0], key) for key in args.json_key]
    runs = label_by_run_name([Run(path, entries, args.json_key[0], None)
                              for path, entries in zip(args.file_path, loaded, strict=True)])
    return [Side(run.label, run.entries, run.key) for run in runs]


def paired_entries(side_a, side_b):
    """(index in A, index in B) of each entry present in both sides, in A's order: entries
    match by instruction, input and correct output (and their occurrence, for repeats)."""
    keyed_b = keyed_scores(side_b.entries, range(len(side_b.entries)))
    return [(index, keyed_b[key])
            for key, index in keyed_scores(side_a.entries, range(len(side_a.entries))).items()
            if key in keyed_b]


def order_prompts(side_a, side_b, pairs, criterion, a_first):
    """The prompt of each of A's entries with A's response first (`a_first`) or B's; None for
    an entry that B lacks (not asked)."""
    prompts = [None] * len(side_a.entries)
    for index_a, index_b in pairs:
        entry = side_a.entries[index_a]
        response_a, response_b = entry[side_a.key], side_b.entries[index_b][side_b.key]
        prompts[index_a] = pairwise_prompt(entry, *((response_a, response_b) if a_first
                                                    else (response_b, response_a)), criterion)
    return prompts


def combined(first, second):
    """The verdict of A over B from the verdict with A first and the one with B first (each as
    points for the response shown first): +1 or -1 when both orders agree on it, else 0 (a
    tie); None when either reply held no verdict."""
    if first is None or second is None:
        return None
    return first if first == -second else 0


def one_sided_lines(entries, leans, labels=("A", "B"), count=SHOWN):
    """Up to `count` entries leaning most to each side (`leans`: index -> the two orders'
    points for A together, -2 to 2), strongest first, ties in entry order."""
    lines = []
    for sign, label in zip((1, -1), labels, strict=True):
        leaning = sorted((-sign * lean, index) for index, lean in leans.items() if sign * lean > 0)
        for strength, index in leaning[:count]:
            how = "in both orders" if strength == -2 else "in one order, a tie in the other"
            lines.append(f"  entry {index}, {label} {how}: "
                         f"{one_line(entries[index]['instruction'], 60)}")
    return ["Most one-sided entries:", *lines] if lines else []


def summary_lines(side_a, side_b, pairs, first, second):
    """The summary of A over B: `first` and `second` hold, per A's entry, the points of the
    order with A first and with B first. Returns (lines, entries without a verdict)."""
    outcomes = {index: combined(first[index], second[index]) for index, _ in pairs}
    judged = [value for value in outcomes.values() if value is not None]
    inconsistent = sum(first[i] is not None and second[i] is not None and first[i] != -second[i]
                       for i in outcomes)
    lines = [f"A = {side_a.label}, B = {side_b.label}: {len(pairs)} entries in both, each "
             "asked in both orders",
             f"Wins, losses and ties of A over B: {judged.count(1)}, {judged.count(-1)}, "
             f"{judged.count(0)}"]
    missing = len(pairs) - len(judged)
    if missing:
        lines.append(f"No verdict for {missing} entr{'ies' if missing > 1 else 'y'} (a reply "
                     "without a single [[A]], [[B]] or [[C]]), left out")
    if not judged:
        return lines + ["Win rate of A over B: n/a (no entry has a verdict)"], missing
    rates = [(value + 1) / 2 for value in judged]
    low, high = bootstrap_interval(rates)
    lines += [f"Win rate of A over B: {sum(rates) / len(rates):.1%} (95% bootstrap interval "
              f"[{low:.1%}, {high:.1%}]), ties counting half",
              f"Inconsistent entries (the verdict changed with the order, counted as ties): "
              f"{inconsistent} of {len(judged)}"]
    leans = {i: first[i] - second[i] for i, value in outcomes.items() if value is not None}
    return lines + one_sided_lines(side_a.entries, leans), missing


def judge_order(prompts, side_a, judge, ask, args, store, desc):
    """Ask the judge the prompts of one order (saved verdicts reused); return the points per
    A's entry. A failure, a full disk, Ctrl-C, SIGTERM or SIGHUP ends the run with one line
    saying that the verdicts so far are saved and a rerun continues (as scoring does)."""
    so_far = f"The verdicts so far are in {store.path}; run again to continue."

    def write_failure(exc):
        return (f"could not write {store.path} ({exc.strerror or exc}); free space and rerun: "
                "it continues")

    with reported_failures(so_far, write_failure):
        return score_prompts(prompts, side_a.entries, judge, ask, args.workers, store, STYLE,
                             desc=desc)


def run(args):
    """--pairwise: check the files, ask the judge about every entry in both orders (what is
    saved reused), print the summary. Exit 2 on bad input, 1 when the judge fails or most
    replies hold no verdict, 130 on Ctrl-C."""
    side_a, side_b = load_sides(args)
    store_path = args.output or default_output(args.file_path[0])
    check_writable("--output" if args.output else "verdict file", store_path)
    check_outputs(args, [Run(None, None, None, store_path)])
    store = open_stores(args, [Run(None, None, None, store_path)])[store_path]
    pairs = paired_entries(side_a, side_b)
    if not pairs:
        fail(f"--file_path: no entry of {side_a.label} is in {side_b.label} (entries match by "
             "instruction, input and output); compare answers to the same test set")
    criterion = args.criterion or DEFAULT_CRITERION
    orders = [order_prompts(side_a, side_b, pairs, criterion, a_first)
              for a_first in (True, False)]
    judge = judge_name(args.backend, args.model)
    url = judge_url(args)
    asked = sum(unanswered(prompts, store, judge, STYLE) for prompts in orders)
    if asked:
        require_judge(url, args.model, args.backend)
        if args.backend == "ollama":
            warn_long_prompts(orders[0])
    if asked < 2 * len(pairs):
        print(f"Reusing saved verdicts for {2 * len(pairs) - asked} of {2 * len(pairs)} prompts "
              f"(two per entry) from {store.path}; asking the judge about {asked}")
    ask = asker(args, url, STYLE.max_tokens)
    first = judge_order(orders[0], side_a, judge, ask, args, store, "Judging A, B")
    second = judge_order(orders[1], side_a, judge, ask, args, store, "Judging B, A")
    lines, missing = summary_lines(side_a, side_b, pairs, first, second)
    print("\n".join(lines))
    if missing * 2 > len(pairs):
        print(f"Warning: {missing} of {len(pairs)} entries got a reply without a verdict, so "
              "the judge does not answer in the prompt's format; the replies are in "
              f"{store.path}; try another --model", file=sys.stderr)
        raise SystemExit(1)
