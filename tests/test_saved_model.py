"""kit/saved_model.py: loading a model built without weights of its own (meta device) from the
saved tensors, and the files it must not trust: a JSON config that describes no GPTModel or
another one than the weights, a .pth that holds no state dict, LoRA weights whose alpha is
unknown. Each is one DataError naming the file (and the config key), raised before a model is
built. Loading imports no training code."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import gpt_instruction_finetuning as ft
import lora
from kit.files import DataError
from kit.saved_model import load_finetuned_model, save_finetuned_model
from previous_chapters import GPTModel, causal_mask

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = ft.TEST_MODE_CONFIG  # 12-dim, 2 heads, 1 layer, 120 positions


def saved(tmp_path, model, config=None, prompt_style="alpaca"):
    """Save `model` as the finetuning script does (with a JSON when `config` is given, bare
    otherwise); return (the .pth path, the JSON path)."""
    path = tmp_path / "model.pth"
    if config is None:
        torch.save(model.state_dict(), path)
    else:
        ft.save_finetuned_model(model, str(path),
                                {"config": config, "prompt_style": prompt_style})
    return str(path), tmp_path / "model.json"


def lora_model(rank, alpha):
    """The test model with LoRA layers whose update is no longer zero, as after training."""
    torch.manual_seed(0)
    model = GPTModel(CONFIG)
    lora.replace_linear_with_lora(model, rank=rank, alpha=alpha)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".lora.B"):
                nn.init.normal_(param)
    return model.eval()


def refused(path, *parts, **kwargs):
    """load_finetuned_model(path) raises one DataError holding every one of `parts`; return
    its message."""
    with pytest.raises(DataError) as info:
        load_finetuned_model(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)
    return message


def same_logits(loaded, model):
    idx = torch.randint(0, CONFIG["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(loaded(idx), model.eval()(idx))


#####################################
# The JSON's config
#####################################


@pytest.mark.parametrize("key, value, must", [
    ("n_heads", 0, "an integer of at least 1"),
    ("emb_dim", -1, "an integer of at least 1"),
    ("n_layers", 1.5, "an integer of at least 1"),
    ("vocab_size", "50257", "an integer of at least 1"),
    ("context_length", True, "an integer of at least 1"),
    ("context_length", None, "an integer of at least 1"),
    ("n_heads", 5, None),  # 12 does not split into 5 heads: named below
    ("drop_rate", 1.0, "a number in [0, 1)"),
    ("drop_rate", -0.1, "a number in [0, 1)"),
    ("drop_rate", "0.1", "a number in [0, 1)"),
    ("qkv_bias", "no", "true or false"),
    ("qkv_bias", 0, "true or false"),
    ("fused", 1, "true or false"),
    ("lora", {"rank": 0, "alpha": 16}, 'an object with a "rank" of at least 1'),
    ("lora", {"rank": 2}, 'an object with an "alpha" above 0'),
    ("lora", {"rank": 2, "alpha": 0}, 'an object with an "alpha" above 0'),
    ("lora", {"rank": 2, "alpha": "16"}, 'an object with an "alpha" above 0'),
    ("lora", [2, 16], 'an object with a "rank" of at least 1'),
])
def test_config_that_describes_no_gptmodel_names_the_json_and_the_key(tmp_path, key, value,
                                                                      must):
    path, info_path = saved(tmp_path, GPTModel(CONFIG), {**CONFIG, key: value})
    if must is None:
        refused(path, f"{info_path}: config key 'emb_dim' must be divisible by n_heads (5), "
                      "got 12; fix or delete it")
    else:
        refused(path, f"{info_path}: config key '{key}' must be {must}, got {value!r}; fix or "
                      "delete it")


def test_missing_config_key_is_named(tmp_path):
    path, info_path = saved(tmp_path, GPTModel(CONFIG),
                            {k: v for k, v in CONFIG.items() if k != "n_layers"})
    refused(path, f"{info_path}: config key 'n_layers' must be an integer of at least 1, got "
                  "None")


@pytest.mark.parametrize("key, value, held", [
    ("context_length", 200000, 120),  # would allocate a 40 GB causal mask per layer
    ("n_layers", 1000, 1),
    ("emb_dim", 16, 12),
    ("vocab_size", 50304, 50257),
])
def test_config_sizes_are_checked_against_the_weights_before_building(tmp_path, key, value,
                                                                      held):
    path, info_path = saved(tmp_path, GPTModel(CONFIG), {**CONFIG, key: value, "n_heads": 4})
    refused(path, f"{path}: the weights do not fit the model described by {info_path} (its "
                  f"{key} is {value}, the weights' is {held}); save them again")


def test_context_longer_than_gpt2s_is_refused_even_when_the_weights_have_it(tmp_path):
    """A crafted file whose position embedding has 200000 rows (9.6 MB) and a JSON that agrees
    would build 200000 x 200000 masks; so would the same weights without a JSON."""
    config = {**CONFIG, "context_length": 200000}
    state = GPTModel(CONFIG).state_dict()
    state["pos_emb.weight"] = torch.zeros(200000, CONFIG["emb_dim"])
    del state["trf_blocks.0.att.mask"]
    path = str(tmp_path / "model.pth")
    torch.save(state, path)
    message = refused(path, f"{path}: a context of 200000 positions is more than GPT-2's 1024; "
                            "this is not a model finetuned from GPT-2")
    (tmp_path / "model.json").write_text(json.dumps({"config": config,
                                                     "prompt_style": "alpaca"}))
    assert refused(path) == message


def test_missing_json_reads_sizes_off_the_weights(tmp_path):
    model = GPTModel(CONFIG)
    path, _ = saved(tmp_path, model)
    loaded, info, prompt_style = load_finetuned_model(path)
    assert info == {"config": CONFIG, "prompt_style": "alpaca"} and prompt_style.name == "alpaca"
    assert same_logits(loaded, model)


#####################################
# The .pth itself
#####################################


@pytest.mark.parametrize("content, holds", [
    ([torch.zeros(3)], "an object of type list"),
    (torch.zeros(3), "an object of type Tensor"),
    ({"model": {"tok_emb.weight": torch.zeros(3)}, "optimizer": {}, "progress": {},
      "settings": {}}, "a dict whose 'model' is of type dict"),
    ({"tok_emb.weight": torch.zeros(3), "step": 3}, "a dict whose 'step' is of type int"),
])
def test_pth_that_holds_no_state_dict_is_one_clear_error(tmp_path, content, holds):
    path = str(tmp_path / "model.pth")
    torch.save(content, path)
    refused(path, f"{path}: not a state dict of model weights (it holds {holds}); a checkpoint? "
                  "Give the model .pth that finetuning saved (...-sft-....pth), not "
                  "checkpoint-....pth")


def test_state_dict_without_gpt_weights_is_refused(tmp_path):
    path = str(tmp_path / "model.pth")
    torch.save({"layer.weight": torch.zeros(2, 2)}, path)
    refused(path, f"{path}: not a GPT-2 state dict ('tok_emb.weight')")
    torch.save({"tok_emb.weight": torch.zeros(5), "pos_emb.weight": torch.zeros(4, 5)}, path)
    refused(path, f"{path}: not a GPT-2 state dict (")


def test_weights_that_do_not_load_into_the_jsons_model_are_refused(tmp_path):
    path, info_path = saved(tmp_path, GPTModel(CONFIG), CONFIG)
    state = torch.load(path, weights_only=True)
    state["pos_emb.weight"] = torch.zeros(CONFIG["context_length"])  # 1-D, of the right length
    torch.save(state, path)
    refused(path, f"{path}: the weights do not fit the model described by {info_path} "
                  "(Error(s) in loading state_dict for GPTModel:); save them again")


#####################################
# LoRA weights saved unmerged
#####################################


def test_unmerged_lora_without_json_needs_its_alpha(tmp_path):
    model = lora_model(rank=4, alpha=16)
    path, info_path = saved(tmp_path, model)
    message = refused(path, f"{info_path}: not found, and the weights hold unmerged LoRA layers "
                            "(rank 4) whose alpha only the run's JSON records; pass --lora_alpha "
                            "(the book trains with 16) or put that JSON back")
    assert message.startswith(f"{info_path}: ")
    loaded, info, _ = load_finetuned_model(path, lora_alpha=16)
    assert lora.lora_config(loaded) == {"rank": 4, "alpha": 16}
    assert same_logits(loaded, model)
    loaded, _, _ = load_finetuned_model(path, lora_alpha=8)
    assert not same_logits(loaded, model)  # alpha scales every update: a guess would differ


@pytest.mark.parametrize("alpha", [0, -1.5, float("nan"), float("inf"), "16"])
def test_lora_alpha_argument_must_be_a_positive_number(tmp_path, alpha):
    path, _ = saved(tmp_path, lora_model(rank=2, alpha=4))
    refused(path, f"lora_alpha must be a finite number above 0, got {alpha!r}", lora_alpha=alpha)


def test_json_without_lora_entry_for_lora_weights_says_so(tmp_path):
    path, info_path = saved(tmp_path, lora_model(rank=2, alpha=4), CONFIG)
    refused(path, f"{info_path}: its config has no 'lora' entry, and the weights hold unmerged "
                  "LoRA layers (rank 2)")


def test_lora_entry_of_another_rank_than_the_weights_is_refused(tmp_path):
    model = lora_model(rank=2, alpha=4)
    path, info_path = saved(tmp_path, model, {**CONFIG, "lora": {"rank": 100000, "alpha": 4}})
    refused(path, f"{path}: the weights do not fit the model described by {info_path} (its LoRA "
                  "rank is 100000, the weights hold LoRA layers of rank 2); save them again")
    path, info_path = saved(tmp_path, GPTModel(CONFIG), {**CONFIG, "lora": {"rank": 2,
                                                                            "alpha": 4}})
    refused(path, "(its LoRA rank is 2, the weights hold no unmerged LoRA layers)")


def test_lora_alpha_of_the_json_wins(tmp_path):
    model = lora_model(rank=2, alpha=3.5)
    path, _ = saved(tmp_path, model, {**CONFIG, "lora": lora.lora_config(model)})
    loaded, info, _ = load_finetuned_model(path, lora_alpha=100)
    assert lora.lora_config(loaded) == {"rank": 2, "alpha": 3.5}
    assert same_logits(loaded, model)


@pytest.mark.parametrize("module", ["kit.saved_model", "chat", "export_hf", "export_gguf"])
def test_loading_a_model_imports_no_training_code(module):
    """Loading and using a finetuned model needs the saved-model format, not the chapter
    script, its training extras or torchrun's code."""
    code = (f"import sys, {module}; print(sorted(m for m in sys.modules if m in "
            "('gpt_instruction_finetuning', 'kit.chapter_training', 'kit.checkpoint', "
            "'kit.distributed', 'exercise_experiments')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, check=True)
    assert result.stdout == "[]\n"


def test_loading_draws_no_random_weights_and_gives_the_saved_ones(tmp_path):
    torch.manual_seed(0)
    model = GPTModel(CONFIG).eval()
    path = str(tmp_path / "model.pth")
    save_finetuned_model(model, path, {"config": CONFIG, "prompt_style": "alpaca"})
    torch.manual_seed(1)
    loaded, _, _ = load_finetuned_model(path)
    after_loading = torch.rand(3)
    torch.manual_seed(1)
    assert torch.equal(after_loading, torch.rand(3))  # loading drew no random numbers
    for (name, got), expected in zip(loaded.state_dict().items(), model.state_dict().values(),
                                     strict=True):
        assert got.device.type == "cpu" and got.dtype == expected.dtype, name
        assert torch.equal(got, expected), name
    assert not loaded.training


def test_the_books_float_masks_and_files_without_masks_load_as_boolean_causal_masks(tmp_path):
    state = GPTModel(CONFIG).state_dict()
    book_style = {k: v.float() if k.endswith(".mask") else v for k, v in state.items()}
    without = {k: v for k, v in state.items() if not k.endswith(".mask")}
    for name, weights in (("book", book_style), ("without", without)):
        path = str(tmp_path / f"{name}.pth")
        torch.save(weights, path)
        loaded, _, _ = load_finetuned_model(path)
        mask = loaded.trf_blocks[0].att.mask
        assert mask.dtype == torch.bool and torch.equal(mask, causal_mask(120)), name


def test_unmerged_lora_weights_load_onto_a_model_built_without_weights(tmp_path):
    torch.manual_seed(0)
    model = GPTModel(CONFIG)
    lora.replace_linear_with_lora(model, rank=2, alpha=4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".lora.B"):
                param.normal_()
    path = str(tmp_path / "lora.pth")
    info = {"config": {**CONFIG, "lora": {"rank": 2, "alpha": 4}}, "prompt_style": "alpaca"}
    save_finetuned_model(model, path, info)
    loaded, _, _ = load_finetuned_model(path)
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    idx = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(loaded(idx), model.eval()(idx))
