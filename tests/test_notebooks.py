"""The three notebooks run top to bottom in the small setting and offline, their checks catch a
notebook whose code drifts from the scripts' and stay out of the chapter's story, and their stored
outputs are those of a fresh run.

Only cells tagged real-output keep their outputs in the repository: cells that need nothing but
the dataset (figures included). After changing such a cell, store its fresh outputs with

    TIKTOKEN_CACHE_DIR=../shared/data/tiktoken-cache python tests/test_notebooks.py
"""

import base64
import io
import json
import os
import re
import shutil
import socket
import sys
from pathlib import Path

import matplotlib.image
import nbformat
import numpy as np
import pytest
import torch
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also when run as a script

from gpt_instruction_finetuning import generate_responses  # noqa: E402
from kit.files import atomic_write  # noqa: E402
from kit.saved_model import TEST_MODE_CONFIG, load_finetuned_model, save_finetuned_model  # noqa: E402
from previous_chapters import GPTModel  # noqa: E402
from tests.conftest import REPO, SHARED_DATA  # noqa: E402

REAL = "real-output"
NOTEBOOKS = ["ch07.ipynb", "exercise-solutions.ipynb", "load-finetuned-model.ipynb"]
# The settings the stored outputs come from. They are the real setting's: ch07's data cells do
# not depend on the setting, so the small one runs them in seconds, while the exercise
# notebook's LoRA counts are those of GPT-2 medium's shape.
STORE_ENV = {"ch07.ipynb": {"CH07_SMALL": "1"}, "exercise-solutions.ipynb": {},
             "load-finetuned-model.ipynb": {"CH07_SMALL": "1"}}
MAX_NOTEBOOK_BYTES = 1_500_000
CHOICE_LINE = 'MODEL_PATH = os.environ.get("CH07_MODEL")'  # load-finetuned-model's choice


def outputs_text(cell):
    """Everything a code cell printed or displayed as text."""
    parts = []
    for output in cell.get("outputs", []):
        parts.append(output.get("text", ""))
        parts.append(str(output.get("data", {}).get("text/plain", "")))
    return "".join(parts)


def shown(cell):
    """A cell's outputs as a list of ("text", str) and ("image", pixels), stream chunks of the
    same stream joined (how a stream is cut into outputs varies from run to run)."""
    items = []
    for output in cell.get("outputs", []):
        if output["output_type"] == "stream":
            label = f"stream {output['name']}"
            if items and items[-1][0] == label:
                items[-1] = (label, items[-1][1] + output["text"])
            else:
                items.append((label, output["text"]))
        elif "image/png" in output.get("data", {}):
            png = base64.b64decode(output["data"]["image/png"])
            items.append(("image", matplotlib.image.imread(io.BytesIO(png), format="png")))
        else:
            items.append(("text", str(output.get("data", {}).get("text/plain", ""))))
    return items


def ollama_port_free():
    """True when nothing listens on Ollama's default port here."""
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", 11434)) != 0


def kernel_pythonpath():
    """PYTHONPATH for the kernel: it runs in a scratch folder and imports the repo's modules."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)


def kernel_env(small):
    """The environment variables the notebooks read, for the small setting or the real one."""
    env = {"PYTHONPATH": kernel_pythonpath()}
    if small:
        env["CH07_SMALL"] = "1"
    if (SHARED_DATA / "instruction-data.json").exists():
        env["CH07_DATA"] = str(SHARED_DATA / "instruction-data.json")
    return env


def offline_env(folder, vocab_dir, cache):
    """Environment variables that take the network away from a kernel in `folder`, as on a
    machine offline: the empty tiktoken cache `cache`, and every web request sent to a loopback
    port where nothing listens (loopback servers such as the stand-in judge are reached
    directly). GPT-2's vocabulary files are put in folder/gpt2/124M, as a download leaves them."""
    model_dir = folder / "gpt2" / "124M"
    model_dir.mkdir(parents=True)
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copyfile(vocab_dir / name, model_dir / name)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{sock.getsockname()[1]}"
    env = {"TIKTOKEN_CACHE_DIR": str(cache), "NO_PROXY": "127.0.0.1,localhost",
           "no_proxy": "127.0.0.1,localhost"}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        env[name] = nowhere
    return env


