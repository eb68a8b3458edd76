"""The three notebooks run top to bottom in the small setting, and their committed outputs
come only from cells that do not depend on model weights or a judge."""

import json
import os
import shutil
import socket

import nbformat
import pytest
from nbclient import NotebookClient

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


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Each notebook executed with CH07_SMALL=1 in a scratch folder: (folder, {name: nb})."""
    folder = tmp_path_factory.mktemp("notebooks")
    env = {"CH07_SMALL": "1", "PYTHONPATH": str(REPO)}
    data = SHARED_DATA / "instruction-data.json"
    if data.exists():
        env["CH07_DATA"] = str(data)
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        results = {}
        for name in NOTEBOOKS:
            nb = nbformat.read(REPO / name, as_version=4)
            NotebookClient(nb, timeout=600, kernel_name="python3",
                           resources={"metadata": {"path": str(folder)}}).execute()
            results[name] = nb
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    yield folder, results
    shutil.rmtree(folder, ignore_errors=True)


def all_text(nb):
    return "\n".join(outputs_text(cell) for cell in nb.cells if cell.cell_type == "code")


def test_ch07_runs_in_the_small_setting(executed):
    folder, results = executed
    text = all_text(results["ch07.ipynb"])
    assert "Training set length: 935\nValidation set length: 55\nTest set length: 110" in text
    assert "torch.Size([8, 61]) torch.Size([8, 61])" in text  # the first shuffled batch
    assert "Loaded model: Small test model" in text
    assert "Training completed in " in text
    assert (folder / "loss-plot.pdf").read_bytes().startswith(b"%PDF")
    responses = json.loads((folder / "instruction-data-with-response.json").read_text())
    assert len(responses) == 10 and all("model_response" in e for e in responses)
    assert (folder / "Smalltestmodel-sft.pth").exists()
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
    assert "Loaded Smalltestmodel-sft-standalone.pth" in text
    assert "Response: " in text
    assert (folder / "Smalltestmodel-sft-standalone.pth").exists()


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_outputs_come_only_from_data_cells(name):
    nb = nbformat.read(REPO / name, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        tagged = REAL in cell.metadata.get("tags", [])
        if cell.outputs:
            assert tagged, f"{name} cell {i} has outputs but is not a data cell"
        text = cell.source
        if tagged:  # data cells never touch model weights or the judge
            for marker in ("load_weights_into_gpt", "train_model_simple", "generate(",
                           "query_model", "torch.load"):
                assert marker not in text, f"{name} cell {i} uses {marker}"


def test_committed_ch07_shows_the_real_split():
    nb = nbformat.read(REPO / "ch07.ipynb", as_version=4)
    text = all_text(nb)
    assert "Training set length: 935\nValidation set length: 55\nTest set length: 110" in text
    assert "Number of entries: 1100" in text
