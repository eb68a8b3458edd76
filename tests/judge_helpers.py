"""What the judge's tests share: the loopback judge's answers, entries and files of them."""

import json

import pytest

from kit.loopback_judge import FakeJudge

ANSWERS = {"good": "90", "bad": "I'd rate it 15 out of 100.", "odd": "I cannot score this."}


def entry(response, i=0, key="model_response"):
    return {"instruction": f"Task {i}", "input": "" if i % 2 else f"in {i}",
            "output": f"out {i}", key: response}


def write(tmp_path, entries, name="responses.json"):
    path = tmp_path / name
    path.write_text(json.dumps(entries))
    return path


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def judge():
    """The loopback judge on 127.0.0.1, answering ANSWERS (a fixture, loaded by the
    judge tests' pytest_plugins)."""
    server = FakeJudge(ANSWERS)
    yield server
    server.close()
