"""export_gguf.py: a finetuned .pth becomes a GGUF file that llama.cpp reads as GPT-2 (read back
here with gguf's own reader and run by a GPT-2 forward pass written in this file: the same
logits), with GPT-2's tokenizer (the same ids as tiktoken) and a Modelfile that asks Ollama's
prompt as the finetuning script asks; bad input and stopped writes end with one line and leave
nothing behind."""

import json
import math
import os
import signal
import subprocess
from functools import cache

import gguf
import numpy as np
import pytest
import regex
import torch
import torch.nn.functional as F
from helpers import (
    assert_error,
    lora_trained_model,
    random_model,
    run_in_process,
    run_script,
    save,
    stopped,
)

import export_gguf
import export_hf
import gpt_instruction_finetuning as ft
from kit.data import PROMPT_STYLES, load_json_entries

GPT2_124M = {**ft.BASE_CONFIG, **ft.MODEL_CONFIGS["124M"][1]}
Q8_CONFIG = {"vocab_size": 50257, "context_length": 32, "emb_dim": 64, "n_heads": 4,
             "n_layers": 2, "drop_rate": 0.0, "qkv_bias": True}  # rows of 64 and 256: q8_0
T = gguf.GGMLQuantizationType
# GPT-2's pre-tokenizer ("gpt-2" in llama.cpp): contractions, letters, numbers, other symbols,
# each with one leading space, and runs of whitespace.
GPT2_SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"""
                           r"""|\s+(?!\S)|\s+""")


#####################################
# Helpers: models, exports, and reading a GGUF file back
#####################################


def run_main(argv, capsys):
    """export_gguf.main(argv); return (exit code, stdout, stderr)."""
    return run_in_process(export_gguf.main, [str(arg) for arg in argv], capsys)


def export(pth, out_dir, capsys, *flags):
    """Export `pth` to `out_dir` through the command line's entry point; return (the GGUF
    file's path, stdout)."""
    code, out, err = run_main([pth, out_dir, *flags], capsys)
    assert code == 0, err
    names = os.listdir(out_dir)
    assert len(names) == 2 and "Modelfile" in names, names
    return out_dir / next(name for name in names if name.endswith(".gguf")), out


@cache
def gguf_reader(path):
    """gguf's reader of the file at `path`, made once: it parses the 100,000 strings of the
    tokenizer each time."""
    return gguf.GGUFReader(path)


def read_gguf(path, vocabulary=False):
    """(metadata {key: value}, tensors {name: ReaderTensor}) of the GGUF file at `path`; the
    tokenizer's 50257 tokens, their types and the merges only with `vocabulary` (slow)."""
    reader = gguf_reader(str(path))
    lists = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")
    fields = {name: field.contents() for name, field in reader.fields.items()
              if not name.startswith("GGUF.") and (vocabulary or name not in lists)}
    return fields, {tensor.name: tensor for tensor in reader.tensors}


def as_float32(tensor):
    """A tensor of the file as float32 torch values in PyTorch's layout (ggml's dimensions
    reversed), dequantized from f16 or q8_0."""
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return torch.from_numpy(np.array(values, dtype=np.float32))


