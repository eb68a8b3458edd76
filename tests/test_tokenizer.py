"""gpt2_tokenizer: tiktoken's GPT-2 encoding, or the same one built from a GPT-2 download's
vocabulary files when tiktoken cannot fetch its own; and the suite's own check, which stops a
run at once when the data the tests need is missing and cannot be downloaded."""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tiktoken

from gpt_download import DownloadError, gpt2_tokenizer

REPO = Path(__file__).resolve().parents[1]
SIZES = "124M, 355M, 774M, 1558M"
REFUSED = f"[Errno {errno.ECONNREFUSED}] {os.strerror(errno.ECONNREFUSED)}"


def place_vocab(gpt2_vocab_dir, model_dir, names=("encoder.json", "vocab.bpe")):
    """Copy GPT-2's encoder.json and vocab.bpe into `model_dir` under `names`, as a download
    leaves them there."""
    model_dir.mkdir(parents=True, exist_ok=True)
    for source, name in zip(("encoder.json", "vocab.bpe"), names, strict=True):
        shutil.copyfile(gpt2_vocab_dir / source, model_dir / name)
    return model_dir


def dataset_texts(path):
    """Every instruction, input and output of the chapter's dataset."""
    entries = json.loads(Path(path).read_text(encoding="utf-8"))
    return [entry[field] for entry in entries for field in ("instruction", "input", "output")]


def test_tiktokens_own_encoding_is_returned_when_it_loads(tmp_path, tokenizer):
    assert gpt2_tokenizer(str(tmp_path)) is tiktoken.get_encoding("gpt2")
    assert os.listdir(tmp_path) == []


def test_offline_fallback_encodes_the_dataset_as_tiktoken_does(tmp_path, tokenizer,
                                                               tiktoken_offline, gpt2_vocab_dir,
                                                               instruction_data_path):
    with pytest.raises(OSError):  # what the scripts met before: tiktoken cannot fetch its files
        tiktoken.get_encoding("gpt2")
    place_vocab(gpt2_vocab_dir, tmp_path / "124M")

    encoding = gpt2_tokenizer(str(tmp_path))
    texts = dataset_texts(instruction_data_path)
    assert len(texts) == 3300
    assert encoding is not tokenizer
    assert encoding.encode_ordinary_batch(texts) == tokenizer.encode_ordinary_batch(texts)
    special = {"<|endoftext|>"}
    assert encoding.encode("<|endoftext|>", allowed_special=special) == [50256]
    assert (encoding.encode(texts[2] + "<|endoftext|>", allowed_special=special)
            == tokenizer.encode(texts[2] + "<|endoftext|>", allowed_special=special))
    assert (encoding.n_vocab, encoding.eot_token) == (tokenizer.n_vocab, tokenizer.eot_token)
    assert os.listdir(tiktoken_offline) == []  # the local files were not copied into the cache
    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(tiktoken_offline)


def test_hugging_face_names_in_a_later_size_folder_serve_too(tmp_path, tokenizer,
                                                             tiktoken_offline, gpt2_vocab_dir,
                                                             instruction_data_path):
    place_vocab(gpt2_vocab_dir, tmp_path / "1558M", ("vocab.json", "merges.txt"))
    texts = dataset_texts(instruction_data_path)[:300]
    assert gpt2_tokenizer(str(tmp_path)).encode_batch(texts) == tokenizer.encode_batch(texts)


def test_default_models_dir_is_gpt2(tmp_path, tokenizer, tiktoken_offline, gpt2_vocab_dir,
                                    monkeypatch):
    place_vocab(gpt2_vocab_dir, tmp_path / "gpt2" / "774M")
    monkeypatch.chdir(tmp_path)
    text = "Rewrite the sentence using a simile.\n\n### Response:\nThe car is as fast as lightning."
    assert gpt2_tokenizer().encode(text) == tokenizer.encode(text)