def execute(nb, folder):
    """Run notebook `nb` top to bottom with `folder` as the kernel's working folder."""
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(folder)}}).execute()
    return nb


def read(name):
    return nbformat.read(REPO / name, as_version=4)


@pytest.fixture(scope="module")
def executed(tmp_path_factory, gpt2_vocab_dir, instruction_data_path):
    """The notebooks executed in order with CH07_SMALL=1 in one scratch folder, offline with
    GPT-2's vocabulary files in gpt2/124M: (folder, {name: executed notebook}, the tiktoken
    cache they were given empty)."""
    folder = tmp_path_factory.mktemp("notebooks")
    cache = tmp_path_factory.mktemp("empty-tiktoken-cache")
    env = {**kernel_env(small=True), "CH07_DATA": str(instruction_data_path),
           **offline_env(folder, gpt2_vocab_dir, cache)}
    with pytest.MonkeyPatch.context() as mp:  # the kernel inherits this process's environment
        mp.delenv("CH07_MODEL", raising=False)  # the notebooks' default files
        for key, value in env.items():
            mp.setenv(key, value)
        results = {name: execute(read(name), folder) for name in NOTEBOOKS}
    yield folder, results, cache
    shutil.rmtree(folder, ignore_errors=True)


def all_text(nb):
    """The text output of all code cells of `nb`."""
    return "\n".join(outputs_text(cell) for cell in nb.cells if cell.cell_type == "code")


def code_cells(nb):
    """The code cells of `nb`, in order."""
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def cell_holding(nb, marker):
    """The one code cell of `nb` whose source holds `marker`."""
    cells = [cell for cell in code_cells(nb) if marker in cell.source]
    assert len(cells) == 1, f"{len(cells)} cells hold {marker!r}"
    return cells[0]


def test_the_notebooks_run_offline(executed):
    """GPT-2's tokenizer came from the download's files: tiktoken fetched nothing into its
    cache, and every notebook ran to its end."""
    folder, results, cache = executed
    assert list(cache.iterdir()) == []
    assert sorted(p.name for p in (folder / "gpt2" / "124M").iterdir()) == ["encoder.json",
                                                                            "vocab.bpe"]
    for name in NOTEBOOKS:  # the last cell of each printed its result
        assert outputs_text(code_cells(results[name])[-1]), name


def test_ch07_runs_in_the_small_setting(executed, tokenizer):
    folder, results, _ = executed
    text = all_text(results["ch07.ipynb"])
    for check in ("download_and_load_file: same as the script's for all 1100 entries: True",
                  "format_input: same as the script's for all 1100 entries: True",
                  "split_data: same as the script's for all 1100 entries: True",
                  "InstructionDataset: same as the script's for all 1100 entries: True",
                  "custom_collate_fn: same as the script's for all 138 batches of the dataset",
                  "BASE_CONFIG and model_configs: same as the script's for all 4 GPT-2 sizes: "
                  "True",
                  "query_model: same as the script's for all 1100 prompts of the dataset: True",
                  "judge_prompt: same as the script's for all 1100 entries: True",
                  "generate_model_scores: same as the script's for all 1100 entries: True"):
        assert check in text
    assert "Training set length: 935\nValidation set length: 55\nTest set length: 110" in text
    assert "torch.Size([8, 61]) torch.Size([8, 61])" in text  # the first shuffled batch
    assert "47 evaluations, steps 0 to 230; first: train 2.637, val 2.626" in text
    assert "Loaded model: Small test model" in text
    assert "Training completed in " in text
    assert (folder / "loss-plot.pdf").read_bytes().startswith(b"%PDF")
    plot = shown(cell_holding(results["ch07.ipynb"], "plot_losses("))
    assert [kind for kind, _ in plot] == ["stream stdout", "image"]  # saved, then shown
    assert plot[0][1] == "Plot saved as loss-plot.pdf\n"
    responses = json.loads((folder / "instruction-data-with-response.json").read_text())
    assert len(responses) == 10 and all("model_response" in e for e in responses)
    # the book's loop over the test set answers as the script's batched generation does
    model, _, _ = load_finetuned_model(str(folder / "Smalltestmodel-sft.pth"))
    scripts = generate_responses(model, responses, tokenizer, TEST_MODE_CONFIG["context_length"],
                                 max_new_tokens=20, batch_size=8)
    assert [e["model_response"] for e in scripts] == [e["model_response"] for e in responses]
    assert (folder / "Smalltestmodel-sft.pth").exists()
    info = json.loads((folder / "Smalltestmodel-sft.json").read_text())  # saved beside it
    assert info["config"] == TEST_MODE_CONFIG and info["prompt_style"] == "alpaca"
    assert info["model_name"] == "Small test model" and info["tokens_seen"] > 0
    if ollama_port_free():
        assert "Ollama running: False" in text
        assert text.count("Skipping the evaluation: Ollama is not running at "
                          "http://localhost:11434") == 4  # the check and three judge cells


