"""What several test files share: running a script as a user would, reading its one-line
error, and small saved models to export or load."""

import os
import re
import signal
import subprocess
import sys
from unittest import mock

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


def random_model(config, seed=123):
    """GPTModel `config` with random weights everywhere, biases and norms too (eval mode)."""
    import torch

    from previous_chapters import GPTModel

    torch.manual_seed(seed)
    model = GPTModel(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.endswith(".weight"):
                param.normal_(0.0, 0.5)
    return model.eval()


def lora_trained_model(config):
    """The model of `config` with LoRA layers (rank 2, alpha 4) whose update is not zero: B
    random, as training leaves it (it starts at zero); eval mode."""
    import torch

    from lora import replace_linear_with_lora

    model = random_model(config)
    replace_linear_with_lora(model, rank=2, alpha=4)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora.B"):
                param.normal_(0.0, 0.5)
    return model.eval()


def save(model, path, config, prompt_style="alpaca"):
    """Save `model` as the finetuning script does; return the .pth path as a string."""
    import gpt_instruction_finetuning as ft

    ft.save_finetuned_model(model, str(path), {"config": config, "prompt_style": prompt_style})
    return str(path)


def quick_run_flags(data_path, max_new_tokens=5, gen_batch_size=None):
    """Flags of a test-mode run that takes a few seconds: one step per epoch, one evaluation
    batch, short answers (`gen_batch_size` at a time when given)."""
    flags = ["--test_mode", "--data_path", str(data_path), "--epochs", "1", "--eval_iter", "1",
             "--max_new_tokens", str(max_new_tokens)]
    return flags + (["--gen_batch_size", str(gen_batch_size)] if gen_batch_size else [])


def finished_run_folder(tmp_path_factory, name, flags):
    """The folder of one finished in-process run of the chapter script with `flags`, its
    checkpoint kept: what the fault and bad-input tests start from."""
    import gpt_instruction_finetuning as ft

    folder = tmp_path_factory.mktemp(name)
    ft.main([*flags, "--output_dir", str(folder), "--keep_checkpoint"])
    return folder


def stopped(stop):
    """How a program's last line begins when `stop` ("ctrl-c", or "sigterm") stopped it."""
    return "Interrupted" if stop == "ctrl-c" else "Stopped by SIGTERM"


def signal_at(owner, name, signum, call=1, when=None):
    """Patch `owner.name` so that its `call`-th call (counting calls that pass `when`) first
    sends this process `signum`: a user pressing Ctrl-C, or a kill, at that moment."""
    real = getattr(owner, name)
    calls = []

    def with_signal(*args, **kwargs):
        if when is None or when(*args, **kwargs):
            calls.append(None)
            if len(calls) == call:
                signal.raise_signal(signum)
        return real(*args, **kwargs)

    return mock.patch.object(owner, name, with_signal)


def one_line(err):
    """The only line of `err` once the progress bars' redraws are left out."""
    assert "Traceback" not in err, err
    lines = [line for line in err.replace("\r", "\n").splitlines()
             if line.strip() and not line.startswith(("Training:", "Generating responses:"))]
    assert len(lines) == 1, err
    return lines[0]
