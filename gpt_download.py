"""Download OpenAI's GPT-2 checkpoints, read their weights into NumPy arrays, load its tokenizer.

`download_and_load_gpt2` fetches the seven files of one model size from OpenAI's bucket, falling
back per file to the book's backup mirror, and reads them with TensorFlow.
`download_and_load_gpt2_safetensors` fetches the same weights as the single `model.safetensors`
of Hugging Face's `openai-community` copy and reads them memory-mapped, without TensorFlow. Both
return the hyperparameters and the weights in the nested layout that
`previous_chapters.load_weights_into_gpt` expects. Files already on disk with the server's size
are kept; without a network the files already on disk are used as they are. A file on disk that
is cut short, damaged or of another model size ends in a one-line DownloadError naming it.
`gpt2_tokenizer` returns tiktoken's GPT-2 encoding, offline too: when tiktoken cannot fetch its
files, it builds the same encoding from the vocabulary files that either download brings.
"""

import contextlib
import http.client
import json
import math
import os
import sys
import urllib.error
import urllib.request

import numpy as np
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str
from tqdm import tqdm

from kit.files import DataError

BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
BACKUP_BASE_URL = "https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2"
HF_BASE_URL = "https://huggingface.co/openai-community"
SAFETENSORS_FILENAME = "model.safetensors"
# Hugging Face's names of OpenAI's encoder.json (the same mapping, token -> id) and vocab.bpe
# (the same merges, one per line after a "#version: 0.2" line).
HF_TOKENIZER_FILENAMES = ("vocab.json", "merges.txt")
TOKENIZER_FILE_PAIRS = (("encoder.json", "vocab.bpe"), HF_TOKENIZER_FILENAMES)
GPT2_N_VOCAB = 50257  # the last id, 50256, is <|endoftext|>
GPT2_N_CTX = 1024  # the context length of every size
END_OF_TEXT = 50256  # <|endoftext|>: pads batches and ends generation
# GPT-2's four sizes: the one table from which the checkpoints' expected settings below, the
# Hugging Face repositories and the finetuning script's model configs are derived.
GPT2_SIZES = {
    "124M": {"name": "gpt2-small (124M)", "hf_repo": "gpt2",
             "n_embd": 768, "n_layer": 12, "n_head": 12},
    "355M": {"name": "gpt2-medium (355M)", "hf_repo": "gpt2-medium",
             "n_embd": 1024, "n_layer": 24, "n_head": 16},
    "774M": {"name": "gpt2-large (774M)", "hf_repo": "gpt2-large",
             "n_embd": 1280, "n_layer": 36, "n_head": 20},
    "1558M": {"name": "gpt2-xl (1558M)", "hf_repo": "gpt2-xl",
              "n_embd": 1600, "n_layer": 48, "n_head": 25},
}
GPT2_SETTINGS = {  # hparams.json of each of OpenAI's sizes
    size: {"n_vocab": GPT2_N_VOCAB, "n_ctx": GPT2_N_CTX, "n_embd": s["n_embd"],
           "n_head": s["n_head"], "n_layer": s["n_layer"]}
    for size, s in GPT2_SIZES.items()
}
ALLOWED_SIZES = tuple(GPT2_SETTINGS)
DATA_FILENAME = "model.ckpt.data-00000-of-00001"
FILENAMES = (
    "checkpoint", "encoder.json", "hparams.json", DATA_FILENAME, "model.ckpt.index",
    "model.ckpt.meta", "vocab.bpe",
)
TF_NAMES = {"wte": "model/wte", "wpe": "model/wpe", "g": "model/ln_f/g", "b": "model/ln_f/b"}
HF_NAMES = {"wte": "wte.weight", "wpe": "wpe.weight", "g": "ln_f.weight", "b": "ln_f.bias"}
TIMEOUT_S = 60
CHUNK_SIZE = 1 << 20


class DownloadError(DataError):
    """A checkpoint file is missing or unusable and could not be fetched: the message names it and
    says what to do."""


class DamagedFileError(DownloadError):
    """A model file on disk cannot be read as the requested model: cut short, damaged, or of
    another size. `path` names the file, so callers can add where a good copy comes from."""

    def __init__(self, path, problem):
        super().__init__(f"{path} {problem}")
        self.path = path


