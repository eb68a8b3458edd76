"""export_hf.py: a finetuned .pth becomes a Hugging Face folder that transformers runs as the repo
does (same logits, same greedy tokens), with GPT-2's tokenizer and the run's prompt as its chat
template; bad input ends with one line and leaves nothing behind."""

import json
import os
import signal

import pytest
import tiktoken.load
import torch
from helpers import assert_error, lora_trained_model, random_model, save, stopped
from safetensors import SafetensorError, safe_open

import export_hf
import gpt_instruction_finetuning as ft
from gpt_download import load_gpt2_params_from_safetensors
from kit.data import PROMPT_STYLES, load_json_entries
from lora import lora_config
from previous_chapters import GPTModel, generate, load_weights_into_gpt

TIKTOKEN_GPT2 = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
GPT2_124M = {**ft.BASE_CONFIG, **ft.MODEL_CONFIGS["124M"][1]}
HEADERS = {"alpaca": "\n\n### Response:\n", "phi3": "\n<|assistant|>:\n"}


#####################################
# Helpers
#####################################


def run_main(argv, capsys):
    """export_hf.main(argv); return (exit code, stdout, stderr)."""
    try:
        export_hf.main([str(arg) for arg in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def export(pth, out_dir, capsys, *flags):
    """Export `pth` to `out_dir` through the command line's entry point; return stdout."""
    code, out, err = run_main([pth, out_dir, *flags], capsys)
    assert code == 0, err
    return out


def load_hf(folder):
    """GPT2LMHeadModel from `folder` (eval mode), after checking that every tensor it needs was
    found in the folder and nothing else was."""
    from transformers import GPT2LMHeadModel

    model, info = GPT2LMHeadModel.from_pretrained(str(folder), output_loading_info=True)
    problems = {k: info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert not any(problems.values()), problems
    return model.eval()


def load_hf_tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def token_batch(vocab_size, context_length, seed=0):
    """Two rows of random token ids, short enough for the test model's context."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (2, min(16, context_length)), generator=generator)


def assert_same_logits(ours, hf, idx):
    with torch.no_grad():
        expected = ours(idx)
        got = hf(idx).logits
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5


def assert_same_greedy_tokens(ours, hf, prompt, context_length, new_tokens=20):
    """Our `generate` and transformers' `generate` (with the exported generation config) append
    the same `new_tokens` tokens to `prompt` (1, n)."""
    expected = generate(ours, prompt, new_tokens, context_length)
    with torch.no_grad():
        got = hf.generate(prompt, max_new_tokens=new_tokens,
                          attention_mask=torch.ones_like(prompt))
    assert got.shape == (1, prompt.shape[1] + new_tokens)
    assert got.tolist() == expected.tolist()


def tensor_names(folder):
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        return set(f.keys())


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def entries_with_and_without_input(path):
    """The dataset's first 20 entries with an input and its first 20 without one."""
    data = load_json_entries(path)
    return ([e for e in data if e["input"]][:20]) + ([e for e in data if not e["input"]][:20])


#####################################
# Shared exports
#####################################


@pytest.fixture(scope="module")
def test_mode_export(tmp_path_factory):
    """The --test_mode model (12-dim, 1 layer, no qkv bias; head apart from the embedding),
    saved and exported. Returns (model, folder)."""
    root = tmp_path_factory.mktemp("test-mode")
    config = dict(ft.TEST_MODE_CONFIG)
    model = random_model(config)
    folder = root / "hf"
    export_hf.main([save(model, root / "model.pth", config), str(folder)])
    return model, folder


@pytest.fixture(scope="module", params=["alpaca", "phi3"])
def styled_export(request, tmp_path_factory):
    """A tiny model saved with each prompt style and exported. Returns (style, folder)."""
    root = tmp_path_factory.mktemp(request.param)
    config = {**ft.TEST_MODE_CONFIG, "context_length": 16}
    folder = root / "hf"
    export_hf.main([save(random_model(config), root / "model.pth", config, request.param),
                    str(folder)])
    return PROMPT_STYLES[request.param], folder


@pytest.fixture(scope="module")
def gpt2_124m_export(tmp_path_factory):
    """A random GPT-2 124M (separate head, qkv biases) saved and exported; (model, folder)."""
    root = tmp_path_factory.mktemp("124M")
    model = random_model(GPT2_124M)
    folder = root / "hf"
    export_hf.main([save(model, root / "model.pth", GPT2_124M), str(folder)])
    return model, folder


#####################################
# The model
#####################################


def test_test_mode_model_gives_the_same_logits_and_tokens(test_mode_export):
    model, folder = test_mode_export
    hf = load_hf(folder)
    config = ft.TEST_MODE_CONFIG
    assert_same_logits(model, hf, token_batch(config["vocab_size"], config["context_length"]))
    prompt = torch.tensor([[21106, 318, 281, 12064, 13]])
    assert_same_greedy_tokens(model, hf, prompt, config["context_length"])


def test_test_mode_config_and_tensors(test_mode_export):
    _, folder = test_mode_export
    assert sorted(os.listdir(folder)) == sorted(export_hf.FILES)
    config = read_json(folder / "config.json")
    assert {k: config[k] for k in ("architectures", "model_type", "vocab_size", "n_positions",
                                   "n_ctx", "n_embd", "n_layer", "n_head", "activation_function",
                                   "layer_norm_epsilon", "bos_token_id", "eos_token_id",
                                   "tie_word_embeddings")} == {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 50257,
        "n_positions": 120, "n_ctx": 120, "n_embd": 12, "n_layer": 1, "n_head": 2,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "bos_token_id": 50256, "eos_token_id": 50256, "tie_word_embeddings": False}
    assert read_json(folder / "generation_config.json") == {
        "bos_token_id": 50256, "eos_token_id": 50256, "pad_token_id": 50256,
        "do_sample": False, "num_beams": 1, "max_new_tokens": 256}
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in f.keys()
        assert f.get_tensor("transformer.h.0.attn.c_attn.weight").shape == (12, 36)
        # the model has no query/key/value biases: GPT-2's c_attn gets zeros
        assert torch.equal(f.get_tensor("transformer.h.0.attn.c_attn.bias"), torch.zeros(36))


def test_gpt2_124m_gives_the_same_logits_and_tokens(gpt2_124m_export):
    model, folder = gpt2_124m_export
    config = read_json(folder / "config.json")
    assert config["n_ctx"] == config["n_positions"] == 1024  # as in OpenAI's GPT-2 configs
    hf = load_hf(folder)
    assert_same_logits(model, hf, token_batch(50257, 1024))
    prompt = torch.tensor([[21106, 318, 281, 12064, 326, 8477, 257, 4876, 13]])
    assert_same_greedy_tokens(model, hf, prompt, 1024)


def test_gpt2_124m_export_reads_back_through_the_repos_safetensors_loader(gpt2_124m_export):
    """`--weights safetensors` reads the exported file back whole, its own output head too."""
    model, folder = gpt2_124m_export
    settings = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12}
    params = load_gpt2_params_from_safetensors(str(folder / "model.safetensors"), settings)
    reloaded = GPTModel(GPT2_124M).eval()
    load_weights_into_gpt(reloaded, params)
    ours, theirs = model.state_dict(), reloaded.state_dict()
    assert ours.keys() == theirs.keys()
    assert not torch.equal(ours["out_head.weight"], ours["tok_emb.weight"])  # untied
    for name in ours:
        assert torch.equal(theirs[name], ours[name]), name


def test_tied_head_is_exported_tied_and_reads_back_with_the_same_logits(tmp_path, tiny_cfg,
                                                                        capsys):
    """A head equal to the embedding (GPT-2 before finetuning) is written once, tied, and the
    repo's safetensors loader rebuilds the model with the same logits."""
    model = random_model(tiny_cfg)
    with torch.no_grad():
        model.out_head.weight.copy_(model.tok_emb.weight)
    folder = tmp_path / "hf"
    out = export(save(model, tmp_path / "model.pth", tiny_cfg), folder, capsys)
    assert "output head: tied to the token embedding" in out
    assert read_json(folder / "config.json")["tie_word_embeddings"] is True
    assert "lm_head.weight" not in tensor_names(folder)
    idx = token_batch(tiny_cfg["vocab_size"], tiny_cfg["context_length"])
    assert_same_logits(model, load_hf(folder), idx)

    settings = {"n_vocab": tiny_cfg["vocab_size"], "n_ctx": tiny_cfg["context_length"],
                "n_embd": tiny_cfg["emb_dim"], "n_head": tiny_cfg["n_heads"],
                "n_layer": tiny_cfg["n_layers"]}
    reloaded = GPTModel(tiny_cfg).eval()
    load_weights_into_gpt(reloaded, load_gpt2_params_from_safetensors(
        str(folder / "model.safetensors"), settings))
    with torch.no_grad():
        assert (reloaded(idx) - model(idx)).abs().max().item() <= 1e-5


def test_unmerged_lora_model_is_exported_merged(tmp_path, capsys):
    """A LoRA model saved without --merge_lora exports as a plain GPT-2 with its logits."""
    config = dict(ft.TEST_MODE_CONFIG)
    model = lora_trained_model(config)
    pth = save(model, tmp_path / "lora.pth", {**config, "lora": lora_config(model)})
    out = export(pth, tmp_path / "hf", capsys)
    assert "Merged the LoRA layers (rank 2, alpha 4) into the weights" in out
    assert not any("lora" in name for name in tensor_names(tmp_path / "hf"))
    hf = load_hf(tmp_path / "hf")
    idx = token_batch(config["vocab_size"], config["context_length"])
    with torch.no_grad():
        plain = GPTModel(config).eval()
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if "lora" not in k},
                              strict=False)
        assert (plain(idx) - model(idx)).abs().max().item() > 1e-2  # the LoRA update counts
    assert_same_logits(model, hf, idx)


