"""Download OpenAI's GPT-2 checkpoints and read their weights into NumPy arrays.

`download_and_load_gpt2` fetches the seven files of one model size from OpenAI's bucket, falling
back per file to the book's backup mirror, and returns the hyperparameters and the weights in the
nested layout that `previous_chapters.load_weights_into_gpt` expects. Files already on disk with
the server's size are kept; without a network the files already on disk are used as they are.
"""

import http.client
import json
import os
import sys
import urllib.error
import urllib.request

import numpy as np
from tqdm import tqdm

BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
BACKUP_BASE_URL = "https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2"
ALLOWED_SIZES = ("124M", "355M", "774M", "1558M")
FILENAMES = (
    "checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001",
    "model.ckpt.index", "model.ckpt.meta", "vocab.bpe",
)
TIMEOUT_S = 60
CHUNK_SIZE = 1 << 20


class DownloadError(RuntimeError):
    """A checkpoint file is not on disk and could not be fetched: the message says what to do."""


def download_and_load_gpt2(model_size, models_dir, base_url=BASE_URL,
                           backup_base_url=BACKUP_BASE_URL):
    """Return (settings, params) of OpenAI's GPT-2 `model_size`, downloaded into models_dir/size.

    settings is hparams.json (n_vocab, n_ctx, n_embd, n_head, n_layer); params holds the arrays
    as `load_gpt2_params_from_tf_ckpt` lays them out. Raises ValueError for an unknown size before
    any network access, and DownloadError when a file is missing and neither URL provides it.
    """
    if model_size not in ALLOWED_SIZES:
        raise ValueError(f"Unknown GPT-2 size {model_size!r}: choose one of "
                         f"{', '.join(ALLOWED_SIZES)}")
    model_dir = os.path.join(models_dir, model_size)
    os.makedirs(model_dir, exist_ok=True)
    fetch_model_files(model_dir, [f"{base_url}/{model_size}", f"{backup_base_url}/{model_size}"])

    with open(os.path.join(model_dir, "hparams.json"), encoding="utf-8") as f:
        settings = json.load(f)
    ckpt_path = _import_tensorflow().train.latest_checkpoint(model_dir)
    if ckpt_path is None:
        raise DownloadError(f"The 'checkpoint' file in {model_dir} names no checkpoint there: "
                            "delete it and run again to download it afresh")
    return settings, load_gpt2_params_from_tf_ckpt(ckpt_path, settings)


def fetch_model_files(model_dir, base_urls):
    """Make sure each of FILENAMES is in model_dir, fetched from the first base URL serving it.

    A base URL that cannot be reached at all (refused, no DNS, timeout) is not asked again for the
    remaining files, so a machine without network finishes at once. A file that no URL provides
    but is already on disk is used as it is, with one warning for the whole model.
    """
    unreachable = {}  # base URL -> why it could not be reached
    warned = False
    for filename in FILENAMES:
        destination = os.path.join(model_dir, filename)
        failures = _fetch_from_first_working(filename, destination, base_urls, unreachable)
        if not failures:
            continue
        if not os.path.exists(destination):
            raise DownloadError(_missing_file_message(filename, model_dir, base_urls, failures))
        if not warned:
            tried = " nor ".join(f"{url} ({reason})" for url, reason in failures)
            print(f"Warning: could not reach {tried}; using the files already in {model_dir}",
                  file=sys.stderr)
            warned = True


def _fetch_from_first_working(filename, destination, base_urls, unreachable):
    """Try `filename` at each base URL in turn; return [(url, reason)] per failure, [] on success.

    Updates `unreachable` with the base URLs that could not be connected to.
    """
    failures = []
    for base_url in base_urls:
        url = f"{base_url}/{filename}"
        if base_url in unreachable:
            failures.append((url, unreachable[base_url]))
            continue
        try:
            download_file(url, destination)
            return []
        except (OSError, http.client.HTTPException) as exc:
            reason = _describe(exc)
            failures.append((url, reason))
            if _is_unreachable(exc):
                unreachable[base_url] = reason
    return failures


def download_file(url, destination):
    """Download `url` to `destination`, unless the local file already has the server's size.

    The body goes to `destination + ".part"`, which replaces `destination` only once all the bytes
    announced by Content-Length have arrived: an interrupted transfer never leaves a truncated file
    under the final name for a later run to take as complete. The partial file is removed.
    """
    if os.path.exists(destination) and _remote_size(url) == os.path.getsize(destination):
        print(f"File already exists and is up-to-date: {destination}")
        return
    partial = destination + ".part"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            expected = _content_length(response)
            with open(partial, "wb") as f, tqdm(total=expected, unit="B", unit_scale=True,
                                                 unit_divisor=1024,
                                                 desc=os.path.basename(destination)) as bar:
                received = _copy_body(response, f, bar)
        if expected is not None and received != expected:
            raise OSError(f"connection closed after {received} of {expected} bytes")
        os.replace(partial, destination)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _remote_size(url):
    """Return the server's Content-Length for `url` (a HEAD request), or None if not given."""
    request = urllib.request.Request(url, method="HEAD")
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        return _content_length(response)


def _content_length(response):
    """Return the response's Content-Length header as an int, or None when the server omits it."""
    length = response.headers.get("Content-Length")
    return None if length is None else int(length)


def _copy_body(response, f, bar):
    """Copy the response body into the open file `f` chunk by chunk; return the bytes written."""
    received = 0
    while chunk := response.read(CHUNK_SIZE):
        f.write(chunk)
        bar.update(len(chunk))
        received += len(chunk)
    return received


def _describe(exc):
    """Return a short reason for a failed request: 'HTTP Error 404: ...', 'Connection refused'."""
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        return str(exc.reason)
    return str(exc) or type(exc).__name__


def _is_unreachable(exc):
    """True when the server could not be talked to at all, as for every other file too."""
    if isinstance(exc, urllib.error.HTTPError):
        return False
    return isinstance(exc, (urllib.error.URLError, TimeoutError))


def _missing_file_message(filename, model_dir, base_urls, failures):
    """The DownloadError text: the file, each URL tried and why it failed, and the manual fix."""
    tried = "; ".join(f"{url} ({reason})" for url, reason in failures)
    missing = [name for name in FILENAMES if not os.path.exists(os.path.join(model_dir, name))]
    sources = " or ".join(f"{base_url}/" for base_url in base_urls)
    return (f"Could not download {filename}: tried {tried}. To place the files by hand, "
            f"download {', '.join(missing)} from {sources} into {model_dir}")


def _import_tensorflow():
    """Import TensorFlow on first use (it takes seconds), without its start-up log lines."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    return tf


def load_gpt2_params_from_tf_ckpt(ckpt_path, settings):
    """Read OpenAI's TensorFlow checkpoint into nested dicts of NumPy arrays.

    `model/h3/attn/c_attn/w` becomes params["blocks"][3]["attn"]["c_attn"]["w"], `model/wte`
    params["wte"], `model/ln_f/g` params["g"]. The singleton leading dimension that OpenAI's
    weight matrices carry ([1, d, 3d]) is squeezed away ([d, 3d]).
    """
    tf = _import_tensorflow()
    params = {"blocks": [{} for _ in range(settings["n_layer"])]}
    for name, _ in tf.train.list_variables(ckpt_path):
        array = np.squeeze(tf.train.load_variable(ckpt_path, name))
        scope, *keys = name.split("/")[1:]  # "model/h3/attn/c_attn/w" -> "h3", [attn, ...]
        node = params["blocks"][int(scope[1:])] if scope.startswith("h") else params
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1] if keys else scope] = array
    return params
