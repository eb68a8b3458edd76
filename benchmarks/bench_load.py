"""Loading GPT-2 355M's weights: OpenAI's TensorFlow checkpoint against `model.safetensors`.

    python benchmarks/bench_load.py               # about 3 minutes on 2 CPU cores
    python benchmarks/bench_load.py --repeats 1   # one run per row

Writes random weights of the 355M shape in both formats to a temporary folder (3 GB of disk),
then times each way of loading them in a fresh Python process, imports included, and reads the
process's peak resident memory: VmHWM of /proc/self/status, which starts afresh at exec, where
`ru_maxrss` would report the parent's peak when that is higher (fork copies it). The files are
freshly written, so they are read from the page cache, as on a second run of the chapter script.

"params": the loader's result with every value read once (its checksum, which must agree across
the loaders). "model": the chapter script's load, `GPTModel(355M)` then `load_weights_into_gpt`.
"safe_open" is the `safetensors` package reading every tensor (`framework="np"`), the
alternative that `gpt_download` does not use: it copies each tensor out of the mapped file.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import numpy as np
from common import machine_line, table

from gpt_download import DATA_FILENAME, GPT2_SETTINGS, SAFETENSORS_FILENAME

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1 << 30

CHILD = """
import json, os, resource, sys, time
start = time.perf_counter()
import numpy as np
import gpt_download
loader, stage, folder = sys.argv[1:4]
settings = gpt_download.GPT2_SETTINGS["355M"]
if loader == "tf":
    params = gpt_download.load_gpt2_params_from_tf_ckpt(folder + "/model.ckpt", settings)
elif loader == "safetensors":
    params = gpt_download.load_gpt2_params_from_safetensors(folder + "/model.safetensors",
                                                            settings)
elif loader == "safe_open":
    from safetensors import safe_open
    with safe_open(folder + "/model.safetensors", framework="np") as f:
        params = {name: f.get_tensor(name) for name in f.keys()}
else:
    params = None

def peak_rss_kib():
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

def leaves(node):
    if isinstance(node, dict):
        node = list(node.values())
    if isinstance(node, list):
        return [leaf for child in node for leaf in leaves(child)]
    return [node]

checksum = None
if stage == "params" and params is not None:
    checksum = sum(float(np.sum(a, dtype=np.float64)) for a in leaves(params))
if stage == "model":
    import gpt_instruction_finetuning as ft
    from previous_chapters import GPTModel, load_weights_into_gpt
    model = GPTModel({**ft.BASE_CONFIG, **ft.MODEL_CONFIGS["355M"][1]})
    if params is not None:
        load_weights_into_gpt(model, params)
print(json.dumps({"seconds": time.perf_counter() - start, "checksum": checksum,
                  "max_rss_kib": peak_rss_kib()}))
"""


def gpt2_names_and_shapes(settings):
    """[(OpenAI's name, Hugging Face's name, shape)] of every GPT-2 weight; OpenAI's weight
    matrices carry a leading 1 that the safetensors copies drop."""
    d, n_vocab, n_ctx = settings["n_embd"], settings["n_vocab"], settings["n_ctx"]
    entries = [("model/wte", "wte.weight", (n_vocab, d)), ("model/wpe", "wpe.weight", (n_ctx, d)),
               ("model/ln_f/g", "ln_f.weight", (d,)), ("model/ln_f/b", "ln_f.bias", (d,))]
    per_block = [("ln_1/g", (d,)), ("ln_1/b", (d,)), ("attn/c_attn/w", (d, 3 * d)),
                 ("attn/c_attn/b", (3 * d,)), ("attn/c_proj/w", (d, d)), ("attn/c_proj/b", (d,)),
                 ("ln_2/g", (d,)), ("ln_2/b", (d,)), ("mlp/c_fc/w", (d, 4 * d)),
                 ("mlp/c_fc/b", (4 * d,)), ("mlp/c_proj/w", (4 * d, d)), ("mlp/c_proj/b", (d,))]
    leaf = {"w": "weight", "g": "weight", "b": "bias"}
    for i in range(settings["n_layer"]):
        for name, shape in per_block:
            *module, kind = name.split("/")
            entries.append((f"model/h{i}/{name}", ".".join(["h", str(i), *module, leaf[kind]]),
                            shape))
    return entries


def write_checkpoints(folder, settings, seed=0):
    """Write the same random weights as OpenAI's TF checkpoint and as model.safetensors."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    entries = gpt2_names_and_shapes(settings)
    arrays = {tf_name: rng.random(shape, dtype=np.float32) - 0.5
              for tf_name, _, shape in entries}
    save_file({hf_name: arrays[tf_name] for tf_name, hf_name, _ in entries},
              os.path.join(folder, SAFETENSORS_FILENAME))
    write_tf1_checkpoint(folder, {tf_name: arrays[tf_name].reshape((1, *shape))
                                  if tf_name.endswith("/w") else arrays[tf_name]
                                  for tf_name, _, shape in entries})


