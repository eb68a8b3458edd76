"""The three notebooks run top to bottom in the small setting, and their committed outputs
come only from cells that do not depend on model weights or a judge."""

import json
import os
import shutil
import socket

import nbformat
import pytest
import torch
from nbclient import NotebookClient

from gpt_instruction_finetuning import TEST_MODE_CONFIG, save_finetuned_model
from previous_chapters import GPTModel
from tests.conftest import REPO, SHARED_DATA

REAL = "real-output"
NOTEBOOKS = ["ch07.ipynb", "exercise-solutions.ipynb", "load-finetuned-model.ipynb"]


def outputs_text(cell):
    """Everything a code cell printed or displayed as text."""
    parts = []
    for output in cell.get("outputs", []):
        parts.append(output.get("text", ""))
        parts.append(str(output.get("data", {}).get("text/plain", "")))
    return "".join(parts)


def ollama_port_free():
    """True when nothing listens on Ollama's default port here."""
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", 11434)) != 0


def kernel_pythonpath():
    """PYTHONPATH for the kernel: it runs in a scratch folder and imports the repo's modules."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)


def execute(name, folder):
    """Run notebook `name` top to bottom with `folder` as the kernel's working folder."""
    nb = nbformat.read(REPO / name, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(folder)}}).execute()
    return nb


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebooks executed in order with CH07_SMALL=1 in one scratch folder:
    (folder, {name: executed notebook})."""
    folder = tmp_path_factory.mktemp("notebooks")
    env = {"CH07_SMALL": "1", "PYTHONPATH": kernel_pythonpath()}
    data = SHARED_DATA / "instruction-data.json"
    if data.exists():
        env["CH07_DATA"] = str(data)
    with pytest.MonkeyPatch.context() as mp:  # the kernel inherits this process's environment
        mp.delenv("CH07_MODEL", raising=False)  # the notebooks' default files
        for key, value in env.items():
            mp.setenv(key, value)
        results = {name: execute(name, folder) for name in NOTEBOOKS}
    yield folder, results
    shutil.rmtree(folder, ignore_errors=True)


def all_text(nb):
    """The text output of all code cells of `nb`."""
    return "\n".join(outputs_text(cell) for cell in nb.cells if cell.cell_type == "code")


def test_ch07_runs_in_the_small_setting(executed):
    folder, results = executed
    text = all_text(results["ch07.ipynb"])
    assert "Training set length: 935\nValidation set length: 55\nTest set length: 110" in text
    assert text.count("same batch: True") == 2  # the notebook's draft is the script's function
    assert "torch.Size([8, 61]) torch.Size([8, 61])" in text  # the first shuffled batch
    assert "Loaded model: Small test model" in text
    assert "Training completed in " in text
    assert (folder / "loss-plot.pdf").read_bytes().startswith(b"%PDF")
    responses = json.loads((folder / "instruction-data-with-response.json").read_text())
    assert len(responses) == 10 and all("model_response" in e for e in responses)
    assert (folder / "Smalltestmodel-sft.pth").exists()
    info = json.loads((folder / "Smalltestmodel-sft.json").read_text())  # saved beside it
    assert info["config"] == TEST_MODE_CONFIG and info["prompt_style"] == "alpaca"
    assert info["model_name"] == "Small test model" and info["tokens_seen"] > 0
    if ollama_port_free():
        assert "Ollama running: False" in text
        assert text.count("Skipping the evaluation: Ollama is not running at "
                          "http://localhost:11434") == 2


def test_exercise_solutions_run_in_the_small_setting(executed):
    text = all_text(executed[1]["exercise-solutions.ipynb"])
    assert "<|user|>\nIdentify the correct spelling of the following word.\nOcassion" in text
    assert "Phi-3 prompt saves " in text
    assert "Total trainable parameters after: 0" in text
    assert "Batch size: 4 | allowed_max_length: 512" in text


def test_load_finetuned_model_runs_in_the_small_setting(executed):
    folder, results = executed
    text = all_text(results["load-finetuned-model.ipynb"])
    # ch07.ipynb ran first in the same folder and saved its tiny finetuned model there
    assert "Loaded Smalltestmodel-sft.pth" in text
    assert "From Smalltestmodel-sft.json:\nModel: Small test model\n" in text
    assert "Experiment: ch07.ipynb | epochs: 1 | seed: 123" in text
    assert "Prompt style: alpaca" in text
    assert "### Instruction:\nRewrite the sentence using a passive voice." in text
    assert "Response: " in text


def test_load_finetuned_model_saves_a_tiny_model_when_none_exists(tmp_path, monkeypatch):
    """Alone in an empty folder, the small setting writes its own tiny model and answers."""
    monkeypatch.setenv("CH07_SMALL", "1")
    monkeypatch.delenv("CH07_MODEL", raising=False)
    monkeypatch.setenv("PYTHONPATH", kernel_pythonpath())
    text = all_text(execute("load-finetuned-model.ipynb", tmp_path))
    assert "Saved a tiny random model as Smalltestmodel-sft-standalone.pth" in text
    assert "Loaded Smalltestmodel-sft-standalone.pth" in text
    assert "Response: " in text
    assert (tmp_path / "Smalltestmodel-sft-standalone.pth").exists()
    assert (tmp_path / "Smalltestmodel-sft-standalone.json").exists()


def execute_load_notebook(folder, model_path, monkeypatch):
    """Run load-finetuned-model.ipynb on `model_path` (through CH07_MODEL); its text output."""
    monkeypatch.setenv("CH07_SMALL", "1")
    monkeypatch.setenv("CH07_MODEL", str(model_path))
    monkeypatch.setenv("PYTHONPATH", kernel_pythonpath())
    return all_text(execute("load-finetuned-model.ipynb", folder))


def test_load_finetuned_model_asks_a_phi3_finetune_in_the_phi3_format(tmp_path, monkeypatch):
    """The JSON beside the weights decides the prompt and the model: a Phi-3-prompt finetune
    with a config the shapes alone cannot tell (3 heads instead of the test model's 2)."""
    config = {**TEST_MODE_CONFIG, "n_heads": 3, "n_layers": 2}
    path = tmp_path / "models" / "Smalltestmodel-sft-phi3-prompt.pth"
    torch.manual_seed(1)
    save_finetuned_model(GPTModel(config), str(path), {
        "model_name": "Small test model", "config": config, "prompt_style": "phi3",
        "experiment": "phi3-prompt", "epochs": 1, "seed": 123, "tokens_seen": 592,
        "train_loss": 10.5, "val_loss": 10.75, "settings": {}})
    text = execute_load_notebook(tmp_path, path, monkeypatch)
    assert f"Loaded {path}" in text
    assert "Model: Small test model\nExperiment: phi3-prompt | epochs: 1 | seed: 123" in text
    assert "Tokens seen: 592\nLast losses: train 10.500, val 10.750" in text
    assert "Prompt style: phi3" in text
    assert "'n_heads': 3" in text and "'n_layers': 2" in text
    assert "<|user|>\nRewrite the sentence using a passive voice.\nThe chef cooks" in text
    assert "### Instruction" not in text
    assert "Response: " in text


def test_load_finetuned_model_loads_a_bare_pth_with_the_chapters_defaults(tmp_path,
                                                                          monkeypatch):
    """Weights alone, as the book saves them: config from the shapes, the Alpaca prompt."""
    config = {**TEST_MODE_CONFIG, "qkv_bias": True, "context_length": 64}
    path = tmp_path / "book-sft.pth"
    torch.manual_seed(2)
    torch.save(GPTModel(config).state_dict(), path)
    text = execute_load_notebook(tmp_path, path, monkeypatch)
    assert f"Loaded {path}" in text
    assert f"No {tmp_path / 'book-sft.json'} beside the weights: the chapter's defaults" in text
    assert "Prompt style: alpaca" in text
    assert "'context_length': 64" in text and "'qkv_bias': True" in text
    assert "### Instruction:\nRewrite the sentence using a passive voice." in text
    assert "Response: " in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["book-sft.pth"]  # nothing written


def test_load_finetuned_model_says_what_to_run_without_a_model(tmp_path, monkeypatch):
    """In the real setting with no saved model, the notebook names the script and runs on."""
    monkeypatch.delenv("CH07_SMALL", raising=False)
    monkeypatch.delenv("CH07_MODEL", raising=False)
    monkeypatch.setenv("PYTHONPATH", kernel_pythonpath())
    text = all_text(execute("load-finetuned-model.ipynb", tmp_path))
    assert "Run `python gpt_instruction_finetuning.py` first" in text
    assert "No model loaded" in text
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_outputs_come_only_from_data_cells(name):
    """Only cells tagged real-output keep outputs; none of them uses weights, the judge or
    the small setting's random model, and none shows a figure."""
    nb = nbformat.read(REPO / name, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        tagged = REAL in cell.metadata.get("tags", [])
        if cell.outputs:
            assert tagged, f"{name} cell {i} has outputs but is not a data cell"
        if tagged:  # data cells never touch model weights or the judge
            for marker in ("load_weights_into_gpt", "train_model_simple", "generate(",
                           "query_model", "torch.load", "generate_responses"):
                assert marker not in cell.source, f"{name} cell {i} uses {marker}"
        for output in cell.outputs:
            assert output.output_type == "stream", f"{name} cell {i} keeps a {output.output_type}"
        text = outputs_text(cell)
        for marker in ("Small test model", "Smalltestmodel", "tiny random model"):
            assert marker not in text, f"{name} cell {i} shows output of the small setting"


def test_committed_outputs_are_the_real_setting():
    """The stored outputs come from the chapter's dataset and GPT-2 medium's shape."""
    text = all_text(nbformat.read(REPO / "ch07.ipynb", as_version=4))
    assert "Number of entries: 1100" in text
    assert "Training set length: 935\nValidation set length: 55\nTest set length: 110" in text
    assert "Train loader:\ntorch.Size([8, 61]) torch.Size([8, 61])" in text
    assert text.count("torch.Size([8, ") == 2 * (935 // 8)  # every training batch, both tensors
    text = all_text(nbformat.read(REPO / "exercise-solutions.ipynb", as_version=4))
    assert "Total trainable parameters before: 406,286,336" in text  # GPT-2 medium
    assert "Total trainable LoRA parameters: 7,898,384" in text
