"""Chapter 7 as one script: instruction finetuning of GPT-2 on an Alpaca-style dataset.

    python gpt_instruction_finetuning.py               # the chapter: gpt2-medium (355M), 2 epochs
    python gpt_instruction_finetuning.py --test_mode   # a tiny random model, seconds on a CPU
    torchrun --nproc_per_node=4 gpt_instruction_finetuning.py --model 774M   # several GPUs

It loads the dataset, splits it 85/10/5, batches it, finetunes the pretrained model, saves the loss
plot, generates a response for every test entry, and saves the responses and the weights (with a
JSON file beside them that says how to rebuild and prompt the model).

The sections follow the chapter: 7.2 dataset, 7.3 batches, 7.4 data loaders, 7.5 pretrained
model, 7.6 finetuning, 7.7 responses and saving; `run` then goes through them in order. What
the script adds around the chapter lives in kit/: the flags and their checks (kit/cli.py), the
run's plan, the split it trains on and its learning-rate schedule (kit/run_setup.py), the
device and precision (kit/device.py), torchrun (kit/distributed.py), resuming
(kit/checkpoint.py), the run's files (kit/run_files.py: one run at a time, nothing saved lost on
an interrupt, a full disk or a diverging loss), the metrics log (kit/metrics_log.py), the hooks
around the book's training loop (kit/chapter_training.py) and the saved-model format
(kit/saved_model.py).
"""

import gc
import os
import time
import urllib.error
import urllib.request
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from functools import partial

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from gpt_download import (
    END_OF_TEXT,
    GPT2_N_CTX,
    GPT2_N_VOCAB,
    GPT2_SIZES,
    download_and_load_gpt2,
    download_and_load_gpt2_safetensors,
    gpt2_tokenizer,
)
from kit.chapter_training import ChapterTraining, check_counted_tokens
from kit.checkpoint import run_settings
from kit.cli import DEFAULT_EPOCHS, build_parser, check_args
from kit.data import ALPACA, format_input, load_json_entries, warn_if_truncated  # noqa: F401  (format_input: the book's name, imported from here)
from kit.device import (
    choose_attention_kernels,
    default_gen_batch_size,
    eager_model,
    make_optimizer,
)
from kit.distributed import (
    ShardedShuffleSampler,
    leave_process_group,
    main_process_first,
    training_model,
)
from kit.files import DataError, atomic_write, fail, print_versions, save_json
from kit.run_files import RunFiles
from kit.run_names import output_paths
from kit.run_setup import ChapterPlan, learning_rate_schedule, setup_run, split_for_run
from kit.saved_model import TEST_MODE_CONFIG, model_info, save_finetuned_model
from kit.signals import stop_signals_interrupt
from kit.stopping import BestWeights, EarlyStopped
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

DATA_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/"
            "01_main-chapter-code/instruction-data.json")

BASE_CONFIG = {
    "vocab_size": GPT2_N_VOCAB,   # GPT-2's vocabulary
    "context_length": GPT2_N_CTX,  # longest sequence the position embedding covers
    "drop_rate": 0.0,             # no dropout when finetuning
    "qkv_bias": True,             # OpenAI's GPT-2 has query/key/value biases
}
MODEL_CONFIGS = {  # size -> (name, the GPTModel config keys of that size)
    size: (s["name"], {"emb_dim": s["n_embd"], "n_layers": s["n_layer"], "n_heads": s["n_head"]})
    for size, s in GPT2_SIZES.items()
}
CHAPTER_PACKAGES = ("matplotlib", "tiktoken", "torch", "tqdm", "tensorflow")


#####################################
# 7.2 Preparing a dataset for supervised instruction finetuning
#####################################

# The prompt styles (the chapter's Alpaca template, `format_input`) live in kit/data.py,
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
    return load_json_entries(file_path, training=True)


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