def test_exercise_solutions_run_in_the_small_setting(executed):
    text = all_text(executed[1]["exercise-solutions.ipynb"])
    assert "<|user|>\nIdentify the correct spelling of the following word.\nOcassion" in text
    for check in ("the Phi-3 prompt: same as the experiments' for all 1100 entries: True",
                  "the masking dataset and collate function: same as the experiments' for all "
                  "138 batches: True",
                  "the LoRA layers: same as the experiments' for all 33 weights"):
        assert check in text
    assert "Phi-3 prompt saves 17.5 tokens per entry on average" in text
    assert "Total trainable parameters after: 0" in text
    assert "Batch size: 4 | allowed_max_length: 512" in text


def test_load_finetuned_model_runs_in_the_small_setting(executed):
    folder, results, _ = executed
    text = all_text(results["load-finetuned-model.ipynb"])
    # ch07.ipynb ran first in the same folder and saved its tiny finetuned model there
    assert "Loaded Smalltestmodel-sft.pth" in text
    assert "From Smalltestmodel-sft.json:\nModel: Small test model\n" in text
    assert "Experiment: ch07.ipynb | epochs: 1 | seed: 123" in text
    assert "Prompt style: alpaca" in text
    assert "### Instruction:\nRewrite the sentence using a passive voice." in text
    assert "Response: " in text


def run_load_notebook(folder, monkeypatch, model_path=None, small=True, via_env=False):
    """Run load-finetuned-model.ipynb in `folder`, on `model_path` when given: written into its
    MODEL_PATH line as a reader does, or set as CH07_MODEL when `via_env`; its text output."""
    monkeypatch.delenv("CH07_MODEL", raising=False)
    monkeypatch.delenv("CH07_SMALL", raising=False)
    for key, value in kernel_env(small).items():
        monkeypatch.setenv(key, value)
    nb = read("load-finetuned-model.ipynb")
    if model_path is not None and via_env:
        monkeypatch.setenv("CH07_MODEL", str(model_path))
    elif model_path is not None:
        replace_in_cell(nb, CHOICE_LINE, f"MODEL_PATH = {str(model_path)!r}")
    return all_text(execute(nb, folder))


def test_load_finetuned_model_saves_a_tiny_model_when_none_exists(tmp_path, monkeypatch):
    """Alone in an empty folder, the small setting writes its own tiny model and answers."""
    text = run_load_notebook(tmp_path, monkeypatch)
    assert "Saved a tiny random model as Smalltestmodel-sft-standalone.pth" in text
    assert "Loaded Smalltestmodel-sft-standalone.pth" in text
    assert "Response: " in text
    assert (tmp_path / "Smalltestmodel-sft-standalone.pth").exists()
    assert (tmp_path / "Smalltestmodel-sft-standalone.json").exists()


def test_load_finetuned_model_asks_a_phi3_finetune_in_the_phi3_format(tmp_path, monkeypatch):
    """The JSON beside the weights decides the prompt and the model: a Phi-3-prompt finetune
    with a config the shapes alone cannot tell (3 heads instead of the test model's 2), whose
    run (--run_name) and weights (--keep_best's) the notebook names."""
    config = {**TEST_MODE_CONFIG, "n_heads": 3, "n_layers": 2}
    path = tmp_path / "models" / "Smalltestmodel-sft-phi3-prompt.pth"
    torch.manual_seed(1)
    save_finetuned_model(GPTModel(config), str(path), {
        "model_name": "Small test model", "config": config, "prompt_style": "phi3",
        "experiment": "phi3-prompt", "run_name": "phi3-short", "weights": "best", "epochs": 1,
        "seed": 123, "tokens_seen": 592, "train_loss": 10.5, "val_loss": 10.75, "settings": {}})
    text = run_load_notebook(tmp_path, monkeypatch, path)
    assert f"Loaded {path}" in text
    assert ("Model: Small test model\nRun: phi3-short (best weights)\n"
            "Experiment: phi3-prompt | epochs: 1 | seed: 123") in text
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
    text = run_load_notebook(tmp_path, monkeypatch, path, via_env=True)
    assert f"Loaded {path}" in text
    assert f"No {tmp_path / 'book-sft.json'} beside the weights: the chapter's defaults" in text
    assert "Prompt style: alpaca" in text
    assert "'context_length': 64" in text and "'qkv_bias': True" in text
    assert "### Instruction:\nRewrite the sentence using a passive voice." in text
    assert "Response: " in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["book-sft.pth"]  # nothing written


