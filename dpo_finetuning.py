"""Preference tuning with Direct Preference Optimization (DPO), the book's bonus notebook
ch07/04_preference-tuning-with-dpo as one script, on a model that gpt_instruction_finetuning.py
saved.

    python dpo_finetuning.py gpt2-medium355M-sft-standalone.pth       # the notebook's run
    python dpo_finetuning.py Smalltestmodel-sft-standalone.pth --test_mode   # seconds

It trains a copy of the saved model (the policy) to prefer each entry's `chosen` response over
its `rejected` one, measured against the saved model itself (the reference), on the training
part of the book's preference data (the chapter's 85/10/5 split). It prints what the notebook
prints (the initial losses, ln 2, and reward margins, 0; the losses and margins every
--eval_freq steps; a sample per epoch; the answers of the reference and of the policy), and
writes the policy `<SFT name>-dpo.pth` with its JSON, the metrics log, a plot of the losses and
reward margins, and the test set's answers for ollama_evaluate.py.

The machinery lives in kit/: the data (kit/dpo_data.py), the loss (kit/dpo_loss.py), the loop
(kit/dpo_training.py) and the flags (kit/dpo_cli.py); resuming, stopping and the run's files
are the chapter script's (kit/chapter_training.py).
"""

import os
import time
from dataclasses import replace
from functools import partial

import torch

from appendix_d import LearningRateSchedule
from gpt_download import gpt2_tokenizer
from gpt_instruction_finetuning import (
    Experiment,
    download_and_load_file,
    generate_responses,
    split_data,
)
from kit.checkpoint import fingerprint
from kit.cli import check_batch_sizes
from kit.device import make_optimizer
from kit.distributed import leave_process_group, main_process_first, training_model
from kit.dpo_cli import DEFAULT_EPOCHS, build_parser, check_args
from kit.dpo_data import (
    DATA_FILE,
    DATA_URL,
    PreferenceDataset,
    build_loaders,
    check_counted,
    check_preference_entries,
    custom_collate_fn,
    header_newlines,
    load_preference_entries,
)
from kit.dpo_loss import PrecomputedReference, precompute_reference
from kit.dpo_training import (
    DPOProgress,
    DPOTraining,
    initial_evaluation,
    plot_dpo,
    tracking,
    train_model_dpo_simple,
)
from kit.files import DataError, fail, print_versions, save_json
from kit.run_files import RunFiles
from kit.run_names import BEST_SUFFIX, PARTIAL_SUFFIX
from kit.run_setup import DPOPlan, setup_run
from kit.saved_model import load_finetuned_model, model_info, save_finetuned_model
from kit.signals import stop_signals_interrupt
from kit.stopping import BestWeights
from lora import lora_config

PACKAGES = ("matplotlib", "tiktoken", "torch", "tqdm")
SAMPLES = 3  # validation entries whose answers are shown before and after training


def output_paths(output_dir, run_name, sft_model):
    """The files a run writes, named after the SFT model's file and the run (`BEST_SUFFIX`
    and `PARTIAL_SUFFIX` as the chapter script adds them)."""
    model = os.path.join(output_dir,
                         f"{os.path.splitext(os.path.basename(sft_model))[0]}-{run_name}")
    responses = os.path.join(output_dir, f"instruction-data-with-response-{run_name}")
    return {
        "plot": os.path.join(output_dir, f"loss-plot-{run_name}.pdf"),
        "responses": f"{responses}.json",
        "model": f"{model}.pth",
        "model_info": f"{model}.json",
        "best": f"{model}{BEST_SUFFIX}.pth",
        "best_info": f"{model}{BEST_SUFFIX}.json",
        "checkpoint": os.path.join(output_dir, f"checkpoint-{os.path.basename(model)}.pth"),
        "metrics": os.path.join(output_dir, f"metrics-{run_name}.csv"),
        "answers": f"{responses}{PARTIAL_SUFFIX}.json",
        "lock": os.path.join(output_dir, f"finetuning-{run_name}.lock"),
    }


def load_data(plan):
    """The preference entries and their 85/10/5 split (10 entries each in test mode); under
    torchrun rank 0 downloads the book's file first."""
    data_path = plan.data_path
    if plan.data_given:
        data = load_preference_entries(data_path)
    else:
        with main_process_first(plan.rank, plan.world_size):
            data = download_and_load_file(DATA_FILE, DATA_URL)
        data = check_preference_entries(data, DATA_FILE)
    print("Number of entries:", len(data))
    train_data, test_data, val_data = split_data(data, data_path)
    if plan.test_mode:
        train_data, val_data, test_data = train_data[:10], val_data[:10], test_data[:10]
    check_batch_sizes(plan.batch_size, None, plan.world_size, len(train_data), data_path)
    return data_path, (train_data, test_data, val_data)


