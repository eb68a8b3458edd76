"""The book's own code as an independent reference: ours and the book's, side by side.

`llms_from_scratch` is the package of the book's published code. Each test runs our function and
the book's on the same input under the same seed and compares what comes out: initial weights,
logits, generated tokens, prompts, datasets and batches, training losses, and the .pth files
the scripts write, which must load into the book's GPTModel (and the book's into ours).
Nothing of the book's code is copied here; it is only called.
"""

import inspect
import json
import os
import subprocess
import sys
from functools import partial

import numpy as np
import pytest
import torch

# The book's package, installed with `pip install --no-deps llms-from-scratch` (README, .ci/run)
from llms_from_scratch import appendix_d as book_appendix_d
from llms_from_scratch import appendix_e as book_appendix_e
from llms_from_scratch import ch02 as book_ch02
from llms_from_scratch import ch04 as book_ch04
from llms_from_scratch import ch05 as book_ch05
from llms_from_scratch import ch07 as book_ch07
from torch.utils.data import DataLoader

import gpt_instruction_finetuning as ft
import previous_chapters as pc
from kit.checkpoint import fingerprint
from kit.data import load_json_entries
from kit.device import make_optimizer
from kit.metrics_log import read_metrics
from kit.saved_model import load_finetuned_model, model_info_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOOK_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate",
             "qkv_bias")
CONFIGS = {
    "tiny": {"vocab_size": 50257, "context_length": 32, "emb_dim": 16, "n_heads": 2,
             "n_layers": 2, "drop_rate": 0.0, "qkv_bias": True},
    "test_mode": dict(ft.TEST_MODE_CONFIG),
    "dropout": {"vocab_size": 50257, "context_length": 24, "emb_dim": 24, "n_heads": 3,
                "n_layers": 3, "drop_rate": 0.1, "qkv_bias": True},
}
# Small enough to train in a blink; the chapter's entries are cut to its 64 positions.
TRAIN_CONFIG = {"vocab_size": 50257, "context_length": 64, "emb_dim": 16, "n_heads": 2,
                "n_layers": 2, "drop_rate": 0.0, "qkv_bias": True}


def book_cfg(cfg):
    """Only the config keys the book's GPTModel knows (ours also takes "fused")."""
    return {key: cfg[key] for key in BOOK_KEYS}


def twin_models(cfg, fused=True, seed=123):
    """Our GPTModel and the book's with the same weights, both in eval mode."""
    torch.manual_seed(seed)
    ours = pc.GPTModel({**cfg, "fused": fused}).eval()
    book = book_ch04.GPTModel(book_cfg(cfg)).eval()
    book.load_state_dict(ours.state_dict())  # strict
    return ours, book