def load_data(plan, experiment):
    """The dataset's entries, from --data_path or the experiment's file (downloaded by rank 0
    when missing), and the 85/10/5 split the run takes (`split_for_run`: 10 entries each in
    test mode, checked against the batch size, printed with the test and validation entries
    that repeat a training entry). Returns (data, split, overlap counts)."""
    with main_process_first(plan.rank, plan.world_size):
        data = (load_json_entries(plan.data_path, training=True) if plan.data_given
                else download_and_load_file(plan.data_path, experiment.data_url))
    split, overlap = split_for_run(plan, experiment.batch_size, split_data(data, plan.data_path))
    return data, split, overlap


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


def build_loaders(train_data, val_data, tokenizer, batch_size, experiment, rank=0,
                  world_size=1):
    """Training (shuffled, last partial batch dropped) and validation (in order) loaders.

    Under torchrun `batch_size` is the global batch: each rank loads its share. The batches stay
    on the CPU: the training steps prepare their own copy for the device
    (`prepare_batch`, copied without making a GPU wait), and the book's loss
    functions move theirs.
    """
    collate = partial(experiment.collate_fn, device="cpu",
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


#####################################
# 7.5 Loading a pretrained LLM
#####################################


def model_config(model_size, test_mode=False):
    """Return (config, model name) of the model to finetune, known before loading any weights."""
    if test_mode:
        return dict(TEST_MODE_CONFIG), "Small test model"
    model_name, size_config = MODEL_CONFIGS[model_size]
    return {**BASE_CONFIG, **size_config}, model_name


def load_model(plan):
    """Return the plan's model: pretrained GPT-2, or a tiny random one in test mode."""
    model = GPTModel(plan.config)
    if not plan.test_mode:
        download = (download_and_load_gpt2_safetensors if plan.weights == "safetensors"
                    else download_and_load_gpt2)
        _, params = download(model_size=plan.model, models_dir=plan.models_dir)
        load_weights_into_gpt(model, params)
    model.eval()
    return model.to(plan.device)


#####################################
# 7.6 Finetuning the LLM on instruction data
#####################################


def print_initial_losses(model, train_loader, val_loader, device, ctx=None):
    """The chapter's check before training: the loss on 5 training and 5 validation batches,
    computed under `ctx` (the run's precision) when given, batch by batch as the book does, on
    the eager model (a compiled model's graphs are the training steps')."""
    print("Initial losses")
    model = eager_model(model)
    with torch.no_grad(), ctx or nullcontext():
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=5)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=5)
    print("   Training loss:", train_loss)
    print("   Validation loss:", val_loss)


def finetune(model, train_loader, val_loader, optimizer, plan, start_context, tokenizer, hooks):
    """The chapter's call of `train_model_simple`, timed; returns (train_losses, val_losses,
    tokens_seen, epochs_trained, progress), the `Progress` saying how many steps were trained.
    Ctrl-C (or SIGTERM, SIGHUP) stops after the running step with a checkpoint (`hooks`), and
    so does --early_stopping, after which the run goes on to its outputs."""
    start_time = time.time()
    torch.manual_seed(plan.seed)
    with hooks:
        try:
            curves = train_model_simple(
                model, train_loader, val_loader, optimizer, plan.device,
                num_epochs=hooks.num_epochs, eval_freq=plan.eval_freq,
                eval_iter=plan.eval_iter, start_context=start_context, tokenizer=tokenizer,
                hooks=hooks)
        except EarlyStopped as stop:
            if str(stop):
                print(stop)
            curves = hooks.curves()
    print(f"Training completed in {(time.time() - start_time) / 60:.2f} minutes.")
    return (*curves, hooks.progress.epochs_trained(len(train_loader)), hooks.progress)


