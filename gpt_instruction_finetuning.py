"""Chapter 7 as one script: instruction finetuning of GPT-2 on an Alpaca-style dataset.

    python gpt_instruction_finetuning.py               # the chapter: gpt2-medium (355M), 2 epochs
    python gpt_instruction_finetuning.py --test_mode   # a tiny random model, seconds on a CPU
    torchrun --nproc_per_node=4 gpt_instruction_finetuning.py --model 774M   # several GPUs

It loads the dataset, splits it 85/10/5, batches it, finetunes the pretrained model, saves the loss
plot, generates a response for every test entry, and saves the responses and the weights (with a
JSON file beside them that says how to rebuild and prompt the model).

The sections follow the chapter: 7.2 dataset, 7.3 batches, 7.4 data loaders, 7.5 pretrained
model, 7.6 finetuning, 7.7 responses and saving. The command line and the run's plumbing come
after them; torchrun and resuming live in training_extras.py.
"""

import argparse
import hashlib
import importlib.util
import json
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from importlib.metadata import PackageNotFoundError, version

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from gpt_download import (
    DownloadError,
    download_and_load_gpt2,
    download_and_load_gpt2_safetensors,
    gpt2_tokenizer,
)
from instruction_data import (  # noqa: F401  (format_input: the book's name, imported from here)
    ALPACA,
    PROMPT_STYLES,
    DataError,
    format_input,
    load_json_entries,
)
from lora import lora_config, lora_from_weights, replace_linear_with_lora
from previous_chapters import (
    IGNORE_INDEX,
    GPTModel,
    calc_loss_loader,
    generate_batch,
    load_weights_into_gpt,
    plot_losses,
    text_to_token_ids,
    token_ids_to_text,
    train_model_simple,
)
from script_utils import atomic_write, fail, save_json
from training_extras import (
    ChapterTraining,
    ShardedShuffleSampler,
    init_distributed,
    leave_process_group,
    load_checkpoint,
    main_process_first,
    read_pth,
    save_checkpoint,
)

DATA_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/"
            "01_main-chapter-code/instruction-data.json")
END_OF_TEXT = 50256  # GPT-2's <|endoftext|> token id, used for padding and to stop generation

BASE_CONFIG = {
    "vocab_size": 50257,     # GPT-2's vocabulary
    "context_length": 1024,  # longest sequence the position embedding covers
    "drop_rate": 0.0,        # no dropout when finetuning
    "qkv_bias": True,        # OpenAI's GPT-2 has query/key/value biases
}
MODEL_CONFIGS = {
    "124M": ("gpt2-small (124M)", {"emb_dim": 768, "n_layers": 12, "n_heads": 12}),
    "355M": ("gpt2-medium (355M)", {"emb_dim": 1024, "n_layers": 24, "n_heads": 16}),
    "774M": ("gpt2-large (774M)", {"emb_dim": 1280, "n_layers": 36, "n_heads": 20}),
    "1558M": ("gpt2-xl (1558M)", {"emb_dim": 1600, "n_layers": 48, "n_heads": 25}),
}
DEFAULT_EPOCHS = 2  # the chapter's; a resumed run keeps its own
TEST_MODE_CONFIG = {"vocab_size": 50257, "context_length": 120, "drop_rate": 0.0,
                    "qkv_bias": False, "emb_dim": 12, "n_layers": 1, "n_heads": 2}


#####################################
# 7.2 Preparing a dataset for supervised instruction finetuning
#####################################

# The prompt styles (the chapter's Alpaca template, `format_input`) live in instruction_data.py,
# which the judge script imports too without loading PyTorch.


def download_and_load_file(file_path, url):
    """Return the JSON list in `file_path`, downloading it from `url` first when it is missing."""
    if not os.path.exists(file_path):
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                text = response.read().decode("utf-8")
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DataError(
                f"{file_path}: not found, and downloading it from {url} failed ({reason}); "
                "place the file there by hand or pass --data_path") from exc
        with atomic_write(file_path, "w") as f:
            f.write(text)
    return load_json_entries(file_path)


def split_data(data, file_path="dataset"):
    """Split in file order: the first 85% for training, the next 10% for testing, the rest for
    validation. Returns (train_data, test_data, val_data)."""
    train_portion = int(len(data) * 0.85)
    test_portion = int(len(data) * 0.1)
    train_data = data[:train_portion]
    test_data = data[train_portion:train_portion + test_portion]
    val_data = data[train_portion + test_portion:]
    if not (train_data and test_data and val_data):
        raise DataError(f"{file_path}: {len(data)} entries are too few to split 85/10/5 into "
                        "non-empty training, test and validation sets (at least 10 are needed)")
    return train_data, test_data, val_data


