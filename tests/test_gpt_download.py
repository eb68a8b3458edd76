"""gpt_download.py against loopback servers holding tiny checkpoints in OpenAI's exact layout
(TensorFlow) and in Hugging Face's (`model.safetensors`), the same weights in both."""

import errno
import functools
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import gpt_download
from gpt_download import (
    FILENAMES,
    HF_TOKENIZER_FILENAMES,
    DamagedFileError,
    DownloadError,
    download_and_load_gpt2,
    download_and_load_gpt2_safetensors,
    gpt2_tokenizer,
    load_gpt2_params_from_safetensors,
    load_gpt2_params_from_tf_ckpt,
)

SETTINGS = {"n_vocab": 100, "n_ctx": 16, "n_embd": 8, "n_head": 2, "n_layer": 2}
DATA_FILE = "model.ckpt.data-00000-of-00001"
ST_FILE = "model.safetensors"
ST_PATH = f"/gpt2/resolve/main/{ST_FILE}"  # where Hugging Face serves 124M's, below the base URL
HF_FILES = (ST_FILE, *HF_TOKENIZER_FILENAMES)  # what the safetensors path fetches, in order
REFUSED = f"([Errno {errno.ECONNREFUSED}] {os.strerror(errno.ECONNREFUSED)})"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def tiny_124m(monkeypatch):
    """The served checkpoints are tiny: let them stand for GPT-2 124M."""
    monkeypatch.setitem(gpt_download.GPT2_SETTINGS, "124M", SETTINGS)


@pytest.fixture
def no_tensorflow(monkeypatch):
    """Make `import tensorflow` fail, as where it is not installed."""
    monkeypatch.setitem(sys.modules, "tensorflow", None)


def tiny_gpt2_arrays(settings, seed=0):
    """Random weights named and shaped as in OpenAI's checkpoints (leading 1 on each `w`)."""
    rng = np.random.default_rng(seed)
    d, n_vocab, n_ctx = settings["n_embd"], settings["n_vocab"], settings["n_ctx"]

    def rand(*shape):
        return (0.2 * rng.standard_normal(shape)).astype(np.float32)

    arrays = {"model/wte": rand(n_vocab, d), "model/wpe": rand(n_ctx, d),
              "model/ln_f/g": 1 + rand(d), "model/ln_f/b": rand(d)}
    for i in range(settings["n_layer"]):
        h = f"model/h{i}"
        arrays.update({
            f"{h}/ln_1/g": 1 + rand(d), f"{h}/ln_1/b": rand(d),
            f"{h}/attn/c_attn/w": rand(1, d, 3 * d), f"{h}/attn/c_attn/b": rand(3 * d),
            f"{h}/attn/c_proj/w": rand(1, d, d), f"{h}/attn/c_proj/b": rand(d),
            f"{h}/ln_2/g": 1 + rand(d), f"{h}/ln_2/b": rand(d),
            f"{h}/mlp/c_fc/w": rand(1, d, 4 * d), f"{h}/mlp/c_fc/b": rand(4 * d),
            f"{h}/mlp/c_proj/w": rand(1, 4 * d, d), f"{h}/mlp/c_proj/b": rand(d),
        })
    return arrays


def write_tf1_checkpoint(folder, arrays):
    """Save `arrays` as OpenAI did: a TF1 Saver writing model.ckpt.* and a relative `checkpoint`."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    with tf.Graph().as_default():
        variables = [tf.compat.v1.Variable(value, name=name) for name, value in arrays.items()]
        saver = tf.compat.v1.train.Saver(variables, save_relative_paths=True)
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            saver.save(sess, os.path.join(folder, "model.ckpt"))
    return tf.train.list_variables(os.path.join(folder, "model.ckpt"))


@pytest.fixture(scope="session")
def served_root(tmp_path_factory):
    """A folder laid out as the bucket: <root>/124M/<the seven files>."""
    root = tmp_path_factory.mktemp("bucket")
    model_dir = root / "124M"
    model_dir.mkdir()
    listed = write_tf1_checkpoint(str(model_dir), tiny_gpt2_arrays(SETTINGS))
    assert dict(listed) == {name: list(a.shape) for name, a in tiny_gpt2_arrays(SETTINGS).items()}
    (model_dir / "hparams.json").write_text(json.dumps(SETTINGS))
    (model_dir / "encoder.json").write_text(json.dumps({"!": 0, '"': 1}))  # not read here
    (model_dir / "vocab.bpe").write_text("#version: 0.2\nt h\n")
    assert sorted(os.listdir(model_dir)) == sorted(FILENAMES)
    assert (model_dir / "checkpoint").read_text().startswith('model_checkpoint_path: "model.ckpt"')
    return root


class LoggingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files from `directory` and records (method, path) of each request on the server."""

    def do_GET(self):
        self.server.requests.append(("GET", self.path))
        super().do_GET()

    def do_HEAD(self):
        self.server.requests.append(("HEAD", self.path))
        super().do_HEAD()

    def log_message(self, *args):
        """Keep the test output clean."""


class RedirectingHandler(LoggingHandler):
    """Answers `<repo>/resolve/main/<file>` with a redirect to `/cdn/<repo>/<file>`, as Hugging
    Face sends its large files to a content delivery network."""

    def send_head(self):
        parts = self.path.strip("/").split("/")
        if len(parts) != 4 or parts[1:3] != ["resolve", "main"]:
            return super().send_head()
        self.send_response(302)
        self.send_header("Location", f"/cdn/{parts[0]}/{parts[3]}")
        self.send_header("Content-Length", "0")
        self.end_headers()
        return None


