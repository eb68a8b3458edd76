"""gpt_download.py against loopback servers holding a tiny checkpoint in OpenAI's exact layout."""

import errno
import functools
import http.server
import json
import os
import shutil
import socket
import threading
import time

import numpy as np
import pytest

import gpt_download
from gpt_download import (
    FILENAMES,
    DownloadError,
    download_and_load_gpt2,
    load_gpt2_params_from_tf_ckpt,
)

SETTINGS = {"n_vocab": 100, "n_ctx": 16, "n_embd": 8, "n_head": 2, "n_layer": 2}
DATA_FILE = "model.ckpt.data-00000-of-00001"
REFUSED = f"([Errno {errno.ECONNREFUSED}] {os.strerror(errno.ECONNREFUSED)})"


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


class DroppingHandler(LoggingHandler):
    """Announces the full size of the data file but sends only half of it, then hangs up."""

    def do_GET(self):
        if not self.path.endswith(DATA_FILE):
            return super().do_GET()
        self.server.requests.append(("GET", self.path))
        with open(self.translate_path(self.path), "rb") as f:
            body = f.read()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.close_connection = True


@pytest.fixture
def serve():
    """serve(root, handler) -> base URL of a loopback server; the server's .requests logs it."""
    servers = []

    def start(root, handler=LoggingHandler):
        server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
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


def test_logits_match_transformers_gpt2(served_root):
    import torch
    import transformers

    from previous_chapters import GPTModel, load_weights_into_gpt

    params = load_gpt2_params_from_tf_ckpt(str(served_root / "124M" / "model.ckpt"), SETTINGS)
    gpt = GPTModel({"vocab_size": 100, "context_length": 16, "emb_dim": 8, "n_heads": 2,
                    "n_layers": 2, "drop_rate": 0.0, "qkv_bias": True})
    load_weights_into_gpt(gpt, params)

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

    gpt.eval()
    hf.eval()
    token_ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79], [0, 99, 1, 98, 2, 97, 4, 50]])
    with torch.no_grad():
        ours = gpt(token_ids)
        theirs = hf(token_ids).logits
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
