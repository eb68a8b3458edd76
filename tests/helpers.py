"""What several test files share: running a script as a user would, and reading its one-line
error."""

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script, *args, cwd, timeout=300, **options):
    """Run `script` (a file at the top of the repo) with `args` as a user would, in `cwd`;
    return the completed process with its output as text."""
    return subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, **options)


def assert_error(err, *parts, values=()):
    """Assert that `err` is one 'Error:' line (besides progress bars) holding every substring in
    `parts` and every word in `values`."""
    assert "Traceback" not in err, err
    rest = re.sub(r"\r[^\r\n]*\n?", "", err)  # progress bars: tqdm redraws them after \r
    assert rest.endswith("\n") and rest.count("\n") == 1 and "\r" not in rest, err
    line = rest[:-1]
    assert line.startswith("Error: "), line
    for part in parts:
        assert part in line, (part, line)
    words = {word.rstrip(".") for word in re.findall(r"[\w.+-]+", line)}
    for value in values:
        assert value in words, (value, line)


def run_in_process(entry_point, argv, capsys):
    """Call a script's entry point with `argv`; return (exit code, stdout, stderr)."""
    try:
        entry_point(argv)
        code = 0
    except SystemExit as exc:
        code = 0 if exc.code is None else exc.code
    out, err = capsys.readouterr()
    return code, out, err
