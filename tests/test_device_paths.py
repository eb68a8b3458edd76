"""The training paths chosen per device, bf16, --compile, micro-batches and the one-pass
evaluation: each gives the fp32 CPU path's numbers (run here on the CPU)."""

import copy
import sys
from functools import partial
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from torch.utils.data import DataLoader

import accelerator
import gpt_instruction_finetuning as ft
import training_extras as extras
from accelerator import evaluate_in_one_pass, mean_batch_losses
from instruction_data import DataError
from previous_chapters import (
    GPTModel,
    calc_loss_batch,
    evaluate_model,
    pad_to_multiple,
    train_model_simple,
)
from training_extras import ChapterTraining


@pytest.fixture
def chapter_batches(instruction_data_path, tokenizer):
    """The chapter's first training batches (8 entries each, real lengths and padding)."""
    data = ft.load_json_entries(instruction_data_path)[:64]
    dataset = ft.InstructionDataset(data, tokenizer)
    loader = DataLoader(dataset, batch_size=8, collate_fn=ft.custom_collate_fn)
    return list(loader)


@pytest.fixture
def cfg(tiny_cfg):
    """The tiny test model with room for the chapter's entries."""
    return {**tiny_cfg, "context_length": 256}


def whole_rows(model):
    """`model` made to compute whole rows on the CPU, as it does on a GPU."""
    model.pack_on = ()
    return model


def assert_same_losses_and_gradients(batches, model, reference, trained=None, atol=1e-6):
    """Each batch's loss through `model`, and the gradients it leaves on `trained` (the model's
    parameters; `model` itself by default), equal those of `reference`."""
    trained = trained or model
    for inputs, targets in batches:
        trained.zero_grad()
        reference.zero_grad()
        got = calc_loss_batch(inputs, targets, model, "cpu")
        expected = calc_loss_batch(inputs, targets, reference, "cpu")
        got.backward()
        expected.backward()
        assert torch.allclose(got, expected, atol=atol)
        for (name, a), b in zip(trained.named_parameters(), reference.parameters(), strict=True):
            assert torch.allclose(a.grad, b.grad, atol=atol), name


def test_whole_rows_give_the_packed_losses_and_gradients(cfg, chapter_batches):
    torch.manual_seed(0)
    packed = GPTModel(cfg)
    assert_same_losses_and_gradients(chapter_batches[:3], whole_rows(copy.deepcopy(packed)),
                                     packed)


def test_whole_rows_are_padded_to_a_few_lengths(cfg):
    inputs = torch.randint(0, 50257, (3, 61))
    assert pad_to_multiple(inputs, 16, 1024).shape == (3, 64)
    assert torch.equal(pad_to_multiple(inputs, 16, 1024)[:, :61], inputs)
    assert pad_to_multiple(inputs, 16, 62).shape == (3, 62)  # never past the context
    assert pad_to_multiple(inputs[:, :48], 16, 1024).shape == (3, 48)
    model = whole_rows(GPTModel(cfg))
    seen = []
    model.features = mock.Mock(side_effect=lambda idx: seen.append(idx.shape[1])
                               or torch.zeros(*idx.shape, cfg["emb_dim"]))
    model(inputs, keep=torch.ones(3, 61, dtype=torch.bool))
    assert seen == [64]


def test_one_pass_evaluation_gives_the_books_losses_and_random_draws(cfg, chapter_batches):
    torch.manual_seed(0)
    model = whole_rows(GPTModel(cfg))
    train_loader = DataLoader(chapter_batches, batch_size=None, shuffle=True)
    val_loader = DataLoader(chapter_batches[:2], batch_size=None)
    torch.manual_seed(5)
    expected = evaluate_model(model, train_loader, val_loader, "cpu", eval_iter=5)
    after_expected = torch.rand(3)
    torch.manual_seed(5)
    got = evaluate_in_one_pass(model, train_loader, val_loader, eval_iter=5)
    assert torch.equal(torch.rand(3), after_expected)  # the same draws from the shuffle
    assert got == pytest.approx(expected, abs=1e-5)
    assert model.training  # back in training mode, as evaluate_model leaves it
    each = mean_batch_losses(chapter_batches[:3], model)
    assert each == pytest.approx([calc_loss_batch(x, y, model, "cpu").item()
                                  for x, y in chapter_batches[:3]], abs=1e-5)


def test_evaluation_of_an_empty_loader_is_nan_as_in_the_book(cfg, chapter_batches):
    model = whole_rows(GPTModel(cfg))
    train_loss, val_loss = evaluate_in_one_pass(model, chapter_batches[:1], [], eval_iter=5)
    assert val_loss != val_loss and train_loss == pytest.approx(
        calc_loss_batch(*chapter_batches[0], model, "cpu").item(), abs=1e-5)