class DroppingHandler(LoggingHandler):
    """Announces the full size of the weights file but sends only half of it, then hangs up."""

    def do_GET(self):
        path = self.translate_path(self.path)
        if not (path.endswith((DATA_FILE, ST_FILE)) and os.path.isfile(path)):
            return super().do_GET()
        self.server.requests.append(("GET", self.path))
        with open(path, "rb") as f:
            body = f.read()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.close_connection = True


class DroppingHubHandler(DroppingHandler, RedirectingHandler):
    """Redirects as Hugging Face does, then drops the weights file half-way."""


class LoopbackServer(http.server.ThreadingHTTPServer):
    """The tests' server. A client that hangs up mid-reply, as the interrupted downloads do, is
    what those tests want, not a server error to print a traceback for."""

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture
def serve():
    """serve(root, handler) -> base URL of a loopback server; the server's .requests logs it."""
    servers = []

    def start(root, handler=LoggingHandler):
        server = LoopbackServer(("127.0.0.1", 0),
                                functools.partial(handler, directory=str(root)))
        server.requests = []
        threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def expected_params():
    """The nested params the loader must return for the served checkpoint."""
    arrays = tiny_gpt2_arrays(SETTINGS)

    def block(i):
        h = f"model/h{i}"
        pair = {key: {"w": arrays[f"{h}/{key}/w"][0], "b": arrays[f"{h}/{key}/b"]}
                for key in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")}
        return {"attn": {"c_attn": pair["attn/c_attn"], "c_proj": pair["attn/c_proj"]},
                "mlp": {"c_fc": pair["mlp/c_fc"], "c_proj": pair["mlp/c_proj"]},
                "ln_1": {"g": arrays[f"{h}/ln_1/g"], "b": arrays[f"{h}/ln_1/b"]},
                "ln_2": {"g": arrays[f"{h}/ln_2/g"], "b": arrays[f"{h}/ln_2/b"]}}

    return {"wte": arrays["model/wte"], "wpe": arrays["model/wpe"],
            "g": arrays["model/ln_f/g"], "b": arrays["model/ln_f/b"],
            "blocks": [block(i) for i in range(SETTINGS["n_layer"])]}


def assert_same_params(actual, expected):
    """Same nested keys, and every array equal in shape, dtype and value."""
    if isinstance(expected, dict):
        assert sorted(actual) == sorted(expected)
        for key in expected:
            assert_same_params(actual[key], expected[key])
    elif isinstance(expected, list):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            assert_same_params(a, e)
    else:
        assert actual.shape == expected.shape and actual.dtype == expected.dtype
        np.testing.assert_array_equal(actual, expected)


def get_paths(server):
    """The paths the server was asked for with GET, in order."""
    return [path for method, path in server.requests if method == "GET"]


def test_download_and_load_every_tensor(tmp_path, served_root, serve, closed_port):
    url, server = serve(served_root)
    settings, params = download_and_load_gpt2("124M", str(tmp_path), base_url=url,
                                              backup_base_url=closed_port)
    assert settings == SETTINGS
    assert_same_params(params, expected_params())
    assert params["blocks"][1]["attn"]["c_attn"]["w"].shape == (8, 24)
    assert sorted(os.listdir(tmp_path / "124M")) == sorted(FILENAMES)
    for name in FILENAMES:
        assert (tmp_path / "124M" / name).read_bytes() == (served_root / "124M" / name).read_bytes()
    assert server.requests == [("GET", f"/124M/{name}") for name in FILENAMES]


def transformers_gpt2(params):
    """transformers' GPT-2 (eval mode) holding `params`, in OpenAI's layout, for SETTINGS."""
    import torch
    import transformers

    config = transformers.GPT2Config(
        vocab_size=100, n_positions=16, n_embd=8, n_layer=2, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5, activation_function="gelu_new",
        bos_token_id=0, eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(config)
    state = {"transformer.wte.weight": params["wte"], "transformer.wpe.weight": params["wpe"],
             "transformer.ln_f.weight": params["g"], "transformer.ln_f.bias": params["b"],
             "lm_head.weight": params["wte"]}
    for i, block in enumerate(params["blocks"]):
        for name, leaf in (("ln_1", block["ln_1"]), ("ln_2", block["ln_2"])):
            state[f"transformer.h.{i}.{name}.weight"] = leaf["g"]
            state[f"transformer.h.{i}.{name}.bias"] = leaf["b"]
        for name, leaf in (("attn.c_attn", block["attn"]["c_attn"]),
                           ("attn.c_proj", block["attn"]["c_proj"]),
                           ("mlp.c_fc", block["mlp"]["c_fc"]),
                           ("mlp.c_proj", block["mlp"]["c_proj"])):
            state[f"transformer.h.{i}.{name}.weight"] = leaf["w"]  # Conv1D: [in, out] like TF
            state[f"transformer.h.{i}.{name}.bias"] = leaf["b"]
    hf.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
    return hf.eval()


TOKEN_IDS = [[3, 14, 15, 92, 65, 35, 89, 79], [0, 99, 1, 98, 2, 97, 4, 50]]


def gpt_logits(params):
    """The logits for TOKEN_IDS of the chapter's GPTModel loaded with `params`."""
    import torch

    from previous_chapters import GPTModel, load_weights_into_gpt

    gpt = GPTModel({"vocab_size": 100, "context_length": 16, "emb_dim": 8, "n_heads": 2,
                    "n_layers": 2, "drop_rate": 0.0, "qkv_bias": True})
    load_weights_into_gpt(gpt, params)
    with torch.no_grad():
        return gpt.eval()(torch.tensor(TOKEN_IDS))


def test_logits_match_transformers_gpt2(served_root):
    import torch

    params = load_gpt2_params_from_tf_ckpt(str(served_root / "124M" / "model.ckpt"), SETTINGS)
    with torch.no_grad():
        theirs = transformers_gpt2(params)(torch.tensor(TOKEN_IDS)).logits
    ours = gpt_logits(params)
    assert ours.shape == (2, 8, 100)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_backup_serves_what_the_primary_lacks(tmp_path, tmp_path_factory, served_root, serve):
    partial_root = tmp_path_factory.mktemp("primary")
    (partial_root / "124M").mkdir()
    for name in ("checkpoint", "encoder.json", "vocab.bpe"):
        shutil.copy(served_root / "124M" / name, partial_root / "124M" / name)
    primary_url, primary = serve(partial_root)
    backup_url, backup = serve(served_root)

    settings, params = download_and_load_gpt2("124M", str(tmp_path), base_url=primary_url,
                                              backup_base_url=backup_url)
    assert settings == SETTINGS
    assert_same_params(params, expected_params())
    assert get_paths(primary) == [f"/124M/{name}" for name in FILENAMES]  # 404 for four of them
    assert get_paths(backup) == ["/124M/hparams.json", f"/124M/{DATA_FILE}",
                                 "/124M/model.ckpt.index", "/124M/model.ckpt.meta"]


def test_primary_down_backup_serves_everything(tmp_path, served_root, serve, closed_port):
    backup_url, backup = serve(served_root)
    settings, _ = download_and_load_gpt2("124M", str(tmp_path), base_url=closed_port,
                                         backup_base_url=backup_url)
    assert settings == SETTINGS
    assert get_paths(backup) == [f"/124M/{name}" for name in FILENAMES]


def test_second_call_skips_files_that_are_up_to_date(tmp_path, served_root, serve, closed_port,
                                                     capsys):
    url, server = serve(served_root)
    download_and_load_gpt2("124M", str(tmp_path), base_url=url, backup_base_url=closed_port)
    server.requests.clear()
    capsys.readouterr()

    settings, params = download_and_load_gpt2("124M", str(tmp_path), base_url=url,
                                              backup_base_url=closed_port)
    out = capsys.readouterr().out
    model_dir = os.path.join(str(tmp_path), "124M")
    assert out.splitlines() == [
        f"File already exists and is up-to-date: {os.path.join(model_dir, name)}"
        for name in FILENAMES]
    assert server.requests == [("HEAD", f"/124M/{name}") for name in FILENAMES]
    assert settings == SETTINGS
    assert_same_params(params, expected_params())


def test_file_of_another_size_is_downloaded_again(tmp_path, served_root, serve, closed_port):
    url, server = serve(served_root)
    download_and_load_gpt2("124M", str(tmp_path), base_url=url, backup_base_url=closed_port)
    (tmp_path / "124M" / "hparams.json").write_text("{}")
    server.requests.clear()

    settings, _ = download_and_load_gpt2("124M", str(tmp_path), base_url=url,
                                         backup_base_url=closed_port)
    assert settings == SETTINGS
    assert get_paths(server) == ["/124M/hparams.json"]


def test_interrupted_download_leaves_no_file_and_recovers(tmp_path, served_root, serve,
                                                         closed_port):
    dropping_url, dropping = serve(served_root, DroppingHandler)
    with pytest.raises(DownloadError) as exc_info:
        download_and_load_gpt2("124M", str(tmp_path), base_url=dropping_url,
                               backup_base_url=closed_port)
    size = (served_root / "124M" / DATA_FILE).stat().st_size
    assert str(exc_info.value) == (
        f"Could not download {DATA_FILE}: tried {dropping_url}/124M/{DATA_FILE} (connection "
        f"closed after {size // 2} of {size} bytes); {closed_port}/124M/{DATA_FILE} {REFUSED}. "
        f"To place the files by hand, download {DATA_FILE}, model.ckpt.index, model.ckpt.meta, "
        f"vocab.bpe from {dropping_url}/124M/ or {closed_port}/124M/ into {tmp_path / '124M'}")
    model_dir = tmp_path / "124M"
    assert sorted(os.listdir(model_dir)) == ["checkpoint", "encoder.json", "hparams.json"]

    (model_dir / f"{DATA_FILE}.part").write_bytes(b"stale bytes from an earlier crash")
    url, server = serve(served_root)
    settings, params = download_and_load_gpt2("124M", str(tmp_path), base_url=url,
                                              backup_base_url=closed_port)
    assert_same_params(params, expected_params())
    assert sorted(os.listdir(model_dir)) == sorted(FILENAMES)
    assert (model_dir / DATA_FILE).read_bytes() == (served_root / "124M" / DATA_FILE).read_bytes()
    assert get_paths(server) == [f"/124M/{name}" for name in FILENAMES[3:]]


def test_interrupted_primary_falls_back_to_backup(tmp_path, served_root, serve):
    dropping_url, dropping = serve(served_root, DroppingHandler)
    backup_url, backup = serve(served_root)
    _, params = download_and_load_gpt2("124M", str(tmp_path), base_url=dropping_url,
                                       backup_base_url=backup_url)
    assert_same_params(params, expected_params())
    assert get_paths(backup) == [f"/124M/{DATA_FILE}"]


def test_offline_uses_the_files_already_there(tmp_path, served_root, serve, closed_port, capsys):
    url, _ = serve(served_root)
    download_and_load_gpt2("124M", str(tmp_path), base_url=url, backup_base_url=closed_port)
    capsys.readouterr()

    settings, params = download_and_load_gpt2("124M", str(tmp_path), base_url=closed_port,
                                              backup_base_url=closed_port + "/backup")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"Warning: could not reach {closed_port}/124M/checkpoint {REFUSED}"
        f" nor {closed_port}/backup/124M/checkpoint {REFUSED}; "
        f"using the files already in {os.path.join(str(tmp_path), '124M')}\n")
    assert settings == SETTINGS
    assert_same_params(params, expected_params())


def test_offline_with_silent_servers_times_out_once(tmp_path, served_root, serve, closed_port,
                                                    capsys, monkeypatch):
    url, _ = serve(served_root)
    download_and_load_gpt2("124M", str(tmp_path), base_url=url, backup_base_url=closed_port)
    capsys.readouterr()
    monkeypatch.setattr(gpt_download, "TIMEOUT_S", 0.2)
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        silent_url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        start = time.perf_counter()
        settings, _ = download_and_load_gpt2("124M", str(tmp_path), base_url=silent_url,
                                             backup_base_url=silent_url + "/backup")
        elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert err.startswith(f"Warning: could not reach {silent_url}/124M/checkpoint (timed out)")
    assert err.count("\n") == 1
    assert settings == SETTINGS
    assert elapsed < 2.0  # two timeouts, not fourteen


def test_missing_file_offline_names_file_and_urls(tmp_path, closed_port):
    with pytest.raises(DownloadError) as exc_info:
        download_and_load_gpt2("124M", str(tmp_path), base_url=closed_port,
                               backup_base_url=closed_port + "/backup")
    model_dir = os.path.join(str(tmp_path), "124M")
    assert str(exc_info.value) == (
        f"Could not download checkpoint: tried {closed_port}/124M/checkpoint {REFUSED}; "
        f"{closed_port}/backup/124M/checkpoint {REFUSED}. To place the files by hand, download "
        f"{', '.join(FILENAMES)} from {closed_port}/124M/ or {closed_port}/backup/124M/ "
        f"into {model_dir}")
    assert os.listdir(model_dir) == []


def test_one_missing_file_offline_is_named(tmp_path, served_root, serve, closed_port, capsys):
    url, _ = serve(served_root)
    download_and_load_gpt2("124M", str(tmp_path), base_url=url, backup_base_url=closed_port)
    os.remove(tmp_path / "124M" / "hparams.json")
    with pytest.raises(DownloadError) as exc_info:
        download_and_load_gpt2("124M", str(tmp_path), base_url=closed_port,
                               backup_base_url=closed_port)
    assert str(exc_info.value) == (
        f"Could not download hparams.json: tried {closed_port}/124M/hparams.json {REFUSED}; "
        f"{closed_port}/124M/hparams.json {REFUSED}. To place the files by hand, download "
        f"hparams.json from {closed_port}/124M/ or {closed_port}/124M/ into {tmp_path / '124M'}")
    assert "Warning: could not reach" in capsys.readouterr().err


def test_unknown_size_is_refused_before_any_request(tmp_path, served_root, serve):
    url, server = serve(served_root)
    with pytest.raises(ValueError, match=r"'500M': choose one of 124M, 355M, 774M, 1558M$"):
        download_and_load_gpt2("500M", str(tmp_path), base_url=url, backup_base_url=url)
    assert server.requests == []
    assert os.listdir(tmp_path) == []


def test_checkpoint_file_naming_no_checkpoint_is_reported(tmp_path, served_root, serve,
                                                          closed_port):
    url, _ = serve(served_root)
    download_and_load_gpt2("124M", str(tmp_path), base_url=url, backup_base_url=closed_port)
    (tmp_path / "124M" / "checkpoint").write_text('model_checkpoint_path: "elsewhere.ckpt"\n')
    with pytest.raises(DownloadError) as exc_info:
        download_and_load_gpt2("124M", str(tmp_path), base_url=closed_port,
                               backup_base_url=closed_port)
    assert str(exc_info.value) == (
        f"The 'checkpoint' file in {tmp_path / '124M'} names no checkpoint there: "
        "delete it and run again to download it afresh")


# --- model.safetensors: Hugging Face's copy of the same weights, read without TensorFlow ---


def hf_tensors(arrays, prefix=""):
    """OpenAI-named arrays under Hugging Face's names, after `prefix`: `model/h0/attn/c_attn/w`
    becomes `h.0.attn.c_attn.weight` without its leading 1, `model/ln_f/g` `ln_f.weight`."""
    leaf = {"w": "weight", "g": "weight", "b": "bias"}
    tensors = {}
    for name, array in arrays.items():
        scope, *rest = name.split("/")[1:]
        if not rest:
            tensors[f"{prefix}{scope}.weight"] = array
            continue
        module = f"h.{scope[1:]}" if scope.startswith("h") else scope
        tensors[prefix + ".".join([module, *rest[:-1], leaf[rest[-1]]])] = (
            array[0] if rest[-1] == "w" else array)
    return tensors


def write_safetensors(path, tensors):
    """Write {name: array} as a safetensors file with the `safetensors` package."""
    from safetensors.numpy import save_file

    save_file({name: np.ascontiguousarray(a) for name, a in tensors.items()}, str(path))


@pytest.fixture(scope="session")
def hf_root(tmp_path_factory, gpt2_vocab_dir):
    """A folder as RedirectingHandler serves Hugging Face: cdn/gpt2/model.safetensors, written by
    transformers' `save_pretrained` from the weights of `served_root`'s TF checkpoint, and GPT-2's
    real vocab.json (encoder.json's mapping, written compactly) and merges.txt (vocab.bpe)."""
    saved = tmp_path_factory.mktemp("saved")
    transformers_gpt2(expected_params()).save_pretrained(str(saved))
    root = tmp_path_factory.mktemp("hub")
    repo = root / "cdn" / "gpt2"
    repo.mkdir(parents=True)
    shutil.copy(saved / ST_FILE, repo / ST_FILE)
    encoder = json.loads((gpt2_vocab_dir / "encoder.json").read_text(encoding="utf-8"))
    (repo / "vocab.json").write_text(json.dumps(encoder, ensure_ascii=False, separators=(",", ":")),
                                     encoding="utf-8")
    shutil.copyfile(gpt2_vocab_dir / "vocab.bpe", repo / "merges.txt")
    return root


def test_safetensors_gives_the_tf_checkpoints_params_and_logits(tmp_path, served_root, hf_root,
                                                                  serve, monkeypatch):
    import torch

    tf_params = load_gpt2_params_from_tf_ckpt(str(served_root / "124M" / "model.ckpt"), SETTINGS)
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    url, server = serve(hf_root, RedirectingHandler)
    settings, params = download_and_load_gpt2_safetensors("124M", str(tmp_path), base_url=url)

    assert settings == SETTINGS
    assert_same_params(params, tf_params)
    assert isinstance(params["blocks"][1]["mlp"]["c_fc"]["w"], np.memmap)
    ours = gpt_logits(params)
    torch.testing.assert_close(ours, gpt_logits(tf_params), atol=0, rtol=0)
    with torch.no_grad():
        theirs = transformers_gpt2(tf_params)(torch.tensor(TOKEN_IDS)).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert sorted(os.listdir(tmp_path / "124M")) == sorted(HF_FILES)
    for name in HF_FILES:
        served = hf_root / "cdn" / "gpt2" / name
        assert (tmp_path / "124M" / name).read_bytes() == served.read_bytes()
    assert server.requests == [request for name in HF_FILES for request in (
        ("GET", f"/gpt2/resolve/main/{name}"), ("GET", f"/cdn/gpt2/{name}"))]


def test_safetensors_download_brings_a_tokenizer_that_works_offline(tmp_path, hf_root, serve,
                                                                    tokenizer, tiktoken_offline,
                                                                    no_tensorflow):
    url, _ = serve(hf_root, RedirectingHandler)
    download_and_load_gpt2_safetensors("124M", str(tmp_path), base_url=url)
    text = "Convert 45 kilometers to meters.<|endoftext|>"
    special = {"<|endoftext|>"}
    assert (gpt2_tokenizer(str(tmp_path)).encode(text, allowed_special=special)
            == tokenizer.encode(text, allowed_special=special))


def test_safetensors_offline_without_the_tokenizer_files_names_them(tmp_path, hf_root,
                                                                    closed_port, no_tensorflow):
    model_dir = tmp_path / "124M"
    model_dir.mkdir()
    shutil.copyfile(hf_root / "cdn" / "gpt2" / ST_FILE, model_dir / ST_FILE)
    with pytest.raises(DownloadError) as exc_info:
        download_and_load_gpt2_safetensors("124M", str(tmp_path), base_url=closed_port)
    assert str(exc_info.value) == (
        f"Could not download vocab.json: tried {closed_port}/gpt2/resolve/main/vocab.json "
        f"{REFUSED}. To place the files by hand, download vocab.json, merges.txt from "
        f"{closed_port}/gpt2/resolve/main/ into {model_dir}")


def test_safetensors_path_runs_where_tensorflow_cannot_be_imported(tmp_path, hf_root, serve):
    url, _ = serve(hf_root, RedirectingHandler)
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "tensorflow.py").write_text("raise ImportError('TensorFlow is not installed')\n")
    script = "\n".join([
        "import json, sys",
        "import torch",
        "import gpt_download",
        "from previous_chapters import GPTModel, load_weights_into_gpt",
        f"gpt_download.GPT2_SETTINGS['124M'] = {SETTINGS!r}",
        "settings, params = gpt_download.download_and_load_gpt2_safetensors(",
        f"    '124M', {str(tmp_path / 'models')!r}, base_url={url!r})",
        "gpt = GPTModel({'vocab_size': 100, 'context_length': 16, 'emb_dim': 8, 'n_heads': 2,",
        "                'n_layers': 2, 'drop_rate': 0.0, 'qkv_bias': True}).eval()",
        "load_weights_into_gpt(gpt, params)",
        "with torch.no_grad():",
        f"    logits = gpt(torch.tensor({TOKEN_IDS!r}))",
        "tf_modules = [name for name in sys.modules if name.startswith('tensorflow')]",
        "print(json.dumps({'settings': settings, 'logits': logits.tolist(),",
        "                  'tf_modules': tf_modules}))",
    ])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), str(REPO)])}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["settings"] == SETTINGS
    assert report["tf_modules"] == []  # nothing even tried: the shim would have failed the run
    np.testing.assert_allclose(report["logits"], gpt_logits(expected_params()).numpy(),
                               atol=1e-6, rtol=0)