def test_missing_files_offline_end_in_one_line(tmp_path, tiktoken_offline):
    models_dir = tmp_path / "gpt2"
    (models_dir / "355M").mkdir(parents=True)
    (models_dir / "355M" / "encoder.json").write_text("{}")  # half a pair is no pair
    with pytest.raises(DownloadError) as exc_info:
        gpt2_tokenizer(str(models_dir))
    assert str(exc_info.value) == (
        "GPT-2's tokenizer files are missing: tiktoken could not download them (ConnectionError) "
        f"and no folder {models_dir / '<size>'} ({SIZES}) holds encoder.json and vocab.bpe (or "
        "vocab.json and merges.txt). Set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's "
        "cached GPT-2 files, put encoder.json and vocab.bpe (which any GPT-2 download brings) "
        f"into {models_dir / '124M'}, or connect to the network once")


def test_damaged_encoder_json_is_named(tmp_path, tiktoken_offline, gpt2_vocab_dir):
    model_dir = place_vocab(gpt2_vocab_dir, tmp_path / "124M")
    cut = (model_dir / "encoder.json").read_bytes()[:5000]
    (model_dir / "encoder.json").write_bytes(cut)
    with pytest.raises(json.JSONDecodeError) as parse_error:
        json.loads(cut)
    with pytest.raises(DownloadError) as exc_info:
        gpt2_tokenizer(str(tmp_path))
    assert str(exc_info.value) == (
        f"{model_dir / 'encoder.json'} and {model_dir / 'vocab.bpe'} do not make GPT-2's "
        f"tokenizer ({parse_error.value}): they are cut short, damaged or not GPT-2's. Delete "
        "them and download the GPT-2 model again, or set TIKTOKEN_CACHE_DIR to a folder holding "
        "tiktoken's cached GPT-2 files")


def test_first_size_folder_counts_even_when_its_merges_are_cut_short(tmp_path, tiktoken_offline,
                                                                     gpt2_vocab_dir):
    first = place_vocab(gpt2_vocab_dir, tmp_path / "124M")
    place_vocab(gpt2_vocab_dir, tmp_path / "355M")
    merges = (first / "vocab.bpe").read_text(encoding="utf-8").splitlines(keepends=True)
    (first / "vocab.bpe").write_text("".join(merges[:-100]), encoding="utf-8")
    with pytest.raises(DownloadError) as exc_info:
        gpt2_tokenizer(str(tmp_path))
    assert str(exc_info.value).startswith(
        f"{first / 'encoder.json'} and {first / 'vocab.bpe'} do not make GPT-2's tokenizer "
        "(they do not agree): they are cut short")


# --- the suite's check for its data, run on a copy of conftest.py with a one-test suite ---


def run_suite_copy(tmp_path, closed_port, shared=(), with_tiktoken_cache=False):
    """Run pytest on tmp_path/checkout/tests (a copy of conftest.py and one passing test) with the
    network behind a proxy that is down. `shared` lists (name, source) of what
    tmp_path/shared/data holds. with_tiktoken_cache passes this session's tiktoken cache on;
    without it, TIKTOKEN_CACHE_DIR is unset and tiktoken's default cache an empty folder."""
    tests = tmp_path / "checkout" / "tests"
    tests.mkdir(parents=True)
    shutil.copyfile(REPO / "tests" / "conftest.py", tests / "conftest.py")
    (tests / "test_probe.py").write_text("def test_probe():\n    pass\n")
    for name, source in shared:
        destination = tmp_path / "shared" / "data" / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copyfile)(source, destination)
    env = {key: value for key, value in os.environ.items() if key.lower() != "no_proxy"}
    env.update(PYTHONPATH=str(REPO), HTTP_PROXY=closed_port, HTTPS_PROXY=closed_port,
               http_proxy=closed_port, https_proxy=closed_port)
    if not with_tiktoken_cache:
        env.pop("TIKTOKEN_CACHE_DIR", None)
        (tmp_path / "tmp").mkdir()
        env["TMPDIR"] = str(tmp_path / "tmp")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests"], cwd=tests.parent, env=env, capture_output=True, text=True,
                          timeout=120)


def the_cure(shared):
    """The end of the check's line: where the files go, or that a network brings them."""
    return (f"Put the shared data folder (dataset, gpt2-tokenizer/, tiktoken-cache/) at {shared}, "
            "or set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's GPT-2 files, or run the "
            "tests once with a network")