def train_three_steps(cfg, batches, **hook_options):
    """Weights after three steps on `batches` through the chapter script's hooks.

    Plain SGD applies the gradient as it is: AdamW would divide the near-zero gradients of the
    key biases (attention does not depend on them) by their own size, blowing float rounding
    up to whole steps.
    """
    torch.manual_seed(0)
    model = GPTModel(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with ChapterTraining(1, "cpu", **hook_options) as hooks:
        train_model_simple(model, batches, batches[:1], optimizer, "cpu", num_epochs=1,
                           eval_freq=100, eval_iter=1, start_context="Hi",
                           tokenizer=mock.Mock(), hooks=hooks)
    return model.state_dict()


@pytest.mark.parametrize("micro", [1, 2, 4])
def test_micro_batches_give_the_whole_batchs_weights(cfg, chapter_batches, micro):
    with mock.patch("previous_chapters.generate_and_print_sample"):
        expected = train_three_steps(cfg, chapter_batches[:3])
        got = train_three_steps(cfg, chapter_batches[:3], micro_batch_size=micro)
    for name, tensor in expected.items():
        assert torch.allclose(got[name], tensor, atol=1e-6), name
    assert not torch.equal(expected["out_head.weight"],
                           GPTModel(cfg).state_dict()["out_head.weight"])


def test_bf16_losses_stay_close_to_fp32_and_the_weights_stay_fp32(cfg, chapter_batches):
    torch.manual_seed(0)
    model = GPTModel(cfg)
    inputs, targets = chapter_batches[0]
    fp32 = calc_loss_batch(inputs, targets, model, "cpu")
    with accelerator.precision_context(torch.device("cpu"), "bf16"):
        bf16 = calc_loss_batch(inputs, targets, model, "cpu")
    assert bf16.dtype == torch.float32
    assert bf16.item() == pytest.approx(fp32.item(), rel=0.02)
    assert bf16.item() != fp32.item()  # it did compute in bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with accelerator.precision_context(torch.device("cpu"), "fp32"):
        assert calc_loss_batch(inputs, targets, model, "cpu").item() == fp32.item()


def test_compiled_training_model_gives_the_eager_losses_and_gradients(cfg,
                                                                      chapter_batches):
    torch.manual_seed(0)
    model = GPTModel(cfg)
    reference = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = accelerator.compiled_for_training(model, torch.device("cpu"))
    assert_same_losses_and_gradients(chapter_batches[:2], compiled, reference, trained=model,
                                     atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it was compiled
    assert type(model) is GPTModel and set(model.state_dict()) == set(reference.state_dict())


def test_without_compile_the_training_model_is_the_model(cfg):
    model = GPTModel(cfg)
    assert extras.training_model(model, False, torch.device("cpu")) is model


def gpt2_medium_on(device):
    """Stands in for GPT-2 355M on `device`: the sizes the generation batch is computed from."""
    return SimpleNamespace(
        pos_emb=SimpleNamespace(weight=SimpleNamespace(device=device), num_embeddings=1024),
        tok_emb=SimpleNamespace(embedding_dim=1024, num_embeddings=50257), trf_blocks=[None] * 24)


def test_generation_batch_size_follows_the_device():
    sized = partial(accelerator.default_gen_batch_size, prompt_lengths=[100] * 110,
                    max_new_tokens=256)
    assert sized(gpt2_medium_on(torch.device("cpu"))) == 8
    cuda = gpt2_medium_on(torch.device("cuda"))
    gib = 1 << 30
    with mock.patch("torch.cuda.mem_get_info", return_value=(100 * gib, 141 * gib)):
        assert sized(cuda) == 110  # the whole test set at once
    with mock.patch("torch.cuda.mem_get_info", return_value=(4 * gib, 8 * gib)):
        # 2 GiB for keys and values of 24 layers x 356 positions x 1024 x 4 bytes x 2
        assert sized(cuda) == 2 * gib // (2 * 24 * 356 * 1024 * 4 + 8 * 50257)


def test_bf16_is_refused_on_a_gpu_without_bfloat16_units():
    with mock.patch("torch.cuda.is_bf16_supported", return_value=False), \
            mock.patch("torch.cuda.get_device_name", return_value="Tesla T4"), \
            pytest.raises(DataError) as error:
        accelerator.check_precision("bf16", False, torch.device("cuda"))
    assert str(error.value) == ("--precision bf16: Tesla T4 has no bfloat16 units (they came "
                                "with Ampere GPUs); use --precision fp32")


def test_compile_is_refused_where_it_cannot_run():
    with mock.patch.object(sys, "platform", "win32"), pytest.raises(DataError) as error:
        accelerator.check_precision("fp32", True, torch.device("cpu"))
    assert str(error.value).startswith("--compile: torch.compile does not run on Windows")
    with mock.patch("importlib.util.find_spec", return_value=None), \
            pytest.raises(DataError) as error:
        accelerator.check_precision("fp32", True, torch.device("cuda"))
    assert str(error.value) == ("--compile: torch.compile needs Triton on a GPU and it is not "
                                "installed; pip install triton, or leave --compile out")


def test_bf16_on_a_cpu_without_bfloat16_warns_once(capsys):
    with mock.patch.object(accelerator, "cpu_has_bf16", return_value=False):
        accelerator.check_precision("bf16", False, torch.device("cpu"))
    assert capsys.readouterr().out == ("Warning: this CPU has no bfloat16 instructions; "
                                       "--precision bf16 will be slower than fp32 here\n")
    with mock.patch.object(accelerator, "cpu_has_bf16", return_value=True):
        accelerator.check_precision("bf16", False, torch.device("cpu"))
    assert capsys.readouterr().out == ""


def test_cudnn_attention_is_left_out_on_cuda_only():
    with mock.patch("torch.backends.cuda.enable_cudnn_sdp") as enable:
        accelerator.choose_attention_kernels(torch.device("cpu"))
        assert enable.call_count == 0
        accelerator.choose_attention_kernels(torch.device("cuda"))
    enable.assert_called_once_with(False)