def test_load_finetuned_model_says_what_to_run_without_a_model(tmp_path, monkeypatch):
    """In the real setting with no saved model, the notebook names the script and the file it
    saves, and runs on."""
    text = run_load_notebook(tmp_path, monkeypatch, small=False)
    assert ("No finetuned model found (gpt2-medium355M-sft-standalone.pth or "
            "gpt2-medium355M-sft.pth), and there is no finetuned model (*-sft*.pth) in this "
            "folder. Run "
            "`python gpt_instruction_finetuning.py` first (it saves "
            "gpt2-medium355M-sft-standalone.pth)") in text
    assert "No model loaded" in text
    assert not list(tmp_path.iterdir())


def test_load_finetuned_model_names_the_models_there_are_for_a_wrong_name(tmp_path,
                                                                          monkeypatch):
    """A MODEL_PATH that does not exist: the notebook lists the finetuned models of its folder
    and never claims a script saves the mistyped name."""
    for name in ("gpt2-medium355M-sft-lora.pth", "Smalltestmodel-sft.pth", "notes.pth"):
        (tmp_path / name).write_bytes(b"")
    text = run_load_notebook(tmp_path, monkeypatch, "typo.pth")
    assert ("MODEL_PATH typo.pth: no such file. Finetuned models in this folder: "
            "Smalltestmodel-sft.pth, gpt2-medium355M-sft-lora.pth. Set MODEL_PATH in the first "
            "code cell to one of them and run this notebook again.") in text
    assert "saves typo.pth" not in text and "notes.pth" not in text
    assert "No model loaded" in text


def test_load_finetuned_model_names_the_command_when_the_folder_has_no_model(tmp_path,
                                                                            monkeypatch):
    text = run_load_notebook(tmp_path, monkeypatch, tmp_path / "models" / "typo.pth")
    assert (f"MODEL_PATH {tmp_path / 'models' / 'typo.pth'}: no such file, and there is no "
            f"finetuned model (*-sft*.pth) in {tmp_path / 'models'}. Run "
            "`python gpt_instruction_finetuning.py --test_mode` first (it saves "
            "Smalltestmodel-sft-standalone.pth)") in text
    assert "No model loaded" in text
    assert not list(tmp_path.iterdir())


def replace_in_cell(nb, old, new):
    """Change `old` into `new` in the one code cell of `nb` that holds it."""
    cells = [cell for cell in nb.cells if cell.cell_type == "code" and old in cell.source]
    assert len(cells) == 1, f"{len(cells)} cells hold {old!r}"
    cells[0].source = cells[0].source.replace(old, new)


@pytest.mark.parametrize("name, old, new, message", [
    ("ch07.ipynb", '"Write a response that', '"Write an answer that',
     "format_input in this notebook differs from the script's version"),
    ("ch07.ipynb", "targets[len(item):] = ignore_index", "targets[len(item) + 1:] = ignore_index",
     "custom_collate_fn in this notebook differs from the script's version"),
    ("exercise-solutions.ipynb", 'return f"\\n<|assistant|>:\\n', 'return f"\\n<|assistant|>\\n',
     "the Phi-3 prompt in this notebook differs from the experiments' version"),
])
def test_a_notebook_whose_code_drifts_from_the_scripts_stops_at_its_check(tmp_path, monkeypatch,
                                                                          name, old, new,
                                                                          message):
    nb = read(name)
    replace_in_cell(nb, old, new)
    for key, value in kernel_env(small=True).items():
        monkeypatch.setenv(key, value)
    with pytest.raises(CellExecutionError, match=message):
        execute(nb, tmp_path)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebooks_take_gpt2s_tokenizer_as_the_scripts_do(name):
    """Offline, tiktoken.get_encoding fails where gpt2_tokenizer builds the same encoding from
    a GPT-2 download's files."""
    sources = [cell.source for cell in code_cells(read(name))]
    assert not any("tiktoken.get_encoding" in source or "import tiktoken" in source
                   for source in sources)
    assert sum('tokenizer = gpt2_tokenizer(models_dir="gpt2")' in source
               for source in sources) == 1


