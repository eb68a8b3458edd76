"""chat.py: answers equal to the chapter script's, streamed as they are generated, from a flag,
a pipe or a person at a terminal; and previous_chapters.generate_stream, which it runs on."""

import fcntl
import io
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import termios
import time

import pytest
import torch

import chat
from gpt_instruction_finetuning import TEST_MODE_CONFIG, save_finetuned_model
from kit.data import ALPACA, PROMPT_STYLES
from lora import merge_lora, replace_linear_with_lora
from previous_chapters import GPTModel, generate, generate_stream, token_ids_to_text
from tests.helpers import REPO, assert_error, run_in_process, run_script

MAX_NEW_TOKENS = "80"  # answers to prompts of over 40 tokens slide past the context of 120
ASKED = [0, 1, 4, 6]  # test entries with an input (0, 4: 45 and 44 tokens) and without (1, 6)
PTY_TIMEOUT_S = 120  # only a guard against a hang: each wait ends as soon as its text arrives


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, instruction_data_path):
    """The chapter script's test-mode run: (its .pth, the test entries with their answers)."""
    out = tmp_path_factory.mktemp("finetuned")
    result = run_script("gpt_instruction_finetuning.py", "--test_mode", "--data_path",
                        str(instruction_data_path), "--output_dir", str(out),
                        "--max_new_tokens", MAX_NEW_TOKENS, cwd=out)
    assert result.returncode == 0, result.stderr
    responses = json.loads((out / "instruction-data-with-response-standalone.json").read_text())
    return out / "Smalltestmodel-sft-standalone.pth", responses


def ask(capsys, model_path, *flags, stdin=None, monkeypatch=None):
    """Run chat.main in this process; return (exit code, stdout, stderr)."""
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", stdin)
    return run_in_process(chat.main, [str(model_path), "--device", "cpu", *flags], capsys)


def prompt_flags(entry):
    """--prompt, and --input when the entry has one."""
    return ["--prompt", entry["instruction"]] + (["--input", entry["input"]] if entry["input"]
                                                 else [])


def save_model(path, cfg, prompt_style="alpaca", seed=0):
    """Save a random GPTModel of `cfg` with its JSON, as the chapter script saves one."""
    torch.manual_seed(seed)
    model = GPTModel(cfg).eval()
    save_finetuned_model(model, str(path), {"config": cfg, "prompt_style": prompt_style})
    return model


def reference_answer(model, tokenizer, prompt_style, entry, max_new_tokens, context_size,
                     temperature=0.0, top_k=None, seed=123):
    """The answer as the chapter script computes it: `generate`, then `extract_response`."""
    prompt = prompt_style.format_input(entry)
    idx = torch.tensor([tokenizer.encode(prompt)])
    torch.manual_seed(seed)
    out = generate(model, idx, max_new_tokens, context_size, temperature, top_k, eos_id=50256)
    return prompt_style.extract_response(token_ids_to_text(out, tokenizer), prompt)


#####################################
# The answers are the chapter script's
#####################################


def test_prompt_answers_as_the_script_saved(finetuned, capsys):
    model_path, responses = finetuned
    for i in ASKED:
        code, out, err = ask(capsys, model_path, *prompt_flags(responses[i]),
                             "--max_new_tokens", MAX_NEW_TOKENS)
        assert (code, err) == (0, "")
        assert out == responses[i]["model_response"] + "\n"


def test_prompt_run_as_a_user_prints_only_the_answer(finetuned, tmp_path):
    model_path, responses = finetuned
    result = run_script("chat.py", str(model_path), *prompt_flags(responses[0]),
                        "--max_new_tokens", MAX_NEW_TOKENS, cwd=tmp_path)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == responses[0]["model_response"] + "\n"