def load_policy(plan):
    """The SFT model to train, its JSON and prompt style; with unmerged LoRA layers only those
    train, as in the LoRA finetuning that made them."""
    model, info, prompt_style = load_finetuned_model(plan.sft_model, plan.device,
                                                     plan.lora_alpha)
    lora = lora_config(model)
    if lora is not None:
        for name, param in model.named_parameters():
            param.requires_grad = ".lora." in name
        print(f"Training the LoRA layers only (rank {lora['rank']}, alpha {lora['alpha']})")
    return model, info, prompt_style


def sft_identity(path):
    """What a checkpoint's reference depended on: the SFT model's file."""
    stat = os.stat(path)
    return f"{os.path.abspath(path)} ({stat.st_size} bytes, modified {stat.st_mtime_ns})"


def answers_text(entry, prompt_style, answers):
    """The notebook's view of one entry: its prompt, the correct response, then each
    (label, answer) of `answers`."""
    lines = [prompt_style.format_input(entry), f"\nCorrect response:\n>> {entry['output']}"]
    lines += [f"\n{label}:\n>> {answer}" for label, answer in answers]
    return "\n".join(lines) + "\n\n-------------------------------------\n"


def plan_run(args, device):
    """The run's plan (kit/run_setup.py), decided once from the checked flags and the `device`
    they name: the run's files, the data file, the precision, and under torchrun this
    process's rank."""
    return setup_run(args, device, DPOPlan, run_name=args.run_name,
                     paths=output_paths(args.output_dir, args.run_name, args.sft_model),
                     data_path=args.data_path or DATA_FILE, data_given=args.data_path is not None)


