"""Fixtures shared by the tests: the offline GPT-2 tokenizer, the chapter's data, tiny models."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
# tiktoken downloads the GPT-2 BPE files on first use; the shared cache makes that offline.
# Absolute, so that scripts the tests start in other folders find it too.
os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath(
    os.environ.get("TIKTOKEN_CACHE_DIR", SHARED_DATA / "tiktoken-cache"))


@pytest.fixture(scope="session")
def tokenizer():
    import tiktoken

    return tiktoken.get_encoding("gpt2")


@pytest.fixture(scope="session")
def instruction_data_path():
    return SHARED_DATA / "instruction-data.json"


@pytest.fixture
def tiny_cfg():
    """A GPT-2-shaped model small enough to run in milliseconds."""
    return {"vocab_size": 50257, "context_length": 32, "emb_dim": 16, "n_heads": 2,
            "n_layers": 2, "drop_rate": 0.0, "qkv_bias": True}