def random_ids(shape, seed=0):
    """Token ids drawn from their own generator, leaving the global seed alone."""
    return torch.randint(0, 50257, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def chapter_data(instruction_data_path):
    """The chapter's 1100 entries."""
    data = load_json_entries(instruction_data_path)
    assert len(data) == 1100
    return data


#####################################
# Names and signatures
#####################################

BOOK_NAMES = {  # public names of the book's chapter-7 previous_chapters.py -> book module
    "GPTDatasetV1": "ch02", "create_dataloader_v1": "ch02",
    "MultiHeadAttention": "ch03",
    "LayerNorm": "ch04", "GELU": "ch04", "FeedForward": "ch04", "TransformerBlock": "ch04",
    "GPTModel": "ch04", "generate_text_simple": "ch04",
    "generate": "ch05", "train_model_simple": "ch05", "evaluate_model": "ch05",
    "generate_and_print_sample": "ch05", "assign": "ch05", "load_weights_into_gpt": "ch05",
    "text_to_token_ids": "ch05", "token_ids_to_text": "ch05", "calc_loss_batch": "ch05",
    "calc_loss_loader": "ch05", "plot_losses": "ch05",
}
CHAPTER_NAMES = ["download_and_load_file", "format_input", "InstructionDataset",
                 "custom_collate_fn"]


def check_signature(ours, book, name):
    """The book's parameters come first in ours, with the same defaults; ours adds only
    parameters that have a default, so every call written for the book works."""
    ours_params = list(inspect.signature(ours).parameters.values())
    book_params = list(inspect.signature(book).parameters.values())
    assert [p.name for p in ours_params[:len(book_params)]] == [p.name for p in book_params], name
    for mine, theirs in zip(ours_params, book_params, strict=False):
        assert mine.default == theirs.default, f"{name}({mine.name}=...)"
    for extra in ours_params[len(book_params):]:
        assert extra.default is not inspect.Parameter.empty, f"{name}: {extra.name} needs a default"


@pytest.mark.parametrize("name", list(BOOK_NAMES))
def test_previous_chapters_has_the_books_names_and_signatures(name):
    import importlib

    book = getattr(importlib.import_module(f"llms_from_scratch.{BOOK_NAMES[name]}"), name)
    check_signature(getattr(pc, name), book, name)


@pytest.mark.parametrize("name", CHAPTER_NAMES)
def test_chapter_script_has_the_books_names_and_signatures(name):
    check_signature(getattr(ft, name), getattr(book_ch07, name), name)


#####################################
# The model: weights, logits, generation
#####################################


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_seed_draws_the_books_initial_weights(name, fused):
    cfg = CONFIGS[name]
    torch.manual_seed(123)
    ours = pc.GPTModel({**cfg, "fused": fused})
    ours_rng = torch.get_rng_state()
    torch.manual_seed(123)
    book = book_ch04.GPTModel(book_cfg(cfg))
    # the same number of random draws, so whatever is drawn next agrees too
    assert torch.equal(ours_rng, torch.get_rng_state())
    ours_sd, book_sd = ours.state_dict(), book.state_dict()
    assert list(ours_sd) == list(book_sd)  # same names, same order, masks included
    for key, expected in book_sd.items():
        if key.endswith(".att.mask"):  # the book's 1.0/0.0 floats, our booleans
            assert ours_sd[key].dtype == torch.bool
            assert torch.equal(ours_sd[key].float(), expected), key
        else:
            assert ours_sd[key].dtype == expected.dtype
            assert torch.equal(ours_sd[key], expected), key
    assert ([name for name, _ in ours.named_parameters()]
            == [name for name, _ in book.named_parameters()])


@pytest.mark.parametrize("fused", [True, False])
def test_logits_equal_the_books(fused):
    ours, book = twin_models(CONFIGS["tiny"], fused)
    idx = random_ids((3, 20))
    with torch.no_grad():
        expected = book(idx)
        torch.testing.assert_close(ours(idx), expected, rtol=0, atol=1e-5)
        # the loss path's logits at kept positions only
        keep = torch.rand(3, 20, generator=torch.Generator().manual_seed(1)) < 0.6
        torch.testing.assert_close(ours(idx, keep=keep), expected[keep], rtol=0, atol=1e-5)


@pytest.mark.parametrize("context_size", [32, 8])
def test_greedy_generation_gives_the_books_tokens(context_size):
    idx = random_ids((2, 5))
    new = 30  # past the context: the window slides
    expected = None
    for fused in (True, False):
        ours, book = twin_models(CONFIGS["tiny"], fused)
        if expected is None:  # the same weights both times: the book's tokens once
            expected = book_ch05.generate(book, idx, new, context_size)
            assert torch.equal(book_ch04.generate_text_simple(book, idx, new, context_size),
                               expected)
            alone = [book_ch05.generate(book, idx[:1], new, context_size)[0, 5:].tolist(),
                     book_ch05.generate(book, idx[1:, :3], new, context_size)[0, 3:].tolist()]
        assert torch.equal(pc.generate(ours, idx, new, context_size), expected)
        assert torch.equal(pc.generate(ours, idx, new, context_size, use_cache=False),
                           expected)
        assert torch.equal(pc.generate_text_simple(ours, idx, new, context_size), expected)
        # the script's batched answers: prompts of different lengths, left-padded together
        prompts = [idx[0].tolist(), idx[1, :3].tolist()]
        assert pc.generate_batch(ours, prompts, new, context_size) == alone
    # our functions take the book's model as they are, as the book's take it
    assert torch.equal(pc.generate(book, idx, new, context_size), expected)
    assert torch.equal(pc.generate_text_simple(book, idx, new, context_size), expected)


def test_generation_stops_at_eos_where_the_books_does():
    ours, book = twin_models(CONFIGS["tiny"])
    idx = random_ids((1, 6), seed=3)
    full = book_ch05.generate(book, idx, 30, 32)
    eos = full[0, 6 + 12].item()  # a token the model writes on its own
    expected = book_ch05.generate(book, idx, 30, 32, eos_id=eos)
    assert expected.shape[1] <= 6 + 12  # the book stopped early, eos not appended
    assert torch.equal(pc.generate(ours, idx, 30, 32, eos_id=eos), expected)
    assert torch.equal(pc.generate(ours, idx, 30, 32, eos_id=eos, use_cache=False), expected)
    answer = pc.generate_batch(ours, [idx[0].tolist()], 30, 32, eos_id=eos)[0]
    assert answer == expected[0, 6:].tolist()


@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (1.4, 50), (0.7, 3)])
def test_sampling_draws_the_books_tokens_under_the_same_seed(temperature, top_k):
    ours, book = twin_models(CONFIGS["tiny"])
    idx = random_ids((1, 6), seed=4)
    torch.manual_seed(7)
    expected = book_ch05.generate(book, idx, 40, 32, temperature=temperature, top_k=top_k)
    book_rng = torch.get_rng_state()
    for use_cache in (True, False):
        torch.manual_seed(7)
        got = pc.generate(ours, idx, 40, 32, temperature=temperature, top_k=top_k,
                          use_cache=use_cache)
        assert torch.equal(got, expected)
        assert torch.equal(torch.get_rng_state(), book_rng)  # the same random draws