def test_unmerged_lora_pth_without_json_needs_lora_alpha(tmp_path, capsys):
    """The JSON records alpha; without it --lora_alpha gives it, and the export is merged with
    that alpha."""
    config = dict(ft.TEST_MODE_CONFIG)
    model = lora_trained_model(config)
    pth = str(tmp_path / "lora.pth")
    torch.save(model.state_dict(), pth)
    assert_refused([pth, tmp_path / "hf"], capsys,
                   f"{tmp_path / 'lora.json'}: not found, and the weights hold unmerged LoRA "
                   "layers (rank 2)", "pass --lora_alpha")
    assert sorted(os.listdir(tmp_path)) == ["lora.pth"]
    out = export(pth, tmp_path / "hf", capsys, "--lora_alpha", "4")
    assert "Merged the LoRA layers (rank 2, alpha 4.0) into the weights" in out
    idx = token_batch(config["vocab_size"], config["context_length"])
    assert_same_logits(model, load_hf(tmp_path / "hf"), idx)


def test_unused_lora_alpha_is_noted(tmp_path, capsys):
    config = dict(ft.TEST_MODE_CONFIG)
    pth = save(random_model(config), tmp_path / "model.pth", config)
    out = export(pth, tmp_path / "hf", capsys, "--lora_alpha", "16")
    assert "Note: --lora_alpha 16 is not used: the weights hold no unmerged LoRA layers\n" in out


