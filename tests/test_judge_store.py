"""The judge's score file and request pool (kit/judge_store.py)."""

import json

from kit.judge_prompts import prompt_sha256
from kit.judge_store import ScoreStore


def test_score_file_keeps_unknown_lines_and_appends_after_a_cut_line(tmp_path):
    path = tmp_path / "scores.jsonl"
    good = {"judge": "ollama/llama3", "prompt_sha256": prompt_sha256("p"), "score": 80,
            "reply": "80"}
    lines = ['{"index": 0, "score": 90, "reply": "90"}', "not json", json.dumps(good),
             '{"judge": "ollama/llama3", "score": 5}', '{"judge": "ollama/ll']
    path.write_text("\n".join(lines))
    store = ScoreStore(str(path))
    assert store.find("ollama/llama3", "p") == good
    assert store.find("ollama/phi3", "p") is None and store.find("ollama/llama3", "q") is None
    store.add("ollama/phi3", "p", None, "no idea", 7, "Task 7")
    assert path.read_text().splitlines()[:5] == lines
    assert json.loads(path.read_text().splitlines()[5]) == {
        "judge": "ollama/phi3", "prompt_sha256": prompt_sha256("p"), "index": 7,
        "instruction": "Task 7", "score": None, "reply": "no idea"}
    assert ScoreStore(str(path)).find("ollama/phi3", "p")["reply"] == "no idea"
