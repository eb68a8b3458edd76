"""The README's own commands, run as a user would, so that the README cannot drift from the code.

The rule for what counts as a command: in the README's ```bash blocks, each line (a trailing
backslash joins the next one, `#` starts a comment) is split at `&&`, and every part that starts
with `python SCRIPT.py` is a command. They run in the README's order, in one scratch folder that
holds the chapter's dataset, as on a CPU in test mode, where commands that differ only in
`--model` or `--test_mode` are the same run (test mode's tiny model replaces any GPT-2) and run
once:

- training (gpt_instruction_finetuning.py, exercise_experiments.py) as written, with
  `--test_mode` appended, as a user tries the README's commands;
- the judge (ollama_evaluate.py) against the tests' loopback judge, by `--url`;
- chat.py, generate_answers.py and the exports on the models the training commands wrote: the
  README names the chapter's 355M files (`gpt2-medium355M-sft-...`), test mode writes
  `Smalltestmodel-sft-...`;
  chat.py gets one instruction on its standard input, as from a pipe, and answers it in a
  few tokens.

Each command is a test of its own, which first runs the commands before it (it reads their
files) unless an earlier test ran them; each must end with exit code 0 and no error. Where the
README shows what a block of commands prints in test mode, every line it shows ("..." stands for
lines left out) is a line those commands print. The README's test command is the one .ci/run
runs.
"""

import json
import os
import re
import shlex

import pytest
from helpers import REPO, run_script

from kit.loopback_judge import FakeJudge

TRAINING_SCRIPTS = {"gpt_instruction_finetuning.py", "exercise_experiments.py"}
SCRIPTS = TRAINING_SCRIPTS | {"ollama_evaluate.py", "chat.py", "export_hf.py", "export_gguf.py",
                              "find_near_duplicates.py", "generate_answers.py"}
BOOK_MODEL_FILES = "gpt2-medium355M-sft-"  # how the chapter's run names its model files
TEST_MODEL_FILES = "Smalltestmodel-sft-"  # how a --test_mode run names them
ALPACA_FILE = "alpaca_data.json"  # exercise 7.3's dataset, downloaded when missing
TEST_COMMAND = "python -m pytest -q"
CHAT_INPUT = "Name three primary colors.\n"  # chat.py's standard input
# The bash blocks whose next output block shows what they print in test mode, each named by a
# text it holds (the chapter's own run and the judge's first scoring show real runs' output).
SHOWN_IN_TEST_MODE = ["--run_name cosine", "instruction-data-with-response-cosine.json",
                      "--exercise_solution lora", "export_gguf.py", "--against_split train",
                      "generate_answers.py", "--pairwise"]


def readme_text(name="README.md"):
    """The text of a file at the top of the repo."""
    with open(os.path.join(REPO, name), encoding="utf-8") as f:
        return f.read()


def bash_lines(markdown):
    """The lines of `markdown`'s ```bash blocks, a line ending in a backslash joined to the next."""
    blocks = re.findall(r"^```bash\n(.*?)^```$", markdown, re.M | re.S)
    return [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]


def shown_output(markdown, marker):
    """(the ```bash block holding `marker`, the lines of the output block after it): the first
    ``` or ```text block that follows, before any other ```bash block."""
    blocks = re.findall(r"^```(\w*)\n(.*?)^```$", markdown, re.M | re.S)
    index = next(i for i, (kind, text) in enumerate(blocks) if kind == "bash" and marker in text)
    kind, text = blocks[index + 1]
    assert kind in ("", "text"), f"no output block after the bash block with {marker!r}"
    return f"```bash\n{blocks[index][1]}```\n", text.splitlines()


def readme_commands(markdown):
    """The README's commands by the rule above: (script, its arguments), in order, once each
    as test mode runs them."""
    commands = []
    for line in bash_lines(markdown):
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            if len(words) < 2 or words[0] != "python" or words[1] not in SCRIPTS:
                continue
            command = (words[1], without_model_choice(words[2:]))
            if command not in commands:
                commands.append(command)
    return commands


def without_model_choice(args):
    """`args` without `--test_mode` and `--model SIZE`, which test mode makes the same run."""
    kept, skip = [], False
    for arg in args:
        if skip or arg == "--test_mode":
            skip = False
        elif arg == "--model":
            skip = True
        else:
            kept.append(arg)
    return kept


def test_the_rule_reads_commands_from_bash_blocks_only():
    markdown = ("```bash\npip install -r r.txt && python chat.py a.pth  # a comment\n"
                "python export_hf.py a.pth \\\n    out-hf\npython chat.py a.pth\n"
                "ollama run x\npython -m pytest -q\n```\n"
                "```\npython export_gguf.py a.pth out\n```\n")
    assert readme_commands(markdown) == [("chat.py", ["a.pth"]),
                                         ("export_hf.py", ["a.pth", "out-hf"])]


