"""The judge's prompts and the parsers of its replies (kit/judge_prompts.py)."""

import pytest

from kit.judge_prompts import parse_rubric_score, parse_score, rubric_prompt


@pytest.mark.parametrize(("reply", "score"), [
    ("85", 85), ("  100\n", 100), ("0", 0), ("I'd rate it 85 out of 100.", 85),
    ("Score: 90/100", 90), ("**72**", 72), ("The response deserves a 64.", 64),
    ("85.5", None), ("150", None), ("-3", None), ("N/A", None), ("", None),
])
def test_parse_score(reply, score):
    assert parse_score(reply) == score


# --- the rubric judge ---

def test_rubric_prompt():
    e = {"instruction": "Name a primary colour.", "input": "Answer in one word.",
         "output": "Red.", "model_response": "Blue."}
    assert rubric_prompt(e, "model_response") == (
        "Grade a response to an instruction, comparing it with the reference answer.\n\n"
        "<instruction>\nName a primary colour.\n</instruction>\n"
        "<input>\nAnswer in one word.\n</input>\n"
        "<reference_answer>\nRed.\n</reference_answer>\n"
        "<response>\nBlue.\n</response>\n\n"
        "Score the response from 1 to 5; the reference answer scores 5.\n"
        "5: as good as the reference answer: correct and complete; the wording may differ.\n"
        "4: correct, with a small omission, addition or flaw of wording that changes no meaning.\n"
        "3: partly correct: the main point is there, but a real part is missing or wrong.\n"
        "2: mostly wrong or far from complete, though some of it fits the instruction.\n"
        "1: wrong, unrelated to the instruction, or no answer at all.\n\n"
        "Give brief feedback in one or two sentences, then end with the score alone on the "
        'last line, written as "Score: N" with N from 1 to 5.')
    assert "<input>" not in rubric_prompt({**e, "input": ""}, "model_response")


@pytest.mark.parametrize(("reply", "score"), [
    ("Close to the reference.\nScore: 4", 4), ("Fine.\n\nScore: 5\n", 5), ("Score:1", 1),
    ("Good.\n**Score:** 3", 3), ("Good.\n**Score: 3**", 3), ("Score: 2/5", 2),
    ("Score: 2 out of 5", 2), ("It misses the point.\n1", 1), ("score: 4.", 4),
    ("Score: 4\nThe response is close.", None), ("Score: 7", None), ("Score: 0", None),
    ("Score: 3.5", None), ("I would give it 4.", None), ("", None), ("Score: 10/10", None),
])
def test_parse_rubric_score(reply, score):
    assert parse_rubric_score(reply) == score