def gguf_logits(path, idx):
    """Logits of token ids `idx` (b, n) computed from the GGUF file alone: GPT-2 as llama.cpp
    runs its "gpt2" architecture, written out here."""
    fields, tensors = read_gguf(path)
    w = {name: as_float32(tensor) for name, tensor in tensors.items()}
    n_heads = fields["gpt2.attention.head_count"]
    eps = fields["gpt2.attention.layer_norm_epsilon"]
    b, n = idx.shape

    def norm(x, prefix):
        return F.layer_norm(x, x.shape[-1:], w[f"{prefix}.weight"], w[f"{prefix}.bias"], eps)

    def linear(x, prefix):
        return x @ w[f"{prefix}.weight"].T + w[f"{prefix}.bias"]

    x = w["token_embd.weight"][idx] + w["position_embd.weight"][:n]  # (b, n, d)
    d = x.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for i in range(fields["gpt2.block_count"]):
        q, k, v = linear(norm(x, f"blk.{i}.attn_norm"), f"blk.{i}.attn_qkv").split(d, dim=-1)
        q, k, v = (t.view(b, n, n_heads, d // n_heads).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(d // n_heads)  # (b, heads, n, n)
        weights = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        attended = (weights @ v).transpose(1, 2).reshape(b, n, d)
        x = x + linear(attended, f"blk.{i}.attn_output")
        hidden = F.gelu(linear(norm(x, f"blk.{i}.ffn_norm"), f"blk.{i}.ffn_up"),
                        approximate="tanh")
        x = x + linear(hidden, f"blk.{i}.ffn_down")
    head = w.get("output.weight", w["token_embd.weight"])  # absent: tied to the embedding
    return norm(x, "output_norm") @ head.T


def token_batch(config, seed=0):
    """Two rows of random token ids, short enough for the model's context."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config["vocab_size"], (2, min(16, config["context_length"])),
                         generator=generator)


def max_difference(model, path, idx):
    """The largest absolute difference between `model`'s logits and the GGUF file's, and the
    largest absolute logit."""
    with torch.no_grad():
        expected = model(idx)
    got = gguf_logits(path, idx)
    assert got.shape == expected.shape
    return (got - expected).abs().max().item(), expected.abs().max().item()


def expected_tensors(config, tied=False):
    """{name: shape in PyTorch's layout} of a GPT-2 GGUF file with GPTModel `config`."""
    d, vocab = config["emb_dim"], config["vocab_size"]
    shapes = {"token_embd.weight": (vocab, d),
              "position_embd.weight": (config["context_length"], d),
              "output_norm.weight": (d,), "output_norm.bias": (d,)}
    for i in range(config["n_layers"]):
        shapes.update({f"blk.{i}.{name}": shape for name, shape in {
            "attn_norm.weight": (d,), "attn_norm.bias": (d,),
            "attn_qkv.weight": (3 * d, d), "attn_qkv.bias": (3 * d,),
            "attn_output.weight": (d, d), "attn_output.bias": (d,),
            "ffn_norm.weight": (d,), "ffn_norm.bias": (d,),
            "ffn_up.weight": (4 * d, d), "ffn_up.bias": (4 * d,),
            "ffn_down.weight": (d, 4 * d), "ffn_down.bias": (d,)}.items()})
    if not tied:
        shapes["output.weight"] = (vocab, d)
    return shapes


#####################################
# Shared exports
#####################################


@pytest.fixture(scope="module")
def test_mode_exports(tmp_path_factory):
    """The --test_mode model (12-dim, 1 layer, no qkv bias, its own head), saved and exported
    as f32, f16 and q8_0. Returns (model, {outtype: GGUF path})."""
    root = tmp_path_factory.mktemp("test-mode")
    config = dict(ft.TEST_MODE_CONFIG)
    model = random_model(config)
    pth = save(model, root / "model.pth", config)
    paths = {}
    for outtype in export_gguf.OUTTYPES:
        export_gguf.main([pth, str(root / outtype), "--outtype", outtype])
        paths[outtype] = root / outtype / f"model-{outtype}.gguf"
    return model, paths


@pytest.fixture(scope="module")
def q8_export(tmp_path_factory):
    """A 64-dim model, whose rows split into q8_0's blocks, exported as q8_0; (model, path)."""
    root = tmp_path_factory.mktemp("q8")
    model = random_model(Q8_CONFIG)
    export_gguf.main([save(model, root / "model.pth", Q8_CONFIG), str(root / "gguf"),
                      "--outtype", "q8_0"])
    return model, root / "gguf" / "model-q8_0.gguf"


@pytest.fixture(scope="module", params=["alpaca", "phi3"])
def styled_export(request, test_mode_exports, tmp_path_factory):
    """A model exported with each prompt style: the test-mode one for Alpaca, a tiny one with
    16 positions for Phi-3. Returns (style, folder, context length)."""
    if request.param == "alpaca":
        return PROMPT_STYLES["alpaca"], test_mode_exports[1]["f32"].parent, 120
    root = tmp_path_factory.mktemp(request.param)
    config = {**ft.TEST_MODE_CONFIG, "context_length": 16}
    folder = root / "gguf"
    export_gguf.main([save(random_model(config), root / "model.pth", config, request.param),
                      str(folder), "--outtype", "f32"])
    return PROMPT_STYLES[request.param], folder, 16


#####################################
# The model
#####################################


def test_test_mode_f32_file_gives_the_models_logits(test_mode_exports):
    model, paths = test_mode_exports
    difference, _ = max_difference(model, paths["f32"], token_batch(ft.TEST_MODE_CONFIG))
    assert difference <= 1e-5


def test_gpt2_124m_f32_file_gives_the_models_logits(tmp_path, tokenizer):
    """A random GPT-2 124M (qkv biases, its own head), written straight from memory: the
    command line's reading of a .pth is the test-mode model's test."""
    model = random_model(GPT2_124M)
    path = tmp_path / "model-f32.gguf"
    info = {"config": GPT2_124M, "prompt_style": "alpaca"}
    assert export_gguf.write_gguf(str(path), model, info, PROMPT_STYLES["alpaca"], tokenizer,
                                  "f32") == []
    fields, tensors = read_gguf(path)
    assert {name: tuple(reversed(t.shape.tolist())) for name, t in tensors.items()} == \
        expected_tensors(GPT2_124M)
    assert (fields["gpt2.context_length"], fields["gpt2.embedding_length"],
            fields["gpt2.block_count"], fields["gpt2.attention.head_count"],
            fields["gpt2.feed_forward_length"]) == (1024, 768, 12, 12, 3072)
    difference, _ = max_difference(model, path, token_batch(GPT2_124M))
    assert difference <= 1e-5


@pytest.mark.parametrize("outtype, file_type", [("f32", 0), ("f16", 1), ("q8_0", 7)])
def test_test_mode_tensors_and_metadata(test_mode_exports, outtype, file_type):
    """Every tensor under llama.cpp's GPT-2 name and shape; matrices in the outtype (q8_0 needs
    rows of a multiple of 32, so the 12-dim model's matrices stay f16), the rest f32; the
    hyperparameters llama.cpp reads."""
    _, paths = test_mode_exports
    fields, tensors = read_gguf(paths[outtype])
    shapes = {name: tuple(reversed(t.shape.tolist())) for name, t in tensors.items()}
    assert shapes == expected_tensors(ft.TEST_MODE_CONFIG)
    matrix_type = {"f32": T.F32, "f16": T.F16, "q8_0": T.F16}[outtype]
    for name, tensor in tensors.items():
        flat = len(shapes[name]) == 1 or name == "position_embd.weight"
        assert tensor.tensor_type == (T.F32 if flat else matrix_type), name
    assert {key: fields[key] for key in (
        "general.architecture", "general.type", "general.name", "general.file_type",
        "gpt2.context_length", "gpt2.embedding_length", "gpt2.block_count",
        "gpt2.feed_forward_length", "gpt2.attention.head_count")} == {
        "general.architecture": "gpt2", "general.type": "model",
        "general.name": f"model-{outtype}", "general.file_type": file_type,
        "gpt2.context_length": 120, "gpt2.embedding_length": 12, "gpt2.block_count": 1,
        "gpt2.feed_forward_length": 48, "gpt2.attention.head_count": 2}
    assert fields["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    # the model has no query/key/value biases: llama.cpp's attn_qkv.bias gets zeros
    assert not as_float32(tensors["blk.0.attn_qkv.bias"]).any()


def test_test_mode_f16_file_is_close(test_mode_exports):
    model, paths = test_mode_exports
    difference, largest = max_difference(model, paths["f16"], token_batch(ft.TEST_MODE_CONFIG))
    assert 0 < difference <= 1e-3 * largest  # rounded to f16, but barely


def test_q8_0_file_stores_8_bit_matrices_and_is_close(q8_export):
    model, path = q8_export
    _, tensors = read_gguf(path)
    for name, tensor in tensors.items():
        flat = tensor.data.ndim == 1 or name == "position_embd.weight"
        assert tensor.tensor_type == (T.F32 if flat else T.Q8_0), name
    # 34 bytes per 32 values (one f16 scale, 32 int8): about 27% of f32
    assert tensors["token_embd.weight"].data.nbytes == 50257 * 64 // 32 * 34
    difference, largest = max_difference(model, path, token_batch(Q8_CONFIG))
    assert 0 < difference <= 2e-2 * largest


def test_tied_head_is_read_from_the_embedding(tmp_path, tiny_cfg, capsys):
    """A head equal to the embedding is not written; llama.cpp reads token_embd for it."""
    model = random_model(tiny_cfg)
    with torch.no_grad():
        model.out_head.weight.copy_(model.tok_emb.weight)
    path, out = export(save(model, tmp_path / "model.pth", tiny_cfg), tmp_path / "gguf", capsys,
                       "--outtype", "f32")
    assert "output head: tied to the token embedding" in out
    _, tensors = read_gguf(path)
    assert set(tensors) == set(expected_tensors(tiny_cfg, tied=True))
    difference, _ = max_difference(model, path, token_batch(tiny_cfg))
    assert difference <= 1e-5


def test_unmerged_lora_is_merged_and_without_json_needs_lora_alpha(tmp_path, capsys):
    config = dict(ft.TEST_MODE_CONFIG)
    model = lora_trained_model(config)
    pth = str(tmp_path / "lora.pth")
    torch.save(model.state_dict(), pth)
    code, _, err = run_main([pth, tmp_path / "gguf"], capsys)
    assert code == 2
    assert_error(err, f"{tmp_path / 'lora.json'}: not found, and the weights hold unmerged LoRA "
                      "layers (rank 2)", "pass --lora_alpha")
    assert sorted(os.listdir(tmp_path)) == ["lora.pth"]
    path, out = export(pth, tmp_path / "gguf", capsys, "--lora_alpha", "4", "--outtype", "f32")
    assert "Merged the LoRA layers (rank 2, alpha 4.0) into the weights" in out
    _, tensors = read_gguf(path)
    assert set(tensors) == set(expected_tensors(config))
    difference, _ = max_difference(model, path, token_batch(config))
    assert difference <= 1e-5


#####################################
# The tokenizer
#####################################


def bpe(word, ranks):
    """The tokens of one pre-tokenized word (in byte-level characters): its characters merged
    pairwise, always the pair of lowest rank first, until no pair has one."""
    parts = list(word)
    while len(parts) > 1:
        rank, i = min((ranks.get(pair, math.inf), i)
                      for i, pair in enumerate(zip(parts, parts[1:], strict=False)))
        if rank == math.inf:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def file_tokenizer(tokens, merges, byte_chars):
    """encode(text) -> token ids from a GGUF file's tokens and merges, as llama.cpp's "gpt2"
    tokenizer with the "gpt-2" pre-tokenizer computes them. `byte_chars` spells each byte."""
    ids = {token: i for i, token in enumerate(tokens)}
    ranks = {tuple(merge.split(" ")): rank for rank, merge in enumerate(merges)}

    @cache
    def encode_word(word):
        spelled = "".join(byte_chars[byte] for byte in word.encode("utf-8"))
        return [ids[part] for part in bpe(spelled, ranks)]

    def encode(text):
        return [i for word in GPT2_SPLIT.findall(text) for i in encode_word(word)]

    return encode


def test_tokenizer_gives_tiktokens_ids_on_the_whole_dataset(test_mode_exports, tokenizer,
                                                           instruction_data_path):
    """BPE with the file's own merges over its own tokens gives tiktoken's ids for every
    training text of the chapter's dataset, in both prompt styles."""
    fields, _ = read_gguf(test_mode_exports[1]["f16"], vocabulary=True)
    tokens, merges = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.merges"]
    assert (len(tokens), len(merges)) == (50257, 50000)
    # the 256 single-byte tokens spell every byte; tiktoken says which byte each one is
    byte_chars = {tokenizer.decode_single_token_bytes(i)[0]: token
                  for i, token in enumerate(tokens) if len(token) == 1 and i < 256}
    assert len(byte_chars) == 256
    texts = [style.format_input(entry) + style.format_response(entry)
             for entry in load_json_entries(str(instruction_data_path))
             for style in PROMPT_STYLES.values()]
    assert len(texts) == 2200
    encode = file_tokenizer(tokens, merges, byte_chars)
    for text in texts:
        assert encode(text) == tokenizer.encode(text), text


def test_tokenizer_metadata(test_mode_exports, tokenizer):
    fields, _ = read_gguf(test_mode_exports[1]["f32"], vocabulary=True)
    vocab, merges = export_hf.bpe_vocab_and_merges(tokenizer)  # GPT-2's own files: see there
    assert fields["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    assert fields["tokenizer.ggml.merges"] == merges
    assert fields["tokenizer.ggml.tokens"][50256] == "<|endoftext|>"
    types = fields["tokenizer.ggml.token_type"]
    assert types[50256] == gguf.TokenType.CONTROL
    assert set(types[:50256]) == {gguf.TokenType.NORMAL}
    assert {key: fields[key] for key in (
        "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.add_bos_token")} == {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": 50256, "tokenizer.ggml.eos_token_id": 50256,
        "tokenizer.ggml.padding_token_id": 50256, "tokenizer.ggml.add_bos_token": False}


def test_chat_template_is_export_hfs_for_the_runs_style(styled_export):
    style, folder, _ = styled_export
    fields, _ = read_gguf(folder / "model-f32.gguf")
    assert fields["tokenizer.chat_template"] == export_hf.chat_template(style)


#####################################
# The Modelfile
#####################################


def modelfile_template(folder):
    """The TEMPLATE of the Modelfile in `folder`, as Ollama reads the text between \"\"\"."""
    text = (folder / "Modelfile").read_text()
    start = text.index('TEMPLATE """') + len('TEMPLATE """')
    return text[start:text.index('"""', start)]


def ask_ollama_prompt(template, prompt):
    """What Ollama sends the model for `prompt`: the template filled with it and cut at
    {{ .Response }}, the answer still to come."""
    return template.split("{{ .Response }}")[0].replace("{{ .Prompt }}", prompt)


def test_modelfile_for_the_test_mode_model(test_mode_exports):
    folder = test_mode_exports[1]["q8_0"].parent
    assert (folder / "Modelfile").read_text() == (
        "# The finetuned model, asked in its alpaca prompt style\n"
        '# An input goes after the instruction in the prompt, separated by "\\n\\n### Input:\\n"\n'
        "FROM ./model-q8_0.gguf\n"
        'TEMPLATE """Below is an instruction that describes a task. Write a response that '
        "appropriately completes the request.\n\n### Instruction:\n{{ .Prompt }}\n\n"
        '### Response:\n{{ .Response }}<|endoftext|>"""\n'
        'PARAMETER stop "<|endoftext|>"\n'
        'PARAMETER stop "### Instruction:"\n'
        "PARAMETER num_ctx 120\n"
        "PARAMETER temperature 0\n"
        "PARAMETER num_predict 256\n")


def test_modelfile_asks_as_the_script_does(styled_export, instruction_data_path, tokenizer):
    """Filled with an instruction, and its input after the style's separator when it has one
    (export_hf.user_message), TEMPLATE is the script's prompt for that entry followed by the
    response header: the script's prompt ids, then the header's ids that the finetuned model
    writes first. So Ollama's answer is the script's answer without the header."""
    style, folder, context_length = styled_export
    template = modelfile_template(folder)
    header = style.format_response({"output": ""})
    entries = load_json_entries(str(instruction_data_path))
    assert sum(bool(e["input"]) for e in entries) > 300 < sum(not e["input"] for e in entries)
    for entry in entries:
        script_prompt = style.format_input(entry)
        sent = ask_ollama_prompt(template, export_hf.user_message(style, entry["instruction"],
                                                                  entry["input"]))
        assert sent == script_prompt + header
        assert tokenizer.encode(sent) == tokenizer.encode(script_prompt) + \
            tokenizer.encode(header)
    stops = [line for line in (folder / "Modelfile").read_text().splitlines()
             if line.startswith("PARAMETER stop")]
    new_instruction = {"alpaca": "### Instruction:", "phi3": "<|user|>"}[style.name]
    assert stops == ['PARAMETER stop "<|endoftext|>"', f'PARAMETER stop "{new_instruction}"']
    assert f"PARAMETER num_ctx {context_length}\n" in (folder / "Modelfile").read_text()


def test_modelfile_says_how_to_give_an_input(styled_export):
    style, folder, _ = styled_export
    separator = {"alpaca": r"\n\n### Input:\n", "phi3": r"\n"}[style.name]
    assert (folder / "Modelfile").read_text().splitlines()[1] == (
        f'# An input goes after the instruction in the prompt, separated by "{separator}"')


def test_bash_quoted_text_is_one_word_bash_reads_back():
    text = "Rewrite: 'it's'\n\n### Input:\na \\ b $HOME"
    quoted = export_gguf.bash_quoted(text)
    assert quoted == "$'Rewrite: \\'it\\'s\\'\\n\\n### Input:\\na \\\\ b $HOME'"
    assert subprocess.run(["bash", "-c", f"printf %s {quoted}"], capture_output=True,
                          text=True, check=True).stdout == text


def test_modelfile_renders_an_earlier_turn_as_a_whole_training_example(styled_export):
    """Ollama fills an earlier turn of a chat with its answer too, and keeps what follows
    {{ .Response }}: the example then ends as the training texts did."""
    style, folder, _ = styled_export
    template = modelfile_template(folder)
    entry = {"instruction": "Name a color.", "input": "", "output": "Red."}
    earlier = template.replace("{{ .Prompt }}", entry["instruction"]).replace(
        "{{ .Response }}", entry["output"])
    assert earlier == style.format_input(entry) + style.format_response(entry) + "<|endoftext|>"


#####################################
# The command line: what it prints, bad input, stopped writes
#####################################


def test_prints_what_was_written_and_the_commands(tmp_path, capsys):
    config = dict(ft.TEST_MODE_CONFIG)
    pth = save(random_model(config), tmp_path / "sft.pth", config, "phi3")
    folder = tmp_path / "gguf"
    folder.mkdir()  # an empty folder is taken
    path, out = export(pth, folder, capsys)
    assert path == folder / "sft-f16.gguf"
    size_mb = os.path.getsize(path) / 1e6
    assert out.splitlines() == [
        f"Wrote {folder}: sft-f16.gguf (f16, {size_mb:.1f} MB), Modelfile",
        "Prompt style: phi3 (in the Modelfile's TEMPLATE and the GGUF chat template); output "
        "head: its own output.weight",
        "Run it with Ollama:",
        f"    ollama create my-gpt2-sft -f {folder}/Modelfile",
        '    ollama run my-gpt2-sft "Name three primary colors."',
        "    ollama run my-gpt2-sft $'Rewrite the sentence.\\nThe cake was baked by me.'   # "
        "with an input",
        "or with llama.cpp (greedy, as the chapter generates):",
        f"    llama-server -m {path} --temp 0    # chat at http://127.0.0.1:8080",
        f"    llama-cli -m {path} --temp 0       # chat in the terminal",
    ]
    assert sorted(os.listdir(tmp_path)) == ["gguf", "sft.json", "sft.pth"]


def test_q8_0_says_which_matrices_stay_f16(test_mode_exports, tmp_path, capsys):
    pth = str(test_mode_exports[1]["f32"].parent.parent / "model.pth")
    _, out = export(pth, tmp_path / "gguf", capsys, "--outtype", "q8_0")
    assert ("6 matrices are stored f16: their rows are not a multiple of q8_0's 32 values\n"
            in out)


def assert_refused(argv, capsys, *parts):
    """The export ends with exit 2 and one 'Error:' line holding each of `parts`."""
    code, out, err = run_main(argv, capsys)
    assert code == 2
    assert_error(err, *parts)


@pytest.fixture
def saved_model(tmp_path):
    """The test-mode model saved in `tmp_path`; returns the .pth path."""
    config = dict(ft.TEST_MODE_CONFIG)
    return save(random_model(config), tmp_path / "model.pth", config)


def test_missing_and_damaged_model_files_are_refused(tmp_path, capsys, saved_model):
    missing = tmp_path / "missing.pth"
    assert_refused([missing, tmp_path / "gguf"], capsys, f"{missing}: file not found")
    with open(saved_model, "rb") as f:
        head = f.read(2000)
    with open(saved_model, "wb") as f:
        f.write(head)
    assert_refused([saved_model, tmp_path / "gguf"], capsys,
                   f"{saved_model}: damaged or not a PyTorch weight file")
    assert sorted(os.listdir(tmp_path)) == ["model.json", "model.pth"]


def test_pth_holding_a_list_or_a_checkpoint_is_refused(tmp_path, capsys):
    path = tmp_path / "model.pth"
    torch.save([1, 2], path)
    assert_refused([path, tmp_path / "gguf"], capsys,
                   f"{path}: not a state dict of model weights (it holds an object of type "
                   "list); a checkpoint?")
    torch.save({"model": {}, "optimizer": {}, "progress": {}, "settings": {}}, path)
    assert_refused([path, tmp_path / "gguf"], capsys, "it holds a dict whose 'model' is of type "
                                                      "dict); a checkpoint?")
    assert os.listdir(tmp_path) == ["model.pth"]


def test_models_that_are_not_gpt2_shaped_are_refused(tmp_path, capsys):
    config = {**ft.TEST_MODE_CONFIG, "vocab_size": 1000}
    pth = save(random_model(config), tmp_path / "model.pth", config)
    assert_refused([pth, tmp_path / "gguf"], capsys,
                   f"{pth}: has a vocabulary of 1000 tokens, GPT-2's tokenizer 50257")
    (tmp_path / "model.json").write_text(json.dumps({
        "config": {**ft.TEST_MODE_CONFIG, "n_heads": 0}, "prompt_style": "alpaca"}))
    assert_refused([pth, tmp_path / "gguf"], capsys,
                   f"{tmp_path / 'model.json'}: config key 'n_heads' must be an integer of at "
                   "least 1, got 0")
    (tmp_path / "model.json").unlink()
    torch.save(random_model({**ft.TEST_MODE_CONFIG, "emb_dim": 20}).state_dict(), pth)
    assert_refused([pth, tmp_path / "gguf"], capsys,
                   f"{pth}: not a GPT-2 state dict", "no GPT-2 size has an embedding of 20")
    assert os.listdir(tmp_path) == ["model.pth"]


def test_existing_folder_is_never_replaced(tmp_path, capsys, saved_model):
    folder = tmp_path / "gguf"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    assert_refused([saved_model, folder], capsys, f"{folder}: the folder exists and is not empty")
    assert_refused([saved_model, folder / "notes.txt"], capsys,
                   f"{folder / 'notes.txt'}: is a file, not a folder")
    assert os.listdir(folder) == ["notes.txt"] and (folder / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("flags, message", [
    (["--outtype", "q4_0"], "--outtype q4_0: choose one of f32, f16, q8_0"),
    (["--outtype", "F16"], "--outtype F16: choose one of f32, f16, q8_0"),
    (["--lora_alpha", "0"], "--lora_alpha must be a finite number above 0, got 0.0"),
    (["--lora_alpha", "nan"], "--lora_alpha must be a finite number above 0, got nan"),
])
def test_bad_flags_are_refused_before_loading(tmp_path, capsys, flags, message):
    assert_refused([tmp_path / "missing.pth", tmp_path / "gguf", *flags], capsys, message)
    assert os.listdir(tmp_path) == []


def test_bad_outtype_from_the_shell_is_one_line(tmp_path):
    result = run_script("export_gguf.py", "model.pth", "out", "--outtype", "q4_k", cwd=tmp_path)
    assert result.returncode == 2
    assert_error(result.stderr, "--outtype q4_k: choose one of f32, f16, q8_0")
    assert result.stdout == "" and os.listdir(tmp_path) == []


def stop_mid_file(monkeypatch, stop, folder):
    """Make an export into `folder` stop in the middle of the GGUF file, once its first tensor
    is written: by raising `stop`, or by sending the process SIGTERM when `stop` is "sigterm"."""
    write = gguf.GGUFWriter.write_tensor_data

    def write_then_stop(self, tensor, *args, **kwargs):
        write(self, tensor, *args, **kwargs)
        self.flush()
        [partial] = folder.glob(".tmp-export-*/*.gguf")
        assert partial.stat().st_size > tensor.nbytes  # header, metadata, one tensor
        if stop == "sigterm":
            signal.raise_signal(signal.SIGTERM)  # the export's handler raises Interrupted
        else:
            raise stop

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", write_then_stop)


def last_line(err):
    """The last line of stderr, after any progress bar's redraws."""
    return err.rstrip("\n").split("\n")[-1].split("\r")[-1]


def test_full_disk_leaves_nothing(tmp_path, capsys, monkeypatch, saved_model):
    stop_mid_file(monkeypatch, OSError(28, "No space left on device"), tmp_path)
    code, _, err = run_main([saved_model, tmp_path / "gguf"], capsys)
    assert code == 1 and "Traceback" not in err
    assert last_line(err) == (
        f"Error: {tmp_path / 'gguf'}: could not write the export (No space left on device); "
        "nothing was written. Free some space or pass another OUT_DIR, and run again")
    assert sorted(os.listdir(tmp_path)) == ["model.json", "model.pth"]


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_interrupt_while_writing_leaves_nothing(tmp_path, capsys, monkeypatch, saved_model,
                                                stop):
    stop_mid_file(monkeypatch, KeyboardInterrupt() if stop == "ctrl-c" else stop, tmp_path)
    code, _, err = run_main([saved_model, tmp_path / "gguf"], capsys)
    assert code == (130 if stop == "ctrl-c" else 143) and "Traceback" not in err
    assert last_line(err) == (f"{stopped(stop)}; nothing was written to {tmp_path / 'gguf'}: "
                              "run the same command again to export.")
    assert sorted(os.listdir(tmp_path)) == ["model.json", "model.pth"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