#####################################
# 7.3 Organizing data into training batches
#####################################


class InstructionDataset(Dataset):
    """The entries as token id lists of prompt + response, tokenized once up front."""

    def __init__(self, data, tokenizer, prompt_style=ALPACA):
        self.data = data
        self.encoded_texts = [
            tokenizer.encode(prompt_style.format_input(entry) + prompt_style.format_response(entry))
            for entry in data
        ]

    def __getitem__(self, index):
        return self.encoded_texts[index]

    def __len__(self):
        return len(self.data)


def custom_collate_fn(batch, pad_token_id=END_OF_TEXT, ignore_index=IGNORE_INDEX,
                      allowed_max_length=None, device="cpu"):
    """Turn a list of token id lists into (inputs, targets) tensors of shape (b, longest).

    Each sequence gets one end-of-text token, then padding to the batch's longest sequence + 1.
    Targets are the inputs shifted by one; padding targets after the end-of-text one become
    `ignore_index`, so the loss learns to end the answer but not the padding. Sequences are cut
    to `allowed_max_length` when given. The padding is found by position, where the book
    compares token values: the same batches unless an entry's own tokens include the pad token,
    which the book would then also ignore.
    """
    batch_max_length = max(len(item) + 1 for item in batch)
    inputs_lst, targets_lst = [], []
    for item in batch:
        padded = item + [pad_token_id] * (batch_max_length - len(item))  # end-of-text + padding
        inputs = torch.tensor(padded[:-1])  # (batch_max_length - 1,)
        targets = torch.tensor(padded[1:])  # (batch_max_length - 1,): shifted by one
        targets[len(item):] = ignore_index  # keep the first end-of-text target, drop the rest
        if allowed_max_length is not None:
            inputs = inputs[:allowed_max_length]
            targets = targets[:allowed_max_length]
        inputs_lst.append(inputs)
        targets_lst.append(targets)
    inputs_tensor = torch.stack(inputs_lst).to(device)  # (b, min(longest, allowed_max_length))
    targets_tensor = torch.stack(targets_lst).to(device)
    return inputs_tensor, targets_tensor


#####################################
# 7.4 Creating data loaders for an instruction dataset
#####################################


@dataclass
class Experiment:
    """The choices a finetuning run is made of; the defaults are the chapter's.

    The exercises change one or two of these: the prompt style, the dataset class and collate
    function, the dataset, the batch size and length limit, or the model (LoRA). `settings`
    holds an exercise's own values that the checkpoint and the saved model must record.
    """

    name: str = "standalone"
    prompt_style: object = ALPACA
    dataset_class: type = InstructionDataset
    collate_fn: object = custom_collate_fn
    data_file: str = "instruction-data.json"
    data_url: str = DATA_URL
    batch_size: int = 8
    allowed_max_length: int = 1024
    inspect_data: object = None  # (data, tokenizer) -> None, prints facts about the dataset
    prepare_model: object = None  # model -> model, after the pretrained weights are loaded
    finish_model: object = None  # model -> model, before the weights are saved
    settings: dict = field(default_factory=dict)


def build_loaders(train_data, val_data, tokenizer, device, batch_size, experiment,
                  rank=0, world_size=1):
    """Training (shuffled, last partial batch dropped) and validation (in order) loaders.

    Under torchrun `batch_size` is the global batch: each rank loads its share.
    """
    collate = partial(experiment.collate_fn, device=device,
                      allowed_max_length=experiment.allowed_max_length)
    train_dataset = experiment.dataset_class(train_data, tokenizer, experiment.prompt_style)
    warn_if_truncated(train_dataset, experiment.allowed_max_length, "training")
    if world_size > 1:
        sampler = ShardedShuffleSampler(len(train_dataset), batch_size, rank, world_size)
        train_loader = DataLoader(train_dataset, batch_size=batch_size // world_size,
                                  sampler=sampler, collate_fn=collate, drop_last=True,
                                  num_workers=0)
    else:
        train_loader = DataLoader(train_dataset, batch_size=batch_size, collate_fn=collate,
                                  shuffle=True, drop_last=True, num_workers=0)
    val_dataset = experiment.dataset_class(val_data, tokenizer, experiment.prompt_style)
    val_loader = DataLoader(val_dataset, batch_size=batch_size, collate_fn=collate,
                            shuffle=False, drop_last=False, num_workers=0)
    return train_loader, val_loader


