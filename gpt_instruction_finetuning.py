"""Chapter 7 as one script: instruction finetuning of GPT-2 on an Alpaca-style dataset.

    python gpt_instruction_finetuning.py               # the chapter: gpt2-medium (355M), 2 epochs
    python gpt_instruction_finetuning.py --test_mode   # a tiny random model, seconds on a CPU
    torchrun --nproc_per_node=4 gpt_instruction_finetuning.py --model 774M   # several GPUs

It loads the dataset, splits it 85/10/5, batches it, finetunes the pretrained model, saves the loss
plot, generates a response for every test entry, and saves the responses and the weights.
"""

import argparse
import os
import re
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from importlib.metadata import PackageNotFoundError, version

import tiktoken
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from gpt_download import DownloadError, download_and_load_gpt2
from instruction_data import ALPACA, DataError, format_input, load_json_entries  # noqa: F401
from previous_chapters import (
    GPTModel,
    calc_loss_loader,
    generate_batch,
    load_weights_into_gpt,
    plot_losses,
    text_to_token_ids,
    token_ids_to_text,
    train_model_simple,
)
from script_utils import atomic_write, save_json

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
TEST_MODE_CONFIG = {"vocab_size": 50257, "context_length": 120, "drop_rate": 0.0,
                    "qkv_bias": False, "emb_dim": 12, "n_layers": 1, "n_heads": 2}


#####################################
# 7.2 Preparing the dataset
#####################################


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


def custom_collate_fn(batch, pad_token_id=END_OF_TEXT, ignore_index=-100, allowed_max_length=None,
                      device="cpu"):
    """Turn a list of token id lists into (inputs, targets) tensors of shape (b, longest).

    Each sequence gets one end-of-text token, then padding to the batch's longest sequence + 1.
    Targets are the inputs shifted by one; padding targets after the end-of-text one become
    `ignore_index`, so the loss learns to end the answer but not the padding. Sequences are cut
    to `allowed_max_length` when given.
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
# The run: what an experiment may change, with the chapter's choices as defaults
#####################################


@dataclass
class Experiment:
    """The choices a finetuning run is made of; the defaults are the chapter's.

    The exercises change one or two of these: the prompt style, the dataset class and collate
    function, the dataset, the batch size and length limit, or the model (LoRA).
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


def build_parser(description=__doc__):
    """The command-line flags, with the chapter's values as defaults."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="355M", choices=list(MODEL_CONFIGS),
                        help="GPT-2 size to finetune (default: 355M, gpt2-medium)")
    parser.add_argument("--models_dir", default="gpt2",
                        help="folder that holds (or receives) OpenAI's checkpoints (default: gpt2)")
    parser.add_argument("--data_path", default=None,
                        help="JSON list of instruction/input/output entries (default: the "
                             "chapter's dataset, downloaded to the working folder when missing)")
    parser.add_argument("--output_dir", default=".",
                        help="where the plot, responses, weights and checkpoint go (default: .)")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs (default: 2)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="training batch size (default: 8; 4 for the Alpaca 52k exercise)")
    parser.add_argument("--lr", type=float, default=5e-5,
                        help="AdamW learning rate (default: 5e-5)")
    parser.add_argument("--weight_decay", type=float, default=0.1,
                        help="AdamW weight decay (default: 0.1)")
    parser.add_argument("--seed", type=int, default=123,
                        help="seed for shuffling and initialization (default: 123)")
    parser.add_argument("--eval_freq", type=int, default=5,
                        help="evaluate every this many steps (default: 5)")
    parser.add_argument("--eval_iter", type=int, default=5,
                        help="batches per loss estimate (default: 5)")
    parser.add_argument("--max_new_tokens", type=int, default=256,
                        help="longest response generated for a test entry (default: 256)")
    parser.add_argument("--gen_batch_size", type=int, default=8,
                        help="test entries answered at once (default: 8); answers are the same "
                             "as one at a time")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, mps, or auto: cuda, then mps, then cpu (default: auto)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="bf16 runs the training forward pass in bfloat16 autocast, for "
                             "GPUs with bf16 units (default: fp32)")
    parser.add_argument("--compile", action="store_true",
                        help="compile the training forward pass with torch.compile (CUDA; "
                             "the first steps are slow while it compiles)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the checkpoint that an interrupted run left")
    parser.add_argument("--test_mode", action="store_true",
                        help="a tiny random model on 10/10/10 entries: the whole pipeline in "
                             "seconds, no download")
    return parser


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


def pick_device(name):
    """Return the torch device for `name`; 'auto' prefers cuda, then mps, then cpu."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def init_distributed(device_name):
    """Join the process group when torchrun started this process; return (device, rank, world).

    A plain `python` run has no process group: rank 0 of a world of 1. Under torchrun, GPUs
    talk through nccl (one GPU per process) and CPUs through gloo.
    """
    if "WORLD_SIZE" not in os.environ:
        return pick_device(device_name), 0, 1
    if torch.cuda.is_available() and device_name in ("auto", "cuda"):
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend)
    return device, dist.get_rank(), dist.get_world_size()