def test_load_weights_into_gpt_fills_the_books_model_the_same_way():
    """OpenAI-shaped parameters (random numbers) go to the same places in both models."""
    cfg = CONFIGS["tiny"]
    emb, rng = cfg["emb_dim"], np.random.default_rng(0)

    def arr(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    def block():
        return {"attn": {"c_attn": {"w": arr(emb, 3 * emb), "b": arr(3 * emb)},
                         "c_proj": {"w": arr(emb, emb), "b": arr(emb)}},
                "mlp": {"c_fc": {"w": arr(emb, 4 * emb), "b": arr(4 * emb)},
                        "c_proj": {"w": arr(4 * emb, emb), "b": arr(emb)}},
                "ln_1": {"g": arr(emb), "b": arr(emb)}, "ln_2": {"g": arr(emb), "b": arr(emb)}}

    params = {"wte": arr(cfg["vocab_size"], emb), "wpe": arr(cfg["context_length"], emb),
              "blocks": [block() for _ in range(cfg["n_layers"])], "g": arr(emb), "b": arr(emb)}
    ours, book = twin_models(cfg)
    pc.load_weights_into_gpt(ours, params)
    book_ch05.load_weights_into_gpt(book, params)
    ours_sd, book_sd = ours.state_dict(), book.state_dict()
    assert list(ours_sd) == list(book_sd)
    for key, expected in book_sd.items():
        assert torch.equal(ours_sd[key].to(expected.dtype), expected), key


def test_text_and_token_ids_convert_as_the_books(tokenizer):
    text = "Every effort moves you<|endoftext|> toward the answer."
    ids = pc.text_to_token_ids(text, tokenizer)
    assert torch.equal(ids, book_ch05.text_to_token_ids(text, tokenizer))
    assert pc.token_ids_to_text(ids, tokenizer) == book_ch05.token_ids_to_text(ids, tokenizer)


#####################################
# Data: prompts, datasets, batches, loaders
#####################################


def test_prompts_dataset_and_batches_equal_the_books_on_the_whole_dataset(chapter_data,
                                                                           tokenizer):
    data = chapter_data
    assert [ft.format_input(e) for e in data] == [book_ch07.format_input(e) for e in data]
    ours = ft.InstructionDataset(data, tokenizer)
    book = book_ch07.InstructionDataset(data, tokenizer)
    assert len(ours) == len(book) == 1100
    assert [ours[i] for i in range(len(ours))] == [book[i] for i in range(len(book))]
    devices = ["cpu", torch.device("cpu")] + (["cuda"] if torch.cuda.is_available() else [])
    for allowed_max_length, device in [(1024, devices[0]), (None, devices[1]),
                                       (64, devices[-1])]:
        for start in range(0, len(ours), 8):  # the last batch holds the 4 entries left
            batch = [ours[i] for i in range(start, min(start + 8, len(ours)))]
            got = ft.custom_collate_fn(batch, allowed_max_length=allowed_max_length,
                                       device=device)
            expected = book_ch07.custom_collate_fn(batch, allowed_max_length=allowed_max_length,
                                                   device=device)
            for mine, theirs in zip(got, expected, strict=True):
                assert mine.device == theirs.device and mine.dtype == theirs.dtype
                assert torch.equal(mine, theirs), (start, allowed_max_length)


def book_loaders(train_data, val_data, tokenizer, allowed_max_length=1024, batch_size=8):
    """The chapter's section 7.4 loaders, built from the book's dataset and collate function."""
    collate = partial(book_ch07.custom_collate_fn, device="cpu",
                      allowed_max_length=allowed_max_length)
    train = DataLoader(book_ch07.InstructionDataset(train_data, tokenizer), batch_size=batch_size,
                       collate_fn=collate, shuffle=True, drop_last=True, num_workers=0)
    val = DataLoader(book_ch07.InstructionDataset(val_data, tokenizer), batch_size=batch_size,
                     collate_fn=collate, shuffle=False, drop_last=False, num_workers=0)
    return train, val


def test_script_loaders_give_the_books_batches(chapter_data, tokenizer):
    train_data, _, val_data = ft.split_data(chapter_data)
    ours = ft.build_loaders(train_data, val_data, tokenizer, 8, ft.Experiment())
    book = book_loaders(train_data, val_data, tokenizer)
    for our_loader, book_loader in zip(ours, book, strict=True):
        torch.manual_seed(123)
        got = list(our_loader)
        torch.manual_seed(123)
        expected = list(book_loader)
        assert len(got) == len(expected)
        for (inputs, targets), (book_inputs, book_targets) in zip(got, expected, strict=True):
            assert torch.equal(inputs, book_inputs) and torch.equal(targets, book_targets)


@pytest.mark.parametrize("kwargs", [
    {},  # the book's defaults: batches of 4 windows of 256 tokens, stride 128, shuffled
    {"batch_size": 8, "max_length": 32, "stride": 16, "drop_last": False},
    {"batch_size": 3, "max_length": 20, "stride": 25, "shuffle": False},
])
def test_create_dataloader_v1_gives_the_books_batches(kwargs, chapter_data, tokenizer):
    text = "<|endoftext|>".join(entry["output"] for entry in chapter_data)
    torch.manual_seed(123)
    got = list(pc.create_dataloader_v1(text, **kwargs))
    torch.manual_seed(123)
    expected = list(book_ch02.create_dataloader_v1(text, **kwargs))
    assert len(got) == len(expected) > 10
    for (inputs, targets), (book_inputs, book_targets) in zip(got, expected, strict=True):
        assert torch.equal(inputs, book_inputs) and torch.equal(targets, book_targets)
    ours = pc.GPTDatasetV1(text, tokenizer, max_length=50, stride=50)
    book = book_ch02.GPTDatasetV1(text, tokenizer, max_length=50, stride=50)
    assert len(ours) == len(book)
    for i in (0, len(book) // 2, len(book) - 1):
        assert all(torch.equal(a, b) for a, b in zip(ours[i], book[i], strict=True))


#####################################
# Loss and training
#####################################


def test_losses_equal_the_books(chapter_data, tokenizer):
    ours, book = twin_models(TRAIN_CONFIG)
    _, val_loader = book_loaders(chapter_data[:8], chapter_data[-12:], tokenizer,
                                 allowed_max_length=TRAIN_CONFIG["context_length"])
    inputs, targets = next(iter(val_loader))
    with torch.no_grad():
        torch.testing.assert_close(pc.calc_loss_batch(inputs, targets, ours, "cpu"),
                                   book_ch05.calc_loss_batch(inputs, targets, book, "cpu"),
                                   rtol=0, atol=1e-5)
        for num_batches in (None, 1, 10):
            assert pc.calc_loss_loader(val_loader, ours, "cpu", num_batches) == pytest.approx(
                book_ch05.calc_loss_loader(val_loader, book, "cpu", num_batches), abs=1e-5)
        # the book's model through our loss: the book's computation, the same value
        assert torch.equal(pc.calc_loss_batch(inputs, targets, book, "cpu"),
                           book_ch05.calc_loss_batch(inputs, targets, book, "cpu"))


def test_train_model_simple_gives_the_books_losses_and_tokens_seen(chapter_data, tokenizer,
                                                                   capsys):
    """Two epochs of three steps each from the same weights on the same shuffled batches (of
    4, to keep it quick): the script's loaders, optimizer and loop against the book's."""
    train_data, _, val_data = ft.split_data(chapter_data)
    train_data, val_data = train_data[:12], val_data[:6]
    ours, book = twin_models(TRAIN_CONFIG)
    experiment = ft.Experiment(allowed_max_length=TRAIN_CONFIG["context_length"])
    our_train, our_val = ft.build_loaders(train_data, val_data, tokenizer, 4, experiment)
    book_train, book_val = book_loaders(train_data, val_data, tokenizer, batch_size=4,
                                        allowed_max_length=TRAIN_CONFIG["context_length"])
    start_context = book_ch07.format_input(val_data[0])
    settings = {"device": "cpu", "num_epochs": 2, "eval_freq": 2, "eval_iter": 2,
                "start_context": start_context, "tokenizer": tokenizer}

    capsys.readouterr()
    torch.manual_seed(123)
    book_optimizer = torch.optim.AdamW(book.parameters(), lr=1e-3, weight_decay=0.1)
    expected = book_ch05.train_model_simple(book, book_train, book_val, book_optimizer,
                                            **settings)
    book_printed = capsys.readouterr().out
    torch.manual_seed(123)
    optimizer = make_optimizer(ours, lr=1e-3, weight_decay=0.1)  # the script's fused AdamW
    got = pc.train_model_simple(ours, our_train, our_val, optimizer, **settings)
    printed = capsys.readouterr().out

    train_losses, val_losses, tokens_seen = got
    assert tokens_seen == expected[2] and len(tokens_seen) == 3
    np.testing.assert_allclose(train_losses, expected[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(val_losses, expected[1], rtol=0, atol=1e-5)
    assert train_losses[-1] < train_losses[0]  # it learned something
    assert printed == book_printed  # the progress lines and the samples after each epoch
    book_sd = book.state_dict()
    for key, value in ours.state_dict().items():
        # A key bias shifts all of a query's scores alike, which softmax ignores: its gradient
        # is zero but for rounding noise, and AdamW turns noise into steps of up to lr.
        atol = 6 * 1e-3 if key.endswith("W_key.bias") else 1e-5
        torch.testing.assert_close(value.to(book_sd[key].dtype), book_sd[key], rtol=0,
                                   atol=atol)


#####################################
# .pth files the scripts write, loaded into the book's model, and the book's into ours
#####################################

TEST_MODE_FLAGS = ["--test_mode", "--epochs", "1", "--max_new_tokens", "5", "--device", "cpu"]
RUNS = {  # name -> (script, its own flags, the .pth it writes)
    "main": ("gpt_instruction_finetuning.py", [], "Smalltestmodel-sft-standalone.pth"),
    "lora_merged": ("exercise_experiments.py", ["--exercise_solution", "lora", "--merge_lora"],
                    "Smalltestmodel-sft-lora.pth"),
    "lora": ("exercise_experiments.py", ["--exercise_solution", "lora"],
             "Smalltestmodel-sft-lora.pth"),
    "phi3": ("exercise_experiments.py", ["--exercise_solution", "phi3_prompt"],
             "Smalltestmodel-sft-phi3-prompt.pth"),
    # Appendix D: 2 epochs of 5 steps of 2 entries, 2 steps of warmup, then cosine decay
    # with clipping (a rate high enough that the gradients' norm goes above 1.0)
    "appendix_d": ("gpt_instruction_finetuning.py",
                   ["--epochs", "2", "--batch_size", "2", "--lr", "0.05", "--warmup_steps", "2",
                    "--lr_schedule", "cosine", "--grad_clip", "1.0", "--run_name", "appendix-d"],
                   "Smalltestmodel-sft-appendix-d.pth"),
}


@pytest.fixture(scope="module")
def script_runs(tmp_path_factory, instruction_data_path):
    """Each of RUNS in test mode as a user would start it, all at once: {name: .pth path}."""
    folder = tmp_path_factory.mktemp("runs")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # four runs share the cores
    procs = {}
    for name, (script, flags, _) in RUNS.items():
        log = open(folder / f"{name}.log", "w")  # closed below
        command = [sys.executable, os.path.join(REPO, script), *TEST_MODE_FLAGS, *flags,
                   "--data_path", str(instruction_data_path), "--output_dir", str(folder / name)]
        procs[name] = (subprocess.Popen(command, cwd=folder, env=env, stdout=log,
                                        stderr=subprocess.STDOUT), log)
    try:
        for proc, _ in procs.values():
            proc.wait(timeout=300)
    finally:
        for proc, log in procs.values():
            if proc.poll() is None:  # only after a timeout
                proc.kill()
            log.close()
    for name, (proc, _) in procs.items():
        assert proc.returncode == 0, (folder / f"{name}.log").read_text()
    return {name: folder / name / pth for name, (_, _, pth) in RUNS.items()}


def load_into_books_model(path, cfg, lora=None):
    """The book's GPTModel (with the book's LoRA layers when `lora` is (rank, alpha)), loaded
    strictly from `path`."""
    book = book_ch04.GPTModel(book_cfg(cfg))
    if lora is not None:
        book_appendix_e.replace_linear_with_lora(book, *lora)
    book.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))  # strict
    return book.eval()


def assert_same_logits(ours, book, cfg):
    idx = random_ids((2, cfg["context_length"]), seed=9)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), book(idx), rtol=0, atol=1e-5)


