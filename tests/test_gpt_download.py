"""gpt_download.py against a loopback server holding a tiny checkpoint in OpenAI's layout."""

import functools
import http.server
import json
import socket
import threading

import numpy as np
import pytest
import torch

from gpt_download import FILENAMES, DownloadError, download_and_load_gpt2
from previous_chapters import GPTModel, load_weights_into_gpt

HPARAMS = {"n_vocab": 300, "n_ctx": 16, "n_embd": 8, "n_head": 2, "n_layer": 2}


def checkpoint_arrays():
    """Random weights named and shaped as in OpenAI's GPT-2 checkpoints."""
    rng = np.random.default_rng(0)
    d, v, n = HPARAMS["n_embd"], HPARAMS["n_vocab"], HPARAMS["n_ctx"]

    def rand(*shape):
        return rng.normal(0, 0.3, shape).astype(np.float32)

    arrays = {"model/wte": rand(v, d), "model/wpe": rand(n, d),
              "model/ln_f/g": rand(d), "model/ln_f/b": rand(d)}
    for i in range(HPARAMS["n_layer"]):
        h = f"model/h{i}/"
        arrays.update({
            h + "ln_1/g": rand(d), h + "ln_1/b": rand(d),
            h + "attn/c_attn/w": rand(1, d, 3 * d), h + "attn/c_attn/b": rand(3 * d),
            h + "attn/c_proj/w": rand(1, d, d), h + "attn/c_proj/b": rand(d),
            h + "ln_2/g": rand(d), h + "ln_2/b": rand(d),
            h + "mlp/c_fc/w": rand(1, d, 4 * d), h + "mlp/c_fc/b": rand(4 * d),
            h + "mlp/c_proj/w": rand(1, 4 * d, d), h + "mlp/c_proj/b": rand(d),
        })
    return arrays


@pytest.fixture(scope="module")
def served_root(tmp_path_factory):
    """A folder `<root>/124M/` with the seven files, written as OpenAI's are."""
    import tensorflow as tf

    root = tmp_path_factory.mktemp("bucket")
    folder = root / "124M"
    folder.mkdir()
    arrays = checkpoint_arrays()
    graph = tf.Graph()
    with graph.as_default():
        variables = {name: tf.compat.v1.Variable(value, name=name.replace("/", "_"))
                     for name, value in arrays.items()}
        saver = tf.compat.v1.train.Saver(var_list=variables)
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            saver.save(session, str(folder / "model.ckpt"))
    # OpenAI's checkpoint index names the model relative to its folder.
    (folder / "checkpoint").write_text('model_checkpoint_path: "model.ckpt"\n'
                                       'all_model_checkpoint_paths: "model.ckpt"\n')
    (folder / "hparams.json").write_text(json.dumps(HPARAMS, indent=2))
    (folder / "encoder.json").write_text(json.dumps({"!": 0, '"': 1}))
    (folder / "vocab.bpe").write_text("#version: 0.2\nĠ t\n")
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILENAMES)
    return root, arrays


class Server:
    """A static file server on 127.0.0.1 that records the paths asked for."""

    def __init__(self, directory, handler_class=http.server.SimpleHTTPRequestHandler):
        self.requests = []
        requests = self.requests

        class Handler(handler_class):
            def log_request(self, *args):
                requests.append((self.command, self.path))

            def log_message(self, *args):
                pass  # keep the test output quiet

        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(directory)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(served_root):
    s = Server(served_root[0])
    yield s
    s.close()


@pytest.fixture
def empty_server(tmp_path):
    """A server that answers 404 to everything."""
    empty = tmp_path / "empty"
    empty.mkdir()
    s = Server(empty)
    yield s
    s.close()