@contextmanager
def main_process_first(rank, world_size):
    """Let rank 0 run the block (downloads) before the other ranks, which then find the files."""
    if world_size > 1 and rank != 0:
        dist.barrier()
    yield
    if world_size > 1 and rank == 0:
        dist.barrier()


class ShardedShuffleSampler(Sampler):
    """The chapter's shuffled order, dealt out over the ranks of a distributed run.

    Every rank draws the same permutation, from the global random state as the chapter's
    shuffling loader does, keeps only whole global batches (the chapter drops the last partial
    one), and takes every `world_size`-th index from `rank` on. With per-rank batches of
    `global_batch_size // world_size`, rank r's k-th batch is its share of the k-th batch of a
    single process; with one process the batches are exactly the chapter's.
    """

    def __init__(self, dataset_len, global_batch_size, rank, world_size):
        self.dataset_len = dataset_len
        self.usable = dataset_len // global_batch_size * global_batch_size
        self.rank = rank
        self.world_size = world_size

    def __iter__(self):
        seed = int(torch.empty((), dtype=torch.int64).random_().item())  # RandomSampler's draw
        generator = torch.Generator()
        generator.manual_seed(seed)
        order = torch.randperm(self.dataset_len, generator=generator).tolist()
        yield from order[:self.usable][self.rank::self.world_size]

    def __len__(self):
        return self.usable // self.world_size


def build_loaders(train_data, val_data, tokenizer, device, batch_size, experiment,
                  rank=0, world_size=1):
    """Training (shuffled, last partial batch dropped) and validation (in order) loaders.

    In a distributed run `batch_size` is the global batch: each rank loads its share.
    """
    collate = partial(experiment.collate_fn, device=device,
                      allowed_max_length=experiment.allowed_max_length)
    train_dataset = experiment.dataset_class(train_data, tokenizer, experiment.prompt_style)
    warn_if_truncated(train_dataset, experiment.allowed_max_length, "training")
    if dist.is_available() and dist.is_initialized():
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


def model_config(args):
    """Return (config, model name) of the model to finetune, known before loading any weights."""
    if args.test_mode:
        return dict(TEST_MODE_CONFIG), "Small test model"
    model_name, size_config = MODEL_CONFIGS[args.model]
    return {**BASE_CONFIG, **size_config}, model_name


def load_model(args, device):
    """Return (model, config, model name): pretrained GPT-2, or a tiny random one in test mode."""
    config, model_name = model_config(args)
    if args.test_mode:
        model = GPTModel(config)
    else:
        _, params = download_and_load_gpt2(model_size=args.model, models_dir=args.models_dir)
        model = GPTModel(config)
        load_weights_into_gpt(model, params)
    model.eval()
    return model.to(device), config, model_name


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


