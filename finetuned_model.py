"""Loading a finetuned model back: the `.pth` that the chapter script (or the book's code)
saved, rebuilt with the config and prompt style of the JSON beside it.

    model, info, prompt_style = load_finetuned_model("gpt2-medium355M-sft-standalone.pth")

Saving is the chapter's own step (section 7.7 of gpt_instruction_finetuning.py); this module is
what `load-finetuned-model.ipynb`, export_hf.py, export_gguf.py and a reader's own code use to
come back to it. Everything read is checked before a model is built: a damaged or crafted file
ends in one DataError naming it, never in a model the size of whatever the file claims.
"""

import math
import os

import torch

from gpt_download import GPT2_N_CTX, GPT2_SIZES
from gpt_instruction_finetuning import TEST_MODE_CONFIG, model_info_path
from instruction_data import ALPACA, PROMPT_STYLES
from lora import lora_rank, replace_linear_with_lora
from previous_chapters import GPTModel
from script_utils import DataError, read_json
from training_extras import read_pth

SIZE_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers")


def load_finetuned_model(path, device="cpu", lora_alpha=None):
    """Rebuild a saved finetuned model; return (model in eval mode, info, prompt style).

    `info` is the JSON saved beside the weights. Without one (a .pth from the book), the config
    is read off the weights' shapes and the prompt is the chapter's Alpaca style; unmerged LoRA
    weights then need `lora_alpha`, which the weights do not hold. Raises DataError naming the
    file when it is missing, damaged or does not fit.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found; finetune first (python "
                        "gpt_instruction_finetuning.py) or give the path of a saved .pth")
    try:
        state_dict = read_pth(path, "finetune again or copy the file anew")
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    check_state_dict(state_dict, path)
    info_path = model_info_path(path)
    try:
        if os.path.exists(info_path):
            info = load_model_info(info_path)
        else:
            info = {"config": infer_config(state_dict), "prompt_style": ALPACA.name}
        check_fits(info["config"], state_dict, path, info_path)
    except (KeyError, AttributeError, IndexError) as exc:
        raise DataError(f"{path}: not a GPT-2 state dict ({exc})") from None
    model = build_model(info["config"], state_dict, info_path, lora_alpha)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise DataError(f"{path}: the weights do not fit the model described by {info_path} "
                        f"({str(exc).splitlines()[0]}); save them again") from None
    return model.to(device).eval(), info, PROMPT_STYLES[info["prompt_style"]]


def build_model(config, state_dict, info_path, lora_alpha=None):
    """The GPTModel of `config`, with LoRA layers where the weights were saved unmerged (rank
    and alpha from the config's "lora" entry, else the rank from the weights and `lora_alpha`).

    Unmerged LoRA weights without a recorded alpha need `lora_alpha`: it scales every update
    and is not in the weights, so a guess would silently change every answer.
    """
    lora = config.get("lora")
    rank = lora_rank(state_dict)
    if lora is None and rank is not None:
        if lora_alpha is None:
            problem = ("its config has no 'lora' entry" if os.path.exists(info_path)
                       else "not found")
            raise DataError(f"{info_path}: {problem}, and the weights hold unmerged LoRA layers "
                            f"(rank {rank}) whose alpha only the run's JSON records; pass "
                            "--lora_alpha (the book trains with 16) or put that JSON back")
        check_lora_alpha(lora_alpha, "lora_alpha")
        lora = {"rank": rank, "alpha": lora_alpha}
    model = GPTModel(config)  # a config checked by check_config, or read off the weights
    if lora:
        replace_linear_with_lora(model, rank=lora["rank"], alpha=lora["alpha"])
    return model


def infer_config(state_dict):
    """The GPTModel config of a bare state dict, read off its shapes (for .pth files without a
    JSON beside them, such as the book's)."""
    emb_dim = state_dict["tok_emb.weight"].shape[1]
    heads = {size["n_embd"]: size["n_head"] for size in GPT2_SIZES.values()}
    heads[TEST_MODE_CONFIG["emb_dim"]] = TEST_MODE_CONFIG["n_heads"]
    if emb_dim not in heads:
        raise KeyError(f"no GPT-2 size has an embedding of {emb_dim}")
    return {
        "vocab_size": state_dict["tok_emb.weight"].shape[0],
        "context_length": state_dict["pos_emb.weight"].shape[0],
        "emb_dim": emb_dim,
        "n_heads": heads[emb_dim],
        "n_layers": count_blocks(state_dict),
        "drop_rate": 0.0,
        "qkv_bias": any(k.endswith("W_query.bias") or k.endswith("W_query.linear.bias")
                        for k in state_dict),
    }


def count_blocks(state_dict):
    """The number of transformer blocks whose weights the state dict holds."""
    return len({k.split(".")[1] for k in state_dict if k.startswith("trf_blocks.")})


def check_state_dict(state_dict, path):
    """Raise DataError unless `state_dict` is what torch.save(model.state_dict()) writes: a dict
    from names to tensors (a training checkpoint holds one inside, beside the optimizer's)."""
    if isinstance(state_dict, dict):
        odd = next(((k, v) for k, v in state_dict.items()
                    if not (isinstance(k, str) and isinstance(v, torch.Tensor))), None)
        if odd is None:
            return
        holds = f"a dict whose {odd[0]!r} is of type {type(odd[1]).__name__}"
    else:
        holds = f"an object of type {type(state_dict).__name__}"
    raise DataError(f"{path}: not a state dict of model weights (it holds {holds}); a "
                    "checkpoint? Give the model .pth that finetuning saved (...-sft-....pth), "
                    "not checkpoint-....pth")


def load_model_info(info_path):
    """Read and check the JSON saved beside a finetuned model."""
    info = read_json(info_path)
    if not isinstance(info, dict):
        raise DataError(f"{info_path}: expected a JSON object")
    if not isinstance(info.get("config"), dict) or info.get("prompt_style") not in PROMPT_STYLES:
        raise DataError(f"{info_path}: needs a 'config' object and a 'prompt_style' of "
                        f"{', '.join(PROMPT_STYLES)}; delete it to load the weights with the "
                        "chapter's defaults")
    check_config(info["config"], info_path)
    return info


def check_config(config, info_path):
    """Raise DataError naming `info_path` and the key unless `config` describes a GPTModel:
    positive integer sizes, an embedding that splits into the heads, a dropout rate in [0, 1),
    boolean switches, and a valid "lora" entry when there is one."""
    def refuse(key, must, value):
        raise DataError(f"{info_path}: config key '{key}' must be {must}, got {value!r}; fix "
                        "or delete it")

    for key in SIZE_KEYS:
        value = config.get(key)
        if not (is_int(value) and value >= 1):
            refuse(key, "an integer of at least 1", value)
    if config["emb_dim"] % config["n_heads"]:
        refuse("emb_dim", f"divisible by n_heads ({config['n_heads']})", config["emb_dim"])
    drop_rate = config.get("drop_rate")
    if not (is_number(drop_rate) and 0 <= drop_rate < 1):
        refuse("drop_rate", "a number in [0, 1)", drop_rate)
    if not isinstance(config.get("qkv_bias"), bool):
        refuse("qkv_bias", "true or false", config.get("qkv_bias"))
    if not isinstance(config.get("fused", True), bool):
        refuse("fused", "true or false", config["fused"])
    lora = config.get("lora")
    if lora is not None:
        if not (isinstance(lora, dict) and is_int(lora.get("rank")) and lora["rank"] >= 1):
            refuse("lora", 'an object with a "rank" of at least 1', lora)
        if not valid_alpha(lora.get("alpha")):
            refuse("lora", 'an object with an "alpha" above 0', lora)


def check_lora_alpha(alpha, name):
    """Raise DataError naming `name` (a flag, an argument) unless `alpha` is a LoRA alpha."""
    if not valid_alpha(alpha):
        raise DataError(f"{name} must be a finite number above 0, got {alpha!r}")


def valid_alpha(alpha):
    """True for a LoRA alpha: a finite number above 0 (it scales every update)."""
    return is_number(alpha) and math.isfinite(alpha) and alpha > 0


def check_fits(config, state_dict, path, info_path):
    """Raise DataError unless the sizes in `config` are those of the weights, and the context
    no longer than GPT-2's: the model built next then takes no more memory than the file's own
    tensors (each attention layer's causal mask grows with the square of the context)."""
    weights = {"vocab_size": state_dict["tok_emb.weight"].shape[0],
               "emb_dim": state_dict["tok_emb.weight"].shape[1],
               "context_length": state_dict["pos_emb.weight"].shape[0],
               "n_layers": count_blocks(state_dict)}
    for key, size in weights.items():
        if config[key] != size:
            raise DataError(f"{path}: the weights do not fit the model described by "
                            f"{info_path} (its {key} is {config[key]}, the weights' is {size}); "
                            "save them again")
    lora = config.get("lora")
    rank = lora_rank(state_dict)
    if lora is not None and lora["rank"] != rank:
        held = "no unmerged LoRA layers" if rank is None else f"LoRA layers of rank {rank}"
        raise DataError(f"{path}: the weights do not fit the model described by {info_path} "
                        f"(its LoRA rank is {lora['rank']}, the weights hold {held}); save "
                        "them again")
    if config["context_length"] > GPT2_N_CTX:
        raise DataError(f"{path}: a context of {config['context_length']} positions is more "
                        f"than GPT-2's {GPT2_N_CTX}; this is not a model finetuned from GPT-2")


def is_int(value):
    """True for an integer (JSON's true and false are not sizes)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value):
    """True for an integer or a float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
