"""exercise_experiments.py: Phi-3 prompt, instruction masking, Alpaca 52k, LoRA, the CLI."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import exercise_experiments as ex
import gpt_instruction_finetuning as ft
from previous_chapters import GPTModel, calc_loss_batch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WITH_INPUT = {"instruction": "Rewrite the sentence.", "input": "It is fast.",
              "output": "It is quick."}
NO_INPUT = {"instruction": "Name a color.", "input": "", "output": "Blue."}


def run_exercise(*args, cwd):
    return subprocess.run([sys.executable, os.path.join(REPO, "exercise_experiments.py"), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


def test_phi3_prompt_strings():
    phi3 = ex.Phi3Prompt()
    assert phi3.format_input(WITH_INPUT) == "<|user|>\nRewrite the sentence.\nIt is fast."
    assert phi3.format_input(NO_INPUT) == "<|user|>\nName a color."
    assert phi3.format_response(NO_INPUT) == "\n<|assistant|>:\nBlue."
    prompt = phi3.format_input(NO_INPUT)
    assert phi3.extract_response(prompt + "\n<|assistant|>:\n Red. ", prompt) == "Red."


def test_phi3_saves_tokens(tokenizer, capsys):
    ex.report_token_savings([WITH_INPUT, NO_INPUT], tokenizer)
    alpaca = sum(len(tokenizer.encode(ft.format_input(e) + ft.ALPACA.format_response(e)))
                 for e in (WITH_INPUT, NO_INPUT)) / 2
    phi3 = sum(len(tokenizer.encode(ex.Phi3Prompt().format_input(e)
                                    + ex.Phi3Prompt().format_response(e)))
               for e in (WITH_INPUT, NO_INPUT)) / 2
    assert len(tokenizer.encode("<|user|>")) > 1  # GPT-2 has no such special token
    assert alpaca > phi3
    assert capsys.readouterr().out == (f"Phi-3 prompt saves {alpaca - phi3:.1f} tokens per entry "
                                       f"on average (Alpaca {alpaca:.1f}, Phi-3 {phi3:.1f})\n")


def test_masked_targets_cover_only_the_response(tokenizer):
    dataset = ex.InstructionDatasetWithPromptLength([WITH_INPUT, NO_INPUT], tokenizer, ft.ALPACA)
    batch = [dataset[0], dataset[1]]
    assert batch[1][0] == len(tokenizer.encode(ft.format_input(NO_INPUT)))
    inputs, targets = ex.collate_masking_instructions(batch)
    plain_inputs, plain_targets = ft.custom_collate_fn([tokens for _, tokens in batch])
    assert torch.equal(inputs, plain_inputs)
    for row, entry in enumerate([WITH_INPUT, NO_INPUT]):
        kept = [t for t in targets[row].tolist() if t != -100]
        assert tokenizer.decode(kept) == (ft.ALPACA.format_response(entry)
                                          + "<|endoftext|>")
        prompt_length = batch[row][0]
        assert (targets[row, :prompt_length - 1] == -100).all()
        assert torch.equal(targets[row, prompt_length - 1:], plain_targets[row, prompt_length - 1:])


def test_masking_still_truncates(tokenizer):
    dataset = ex.InstructionDatasetWithPromptLength([WITH_INPUT], tokenizer, ft.ALPACA)
    inputs, targets = ex.collate_masking_instructions([dataset[0]], allowed_max_length=10)
    assert inputs.shape == targets.shape == (1, 10)
    assert (targets == -100).all()  # the first 10 targets all lie inside the prompt


@pytest.fixture
def tiny_lora(tiny_cfg):
    torch.manual_seed(0)
    model = GPTModel(tiny_cfg).eval()
    original = GPTModel(tiny_cfg).eval()
    original.load_state_dict(model.state_dict())
    ex.add_lora(model, rank=4, alpha=8)
    return model, original


def test_lora_starts_as_the_original_model(tiny_lora, tiny_cfg):
    model, original = tiny_lora
    idx = torch.randint(0, 50257, (2, 9))
    assert torch.equal(model(idx), original(idx))
    linears = [m for m in original.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 6 * tiny_cfg["n_layers"] + 1  # q, k, v, out, 2 MLP; the head
    assert ex.count_trainable(model) == sum(4 * (m.in_features + m.out_features)
                                            for m in linears)


def test_lora_prints_the_counts(tiny_cfg, capsys):
    torch.manual_seed(0)
    model = GPTModel(tiny_cfg)
    total = sum(p.numel() for p in model.parameters())
    ex.add_lora(model, rank=16, alpha=16)
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora." in n)
    assert capsys.readouterr().out.splitlines() == [
        f"Total trainable parameters before: {total:,}",
        "Total trainable parameters after: 0",
        f"Total trainable LoRA parameters: {lora:,}"]


def test_only_lora_parameters_get_gradients(tiny_lora):
    model, _ = tiny_lora
    model.train()
    inputs = torch.randint(0, 50257, (2, 9))
    calc_loss_batch(inputs, torch.roll(inputs, -1, dims=1), model, "cpu").backward()
    for name, param in model.named_parameters():
        if ".lora." in name:
            assert param.requires_grad
            if name.endswith(".B"):
                assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert not param.requires_grad and param.grad is None, name


def test_merged_model_gives_the_wrapped_logits(tiny_lora, tiny_cfg):
    model, _ = tiny_lora
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".B"):
                param.normal_(0, 0.05)  # as if trained
    idx = torch.randint(0, 50257, (2, 9))
    wrapped = model(idx)
    merged = ex.merge_lora(model)
    assert not any(isinstance(m, ex.LinearWithLoRA) for m in merged.modules())
    plain = GPTModel(tiny_cfg).eval()
    plain.load_state_dict(merged.state_dict())  # strict: a plain GPTModel's keys
    assert torch.allclose(plain(idx), wrapped, atol=1e-5)


def test_experiment_names_and_changes():
    args = ex.build_exercise_parser().parse_args([])
    assert [ex.build_experiment([n], args).name for n in ex.EXERCISES] == [
        "baseline", "mask-instructions", "alpaca52k", "phi3-prompt", "lora"]
    alpaca = ex.build_experiment(["alpaca_52k"], args)
    assert (alpaca.batch_size, alpaca.allowed_max_length, alpaca.data_file) == (
        4, 512, "alpaca_data.json")
    assert alpaca.data_url == ex.ALPACA_URL
    combined = ex.build_experiment(["lora", "alpaca_52k"], args)
    assert combined.name == "lora-alpaca52k" and combined.prepare_model is not None


@pytest.mark.parametrize(("choice", "message"), [
    ("mask_instructions,phi3_prompt", "mask_instructions cannot be combined with phi3_prompt: "
                                      "the masking exercise is defined on the Alpaca prompt; "
                                      "run them one at a time"),
    ("foo", "unknown exercise 'foo'; choose from baseline, mask_instructions, alpaca_52k, "
            "phi3_prompt, lora"),
])
def test_refused_choices(tmp_path, choice, message):
    result = run_exercise("--exercise_solution", choice, "--test_mode", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == f"Error: {message}\n"
    assert list(tmp_path.iterdir()) == []


def test_alpaca_format_file(tmp_path):
    entries = [{"instruction": f"Say {i}.", "input": "" if i % 3 else f"n={i}",
                "output": f"{i}"} for i in range(40)]
    (tmp_path / "alpaca_data.json").write_text(json.dumps(entries))
    result = run_exercise("--exercise_solution", "alpaca_52k", "--data_path", "alpaca_data.json",
                          "--epochs", "1", "--max_new_tokens", "3", "--test_mode", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Training set length: 10" in result.stdout  # test mode keeps 10 of the 34
    responses = json.loads((tmp_path / "instruction-data-with-response-alpaca52k.json")
                           .read_text())
    assert [e["instruction"] for e in responses] == [f"Say {i}." for i in range(34, 38)]
    assert (tmp_path / "loss-plot-alpaca52k.pdf").exists()
    # 40 entries split 85/10/5: 34 for training, 4 for testing, 2 for validation
    assert ft.split_data(entries)[1] == entries[34:38]


@pytest.mark.parametrize("choice", ["baseline", "phi3_prompt", "mask_instructions", "lora"])
def test_each_experiment_end_to_end(tmp_path, instruction_data_path, choice):
    extra = ["--merge_lora"] if choice == "lora" else []
    result = run_exercise("--exercise_solution", choice, "--test_mode", "--data_path",
                          str(instruction_data_path), "--max_new_tokens", "5",
                          "--output_dir", str(tmp_path), *extra, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    name = ex.build_experiment([choice], ex.build_exercise_parser().parse_args([])).name
    assert (tmp_path / f"loss-plot-{name}.pdf").read_bytes().startswith(b"%PDF")
    responses = json.loads((tmp_path / f"instruction-data-with-response-{name}.json").read_text())
    assert len(responses) == 10 and all("model_response" in e for e in responses)
    state = torch.load(tmp_path / f"Smalltestmodel-sft-{name}.pth", weights_only=True)
    GPTModel(ft.TEST_MODE_CONFIG).load_state_dict(state)  # strict, LoRA merged back
    if choice == "phi3_prompt":
        assert "Phi-3 prompt saves " in result.stdout
    if choice == "lora":
        assert "Total trainable parameters after: 0" in result.stdout