def train(plan, models, loaders, files, schedule, describe, start_context, tokenizer):
    """Section 7.6 as the run does it: the initial losses (unless resuming), the optimizer
    (restored from the checkpoint when resuming), then finetuning; returns what `finetune`
    returns. `models` is (the model the loop calls, the plain model it wraps)."""
    model, raw_model = models
    train_loader, val_loader = loaders
    choose_attention_kernels(plan.device)
    if not files.resuming:
        print_initial_losses(model, train_loader, val_loader, plan.device, plan.ctx)
    optimizer = plan.precision.stepping(make_optimizer(raw_model, plan.lr, plan.weight_decay))
    progress = files.restore(raw_model, optimizer)  # None when starting over
    best = BestWeights.for_run(plan, files, raw_model, describe)
    hooks = ChapterTraining.for_run(plan, files, raw_model, optimizer, progress, schedule, best,
                                    micro_batch_size=plan.micro_batch_size)
    return finetune(model, train_loader, val_loader, optimizer, plan, start_context, tokenizer,
                    hooks)


#####################################
# 7.7 Extracting and saving responses
#####################################


def generate_responses(model, test_data, tokenizer, context_size, max_new_tokens,
                       batch_size=None, prompt_style=ALPACA, answer_log=None):
    """Return copies of the test entries with the model's greedy answer as `model_response`.

    Prompts of similar length are answered together (batched, with the KV cache); each answer
    is the same as generating for its prompt alone. `batch_size` None sizes the batches to the
    device (`default_gen_batch_size`). An `answer_log` (`AnswerLog`) keeps the answers
    after each batch and supplies those an interrupted run kept, which are not generated again.
    Nothing of training stays in memory meanwhile: the gradients are freed, and so is what
    training left unreferenced (the optimizer's moments, held in reference cycles).
    """
    model.zero_grad(set_to_none=True)
    gc.collect()
    prompts = [prompt_style.format_input(entry) for entry in test_data]
    encoded = [text_to_token_ids(p, tokenizer)[0].tolist() for p in prompts]
    batch_size = batch_size or default_gen_batch_size(
        model, [len(ids) for ids in encoded], max_new_tokens)
    responses = answer_log.load() if answer_log is not None else [None] * len(test_data)
    order = sorted((i for i, response in enumerate(responses) if response is None),
                   key=lambda i: len(encoded[i]))  # less padding
    with tqdm(total=len(test_data), initial=len(test_data) - len(order),
              desc="Generating responses") as progress:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            answers = generate_batch(model, [encoded[i] for i in chunk], max_new_tokens,
                                     context_size, eos_id=END_OF_TEXT)
            for i, answer in zip(chunk, answers, strict=True):
                generated_text = token_ids_to_text(torch.tensor(encoded[i] + answer), tokenizer)
                responses[i] = prompt_style.extract_response(generated_text, prompts[i])
            if answer_log is not None:
                answer_log.save(responses)
            progress.update(len(chunk))
    return [{**entry, "model_response": response}
            for entry, response in zip(test_data, responses, strict=True)]


def save_results(plan, experiment, model, tokenizer, test_data, files, training, describe):
    """Save the loss plot, the test set responses, and the finetuned weights with their JSON
    (`describe`, `model_info`); say which evaluation was best when it was followed.

    `training` is (train_losses, val_losses, tokens_seen, epochs_trained, progress) of the
    finished loop; `files` (`RunFiles`) names the outputs and keeps the answers as they come.
    """
    paths = files.paths
    train_losses, val_losses, tokens_seen, epochs_trained, progress = training
    epochs_tensor = torch.linspace(0, epochs_trained, len(train_losses))
    plot_losses(epochs_tensor, tokens_seen, train_losses, val_losses, save_path=paths["plot"])
    print(50 * "-")

    print("Generating responses")
    answer_tokens = plan.max_new_tokens
    with plan.ctx:
        test_data = generate_responses(model, test_data, tokenizer,
                                       model.pos_emb.num_embeddings, answer_tokens,
                                       plan.gen_batch_size, experiment.prompt_style,
                                       files.answer_log(progress, answer_tokens, test_data))
    save_json(test_data, paths["responses"])
    print(f"Responses saved as {paths['responses']}")

    if experiment.finish_model is not None:
        model = experiment.finish_model(model)
    save_finetuned_model(model, paths["model"], describe(model, progress))
    print(f"Model saved as {paths['model']}")
    files.say_best(progress.best)


