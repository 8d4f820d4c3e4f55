"""Resuming with new optimizer settings (optim.reapply_settings): the run's settings replace the
restored ones, and the learning rate a schedule gives is the one a run started with the new rate has."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

from lightning_diffusion.optim import EDM2LRScheduler, group_settings, reapply_settings

EDM2 = functools.partial(EDM2LRScheduler, batch_size=4, ref_images=40, rampup_images=16)
HALVING = functools.partial(LambdaLR, lr_lambda=lambda step: 0.5 ** step)


def _trained(lr: float, schedule=None, steps: int = 5, **adam):
    """An Adam (+ schedule) after ``steps`` steps on one parameter."""
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.Adam([param], lr=lr, **adam)
    scheduler = schedule(optimizer) if schedule else None
    for _ in range(steps):
        param.sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        if scheduler:
            scheduler.step()
    return optimizer, scheduler


def _resumed(lr: float, checkpoint_lr: float, schedule=None, **adam):
    """An optimizer built with ``lr`` (and ``adam``), restored from one trained at ``checkpoint_lr``, settings re-applied."""
    saved, saved_scheduler = _trained(checkpoint_lr, schedule)
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.ones(3))], lr=lr, **adam)
    settings = group_settings(optimizer)  # as the module records them: before a scheduler touches lr
    scheduler = schedule(optimizer) if schedule else None
    optimizer.load_state_dict(saved.state_dict())
    if scheduler:
        scheduler.load_state_dict(saved_scheduler.state_dict())
    return optimizer, scheduler, reapply_settings(optimizer, settings, [scheduler] if scheduler else [])


@pytest.mark.parametrize("schedule", [None, EDM2, HALVING], ids=["constant", "edm2", "lambda"])
def test_a_new_learning_rate_gives_the_rate_a_run_started_with_it_has(schedule):
    optimizer, scheduler, notes = _resumed(1e-4, 2e-3, schedule)
    assert notes == ["lr 0.002 -> 0.0001 (base rate; the current rate follows)"]
    started_with_new, new_scheduler = _trained(1e-4, schedule)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(started_with_new.param_groups[0]["lr"], rel=1e-12)
    if scheduler:
        scheduler.step()
        new_scheduler.step()
        assert scheduler.get_last_lr() == pytest.approx(new_scheduler.get_last_lr(), rel=1e-12)


def test_unchanged_settings_change_nothing():
    optimizer, scheduler, notes = _resumed(2e-3, 2e-3, EDM2)
    reference, _ = _trained(2e-3, EDM2)
    assert notes == [] and optimizer.param_groups[0]["lr"] == reference.param_groups[0]["lr"]


def test_other_numeric_settings_are_replaced_and_flags_are_kept():
    optimizer, _, notes = _resumed(2e-3, 2e-3, betas=(0.9, 0.99), weight_decay=0.01, amsgrad=True)
    group = optimizer.param_groups[0]
    assert group["betas"] == (0.9, 0.99) and group["weight_decay"] == 0.01
    assert group["amsgrad"] is False  # the restored state has no max_exp_avg_sq: the flag stays the checkpoint's
    assert notes == ["betas (0.9, 0.999) -> [0.9, 0.99]", "weight_decay 0 -> 0.01"]


def test_a_plateau_scheduler_keeps_the_checkpoints_rate_and_says_so():
    optimizer, _ = _trained(2e-3)
    settings = group_settings(torch.optim.Adam([torch.nn.Parameter(torch.ones(3))], lr=1e-4))
    notes = reapply_settings(optimizer, settings, [ReduceLROnPlateau(optimizer)])
    assert optimizer.param_groups[0]["lr"] == 2e-3
    assert notes == ["lr stays 0.002 (the checkpoint's): ReduceLROnPlateau owns the rate, 0.0001 is not applied"]