def download_and_load_gpt2(model_size, models_dir, base_url=BASE_URL,
                           backup_base_url=BACKUP_BASE_URL):
    """Return (settings, params) of OpenAI's GPT-2 `model_size`, downloaded into models_dir/size.

    settings is hparams.json (n_vocab, n_ctx, n_embd, n_head, n_layer); params holds the arrays
    as `load_gpt2_params_from_tf_ckpt` lays them out. Raises ValueError for an unknown size before
    any network access, and DownloadError when a file is missing and neither URL provides it, or
    when a file on disk is damaged or belongs to another size.
    """
    expected = gpt2_settings(model_size)
    model_dir = _model_dir(models_dir, model_size)
    base_urls = [f"{base_url}/{model_size}", f"{backup_base_url}/{model_size}"]
    fetch_model_files(model_dir, base_urls)
    with _explain_damaged_file(model_dir, base_urls):
        settings = _read_hparams(os.path.join(model_dir, "hparams.json"), expected, model_size)
        ckpt_path = _import_tensorflow().train.latest_checkpoint(model_dir)
        if ckpt_path is None:
            raise DownloadError(f"The 'checkpoint' file in {model_dir} names no checkpoint there: "
                                "delete it and run again to download it afresh")
        return settings, load_gpt2_params_from_tf_ckpt(ckpt_path, settings)


def download_and_load_gpt2_safetensors(model_size, models_dir, base_url=HF_BASE_URL):
    """Return (settings, params) of GPT-2 `model_size` from Hugging Face's `model.safetensors`.

    The file of `openai-community/<gpt2|gpt2-medium|gpt2-large|gpt2-xl>` goes to
    models_dir/size/model.safetensors with the same care as `download_and_load_gpt2`'s files,
    and with it the tokenizer's vocab.json and merges.txt, so that `gpt2_tokenizer` works offline.
    settings and params are as `download_and_load_gpt2` returns them; TensorFlow is not needed.
    Raises ValueError for an unknown size, DownloadError as `download_and_load_gpt2` does.
    """
    settings = gpt2_settings(model_size)
    model_dir = _model_dir(models_dir, model_size)
    base_urls = [f"{base_url}/{GPT2_SIZES[model_size]['hf_repo']}/resolve/main"]
    fetch_model_files(model_dir, base_urls, (SAFETENSORS_FILENAME, *HF_TOKENIZER_FILENAMES))
    with _explain_damaged_file(model_dir, base_urls):
        path = os.path.join(model_dir, SAFETENSORS_FILENAME)
        return settings, load_gpt2_params_from_safetensors(path, settings)


def gpt2_tokenizer(models_dir="gpt2"):
    """Return GPT-2's tokenizer, `tiktoken.get_encoding("gpt2")`, even without a network.

    tiktoken downloads its GPT-2 files on first use and keeps them in its cache; offline and
    without that cache, `get_encoding` fails deep inside `requests`. The same two files come with
    every GPT-2 download (OpenAI's encoder.json and vocab.bpe, or Hugging Face's vocab.json and
    merges.txt), so the encoding is then built from those in the first of
    models_dir/124M, 355M, 774M, 1558M that holds a pair: the same tokens as tiktoken's own.
    Raises DownloadError, one line, when neither source is there or the files are damaged.
    """
    try:
        return tiktoken.get_encoding("gpt2")
    except (OSError, ValueError) as exc:  # requests' errors are OSErrors; ValueError: bad hash
        reason = type(exc).__name__
    for model_size in ALLOWED_SIZES:
        for encoder_name, merges_name in TOKENIZER_FILE_PAIRS:
            encoder_path = os.path.join(models_dir, model_size, encoder_name)
            merges_path = os.path.join(models_dir, model_size, merges_name)
            if os.path.isfile(encoder_path) and os.path.isfile(merges_path):
                return _gpt2_encoding_from_files(encoder_path, merges_path)
    raise DownloadError(
        f"GPT-2's tokenizer files are missing: tiktoken could not download them ({reason}) and "
        f"no folder {os.path.join(models_dir, '<size>')} ({', '.join(ALLOWED_SIZES)}) holds "
        "encoder.json and vocab.bpe (or vocab.json and merges.txt). Set TIKTOKEN_CACHE_DIR to a "
        "folder holding tiktoken's cached GPT-2 files, put encoder.json and vocab.bpe (which any "
        f"GPT-2 download brings) into {os.path.join(models_dir, '124M')}, or connect to the "
        "network once")