def run(plan):
    """The notebook's steps in order, each under a banner, as `plan` says (`plan_run`)."""
    paths = plan.paths
    print_versions(PACKAGES)
    with RunFiles(plan, DPOProgress) as files:
        # 1. The preference data and its split
        data_path, (train_data, test_data, val_data) = load_data(plan)
        print("Training set length:", len(train_data))
        print("Validation set length:", len(val_data))
        print("Test set length:", len(test_data))
        print(50 * "-")
        print("Device:", plan.describe())
        print(50 * "-")

        # 2. The SFT model (the policy; the reference is the same weights, frozen)
        model, info, prompt_style = load_policy(plan)
        model_name = info.get("model_name", os.path.basename(plan.sft_model))
        print(f"Loaded model: {model_name} ({prompt_style.name} prompts) from {plan.sft_model}")
        print(50 * "-")

        # 3. Batches: prompt + chosen and prompt + rejected, masked to the responses
        tokenizer = gpt2_tokenizer()
        context_length = model.pos_emb.num_embeddings
        header_tokens = header_newlines(prompt_style)
        collate = partial(custom_collate_fn, allowed_max_length=context_length,
                          header_tokens=header_tokens)
        train_dataset = PreferenceDataset(train_data, tokenizer, prompt_style)
        val_dataset = PreferenceDataset(val_data, tokenizer, prompt_style,
                                        first_index=len(train_data))
        check_counted(train_dataset, context_length, header_tokens, data_path, "training")
        check_counted(val_dataset, context_length, header_tokens, data_path, "validation")
        torch.manual_seed(plan.seed)
        train_loader, val_loader = build_loaders(train_dataset, val_dataset, plan.batch_size,
                                                 collate, plan.rank, plan.world_size)
        settings = {"SFT model": sft_identity(plan.sft_model), "--beta": plan.beta,
                    "--lr": plan.lr, "--weight_decay": plan.weight_decay,
                    "--batch_size": plan.batch_size, "--seed": plan.seed,
                    "--precision": plan.precision.name, "experiment": "dpo",
                    "training data": fingerprint(train_data),
                    "validation data": fingerprint(val_data)}
        files.check_resume(settings, plan.epochs, DEFAULT_EPOCHS)

        # 4. The reference: log-probabilities computed once, or a second frozen model
        reference, reference_logprobs = reference_for(plan, files, model,
                                                      (train_dataset, val_dataset), collate)

        # 5. Before training: the losses and rewards, and the answers (the reference's)
        samples = val_data[:SAMPLES]
        with plan.ctx:
            reference_answers = generate_responses(model, samples, tokenizer, context_length,
                                                   plan.max_new_tokens, plan.gen_batch_size,
                                                   prompt_style)
        if not files.resuming:
            torch.manual_seed(plan.seed)  # the loaders' draws, as the notebook's
            res = initial_evaluation(model, train_loader, val_loader, plan.beta,
                                     plan.eval_iter, plan.ctx)
            print("Initial losses")
            print("   Training loss:", res["train_loss"])
            print("   Validation loss:", res["val_loss"])
            print("   Train reward margin:", res["train_chosen_reward"]
                  - res["train_rejected_reward"])
            print("   Val reward margin:", res["val_chosen_reward"] - res["val_rejected_reward"])
            print(50 * "-")
            for entry in reference_answers:
                print(answers_text(entry, prompt_style,
                                   [("Model response", entry["model_response"])]))

        # 6. DPO training
        schedule = LearningRateSchedule(peak_lr=plan.lr,
                                        total_steps=len(train_loader) * files.epochs)
        experiment = replace(Experiment(), name="dpo", prompt_style=prompt_style,
                             data_file=DATA_FILE)
        config = {k: v for k, v in info["config"].items() if k != "lora"}
        describe = partial(model_info, plan, experiment, model_name, config, settings, schedule)
        start_time = time.time()
        torch.manual_seed(plan.seed)
        optimizer = plan.precision.stepping(make_optimizer(model, plan.lr, plan.weight_decay))
        progress = files.restore(model, optimizer)
        best = BestWeights(files.best_saver(model, describe)) if plan.keep_best else None
        hooks = DPOTraining.for_run(plan, files, model, optimizer, progress, schedule, best,
                                    reference_logprobs=reference_logprobs)
        with hooks:  # under torchrun the loop calls the model wrapped for the ranks
            train_model_dpo_simple(training_model(model, False, plan.device), reference,
                                   train_loader, val_loader, optimizer,
                                   files.epochs, plan.beta, plan.eval_freq, plan.eval_iter,
                                   prompt_style.format_input(val_data[min(2, len(val_data) - 1)]),
                                   tokenizer, hooks=hooks)
        if plan.world_size > 1:
            leave_process_group(plan.rank)  # ranks other than 0 end here
        print(f"Training completed in {(time.time() - start_time) / 60:.2f} minutes.")
        progress = hooks.progress
        epochs_trained = progress.epochs_trained(len(train_loader))
        print(50 * "-")

        # 7. The losses and reward margins, and the answers of the reference and the policy
        if progress.train_losses:
            plot_dpo(tracking(progress), epochs_trained, paths["plot"])
        with plan.ctx:
            policy_answers = generate_responses(model, samples, tokenizer, context_length,
                                                plan.max_new_tokens, plan.gen_batch_size,
                                                prompt_style)
        for before, after in zip(reference_answers, policy_answers, strict=True):
            print(answers_text(before, prompt_style,
                               [("Reference model response", before["model_response"]),
                                ("Policy model response", after["model_response"])]))

        # 8. The test set's answers, and the policy's weights
        print("Generating responses")
        with plan.ctx:
            answered = generate_responses(
                model, test_data, tokenizer, context_length, plan.max_new_tokens,
                plan.gen_batch_size, prompt_style,
                files.answer_log(progress, plan.max_new_tokens, test_data))
        save_json(answered, paths["responses"])
        print(f"Responses saved as {paths['responses']}")
        save_finetuned_model(model, paths["model"], describe(model, progress))
        print(f"Model saved as {paths['model']}")
        if progress.best is not None and plan.keep_best:
            best_row = progress.best
            print(f"Lowest validation DPO loss {best_row['val_loss']:.3f} at step "
                  f"{best_row['step']} (epoch {best_row['epoch']}): saved as {paths['best']}")
        files.finish(plan.keep_checkpoint)


def reference_for(plan, files, model, datasets, collate):
    """(the reference the loss uses, what the checkpoint keeps of it, None for a live one): the
    log-probabilities of every entry, computed by the SFT weights before training (kept by a
    checkpoint and reused on --resume), or, with --reference live, a second frozen copy of the
    model."""
    if plan.reference == "live":
        reference, _, _ = load_finetuned_model(plan.sft_model, plan.device, plan.lora_alpha)
        return reference.requires_grad_(False), None
    total = sum(len(dataset) for dataset in datasets)
    kept = files.resume_from["progress"].reference_logprobs if files.resuming else None
    reference = PrecomputedReference.from_state(kept, total)
    if reference is None:
        reference = precompute_reference(model, datasets, collate, plan.batch_size, plan.ctx)
        print(f"Reference log-probabilities of {total} entries computed")
        print(50 * "-")
    return reference, reference.state()


def main(argv=None):
    """Parse and check the flags, then run; bad input ends with one 'Error:' line and exit 2."""
    args = build_parser(__doc__).parse_args(argv)
    with stop_signals_interrupt():
        try:
            device = check_args(args)
            run(plan_run(args, device))
        except DataError as exc:
            fail(exc)


if __name__ == "__main__":
    main()