def with_mask_buffers(tensors):
    """`tensors` plus the causal-mask buffers that some GPT-2 files carry in every layer."""
    mask = np.tril(np.ones((1, 1, SETTINGS["n_ctx"], SETTINGS["n_ctx"]), np.float32))
    buffers = {}
    for i in range(SETTINGS["n_layer"]):
        buffers[f"h.{i}.attn.bias"] = mask
        buffers[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    return {**tensors, **buffers}


@pytest.mark.parametrize("variant", ["plain names", "transformer. prefix", "mask buffers"])
def test_safetensors_name_variants_give_the_same_params(tmp_path, variant, no_tensorflow):
    arrays = tiny_gpt2_arrays(SETTINGS)
    tensors = {
        "plain names": lambda: hf_tensors(arrays),
        "transformer. prefix": lambda: {**hf_tensors(arrays, "transformer."),
                                        "lm_head.weight": arrays["model/wte"].copy()},
        "mask buffers": lambda: with_mask_buffers(hf_tensors(arrays)),
    }[variant]()
    write_safetensors(tmp_path / ST_FILE, tensors)
    expected = expected_params()
    if "lm_head.weight" in tensors:  # a head of its own comes back, here a copy of wte
        expected["lm_head"] = expected["wte"]
    assert_same_params(load_gpt2_params_from_safetensors(tmp_path / ST_FILE, SETTINGS),
                       expected)


def test_an_untied_output_head_is_loaded_into_out_head(tmp_path, no_tensorflow):
    import torch

    from previous_chapters import GPTModel, load_weights_into_gpt

    arrays = tiny_gpt2_arrays(SETTINGS)
    head = np.random.default_rng(1).normal(size=arrays["model/wte"].shape).astype(np.float32)
    write_safetensors(tmp_path / ST_FILE, {**hf_tensors(arrays), "lm_head.weight": head})
    params = load_gpt2_params_from_safetensors(tmp_path / ST_FILE, SETTINGS)
    model = GPTModel({"vocab_size": 100, "context_length": 16, "emb_dim": 8, "n_heads": 2,
                      "n_layers": 2, "drop_rate": 0.0, "qkv_bias": True})
    load_weights_into_gpt(model, params)
    assert torch.equal(model.out_head.weight, torch.from_numpy(head))
    assert torch.equal(model.tok_emb.weight, torch.from_numpy(arrays["model/wte"]))


@pytest.mark.parametrize("change, problem", [
    ({"n_layer": 3}, "holds h.2.attn.c_attn.bias, which that model has not"),
    ({"n_layer": 1}, "lacks h.1.ln_1.weight"),
    ({"n_embd": 16}, "holds wte.weight of shape [100, 16], not [100, 8]"),
], ids=["more layers", "fewer layers", "wider"])
def test_safetensors_of_another_shape_is_refused(tmp_path, change, problem, no_tensorflow):
    write_safetensors(tmp_path / ST_FILE, hf_tensors(tiny_gpt2_arrays({**SETTINGS, **change})))
    with pytest.raises(DamagedFileError) as exc_info:
        load_gpt2_params_from_safetensors(str(tmp_path / ST_FILE), SETTINGS)
    assert str(exc_info.value) == (
        f"{tmp_path / ST_FILE} does not fit the requested GPT-2 (n_layer=2, n_embd=8, "
        f"n_vocab=100, n_ctx=16): it {problem}; it is another model size's file, or damaged")


def test_safetensors_in_half_precision_is_refused(tmp_path, no_tensorflow):
    tensors = {name: a.astype(np.float16)
               for name, a in hf_tensors(tiny_gpt2_arrays(SETTINGS)).items()}
    write_safetensors(tmp_path / ST_FILE, tensors)
    with pytest.raises(DamagedFileError, match=r"stores wte.weight as F16: only float32 \(F32\)"):
        load_gpt2_params_from_safetensors(str(tmp_path / ST_FILE), SETTINGS)


def test_smaller_models_file_in_the_355m_folder_is_refused_offline(tmp_path, hf_root, closed_port,
                                                                   capsys, no_tensorflow):
    model_dir = copy_of(hf_root / "cdn" / "gpt2", tmp_path / "355M")
    write_safetensors(model_dir / ST_FILE, hf_tensors(tiny_gpt2_arrays(SETTINGS)))
    with pytest.raises(DownloadError) as exc_info:
        download_and_load_gpt2_safetensors("355M", str(tmp_path), base_url=closed_port)
    assert str(exc_info.value) == (
        f"{model_dir / ST_FILE} does not fit the requested GPT-2 (n_layer=24, n_embd=1024, "
        "n_vocab=50257, n_ctx=1024): it holds wte.weight of shape [100, 8], not [50257, 1024]; "
        "it is another model size's file, or damaged. Delete it and run again with a network to "
        "download it afresh, or download it by hand from "
        f"{closed_port}/gpt2-medium/resolve/main/{ST_FILE} into {model_dir}")
    assert capsys.readouterr().err.startswith("Warning: could not reach")


def test_safetensors_offline_uses_the_file_already_there(tmp_path, hf_root, serve, closed_port,
                                                         capsys, no_tensorflow):
    url, _ = serve(hf_root, RedirectingHandler)
    download_and_load_gpt2_safetensors("124M", str(tmp_path), base_url=url)
    capsys.readouterr()

    settings, params = download_and_load_gpt2_safetensors("124M", str(tmp_path),
                                                          base_url=closed_port)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"Warning: could not reach {closed_port}{ST_PATH} {REFUSED}; "
        f"using the files already in {os.path.join(str(tmp_path), '124M')}\n")
    assert settings == SETTINGS
    assert_same_params(params, expected_params())