@pytest.fixture
def closed_port():
    """A loopback URL where nothing listens: the network is down."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_download_and_load_every_tensor(tmp_path, served_root, server, closed_port, capsys):
    settings, params = download_and_load_gpt2("124M", str(tmp_path), base_url=server.url,
                                              backup_base_url=closed_port)
    assert settings == HPARAMS
    _, arrays = served_root
    assert sorted(p.name for p in (tmp_path / "124M").iterdir()) == sorted(FILENAMES)
    np.testing.assert_array_equal(params["wte"], arrays["model/wte"])
    np.testing.assert_array_equal(params["wpe"], arrays["model/wpe"])
    np.testing.assert_array_equal(params["g"], arrays["model/ln_f/g"])
    np.testing.assert_array_equal(params["b"], arrays["model/ln_f/b"])
    assert len(params["blocks"]) == 2
    for i, block in enumerate(params["blocks"]):
        for path in ["ln_1/g", "ln_1/b", "ln_2/g", "ln_2/b", "attn/c_attn/w", "attn/c_attn/b",
                     "attn/c_proj/w", "attn/c_proj/b", "mlp/c_fc/w", "mlp/c_fc/b",
                     "mlp/c_proj/w", "mlp/c_proj/b"]:
            got = functools.reduce(lambda node, key: node[key], path.split("/"), block)
            expected = arrays[f"model/h{i}/{path}"]
            if expected.ndim == 3:  # (1, in, out) in the checkpoint, (in, out) in params
                expected = expected[0]
            np.testing.assert_array_equal(got, expected)
    assert params["blocks"][0]["attn"]["c_attn"]["w"].shape == (8, 24)
    assert all(path.startswith("/124M/") for _, path in server.requests)


def test_loaded_weights_give_transformers_logits(tmp_path, server, closed_port):
    from transformers import GPT2Config, GPT2LMHeadModel

    settings, params = download_and_load_gpt2("124M", str(tmp_path), base_url=server.url,
                                              backup_base_url=closed_port)
    cfg = {"vocab_size": 300, "context_length": 16, "emb_dim": 8, "n_heads": 2, "n_layers": 2,
           "drop_rate": 0.0, "qkv_bias": True}
    ours = GPTModel(cfg).eval()
    load_weights_into_gpt(ours, params)

    config = GPT2Config(vocab_size=300, n_positions=16, n_embd=8, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        layer_norm_epsilon=1e-5, activation_function="gelu_new")
    theirs = GPT2LMHeadModel(config).eval()
    state = {"transformer.wte.weight": params["wte"], "transformer.wpe.weight": params["wpe"],
             "transformer.ln_f.weight": params["g"], "transformer.ln_f.bias": params["b"],
             "lm_head.weight": params["wte"]}
    for i, block in enumerate(params["blocks"]):
        for module, inner in [("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"),
                              ("mlp", "c_proj")]:
            state[f"transformer.h.{i}.{module}.{inner}.weight"] = block[module][inner]["w"]
            state[f"transformer.h.{i}.{module}.{inner}.bias"] = block[module][inner]["b"]
        for norm in ("ln_1", "ln_2"):
            state[f"transformer.h.{i}.{norm}.weight"] = block[norm]["g"]
            state[f"transformer.h.{i}.{norm}.bias"] = block[norm]["b"]
    theirs.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=False)

    idx = torch.tensor([[1, 50, 299, 7, 7, 120, 3]])
    with torch.no_grad():
        assert torch.allclose(ours(idx), theirs(idx).logits, atol=1e-4, rtol=0)


def test_backup_mirror_serves_when_the_bucket_fails(tmp_path, server, empty_server):
    download_and_load_gpt2("124M", str(tmp_path), base_url=empty_server.url,
                           backup_base_url=server.url)
    assert [path for _, path in empty_server.requests] == [f"/124M/{f}" for f in FILENAMES]
    assert [path for _, path in server.requests] == [f"/124M/{f}" for f in FILENAMES]
    assert sorted(p.name for p in (tmp_path / "124M").iterdir()) == sorted(FILENAMES)


def test_complete_files_are_not_downloaded_again(tmp_path, server, closed_port, capsys):
    download_and_load_gpt2("124M", str(tmp_path), base_url=server.url,
                           backup_base_url=closed_port)
    capsys.readouterr()
    before = {f: (tmp_path / "124M" / f).stat().st_mtime_ns for f in FILENAMES}
    download_and_load_gpt2("124M", str(tmp_path), base_url=server.url,
                           backup_base_url=closed_port)
    out = capsys.readouterr().out
    assert out.splitlines() == [f"File already exists and is up-to-date: {tmp_path}/124M/{f}"
                                for f in FILENAMES]
    assert before == {f: (tmp_path / "124M" / f).stat().st_mtime_ns for f in FILENAMES}


class DroppingHandler(http.server.SimpleHTTPRequestHandler):
    """Announces the full size of the weights file but closes after a few bytes."""

    def do_GET(self):
        if not self.path.endswith("model.ckpt.data-00000-of-00001"):
            return super().do_GET()
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        self.wfile.write(b"partial")
        self.close_connection = True


def test_interrupted_download_leaves_no_finished_file(tmp_path, served_root, server,
                                                      closed_port):
    dropping = Server(served_root[0], DroppingHandler)
    try:
        with pytest.raises(DownloadError) as exc_info:
            download_and_load_gpt2("124M", str(tmp_path), base_url=dropping.url,
                                   backup_base_url=closed_port)
    finally:
        dropping.close()
    data_file = tmp_path / "124M" / "model.ckpt.data-00000-of-00001"
    assert not data_file.exists()
    assert str(data_file) in str(exc_info.value)
    # the next run against a working server completes the file
    settings, _ = download_and_load_gpt2("124M", str(tmp_path), base_url=server.url,
                                         backup_base_url=closed_port)
    assert settings == HPARAMS
    assert data_file.stat().st_size == (served_root[0] / "124M" / data_file.name).stat().st_size


def test_offline_with_all_files_present_loads_them(tmp_path, server, closed_port, capsys):
    download_and_load_gpt2("124M", str(tmp_path), base_url=server.url,
                           backup_base_url=closed_port)
    capsys.readouterr()
    settings, params = download_and_load_gpt2("124M", str(tmp_path), base_url=closed_port,
                                              backup_base_url=closed_port)
    assert settings == HPARAMS and params["wte"].shape == (300, 8)
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert err.startswith("Warning: could not download checkpoint (")
    assert err.endswith(f"using the files already in {tmp_path}/124M\n")


def test_missing_file_while_offline_says_how_to_place_it(tmp_path, closed_port):
    with pytest.raises(DownloadError) as exc_info:
        download_and_load_gpt2("124M", str(tmp_path), base_url=closed_port,
                               backup_base_url=closed_port + "/mirror")
    message = str(exc_info.value)
    assert message.startswith(f"{tmp_path}/124M/checkpoint is missing and could not be "
                              f"downloaded ({closed_port}/124M/checkpoint: ")
    assert (f"Download it from {closed_port}/124M/checkpoint or "
            f"{closed_port}/mirror/124M/checkpoint (and likewise checkpoint, encoder.json, "
            f"hparams.json, model.ckpt.data-00000-of-00001, model.ckpt.index, model.ckpt.meta, "
            f"vocab.bpe) into {tmp_path}/124M/, then run again.") in message


def test_unknown_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"Model size not in \('124M', '355M', '774M', "
                                         r"'1558M'\): '500M'"):
        download_and_load_gpt2("500M", str(tmp_path))
    assert list(tmp_path.iterdir()) == []