def _gpt2_encoding_from_files(encoder_path, merges_path):
    """tiktoken's GPT-2 encoding built from encoder.json and vocab.bpe (or their Hugging Face
    equivalents) on disk; DownloadError naming them when they are damaged or not GPT-2's."""
    try:
        with _tiktoken_cache_off():
            ranks = data_gym_to_mergeable_bpe_ranks(merges_path, encoder_path)
        return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                 special_tokens={"<|endoftext|>": GPT2_N_VOCAB - 1},
                                 explicit_n_vocab=GPT2_N_VOCAB)
    except (OSError, ValueError, KeyError, AssertionError) as exc:
        # tiktoken asserts that the two files agree and that they hold GPT2_N_VOCAB tokens
        reason = "they do not agree" if isinstance(exc, AssertionError) else _describe(exc)
        raise DownloadError(
            f"{encoder_path} and {merges_path} do not make GPT-2's tokenizer ({reason}): they are "
            "cut short, damaged or not GPT-2's. Delete them and download the GPT-2 model again, "
            "or set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached GPT-2 files") from None


@contextlib.contextmanager
def _tiktoken_cache_off():
    """Keep tiktoken from copying local files into its cache while reading them: an empty
    TIKTOKEN_CACHE_DIR turns its cache off. A cache folder that cannot be written (a read-only
    shared copy) would otherwise fail the read."""
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = saved


def gpt2_settings(model_size):
    """A copy of hparams.json of OpenAI's `model_size`; ValueError naming the sizes if unknown."""
    if model_size not in GPT2_SETTINGS:
        raise ValueError(f"Unknown GPT-2 size {model_size!r}: choose one of "
                         f"{', '.join(ALLOWED_SIZES)}")
    return dict(GPT2_SETTINGS[model_size])


def _model_dir(models_dir, model_size):
    """Create and return models_dir/model_size."""
    model_dir = os.path.join(models_dir, model_size)
    os.makedirs(model_dir, exist_ok=True)
    return model_dir


@contextlib.contextmanager
def _explain_damaged_file(model_dir, base_urls):
    """Turn a DamagedFileError into a DownloadError that also says where a good copy comes from.

    Online, a file whose size differs from the server's has already been fetched again; what is
    left is a file that could not be replaced, typically for want of a network.
    """
    try:
        yield
    except DamagedFileError as exc:
        name = os.path.basename(exc.path)
        sources = " or ".join(f"{base_url}/{name}" for base_url in base_urls)
        raise DownloadError(f"{exc}. Delete it and run again with a network to download it "
                            f"afresh, or download it by hand from {sources} into {model_dir}"
                            ) from None


def _read_hparams(path, expected, model_size):
    """Read hparams.json, refusing one that is not JSON or does not describe `model_size`."""
    try:
        with open(path, encoding="utf-8") as f:
            settings = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DamagedFileError(path, f"is damaged ({exc})") from None
    if not isinstance(settings, dict) or any(settings.get(k) != v for k, v in expected.items()):
        raise DamagedFileError(path, f"describes {settings}, not GPT-2 {model_size}: {expected}")
    return settings


def fetch_model_files(model_dir, base_urls, filenames=FILENAMES):
    """Make sure each of `filenames` is in model_dir, fetched from the first base URL serving it.

    A base URL that cannot be reached at all (refused, no DNS, timeout) is not asked again for the
    remaining files, so a machine without network finishes at once. A file that no URL provides
    but is already on disk is used as it is, with one warning for the whole model.
    """
    unreachable = {}  # base URL -> why it could not be reached
    warned = False
    for filename in filenames:
        destination = os.path.join(model_dir, filename)
        failures = _fetch_from_first_working(filename, destination, base_urls, unreachable)
        if not failures:
            continue
        if not os.path.exists(destination):
            raise DownloadError(_missing_file_message(filename, model_dir, base_urls, failures,
                                                      filenames))
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