def test_safetensors_second_call_skips_the_up_to_date_file(tmp_path, hf_root, serve, capsys,
                                                           no_tensorflow):
    url, server = serve(hf_root, RedirectingHandler)
    download_and_load_gpt2_safetensors("124M", str(tmp_path), base_url=url)
    server.requests.clear()
    capsys.readouterr()

    _, params = download_and_load_gpt2_safetensors("124M", str(tmp_path), base_url=url)
    assert capsys.readouterr().out.splitlines() == [
        f"File already exists and is up-to-date: {os.path.join(str(tmp_path), '124M', name)}"
        for name in HF_FILES]
    assert server.requests[0] == ("HEAD", ST_PATH)  # the redirect is followed for the size only
    assert ("GET", ST_PATH) not in server.requests
    assert_same_params(params, expected_params())


def test_safetensors_interrupted_download_leaves_no_file_and_recovers(tmp_path, hf_root, serve,
                                                                      no_tensorflow):
    dropping_url, _ = serve(hf_root, DroppingHubHandler)
    model_dir = tmp_path / "124M"
    with pytest.raises(DownloadError) as exc_info:
        download_and_load_gpt2_safetensors("124M", str(tmp_path), base_url=dropping_url)
    size = (hf_root / "cdn" / "gpt2" / ST_FILE).stat().st_size
    assert str(exc_info.value) == (
        f"Could not download {ST_FILE}: tried {dropping_url}{ST_PATH} (connection closed "
        f"after {size // 2} of {size} bytes). To place the files by hand, download {ST_FILE}, "
        f"vocab.json, merges.txt from {dropping_url}/gpt2/resolve/main/ into {model_dir}")
    assert os.listdir(model_dir) == []

    url, _ = serve(hf_root, RedirectingHandler)
    _, params = download_and_load_gpt2_safetensors("124M", str(tmp_path), base_url=url)
    assert_same_params(params, expected_params())
    assert sorted(os.listdir(model_dir)) == sorted(HF_FILES)