#####################################
# What a run is made of: the chapter's choices, which the exercises change
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


#####################################
# The run: the sections above in order
#####################################


def plan_run(args, device, experiment):
    """The run's plan (kit/run_setup.py), decided once from the checked flags and the `device`
    they name: the model, the run's name and files, the data file, the batch size, the
    precision, and under torchrun this process's rank."""
    config, model_name = model_config(args.model, args.test_mode)
    run_name = args.run_name or experiment.name
    return setup_run(args, device, ChapterPlan, model_name=model_name, config=config,
                     run_name=run_name, paths=output_paths(args.output_dir, run_name, model_name),
                     data_path=args.data_path or experiment.data_file,
                     data_given=args.data_path is not None,
                     batch_size=args.batch_size or experiment.batch_size)


def run(plan, experiment=None):
    """Finetune and evaluate as the chapter does, with what `experiment` changes, as `plan`
    says (`plan_run`); the run's files (`RunFiles`) take one run at a time, and an interrupt,
    a failed write or a diverging loss ends the run in one line that says what is saved and
    how to go on."""
    experiment = experiment or Experiment()
    experiment = replace(  # --batch_size, and a length limit within the model's context
        experiment, batch_size=plan.batch_size,
        allowed_max_length=min(experiment.allowed_max_length, plan.config["context_length"]))
    print_versions(CHAPTER_PACKAGES)  # only rank 0 prints
    with RunFiles(plan) as files:
        data, (train_data, test_data, val_data), train_overlap = load_data(plan, experiment)
        tokenizer = gpt2_tokenizer(plan.models_dir)
        if experiment.inspect_data is not None:
            experiment.inspect_data(data, tokenizer)
        print("Device:", plan.describe())
        print(50 * "-")
        settings = run_settings(plan, experiment, train_data, val_data, test_data)
        files.check_resume(settings, plan.epochs, DEFAULT_EPOCHS)  # before the model is built
        torch.manual_seed(plan.seed)
        train_loader, val_loader = build_loaders(train_data, val_data, tokenizer,
                                                 experiment.batch_size, experiment, plan.rank,
                                                 plan.world_size)
        check_counted_tokens(train_loader, plan.data_path)
        schedule = learning_rate_schedule(plan, len(train_loader) * files.epochs)
        files.check_schedule(schedule)

        with main_process_first(plan.rank, plan.world_size):
            raw_model = load_model(plan)
        if experiment.prepare_model is not None:  # LoRA: frozen weights, trainable low-rank ones
            raw_model = experiment.prepare_model(raw_model).to(plan.device)
        model = training_model(raw_model, plan.compile, plan.device)
        print("Loaded model:", plan.model_name)
        print(50 * "-")

        describe = partial(model_info, plan, experiment, plan.model_name, plan.config, settings,
                           schedule, train_overlap=train_overlap)
        training = train(plan, (model, raw_model), (train_loader, val_loader), files, schedule,
                         describe, experiment.prompt_style.format_input(val_data[0]), tokenizer)
        if plan.world_size > 1:
            leave_process_group(plan.rank)  # ranks other than 0 end here
        save_results(plan, experiment, raw_model, tokenizer, test_data, files, training,
                     describe)
        files.finish(plan.keep_checkpoint)


def main(argv=None, experiment=None, args=None):
    """Parse the flags (`args`: parsed already, by exercise_experiments.py), check them, plan
    the run, then run it; bad input ends with one 'Error:' line and exit 2. SIGTERM and SIGHUP
    stop the run as Ctrl-C does."""
    args = args or build_parser(__doc__).parse_args(argv)
    experiment = experiment or Experiment()
    with stop_signals_interrupt():
        try:
            device = check_args(args)
            run(plan_run(args, device, experiment), experiment)
        except DataError as exc:
            fail(exc)


if __name__ == "__main__":
    main()