def test_piped_lines_each_get_their_answer(finetuned, capsys, monkeypatch):
    model_path, responses = finetuned
    lines = []
    for i in ASKED:  # an entry without input as plain text, one with input as JSON
        entry = responses[i]
        lines.append(json.dumps(entry) if entry["input"] else f"  {entry['instruction']}  ")
        lines.append("")  # blank lines ask nothing
    code, out, err = ask(capsys, model_path, "--max_new_tokens", MAX_NEW_TOKENS,
                         stdin=io.StringIO("\n".join(lines)), monkeypatch=monkeypatch)
    assert (code, err) == (0, "")
    assert out == "\n\n".join(responses[i]["model_response"] for i in ASKED) + "\n"


def test_sampling_changes_the_answer_and_the_seed_repeats_it(finetuned, capsys, tokenizer):
    model_path, responses = finetuned
    flags = [*prompt_flags(responses[1]), "--max_new_tokens", "30"]
    sampled = [ask(capsys, model_path, *flags, "--temperature", "1.5", "--top_k", "50",
                   "--seed", seed)[1] for seed in ("7", "7", "8")]
    greedy = ask(capsys, model_path, *flags)[1]
    assert sampled[0] == sampled[1]
    assert len({sampled[0], sampled[2], greedy}) == 3
    model = GPTModel(TEST_MODE_CONFIG).eval()
    model.load_state_dict(torch.load(model_path, weights_only=True))
    assert sampled[0] == reference_answer(model, tokenizer, ALPACA, responses[1], 30, 120,
                                          temperature=1.5, top_k=50, seed=7) + "\n"
    assert ask(capsys, model_path, *flags, "--temperature", "1", "--top_k", "1")[1] == greedy


def test_answers_in_the_saved_prompt_style(tmp_path, tiny_cfg, tokenizer, capsys):
    path = tmp_path / "phi3.pth"
    model = save_model(path, tiny_cfg, prompt_style="phi3")
    entry = {"instruction": "Rewrite the sentence.", "input": "The cake was baked by me."}
    code, out, err = ask(capsys, path, *prompt_flags(entry), "--max_new_tokens", "40")
    assert (code, err) == (0, "")
    assert out == reference_answer(model, tokenizer, PROMPT_STYLES["phi3"], entry, 40, 32) + "\n"


def test_unmerged_lora_pth_without_json_takes_lora_alpha(tmp_path, tokenizer, capsys):
    torch.manual_seed(0)
    model = GPTModel(TEST_MODE_CONFIG).eval()
    replace_linear_with_lora(model, rank=4, alpha=8)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".lora.B"):
                param.normal_(0, 0.5)  # an update that changes the answers
    path = tmp_path / "lora.pth"
    torch.save(model.state_dict(), path)
    entry = {"instruction": "Name a primary color.", "input": ""}
    code, _, err = ask(capsys, path, *prompt_flags(entry))
    assert code == 2
    assert_error(err, "lora.json: not found", "--lora_alpha")
    code, out, err = ask(capsys, path, *prompt_flags(entry), "--lora_alpha", "8",
                         "--max_new_tokens", "20")
    assert (code, err) == (0, "")
    merged = merge_lora(model)  # chat merges too: the same sums, to the last bit
    assert out == reference_answer(merged, tokenizer, ALPACA, entry, 20, 120) + "\n"
    assert ask(capsys, path, *prompt_flags(entry), "--lora_alpha", "1",
               "--max_new_tokens", "20")[1] != out


#####################################
# Streaming: the pieces add up to extract_response's answer
#####################################


def stream_pieces(tokenizer, prompt_style, prompt, token_ids):
    """What chat prints for each token of `token_ids`, then at the end."""
    answer = chat.AnswerText(tokenizer, prompt_style, prompt)
    return [answer.add(token_id) for token_id in token_ids] + [answer.finish()]