def test_suite_without_shared_data_or_network_stops_with_one_line(tmp_path, closed_port):
    result = run_suite_copy(tmp_path, closed_port)
    shared = tmp_path / "shared" / "data"
    assert (result.returncode, result.stdout) == (pytest.ExitCode.USAGE_ERROR, "")
    assert result.stderr == (
        f"Exit: cannot run the tests: missing {shared / 'instruction-data.json'}; "
        f"{shared / 'gpt2-tokenizer'}/ (encoder.json, vocab.bpe); tiktoken's GPT-2 files "
        "(TIKTOKEN_CACHE_DIR is unset), and the network that would bring them cannot be reached "
        f"(ProxyError). {the_cure(shared)}\n")


def test_suite_names_the_shared_tiktoken_cache_when_only_it_is_missing(
        tmp_path, closed_port, instruction_data_path, gpt2_vocab_dir):
    result = run_suite_copy(tmp_path, closed_port, shared=[
        ("instruction-data.json", instruction_data_path), ("gpt2-tokenizer", gpt2_vocab_dir)])
    shared = tmp_path / "shared" / "data"
    assert result.returncode == pytest.ExitCode.USAGE_ERROR
    assert result.stderr == (
        "Exit: cannot run the tests: missing tiktoken's GPT-2 files (TIKTOKEN_CACHE_DIR = "
        f"{shared / 'tiktoken-cache'}), and the network that would bring them cannot be reached "
        f"(ProxyError). {the_cure(shared)}\n")


def test_suite_names_the_dataset_that_only_a_network_would_bring(tmp_path, closed_port,
                                                                  gpt2_vocab_dir, tokenizer):
    result = run_suite_copy(tmp_path, closed_port, shared=[("gpt2-tokenizer", gpt2_vocab_dir)],
                            with_tiktoken_cache=True)
    shared = tmp_path / "shared" / "data"
    assert result.returncode == pytest.ExitCode.USAGE_ERROR
    assert result.stderr == (
        f"Exit: cannot run the tests: missing {shared / 'instruction-data.json'}, and the network "
        f"that would bring them cannot be reached ({REFUSED}). {the_cure(shared)}\n")


def test_suite_runs_offline_beside_the_shared_data(tmp_path, closed_port, instruction_data_path,
                                                   gpt2_vocab_dir, tokenizer):
    result = run_suite_copy(tmp_path, closed_port, shared=[
        ("instruction-data.json", instruction_data_path), ("gpt2-tokenizer", gpt2_vocab_dir)],
        with_tiktoken_cache=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].startswith("1 passed")


def offline_env(tmp_path):
    """The environment of a user with no network and an empty tiktoken cache: every request
    goes to a proxy on a closed loopback port, so it fails at once, as offline."""
    cache = tmp_path / "empty-tiktoken-cache"
    cache.mkdir()
    closed = "http://127.0.0.1:9"
    return {**os.environ, "TIKTOKEN_CACHE_DIR": str(cache), "HTTPS_PROXY": closed,
            "HTTP_PROXY": closed, "https_proxy": closed, "http_proxy": closed}


def test_script_runs_offline_with_the_tokenizer_files_of_a_gpt2_download(
        tmp_path, gpt2_vocab_dir, instruction_data_path):
    place_vocab(gpt2_vocab_dir, tmp_path / "gpt2" / "355M")
    result = subprocess.run(
        [sys.executable, str(REPO / "gpt_instruction_finetuning.py"), "--test_mode",
         "--data_path", str(instruction_data_path), "--epochs", "1", "--max_new_tokens", "5"],
        cwd=tmp_path, env=offline_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Model saved as ./Smalltestmodel-sft-standalone.pth" in result.stdout.splitlines()


def test_script_offline_without_tokenizer_files_names_the_fixes(tmp_path,
                                                               instruction_data_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "gpt_instruction_finetuning.py"), "--test_mode",
         "--data_path", str(instruction_data_path)],
        cwd=tmp_path, env=offline_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert result.stderr.startswith("Error: ")
    for part in ("TIKTOKEN_CACHE_DIR", "encoder.json", "vocab.bpe"):
        assert part in result.stderr
    assert not (tmp_path / "Smalltestmodel-sft-standalone.pth").exists()