@pytest.mark.parametrize("value", ["0", "-2", "nan", "inf"])
def test_bad_lora_alpha_is_refused_before_loading(tmp_path, capsys, value):
    assert_refused([tmp_path / "missing.pth", tmp_path / "hf", "--lora_alpha", value], capsys,
                   f"--lora_alpha must be a finite number above 0, got {float(value)!r}")
    assert os.listdir(tmp_path) == []


#####################################
# The tokenizer and chat template
#####################################


def test_vocab_and_merges_are_gpt2s_own_files(tokenizer):
    """Derived from tiktoken's ranks, they equal OpenAI's encoder.json and vocab.bpe, the files
    tiktoken itself was built from."""
    vocab, merges = export_hf.bpe_vocab_and_merges(tokenizer)
    assert vocab == json.loads(tiktoken.load.read_file_cached(TIKTOKEN_GPT2 + "encoder.json"))
    lines = tiktoken.load.read_file_cached(TIKTOKEN_GPT2 + "vocab.bpe").decode("utf-8")
    assert merges == lines.split("\n")[1:-1]  # after "#version: 0.2", before the final newline
    assert len(merges) == 50000 and vocab["<|endoftext|>"] == 50256


def test_tokenizer_ids_equal_tiktokens_on_the_whole_dataset(test_mode_export, tokenizer,
                                                            instruction_data_path):
    hf_tokenizer = load_hf_tokenizer(test_mode_export[1])
    texts = [style.format_input(entry) + style.format_response(entry)
             for entry in load_json_entries(instruction_data_path)
             for style in PROMPT_STYLES.values()]
    assert len(texts) == 2200
    ids = hf_tokenizer(texts)["input_ids"]
    assert ids == [tokenizer.encode(text) for text in texts]
    assert [hf_tokenizer.decode(row) for row in ids] == texts


