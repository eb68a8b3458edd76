"""A finetuned model on disk: the `.pth` of its weights, as the book saves them (a plain state
dict), and the JSON beside it that says how to rebuild and prompt the model.

    model, info, prompt_style = load_finetuned_model("gpt2-medium355M-sft-standalone.pth")

The chapter script saves with `save_finetuned_model` (section 7.7); chat.py, the exports,
`load-finetuned-model.ipynb` and a reader's own code load with `load_finetuned_model`, without
importing any training code. Everything read is checked before a model is built: a damaged or
crafted file ends in one DataError naming it, never in a model the size of whatever the file
claims.
"""

import errno
import math
import os
import pickle

import torch

from gpt_download import GPT2_N_CTX, GPT2_SIZES
from kit.data import ALPACA, PROMPT_STYLES
from kit.files import DataError, WriteError, atomic_write, read_json, save_json
from kit.signals import signals_held
from lora import lora_config, lora_rank, merge_lora, replace_linear_with_lora
from previous_chapters import GPTModel

SIZE_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers")


# The chapter script's --test_mode model: tiny and random, the whole pipeline in seconds on a CPU.
TEST_MODE_CONFIG = {"vocab_size": 50257, "context_length": 120, "drop_rate": 0.0,
                    "qkv_bias": False, "emb_dim": 12, "n_layers": 1, "n_heads": 2}


def model_info_path(model_path):
    """The JSON beside a saved model: gpt2-medium355M-sft.pth -> gpt2-medium355M-sft.json."""
    return os.path.splitext(model_path)[0] + ".json"


def save_finetuned_model(model, path, info):
    """Save the weights as the book does (a plain state dict) and `info` as JSON beside them.

    `model` is the model, or its state dict (a copy taken earlier). `info` says how to rebuild
    and prompt the model: at least its "config" and "prompt_style".
    """
    state_dict = model if isinstance(model, dict) else model.state_dict()
    save_pth(state_dict, path)  # atomically, not cut short by a Ctrl-C
    save_json(info, model_info_path(path))



def model_info(plan, experiment, model_name, config, settings, schedule, model, progress,
               weights="last", train_overlap=None):
    """The JSON saved beside a run's weights: how to rebuild and prompt it (its config, with
    the LoRA layers when unmerged, and its prompt style), and how it was trained (`plan`, the
    run's `kit.run_setup.RunPlan`): the steps, the learning-rate schedule, and the losses of its
    last evaluation and the step they were measured at. `weights` says which weights these
    are: the "last", or the "best". The data file and the answers' length let
    generate_answers.py answer the run's test set anew. `train_overlap` counts the test and
    validation entries that repeat a training entry's instruction and input (kit/overlap.py)."""
    lora = lora_config(model)
    if lora is not None:  # saved unmerged: loading rebuilds the LoRA layers from this entry
        config = {**config, "lora": lora}
    row = progress.metrics[-1] if progress.metrics else None
    return {
        "model_name": model_name, "config": config,
        "prompt_style": experiment.prompt_style.name, "experiment": experiment.name,
        "run_name": plan.run_name, "weights": weights,
        "epochs": progress.epoch, "steps": progress.global_step + 1, "seed": plan.seed,
        "tokens_seen": progress.tokens_seen,
        "train_loss": finite_or_none(row and row["train_loss"]),
        "val_loss": finite_or_none(row and row["val_loss"]),
        "losses_step": row and row["step"], "schedule": schedule.describe(),
        "settings": settings, "data_path": plan.data_path,
        "max_new_tokens": plan.max_new_tokens, "train_overlap": train_overlap,
    }


def finite_or_none(value):
    """`value` when it is a finite number, else None (JSON's null: JSON has no NaN)."""
    return value if value is not None and math.isfinite(value) else None

def save_pth(obj, path):
    """`torch.save` `obj` to `path` atomically, with signals held until the file is whole
    (`signals_held`). A failed write raises WriteError naming `path`: torch.save reports one
    (a full disk) as a RuntimeError of its own, which names no cause."""
    with signals_held(f"Saving {path} (do not interrupt); stopping once it is written"):
        try:
            with atomic_write(path) as f:
                torch.save(obj, f)
        except RuntimeError as exc:
            raise WriteError(None, f"torch.save failed, most likely on a full disk: "
                                   f"{first_line(exc)}", path) from None