def speed_up_forward(model, device, precision, compile_forward):
    """Run the model's forward pass, which training and the loss use, in bf16 and/or compiled.

    Generation calls the model's parts directly, so it stays in float32 and eager mode. Logits
    come back as float32, so the loss is computed at full precision. With fp32 and no compiling
    the model is left as it is.
    """
    if precision == "fp32" and not compile_forward:
        return
    forward = model.forward
    if precision == "bf16":
        float32_forward = forward

        def forward(*args, **kwargs):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return float32_forward(*args, **kwargs).float()

    if compile_forward:
        forward = torch.compile(forward)
    model.forward = forward


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


def save_checkpoint(path, model, optimizer, state):
    """Save what resuming needs: weights, optimizer moments, progress and random states."""
    with atomic_write(path) as f:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "state": state}, f)


def load_checkpoint(path, model, optimizer):
    """Restore model and optimizer from `path`; return the training state to resume with."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as exc:
        raise DataError(f"{path}: the checkpoint does not fit this model (was it saved with "
                        f"another --model?): {str(exc).splitlines()[0]}") from None
    optimizer.load_state_dict(checkpoint["optimizer"])
    return checkpoint["state"]


def output_paths(output_dir, experiment, model_name):
    """The files a run writes, named after the experiment as the book names them."""
    stem = re.sub(r"[ ()]", "", model_name)  # "gpt2-medium (355M)" -> "gpt2-medium355M"
    return {
        "plot": os.path.join(output_dir, f"loss-plot-{experiment.name}.pdf"),
        "responses": os.path.join(output_dir,
                                  f"instruction-data-with-response-{experiment.name}.json"),
        "model": os.path.join(output_dir, f"{stem}-sft-{experiment.name}.pth"),
        "checkpoint": os.path.join(output_dir, f"checkpoint-{stem}-{experiment.name}.pth"),
    }


def run(args, experiment=None):
    """Finetune and evaluate as the chapter does, with what `experiment` changes."""
    experiment = experiment or Experiment()
    device, rank, world_size = init_distributed(args.device)
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # only rank 0 prints
    print_versions()

    data_path = args.data_path or experiment.data_file
    with main_process_first(rank, world_size):
        if args.data_path:
            data = load_json_entries(data_path)
        else:
            data = download_and_load_file(data_path, experiment.data_url)
    train_data, test_data, val_data = split_data(data, data_path)
    if args.test_mode:  # a very small subset, to run the whole pipeline in seconds
        train_data, val_data, test_data = train_data[:10], val_data[:10], test_data[:10]
    batch_size = args.batch_size or experiment.batch_size
    if len(train_data) < batch_size:
        raise DataError(f"{data_path}: {len(train_data)} training entries are fewer than one "
                        f"batch of {batch_size}")
    if batch_size % world_size:
        raise DataError(f"--batch_size {batch_size} is the global batch: it must be a multiple "
                        f"of the {world_size} processes")
    print("Training set length:", len(train_data))
    print("Validation set length:", len(val_data))
    print("Test set length:", len(test_data))
    print(50 * "-")

    tokenizer = tiktoken.get_encoding("gpt2")
    if experiment.inspect_data is not None:
        experiment.inspect_data(data, tokenizer)
    print("Device:", device if world_size == 1 else f"{device.type} x {world_size} processes")
    print(50 * "-")

    context_length = model_config(args)[0]["context_length"]
    if experiment.allowed_max_length > context_length:  # the test model's context is short
        experiment = replace(experiment, allowed_max_length=context_length)
    torch.manual_seed(args.seed)
    train_loader, val_loader = build_loaders(train_data, val_data, tokenizer, device, batch_size,
                                             experiment, rank, world_size)

    with main_process_first(rank, world_size):
        raw_model, config, model_name = load_model(args, device)
    if experiment.prepare_model is not None:
        raw_model = experiment.prepare_model(raw_model).to(device)
    speed_up_forward(raw_model, device, args.precision, args.compile)
    model = raw_model
    if dist.is_initialized():  # gradients are averaged over the processes after each backward
        model = DistributedDataParallel(
            raw_model, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False)  # the only buffers are constant causal masks
    print("Loaded model:", model_name)
    print(50 * "-")
    paths = output_paths(args.output_dir, experiment, model_name)

    optimizer = make_optimizer(raw_model, args.lr, args.weight_decay)
    resume_state = None
    if args.resume and os.path.exists(paths["checkpoint"]):
        resume_state = load_checkpoint(paths["checkpoint"], raw_model, optimizer)
        print(f"Resuming from {paths['checkpoint']}: epoch {resume_state['epoch'] + 1}, "
              f"{resume_state['global_step'] + 1} steps done")
    else:
        if args.resume:
            print(f"No checkpoint at {paths['checkpoint']}; starting from the beginning")
        print("Initial losses")
        with torch.no_grad():
            train_loss = calc_loss_loader(train_loader, model, device, num_batches=5)
            val_loss = calc_loss_loader(val_loader, model, device, num_batches=5)
        print("   Training loss:", train_loss)
        print("   Validation loss:", val_loss)

    start_time = time.time()
    torch.manual_seed(args.seed)
    try:
        train_losses, val_losses, tokens_seen = train_model_simple(
            model, train_loader, val_loader, optimizer, device,
            num_epochs=args.epochs, eval_freq=args.eval_freq, eval_iter=args.eval_iter,
            start_context=experiment.prompt_style.format_input(val_data[0]), tokenizer=tokenizer,
            resume_state=resume_state,
            save_checkpoint=(partial(save_checkpoint, paths["checkpoint"], raw_model, optimizer)
                             if rank == 0 else None),
        )
    except KeyboardInterrupt:
        print(f"\nTraining interrupted; progress saved to {paths['checkpoint']}. "
              "Run the same command with --resume to continue.")
        raise SystemExit(130) from None
    print(f"Training completed in {(time.time() - start_time) / 60:.2f} minutes.")
    if dist.is_initialized():
        leave_process_group(rank)  # ranks other than 0 end here
    save_results(args, experiment, raw_model, config, tokenizer, test_data, paths,
                 train_losses, val_losses, tokens_seen)


def leave_process_group(rank):
    """End the distributed part after training; only rank 0 goes on to generate and save.

    The ranks meet at a barrier and close the group together, so none of them waits through
    rank 0's generation (a long wait would hit the group's timeout). The other ranks then end
    with `os._exit`: gloo's worker threads may still be releasing the last gradient all-reduce,
    which needs the GIL, and a thread that asks for it while Python shuts down aborts the whole
    process ("terminate called without an active exception"). Those ranks have nothing left to
    write, and skipping the shutdown leaves no such thread behind.
    """
    dist.barrier()
    dist.destroy_process_group()
    if rank != 0:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def save_results(args, experiment, model, config, tokenizer, test_data, paths,
                 train_losses, val_losses, tokens_seen):
    """Save the loss plot, the test set responses and the finetuned weights."""
    epochs_tensor = torch.linspace(0, args.epochs, len(train_losses))
    plot_losses(epochs_tensor, tokens_seen, train_losses, val_losses, save_path=paths["plot"])
    print(50 * "-")

    print("Generating responses")
    test_data = generate_responses(model, test_data, tokenizer, config["context_length"],
                                   args.max_new_tokens, args.gen_batch_size,
                                   experiment.prompt_style)
    save_json(test_data, paths["responses"])
    print(f"Responses saved as {paths['responses']}")

    if experiment.finish_model is not None:
        model = experiment.finish_model(model)
    with atomic_write(paths["model"]) as f:
        torch.save(model.state_dict(), f)
    print(f"Model saved as {paths['model']}")


def main(argv=None, experiment=None, parser=None):
    """Parse flags and run; bad input ends with one 'Error:' line and exit code 2."""
    args = (parser or build_parser()).parse_args(argv)
    try:
        run(args, experiment)
    except (DataError, DownloadError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
