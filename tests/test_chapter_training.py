"""kit/chapter_training.py around the book's loop: printed progress, returned curves, Ctrl-C
and exact resumption, the plot."""

import copy
import re
import signal

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from appendix_d import LearningRateSchedule
from kit.chapter_training import ChapterTraining
from kit.files import atomic_write
from previous_chapters import GPTModel, plot_losses, train_model_simple


def make_run(cfg, seed=123):
    """A model, optimizer and loaders; the seed decides init, shuffling and dropout."""
    torch.manual_seed(seed)
    data = torch.randint(0, 50257, (12, 9), generator=torch.Generator().manual_seed(0))
    inputs, targets = data[:, :-1], data[:, 1:]
    train_loader = DataLoader(TensorDataset(inputs[:8], targets[:8]), batch_size=2,
                              shuffle=True, drop_last=True)
    val_loader = DataLoader(TensorDataset(inputs[8:], targets[8:]), batch_size=2)
    model = GPTModel(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.1)
    return model, optimizer, train_loader, val_loader


def train(model, optimizer, train_loader, val_loader, tokenizer, hooks=None):
    return train_model_simple(model, train_loader, val_loader, optimizer, "cpu", num_epochs=2,
                              eval_freq=3, eval_iter=1, start_context="Hello",
                              tokenizer=tokenizer, hooks=hooks)


def resumable_train(model, optimizer, train_loader, val_loader, tokenizer, save_checkpoint=None,
                    resume_progress=None, schedule=None):
    """`train` with the chapter script's hooks: checkpoints, Ctrl-C, resuming, and Appendix
    D's `schedule` when given."""
    with ChapterTraining(2, "cpu", save_checkpoint, resume_progress,
                         schedule=schedule) as hooks:
        return train(model, optimizer, train_loader, val_loader, tokenizer, hooks)


# 8 steps: 3 of warmup, then cosine decay with clipping, all of it resumed mid-way
COSINE = LearningRateSchedule(peak_lr=5e-3, total_steps=8, warmup_steps=3, initial_lr=1e-4,
                              kind="cosine", grad_clip=0.5)


def test_training_prints_progress_and_returns_curves(tiny_cfg, tokenizer, capsys):
    model, optimizer, train_loader, val_loader = make_run(tiny_cfg)
    before = copy.deepcopy(model.state_dict())
    train_losses, val_losses, tokens_seen = train(model, optimizer, train_loader, val_loader,
                                                  tokenizer)
    lines = capsys.readouterr().out.splitlines()
    progress = [line for line in lines if line.startswith("Ep ")]
    # 4 steps per epoch, 8 steps, evaluated at steps 0, 3 and 6
    assert [re.sub(r"\d+\.\d{3}", "x", line) for line in progress] == [
        "Ep 1 (Step 000000): Train loss x, Val loss x",
        "Ep 1 (Step 000003): Train loss x, Val loss x",
        "Ep 2 (Step 000006): Train loss x, Val loss x",
    ]
    assert len(train_losses) == len(val_losses) == 3
    assert tokens_seen == [16, 64, 112]  # 2 x 8 tokens per step
    assert f"{train_losses[1]:.3f}" in progress[1]
    samples = [line for line in lines if line.startswith("Hello")]
    assert len(samples) == 2  # one greedy sample after each epoch
    assert train_losses[-1] < train_losses[0]
    assert not torch.equal(before["out_head.weight"], model.state_dict()["out_head.weight"])


@pytest.mark.parametrize("schedule", [None, COSINE], ids=["chapter", "appendix D"])
@pytest.mark.parametrize("stop_at_step", [3, 4])  # mid-epoch, and the last step of epoch 1
def test_ctrl_c_then_resume_ends_with_the_same_weights(tiny_cfg, tokenizer, stop_at_step,
                                                       schedule):
    cfg = {**tiny_cfg, "drop_rate": 0.1}  # dropout makes the random state matter mid-epoch
    model, optimizer, train_loader, val_loader = make_run(cfg)
    if schedule is None:
        reference = train(model, optimizer, train_loader, val_loader, tokenizer)
    else:
        reference = resumable_train(model, optimizer, train_loader, val_loader, tokenizer,
                                    schedule=schedule)
    reference_weights = model.state_dict()

    model, optimizer, train_loader, val_loader = make_run(cfg)
    saved = {}
    real_step = optimizer.step
    calls = {"n": 0}

    def step_then_ctrl_c(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == stop_at_step:
            signal.raise_signal(signal.SIGINT)  # as if the user pressed Ctrl-C mid-step
        return real_step(*args, **kwargs)

    def save_checkpoint(state):
        saved.update(state=copy.deepcopy(state), model=copy.deepcopy(model.state_dict()),
                     optimizer=copy.deepcopy(optimizer.state_dict()))

    optimizer.step = step_then_ctrl_c
    with pytest.raises(KeyboardInterrupt):
        resumable_train(model, optimizer, train_loader, val_loader, tokenizer,
                        save_checkpoint=save_checkpoint, schedule=schedule)
    assert saved["state"].global_step == stop_at_step - 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    model, optimizer, train_loader, val_loader = make_run(cfg, seed=999)  # a new process
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    resumed = resumable_train(model, optimizer, train_loader, val_loader, tokenizer,
                              resume_progress=saved["state"], schedule=schedule)

    assert resumed == reference
    if schedule is not None:  # the rate of the last step: the end of the cosine
        assert optimizer.param_groups[0]["lr"] == schedule.lr_at(7) < schedule.lr_at(3)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference_weights[name]), name


def test_epoch_end_checkpoints_resume_exactly(tiny_cfg, tokenizer):
    cfg = {**tiny_cfg, "drop_rate": 0.1}
    model, optimizer, train_loader, val_loader = make_run(cfg)
    reference = train(model, optimizer, train_loader, val_loader, tokenizer)
    reference_weights = model.state_dict()

    model, optimizer, train_loader, val_loader = make_run(cfg)
    checkpoints = []
    resumable_train(model, optimizer, train_loader, val_loader, tokenizer,
                    save_checkpoint=lambda state: checkpoints.append(
              (copy.deepcopy(state), copy.deepcopy(model.state_dict()),
               copy.deepcopy(optimizer.state_dict()))))
    assert [c[0].epoch for c in checkpoints] == [1, 2]

    state, model_state, optimizer_state = checkpoints[0]  # killed after epoch 1
    model, optimizer, train_loader, val_loader = make_run(cfg, seed=5)
    model.load_state_dict(model_state)
    optimizer.load_state_dict(optimizer_state)
    assert resumable_train(model, optimizer, train_loader, val_loader, tokenizer,
                           resume_progress=state) == reference
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference_weights[name]), name


def test_plot_losses_writes_the_file(tmp_path, capsys):
    path = tmp_path / "plots" / "loss.pdf"
    fig = plot_losses(torch.linspace(0, 2, 3), [10, 20, 30], [3.0, 2.0, 1.0], [3.1, 2.2, 1.5],
                      save_path=str(path))
    assert path.read_bytes().startswith(b"%PDF")
    assert capsys.readouterr().out == f"Plot saved as {path}\n"
    assert [ax.get_xlabel() for ax in fig.axes] == ["Epochs", "Tokens seen"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["loss.pdf"]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(str(path), "w") as f:
        f.write("half")
        raise RuntimeError("crash while writing")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
    with atomic_write(str(path), "w") as f:
        f.write("new")
    assert path.read_text() == "new"