def warn_if_truncated(dataset, allowed_max_length, split_name):
    """Print one line counting the entries that the collate function will cut short."""
    too_long = sum(len(token_ids(dataset[i])) > allowed_max_length for i in range(len(dataset)))
    if too_long:
        print(f"Warning: {too_long} of {len(dataset)} {split_name} entries are longer than "
              f"{allowed_max_length} tokens and will be truncated")


def token_ids(item):
    """The token ids of a dataset item (the masking exercise stores more beside them)."""
    return item[1] if isinstance(item, tuple) else item


#####################################
# 7.5 Loading a pretrained LLM
#####################################


def model_config(args):
    """Return (config, model name) of the model to finetune, known before loading any weights."""
    if args.test_mode:
        return dict(TEST_MODE_CONFIG), "Small test model"
    model_name, size_config = MODEL_CONFIGS[args.model]
    return {**BASE_CONFIG, **size_config}, model_name


def load_model(args, device):
    """Return (model, config, model name): pretrained GPT-2, or a tiny random one in test mode."""
    config, model_name = model_config(args)
    model = GPTModel(config)
    if not args.test_mode:
        download = (download_and_load_gpt2_safetensors if args.weights == "safetensors"
                    else download_and_load_gpt2)
        _, params = download(model_size=args.model, models_dir=args.models_dir)
        load_weights_into_gpt(model, params)
    model.eval()
    return model.to(device), config, model_name


#####################################
# 7.6 Finetuning the LLM on instruction data
#####################################


def make_optimizer(model, lr, weight_decay):
    """AdamW over the trainable parameters, in its fused form where the device has one.

    The fused kernel updates every parameter in one pass instead of a Python loop of small
    operations per tensor: the same update up to float rounding, in a fraction of the time.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except RuntimeError:  # no fused AdamW for this device
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def precision_context(device, precision):
    """The context the loss and the generation are computed in: bf16 autocast, or nothing.

    Under autocast the matrix products run in bfloat16 while the weights, the optimizer and
    the loss stay float32 (cross-entropy runs in float32 under autocast). Entered where the
    loss is computed (`ChapterTraining`, `print_initial_losses`) and around generation.
    """
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def choose_attention_kernels(device):
    """On CUDA, leave the cuDNN kernel out of `scaled_dot_product_attention`.

    PyTorch picks it first under bf16 on recent GPUs, and it builds a graph for every new shape:
    generation meets a new one at every step, and each batch brings its own length. The flash
    and memory-efficient kernels, chosen instead, need no such preparation.
    """
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


def compiled_for_training(model, device):
    """`model` compiled with torch.compile, for the training loop only (generation runs the
    eager model, whose KV cache changes shape every step).

    Rows come padded to a few lengths (`GPTModel.length_multiple`), so after the second shape
    one dynamic-shape graph serves them all; on CUDA, "reduce-overhead" replays each step as
    CUDA graphs instead of launching hundreds of small kernels from Python.
    """
    mode = "reduce-overhead" if device.type == "cuda" else None
    return torch.compile(model, mode=mode)


def print_initial_losses(model, train_loader, val_loader, device, ctx=None):
    """The chapter's check before training: the loss on 5 training and 5 validation batches,
    computed under `ctx` (the run's precision) when given."""
    print("Initial losses")
    with torch.no_grad(), ctx or nullcontext():
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=5)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=5)
    print("   Training loss:", train_loss)
    print("   Validation loss:", val_loss)


def finetune(model, train_loader, val_loader, optimizer, device, args, start_context, tokenizer,
             hooks):
    """The chapter's call of `train_model_simple`, timed; returns (train_losses, val_losses,
    tokens_seen, progress), progress saying how many epochs and steps were trained."""
    start_time = time.time()
    torch.manual_seed(args.seed)
    with hooks:
        curves = train_model_simple(
            model, train_loader, val_loader, optimizer, device,
            num_epochs=hooks.num_epochs, eval_freq=args.eval_freq, eval_iter=args.eval_iter,
            start_context=start_context, tokenizer=tokenizer, hooks=hooks)
    print(f"Training completed in {(time.time() - start_time) / 60:.2f} minutes.")
    return (*curves, hooks.progress)


