"""exercise_experiments.py: the Phi-3 prompt, instruction masking, Alpaca 52k, LoRA, the CLI."""

import json
import os
import subprocess
import sys
from functools import partial

import pytest
import torch
import torch.nn as nn
from helpers import run_script as run_any_script

import exercise_experiments as ex
import gpt_instruction_finetuning as ft
import lora
from kit.saved_model import load_finetuned_model
from previous_chapters import GPTModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WITH_INPUT = {"instruction": "Identify the correct spelling of the following word.",
              "input": "Ocassion", "output": "The correct spelling is 'Occasion.'"}
NO_INPUT = {"instruction": "What is an antonym of 'complicated'?", "input": "",
            "output": "An antonym of 'complicated' is 'simple'."}


run_script = partial(run_any_script, "exercise_experiments.py")  # as a user runs it


def parse(*argv):
    return ex.build_exercise_parser().parse_args(list(argv))


#####################################
# Exercise 7.1: Phi-3 prompt
#####################################


def test_phi3_prompt_strings():
    phi3 = ex.Phi3Prompt()
    assert phi3.format_input(WITH_INPUT) == (
        "<|user|>\nIdentify the correct spelling of the following word.\nOcassion")
    assert phi3.format_input(NO_INPUT) == "<|user|>\nWhat is an antonym of 'complicated'?"
    assert phi3.format_response(NO_INPUT) == (
        "\n<|assistant|>:\nAn antonym of 'complicated' is 'simple'.")
    prompt = phi3.format_input(NO_INPUT)
    generated = prompt + "\n<|assistant|>:\nThe antonym is 'simple'.\n"
    assert phi3.extract_response(generated, prompt) == "The antonym is 'simple'."


def test_phi3_savings_are_computed_on_the_data(tokenizer, capsys):
    assert len(tokenizer.encode("<|user|>")) == 5  # ordinary text for GPT-2: <, |, user, |, >
    data = [WITH_INPUT, NO_INPUT]
    alpaca = [len(tokenizer.encode(ft.format_input(e) + f"\n\n### Response:\n{e['output']}"))
              for e in data]
    phi3 = [len(tokenizer.encode(ex.Phi3Prompt().format_input(e)
                                 + ex.Phi3Prompt().format_response(e))) for e in data]
    a, p = sum(alpaca) / 2, sum(phi3) / 2
    assert a > p
    ex.report_token_savings(data, tokenizer)
    assert capsys.readouterr().out == (f"Phi-3 prompt saves {a - p:.1f} tokens per entry on "
                                       f"average (Alpaca {a:.1f}, Phi-3 {p:.1f})\n")


#####################################
# Exercise 7.2: masking the instruction
#####################################


def test_masked_targets_leave_only_the_response(tokenizer):
    dataset = ex.InstructionDatasetWithPromptLength([WITH_INPUT, NO_INPUT], tokenizer)
    batch = [dataset[0], dataset[1]]
    for (prompt_length, tokens), entry in zip(batch, [WITH_INPUT, NO_INPUT], strict=True):
        assert prompt_length == len(tokenizer.encode(ft.format_input(entry)))
        assert tokens == tokenizer.encode(ft.format_input(entry)
                                          + ft.ALPACA.format_response(entry))
    inputs, targets = ex.collate_masking_instructions(batch)
    plain_inputs, plain_targets = ft.custom_collate_fn([tokens for _, tokens in batch])
    assert torch.equal(inputs, plain_inputs)
    for row, entry in enumerate([WITH_INPUT, NO_INPUT]):
        prompt_length = batch[row][0]
        assert (targets[row, :prompt_length - 1] == -100).all()
        assert torch.equal(targets[row, prompt_length - 1:], plain_targets[row, prompt_length - 1:])
        kept = [t for t in targets[row].tolist() if t != -100]
        assert tokenizer.decode(kept) == ft.ALPACA.format_response(entry) + "<|endoftext|>"


def test_masking_still_truncates(tokenizer):
    dataset = ex.InstructionDatasetWithPromptLength([WITH_INPUT], tokenizer)
    prompt_length, tokens = dataset[0]
    inputs, targets = ex.collate_masking_instructions([dataset[0]],
                                                      allowed_max_length=prompt_length + 3)
    assert inputs.shape == targets.shape == (1, prompt_length + 3)
    assert inputs[0].tolist() == tokens[:prompt_length + 3]
    kept = [t for t in targets[0].tolist() if t != -100]
    assert kept == tokens[prompt_length:prompt_length + 4]  # the first 4 response tokens


#####################################
# Exercise 7.4: LoRA
#####################################


