"""The device choice, the precisions (tf32, fp16 with its gradient scaler) and the unwrapping of
the training model: run here on the CPU, with the GPU's answers mocked where one is needed."""

from unittest import mock

import pytest
import torch

from kit import device as kit_device
from kit.device import (
    ScaledOptimizer,
    check_precision,
    eager_model,
    pick_device,
    precision_context,
    torch_version,
    with_precision,
)
from kit.files import DataError


@pytest.fixture
def apple_machine():
    """A machine with Apple's GPU and no CUDA."""
    with mock.patch("torch.cuda.is_available", return_value=False), \
            mock.patch("torch.backends.mps.is_available", return_value=True):
        yield


def test_auto_picks_mps_from_torch_2_9_on(apple_machine, capsys):
    with mock.patch.object(kit_device, "torch_version", return_value=(2, 9)):
        assert pick_device("auto") == torch.device("mps")
    assert capsys.readouterr().out == ""


def test_auto_skips_mps_on_an_older_torch_and_says_so(apple_machine, capsys):
    with mock.patch.object(kit_device, "torch_version", return_value=(2, 8)), \
            mock.patch.object(torch, "__version__", "2.8.0"):
        assert pick_device("auto") == torch.device("cpu")
    assert capsys.readouterr().out == (
        "Note: running on the CPU, not Apple's GPU: torch 2.8.0 computes wrong losses on MPS "
        "(fixed in 2.9); upgrade torch, or pass --device mps to use it anyway\n")


def test_mps_asked_for_on_an_older_torch_runs_with_a_warning(apple_machine, capsys):
    with mock.patch.object(kit_device, "torch_version", return_value=(2, 8)), \
            mock.patch.object(torch, "__version__", "2.8.0"):
        assert pick_device("mps") == torch.device("mps")
    assert capsys.readouterr().out == ("Warning: torch 2.8.0 computes wrong losses on MPS "
                                       "(fixed in 2.9); upgrade torch, or use --device cpu\n")


def test_torch_version_reads_major_and_minor():
    with mock.patch.object(torch, "__version__", "2.10.1+cu128"):
        assert torch_version() == (2, 10)


def test_tf32_is_refused_off_nvidia_gpus_and_before_ampere():
    with pytest.raises(DataError) as error:
        check_precision("tf32", False, torch.device("cpu"))
    assert str(error.value) == ("--precision tf32: TF32 is a mode of NVIDIA GPUs (Ampere and "
                                "newer), not of cpu; use --precision fp32")
    with mock.patch("torch.cuda.get_device_capability", return_value=(7, 5)), \
            mock.patch("torch.cuda.get_device_name", return_value="Tesla T4"), \
            pytest.raises(DataError) as error:
        check_precision("tf32", False, torch.device("cuda"))
    assert str(error.value) == ("--precision tf32: Tesla T4 has no TF32 units (they came with "
                                "Ampere GPUs); use --precision fp32 or fp16")
    with mock.patch("torch.cuda.get_device_capability", return_value=(8, 0)):
        check_precision("tf32", False, torch.device("cuda"))


def test_tf32_switches_the_float32_matmuls_and_fp32_leaves_them_exact():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        precision_context(torch.device("cuda"), "fp32")
        assert not torch.backends.cuda.matmul.allow_tf32
        context = precision_context(torch.device("cuda"), "tf32")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert not isinstance(context, torch.autocast)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_fp16_on_a_cpu_warns_that_it_is_for_gpus(capsys):
    check_precision("fp16", False, torch.device("cpu"))
    assert capsys.readouterr().out == ("Warning: --precision fp16 is for GPUs without bfloat16 "
                                       "(T4, V100); on a CPU it is slower than fp32\n")


def test_fp16_computes_in_float16_under_autocast():
    layer = torch.nn.Linear(4, 4)
    with precision_context(torch.device("cpu"), "fp16"):
        assert layer(torch.ones(1, 4)).dtype == torch.float16
    assert layer.weight.dtype == torch.float32


def scaled_sgd(weight):
    """A ScaledOptimizer over plain SGD (lr 0.5) of `weight`, on the CPU."""
    return with_precision(torch.optim.SGD([weight], lr=0.5), "fp16", torch.device("cpu"))


def test_fp16_steps_apply_unscaled_gradients_and_skip_infinite_ones():
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = scaled_sgd(weight)
    assert isinstance(optimizer, ScaledOptimizer)
    assert with_precision(optimizer.optimizer, "bf16", "cpu") is optimizer.optimizer
    scale = optimizer.scaler.get_scale()
    optimizer.scale((weight * torch.tensor([1.0, 2.0, 3.0])).sum()).backward()
    assert weight.grad.tolist() == [scale, 2 * scale, 3 * scale]
    optimizer.unscale()  # before clipping: the gradients as computed
    assert weight.grad.tolist() == [1.0, 2.0, 3.0]
    optimizer.step()
    assert weight.tolist() == [0.5, 0.0, -0.5]
    optimizer.zero_grad()
    optimizer.scale(weight.sum() * torch.tensor(float("inf"))).backward()
    optimizer.unscale()
    optimizer.step()  # skipped: the weights stay, the scale halves
    assert weight.tolist() == [0.5, 0.0, -0.5]
    assert optimizer.scaler.get_scale() == scale / 2


def test_fp16_optimizer_state_holds_the_scale_for_resuming():
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = scaled_sgd(weight)
    optimizer.scale(weight.sum() * torch.tensor(float("inf"))).backward()
    optimizer.step()
    state = optimizer.state_dict()
    assert state["grad_scaler"]["scale"] == 2.0**15
    resumed = scaled_sgd(torch.nn.Parameter(torch.ones(2)))
    resumed.load_state_dict(state)
    assert resumed.scaler.get_scale() == 2.0**15
    assert resumed.param_groups[0]["lr"] == 0.5
    with pytest.raises(KeyError):  # a checkpoint of a run without fp16
        resumed.load_state_dict(optimizer.optimizer.state_dict())


def test_eager_model_unwraps_compile_and_torchrun_wrappers():
    model = torch.nn.Linear(2, 2)
    assert eager_model(model) is model
    assert eager_model(torch.compile(model)) is model
    assert eager_model(mock.Mock(module=torch.compile(model))) is model