def books_chapter_run(cfg, train_data, val_data, tokenizer, lora=None, appendix_d=None):
    """The script's test-mode run spelled out with the book's code: seed 123, the model, the
    chapter's loaders and AdamW, seed 123 again, one epoch of train_model_simple, evaluating
    after every step as test mode does.

    With `lora` = (rank, alpha) the model is frozen and gets the book's LoRA layers first, as
    the exercise does. With `appendix_d` = (epochs, batch_size, peak_lr, warmup_steps) the
    training is Appendix D's `train_model` instead (its default initial and minimum rates,
    clipping to 1.0). Returns (model, the curves the training function returns).
    """
    epochs, batch_size, lr, warmup_steps = appendix_d or (1, 8, 5e-5, None)
    torch.manual_seed(123)
    model = book_ch04.GPTModel(book_cfg(cfg))
    if lora is not None:
        model.requires_grad_(False)
        book_appendix_e.replace_linear_with_lora(model, *lora)
    train_loader, val_loader = book_loaders(train_data, val_data, tokenizer,
                                            allowed_max_length=cfg["context_length"],
                                            batch_size=batch_size)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=lr, weight_decay=0.1)
    torch.manual_seed(123)
    arguments = dict(eval_freq=1, eval_iter=5, start_context=book_ch07.format_input(val_data[0]),
                     tokenizer=tokenizer)
    if appendix_d is None:
        curves = book_ch05.train_model_simple(model, train_loader, val_loader, optimizer, "cpu",
                                              num_epochs=1, **arguments)
    else:
        curves = book_appendix_d.train_model(model, train_loader, val_loader, optimizer, "cpu",
                                             n_epochs=epochs, warmup_steps=warmup_steps,
                                             **arguments)
    return model.eval(), curves


