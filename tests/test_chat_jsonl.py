"""chat.py --jsonl: piped answers as JSON Lines, which read back whatever an answer holds."""

import io
import json

import chat
from gpt_download import gpt2_tokenizer
from tests.test_chat import FakeTerminal, ask, save_model

ENTRIES = [{"instruction": "Name a color.", "input": ""},
           {"instruction": "Rewrite the sentence.", "input": 'He said "hi".'}]
# What a model may write: blank lines, quotes, a backslash, a line separator, other scripts.
ANSWERS = ['First "quoted" line.\n\nSecond paragraph, a \\ and a tab\t.', "\u00e9t\u00e9 \u2028 "
           "\u4e2d\u6587\n\n\n### Input:\nend"]


def piped(entries):
    """Standard input piping `entries` as JSON objects, one a line."""
    return io.StringIO("".join(json.dumps(entry) + "\n" for entry in entries))


def test_answers_holding_blank_lines_and_quotes_read_back(tmp_path, tiny_cfg, capsys,
                                                          monkeypatch):
    save_model(tmp_path / "model.pth", tiny_cfg)
    tokenizer = gpt2_tokenizer()
    written = iter(ANSWERS)

    def writes_the_next_answer(*args, **kwargs):
        yield from tokenizer.encode(next(written))  # then ends, as at <|endoftext|>

    monkeypatch.setattr(chat, "generate_stream", writes_the_next_answer)
    code, out, err = ask(capsys, tmp_path / "model.pth", "--jsonl", stdin=piped(ENTRIES),
                         monkeypatch=monkeypatch)
    assert (code, err) == (0, "")
    assert out.isascii() and out.count("\n") == 2
    assert [json.loads(line) for line in out.splitlines()] == [
        {**entry, "model_response": answer.strip()}
        for entry, answer in zip(ENTRIES, ANSWERS, strict=True)]


def test_jsonl_answers_are_the_plain_answers(tmp_path, tiny_cfg, capsys, monkeypatch):
    """The same answers as the streamed, blank-line separated output (the script's answers)."""
    save_model(tmp_path / "model.pth", tiny_cfg)
    flags = ["--max_new_tokens", "12"]
    code, plain, err = ask(capsys, tmp_path / "model.pth", *flags, stdin=piped(ENTRIES),
                           monkeypatch=monkeypatch)
    assert (code, err) == (0, "")
    code, out, err = ask(capsys, tmp_path / "model.pth", *flags, "--jsonl",
                         stdin=piped(ENTRIES), monkeypatch=monkeypatch)
    assert (code, err) == (0, "")
    answers = [json.loads(line)["model_response"] for line in out.splitlines()]
    assert plain == "\n\n".join(answers) + "\n"
    code, out, err = ask(capsys, tmp_path / "model.pth", *flags, "--jsonl", "--prompt",
                         ENTRIES[1]["instruction"], "--input", ENTRIES[1]["input"])
    assert (code, err) == (0, "")
    assert json.loads(out) == {**ENTRIES[1], "model_response": answers[1]}


def test_jsonl_at_a_terminal_is_refused(tmp_path, capsys, monkeypatch):
    code, out, err = ask(capsys, tmp_path / "not-loaded.pth", "--jsonl", stdin=FakeTerminal(),
                         monkeypatch=monkeypatch)
    assert (code, out) == (2, "")
    assert err == ("Error: --jsonl is for piped input and --prompt; pipe the instructions in, "
                   "one a line, or pass --prompt\n")
