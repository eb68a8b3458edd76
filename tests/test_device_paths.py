"""The training paths chosen per device, the GPU path's prepared batches, bf16, --compile and
micro-batches: each gives the fp32 CPU path's numbers (run here on the CPU)."""

import copy
import sys
from functools import partial
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from torch.utils.data import DataLoader

import gpt_instruction_finetuning as ft
from appendix_d import LearningRateSchedule
from kit import device as kit_device
from kit.chapter_training import ChapterTraining
from kit.device import (
    check_precision,
    choose_attention_kernels,
    compiled_for_training,
    default_gen_batch_size,
    eager_model,
    pad_to_multiple,
    precision_context,
    prepare_batch,
    prepared_loss,
    with_precision,
)
from kit.distributed import training_model
from kit.files import DataError
from kit.stopping import FiniteWatch, TrainingDiverged
from previous_chapters import IGNORE_INDEX, GPTModel, calc_loss_batch, train_model_simple


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


def test_rows_are_padded_to_a_few_lengths():
    inputs = torch.randint(0, 50257, (3, 61))
    assert pad_to_multiple(inputs, 16, 1024).shape == (3, 64)
    assert torch.equal(pad_to_multiple(inputs, 16, 1024)[:, :61], inputs)
    assert pad_to_multiple(inputs, 16, 62).shape == (3, 62)  # never past the context
    assert pad_to_multiple(inputs[:, :48], 16, 1024).shape == (3, 48)


def test_prepared_batch_holds_the_counted_positions_as_indices():
    inputs = torch.arange(1, 19).view(2, 9)
    targets = torch.full((2, 9), IGNORE_INDEX)
    targets[0, 2:5] = torch.tensor([7, 8, 9])
    targets[1, 0] = 6
    padded, kept, counted = prepare_batch(inputs, targets, "cpu", context_length=1024)
    assert padded.shape == (2, 16) and torch.equal(padded[:, :9], inputs)
    assert kept.tolist() == [2, 3, 4, 16]  # row 1 starts at 16 in the padded rows
    assert counted.tolist() == [7, 8, 9, 6]
    assert torch.equal(padded.flatten()[kept], inputs.flatten()[[2, 3, 4, 9]])


def assert_same_loss_and_gradients(model, reference, inputs, targets, context_length, atol):
    """The prepared batch's loss through `model` equals `calc_loss_batch` through `reference`
    (the same weights), and so do the gradients it leaves."""
    model.zero_grad()
    reference.zero_grad()
    got = prepared_loss(inputs, targets, model, "cpu", context_length)
    expected = calc_loss_batch(inputs, targets, reference, "cpu")
    got.backward()
    expected.backward()
    assert got.item() == pytest.approx(expected.item(), abs=atol)
    weights = eager_model(model)
    for (name, a), b in zip(weights.named_parameters(), reference.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=atol), name


def test_prepared_batches_give_the_books_losses_and_gradients(cfg, chapter_batches):
    torch.manual_seed(0)
    packed = GPTModel(cfg)
    model = copy.deepcopy(packed)
    for inputs, targets in chapter_batches[:3]:
        assert_same_loss_and_gradients(model, packed, inputs, targets, cfg["context_length"],
                                       atol=1e-6)


def train_three_steps(cfg, batches, whole=False, precision="fp32", **hook_options):
    """Weights after three steps on `batches` through the chapter script's hooks; `whole`
    computes whole rows as on a GPU, `precision` is the script's --precision.

    Plain SGD applies the gradient as it is: AdamW would divide the near-zero gradients of the
    key biases (attention does not depend on them) by their own size, blowing float rounding
    up to whole steps.
    """
    torch.manual_seed(0)
    model = whole_rows(GPTModel(cfg)) if whole else GPTModel(cfg)
    cpu = torch.device("cpu")
    optimizer = with_precision(torch.optim.SGD(model.parameters(), lr=0.5),
                                           precision, cpu)
    if precision == "fp16":
        hook_options.update(loss_scaler=optimizer)
    with ChapterTraining(1, "cpu", ctx=precision_context(cpu, precision),
                         **hook_options) as hooks:
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


def test_whole_rows_train_to_the_packed_rows_weights(cfg, chapter_batches):
    with mock.patch("previous_chapters.generate_and_print_sample"):
        expected = train_three_steps(cfg, chapter_batches[:3])
        got = train_three_steps(cfg, chapter_batches[:3], whole=True)
    for name, tensor in expected.items():
        assert torch.allclose(got[name], tensor, atol=1e-6), name