def test_script_run_is_the_books_chapter_and_its_pth_loads_into_the_books_model(
        script_runs, chapter_data, tokenizer):
    path = script_runs["main"]
    info = json.loads(path.with_suffix(".json").read_text())
    cfg = ft.TEST_MODE_CONFIG
    assert info["config"] == cfg and info["prompt_style"] == "alpaca"
    assert (info["model_name"], info["experiment"], info["epochs"], info["seed"]) == (
        "Small test model", "standalone", 1, 123)
    assert info["settings"]["--lr"] == 5e-5
    assert info["settings"]["training data"] == fingerprint(chapter_data[:10])

    book = load_into_books_model(path, cfg)
    ours, _, prompt_style = load_finetuned_model(str(path))
    assert prompt_style.name == "alpaca"
    assert_same_logits(ours, book, cfg)

    # The same run with the book's functions: same weights, losses and tokens seen.
    train_data, _, val_data = ft.split_data(chapter_data)
    reference, (train_losses, val_losses, tokens_seen) = books_chapter_run(
        cfg, train_data[:10], val_data[:10], tokenizer)
    assert info["tokens_seen"] == tokens_seen[-1]
    assert info["train_loss"] == pytest.approx(train_losses[-1], abs=1e-5)
    assert info["val_loss"] == pytest.approx(val_losses[-1], abs=1e-5)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(saved[key].to(value.dtype), value, rtol=0, atol=1e-6)