@pytest.mark.parametrize("name, checks, section_mark", [
    ("ch07.ipynb", "# Checks against the script", "## 7."),
    ("exercise-solutions.ipynb", "# Checks against the experiments", "## Exercise 7."),
])
def test_checks_against_the_scripts_come_at_the_end_of_their_section(name, checks,
                                                                    section_mark):
    """Every check runs in a cell of checks that closes its section (the next cell opens the
    next section); the story's cells call into the script for nothing."""
    cells = read(name).cells
    places = [i for i, cell in enumerate(cells) if cell.source.startswith(checks)]
    assert places
    for i in places:
        assert cells[i - 1].source.startswith(f"###{checks}"), f"{name} cell {i - 1}"
        assert cells[i + 1].cell_type == "markdown"
        assert cells[i + 1].source.startswith("## "), f"{name} cell {i + 1}"
        before = "\n".join(cell.source for cell in cells[:i] if cell.cell_type == "markdown")
        number = re.findall(rf"^{section_mark}(\d)", before, re.M)[-1]
        assert cells[i].source.splitlines()[0].endswith(f"7.{number}"), f"{name} cell {i}"
    for i, cell in enumerate(cells):
        if cell.cell_type == "code" and not cell.source.startswith(checks):  # the story
            assert not re.search(r"^check_same\(", cell.source, re.M), f"{name} cell {i}"
            assert not re.search(r"\bscript\.", cell.source), f"{name} cell {i}"


def test_ch07_shows_the_books_own_lines_in_its_story():
    nb = read("ch07.ipynb")
    for book_line in ("optimizer = torch.optim.AdamW(model.parameters(), lr=0.00005, "
                      "weight_decay=0.1)",
                      "train_losses, val_losses, tokens_seen = train_model_simple(",
                      'test_data[i]["model_response"] = response_text',
                      "class InstructionDataset(Dataset):",
                      "def custom_collate_fn(batch, pad_token_id=50256, ignore_index=-100",
                      "def format_input(entry):",
                      'CHOOSE_MODEL = "gpt2-medium (355M)"'):
        assert not cell_holding(nb, book_line).source.startswith("# Checks"), book_line
    story = [cell.source for cell in code_cells(nb) if not cell.source.startswith("# Checks")]
    for call in ("make_optimizer", "generate_responses", "MODEL_CONFIGS"):
        assert not any(call in source for source in story), call


def test_load_finetuned_model_says_how_to_choose_the_model_before_it_runs():
    cells = read("load-finetuned-model.ipynb").cells
    assert cells[0].cell_type == "markdown"
    for name in ("MODEL_PATH", "gpt2-medium355M-sft-standalone.pth",
                 "gpt2-small124M-sft-standalone.pth", "--model 124M", "--run_name NAME",
                 "gpt2-medium355M-sft-NAME.pth", "--keep_best",
                 "gpt2-medium355M-sft-standalone-best.pth"):
        assert name in cells[0].source, name
    first_code = code_cells(read("load-finetuned-model.ipynb"))[0].source
    assert first_code.splitlines()[-1] == CHOICE_LINE
    assert first_code.count("MODEL_PATH") == 1 and "CH07_MODEL" in first_code


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_outputs_come_only_from_data_cells(name):
    """Only cells tagged real-output keep outputs; none of them uses weights, the judge or
    the small setting's random model, and they show only text and PNG figures."""
    nb = read(name)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        tagged = REAL in cell.metadata.get("tags", [])
        if cell.outputs:
            assert tagged, f"{name} cell {i} has outputs but is not a data cell"
        if tagged:  # data cells never touch model weights or the real judge
            for marker in ("load_weights_into_gpt", "download_and_load_gpt2",
                           "train_model_simple", "generate(", "torch.load",
                           "generate_responses", "check_judge", "OLLAMA_URL", ":11434"):
                assert marker not in cell.source, f"{name} cell {i} uses {marker}"
        for output in cell.outputs:
            if output.output_type == "display_data":
                assert set(output.data) == {"image/png", "text/plain"}, f"{name} cell {i}"
            else:
                assert output.output_type == "stream", f"{name} cell {i}: {output.output_type}"
        text = outputs_text(cell)
        for marker in ("Small test model", "Smalltestmodel", "tiny random model"):
            assert marker not in text, f"{name} cell {i} shows output of the small setting"
    assert (REPO / name).stat().st_size < MAX_NOTEBOOK_BYTES