def test_tokenizer_special_tokens_and_length(test_mode_export, tokenizer):
    hf_tokenizer = load_hf_tokenizer(test_mode_export[1])
    text = "Ends here.<|endoftext|> Naïve café 😀\n\n  tabs\tand  spaces "
    assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(
        text, allowed_special={"<|endoftext|>"})
    assert (hf_tokenizer.eos_token_id, hf_tokenizer.bos_token_id,
            hf_tokenizer.pad_token_id) == (50256, 50256, 50256)
    assert hf_tokenizer.model_max_length == 120
    assert len(hf_tokenizer) == 50257


def test_chat_template_writes_the_runs_prompt(styled_export, instruction_data_path, tokenizer):
    style, folder = styled_export
    hf_tokenizer = load_hf_tokenizer(folder)
    for entry in entries_with_and_without_input(instruction_data_path):
        user = {"role": "user", "content": entry["instruction"], "input": entry["input"]}
        prompt = style.format_input(entry)
        assert hf_tokenizer.apply_chat_template(
            [user], add_generation_prompt=True, tokenize=False) == prompt + HEADERS[style.name]
        assert hf_tokenizer.apply_chat_template([user], tokenize=False) == prompt
        # a whole example tokenizes to the ids finetuning trained on: prompt, response, end
        assistant = {"role": "assistant", "content": entry["output"]}
        text = hf_tokenizer.apply_chat_template([user, assistant], tokenize=False)
        assert text == prompt + HEADERS[style.name] + entry["output"] + "<|endoftext|>"
        assert hf_tokenizer(text)["input_ids"] == ft.InstructionDataset(
            [entry], tokenizer, style)[0] + [50256]


def test_an_input_in_the_messages_content_writes_the_runs_prompt(styled_export,
                                                                  instruction_data_path):
    """A tool that sends only role and content gives the input after the instruction and the
    style's separator (export_hf.user_message): the same prompt as the `input` key."""
    style, folder = styled_export
    hf_tokenizer = load_hf_tokenizer(folder)
    entries = entries_with_and_without_input(instruction_data_path)
    for entry in entries:
        content = export_hf.user_message(style, entry["instruction"], entry["input"])
        assert hf_tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True,
            tokenize=False) == style.format_input(entry) + HEADERS[style.name]
    assert export_hf.user_message(style, "Rewrite the sentence.", "The cake was baked.") == {
        "alpaca": "Rewrite the sentence.\n\n### Input:\nThe cake was baked.",
        "phi3": "Rewrite the sentence.\nThe cake was baked."}[style.name]
    assert export_hf.user_message(style, "Name a color.") == "Name a color."