def test_merged_lora_pth_loads_into_the_books_plain_model(script_runs, chapter_data, tokenizer):
    path = script_runs["lora_merged"]
    info = json.loads(path.with_suffix(".json").read_text())
    cfg = info["config"]
    assert cfg == ft.TEST_MODE_CONFIG and info["experiment"] == "lora"
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert not any(".lora." in key for key in saved)  # a plain GPTModel
    book = load_into_books_model(path, cfg)
    ours, _, _ = load_finetuned_model(str(path))
    assert_same_logits(ours, book, cfg)
    # It computes what the book's unmerged LoRA model computes after the same training.
    train_data, _, val_data = ft.split_data(chapter_data)
    rank, alpha = info["settings"]["--lora_rank"], info["settings"]["--lora_alpha"]
    reference, _ = books_chapter_run(cfg, train_data[:10], val_data[:10], tokenizer,
                                     lora=(rank, alpha))
    assert_same_logits(ours, reference, cfg)


def test_unmerged_lora_pth_loads_into_the_books_model_with_the_books_lora(script_runs,
                                                                         chapter_data,
                                                                         tokenizer):
    path = script_runs["lora"]
    info = json.loads(path.with_suffix(".json").read_text())
    cfg = info["config"]
    rank, alpha = info["settings"]["--lora_rank"], info["settings"]["--lora_alpha"]
    assert (rank, alpha) == (16, 16)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert any(key.endswith(".lora.B") and value.abs().sum() > 0  # training moved B
               for key, value in saved.items())
    book = load_into_books_model(path, cfg, lora=(rank, alpha))
    ours, _, _ = load_finetuned_model(str(path))
    assert_same_logits(ours, book, cfg)
    # The book's LoRA run from the same seed ends with the same weights.
    train_data, _, val_data = ft.split_data(chapter_data)
    reference, (_, _, tokens_seen) = books_chapter_run(cfg, train_data[:10], val_data[:10],
                                                       tokenizer, lora=(rank, alpha))
    assert info["tokens_seen"] == tokens_seen[-1]
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(saved[key].to(value.dtype), value, rtol=0, atol=1e-6)