def test_the_rule_runs_a_training_command_once_whatever_its_model():
    markdown = ("```bash\npython gpt_instruction_finetuning.py\n"
                "python gpt_instruction_finetuning.py --model 124M   # small\n"
                "python gpt_instruction_finetuning.py --test_mode --lr 1e-4\n```\n")
    assert readme_commands(markdown) == [("gpt_instruction_finetuning.py", []),
                                         ("gpt_instruction_finetuning.py", ["--lr", "1e-4"])]


def as_run_in_test_mode(script, args, judge_url):
    """`args` of a README command as the test runs it (the rule above)."""
    if script in TRAINING_SCRIPTS:
        return args + ["--test_mode"]
    if script == "ollama_evaluate.py":
        return args + ["--url", judge_url]
    args = [arg.replace(BOOK_MODEL_FILES, TEST_MODEL_FILES) for arg in args]
    return args + ["--max_new_tokens", "5"] if script == "chat.py" else args


COMMANDS = readme_commands(readme_text())


class ReadmeRuns:
    """The README's commands, run in its order in one scratch folder, each once: running one
    runs those before it first, since it reads their files."""

    def __init__(self, folder, judge_url):
        self.folder, self.judge_url = folder, judge_url
        self.done = []  # (the command as run, its completed process), in the README's order

    def run_through(self, index):
        """Run COMMANDS up to `index` that have not run; return (command, process) of `index`."""
        while len(self.done) <= index:
            script, args = COMMANDS[len(self.done)]
            run_args = as_run_in_test_mode(script, args, self.judge_url)
            result = run_script(script, *run_args, cwd=self.folder, timeout=600,
                                input=CHAT_INPUT)  # the timeout only guards against a hang
            self.done.append((shlex.join(["python", script, *run_args]), result))
        return self.done[index]


@pytest.fixture(scope="module")
def readme_runs(tmp_path_factory, instruction_data_path):
    """A scratch folder with the chapter's dataset (and 40 of its entries as exercise 7.3's),
    and the loopback judge, in which the README's commands run."""
    folder = tmp_path_factory.mktemp("readme")
    data = json.loads(instruction_data_path.read_text(encoding="utf-8"))
    (folder / "instruction-data.json").write_text(json.dumps(data), encoding="utf-8")
    (folder / ALPACA_FILE).write_text(json.dumps(data[:40]), encoding="utf-8")
    judge = FakeJudge()
    try:
        yield ReadmeRuns(folder, judge.url)
    finally:
        judge.close()


def test_the_readme_runs_every_script():
    assert {script for script, _ in COMMANDS} == SCRIPTS


@pytest.mark.parametrize("index", range(len(COMMANDS)),
                         ids=[shlex.join([script, *args]) for script, args in COMMANDS])
def test_readme_command_runs(readme_runs, index):
    shown, result = readme_runs.run_through(index)
    assert result.returncode == 0, (shown, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr and "Error:" not in result.stderr, (
        shown, result.stderr[-2000:])


@pytest.mark.parametrize("marker", SHOWN_IN_TEST_MODE)
def test_readme_shows_what_its_commands_print_in_test_mode(readme_runs, marker):
    block, lines = shown_output(readme_text(), marker)
    indices = [COMMANDS.index(command) for command in readme_commands(block)]
    printed = set()
    for index in indices:
        shown, result = readme_runs.run_through(index)
        assert result.returncode == 0, (shown, result.stderr[-2000:])
        printed.update(line.rstrip() for line in result.stdout.splitlines())
    assert lines and [line for line in lines if line != "..." and line not in printed] == []


def test_the_readme_test_command_is_what_ci_runs():
    ci_commands = [line for line in readme_text(".ci/run").splitlines()
                   if line and not line.startswith("#")]
    assert ci_commands[-1] == TEST_COMMAND
    assert TEST_COMMAND in bash_lines(readme_text())
    assert "bash .ci/run" in [line.split("#")[0].strip() for line in bash_lines(readme_text())]


def heading_anchors(markdown):
    """The anchors GitHub gives `markdown`'s headings: lower case, spaces to hyphens, other
    punctuation dropped (code blocks hold no headings)."""
    text = re.sub(r"^```.*?^```$", "", markdown, flags=re.M | re.S)
    return {re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
            for title in re.findall(r"^#+ (.*)$", text, re.M)}


def test_the_guides_links_lead_to_files_and_headings_that_exist():
    guides = ["README.md", "benchmarks/README.md"] + [
        f"docs/{name}" for name in sorted(os.listdir(os.path.join(REPO, "docs")))]
    links = 0
    for guide in guides:
        for target in re.findall(r"\]\(([^)\s]+)\)", readme_text(guide)):
            if target.startswith("http"):
                continue
            path, _, anchor = target.partition("#")
            path = os.path.normpath(os.path.join(os.path.dirname(guide), path)) if path else guide
            assert os.path.isfile(os.path.join(REPO, path)), (guide, target)
            assert not anchor or anchor in heading_anchors(readme_text(path)), (guide, target)
            links += 1
    assert links >= 10