def _missing_file_message(filename, model_dir, base_urls, failures, filenames):
    """The DownloadError text: the file, each URL tried and why it failed, and the manual fix."""
    tried = "; ".join(f"{url} ({reason})" for url, reason in failures)
    missing = [name for name in filenames if not os.path.exists(os.path.join(model_dir, name))]
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
    weight matrices carry ([1, d, 3d]) is squeezed away ([d, 3d]). Raises DamagedFileError when
    the files cannot be read or their shapes do not fit `settings`.
    """
    tf = _import_tensorflow()
    unreadable = (tf.errors.OpError, IndexError)  # IndexError: "Read less bytes than requested"
    with _reading(ckpt_path + ".index", unreadable):
        listed = {name: tuple(n for n in shape if n != 1)
                  for name, shape in tf.train.list_variables(ckpt_path)}
    data_path = os.path.join(os.path.dirname(ckpt_path), DATA_FILENAME)
    keys = _match_tensors(data_path, listed, {_tf_name(key): key for key in
                                              _expected_shapes(settings)}, settings)
    with _reading(data_path, unreadable):
        arrays = {key: np.squeeze(tf.train.load_variable(ckpt_path, name))
                  for name, key in keys.items()}
    return _nest(arrays, settings["n_layer"])


def load_gpt2_params_from_safetensors(path, settings):
    """Read a GPT-2 `model.safetensors` into the layout of `load_gpt2_params_from_tf_ckpt`.

    Accepts Hugging Face's names with or without the `transformer.` prefix that `save_pretrained`
    writes, and skips the causal-mask buffers (`h.<i>.attn.bias`, `h.<i>.attn.masked_bias`). An
    `lm_head.weight` of its own (an untied output head) comes back as `params["lm_head"]`;
    GPT-2's own files have none, their head being `wte`. Its `[in, out]` Conv1D weights are
    OpenAI's layout already. The arrays are copy-on-write views of the memory-mapped file:
    nothing is read until used, and only what is read occupies memory, as file pages the system
    can drop again. Raises DamagedFileError when the file is cut short, damaged or does not fit
    `settings`.
    """
    header, data_start = _read_safetensors_header(path)
    entries = {}
    for name, entry in header.items():
        short = name.removeprefix("transformer.")
        if not _is_skipped(short):
            entries[short] = entry
    keys = _match_tensors(path, {name: tuple(e["shape"]) for name, e in entries.items()},
                          {_hf_name(key): key for key in _expected_shapes(settings)}, settings)
    raw = np.memmap(path, dtype=np.uint8, mode="c")
    params = _nest({key: _tensor_view(path, raw, data_start, name, entries[name])
                    for name, key in keys.items()}, settings["n_layer"])
    head = header.get("lm_head.weight")
    if head is not None and tuple(head["shape"]) != params["wte"].shape:
        raise DamagedFileError(path, f"lm_head.weight has shape {tuple(head['shape'])}, "
                                     f"the token embedding {params['wte'].shape}")
    if head is not None:  # an untied head, as a finetuned model exported from this repo has
        params["lm_head"] = _tensor_view(path, raw, data_start, "lm_head.weight", head)
    return params


@contextlib.contextmanager
def _reading(path, errors):
    """Report one of `errors` raised while reading `path` as a DamagedFileError naming it."""
    try:
        yield
    except errors as exc:
        raise DamagedFileError(path, f"cannot be read ({_describe(exc)}): it is cut short or "
                                     "damaged") from None


def _expected_shapes(settings):
    """{key: shape} of every GPT-2 weight; a key is its path in params, e.g. ("blocks", 0, "ln_1",
    "g"), or ("wte",)."""
    d = settings["n_embd"]
    per_block = {("ln_1", "g"): (d,), ("ln_1", "b"): (d,),
                 ("attn", "c_attn", "w"): (d, 3 * d), ("attn", "c_attn", "b"): (3 * d,),
                 ("attn", "c_proj", "w"): (d, d), ("attn", "c_proj", "b"): (d,),
                 ("ln_2", "g"): (d,), ("ln_2", "b"): (d,),
                 ("mlp", "c_fc", "w"): (d, 4 * d), ("mlp", "c_fc", "b"): (4 * d,),
                 ("mlp", "c_proj", "w"): (4 * d, d), ("mlp", "c_proj", "b"): (d,)}
    shapes = {("wte",): (settings["n_vocab"], d), ("wpe",): (settings["n_ctx"], d),
              ("g",): (d,), ("b",): (d,)}
    for i in range(settings["n_layer"]):
        shapes.update({("blocks", i, *key): shape for key, shape in per_block.items()})
    return shapes


def _tf_name(key):
    """OpenAI's variable name of a params key: ("blocks", 3, "attn", "c_attn", "w") ->
    "model/h3/attn/c_attn/w", ("g",) -> "model/ln_f/g"."""
    if key[0] == "blocks":
        return "/".join(("model", f"h{key[1]}", *key[2:]))
    return TF_NAMES[key[0]]


def _hf_name(key):
    """Hugging Face's tensor name of a params key: ("blocks", 3, "ln_1", "g") ->
    "h.3.ln_1.weight", ("b",) -> "ln_f.bias"."""
    if key[0] == "blocks":
        return ".".join(("h", str(key[1]), *key[2:-1], "bias" if key[-1] == "b" else "weight"))
    return HF_NAMES[key[0]]


def _is_skipped(name):
    """True for the tensors of a Hugging Face file that are not weights to load: the causal-mask
    buffers and `lm_head.weight`, which GPT-2 ties to `wte`."""
    parts = name.split(".")
    return name == "lm_head.weight" or (
        len(parts) == 4 and parts[0] == "h" and parts[2] == "attn"
        and parts[3] in ("bias", "masked_bias"))


def _match_tensors(path, found, names, settings):
    """Return `names` ({name: key}), the tensors `settings` requires, after checking that `found`,
    the {name: shape} of the file `path`, holds exactly them in their shapes."""
    problem = _first_misfit(found, names, _expected_shapes(settings))
    if problem:
        model = ", ".join(f"{k}={settings[k]}" for k in ("n_layer", "n_embd", "n_vocab", "n_ctx"))
        raise DamagedFileError(path, f"does not fit the requested GPT-2 ({model}): it {problem}; "
                                     "it is another model size's file, or damaged")
    return names


def _first_misfit(found, names, expected):
    """What is first wrong with `found` ({name: shape}) against `names` ({name: key}) and
    `expected` ({key: shape}), as words ("lacks h.3.ln_1.weight"); None when nothing is."""
    for name, key in names.items():
        if name not in found:
            return f"lacks {name}"
        if found[name] != expected[key]:
            return f"holds {name} of shape {list(found[name])}, not {list(expected[key])}"
    extra = sorted(found.keys() - names.keys())
    return f"holds {extra[0]}, which that model has not" if extra else None


def _read_safetensors_header(path):
    """Return (header, data_start): the JSON header of a safetensors file without `__metadata__`,
    and the offset its tensor data begins at. The file starts with the header's length (8 bytes,
    little-endian) and the header; each entry is {"dtype", "shape", "data_offsets": [begin, end]}.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        header_size = int.from_bytes(prefix, "little") if len(prefix) == 8 else size
        if 8 + header_size > size:
            raise DamagedFileError(path, f"is cut short or not a safetensors file: its header "
                                         f"needs {8 + header_size} bytes, the file has {size}")
        try:
            header = json.loads(f.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DamagedFileError(path, f"has a damaged header ({exc})") from None
    if not isinstance(header, dict):
        raise DamagedFileError(path, "has a damaged header (not a JSON object)")
    header.pop("__metadata__", None)
    for name, entry in header.items():
        if not _is_tensor_entry(entry):
            raise DamagedFileError(path, f"has a damaged header (entry {name}: {entry})")
    return header, 8 + header_size


def _is_tensor_entry(entry):
    """True for a well-formed header entry: a dtype name, a shape, and two data offsets."""
    return (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
            and isinstance(entry.get("shape"), list)
            and all(isinstance(n, int) for n in entry["shape"])
            and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
            and all(isinstance(n, int) for n in entry["data_offsets"]))


def _tensor_view(path, raw, data_start, name, entry):
    """The float32 array `entry` describes, as a view of `raw` (the whole file, memory-mapped)."""
    if entry["dtype"] != "F32":
        raise DamagedFileError(path, f"stores {name} as {entry['dtype']}: only float32 (F32) "
                                     "files, as Hugging Face's GPT-2, are read")
    begin, end = (data_start + offset for offset in entry["data_offsets"])
    if end - begin != 4 * math.prod(entry["shape"]):
        raise DamagedFileError(path, f"has a damaged header: {name} spans {end - begin} bytes")
    if end > raw.size:
        raise DamagedFileError(path, f"is cut short: {name} ends at byte {end}, the file has "
                                     f"{raw.size} bytes")
    return raw[begin:end].view("<f4").reshape(entry["shape"])


def _nest(arrays, n_layer):
    """Nested params from {key: array}: ("blocks", 3, "attn", "c_attn", "w") goes to
    params["blocks"][3]["attn"]["c_attn"]["w"], ("wte",) to params["wte"]."""
    params = {"blocks": [{} for _ in range(n_layer)]}
    for key, array in arrays.items():
        node, path = (params["blocks"][key[1]], key[2:]) if key[0] == "blocks" else (params, key)
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = array
    return params