def test_phi3_prompt_pth_loads_into_the_books_model_and_says_phi3(script_runs):
    path = script_runs["phi3"]
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["prompt_style"] == "phi3" and info["experiment"] == "phi3-prompt"
    book = load_into_books_model(path, info["config"])
    ours, _, prompt_style = load_finetuned_model(str(path))
    assert prompt_style.name == "phi3"
    assert prompt_style.format_input({"instruction": "Name a color.", "input": ""}) == (
        "<|user|>\nName a color.")
    assert_same_logits(ours, book, info["config"])


@pytest.mark.parametrize("cfg", [
    ft.TEST_MODE_CONFIG,
    {**ft.TEST_MODE_CONFIG, "context_length": 40, "n_layers": 2, "qkv_bias": True},
], ids=["test_mode", "qkv_bias"])
def test_pth_saved_from_the_books_model_loads_into_ours(cfg, tmp_path):
    """A .pth from the book (a bare state dict, float masks) loads into ours, and through
    load_finetuned_model with the chapter's defaults; the test model's embedding size is one
    that infer_config knows."""
    torch.manual_seed(5)
    book = book_ch04.GPTModel(book_cfg(cfg)).eval()
    # the book saves a plain state dict, float masks included
    path = tmp_path / "gpt2-book-sft.pth"
    torch.save(book.state_dict(), path)
    state_dict = torch.load(path, weights_only=True)
    assert state_dict["trf_blocks.0.att.mask"].dtype == torch.float32

    ours = pc.GPTModel(cfg)
    ours.load_state_dict(state_dict)  # strict
    assert torch.equal(ours.trf_blocks[0].att.mask, book.trf_blocks[0].att.mask.bool())
    assert_same_logits(ours.eval(), book, cfg)

    # Without a JSON beside it: config read off the shapes, the chapter's Alpaca prompt.
    model, info, prompt_style = load_finetuned_model(str(path))
    assert not os.path.exists(model_info_path(str(path)))
    assert info == {"config": {key: cfg[key] for key in BOOK_KEYS}, "prompt_style": "alpaca"}
    assert prompt_style is ft.ALPACA
    assert_same_logits(model, book, cfg)

    # and back: what ours saves loads into the book's model
    back = tmp_path / "ours.pth"
    torch.save(model.state_dict(), back)
    assert_same_logits(model, load_into_books_model(back, cfg), cfg)