def write_tf1_checkpoint(folder, arrays):
    """Save `arrays` with a TF1 Saver as OpenAI did, feeding the values in rather than baking
    them into the graph (a 1.4 GB graph would near protobuf's 2 GB limit)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    v1 = tf.compat.v1
    with tf.Graph().as_default():
        variables, assigns = [], []
        for name, value in arrays.items():
            variable = v1.Variable(tf.zeros(value.shape), name=name)
            value_in = v1.placeholder(tf.float32, value.shape)
            variables.append(variable)
            assigns.append((variable.assign(value_in), value_in, value))
        saver = v1.train.Saver(variables, save_relative_paths=True)
        with v1.Session() as sess:
            for assign, value_in, value in assigns:
                sess.run(assign, feed_dict={value_in: value})
            saver.save(sess, os.path.join(folder, "model.ckpt"), write_meta_graph=False)


def run_child(loader, stage, folder):
    """One fresh process loading with `loader` up to `stage`: its report as a dict."""
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable, "-c", CHILD, loader, stage, folder], cwd=REPO,
                            env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def measure(loader, stage, folder, repeats):
    """(median seconds, median peak RSS in GiB, checksum) over `repeats` fresh processes."""
    reports = [run_child(loader, stage, folder) for _ in range(repeats)]
    return (statistics.median(r["seconds"] for r in reports),
            statistics.median(r["max_rss_kib"] for r in reports) * 1024 / GIB,
            reports[0]["checksum"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="processes per row (median)")
    parser.add_argument("--dir", default=None, help="where to write the temporary checkpoints")
    args = parser.parse_args()

    settings = GPT2_SETTINGS["355M"]
    weights_gib = sum(np.prod(shape) for *_, shape in gpt2_names_and_shapes(settings)) * 4 / GIB
    rows, checksums = [], {}
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        write_checkpoints(folder, settings)
        sizes = {name: os.path.getsize(os.path.join(folder, name)) / GIB
                 for name in (DATA_FILENAME, SAFETENSORS_FILENAME)}
        for loader, label in (("none", "nothing loaded (imports, random GPTModel)"),
                              ("tf", "tf: load_gpt2_params_from_tf_ckpt"),
                              ("safetensors", "safetensors: memory-mapped (gpt_download)"),
                              ("safe_open", "safetensors: safe_open, framework=np")):
            p_s, p_rss, checksums[loader] = measure(loader, "params", folder, args.repeats)
            if loader == "safe_open":
                m_cells = ["-", "-"]
            else:
                m_s, m_rss, _ = measure(loader, "model", folder, args.repeats)
                m_cells = [f"{m_s:.2f} s", f"{m_rss:.2f} GiB"]
            rows.append([label, f"{p_s:.2f} s", f"{p_rss:.2f} GiB", *m_cells])

    print(f"# {machine_line()}")
    print(f"# GPT-2 355M shape: {weights_gib:.2f} GiB of float32 weights; files: "
          + ", ".join(f"{name} {size:.2f} GiB" for name, size in sizes.items()))
    print(f"# median of {args.repeats} fresh processes, imports included, warm page cache")
    loaded = {checksums[k] for k in ("tf", "safetensors", "safe_open")}
    print(f"# same weights read by all three loaders: {len(loaded) == 1}\n")
    print(table(["GPT-2 355M", "params: time", "params: peak RSS", "into GPTModel: time",
                 "into GPTModel: peak RSS"], rows))


if __name__ == "__main__":
    main()
