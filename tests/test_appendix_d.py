"""Appendix D's learning-rate schedule and clipping, step by step (the whole run is compared
with the book's `train_model` in test_book_reference.py)."""

import math

import pytest
import torch

from appendix_d import LearningRateSchedule


def test_without_options_the_rate_is_the_chapters_constant_one_and_nothing_is_clipped():
    schedule = LearningRateSchedule(peak_lr=5e-5, total_steps=10)
    assert [schedule.lr_at(step) for step in range(10)] == [5e-5] * 10
    assert not any(schedule.clips_at(step) for step in range(10))


@pytest.mark.parametrize("kind", ["constant", "cosine"])
def test_warmup_rises_linearly_from_the_initial_rate_to_the_peak(kind):
    schedule = LearningRateSchedule(peak_lr=1e-3, total_steps=10, warmup_steps=4,
                                    initial_lr=1e-5, kind=kind)
    step_size = (1e-3 - 1e-5) / 4
    assert [schedule.lr_at(step) for step in range(4)] == [1e-5 + i * step_size
                                                          for i in range(4)]
    assert schedule.lr_at(4) == 1e-3  # the first step after the warmup: the peak


def test_cosine_decays_to_the_minimum_at_the_last_step():
    schedule = LearningRateSchedule(peak_lr=1e-3, total_steps=10, warmup_steps=4,
                                    min_lr=1e-6, kind="cosine")
    rates = [schedule.lr_at(step) for step in range(4, 10)]
    assert rates == sorted(rates, reverse=True) and rates[0] == 1e-3
    half_way = 1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi * 3 / 6))
    assert schedule.lr_at(7) == pytest.approx(half_way, rel=1e-12)
    assert schedule.lr_at(10) == pytest.approx(1e-6, rel=1e-12)  # one past the last step
    constant = LearningRateSchedule(peak_lr=1e-3, total_steps=10, warmup_steps=4)
    assert [constant.lr_at(step) for step in range(4, 10)] == [1e-3] * 6


def large_gradients(seed=0):
    """A small linear layer whose gradients have a total norm far above 1."""
    torch.manual_seed(seed)
    layer = torch.nn.Linear(4, 3)
    (layer(torch.randn(5, 4)) * 100).sum().backward()
    return layer


def total_norm(model):
    return float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))


def test_apply_sets_the_rate_and_clips_from_the_end_of_the_warmup_on():
    schedule = LearningRateSchedule(peak_lr=1e-3, total_steps=6, warmup_steps=2,
                                    kind="cosine", grad_clip=0.5)
    assert [schedule.clips_at(step) for step in range(6)] == [False, False] + [True] * 4
    for step in range(6):
        layer = large_gradients()
        before = total_norm(layer)
        optimizer = torch.optim.AdamW(layer.parameters(), lr=1.0)
        assert schedule.apply(step, layer, optimizer) == schedule.lr_at(step)
        assert optimizer.param_groups[0]["lr"] == schedule.lr_at(step)
        expected = 0.5 if step >= 2 else before
        assert total_norm(layer) == pytest.approx(expected, rel=1e-5), step
    assert before > 100


def test_describe_records_every_setting():
    schedule = LearningRateSchedule(peak_lr=1e-4, total_steps=232, warmup_steps=20,
                                    initial_lr=1e-5, min_lr=1e-7, kind="cosine", grad_clip=1.0)
    assert schedule.describe() == {
        "lr_schedule": "cosine", "peak_lr": 1e-4, "warmup_steps": 20, "initial_lr": 1e-5,
        "min_lr": 1e-7, "total_steps": 232, "grad_clip": 1.0}