def test_chat_template_input_key_is_optional(styled_export):
    style, folder = styled_export
    hf_tokenizer = load_hf_tokenizer(folder)
    rendered = hf_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name a color."}], add_generation_prompt=True,
        tokenize=False)
    expected = {"alpaca": "Below is an instruction that describes a task. Write a response that "
                          "appropriately completes the request.\n\n### Instruction:\n"
                          "Name a color.\n\n### Response:\n",
                "phi3": "<|user|>\nName a color.\n<|assistant|>:\n"}
    assert rendered == expected[style.name]


def test_chat_template_refuses_conversations_it_was_not_trained_on(styled_export):
    from jinja2 import TemplateError

    hf_tokenizer = load_hf_tokenizer(styled_export[1])
    user = {"role": "user", "content": "Name a color."}
    for messages in ([user, user], [{"role": "system", "content": "Be brief."}, user],
                     [user, {"role": "assistant", "content": "Red."}, user]):
        with pytest.raises(TemplateError, match="one user message"):
            hf_tokenizer.apply_chat_template(messages, tokenize=False)


#####################################
# The command line: what it prints, and bad input
#####################################


def test_prints_what_was_written_and_how_to_load_it(tmp_path, capsys):
    config = dict(ft.TEST_MODE_CONFIG)
    pth = save(random_model(config), tmp_path / "model.pth", config, "phi3")
    folder = tmp_path / "hf"
    folder.mkdir()  # an empty folder is taken
    out = export(pth, folder, capsys)
    assert f"Wrote {folder}: config.json, model.safetensors, generation_config.json, " \
           "vocab.json, merges.txt, tokenizer_config.json\n" in out
    assert "Prompt style: phi3 (in the chat template); output head: its own lm_head.weight" in out
    assert f"    model = GPT2LMHeadModel.from_pretrained('{folder}')\n" in out
    assert f"    tokenizer = AutoTokenizer.from_pretrained('{folder}')\n" in out
    assert sorted(os.listdir(folder)) == sorted(export_hf.FILES)
    assert sorted(os.listdir(tmp_path)) == ["hf", "model.json", "model.pth"]


def assert_refused(argv, capsys, *parts):
    """The export ends with exit 2 and one 'Error:' line (after the progress bar, if it had
    started) holding each of `parts`."""
    code, _, err = run_main(argv, capsys)
    assert code == 2
    assert_error(err, *parts)


def test_missing_model_file_is_refused(tmp_path, capsys):
    assert_refused([tmp_path / "missing.pth", tmp_path / "hf"], capsys,
                   f"{tmp_path / 'missing.pth'}: file not found")
    assert os.listdir(tmp_path) == []


def test_damaged_model_file_is_refused(tmp_path, capsys):
    config = dict(ft.TEST_MODE_CONFIG)
    pth = save(random_model(config), tmp_path / "model.pth", config)
    with open(pth, "rb") as f:
        head = f.read(2000)
    with open(pth, "wb") as f:
        f.write(head)
    assert_refused([pth, tmp_path / "hf"], capsys, f"{pth}: damaged or not a PyTorch weight file")
    assert sorted(os.listdir(tmp_path)) == ["model.json", "model.pth"]


def test_bare_weights_of_unknown_shape_are_refused(tmp_path, capsys):
    """Without the JSON the config is read off the shapes: no GPT-2 has a 20-dim embedding."""
    config = {**ft.TEST_MODE_CONFIG, "emb_dim": 20}
    pth = str(tmp_path / "model.pth")
    torch.save(random_model(config).state_dict(), pth)
    assert_refused([pth, tmp_path / "hf"], capsys,
                   f"{pth}: not a GPT-2 state dict", "no GPT-2 size has an embedding of 20")
    assert os.listdir(tmp_path) == ["model.pth"]