def test_committed_outputs_are_the_real_setting():
    """The stored outputs come from the chapter's dataset and GPT-2 medium's shape."""
    nb = read("ch07.ipynb")
    text = all_text(nb)
    assert "Number of entries: 1100" in text
    assert "Training set length: 935\nValidation set length: 55\nTest set length: 110" in text
    assert "Train loader:\ntorch.Size([8, 61]) torch.Size([8, 61])" in text
    assert text.count("torch.Size([8, ") == 2 * (935 // 8)  # every training batch, both tensors
    figures = sum(output.output_type == "display_data" for cell in nb.cells
                  for output in cell.get("outputs", []))
    assert figures == 6  # roadmap, prompt styles, toy batch, masking, real batch, book's curve
    text = all_text(read("exercise-solutions.ipynb"))
    assert "Total trainable parameters before: 406,286,336" in text  # GPT-2 medium
    assert "Total trainable LoRA parameters: 7,898,384" in text
    assert "(lora): LoRALayer()" in text and "in_features=1024" in text


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_outputs_are_those_of_a_fresh_run(executed, name):
    """Every stored text and figure is what the cell shows when run again (cells whose output
    depends on the setting, which name SMALL, are compared in test_committed_outputs_are_the_
    real_setting instead). Figures are compared by their pixels."""
    stored = read(name)
    fresh = executed[1][name]
    for i, (old, new) in enumerate(zip(stored.cells, fresh.cells, strict=True)):
        if old.cell_type != "code" or REAL not in old.metadata.get("tags", []):
            continue
        if "SMALL" in old.source:
            continue
        old_items, new_items = shown(old), shown(new)
        assert [kind for kind, _ in old_items] == [kind for kind, _ in new_items], f"cell {i}"
        for (kind, was), (_, now) in zip(old_items, new_items, strict=True):
            if kind == "image":
                assert was.shape == now.shape, f"{name} cell {i}: figure size"
                assert np.abs(was - now).mean() < 0.01, f"{name} cell {i}: figure"
            else:
                assert was == now, f"{name} cell {i}"


def joined_streams(outputs):
    """`outputs` with each run of chunks of the same stream joined into one output, so that a
    stored notebook does not change with how a run happened to cut its printing."""
    joined = []
    for output in outputs:
        if (joined and output.output_type == "stream" and joined[-1].output_type == "stream"
                and joined[-1].name == output.name):
            joined[-1].text += output.text
        else:
            joined.append(output)
    return joined


def store_outputs(name):
    """Run notebook `name` in its STORE_ENV setting and save it with the outputs of its
    real-output cells only (no execution counts or timings, so that reruns change nothing)."""
    import tempfile

    nb = read(name)
    for key in ("CH07_MODEL", "CH07_SMALL"):
        os.environ.pop(key, None)
    os.environ.update({**kernel_env(small=False), **STORE_ENV[name]})
    with tempfile.TemporaryDirectory() as folder:
        execute(nb, folder)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        tags = cell.metadata.get("tags", [])
        cell.metadata = {"tags": tags} if tags else {}
        cell.execution_count = None
        cell.outputs = joined_streams(cell.outputs) if REAL in tags else []
        for output in cell.outputs:
            output.pop("execution_count", None)
            if "metadata" in output:
                output.metadata = {}
    with atomic_write(REPO / name) as f:
        f.write(nbformat.writes(nb).encode("utf-8") + b"\n")
    print(f"Stored the outputs of {name} ({(REPO / name).stat().st_size:,} bytes)")


if __name__ == "__main__":
    for notebook in NOTEBOOKS:
        store_outputs(notebook)
