"""Loading a finetuned model back: the `.pth` that the chapter script (or the book's code)
saved, rebuilt with the config and prompt style of the JSON beside it.

    model, info, prompt_style = load_finetuned_model("gpt2-medium355M-sft-standalone.pth")

Saving is the chapter's own step (section 7.7 of gpt_instruction_finetuning.py); this module is
what `load-finetuned-model.ipynb`, export_hf.py and a reader's own code use to come back to it.
"""

import os

from gpt_download import GPT2_SIZES
from gpt_instruction_finetuning import TEST_MODE_CONFIG, model_info_path
from instruction_data import ALPACA, PROMPT_STYLES
from lora import lora_from_weights, replace_linear_with_lora
from previous_chapters import GPTModel
from script_utils import DataError, read_json
from training_extras import read_pth


def load_finetuned_model(path, device="cpu"):
    """Rebuild a saved finetuned model; return (model in eval mode, info, prompt style).

    `info` is the JSON saved beside the weights. Without one (a .pth from the book), the config
    is read off the weights' shapes and the prompt is the chapter's Alpaca style. Raises
    DataError naming the file when it is missing, damaged or does not fit.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found; finetune first (python "
                        "gpt_instruction_finetuning.py) or give the path of a saved .pth")
    state_dict = read_pth(path, "finetune again or copy the file anew")
    info_path = model_info_path(path)
    try:
        if os.path.exists(info_path):
            info = load_model_info(info_path)
        else:
            info = {"config": infer_config(state_dict), "prompt_style": ALPACA.name}
    except (KeyError, AttributeError, IndexError) as exc:
        raise DataError(f"{path}: not a GPT-2 state dict ({exc})") from None
    model = build_model(info["config"], state_dict, info_path)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise DataError(f"{path}: the weights do not fit the model described by {info_path} "
                        f"({str(exc).splitlines()[0]}); save them again") from None
    return model.to(device).eval(), info, PROMPT_STYLES[info["prompt_style"]]


def build_model(config, state_dict, info_path):
    """The GPTModel of `config`, with LoRA layers where the weights were saved unmerged (rank
    and alpha from the config's "lora" entry, else from the weights and the book's alpha)."""
    lora = config.get("lora") or lora_from_weights(state_dict)
    try:
        model = GPTModel(config)
        if lora:
            replace_linear_with_lora(model, rank=lora["rank"], alpha=lora["alpha"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{info_path}: its config does not describe a GPTModel "
                        f"({type(exc).__name__}: {exc}); fix or delete it") from None
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
        "n_layers": len({k.split(".")[1] for k in state_dict if k.startswith("trf_blocks.")}),
        "drop_rate": 0.0,
        "qkv_bias": any(k.endswith("W_query.bias") or k.endswith("W_query.linear.bias")
                        for k in state_dict),
    }


def load_model_info(info_path):
    """Read and check the JSON saved beside a finetuned model."""
    info = read_json(info_path)
    if not isinstance(info, dict):
        raise DataError(f"{info_path}: expected a JSON object")
    if not isinstance(info.get("config"), dict) or info.get("prompt_style") not in PROMPT_STYLES:
        raise DataError(f"{info_path}: needs a 'config' object and a 'prompt_style' of "
                        f"{', '.join(PROMPT_STYLES)}; delete it to load the weights with the "
                        "chapter's defaults")
    return info
