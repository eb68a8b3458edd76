"""Download OpenAI's GPT-2 checkpoints and read them into a dict of NumPy arrays.

    settings, params = download_and_load_gpt2(model_size="355M", models_dir="gpt2")

Each of the seven checkpoint files comes from OpenAI's public bucket, or from the book's backup
mirror when the bucket fails. A file is written under a temporary name and renamed only once it
is complete, so an interrupted download never looks finished. Files already complete are not
downloaded again, and with no network at all the files already on disk are used.
"""

import http.client
import json
import os
import sys
import urllib.error
import urllib.request

import numpy as np
from tqdm import tqdm

ALLOWED_SIZES = ("124M", "355M", "774M", "1558M")
BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
BACKUP_BASE_URL = "https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2"
FILENAMES = (
    "checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001",
    "model.ckpt.index", "model.ckpt.meta", "vocab.bpe",
)


class DownloadError(RuntimeError):
    """A checkpoint file that is missing and could not be downloaded."""


class Unavailable(Exception):
    """No URL provided the file; the message lists each URL tried and why it failed."""


def download_and_load_gpt2(model_size, models_dir, base_url=BASE_URL,
                           backup_base_url=BACKUP_BASE_URL, timeout=60):
    """Make sure the checkpoint of `model_size` is in `models_dir/model_size`; return
    (settings, params) as the book's loader does: settings from hparams.json, params the weights.

    When the files cannot be fetched but are all on disk already (no network, say), they are
    used after a one-line warning; a missing file that cannot be fetched raises DownloadError.
    """
    if model_size not in ALLOWED_SIZES:
        raise ValueError(f"Model size not in {ALLOWED_SIZES}: {model_size!r}")
    model_dir = os.path.join(models_dir, model_size)
    os.makedirs(model_dir, exist_ok=True)
    for filename in FILENAMES:
        try:
            fetch_file(file_urls(model_size, filename, base_url, backup_base_url),
                       os.path.join(model_dir, filename), timeout)
        except Unavailable as exc:
            missing = [f for f in FILENAMES if not os.path.exists(os.path.join(model_dir, f))]
            if missing:
                raise DownloadError(how_to_place_by_hand(
                    model_dir, missing, file_urls(model_size, missing[0], base_url,
                                                  backup_base_url), exc)) from None
            print(f"Warning: could not download {filename} ({exc}); "
                  f"using the files already in {model_dir}", file=sys.stderr)
            break

    with open(os.path.join(model_dir, "hparams.json"), encoding="utf-8") as f:
        settings = json.load(f)
    params = load_gpt2_params_from_tf_ckpt(model_dir, settings)
    return settings, params


def file_urls(model_size, filename, base_url, backup_base_url):
    """The URLs of one checkpoint file: OpenAI's bucket first, then the backup mirror."""
    return [f"{base.rstrip('/')}/{model_size}/{filename}" for base in (base_url, backup_base_url)]


def how_to_place_by_hand(model_dir, missing, urls, reason):
    """The error message for missing files: which, where they come from, where they go."""
    return (f"{os.path.join(model_dir, missing[0])} is missing and could not be downloaded "
            f"({reason}). Download it from {' or '.join(urls)} (and likewise "
            f"{', '.join(missing)}) into {model_dir}/, then run again.")


def fetch_file(urls, destination, timeout):
    """Download `destination` from the first of `urls` that works, unless it is up to date.

    Raises Unavailable when no URL provides the file.
    """
    failures = []
    for url in urls:
        try:
            download_file(url, destination, timeout)
            return
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            failures.append(f"{url}: {getattr(exc, 'reason', None) or exc}")
    raise Unavailable("; ".join(failures))


def download_file(url, destination, timeout):
    """Stream `url` to `destination` via `destination + '.part'`, with a progress bar.

    A file already there with the size the server announces is kept as it is. The rename
    happens only after the whole body arrived, so an interrupted download never looks finished.
    """
    with urllib.request.urlopen(url, timeout=timeout) as response:
        size = int(response.headers.get("Content-Length", 0))
        if os.path.exists(destination) and size and os.path.getsize(destination) == size:
            print(f"File already exists and is up-to-date: {destination}")
            return
        part = destination + ".part"
        received = 0
        with open(part, "wb") as f, tqdm(total=size or None, unit="iB", unit_scale=True,
                                         desc=os.path.basename(url)) as progress:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                received += len(chunk)
                progress.update(len(chunk))
    if size and received != size:
        raise OSError(f"connection closed after {received} of {size} bytes")
    os.replace(part, destination)


def load_gpt2_params_from_tf_ckpt(ckpt_path, settings):
    """Read every variable of the TensorFlow checkpoint in folder `ckpt_path` into the book's
    nested dict: wte, wpe, blocks[i] (attn, ln_1, ln_2, mlp), g, b. TensorFlow stores linear
    weights as (1, in, out); the leading 1 is dropped.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up log quiet
    import tensorflow as tf

    checkpoint = tf.train.latest_checkpoint(ckpt_path)
    if checkpoint is None:
        raise DownloadError(f"No TensorFlow checkpoint in {ckpt_path}: the 'checkpoint' file "
                            "is missing or names no model.ckpt")
    params = {"blocks": [{} for _ in range(settings["n_layer"])]}
    for name, _ in tf.train.list_variables(checkpoint):
        array = np.squeeze(tf.train.load_variable(checkpoint, name))
        parts = name.split("/")[1:]  # drop the leading "model/"
        target = params
        if parts[0].startswith("h"):  # "h7/attn/c_attn/w" -> params["blocks"][7]["attn"]...
            target = params["blocks"][int(parts[0][1:])]
            parts = parts[1:]
        for key in parts[:-1]:
            target = target.setdefault(key, {})
        target[parts[-1]] = array
    params.update(params.pop("ln_f"))  # the final norm's g and b sit at the top level
    return params
