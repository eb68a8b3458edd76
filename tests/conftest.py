"""Fixtures shared by the tests: the offline GPT-2 tokenizer, the chapter's data, tiny models.

Beside a checkout with `../shared/data/` (as in CI), the tokenizer files and the dataset come
from there; elsewhere tiktoken and the dataset are downloaded once, as the scripts do.
"""

import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
if "TIKTOKEN_CACHE_DIR" in os.environ:
    # Absolute, so that scripts the tests start in other folders find it too.
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath(os.environ["TIKTOKEN_CACHE_DIR"])
elif SHARED_DATA.is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED_DATA / "tiktoken-cache")


@pytest.fixture(scope="session")
def tokenizer():
    import tiktoken

    return tiktoken.get_encoding("gpt2")


@pytest.fixture(scope="session")
def instruction_data_path(tmp_path_factory):
    """The chapter's 1100-entry dataset: the shared copy, or a fresh download."""
    shared = SHARED_DATA / "instruction-data.json"
    if shared.exists():
        return shared
    from gpt_instruction_finetuning import DATA_URL, download_and_load_file

    path = tmp_path_factory.mktemp("data") / "instruction-data.json"
    download_and_load_file(str(path), DATA_URL)
    return path


@pytest.fixture
def tiny_cfg():
    """A GPT-2-shaped model small enough to run in milliseconds."""
    return {"vocab_size": 50257, "context_length": 32, "emb_dim": 16, "n_heads": 2,
            "n_layers": 2, "drop_rate": 0.0, "qkv_bias": True}


@pytest.fixture
def closed_port():
    """A loopback URL where nothing listens: a server that is down, or no network."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"