def test_fp16_trains_close_to_fp32_with_its_gradients_unscaled_before_clipping(
        cfg, chapter_batches):
    clipped = LearningRateSchedule(peak_lr=0.5, total_steps=3, grad_clip=0.5)
    with mock.patch("previous_chapters.generate_and_print_sample"):
        start = GPTModel(cfg).state_dict()
        expected = train_three_steps(cfg, chapter_batches[:3], schedule=clipped)
        got = train_three_steps(cfg, chapter_batches[:3], precision="fp16", schedule=clipped)
    moved = (expected["out_head.weight"] - start["out_head.weight"]).abs().max()
    difference = (got["out_head.weight"] - expected["out_head.weight"]).abs().max()
    assert moved > 1e-3 and difference < moved / 20  # scaled gradients would barely move
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype  # the weights stay float32
        assert torch.allclose(got[name], tensor, atol=5e-3), name


def test_bf16_losses_stay_close_to_fp32_and_the_weights_stay_fp32(cfg, chapter_batches):
    torch.manual_seed(0)
    model = GPTModel(cfg)
    inputs, targets = chapter_batches[0]
    fp32 = calc_loss_batch(inputs, targets, model, "cpu")
    with precision_context(torch.device("cpu"), "bf16"):
        bf16 = calc_loss_batch(inputs, targets, model, "cpu")
    assert bf16.dtype == torch.float32
    assert bf16.item() == pytest.approx(fp32.item(), rel=0.02)
    assert bf16.item() != fp32.item()  # it did compute in bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with precision_context(torch.device("cpu"), "fp32"):
        assert calc_loss_batch(inputs, targets, model, "cpu").item() == fp32.item()


def test_compiled_steps_make_one_graph_without_breaks_and_the_eager_numbers(cfg,
                                                                            chapter_batches):
    torch.manual_seed(0)
    model = GPTModel(cfg)
    reference = copy.deepcopy(model)
    graphs = []

    def counting_backend(graph_module, example_inputs):
        """A torch.compile backend that runs each graph it gets as it is, counting them: a
        graph break or a recompile would hand it a second one."""
        graphs.append(graph_module)
        return graph_module.forward

    with mock.patch("torch.compile", partial(torch.compile, backend=counting_backend)):
        compiled = compiled_for_training(model, torch.device("cpu"))
    lengths, counts = set(), set()
    for inputs, targets in chapter_batches[:4]:
        assert_same_loss_and_gradients(compiled, reference, inputs, targets,
                                       cfg["context_length"], atol=1e-5)
        lengths.add(pad_to_multiple(inputs, 16, cfg["context_length"]).shape[1])
        counts.add(int((targets != IGNORE_INDEX).sum()))
    assert len(lengths) == 2 and len(counts) == 4  # shapes that differ, one graph for all
    assert len(graphs) == 1
    assert type(model) is GPTModel and set(model.state_dict()) == set(reference.state_dict())


def test_without_compile_the_training_model_is_the_model(cfg):
    model = GPTModel(cfg)
    assert training_model(model, False, torch.device("cpu")) is model


def gpt2_medium_on(device):
    """Stands in for GPT-2 355M on `device`: the sizes the generation batch is computed from."""
    weight = SimpleNamespace(device=device, dtype=torch.float32)
    return SimpleNamespace(
        pos_emb=SimpleNamespace(weight=weight, num_embeddings=1024),
        tok_emb=SimpleNamespace(embedding_dim=1024, num_embeddings=50257, weight=weight),
        trf_blocks=[None] * 24)


def test_generation_batch_size_follows_the_device_and_the_cache_dtype():
    sized = partial(default_gen_batch_size, max_new_tokens=256)
    assert sized(gpt2_medium_on(torch.device("cpu")), [100] * 110) == 8
    cuda = gpt2_medium_on(torch.device("cuda"))
    logits = 2 * 50257 * 4
    # 4 GiB of keys and values: 24 layers x 356 positions x 1024 x 2 (keys, values) x 4 bytes
    assert sized(cuda, [100] * 110) == 4 * 2**30 // (2 * 24 * 356 * 1024 * 4 + logits) == 61
    with mock.patch("torch.is_autocast_enabled", return_value=True), \
            mock.patch("torch.get_autocast_dtype", return_value=torch.bfloat16):
        assert sized(cuda, [100] * 110) == 110  # 2 bytes a number: the whole test set
        assert sized(cuda, [100] * 300) == 4 * 2**30 // (2 * 24 * 356 * 1024 * 2 + logits)