def test_lora_starts_as_the_original_and_counts_its_parameters(tiny_cfg, capsys):
    torch.manual_seed(0)
    original = GPTModel(tiny_cfg).eval()
    wrapped = GPTModel(tiny_cfg).eval()
    wrapped.load_state_dict(original.state_dict())
    ex.add_lora(wrapped, rank=4, alpha=8)
    idx = torch.randint(0, tiny_cfg["vocab_size"], (2, 7))
    assert torch.equal(wrapped(idx), original(idx))
    linears = [m for m in original.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 6 * tiny_cfg["n_layers"] + 1  # q, k, v, out, two MLP; the head
    expected = sum(4 * (m.in_features + m.out_features) for m in linears)
    assert lora.count_trainable(wrapped) == expected
    total = sum(p.numel() for p in original.parameters())
    assert capsys.readouterr().out.splitlines() == [
        f"Total trainable parameters before: {total:,}",
        "Total trainable parameters after: 0",
        f"Total trainable LoRA parameters: {expected:,}"]


#####################################
# The command line
#####################################


def test_experiments_change_what_their_exercise_needs():
    args = parse()
    names = {option: ex.build_experiment([option], args).name for option in ex.EXERCISES}
    assert names == {"baseline": "baseline", "mask_instructions": "mask-instructions",
                     "alpaca_52k": "alpaca52k", "phi3_prompt": "phi3-prompt", "lora": "lora"}
    assert ex.build_experiment(["baseline"], args) == ft.Experiment(name="baseline")
    alpaca = ex.build_experiment(["alpaca_52k"], args)
    assert (alpaca.data_file, alpaca.data_url, alpaca.batch_size, alpaca.allowed_max_length) == (
        "alpaca_data.json",
        "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json", 4, 512)
    assert ex.build_experiment(["lora"], args).finish_model is None
    assert ex.build_experiment(["lora"], parse("--merge_lora")).finish_model is lora.merge_lora
    combined = ex.build_experiment(ex.parse_exercises("lora, alpaca_52k,baseline"), args)
    assert combined.name == "alpaca52k_lora"
    assert combined.batch_size == 4 and combined.prepare_model.keywords == {"rank": 16,
                                                                            "alpha": 16}
    assert ex.parse_exercises("baseline") == ["baseline"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--exercise_solution", "lora,foo"], "unknown exercise 'foo'; choose from baseline, "
                                          "mask_instructions, alpaca_52k, phi3_prompt, lora"),
    (["--merge_lora"], "--merge_lora needs the lora exercise (--exercise_solution lora)"),
    (["--exercise_solution", "lora", "--lora_rank", "0"], "--lora_rank must be at least 1, got 0"),
])
def test_bad_choices_give_one_line_and_exit_2(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        ex.run_exercises([*argv, "--test_mode", "--output_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr() == ("", f"Error: {message}\n")
    assert list(tmp_path.iterdir()) == []


def test_refused_combination_through_the_command_line(tmp_path):
    result = run_script("--exercise_solution", "phi3_prompt,mask_instructions", "--test_mode",
                        cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        "Error: mask_instructions cannot be combined with phi3_prompt: exercises 7.1 and 7.2 are "
        "each compared with the Alpaca-prompt baseline; run them one at a time\n")
    assert list(tmp_path.iterdir()) == []


def test_help_shows_usage_and_the_exercise_flags():
    text = ex.build_exercise_parser().format_help()
    for flag in ["--exercise_solution", "--lora_rank", "--lora_alpha", "--merge_lora",
                 "--test_mode", "--model", "--epochs", "--batch_size"]:
        assert flag in text
    assert "python exercise_experiments.py --exercise_solution lora,alpaca_52k" in text
    assert "\nexercises:\n  --exercise_solution" in text
    assert text.index("\nresume and outputs:\n") < text.index("\nexercises:\n")
    args = parse()
    assert (args.exercise_solution, args.lora_rank, args.lora_alpha, args.merge_lora) == (
        "baseline", 16, 16, False)


#####################################
# Whole runs in test mode
#####################################


def check_outputs(folder, name):
    """Check the plot and the responses of run `name`; return the saved weights."""
    assert (folder / f"loss-plot-{name}.pdf").read_bytes().startswith(b"%PDF")
    responses = json.loads((folder / f"instruction-data-with-response-{name}.json").read_text())
    assert responses and all(isinstance(e["model_response"], str) for e in responses)
    return torch.load(folder / f"Smalltestmodel-sft-{name}.pth", weights_only=True)


def lora_count(rank):
    """Trainable parameters of the test model with LoRA: rank * (in + out) per linear layer."""
    linears = [m for m in GPTModel(ft.TEST_MODE_CONFIG).modules() if isinstance(m, nn.Linear)]
    return sum(rank * (m.in_features + m.out_features) for m in linears)


@pytest.mark.parametrize(("option", "name"), [
    ("baseline", "baseline"), ("mask_instructions", "mask-instructions"),
    ("phi3_prompt", "phi3-prompt"), ("lora", "lora")])
def test_each_experiment_end_to_end(tmp_path, instruction_data_path, option, name):
    result = run_script("--exercise_solution", option, "--test_mode",
                        "--data_path", str(instruction_data_path), "--output_dir", str(tmp_path),
                        "--epochs", "1", "--eval_iter", "1", "--max_new_tokens", "5",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"Model saved as {tmp_path}/Smalltestmodel-sft-{name}.pth" in lines
    state = check_outputs(tmp_path, name)
    model = GPTModel(ft.TEST_MODE_CONFIG)
    if option == "lora":  # not merged: the LoRA matrices are saved beside the frozen weights
        assert f"Total trainable LoRA parameters: {lora_count(16):,}" in lines
        assert "out_head.lora.B" in state
        lora.replace_linear_with_lora(model, rank=16, alpha=16)
    model.load_state_dict(state)  # strict: every weight present, nothing extra
    loaded, info, prompt_style = load_finetuned_model(
        str(tmp_path / f"Smalltestmodel-sft-{name}.pth"))  # rebuilt from the JSON beside it
    assert (info["experiment"], prompt_style.name) == (
        name, "phi3" if option == "phi3_prompt" else "alpaca")
    idx = torch.randint(0, 50257, (1, 6))
    assert torch.equal(loaded(idx), model.eval()(idx))
    if option == "lora":
        assert (info["settings"]["--lora_rank"], info["settings"]["--lora_alpha"]) == (16, 16)
        assert info["config"] == {**ft.TEST_MODE_CONFIG, "lora": {"rank": 16, "alpha": 16}}
    if option == "phi3_prompt":
        # over all 1100 entries, not only the few that test mode trains on
        assert ("Phi-3 prompt saves 17.5 tokens per entry on average "
                "(Alpaca 56.4, Phi-3 38.9)") in lines
        responses = json.loads((tmp_path / "instruction-data-with-response-phi3-prompt.json")
                               .read_text())
        assert all("<|assistant|>:" not in e["model_response"] for e in responses)


def test_alpaca_52k_file_with_merged_lora(tmp_path):
    """The Alpaca path on a small Alpaca-format file, combined with LoRA saved merged."""
    entries = [{"instruction": f"Write the number {i} in words.",
                "input": "" if i % 2 else f"{i}", "output": f"Number {i}."} for i in range(40)]
    entries[3]["output"] = "Three, " * 100  # longer than the test model's context: truncated
    (tmp_path / "alpaca_data.json").write_text(json.dumps(entries))  # found: no download
    result = run_script("--exercise_solution", "alpaca_52k,lora", "--merge_lora",
                        "--lora_rank", "4", "--test_mode", "--epochs", "1", "--eval_iter", "1",
                        "--max_new_tokens", "5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # 40 entries split 85/10/5 are 34/4/2; test mode keeps at most 10 of each.
    for expected in ["Training set length: 10", "Validation set length: 2", "Test set length: 4",
                     "Warning: 1 of 10 training entries are longer than 120 tokens and will be "
                     "truncated", f"Total trainable LoRA parameters: {lora_count(4):,}"]:
        assert expected in result.stdout.splitlines()
    state = check_outputs(tmp_path, "alpaca52k_lora")
    GPTModel(ft.TEST_MODE_CONFIG).load_state_dict(state)  # merged: a plain GPTModel's weights
    responses = json.loads((tmp_path / "instruction-data-with-response-alpaca52k_lora.json")
                           .read_text())
    assert [e["instruction"] for e in responses] == [e["instruction"] for e in entries[34:38]]


def trained_lora_model(rank, alpha):
    """The test model with LoRA layers whose update is no longer zero, as after training."""
    torch.manual_seed(0)
    model = GPTModel(ft.TEST_MODE_CONFIG)
    lora.replace_linear_with_lora(model, rank=rank, alpha=alpha)
    for name, param in model.named_parameters():
        if name.endswith(".lora.B"):
            nn.init.normal_(param)
    return model


def test_unmerged_lora_pth_without_json_needs_its_alpha_and_loads_with_its_rank(tmp_path):
    model = trained_lora_model(rank=4, alpha=16)
    torch.save(model.state_dict(), tmp_path / "lora.pth")
    with pytest.raises(ft.DataError, match="pass --lora_alpha"):
        load_finetuned_model(str(tmp_path / "lora.pth"))
    loaded, info, prompt_style = load_finetuned_model(str(tmp_path / "lora.pth"),
                                                                      lora_alpha=16)
    assert prompt_style.name == "alpaca" and "settings" not in info
    idx = torch.randint(0, 50257, (1, 6))
    assert torch.equal(loaded(idx), model.eval()(idx))


def test_lora_alpha_is_read_from_the_saved_config(tmp_path):
    model = trained_lora_model(rank=2, alpha=3.5)
    info = {"config": {**ft.TEST_MODE_CONFIG, "lora": lora.lora_config(model)},
            "prompt_style": "alpaca"}
    ft.save_finetuned_model(model, str(tmp_path / "m.pth"), info)
    loaded, saved_info, _ = load_finetuned_model(str(tmp_path / "m.pth"))
    assert saved_info["config"]["lora"] == {"rank": 2, "alpha": 3.5}
    idx = torch.randint(0, 50257, (1, 6))
    assert torch.equal(loaded(idx), model.eval()(idx))


@pytest.mark.parametrize("module", ["gpt_instruction_finetuning", "lora", "ollama_evaluate",
                                    "previous_chapters", "kit.chapter_training", "gpt_download"])
def test_no_module_imports_the_exercises(module):
    code = f"import sys, {module}; print('exercise_experiments' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            timeout=120)
    assert result.stdout == "False\n", result.stderr