def test_stream_holds_back_a_header_being_written_and_trailing_blanks(tokenizer):
    prompt = ALPACA.format_input({"instruction": "Say hello.", "input": ""})
    parts = ["\n\n", "###", " Response", ":", "\n", "Hello", " ", "#", "##", " Response", ":",
             " world", " ", "\n"]
    token_ids = [tokenizer.encode(part)[0] for part in parts]
    assert [tokenizer.decode([t]) for t in token_ids] == parts  # one token each
    assert stream_pieces(tokenizer, ALPACA, prompt, token_ids) == [
        "", "", "", "", "", "Hello", "", "", "", "", "", "  world", "", "", ""]
    assert ALPACA.extract_response(prompt + "".join(parts), prompt) == "Hello  world"


def test_stream_never_shows_part_of_a_character(tokenizer):
    prompt = ALPACA.format_input({"instruction": "Write in Japanese.", "input": ""})
    token_ids = tokenizer.encode("日本 😀")  # 日, 本 and 😀 take two tokens each
    assert len(token_ids) == 6
    assert stream_pieces(tokenizer, ALPACA, prompt, token_ids) == [
        "", "日", "", "本", "", " 😀", ""]
    cut_short = stream_pieces(tokenizer, ALPACA, prompt, token_ids[:1])  # ends mid-character
    assert cut_short == ["", "\ufffd"] and tokenizer.decode(token_ids[:1]) == "\ufffd"


@pytest.mark.parametrize("style_name", list(PROMPT_STYLES))
def test_streamed_answer_is_extract_response_for_any_tokens(tokenizer, style_name):
    prompt_style = PROMPT_STYLES[style_name]
    prompt = prompt_style.format_input({"instruction": "Answer.", "input": "Some input."})
    pool = [tokenizer.encode(text) for text in (
        "###", "#", "##", " Response", "Response", ":", " Response:", "\n", "\n\n", " ", "  ",
        "<", "|", "ass", "istant", ">:", "<|assistant|>:", "Hello", " world", "é", "日本",
        "😀")]
    pool += [[tokenizer.encode_single_token(bytes([b]))] for b in (0xE6, 0x97, 0x80, 0xF0)]
    rng = random.Random(0)
    for _ in range(300):
        token_ids = [t for _ in range(rng.randint(1, 12)) for t in rng.choice(pool)]
        pieces = stream_pieces(tokenizer, prompt_style, prompt, token_ids)
        generated_text = tokenizer.decode(tokenizer.encode(prompt) + token_ids)
        assert "".join(pieces) == prompt_style.extract_response(generated_text, prompt)


def test_response_headers_are_what_extract_response_removes():
    assert chat.response_header(PROMPT_STYLES["alpaca"]) == "### Response:"
    assert chat.response_header(PROMPT_STYLES["phi3"]) == "<|assistant|>:"


#####################################
# generate_stream is generate, one token at a time
#####################################


@pytest.mark.parametrize(("temperature", "top_k", "eos_position"),
                         [(0.0, None, None), (0.0, None, 5), (1.5, 50, None), (1.0, None, 9)])
def test_generate_stream_yields_what_generate_appends(tiny_cfg, temperature, top_k,
                                                     eos_position):
    torch.manual_seed(0)
    model = GPTModel(tiny_cfg).eval()
    idx = torch.tensor([[15496, 11, 314, 716]])  # "Hello, I am"
    torch.manual_seed(1)
    free = generate(model, idx, 40, 32, temperature, top_k)[0, 4:].tolist()  # past the context
    eos = None if eos_position is None else free[eos_position]
    torch.manual_seed(1)
    expected = generate(model, idx, 40, 32, temperature, top_k, eos_id=eos)[0, 4:].tolist()
    torch.manual_seed(1)
    streamed = []
    for token_id in generate_stream(model, idx, 40, 32, temperature, top_k, eos_id=eos):
        assert torch.is_grad_enabled()  # no_grad holds inside the steps only
        streamed.append(token_id)
    assert streamed == expected
    assert len(streamed) == (40 if eos is None else free.index(eos))


def test_generate_stream_takes_one_prompt(tiny_cfg):
    model = GPTModel(tiny_cfg).eval()
    with pytest.raises(ValueError, match="generate_stream continues one prompt, got a batch of 2"):
        next(generate_stream(model, torch.zeros(2, 3, dtype=torch.long), 5, 32))


