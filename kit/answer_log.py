"""The test answers kept as they come, so that a stopped run's --resume generates only the rest.
"""

import os
from contextlib import suppress

from kit.files import DataError, read_json, save_json


class AnswerLog:
    """The test set answers generated so far, in a JSON file rewritten after each generation
    batch, so that a run that continues an interrupted one (--resume) answers only the rest.

    `key` names what the answers came from (the weights, the test set, --max_new_tokens):
    answers kept for another key are not reused.
    """

    def __init__(self, path, key, total):
        self.path, self.key, self.total = path, key, total
        self.count = 0

    def load(self):
        """The answers kept for this key, one per test entry (None where there is none)."""
        answers = [None] * self.total
        kept = {}
        if os.path.exists(self.path):
            with suppress(DataError):  # a damaged file: answer everything again
                kept = read_json(self.path)
        if (isinstance(kept, dict) and kept.get("key") == self.key
                and isinstance(kept.get("answers"), list) and len(kept["answers"]) == self.total
                and all(a is None or isinstance(a, str) for a in kept["answers"])):
            answers = kept["answers"]
        self.count = sum(answer is not None for answer in answers)
        if self.count:
            print(f"Reusing {self.count} of {self.total} answers kept in {self.path}")
        return answers

    def save(self, answers):
        """Keep `answers` (None where not answered yet)."""
        save_json({"key": self.key, "answers": answers}, self.path)
        self.count = sum(answer is not None for answer in answers)

    def remove(self):
        with suppress(FileNotFoundError):
            os.remove(self.path)