#####################################
# 7.7 Extracting and saving responses
#####################################


def generate_responses(model, test_data, tokenizer, context_size, max_new_tokens, batch_size,
                       prompt_style=ALPACA):
    """Return copies of the test entries with the model's greedy answer as `model_response`.

    Prompts of similar length are answered together (batched, with the KV cache); each answer
    is the same as generating for its prompt alone.
    """
    prompts = [prompt_style.format_input(entry) for entry in test_data]
    encoded = [text_to_token_ids(p, tokenizer)[0].tolist() for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # less padding
    responses = [None] * len(test_data)
    with tqdm(total=len(test_data), desc="Generating responses") as progress:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            answers = generate_batch(model, [encoded[i] for i in chunk], max_new_tokens,
                                     context_size, eos_id=END_OF_TEXT)
            for i, answer in zip(chunk, answers, strict=True):
                generated_text = token_ids_to_text(torch.tensor(encoded[i] + answer), tokenizer)
                responses[i] = prompt_style.extract_response(generated_text, prompts[i])
            progress.update(len(chunk))
    return [{**entry, "model_response": response}
            for entry, response in zip(test_data, responses, strict=True)]


def default_gen_batch_size(device, config, prompt_lengths, max_new_tokens, precision):
    """Test entries answered at once when --gen_batch_size is not given: 8 on a CPU; on CUDA
    the whole test set, or as many as half the free memory holds keys and values for."""
    if device.type != "cuda":
        return 8
    positions = min(config["context_length"], max(prompt_lengths) + max_new_tokens)
    element_size = 2 if precision == "bf16" else 4
    row_bytes = 2 * config["n_layers"] * positions * config["emb_dim"] * element_size
    row_bytes += 2 * config["vocab_size"] * 4  # the last position's logits, twice over
    free_bytes, _ = torch.cuda.mem_get_info(device)
    return max(1, min(len(prompt_lengths), free_bytes // 2 // row_bytes))


def model_info_path(model_path):
    """The JSON beside a saved model: gpt2-medium355M-sft.pth -> gpt2-medium355M-sft.json."""
    return os.path.splitext(model_path)[0] + ".json"


def save_finetuned_model(model, path, info):
    """Save the weights as the book does (a plain state dict) and `info` as JSON beside them.

    `info` says how to rebuild and prompt the model: at least its "config" and "prompt_style".
    """
    with atomic_write(path) as f:
        torch.save(model.state_dict(), f)
    save_json(info, model_info_path(path))


def infer_config(state_dict):
    """The GPTModel config of a bare state dict, read off its shapes (for .pth files without a
    JSON beside them, such as the book's)."""
    emb_dim = state_dict["tok_emb.weight"].shape[1]
    heads = {size["emb_dim"]: size["n_heads"] for _, size in MODEL_CONFIGS.values()}
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
    lora = info["config"].get("lora") or lora_from_weights(state_dict)
    try:
        model = GPTModel(info["config"])
        if lora:  # saved without --merge_lora: rebuild the LoRA layers the weights belong to
            replace_linear_with_lora(model, rank=lora["rank"], alpha=lora["alpha"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{info_path}: its config does not describe a GPTModel "
                        f"({type(exc).__name__}: {exc}); fix or delete it") from None
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise DataError(f"{path}: the weights do not fit the model described by {info_path} "
                        f"({str(exc).splitlines()[0]}); save them again") from None
    return model.to(device).eval(), info, PROMPT_STYLES[info["prompt_style"]]


def load_model_info(info_path):
    """Read and check the JSON saved beside a finetuned model."""
    info = load_json_object(info_path)
    if not isinstance(info.get("config"), dict) or info.get("prompt_style") not in PROMPT_STYLES:
        raise DataError(f"{info_path}: needs a 'config' object and a 'prompt_style' of "
                        f"{', '.join(PROMPT_STYLES)}; delete it to load the weights with the "
                        "chapter's defaults")
    return info


def load_json_object(path):
    """Read a JSON object from `path`; DataError naming the file when it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object")
    return value


def output_paths(output_dir, experiment, model_name):
    """The files a run writes, named after the experiment as the book names them."""
    stem = re.sub(r"[ ()]", "", model_name)  # "gpt2-medium (355M)" -> "gpt2-medium355M"
    return {
        "plot": os.path.join(output_dir, f"loss-plot-{experiment.name}.pdf"),
        "responses": os.path.join(output_dir,
                                  f"instruction-data-with-response-{experiment.name}.json"),
        "model": os.path.join(output_dir, f"{stem}-sft-{experiment.name}.pth"),
        "checkpoint": os.path.join(output_dir, f"checkpoint-{stem}-{experiment.name}.pth"),
        "metrics": os.path.join(output_dir, f"metrics-{experiment.name}.csv"),
    }


def save_results(args, experiment, model, config, model_name, tokenizer, test_data, paths,
                 training, settings, ctx):
    """Save the loss plot, the test set responses, and the finetuned weights with their JSON.

    `training` is (train_losses, val_losses, tokens_seen, progress) of the finished loop.
    """
    train_losses, val_losses, tokens_seen, progress = training
    epochs_tensor = torch.linspace(0, progress["epoch"], len(train_losses))
    plot_losses(epochs_tensor, tokens_seen, train_losses, val_losses, save_path=paths["plot"])
    print(50 * "-")

    print("Generating responses")
    prompt_lengths = [len(tokenizer.encode(experiment.prompt_style.format_input(entry)))
                      for entry in test_data]
    gen_batch_size = args.gen_batch_size or default_gen_batch_size(
        args.device, config, prompt_lengths, args.max_new_tokens, args.precision)
    with ctx:
        test_data = generate_responses(model, test_data, tokenizer, config["context_length"],
                                       args.max_new_tokens, gen_batch_size,
                                       experiment.prompt_style)
    save_json(test_data, paths["responses"])
    print(f"Responses saved as {paths['responses']}")

    if experiment.finish_model is not None:
        model = experiment.finish_model(model)
    lora = lora_config(model)
    if lora is not None:  # saved unmerged: loading rebuilds the LoRA layers from this entry
        config = {**config, "lora": lora}
    info = {
        "model_name": model_name, "config": config,
        "prompt_style": experiment.prompt_style.name, "experiment": experiment.name,
        "epochs": progress["epoch"], "steps": progress["global_step"] + 1, "seed": args.seed,
        "tokens_seen": progress["tokens_seen"],
        "train_loss": train_losses[-1] if train_losses else None,
        "val_loss": val_losses[-1] if val_losses else None,
        "settings": settings,
    }
    save_finetuned_model(model, paths["model"], info)
    print(f"Model saved as {paths['model']}")


#####################################
# The run: the sections above in order
#####################################


def run(args, experiment=None):
    """Finetune and evaluate as the chapter does, with what `experiment` changes.

    Ctrl-C during training saves a checkpoint and exits 130.
    """
    experiment = experiment or Experiment()
    device, rank, world_size = init_distributed(args.device)
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # only rank 0 prints
    print_versions()

    data, data_path = load_data(args, experiment, rank, world_size)
    train_data, test_data, val_data = split_for_run(data, data_path, args, experiment,
                                                    world_size)
    tokenizer = gpt2_tokenizer(args.models_dir)
    if experiment.inspect_data is not None:
        experiment.inspect_data(data, tokenizer)
    print("Device:", device if world_size == 1 else f"{device.type} x {world_size} processes")
    print(50 * "-")

    experiment = fit_to_context(experiment, model_config(args)[0]["context_length"])
    torch.manual_seed(args.seed)
    train_loader, val_loader = build_loaders(train_data, val_data, tokenizer, device,
                                             batch_size(args, experiment), experiment,
                                             rank, world_size)

    with main_process_first(rank, world_size):
        raw_model, config, model_name = load_model(args, device)
    model = prepare_for_training(raw_model, experiment, args, device)
    print("Loaded model:", model_name)
    print(50 * "-")

    ctx = precision_context(device, args.precision)
    choose_attention_kernels(device)
    paths = output_paths(args.output_dir, experiment, model_name)
    settings = run_settings(args, experiment, model_name, train_data)
    resuming = will_resume(args, paths["checkpoint"])
    if not resuming:
        print_initial_losses(model, train_loader, val_loader, device, ctx)

    optimizer = make_optimizer(raw_model, args.lr, args.weight_decay)
    resume_progress = None
    if resuming:
        resume_progress = load_checkpoint(paths["checkpoint"], raw_model, optimizer, settings)
    num_epochs = epochs_to_train(args, paths["checkpoint"], resume_progress)
    save = partial(save_checkpoint, paths["checkpoint"], raw_model, optimizer,
                   settings=settings) if rank == 0 else None
    hooks = ChapterTraining(num_epochs, device, save, resume_progress, ctx=ctx,
                            micro_batch_size=args.micro_batch_size,
                            metrics_path=paths["metrics"])
    start_context = experiment.prompt_style.format_input(val_data[0])
    try:
        with saving_failures_reported(paths["checkpoint"], "the epochs finished before"):
            training = finetune(model, train_loader, val_loader, optimizer, device, args,
                                start_context, tokenizer, hooks)
    except KeyboardInterrupt:
        print(f"\nTraining interrupted; progress saved to {paths['checkpoint']}. "
              "Run the same command with --resume to continue.")
        raise SystemExit(130) from None
    if world_size > 1:
        leave_process_group(rank)  # ranks other than 0 end here
    with saving_failures_reported(paths["checkpoint"], "the trained weights"):
        save_results(args, experiment, raw_model, config, model_name, tokenizer, test_data,
                     paths, training, settings, ctx)
    remove_checkpoint(paths["checkpoint"], args.keep_checkpoint)


def load_data(args, experiment, rank, world_size):
    """The dataset's entries and where they came from: --data_path, or the experiment's file
    (downloaded by rank 0 when missing)."""
    data_path = args.data_path or experiment.data_file
    with main_process_first(rank, world_size):
        if args.data_path:
            return load_json_entries(data_path), data_path
        return download_and_load_file(data_path, experiment.data_url), data_path


def split_for_run(data, data_path, args, experiment, world_size):
    """The chapter's 85/10/5 split (10 entries each in test mode), checked against the batch
    size, with the sizes printed."""
    train_data, test_data, val_data = split_data(data, data_path)
    if args.test_mode:  # a very small subset, to run the whole pipeline in seconds
        train_data, val_data, test_data = train_data[:10], val_data[:10], test_data[:10]
    size = batch_size(args, experiment)
    if len(train_data) < size:
        raise DataError(f"{data_path}: {len(train_data)} training entries are fewer than one "
                        f"batch of {size}")
    if size % world_size:
        raise DataError(f"--batch_size {size} is the global batch: it must be a multiple "
                        f"of the {world_size} processes")
    micro = args.micro_batch_size
    if micro is not None and (size // world_size) % micro:
        share = "" if world_size == 1 else f" per process ({world_size} processes)"
        raise DataError(f"--micro_batch_size {micro}: the batch of {size // world_size}{share} "
                        "must be a multiple of it; pick a divisor of --batch_size")
    print("Training set length:", len(train_data))
    print("Validation set length:", len(val_data))
    print("Test set length:", len(test_data))
    print(50 * "-")
    return train_data, test_data, val_data


def batch_size(args, experiment):
    """--batch_size, or the experiment's (8 in the chapter, 4 for Alpaca 52k)."""
    return args.batch_size or experiment.batch_size


def fit_to_context(experiment, context_length):
    """The experiment with its length limit cut to the model's context (the test model's is
    short)."""
    if experiment.allowed_max_length > context_length:
        return replace(experiment, allowed_max_length=context_length)
    return experiment


def prepare_for_training(model, experiment, args, device):
    """Apply the experiment's model change (LoRA), --compile, and DDP under torchrun; return
    the model the training loop calls (the one generation and saving use stays as it is)."""
    if experiment.prepare_model is not None:
        model = experiment.prepare_model(model).to(device)
    if args.compile:
        model = compiled_for_training(model, device)
    if not torch.distributed.is_initialized():
        return model
    # Gradients are averaged over the processes after each backward.
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        broadcast_buffers=False)  # the only buffers are constant causal masks


def run_settings(args, experiment, model_name, train_data):
    """What a checkpoint's training depended on: resuming with anything else would mix runs."""
    return {"--model": model_name, "--seed": args.seed, "--lr": args.lr,
            "--weight_decay": args.weight_decay,
            "--batch_size": batch_size(args, experiment), "--precision": args.precision,
            "training data": fingerprint(train_data), "experiment": experiment.name,
            **experiment.settings}


def fingerprint(entries):
    """A short hash of the entries' content: any edit to the training data changes it."""
    text = json.dumps(entries, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def will_resume(args, checkpoint):
    """Whether this run continues `checkpoint`. Without --resume an existing checkpoint is
    about to be replaced: say so before any training, and how to continue it instead."""
    exists = os.path.exists(checkpoint)
    if args.resume and not exists:
        print(f"No checkpoint at {checkpoint}; starting from the beginning")
    if not args.resume and exists:
        print(f"Note: {checkpoint} holds an unfinished run; this run starts over and replaces "
              "it at its first epoch end. To continue that run instead, stop now (Ctrl-C) "
              "and run the same command with --resume.")
    return args.resume and exists


def epochs_to_train(args, checkpoint, progress):
    """The epoch count to train to: --epochs, else the resumed run's own (2 for a new run).

    Raises DataError when --epochs is below the epochs the checkpoint has already trained.
    """
    if progress is None:
        return args.epochs or DEFAULT_EPOCHS
    planned = progress.get("num_epochs", DEFAULT_EPOCHS)
    print(f"Resuming from {checkpoint}: epoch {progress['epoch'] + 1} of "
          f"{args.epochs or planned}, {progress['global_step'] + 1} steps done")
    if args.epochs is not None and args.epochs < progress["epoch"]:
        raise DataError(f"--epochs {args.epochs}: {checkpoint} has already trained "
                        f"{progress['epoch']} epochs; pass --epochs {progress['epoch']} or "
                        f"more, or leave --epochs out to finish its {planned}")
    return args.epochs or planned


def remove_checkpoint(checkpoint, keep):
    """Delete the checkpoint once every output of the run is written (it is as large as the
    model and its optimizer state together), unless --keep_checkpoint."""
    if keep or not os.path.exists(checkpoint):
        return
    os.remove(checkpoint)
    print(f"Removed {checkpoint}: the run is complete (--keep_checkpoint keeps it)")


@contextmanager
def saving_failures_reported(checkpoint, what_is_kept):
    """Turn a failed write into one line that says where the finished work is kept."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc)
        where = f" {exc.filename}" if exc.filename else ""
        fail(f"could not write{where} ({reason}); {what_is_kept} are saved in {checkpoint}: "
             "fix this, then run the same command with --resume", code=1)


#####################################
# The command line
#####################################


def build_parser(description=__doc__):
    """The command-line flags, with the chapter's values as defaults."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    parser.add_argument("--model", default="355M", choices=list(MODEL_CONFIGS),
                        help="GPT-2 size to finetune (355M is gpt2-medium)")
    parser.add_argument("--models_dir", default="gpt2",
                        help="folder that holds (or receives) OpenAI's checkpoints")
    parser.add_argument("--weights", default="tf", choices=["tf", "safetensors"],
                        help="read OpenAI's TensorFlow checkpoint (the chapter's way), or the "
                             "same weights as model.safetensors, which needs no TensorFlow")
    parser.add_argument("--data_path", default=None,
                        help="JSON list of instruction/input/output entries (default: the "
                             "chapter's dataset, downloaded to the working folder when missing)")
    parser.add_argument("--output_dir", default=".",
                        help="where the plot, responses, weights and checkpoint go")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"training epochs (default: {DEFAULT_EPOCHS}; with --resume, the "
                             "interrupted run's own)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="training batch size (default: 8; 4 for the Alpaca 52k exercise)")
    parser.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate")
    parser.add_argument("--weight_decay", type=float, default=0.1, help="AdamW weight decay")
    parser.add_argument("--seed", type=int, default=123,
                        help="seed for shuffling and initialization")
    parser.add_argument("--eval_freq", type=int, default=5, help="evaluate every this many steps")
    parser.add_argument("--eval_iter", type=int, default=5, help="batches per loss estimate")
    parser.add_argument("--max_new_tokens", type=int, default=256,
                        help="longest response generated for a test entry")
    parser.add_argument("--gen_batch_size", type=int, default=None,
                        help="test entries answered at once (default: 8 on a CPU; on a GPU the "
                             "whole test set, as memory allows); the answers are the same as "
                             "one at a time")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N, mps, or auto: cuda, then mps, then cpu")
    parser.add_argument("--micro_batch_size", type=int, default=None,
                        help="compute each batch this many entries at a time, accumulating "
                             "gradients: the same training with less memory")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="bf16 computes the losses and the answers in bfloat16 autocast, "
                             "for GPUs with bf16 units (Ampere or newer)")
    parser.add_argument("--compile", action="store_true",
                        help="compile the training steps with torch.compile (CUDA with "
                             "Triton; the first steps wait while it compiles)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the checkpoint that an interrupted run left")
    parser.add_argument("--keep_checkpoint", action="store_true",
                        help="keep the checkpoint after a finished run (it is removed once "
                             "all outputs are written)")
    parser.add_argument("--test_mode", action="store_true",
                        help="a tiny random model on 10/10/10 entries: the whole pipeline in "
                             "seconds, no download")
    return parser


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter,
                    argparse.RawDescriptionHelpFormatter):
    """--help keeps the usage examples' line breaks and shows each flag's default; switches
    (default off) and flags whose help explains their default show none."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def check_args(args):
    """Refuse flag values that cannot work, before anything is downloaded or loaded.

    Raises DataError naming the flag and its value. Replaces `args.device` with the device.
    """
    for name in ("epochs", "batch_size", "micro_batch_size", "gen_batch_size", "eval_freq",
                 "eval_iter"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise DataError(f"--{name} must be at least 1, got {value}")
    if not args.lr > 0:
        raise DataError(f"--lr must be above 0, got {args.lr}")
    if not args.weight_decay >= 0:
        raise DataError(f"--weight_decay must not be negative, got {args.weight_decay}")
    if args.max_new_tokens < 0:
        raise DataError(f"--max_new_tokens must not be negative, got {args.max_new_tokens}")
    args.device = pick_device(args.device)
    check_precision(args.precision, args.compile, args.device)
    check_paths(args)


def pick_device(name):
    """Return the torch device for `name`; 'auto' prefers cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise DataError(f"--device {name}: not a device; use cpu, cuda, cuda:N, mps or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"--device {name}: CUDA is not available on this machine; "
                        "use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DataError(f"--device {name}: this machine has {torch.cuda.device_count()} "
                        "CUDA device(s); use --device cuda")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DataError(f"--device {name}: MPS is not available on this machine; "
                        "use --device cpu")
    return device


def check_precision(precision, compile_model, device):
    """Refuse bf16 on a GPU without bfloat16 units and --compile where it cannot run; warn that
    bf16 on a CPU without bfloat16 instructions is slower than fp32."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DataError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no "
                        "bfloat16 units (they came with Ampere GPUs); use --precision fp32")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        print("Warning: this CPU has no bfloat16 instructions; --precision bf16 will be slower "
              "than fp32 here")
    if compile_model and sys.platform == "win32":
        raise DataError("--compile: torch.compile does not run on Windows; leave --compile "
                        "out (or run under WSL)")
    if compile_model and device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise DataError("--compile: torch.compile needs Triton on a GPU and it is not "
                        "installed; pip install triton, or leave --compile out")


def cpu_has_bf16():
    """Whether this CPU computes in bfloat16 natively (AVX-512 BF16 or AMX on x86)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def check_paths(args):
    """Refuse a data file, output folder or models folder that cannot be used, before training.

    The output folder is created when missing and must take a file.
    """
    if args.data_path is not None:
        if not os.path.exists(args.data_path):
            raise DataError(f"{args.data_path}: file not found (--data_path)")
        if not os.path.isfile(args.data_path):
            raise DataError(f"--data_path {args.data_path}: is a folder, not a JSON file")
    if os.path.exists(args.models_dir) and not os.path.isdir(args.models_dir):
        raise DataError(f"--models_dir {args.models_dir}: is a file, not a folder; "
                        "pass another folder with --models_dir")
    check_output_dir(args.output_dir)


def check_output_dir(output_dir):
    """Create `output_dir` when missing and check that a file can be written in it."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise DataError(f"--output_dir {output_dir}: is a file, not a folder; "
                        "pass another folder with --output_dir")
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as exc:
        raise DataError(f"--output_dir {output_dir}: cannot write there "
                        f"({exc.strerror or exc}); pass another folder with --output_dir"
                        ) from None


def print_versions():
    """Print the versions of the packages the chapter uses, then a separator line."""
    for package in ("matplotlib", "tiktoken", "torch", "tqdm", "tensorflow"):
        found = "not installed"
        for name in (package, f"{package}-cpu"):  # tensorflow-cpu provides tensorflow on Linux
            try:
                found = version(name)
                break
            except PackageNotFoundError:
                continue
        print(f"{package} version: {found}")
    print(50 * "-")


def main(argv=None, experiment=None, parser=None):
    """Parse and check the flags, then run; bad input ends with one 'Error:' line and exit 2."""
    args = (parser or build_parser()).parse_args(argv)
    try:
        check_args(args)
        run(args, experiment)
    except (DataError, DownloadError) as exc:
        fail(exc)


if __name__ == "__main__":
    main()