def read_pth(path, what_to_do):
    """`torch.load` a .pth file safely, turning a damaged or foreign file, or one holding a
    weight that is not a finite number, into one DataError naming the file.

    `what_to_do` ends the message: how the user gets a good file back.
    """
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, KeyError,
            IndexError) as exc:
        raise DataError(f"{path}: damaged or not a PyTorch weight file ({first_line(exc)}); "
                        f"{what_to_do}") from None
    except OSError as exc:  # torch reads a zip cut short as an invalid argument
        problem = ("damaged or not a PyTorch weight file" if exc.errno == errno.EINVAL
                   else "cannot be read")
        raise DataError(f"{path}: {problem} ({exc.strerror or exc}); {what_to_do}") from None
    name = first_nonfinite(content)
    if name is not None:
        raise DataError(f"{path}: '{name}' holds NaN or infinite values, not weights to go on "
                        f"from; {what_to_do}")
    return content


def first_line(exc):
    """The first line of an exception's message, or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def all_finite(tensors):
    """Whether every entry of the floating-point tensors among `tensors` is a finite number.

    Their total 2-norm, one fast pass, is finite when all entries are; only when it is not are
    the entries looked at one by one (a slow pass), as huge finite entries overflow it too.
    """
    tensors = [t for t in tensors if t.is_floating_point()]
    if not tensors:
        return True
    return (bool(torch.isfinite(torch.nn.utils.get_total_norm(tensors)))
            or all(bool(torch.isfinite(t).all()) for t in tensors))


def first_nonfinite(value, name=""):
    """The dotted name of the first floating-point tensor in `value` (nested in dicts, lists
    and tuples) that holds a NaN or an infinity; None when there is none."""
    if isinstance(value, torch.Tensor):
        return None if all_finite([value]) else name
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = first_nonfinite(item, f"{name}.{key}" if name else str(key))
        if found is not None:
            return found
    return None


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
        # The loaded tensors become the weights, in float32 as copying them in would make them.
        model.load_state_dict({name: tensor.float() if tensor.is_floating_point() else tensor
                               for name, tensor in state_dict.items()}, assign=True)
    except RuntimeError as exc:
        raise DataError(f"{path}: the weights do not fit the model described by {info_path} "
                        f"({str(exc).splitlines()[0]}); save them again") from None
    return model.to(device).eval(), info, PROMPT_STYLES[info["prompt_style"]]


def check_vocabulary(path, vocab_size, n_vocab, use):
    """Raise DataError unless the model saved at `path` has a vocabulary of `n_vocab` tokens,
    GPT-2's tokenizer's: `use` (what is done with both) needs the model's token ids to be the
    tokenizer's, no fewer (the tokenizer's ids would be out of range) and no more (the model
    would write tokens the tokenizer cannot decode)."""
    if vocab_size != n_vocab:
        raise DataError(f"{path}: has a vocabulary of {vocab_size} tokens, GPT-2's tokenizer "
                        f"{n_vocab}; only a model finetuned from GPT-2 can {use}")


def merge_saved_lora(model, path):
    """`lora.merge_lora` on the model loaded from `path`; returns the merged model. Raises
    DataError naming the file when the merged weights are not finite, or so large that the
    model's outputs are not (one token is computed to see): an alpha far from the trained
    one, with which the model would answer nothing but noise."""
    lora = lora_config(model)
    try:
        merge_lora(model)
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None
    if lora is not None:
        device = model.tok_emb.weight.device
        with torch.no_grad():
            logits = model(torch.zeros((1, 1), dtype=torch.long, device=device))
        if not bool(torch.isfinite(logits).all()):
            raise DataError(f"{path}: with its LoRA layers merged at alpha {lora['alpha']:g} the "
                            "model computes values that are not finite numbers: the alpha is "
                            "far too large for these weights; use the alpha the model was "
                            "trained with (the book's is 16)")
    return model


def build_model(config, state_dict, info_path, lora_alpha=None):
    """The GPTModel of `config`, with LoRA layers where the weights were saved unmerged (rank
    and alpha from the config's "lora" entry, else the rank from the weights and `lora_alpha`).

    Unmerged LoRA weights without a recorded alpha need `lora_alpha`: it scales every update
    and is not in the weights, so a guess would silently change every answer. The model is
    built on the meta device, without memory and without drawing random weights that the
    loaded ones replace at once: load `state_dict` into it with `assign=True`.
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
    with torch.device("meta"):
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
