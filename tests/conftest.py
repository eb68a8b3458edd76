"""Fixtures shared by the tests: the offline GPT-2 tokenizer, the chapter's data, tiny models.

Beside a checkout with `../shared/data/` (as in CI), the tokenizer files and the dataset come
from there; elsewhere tiktoken, the dataset and GPT-2's vocabulary files are downloaded once, as
the scripts do. Without either, the run stops before collecting, with one line naming what is
missing.
"""

import os
import signal
import socket
import urllib.request
from pathlib import Path

import pytest

# The judge tests import their helpers before pytest_plugins loads them as a plugin: rewrite
# them from the first import on, so their asserts report as test files' do.
pytest.register_assert_rewrite("judge_helpers")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SHARED_DATASET = SHARED_DATA / "instruction-data.json"
SHARED_VOCAB = SHARED_DATA / "gpt2-tokenizer"  # GPT-2's encoder.json and vocab.bpe
VOCAB_FILENAMES = ("encoder.json", "vocab.bpe")
PROBE_TIMEOUT_S = 10
if "TIKTOKEN_CACHE_DIR" in os.environ:
    # Absolute, so that scripts the tests start in other folders find it too.
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath(os.environ["TIKTOKEN_CACHE_DIR"])
elif SHARED_DATA.is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED_DATA / "tiktoken-cache")


for ignored in (signal.SIGINT, signal.SIGHUP):
    # A shell that starts the suite in the background (or nohup) makes it ignore these, and
    # the scripts that tests start would inherit that: the tests that press Ctrl-C or hang up
    # on a script need the signals delivered as in a terminal.
    if signal.getsignal(ignored) is signal.SIG_IGN:
        signal.signal(ignored, signal.default_int_handler if ignored == signal.SIGINT
                      else signal.SIG_DFL)


def pytest_configure(config):
    """Stop before collecting when the data the tests need is neither at hand nor downloadable:
    one line saying what is missing, instead of an error in every test that uses it. `--help`
    needs no data."""
    problem = None if config.getoption("help") else missing_test_data()
    if problem:
        pytest.exit(problem, returncode=pytest.ExitCode.USAGE_ERROR)


def missing_test_data():
    """None when the dataset, GPT-2's vocabulary files and tiktoken's GPT-2 files are on disk or
    can be downloaded; otherwise the one-line reason, naming where each is expected."""
    import tiktoken

    missing = [] if SHARED_DATASET.is_file() else [str(SHARED_DATASET)]
    if not all((SHARED_VOCAB / name).is_file() for name in VOCAB_FILENAMES):
        missing.append(f"{SHARED_VOCAB}/ ({', '.join(VOCAB_FILENAMES)})")
    try:
        tiktoken.get_encoding("gpt2")  # downloads into tiktoken's cache where a network is
        unreachable = None
    except (OSError, ValueError) as exc:  # requests' errors are OSErrors; ValueError: bad hash
        cache = os.environ.get("TIKTOKEN_CACHE_DIR")
        missing.append("tiktoken's GPT-2 files (TIKTOKEN_CACHE_DIR "
                       f"{'is unset' if cache is None else '= ' + cache})")
        unreachable = type(exc).__name__
    if missing and unreachable is None:
        unreachable = network_problem()
    if unreachable is None:
        return None
    return (f"cannot run the tests: missing {'; '.join(missing)}, and the network that would "
            f"bring them cannot be reached ({unreachable}). Put the shared data folder (dataset, "
            f"gpt2-tokenizer/, tiktoken-cache/) at {SHARED_DATA}, or set TIKTOKEN_CACHE_DIR to a "
            "folder holding tiktoken's GPT-2 files, or run the tests once with a network")


def network_problem():
    """None when the dataset's server answers, else why it does not (no network, a proxy)."""
    from gpt_instruction_finetuning import DATA_URL

    try:
        with urllib.request.urlopen(urllib.request.Request(DATA_URL, method="HEAD"),
                                    timeout=PROBE_TIMEOUT_S):
            return None
    except OSError as exc:
        return str(getattr(exc, "reason", exc))


@pytest.fixture(scope="session")
def tokenizer():
    import tiktoken

    return tiktoken.get_encoding("gpt2")


@pytest.fixture(scope="session")
def instruction_data_path(tmp_path_factory):
    """The chapter's 1100-entry dataset: the shared copy, or a fresh download."""
    if SHARED_DATASET.exists():
        return SHARED_DATASET
    from gpt_instruction_finetuning import DATA_URL, download_and_load_file

    path = tmp_path_factory.mktemp("data") / "instruction-data.json"
    download_and_load_file(str(path), DATA_URL)
    return path


@pytest.fixture(scope="session")
def gpt2_vocab_dir(tmp_path_factory):
    """A folder holding GPT-2's encoder.json and vocab.bpe: the shared copy, or OpenAI's."""
    if all((SHARED_VOCAB / name).is_file() for name in VOCAB_FILENAMES):
        return SHARED_VOCAB
    from gpt_download import BASE_URL, download_file

    folder = tmp_path_factory.mktemp("gpt2-tokenizer")
    for name in VOCAB_FILENAMES:
        download_file(f"{BASE_URL}/124M/{name}", str(folder / name))
    return folder


@pytest.fixture
def tiktoken_offline(monkeypatch, tmp_path_factory, tokenizer):
    """tiktoken as on a machine without a network and without its GPT-2 files: an empty cache,
    host names that do not resolve (loopback servers still work), and no encoding loaded yet in
    this process. `tokenizer`, tiktoken's own encoding, is loaded before. Returns the cache."""
    import tiktoken.registry

    cache = tmp_path_factory.mktemp("empty-tiktoken-cache")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    resolve = socket.getaddrinfo

    def loopback_only(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", loopback_only)
    return cache


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


@pytest.fixture(autouse=True)
def close_figures():
    """Close the figures a test's in-process runs drew (the scripts save them, a notebook shows
    them), so that a session of many runs does not keep them all open."""
    yield
    import matplotlib.pyplot as plt

    plt.close("all")
