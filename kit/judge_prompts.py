"""The judge's prompts and how its replies are read: the chapter's 0-100 prompt, a 1-5 rubric,
their parsers (JUDGE_PROMPTS), the prompt of each entry and its hash (what a saved score was
the answer to), and the warning for prompts longer than Ollama's context.
"""

import hashlib
import re
import sys
from collections import namedtuple

from kit.data import format_input
from kit.judge_client import OPTIONS

CHARS_PER_TOKEN = 3  # English averages about 4 characters per token; 3 errs towards warning


def judge_prompt(entry, json_key):
    """The chapter's scoring prompt for one entry."""
    return (f"Given the input `{format_input(entry)}` and correct output `{entry['output']}`, "
            f"score the model response `{entry[json_key]}` on a scale from 0 to 100, where 100 "
            "is the best score. Respond with the integer number only.")


RUBRIC = """\
5: as good as the reference answer: correct and complete; the wording may differ.
4: correct, with a small omission, addition or flaw of wording that changes no meaning.
3: partly correct: the main point is there, but a real part is missing or wrong.
2: mostly wrong or far from complete, though some of it fits the instruction.
1: wrong, unrelated to the instruction, or no answer at all."""


def rubric_prompt(entry, json_key):
    """The rubric prompt for one entry: a 1-5 scale with each score's criterion, the entry's
    correct output as the reference answer that defines a 5, and brief feedback before a last
    line "Score: N" (written first, the feedback makes the judge reason before it scores)."""
    task = f"<instruction>\n{entry['instruction']}\n</instruction>\n"
    if entry["input"]:
        task += f"<input>\n{entry['input']}\n</input>\n"
    return ("Grade a response to an instruction, comparing it with the reference answer.\n\n"
            f"{task}<reference_answer>\n{entry['output']}\n</reference_answer>\n"
            f"<response>\n{entry[json_key]}\n</response>\n\n"
            f"Score the response from 1 to 5; the reference answer scores 5.\n{RUBRIC}\n\n"
            "Give brief feedback in one or two sentences, then end with the score alone on the "
            'last line, written as "Score: N" with N from 1 to 5.')


# A whole number in ASCII digits, not part of a word, sign, decimal, fraction, hex or exponent,
# with the scale's maximum "/100" or "out of 100" after it or not.
SCORE_NUMBER = re.compile(r"(?<![\w.,+\-/])([0-9]+)(?:\s*(?:/|out of)\s*100)?(?![\w/]|[.,]\d)",
                          re.I)


def parse_score(reply):
    """Return the score in the judge's reply, or None when the reply holds none or is ambiguous.

    A reply is a score when it holds exactly one number, that number is a whole number from 0
    to 100 written in ASCII digits, and the only other number is the scale's maximum written
    right after it ("/100", "out of 100"); markdown emphasis (*, _, `) is ignored. "85",
    "Score: 90/100", "I'd rate it 85 out of 100." and "**72**" are scores. A decimal ("85.5",
    "85,5"), a sign ("-3"), a number above 100, a fraction of another scale ("10/10", "85 out
    of 10"), hex ("0x50"), an exponent ("1e309"), digits of other scripts ("٨٥", full-width
    "８５"), a second number ("80 or 85") and no number ("N/A") are not: a reply read as a
    score is one the judge can only have meant as that score on the 0-100 scale.
    """
    reply = re.sub(r"[*_`]", "", reply)
    match = SCORE_NUMBER.search(reply)
    if match is None or re.search(r"\d", reply[:match.start()] + reply[match.end():]):
        return None
    score = int(match.group(1))
    return score if score <= 100 else None


def parse_rubric_score(reply):
    """Return the 1-5 score on the last line of a rubric reply, or None.

    The last non-empty line must be the score alone, with or without markdown and a "/5":
    "Score: 4", "**Score:** 4", "Score: 4/5" and "4" are scores; "Score: 7", "Score: 3.5",
    "Score: 4/10", digits of other scripts ("Score: ٤") and a last line of feedback are not.
    """
    lines = reply.strip().splitlines()
    last = re.sub(r"[*_`#]", "", lines[-1]).strip() if lines else ""
    match = re.fullmatch(r"(?:score\s*:?\s*)?([0-9]+)(?:\s*(?:/|out of)\s*5)?\.?", last, re.I)
    score = int(match.group(1)) if match else None
    return score if score is not None and 1 <= score <= 5 else None


# How the judge is asked (--prompt) and what its answer means. `scale_note` is added to the
# average's line; the chapter's prompt keeps the chapter's output. `max_tokens` caps a reply:
# room for "I'd rate it 85 out of 100." and more, or for the rubric's feedback and score line.
JudgePrompt = namedtuple("JudgePrompt", "build parse low high scale_note bins max_tokens")
JUDGE_PROMPTS = {
    "score": JudgePrompt(judge_prompt, parse_score, 0, 100, "", range(0, 105, 5), 64),
    "rubric": JudgePrompt(rubric_prompt, parse_rubric_score, 1, 5, " on a 1-5 scale",
                          [x - 0.5 for x in range(1, 7)], 256),
}


def entry_prompts(json_data, json_key, style=JUDGE_PROMPTS["score"]):
    """The judge's prompt for each entry; None where the response is empty (it gets the
    lowest score)."""
    return [style.build(entry, json_key) if entry[json_key].strip() else None
            for entry in json_data]


def prompt_sha256(prompt):
    """The hex SHA-256 of a prompt: what a saved score was the answer to. A lone surrogate
    (which JSON allows as an escape) is hashed as its code point, as the request sends it."""
    return hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest()


def warn_long_prompts(prompts):
    """Print one warning when prompts may exceed Ollama's num_ctx, which Ollama cuts without
    telling the client. Length in tokens is estimated from characters (no tokenizer needed)."""
    limit = OPTIONS["num_ctx"]
    long = sum(p is not None and len(p) > limit * CHARS_PER_TOKEN for p in prompts)
    if long:
        print(f"Warning: {long} of {len(prompts)} prompts may be longer than the judge's "
              f"{limit}-token context (num_ctx, estimated from their length); Ollama cuts "
              "them without saying so, so those entries may be scored on a cut prompt",
              file=sys.stderr)