def test_appendix_d_options_train_as_the_books_train_model(script_runs, chapter_data, tokenizer):
    """--warmup_steps 2 --lr_schedule cosine --grad_clip 1.0 is Appendix D's train_model: the
    same learning rate at every step (the metrics CSV's lr column), the same losses, the same
    weights; the JSON records the schedule."""
    path = script_runs["appendix_d"]
    train_data, _, val_data = ft.split_data(chapter_data)
    reference, (train_losses, val_losses, _, lrs) = books_chapter_run(
        ft.TEST_MODE_CONFIG, train_data[:10], val_data[:10], tokenizer,
        appendix_d=(2, 2, 0.05, 2))
    assert len(lrs) == 10 and lrs[0] == 3e-5 and lrs[2] == 0.05  # warmup, then the peak
    rows = read_metrics(path.parent / "metrics-appendix-d.csv")
    assert [row["lr"] for row in rows] == lrs
    np.testing.assert_allclose([row["train_loss"] for row in rows], train_losses, rtol=0,
                               atol=1e-5)
    np.testing.assert_allclose([row["val_loss"] for row in rows], val_losses, rtol=0, atol=1e-5)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    atol = weight_tolerance(lrs)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(saved[key].to(value.dtype), value, rtol=0, atol=atol)
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["schedule"] == {"lr_schedule": "cosine", "peak_lr": 0.05, "warmup_steps": 2,
                                "initial_lr": 3e-5, "min_lr": 1e-6, "total_steps": 10,
                                "grad_clip": 1.0}
    assert (info["run_name"], info["steps"], info["losses_step"]) == ("appendix-d", 10, 9)

    # The clipping mattered: the same rates without it end ten tolerances away or more.
    unclipped = unclipped_run(train_data[:10], val_data[:10], tokenizer, lrs)
    difference = max((unclipped[key] - value).abs().max().item()
                     for key, value in reference.state_dict().items())
    assert difference > 10 * atol


def weight_tolerance(lrs):
    """How far the script's weights may be from the book's after AdamW steps at rates `lrs`.

    Both compute the same loss with float32 sums in another order (the script takes logits
    at the counted positions only, with another thread count), so the gradients differ in
    their last bits. AdamW divides each gradient by its running scale, so a weight whose
    gradients nearly cancel turns that rounding into a part of its step, and a step moves a
    weight by about its learning rate. The tolerance is a thousandth of the summed rates
    (2.5e-4 for this run): over 63 seeds of this run the largest difference was 4.4e-5, under
    a fifth of it, while dropping the clipping moves weights by 5.4e-3, 21 tolerances.
    """
    return 1e-3 * sum(lrs)


def unclipped_run(train_data, val_data, tokenizer, lrs):
    """The Appendix D run's steps with its learning rates `lrs` but no clipping, evaluating
    after every step as it does (the evaluations draw from the random state the shuffling
    uses); returns the final state dict."""
    torch.manual_seed(123)
    model = book_ch04.GPTModel(book_cfg(ft.TEST_MODE_CONFIG))
    train_loader, val_loader = book_loaders(train_data, val_data, tokenizer,
                                            allowed_max_length=120, batch_size=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lrs[0], weight_decay=0.1)
    torch.manual_seed(123)
    steps = iter(lrs)
    for _ in range(2):
        model.train()
        for inputs, targets in train_loader:
            optimizer.zero_grad()
            for group in optimizer.param_groups:
                group["lr"] = next(steps)
            book_ch05.calc_loss_batch(inputs, targets, model, "cpu").backward()
            optimizer.step()
            book_ch05.evaluate_model(model, train_loader, val_loader, "cpu", eval_iter=5)
    return model.state_dict()