def test_json_config_that_builds_no_model_is_refused(tmp_path, capsys):
    config = dict(ft.TEST_MODE_CONFIG)
    pth = save(random_model(config), tmp_path / "model.pth", {**config, "n_heads": 5})
    assert_refused([pth, tmp_path / "hf"], capsys,
                   f"{tmp_path / 'model.json'}: config key 'emb_dim' must be divisible by "
                   "n_heads (5), got 12; fix or delete it")
    assert sorted(os.listdir(tmp_path)) == ["model.json", "model.pth"]


def test_existing_folder_is_never_replaced(tmp_path, capsys):
    config = dict(ft.TEST_MODE_CONFIG)
    pth = save(random_model(config), tmp_path / "model.pth", config)
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    assert_refused([pth, folder], capsys, f"{folder}: the folder exists and is not empty")
    assert os.listdir(folder) == ["notes.txt"]
    assert_refused([pth, folder / "notes.txt"], capsys,
                   f"{folder / 'notes.txt'}: is a file, not a folder")
    assert (folder / "notes.txt").read_text() == "mine"


def test_vocabulary_other_than_gpt2s_is_refused(tmp_path, capsys):
    config = {**ft.TEST_MODE_CONFIG, "vocab_size": 1000}
    pth = save(random_model(config), tmp_path / "model.pth", config)
    assert_refused([pth, tmp_path / "hf"], capsys,
                   f"{pth}: has a vocabulary of 1000 tokens, GPT-2's tokenizer 50257")
    assert sorted(os.listdir(tmp_path)) == ["model.json", "model.pth"]


def assert_stopped(argv, capsys, code, line):
    """The export ends with exit `code` and, after the progress bar, the one line `line`."""
    got, _, err = run_main(argv, capsys)
    assert got == code
    assert "Traceback" not in err
    assert err.rstrip("\n").split("\n")[-1].split("\r")[-1] == line, err


@pytest.mark.parametrize("error", [
    OSError(28, "No space left on device"),
    SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
])
def test_failed_write_leaves_nothing(tmp_path, capsys, monkeypatch, error):
    """A write that fails midway (a full disk) ends with one line and exit 1; no folder, no
    temporary. safetensors reports a full disk as its own error."""
    def full_disk(tensors, path, metadata):
        with open(path, "wb") as f:
            f.write(b"half")
        raise error

    config = dict(ft.TEST_MODE_CONFIG)
    pth = save(random_model(config), tmp_path / "model.pth", config)
    monkeypatch.setattr(export_hf, "save_file", full_disk)
    reason = "No space left on device" if isinstance(error, OSError) else \
        "I/O error: No space left on device (os error 28)"
    assert_stopped([pth, tmp_path / "hf"], capsys, 1,
                   f"Error: {tmp_path / 'hf'}: could not write the export ({reason}); nothing "
                   "was written. Free some space or pass another OUT_DIR, and run again")
    assert sorted(os.listdir(tmp_path)) == ["model.json", "model.pth"]


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_interrupted_write_leaves_nothing(tmp_path, capsys, monkeypatch, stop):
    """Ctrl-C or SIGTERM while the weights are written: exit 130 or 143, one line, an empty OUT_DIR
    stays empty and no temporary folder is left."""
    def interrupted(tensors, path, metadata):
        with open(path, "wb") as f:
            f.write(b"half")
        if stop == "ctrl-c":
            raise KeyboardInterrupt
        signal.raise_signal(signal.SIGTERM)

    config = dict(ft.TEST_MODE_CONFIG)
    pth = save(random_model(config), tmp_path / "model.pth", config)
    (tmp_path / "hf").mkdir()
    monkeypatch.setattr(export_hf, "save_file", interrupted)
    assert_stopped([pth, tmp_path / "hf"], capsys, 130 if stop == "ctrl-c" else 143,
                   f"{stopped(stop)}; nothing was written to {tmp_path / 'hf'}: run the same "
                   "command again to export.")
    assert sorted(os.listdir(tmp_path)) == ["hf", "model.json", "model.pth"]
    assert os.listdir(tmp_path / "hf") == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone again