def test_safetensors_unknown_size_is_refused_before_any_request(tmp_path, hf_root, serve):
    url, server = serve(hf_root, RedirectingHandler)
    with pytest.raises(ValueError, match=r"'500M': choose one of 124M, 355M, 774M, 1558M$"):
        download_and_load_gpt2_safetensors("500M", str(tmp_path), base_url=url)
    assert server.requests == []


# --- files on disk cut short or of another size (an interrupted manual copy), no network ---


def copy_of(served_dir, destination):
    """A copy of a served model folder, as a manual copy would leave it."""
    shutil.copytree(served_dir, destination)
    return destination


def cut_short(path, size=None):
    """Keep only the first `size` bytes of `path` (by default half of them)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if size is None else size])


def test_truncated_tf_data_file_offline_names_it(tmp_path, served_root, closed_port):
    model_dir = copy_of(served_root / "124M", tmp_path / "124M")
    cut_short(model_dir / DATA_FILE)
    with pytest.raises(DownloadError) as exc_info:
        download_and_load_gpt2("124M", str(tmp_path), base_url=closed_port,
                               backup_base_url=closed_port + "/backup")
    assert str(exc_info.value) == (
        f"{model_dir / DATA_FILE} cannot be read (Read less bytes than requested): it is cut "
        "short or damaged. Delete it and run again with a network to download it afresh, or "
        f"download it by hand from {closed_port}/124M/{DATA_FILE} or "
        f"{closed_port}/backup/124M/{DATA_FILE} into {model_dir}")


def test_truncated_tf_index_file_offline_names_it(tmp_path, served_root, closed_port):
    model_dir = copy_of(served_root / "124M", tmp_path / "124M")
    cut_short(model_dir / "model.ckpt.index")
    index_url = re.escape(f"{closed_port}/124M/model.ckpt.index")
    with pytest.raises(DownloadError, match=(
            rf"^{re.escape(str(model_dir / 'model.ckpt.index'))} cannot be read \(.+\): it is "
            rf"cut short or damaged\. Delete it .* from {index_url} or {index_url} into")):
        download_and_load_gpt2("124M", str(tmp_path), base_url=closed_port,
                               backup_base_url=closed_port)


ANOTHER_SIZE = {**SETTINGS, "n_layer": 24}


@pytest.mark.parametrize("text, problem", [
    (json.dumps(ANOTHER_SIZE), f"describes {ANOTHER_SIZE}, not GPT-2 124M: {SETTINGS}. Delete it"),
    ('{"n_vocab": 100, "n_ctx"', "is damaged (Expecting ':' delimiter"),
], ids=["another size", "not JSON"])
def test_hparams_of_another_size_or_damaged_offline_is_named(tmp_path, served_root, closed_port,
                                                             text, problem):
    model_dir = copy_of(served_root / "124M", tmp_path / "124M")
    (model_dir / "hparams.json").write_text(text)
    with pytest.raises(DownloadError) as exc_info:
        download_and_load_gpt2("124M", str(tmp_path), base_url=closed_port,
                               backup_base_url=closed_port)
    assert str(exc_info.value).startswith(f"{model_dir / 'hparams.json'} ")
    assert problem in str(exc_info.value)
    assert str(exc_info.value).endswith(
        f"download it by hand from {closed_port}/124M/hparams.json or "
        f"{closed_port}/124M/hparams.json into {model_dir}")


def test_tf_checkpoint_of_another_shape_is_refused(served_root):
    with pytest.raises(DamagedFileError) as exc_info:
        load_gpt2_params_from_tf_ckpt(str(served_root / "124M" / "model.ckpt"),
                                      {**SETTINGS, "n_layer": 3})
    assert str(exc_info.value) == (
        f"{served_root / '124M' / DATA_FILE} does not fit the requested GPT-2 (n_layer=3, "
        "n_embd=8, n_vocab=100, n_ctx=16): it lacks model/h2/ln_1/g; it is another model "
        "size's file, or damaged")


@pytest.mark.parametrize("size", [100, None], ids=["in the header", "in the data"])
def test_truncated_safetensors_offline_names_it(tmp_path, hf_root, closed_port, size,
                                                no_tensorflow):
    model_dir = copy_of(hf_root / "cdn" / "gpt2", tmp_path / "124M")
    cut_short(model_dir / ST_FILE, size)
    with pytest.raises(DownloadError) as exc_info:
        download_and_load_gpt2_safetensors("124M", str(tmp_path), base_url=closed_port)
    message = str(exc_info.value)
    left = (model_dir / ST_FILE).stat().st_size
    assert message.startswith(f"{model_dir / ST_FILE} is cut short")
    assert f"the file has {left}" in message
    assert message.endswith(
        ". Delete it and run again with a network to download it afresh, or download it by "
        f"hand from {closed_port}{ST_PATH} into {model_dir}")


@pytest.mark.parametrize("weights", ["tf", "safetensors"])
def test_truncated_file_is_fetched_again_online(tmp_path, served_root, hf_root, serve,
                                                closed_port, weights):
    if weights == "tf":
        model_dir = copy_of(served_root / "124M", tmp_path / "124M")
        name, (url, server) = DATA_FILE, serve(served_root)
        cut_short(model_dir / name)
        _, params = download_and_load_gpt2("124M", str(tmp_path), base_url=url,
                                           backup_base_url=closed_port)
        assert get_paths(server) == [f"/124M/{name}"]
    else:
        model_dir = copy_of(hf_root / "cdn" / "gpt2", tmp_path / "124M")
        name, (url, server) = ST_FILE, serve(hf_root, RedirectingHandler)
        cut_short(model_dir / name)
        _, params = download_and_load_gpt2_safetensors("124M", str(tmp_path), base_url=url)
        assert ("GET", f"/cdn/gpt2/{name}") in server.requests
    assert_same_params(params, expected_params())


# --- the main script's --weights flag: the same model from either file ---


def test_main_script_gives_the_same_initial_losses_from_either_file(tmp_path, closed_port,
                                                                     monkeypatch, capsys):
    import gpt_instruction_finetuning as ft

    settings = {"n_vocab": 50257, "n_ctx": 256, "n_embd": 8, "n_head": 2, "n_layer": 1}
    arrays = tiny_gpt2_arrays(settings)
    models_dir = tmp_path / "gpt2"
    (models_dir / "124M").mkdir(parents=True)
    write_tf1_checkpoint(str(models_dir / "124M"), arrays)
    (models_dir / "124M" / "hparams.json").write_text(json.dumps(settings))
    for name in ("encoder.json", "vocab.bpe", *HF_TOKENIZER_FILENAMES):
        (models_dir / "124M" / name).write_text("not read")
    write_safetensors(models_dir / "124M" / ST_FILE, hf_tensors(arrays))
    monkeypatch.setitem(gpt_download.GPT2_SETTINGS, "124M", settings)
    monkeypatch.setitem(ft.MODEL_CONFIGS, "124M",
                        ("gpt2-small (124M)", {"emb_dim": 8, "n_layers": 1, "n_heads": 2}))
    monkeypatch.setitem(ft.BASE_CONFIG, "context_length", 256)
    monkeypatch.setattr(ft, "download_and_load_gpt2", functools.partial(
        download_and_load_gpt2, base_url=closed_port, backup_base_url=closed_port))
    monkeypatch.setattr(ft, "download_and_load_gpt2_safetensors", functools.partial(
        download_and_load_gpt2_safetensors, base_url=closed_port))
    data = [{"instruction": f"Add {i} and 1.", "input": "", "output": f"{i + 1}"}
            for i in range(20)]
    (tmp_path / "data.json").write_text(json.dumps(data))

    def initial_losses(weights):
        ft.main(["--model", "124M", "--weights", weights, "--models_dir", str(models_dir),
                 "--data_path", str(tmp_path / "data.json"), "--epochs", "1",
                 "--max_new_tokens", "1", "--output_dir", str(tmp_path / weights)])
        lines = capsys.readouterr().out.splitlines()
        start = lines.index("Initial losses")
        return lines[start + 1:start + 3]

    from_tf = initial_losses("tf")
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # as where it is not installed
    assert initial_losses("safetensors") == from_tf
    assert from_tf[0].startswith("   Training loss: ")