#####################################
# A person at a terminal
#####################################


def read_piece(fd):
    """The next bytes the program writes to its terminal (b"" once it has closed it)."""
    ready, _, _ = select.select([fd], [], [], PTY_TIMEOUT_S)
    assert ready, f"the program wrote nothing for {PTY_TIMEOUT_S} s"
    try:
        return os.read(fd, 4096)
    except OSError:  # Linux: the program has ended and the terminal is closed
        return b""


def read_until(fd, text):
    """Read the program's output until it ends with `text`; return what was read."""
    output = b""
    while not output.endswith(text):
        piece = read_piece(fd)
        assert piece, f"the program ended before writing {text!r}: {output[-400:]!r}"
        output += piece
    return output


def wait_until_waiting_for_input(pid):
    """Return once process `pid` sleeps, as it does blocked on reading its terminal.

    A Ctrl-C that lands after `input` has written its prompt but before it reads waits, in
    CPython, until the read returns; the test types Ctrl-C at a prompt only once it is read.
    """
    deadline = time.monotonic() + PTY_TIMEOUT_S
    while not subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True,
                             text=True, check=True).stdout.startswith("S"):
        assert time.monotonic() < deadline, f"process {pid} never waited for input"
        time.sleep(0.05)


def take_terminal():
    """In the child: make the terminal on its standard input its controlling terminal, so that
    Ctrl-C typed there interrupts it."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@pytest.fixture
def endless_model(tmp_path):
    """A random model whose vocabulary stops before <|endoftext|> (id 50256): it never ends an
    answer, so any answer lasts until --max_new_tokens or Ctrl-C."""
    cfg = {"vocab_size": 50256, "context_length": 256, "emb_dim": 16, "n_heads": 2,
           "n_layers": 1, "drop_rate": 0.0, "qkv_bias": False}
    path = tmp_path / "endless.pth"
    save_model(path, cfg)
    return path


def test_terminal_session_streams_stops_and_leaves(endless_model, tmp_path):
    controller, terminal = os.openpty()
    process = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "chat.py"), str(endless_model), "--device", "cpu",
         "--temperature", "1", "--max_new_tokens", "1000000"],
        stdin=terminal, stdout=terminal, stderr=terminal, cwd=tmp_path,
        start_new_session=True, preexec_fn=take_terminal)
    os.close(terminal)
    output = b""
    try:
        output += read_until(controller, b"Instruction: ")
        assert b'Ctrl-D or "exit" leaves' in output
        os.write(controller, b"Tell me a story.\n")
        output += read_until(controller, b"Input (Enter for none): ")
        os.write(controller, b"\n")  # no input
        answer = []  # the terminal's echo of Enter, then the answer in pieces as it is written
        while len(answer) < 4 or not b"".join(answer).strip():
            answer.append(read_piece(controller))
            assert answer[-1] and process.poll() is None
        os.write(controller, b"\x03")  # Ctrl-C during the answer stops it
        stopped = read_until(controller, b"Instruction: ")
        assert stopped.endswith(b"[answer stopped]\r\n\r\nInstruction: ")
        wait_until_waiting_for_input(process.pid)
        os.write(controller, b"\x03")  # Ctrl-C at the prompt gives a fresh one
        fresh = read_until(controller, b"Instruction: ")
        assert fresh.endswith(b"\r\nInstruction: ") and b"stopped" not in fresh
        os.write(controller, b"\x04")  # Ctrl-D leaves
        assert process.wait(timeout=PTY_TIMEOUT_S) == 0
        output += b"".join(answer) + stopped + fresh + read_piece(controller)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        os.close(controller)
    assert b"Traceback" not in output and b"Error" not in output


class FakeTerminal(io.StringIO):
    """Standard input that says it is a terminal; what is typed comes through `input`."""

    def isatty(self):
        return True


def test_terminal_session_reprompts_and_leaves_on_exit(tmp_path, tiny_cfg, capsys, monkeypatch):
    path = tmp_path / "model.pth"
    save_model(path, tiny_cfg)
    flags = ["--max_new_tokens", "10"]
    answer = ask(capsys, path, "--prompt", "Name a color.", "--input", "Blue or red.",
                 *flags)[1]
    typed = iter(["", "  Name a color.  ", " Blue or red. ", "Count.", KeyboardInterrupt,
                  "exit", "never asked"])
    prompts = []

    def type_next(prompt):
        prompts.append(prompt)
        line = next(typed)
        if line is KeyboardInterrupt:
            raise KeyboardInterrupt
        return line

    monkeypatch.setattr("builtins.input", type_next)
    code, out, err = ask(capsys, path, *flags, stdin=FakeTerminal(), monkeypatch=monkeypatch)
    assert (code, err) == (0, "")
    assert prompts == [chat.INSTRUCTION_PROMPT, chat.INSTRUCTION_PROMPT, chat.INPUT_PROMPT,
                       chat.INSTRUCTION_PROMPT, chat.INPUT_PROMPT, chat.INSTRUCTION_PROMPT]
    assert out == (f"Chatting with {path} (alpaca prompts, greedy, cpu).\nType an instruction, "
                   'then an input or Enter for none. Ctrl-C stops an answer; Ctrl-D or "exit" '
                   f"leaves.\n\n{answer}\n\n")


def test_missing_tokenizer_is_one_line(tmp_path, tiny_cfg, capsys, monkeypatch,
                                       tiktoken_offline):
    path = tmp_path / "model.pth"
    save_model(path, tiny_cfg)
    monkeypatch.chdir(tmp_path)  # no gpt2/ folder with GPT-2's vocabulary files here
    code, out, err = ask(capsys, path, "--prompt", "Name a color.")
    assert (code, out) == (2, "")
    assert_error(err, "GPT-2's tokenizer files are missing", "TIKTOKEN_CACHE_DIR")


#####################################
# Bad input: one line, exit 2, before the model is asked anything
#####################################


@pytest.mark.parametrize(("flags", "parts"), [
    (["--temperature", "-0.5"], ["--temperature must be a finite number, 0 or above, got -0.5"]),
    (["--temperature", "nan"], ["--temperature", "got nan"]),
    (["--top_k", "0"], ["--top_k must be at least 1, got 0"]),
    (["--top_k", "50258"], ["--top_k 50258: the model has only 50257 tokens"]),
    (["--max_new_tokens", "0"], ["--max_new_tokens must be at least 1, got 0"]),
    (["--seed", str(2**64)], ["--seed must be from"]),
    (["--lora_alpha", "inf"], ["--lora_alpha must be a finite number above 0, got inf"]),
    (["--lora_alpha", "0"], ["--lora_alpha must be a finite number above 0, got 0.0"]),
    (["--device", "tpu"], ["--device tpu: not a device"]),
    (["--prompt", "  "], ["--prompt is empty"]),
])
def test_bad_flags_are_refused(tmp_path, tiny_cfg, capsys, flags, parts):
    path = tmp_path / "model.pth"
    save_model(path, tiny_cfg)
    code, out, err = ask(capsys, path, "--prompt", "Name a color.", *flags)
    assert (code, out) == (2, "")
    assert_error(err, *parts)


def test_models_dir_gives_the_tokenizer_offline(tmp_path, tiny_cfg, tokenizer, capsys,
                                                tiktoken_offline, gpt2_vocab_dir, monkeypatch):
    """Without a network or tiktoken's cache the tokenizer comes from a GPT-2 download's files:
    in ./gpt2/<size>/ by default, or under --models_dir."""
    path = tmp_path / "model.pth"
    model = save_model(path, tiny_cfg)
    downloads = tmp_path / "downloads" / "355M"
    downloads.mkdir(parents=True)
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copyfile(gpt2_vocab_dir / name, downloads / name)
    monkeypatch.chdir(tmp_path)  # no ./gpt2 here
    entry = {"instruction": "Name a color.", "input": ""}
    code, out, err = ask(capsys, path, *prompt_flags(entry), "--max_new_tokens", "20")
    assert (code, out) == (2, "")
    assert_error(err, "GPT-2's tokenizer files are missing", "no folder gpt2/<size>")
    code, out, err = ask(capsys, path, *prompt_flags(entry), "--max_new_tokens", "20",
                         "--models_dir", str(tmp_path / "downloads"))
    assert (code, err) == (0, "")
    assert out == reference_answer(model, tokenizer, ALPACA, entry, 20, 32) + "\n"


def test_models_dir_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "gpt2").write_text("not a folder")
    code, out, err = ask(capsys, tmp_path / "model.pth", "--prompt", "Name a color.",
                         "--models_dir", str(tmp_path / "gpt2"))
    assert (code, out) == (2, "")
    assert_error(err, f"--models_dir {tmp_path}/gpt2: is a file, not a folder")


def test_input_without_prompt_is_refused(tmp_path, capsys):
    code, out, err = ask(capsys, tmp_path / "model.pth", "--input", "The cake.")
    assert (code, out) == (2, "")
    assert_error(err, "--input goes with --prompt")


def test_missing_or_damaged_pth_is_refused(tmp_path, capsys, tiny_cfg):
    code, out, err = ask(capsys, tmp_path / "missing.pth", "--prompt", "Name a color.")
    assert (code, out) == (2, "")
    assert_error(err, f"{tmp_path}/missing.pth: file not found")
    whole = io.BytesIO()
    torch.save(GPTModel(tiny_cfg).state_dict(), whole)
    for name, content in [("empty.pth", b""), ("foreign.pth", b"PK\x03\x04 not a .pth"),
                          ("text.pth", b"these are not weights"),
                          ("cut.pth", whole.getvalue()[:len(whole.getvalue()) // 2])]:
        damaged = tmp_path / name
        damaged.write_bytes(content)
        code, out, err = ask(capsys, damaged, "--prompt", "Name a color.")
        assert (code, out) == (2, "")
        assert_error(err, f"{damaged}: damaged or not a PyTorch weight file")


@pytest.mark.parametrize(("stdin", "parts"), [
    ("Name a color.\n{broken\n", ["standard input, line 2: starts with '{' but is not a JSON "
                                  "object"]),
    ('{"input": "x"}\n', ["standard input, line 1 has no 'instruction' field"]),
    ('{"instruction": " ", "input": "x"}\n', ["standard input, line 1: the instruction is empty"]),
    ('{"instruction": "Rewrite.", "input": 3}\n',
     ["line 1 field 'input' must be a string, got int"]),
    ("\n  \n", ["standard input holds no instruction"]),
    (io.TextIOWrapper(io.BytesIO(b"Name a color \xff\n"), encoding="utf-8"),
     ["standard input: not utf-8 text (invalid start byte)"]),
])
def test_bad_piped_lines_are_refused_before_loading(tmp_path, capsys, monkeypatch, stdin, parts):
    stream = io.StringIO(stdin) if isinstance(stdin, str) else stdin
    code, out, err = ask(capsys, tmp_path / "not-loaded-yet.pth", stdin=stream,
                         monkeypatch=monkeypatch)
    assert (code, out) == (2, "")
    assert_error(err, *parts)


def test_ctrl_c_outside_a_terminal_session_ends_with_one_line(tmp_path, tiny_cfg, capsys,
                                                             monkeypatch):
    path = tmp_path / "model.pth"
    save_model(path, tiny_cfg)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(chat, "generate_stream", interrupted)
    code, out, err = ask(capsys, path, "--prompt", "Name a color.")
    assert (code, out) == (130, "")
    assert err == "\nStopped by Ctrl-C; run chat.py again to ask more.\n"