def test_bf16_is_refused_on_a_gpu_without_bfloat16_units():
    with mock.patch("torch.cuda.is_bf16_supported", return_value=False), \
            mock.patch("torch.cuda.get_device_name", return_value="Tesla T4"), \
            pytest.raises(DataError) as error:
        check_precision("bf16", False, torch.device("cuda"))
    assert str(error.value) == ("--precision bf16: Tesla T4 has no bfloat16 units (they came "
                                "with Ampere GPUs); use --precision fp16")


def test_compile_is_refused_where_it_cannot_run():
    with mock.patch.object(sys, "platform", "win32"), pytest.raises(DataError) as error:
        check_precision("fp32", True, torch.device("cpu"))
    assert str(error.value).startswith("--compile: torch.compile does not run on Windows")
    with mock.patch("importlib.util.find_spec", return_value=None), \
            pytest.raises(DataError) as error:
        check_precision("fp32", True, torch.device("cuda"))
    assert str(error.value) == ("--compile: torch.compile needs Triton on a GPU and it is not "
                                "installed; pip install triton, or leave --compile out")


def test_bf16_on_a_cpu_without_bfloat16_warns_once(capsys):
    with mock.patch.object(kit_device, "cpu_has_bf16", return_value=False):
        check_precision("bf16", False, torch.device("cpu"))
    assert capsys.readouterr().out == ("Warning: this CPU has no bfloat16 instructions; "
                                       "--precision bf16 will be slower than fp32 here\n")
    with mock.patch.object(kit_device, "cpu_has_bf16", return_value=True):
        check_precision("bf16", False, torch.device("cpu"))
    assert capsys.readouterr().out == ""


def test_cudnn_attention_is_left_out_on_cuda_only():
    with mock.patch("torch.backends.cuda.enable_cudnn_sdp") as enable:
        choose_attention_kernels(torch.device("cpu"))
        assert enable.call_count == 0
        choose_attention_kernels(torch.device("cuda"))
    enable.assert_called_once_with(False)


def watched(records, skips_nonfinite):
    """A FiniteWatch holding `records` (loss, gradient norm) for steps 0, 1, ...; checked."""
    watch = FiniteWatch("cpu", skips_nonfinite=skips_nonfinite)
    for step, (loss, norm) in enumerate(records):
        watch.loss, watch.counted, watch.norm = torch.tensor(loss), 8, torch.tensor(norm)
        watch.record(step, None)
    watch.check()
    return watch


def test_steps_that_fp16_skipped_are_not_divergences_unless_they_go_on():
    inf = float("inf")
    watch = watched([(2.0, 1.0), (2.0, inf), (inf, inf), (2.0, 1.0)], skips_nonfinite=True)
    assert watch.skipped_in_a_row == 0
    watched([(2.0, inf)] * FiniteWatch.MAX_SKIPPED_STEPS, skips_nonfinite=True)
    with pytest.raises(TrainingDiverged) as error:
        watched([(2.0, inf)] * (FiniteWatch.MAX_SKIPPED_STEPS + 1), skips_nonfinite=True)
    assert str(error.value) == ("step 16: it is the 17th step in a row whose gradients are not "
                                "finite numbers even at fp16's lowest scales; use --precision "
                                "bf16 or fp32")
    with pytest.raises(TrainingDiverged, match="step 1: the gradient norm is inf"):
        watched([(2.0, 1.0), (2.0, inf)], skips_nonfinite=False)


def test_evaluation_frees_the_gradients_and_runs_the_eager_model(cfg, chapter_batches):
    torch.manual_seed(0)
    model = GPTModel(cfg)
    calc_loss_batch(*chapter_batches[0], model, "cpu").backward()
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    hooks = ChapterTraining(1, "cpu")
    with mock.patch("previous_chapters.evaluate_model", return_value=(1.0, 2.0)) as evaluate:
        assert hooks.evaluate(torch.compile(model), [], [], "cpu", 5) == (1.0, 2.0)
    assert evaluate.call_args.args[0] is model
    assert all(p.grad is None for p in model.parameters())
    hooks.watch.note_loss(torch.tensor(3.0), 8)
    hooks.watch.record(0, model)
    assert torch.equal(hooks.watch.records[0][2], norm)  # the norm before they were freed
