"""train.budget_s: the planner (pure: costs -> plan, re-plan on drift), the schedule's progress along a plan, the
state a checkpoint keeps; the end-to-end test runs `cnnpipe train --budget-s` and checks the wall time."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from torch import nn
from hypothesis import given, settings
from hypothesis import strategies as st

from cnnpipe.config import AugmentConfig, TrainConfig
from cnnpipe.cores import available_cores
from cnnpipe.engine.budget import (MEASURE_SHARE, MEASURE_STEPS, PLAN_SHARE, SHARED_CORES, WARMUP_STEPS, BudgetKeeper,
                                   BudgetState, Costs, NarrowerNet, Plan, Position, Progress, _low_res_epochs,
                                   core_waits, floored_epochs, plan_budget, remaining_cost, replan, validated,
                                   validations)
from cnnpipe.engine.distributed import Dist
from cnnpipe.engine.checkpoint import load_model
from cnnpipe.engine.loop import fit
from cnnpipe.engine.model_folder import CONFIG_FILE, MODEL_FILE, read_history
from cnnpipe.models import build_model
from tests.formats import gtsrb_zip
from tests.helpers import REPO, cnnpipe, user_env, write_tiny_dataset
from tests.test_engine import tiny_data

FLAT = Costs(step_s=0.1, low_res_step_s=0.1, val_s=1.0)


def test_plan_trains_the_most_steps_that_fit_with_a_partial_last_epoch():
    # 97 s usable: n epochs of 100 steps fit 970 - 10 n steps; 9 epochs give 880 (the last one 80 steps)
    plan = plan_budget(remaining_s=100, costs=FLAT, steps_per_epoch=100, max_epochs=50, low_res_share=0)
    assert plan == Plan(epochs=9, last_epoch_steps=80, low_res_epochs=0)
    assert remaining_cost(plan, FLAT, 100, Position()) <= 100 * PLAN_SHARE
    assert plan.total_steps(100) == 880 and plan.steps_in(8, 100) == 100 and plan.steps_in(9, 100) == 80


def test_epochs_are_a_cap_and_a_single_partial_epoch_when_one_does_not_fit():
    assert plan_budget(remaining_s=1e6, costs=FLAT, steps_per_epoch=100, max_epochs=5, low_res_share=0) == Plan(5, 100, 0)
    one = plan_budget(remaining_s=4, costs=FLAT, steps_per_epoch=100, max_epochs=5, low_res_share=0)
    assert one == Plan(1, 28, 0)  # 3.88 s usable: a validation and 28 steps
    spent = plan_budget(remaining_s=0.5, costs=FLAT, steps_per_epoch=100, max_epochs=5, low_res_share=0)
    assert not spent.fits and spent.epochs == 1 and spent.last_epoch_steps == 1


def test_a_new_last_epoch_is_not_shorter_than_its_validation():
    # 9 epochs would leave a 10th of 3 steps (0.3 s) that pays a 5 s validation: the plan stops at 9 instead
    costs = Costs(step_s=0.1, low_res_step_s=0.1, val_s=5.0)
    plan = plan_budget(remaining_s=(9 * 10 + 9 * 5 + 5.3) / PLAN_SHARE, costs=costs, steps_per_epoch=100,
                       max_epochs=50, low_res_share=0)
    assert plan == Plan(9, 100, 0)


def test_whole_short_epochs_fill_the_budget_though_each_costs_less_than_its_validation():
    # a tiny dataset: one step an epoch, cheaper than the validation and checkpoint after it. A whole epoch is
    # always worth its validation (the rule is for partial ones); it once ended a 60 s run after the next epoch.
    costs = Costs(step_s=0.034, low_res_step_s=0.047, val_s=0.004, epoch_overhead_s=0.04)
    at = Position(epoch=263, steps_done=0, low_res_done=1, low_res_over=True)
    plan = plan_budget(remaining_s=46.3, costs=costs, steps_per_epoch=1, max_epochs=100_000, low_res_share=5e-5, at=at)
    assert plan.epochs == 262 + int(46.3 * PLAN_SHARE / 0.078)


def test_budget_spent_between_epochs_ends_after_the_last_one():
    at = Position(epoch=4, steps_done=0, low_res_done=0, low_res_over=True)
    plan = plan_budget(remaining_s=0.2, costs=FLAT, steps_per_epoch=100, max_epochs=10, low_res_share=0, at=at)
    assert plan == Plan(3, 100, 0, fits=False)


def test_low_res_phase_keeps_its_share_and_leaves_the_last_epoch_at_full_size():
    costs = Costs(step_s=1.0, low_res_step_s=0.7, val_s=5.0)
    # the fast recipe's shape: 3 of 5 epochs at low resolution when all 5 fit
    assert plan_budget(remaining_s=1e6, costs=costs, steps_per_epoch=10, max_epochs=5, low_res_share=0.6) == Plan(5, 10, 3)
    for budget in (20, 40, 60, 80):
        plan = plan_budget(remaining_s=budget, costs=costs, steps_per_epoch=10, max_epochs=5, low_res_share=0.6)
        assert plan.low_res_epochs == min(round(0.6 * plan.epochs), plan.epochs - 1)
        assert remaining_cost(plan, costs, 10, Position()) <= budget * PLAN_SHARE


def test_replan_keeps_the_plan_without_drift_and_changes_it_with_drift():
    at = Position(epoch=3, steps_done=40, low_res_done=0, low_res_over=True)
    plan = plan_budget(remaining_s=60, costs=FLAT, steps_per_epoch=100, max_epochs=50, low_res_share=0, at=at)
    kwargs = dict(remaining_s=60, steps_per_epoch=100, max_epochs=50, low_res_share=0, at=at)
    assert replan(plan, costs=FLAT, **kwargs) is plan
    slower = Costs(step_s=0.13, low_res_step_s=0.13, val_s=1.0)  # a neighbour took a core
    fewer = replan(plan, costs=slower, **kwargs)
    assert fewer.total_steps(100) < plan.total_steps(100) and remaining_cost(fewer, slower, 100, at) <= 60
    faster = Costs(step_s=0.07, low_res_step_s=0.07, val_s=1.0)
    more = replan(plan, costs=faster, **kwargs)
    assert more.total_steps(100) > plan.total_steps(100) and remaining_cost(more, faster, 100, at) <= 60
    capped = Plan(4, 100, 0)  # already at train.epochs: time to spare changes nothing
    assert replan(capped, costs=faster, remaining_s=600, steps_per_epoch=100, max_epochs=4, low_res_share=0,
                  at=at) is capped


def test_replan_never_undoes_low_res_epochs_already_trained():
    costs = Costs(step_s=1.0, low_res_step_s=0.5, val_s=1.0)
    in_phase = Position(epoch=3, steps_done=5, low_res_done=3, low_res_over=False)
    plan = plan_budget(remaining_s=10, costs=costs, steps_per_epoch=10, max_epochs=10, low_res_share=0.5, at=in_phase)
    assert plan.low_res_epochs >= 3 and plan.epochs >= 3
    over = Position(epoch=3, steps_done=5, low_res_done=2, low_res_over=True)
    plan = plan_budget(remaining_s=500, costs=costs, steps_per_epoch=10, max_epochs=10, low_res_share=0.5, at=over)
    assert plan == Plan(10, 10, 2)


@settings(max_examples=200, deadline=None)
@given(remaining=st.floats(0.01, 5000), step=st.floats(1e-3, 2), low=st.floats(0.3, 1.0), val=st.floats(0, 30),
       per=st.integers(1, 400), cap=st.integers(1, 40), share=st.sampled_from([0, 0.25, 0.6, 1.0]),
       epoch=st.integers(1, 5), done=st.integers(0, 400), every=st.integers(0, 4))
def test_a_plan_that_fits_fits_and_could_not_take_one_more_step(remaining, step, low, val, per, cap, share, epoch, done,
                                                                every):
    costs = Costs(step_s=step, low_res_step_s=step * low, val_s=val)
    at = Position(epoch=epoch, steps_done=min(done, per - 1), low_res_done=0, low_res_over=share == 0)
    plan = plan_budget(remaining_s=remaining, costs=costs, steps_per_epoch=per, max_epochs=cap, low_res_share=share,
                       at=at, val_every=every)
    assert plan.epochs >= (at.epoch if plan.fits or at.steps_done else at.epoch - 1)
    if not plan.fits:
        return
    assert remaining_cost(plan, costs, per, at, every) <= remaining * PLAN_SHARE + 1e-9
    assert plan.epochs <= max(cap, at.epoch) and 1 <= plan.last_epoch_steps <= per
    last_s = costs.low_res_step_s if plan.epochs <= plan.low_res_epochs else costs.step_s
    if plan.epochs > at.epoch and plan.last_epoch_steps < per:  # a new partial epoch: at least its validation's time
        assert plan.last_epoch_steps * last_s >= costs.val_s - 1e-9
    if plan.last_epoch_steps == per and plan.epochs < cap:  # whole: one more whole epoch would not have fitted
        more = Plan(plan.epochs + 1, per, _low_res_epochs(plan.epochs + 1, share, at))
        assert remaining_cost(more, costs, per, at, every) > remaining * PLAN_SHARE - 1e-9
    if plan.last_epoch_steps < per:  # partial: one more step would not have fitted
        bigger = Plan(plan.epochs, plan.last_epoch_steps + 1, plan.low_res_epochs)
        assert remaining_cost(bigger, costs, per, at, every) > remaining * PLAN_SHARE - 1e-9


def test_validations_count_every_nth_epoch_and_the_last():
    for every in range(5):
        for last in range(1, 13):
            assert [e for e in range(1, last + 1) if validated(e, last, every)] == \
                ([last] if every == 0 else sorted({*range(every, last, every), last}))
            for first in range(1, last + 1):
                assert validations(first, last, every) == sum(validated(e, last, every) for e in range(first, last + 1))


def test_a_plan_that_validates_less_often_trains_the_validations_it_skips():
    """10 s passes, 1 s steps, 100 s: every epoch validated, 5 epochs of 10 steps fit (50 s of passes); the last only,
    9 epochs (one 10 s pass)."""
    costs = Costs(step_s=1.0, low_res_step_s=1.0, val_s=10.0)
    usable = 100 / PLAN_SHARE + 1e-6  # 100 s to plan with (the planner fills PLAN_SHARE of what remains)
    every = plan_budget(remaining_s=usable, costs=costs, steps_per_epoch=10, max_epochs=100, low_res_share=0)
    last = plan_budget(remaining_s=usable, costs=costs, steps_per_epoch=10, max_epochs=100, low_res_share=0,
                       val_every=0)
    assert every.total_steps(10) == 50 and last.total_steps(10) == 90
    assert remaining_cost(last, costs, 10, Position(), val_every=0) == pytest.approx(100)
    assert remaining_cost(last, costs, 10, Position(), val_every=1) == pytest.approx(100 + 8 * 10)


def test_progress_is_step_over_total_until_retargeted_then_continuous_to_the_new_end():
    p = Progress(total=100)
    assert [p.at(s) for s in (0, 50, 100)] == [0.0, 0.5, 1.0]
    p.retarget(40, 60)  # re-planned at step 40: 60 steps in all now
    assert p.at(40) == pytest.approx(0.4) and p.at(60) == pytest.approx(1.0)
    p.retarget(50, 200)
    assert p.at(50) == pytest.approx(0.7) and p.at(200) == pytest.approx(1.0) and p.at(125) == pytest.approx(0.85)


def test_budget_state_round_trips_through_a_checkpoint_dict():
    state = BudgetState(60.0, Plan(5, 100, 3), Costs(0.1, 0.07, 1.5, 0.2), 12.5, 2, Plan(6, 30, 3), Progress(520, 40, 0.1))
    assert BudgetState.from_dict(copy.deepcopy(state.to_dict())) == state


def test_resume_keeps_the_plan_and_the_clock_of_the_checkpoint():
    cfg = TrainConfig(arch="cnn3", width=8, epochs=2, batch_size=16, lr=0.05, budget_s=60)
    states = []
    torch.manual_seed(0)
    first = fit(build_model("cnn3", 1, 3, 8, 8), tiny_data(), cfg, None,
                checkpoint=lambda s: states.append(copy.deepcopy(s)))
    assert first.budget["planned_epochs"] == 2 and first.budget["fits"]  # a tiny run: the cap
    saved = states[0]["budget"]  # planned after epoch 1 (shorter than the measured steps): its average step
    assert saved["plan"] == {"epochs": 2, "last_epoch_steps": 4, "low_res_epochs": 0, "fits": True}
    assert saved["used_s"] > 0 and saved["schedule"]["total"] == 8 and saved["costs"]["val_s"] > 0
    resumed = fit(build_model("cnn3", 1, 3, 8, 8), tiny_data(), cfg, None, resume=states[0])
    assert [e["epoch"] for e in resumed.history] == [1, 2]
    assert resumed.budget["first_plan_epochs"] == 2 and resumed.budget["actual_s"] >= saved["used_s"]
    # train.val_every 3: epoch 1 validates (the plan, made after it, needs a pass's cost), then 3 and the last; a run
    # resumed after epoch 1 has the checkpoint's cost and validates the same epochs
    every_third = dataclasses.replace(cfg, epochs=4, val_every=3)
    states.clear()
    torch.manual_seed(0)
    first = fit(build_model("cnn3", 1, 3, 8, 8), tiny_data(), every_third, None,
                checkpoint=lambda s: states.append(copy.deepcopy(s)))
    resumed = fit(build_model("cnn3", 1, 3, 8, 8), tiny_data(), every_third, None, resume=states[0])
    for run in (first, resumed):
        assert [e["epoch"] for e in run.history if "val/accuracy" in e] == [1, 3, 4]
        assert run.budget["validations"] == 3  # the resumed run's count goes on from its checkpoint's
    assert resumed.budget["training_s"] > states[0]["budget"]["training_s"] > 0


def test_the_clock_starts_once_the_run_is_set_up(monkeypatch):
    """Set-up is not training: a process's first optimizer (or DistributedDataParallel) imports torch's compiler
    stack, 3 s on an idle 2-core VM and past 5 s beside busy processes, which once took most of a 6 s budget under
    torchrun. Here 1.5 s more set-up stays off the clock."""
    from cnnpipe.engine import loop

    fit(build_model("cnn3", 1, 3, 8, 8), tiny_data(), TrainConfig(arch="cnn3", width=8, epochs=1), None)  # the
    # process's first steps cost ~1.5 s of set-up: not this test's subject
    real_make_optimizer = loop.make_optimizer

    def slow_optimizer(*args, **kwargs):
        time.sleep(1.5)
        return real_make_optimizer(*args, **kwargs)

    monkeypatch.setattr(loop, "make_optimizer", slow_optimizer)
    cfg = TrainConfig(arch="cnn3", width=8, epochs=10_000, batch_size=1, lr=0.05, budget_s=2)
    start = time.perf_counter()
    result = fit(build_model("cnn3", 1, 3, 8, 8), tiny_data(), cfg, None)
    assert result.budget["actual_s"] <= 2 * 1.05, result.budget
    # the set-up, before the clock; actual_s is recorded in hundredths (CI once measured 1.4998 s: 2.01 rounded up)
    assert time.perf_counter() - start - result.budget["actual_s"] >= 1.5 - 0.005


def test_a_first_plan_of_fewer_than_the_min_epochs_asks_for_a_narrower_net():
    """20 one-image steps an epoch: the first plan comes in epoch 1 (after the warm-up and timed steps); a second
    of budget fits far fewer than 10,000 epochs. Only the caller that can build a narrower net is asked to."""
    cfg = TrainConfig(arch="cnn3", width=8, epochs=10_000, batch_size=1, lr=0.05, budget_s=1, budget_min_epochs=10_000)
    before = time.perf_counter()
    with pytest.raises(NarrowerNet) as raised:
        fit(build_model("cnn3", 1, 3, 8, 8), tiny_data(), cfg, None, can_narrow=True)
    assert 0 < raised.value.epochs < 10_000
    assert before < raised.value.started < time.perf_counter()  # the clock the narrower net goes on with
    result = fit(build_model("cnn3", 1, 3, 8, 8), tiny_data(), cfg, None)
    assert 1 <= result.budget["planned_epochs"] < 10_000 and result.budget["actual_s"] <= 1.05


@pytest.mark.parametrize(("epochs", "said"), [(2.996, "2.99"), (2.3, "2.30"), (2.5, "2.50"), (0.004, "0.00"), (12.0, "12.00")])
def test_the_epochs_a_narrowing_names_never_read_as_the_threshold_they_fell_short_of(epochs, said):
    """The narrowing's line names the epochs that fit: a count between 2.95 and 3 read, rounded to tenths, "3.0
    epochs fit ... starting again at width 16" (a 120 s run on the slower AVX2 VM); floored to hundredths it reads
    under 3."""
    assert floored_epochs(epochs) == said
    assert str(NarrowerNet(epochs, 0.0)) == f"{said} epochs fit"


class SlowsDown(nn.Module):
    """A net whose training steps take `sleep_s` more from `after_s` seconds after its first: a neighbour taking
    the cores."""

    def __init__(self, net: nn.Module, after_s: float, sleep_s: float):
        super().__init__()
        self.net, self.after_s, self.sleep_s, self.first = net, after_s, sleep_s, None

    def forward(self, x):
        if self.training:
            self.first = self.first or time.perf_counter()
            time.sleep(0.001 if time.perf_counter() - self.first < self.after_s else self.sleep_s)
        return self.net(x)


def test_steps_that_turn_twenty_times_slower_near_the_end_still_end_within_the_budget():
    """Planned at ~3 ms steps (epochs of 3,000 one-image steps), each step takes 50 ms more 3 s into a 4 s budget.
    The clock is checked every budget/25 seconds whatever the steps cost, and a rising cost is taken as measured:
    the run ends within 5 % (checked only every 1/25 of the planned steps, with the cost smoothed: 4.3 and 6.6 s)."""
    fit(build_model("cnn3", 1, 3, 8, 8), tiny_data(), TrainConfig(arch="cnn3", width=8, epochs=1), None)  # a
    # process's first steps cost ~1.5 s of set-up: a plan made in them would expect slow steps all along
    cfg = TrainConfig(arch="cnn3", width=8, epochs=10_000, batch_size=1, lr=0.05, budget_s=4)
    torch.manual_seed(0)
    result = fit(SlowsDown(build_model("cnn3", 1, 3, 8, 8), after_s=3.0, sleep_s=0.05), tiny_data(n=1000), cfg, None)
    assert 4 * 0.8 <= result.budget["actual_s"] <= 4 * 1.05, result.budget


@pytest.mark.parametrize("waits", [lambda: {1: 0}, lambda: None], ids=["cores-its-own", "not-said"])
def test_a_net_far_too_slow_is_narrowed_on_its_first_timed_steps(waits):
    """The low-resolution steps alone, all at their cost and with no validation, fit under one epoch where 5
    are asked for: the keeper asks for a narrower net right after timing them, before the full-resolution probe
    and the validation pass would spend more of the budget (where the OS does not say what waited for a core, too)."""
    keeper = BudgetKeeper(BudgetState(10.0), max_epochs=100, low_res_share=0.5, full_over_low_pixels=2.0, dist=Dist(),
                          device=torch.device("cpu"), narrow_below=5, waits=waits)

    def time_val():
        raise AssertionError("a validation pass was timed")

    with pytest.raises(NarrowerNet) as raised:
        for step in range(30):
            keeper.before_step(1, step)
            time.sleep(0.01)
            keeper.after_step(epoch=1, step=step + 1, low_res=True, epoch_low_res=True, steps_per_epoch=1000,
                              time_val=time_val)
    assert step + 1 == 13 and raised.value.epochs < 1  # 3 warm-up steps and 10 timed


def test_a_net_too_slow_at_full_resolution_is_narrowed_before_its_validation_pass_is_timed():
    """Low-resolution steps of 10 ms fit ~19 epochs of 100 in a 20 s budget (their bound alone cannot decide);
    the full-resolution probe's 80 ms steps, with 30 % of the epochs at low resolution, fit fewer than 8 even with no
    validation: the keeper asks for a narrower net right after the probe, before timing a validation pass (the
    full plan's verdict would be the same, a pass and its warm-up later). Each margin is 1.7x or more for a loaded
    machine's longer sleeps."""
    keeper = BudgetKeeper(BudgetState(20.0), max_epochs=100, low_res_share=0.3, full_over_low_pixels=2.0, dist=Dist(),
                          device=torch.device("cpu"), narrow_below=8, waits=lambda: {1: 0})

    def time_val():
        raise AssertionError("a validation pass was timed")

    keeper.epoch_started()
    with pytest.raises(NarrowerNet) as raised:
        for step in range(40):
            keeper.before_step(1, step)
            full_res = keeper.probing_full_res(1, step, True)
            time.sleep(0.08 if full_res else 0.01)
            keeper.after_step(epoch=1, step=step + 1, low_res=not full_res, epoch_low_res=True, steps_per_epoch=100,
                              time_val=time_val)
    assert step + 1 == 26 and 1 < raised.value.epochs < 8  # 13 low-resolution steps, then the 13 of the probe


class Neighbour:
    """Steps of `step_s` seconds (twice that at full resolution), `slow` times slower on the run's steps numbered in
    `shared` (a busy process beside them): each of the run's `threads` threads then waits for a core the extra time
    (`waits()`, as core_waits counts: nanoseconds by thread)."""

    def __init__(self, *, shared: range, step_s: float = 0.001, slow: float = 25.0, threads: int = 2):
        self.shared, self.step_s, self.slow, self.threads, self.steps = shared, step_s, slow, threads, 0
        self.waited = [0] * threads

    def waits(self) -> dict[int, int]:
        return dict(enumerate(self.waited))

    def step(self, *, full_res: bool = True) -> None:
        cost = self.step_s * (2 if full_res else 1)
        if self.steps in self.shared:
            time.sleep(cost * self.slow)
            self.waited = [w + int(cost * (self.slow - 1) * 1e9) for w in self.waited]
        else:
            time.sleep(cost)
        self.steps += 1


def _first_epoch(keeper: BudgetKeeper, neighbour: Neighbour, steps_per_epoch: int, low_res: bool = False) -> None:
    """Epoch 1 as fit() drives the keeper (at low resolution but for the full-resolution probe, with `low_res`); a
    validation pass costs 10 ms."""
    keeper.epoch_started()
    for step in range(steps_per_epoch):
        keeper.before_step(1, step)
        small = low_res and not keeper.probing_full_res(1, step, low_res)
        neighbour.step(full_res=not small)
        keeper.after_step(epoch=1, step=step + 1, low_res=small, epoch_low_res=low_res,
                          steps_per_epoch=steps_per_epoch, time_val=lambda: 0.01)


def _keeper(neighbour: Neighbour, budget_s: float, narrow_below: float, low_res_share: float = 0.0) -> BudgetKeeper:
    return BudgetKeeper(BudgetState(budget_s), max_epochs=100, low_res_share=low_res_share, full_over_low_pixels=2.0,
                        dist=Dist(), device=torch.device("cpu"), narrow_below=narrow_below, waits=neighbour.waits)


def test_too_few_epochs_on_shared_cores_are_no_reason_to_narrow_once_the_cores_are_free():
    """A neighbour makes the first 20 steps 25 times slower: on them 10 epochs of 100 steps would not fit in 20 s, so
    the run would narrow its net for the whole budget (it did, 2026-12-06: docs/budget.md). Timed on shared cores,
    the decision waits; the neighbour leaves, and the first window of the run's own steps replaces the cost measured
    beside it (a moving average of the two would still not fit 10): the net keeps its width, the plan grows."""
    neighbour = Neighbour(shared=range(20))
    keeper = _keeper(neighbour, budget_s=20.0, narrow_below=10)
    _first_epoch(keeper, neighbour, steps_per_epoch=100)
    first, plan = keeper.state.first_plan, keeper.state.plan
    assert first.total_steps(100) < 10 * 100, first  # on the shared cores' costs it would have narrowed
    assert not keeper.narrow_pending and plan.total_steps(100) >= 20 * 100, plan


def test_a_full_resolution_probe_beside_a_neighbour_is_estimated_from_the_steps_after_it():
    """The low-resolution steps are timed alone, the full-resolution probe beside a neighbour: on its cost too few
    epochs fit. The next window (low resolution, the cores the run's own) brings the probe's cost down to its
    estimate from that window (its pixels' share), not to the probe's own scaled by a window that never was shared."""
    neighbour = Neighbour(shared=range(13, 26))
    keeper = _keeper(neighbour, budget_s=20.0, narrow_below=10, low_res_share=0.5)
    _first_epoch(keeper, neighbour, steps_per_epoch=100, low_res=True)
    assert keeper.state.first_plan.total_steps(100) < 10 * 100, keeper.state.first_plan
    assert not keeper.narrow_pending and keeper.measured[False] <= 2 * keeper.measured[True] + 1e-9, keeper.measured
    assert keeper.state.plan.total_steps(100) >= 20 * 100, keeper.state.plan


def test_a_neighbour_that_arrives_during_the_deferral_is_not_averaged_into_the_costs():
    """The low-resolution steps are timed alone; the neighbour arrives for the full-resolution probe and stays through
    the next low-resolution steps. Those windows, shared, raise the low-resolution cost too; the first window of the
    run's own replaces it (a moving average of the two would fit under 5 epochs): the net keeps its width."""
    neighbour = Neighbour(shared=range(16, 60))
    keeper = _keeper(neighbour, budget_s=30.0, narrow_below=5, low_res_share=0.5)
    _first_epoch(keeper, neighbour, steps_per_epoch=1000, low_res=True)
    assert keeper.state.first_plan.total_steps(1000) < 5 * 1000, keeper.state.first_plan
    assert not keeper.narrow_pending and keeper.state.plan.total_steps(1000) >= 10 * 1000, keeper.state.plan


def test_steps_too_slow_on_the_cores_of_their_own_narrow_at_once():
    """The neighbour leaves after the first timed steps, but the run's own steps are still too slow for 5 epochs:
    it narrows on its first window of them, before the deferral would have ended."""
    neighbour = Neighbour(shared=range(14), step_s=0.0065, slow=2)  # 13 ms steps alone: ~4.5 epochs of 1000 fit
    keeper = _keeper(neighbour, budget_s=60.0, narrow_below=5)
    with pytest.raises(NarrowerNet) as raised:
        _first_epoch(keeper, neighbour, steps_per_epoch=1000)
    assert raised.value.epochs < 5 and keeper.elapsed() < MEASURE_SHARE * 60.0
    assert neighbour.steps > WARMUP_STEPS + MEASURE_STEPS + 1  # after a window past the shared ones


def test_too_few_epochs_on_cores_shared_all_along_narrow_once_the_deferral_is_over():
    """The neighbour stays: the run narrows its net on what it measured once MEASURE_SHARE of the budget has gone,
    not on its first timed steps."""
    neighbour = Neighbour(shared=range(10**9))
    keeper = _keeper(neighbour, budget_s=20.0, narrow_below=10)
    with pytest.raises(NarrowerNet) as raised:
        _first_epoch(keeper, neighbour, steps_per_epoch=100)
    assert raised.value.epochs < 10 and keeper.elapsed() >= MEASURE_SHARE * 20.0
    assert neighbour.steps > WARMUP_STEPS + MEASURE_STEPS  # it trained on past its timed steps


@pytest.mark.skipif(core_waits() is None, reason="the kernel does not say how long threads waited for a core")
def test_core_waits_sees_busy_neighbours():
    """The real counts: this thread, pinned to one core beside three busy processes pinned to it, waits for it about
    three quarters of the time, far more than SHARED_CORES, on any machine (the other cores are not theirs)."""
    cpus = os.sched_getaffinity(0)
    cpu = min(cpus)
    busy: list[subprocess.Popen] = []
    try:
        os.sched_setaffinity(0, {cpu})
        for _ in range(3):
            busy.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
            os.sched_setaffinity(busy[-1].pid, {cpu})
        time.sleep(0.3)
        before, start = core_waits(), time.perf_counter()
        while time.perf_counter() - start < 1.0:
            pass
        after, seconds = core_waits(), time.perf_counter() - start
    finally:
        os.sched_setaffinity(0, cpus)
        for p in busy:
            p.kill()
            p.wait()
    waited_s = sum(ns - before.get(thread, 0) for thread, ns in after.items()) / 1e9
    assert waited_s > 0.5 * seconds > SHARED_CORES * seconds, (waited_s, seconds)  # not the run time, ~0.25 s


def test_a_narrower_net_measures_its_steps_though_the_clock_started_earlier(capsys):
    """A narrower net starts 18 s into a 20 s budget: it still times its warm-up and measured steps before it plans
    (it once planned after its first step, whose cost includes the new net's kernel set-up)."""
    fit(build_model("cnn3", 1, 3, 8, 8), tiny_data(), TrainConfig(arch="cnn3", width=8, epochs=1), None)  # the
    # process's first steps' ~1.5 s of set-up
    capsys.readouterr()
    cfg = TrainConfig(arch="cnn3", width=8, epochs=10_000, batch_size=1, lr=0.05, budget_s=20)
    fit(build_model("cnn3", 1, 3, 8, 8), tiny_data(), cfg, None, started=time.perf_counter() - 18)
    assert "planned in epoch 1 after step 13 at 18." in capsys.readouterr().err


def _tiny_augmented(tmp_path, n=400):
    write_tiny_dataset(tmp_path / "processed", classes=4, size=16, n=n)
    from cnnpipe.stages import augment

    augment.run(cfg=AugmentConfig(), data=tmp_path / "processed", augmented=tmp_path / "augmented")


@pytest.mark.e2e
def test_a_budget_too_short_for_the_min_epochs_narrows_the_net_and_keeps_its_clock(tmp_path):
    """`cnnpipe train --budget-s 8 --budget-min-epochs 500` at width 32: far fewer epochs fit, so the net starts
    again at width 16, the floor, and trains there on the same clock though 500 epochs fit at no width: the whole
    run ends within the budget, and the result line, the model file and config.json hold the net that was trained."""
    _tiny_augmented(tmp_path)
    proc = cnnpipe("train", "--params", str(REPO / "params.yaml"), "--no-tracking", "--budget-s", "8",
                   "--budget-min-epochs", "500", "--epochs", "500", "--threads", "1", "--arch", "fastnet", "--width",
                   "32", "--batch-size", "16", "--data", str(tmp_path / "processed"), "--augmented",
                   str(tmp_path / "augmented"), "--out", str(tmp_path / "model"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fit at width 32: starting again at width 16" in proc.stderr
    assert "starting again at width 8" not in proc.stderr
    spent = float(re.search(r"; ([0-9.]+) s of the budget spent", proc.stderr)[1])
    narrowed = proc.stderr[proc.stderr.index("starting again at width 16"):]  # the wider net may have planned before
    planned_at = float(re.search(r"train.budget_s 8: planned .* at ([0-9.]+) s:", narrowed)[1])
    assert planned_at > spent  # the narrower net's plan counts the seconds the wider one spent
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["budget"]["width"] == 16 and result["budget"]["actual_s"] <= 8 * 1.05
    model, spec = load_model(tmp_path / "model" / MODEL_FILE)
    assert spec.width == 16 and sum(p.numel() for p in model.parameters()) == result["parameters"]
    saved = json.loads((tmp_path / "model" / CONFIG_FILE).read_text())
    assert saved["parameters"] == result["parameters"] and saved["train"]["width"] == 32  # the params, as set


@pytest.mark.e2e
def test_a_narrowed_run_resumes_at_the_narrower_width(tmp_path, monkeypatch, capsys):
    """A run that narrowed its net and was stopped after epoch 2 resumes from its checkpoint at that width. On a
    CPU without bf16 the recipe's `precision: bf16` falls back to fp32, said once, not once per net. The recipe's
    train.conv_init initializes the narrower net too (and the resumed one, whose weights the checkpoint replaces)."""
    from cnnpipe.stages import train

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    initialized = []  # the stem's width (half the net's) of every net the init was applied to
    dirac = train.CONV_INITS["dirac"]
    monkeypatch.setitem(train.CONV_INITS, "dirac", lambda net: initialized.append(
        next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d)).out_channels) or dirac(net))
    _tiny_augmented(tmp_path)
    # 12 s: beside two busy processes (CI's other test worker) a 6 s run could end inside its first epoch
    cfg = TrainConfig(arch="fastnet", width=32, epochs=500, budget_s=12, budget_min_epochs=500, batch_size=16,
                      threads=1, precision="bf16", conv_init="dirac")
    where = dict(cfg=cfg, data=tmp_path / "processed", augmented=tmp_path / "augmented", model=tmp_path / "model",
                 tracking=None, checkpoint=tmp_path / "state.pt")

    class Stopped(Exception):
        pass

    def stop_in_epoch_2(stats):
        if stats["epoch"] == 2:
            raise Stopped

    with pytest.raises(Stopped):
        train.run(**where, on_epoch=stop_in_epoch_2)
    err = capsys.readouterr().err
    assert "starting again at width 16" in err
    assert err.count("train.precision: bf16 asked for, but cpu has no native bf16: training in fp32") == 1
    assert torch.load(tmp_path / "state.pt", weights_only=True)["width"] == 16
    assert initialized == [16, 8]  # width 32, then 16
    result = train.run(**where, resume=True)
    assert result["budget"]["width"] == 16 and load_model(tmp_path / "model" / MODEL_FILE)[1].width == 16
    assert initialized == [16, 8, 8]


@pytest.mark.e2e
@pytest.mark.parametrize("val_every", [1, 0], ids=["every-epoch", "last-only"])
def test_train_with_a_budget_ends_within_it(tmp_path, val_every):
    """`cnnpipe train --budget-s 8`, with train.epochs far more than fit: the recorded training + validation
    time is within 5 % of the budget, and the result line and the model folder record the plan; with
    train.val_every 0 only the last epoch is validated."""
    write_tiny_dataset(tmp_path / "processed", classes=4, size=16, n=400)
    from cnnpipe.stages import augment

    augment.run(cfg=AugmentConfig(), data=tmp_path / "processed", augmented=tmp_path / "augmented")
    budget = 8.0
    proc = cnnpipe("train", "--params", str(REPO / "params.yaml"), "--no-tracking", "--budget-s", str(budget),
                   "--epochs", "500", "--threads", "1", "--arch", "fastnet", "--width", "8", "--batch-size", "32",
                   "--low-res", "8", "--low-res-epochs", "200", "--data", str(tmp_path / "processed"),
                   "--augmented", str(tmp_path / "augmented"), "--out", str(tmp_path / "model"),
                   "--val-every", str(val_every), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    record = result["budget"]
    assert record["actual_s"] <= budget * 1.05, proc.stderr[-3000:]
    rows = read_history(tmp_path / "model")
    validated = [r["val/accuracy"] != "" for r in rows]
    # the last epoch always; with val_every 0 no other but epoch 1 when the first plan came after it (to time a pass)
    assert validated == [True] * len(rows) if val_every else (validated[-1] and not any(validated[1:-1]))
    # where the budget went: the epochs' steps (their own clock) and the passes, within the whole
    assert record["validations"] == sum(r["val/accuracy"] != "" for r in rows)
    assert record["training_s"] == pytest.approx(sum(float(r["train/epoch_seconds"]) for r in rows), abs=0.5)
    assert record["validation_s"] >= record["validations"] * 0.5 * record["val_s"]
    assert record["training_s"] + record["validation_s"] <= record["actual_s"]
    assert rows[result["kept_epoch"] - 1]["val/accuracy"] != ""  # keep best: among the validated epochs
    assert record["actual_s"] >= budget * 0.8  # the budget is used, not left
    assert 1 <= result["epochs"] == record["planned_epochs"] < 500 and record["low_res_epochs"] >= 1
    assert record["step_s"] > 0 and record["val_s"] > 0
    assert "train.budget_s 8: planned in epoch 1" in proc.stderr
    saved = json.loads((tmp_path / "model" / CONFIG_FILE).read_text())
    assert saved["budget"]["planned_epochs"] == record["planned_epochs"]


@pytest.mark.e2e
def test_a_60_second_budget_ends_within_63_seconds_and_uses_it(tmp_path):
    """Issue 27's bar, as users run it: ingest digits (params.yaml), and a 150-frame archive in GTSRB's layout
    (configs/gtsrb-fast.yaml: one-step epochs), augment, then `cnnpipe train --budget-s 60` with an epoch cap far
    beyond what fits. Training + validation end within 63 s, and use the budget: planning once looped over every
    epoch up to the cap (100,000 epochs never ended), and once refused whole epochs shorter than their validation
    (the GTSRB case ended after 1 s). The two trainings run at once, on half the cores each (under the test
    command's workers: both on the worker's one core), so each plans on the speed it gets beside the other, and
    the suite waits one minute, not two."""
    sources = {"digits": (str(REPO / "params.yaml"), ("--source", "digits")),
               "gtsrb": (str(REPO / "configs" / "gtsrb-fast.yaml"),
                         ("--path", str(gtsrb_zip(tmp_path / "gtsrb.zip", classes=5, tracks=6))))}
    for name, (params, source) in sources.items():
        (tmp_path / name).mkdir()
        for stage, *args in [("ingest", *source, "--out", "processed", "--report", "ingest_report.json"),
                             ("augment", "--data", "processed", "--out", "augmented")]:
            proc = cnnpipe(stage, "--params", params, *args, cwd=tmp_path / name, timeout=300)
            assert proc.returncode == 0, proc.stderr[-3000:]
    threads = str(max(1, available_cores() // 2))
    trainings = {}
    try:
        for name, (params, _) in sources.items():
            # progress to a file: a pipe not read while the other training is waited for could fill and stall it
            with open(tmp_path / name / "train.log", "w") as log:
                trainings[name] = subprocess.Popen(
                    ["cnnpipe", "train", "--params", params, "--no-tracking", "--budget-s", "60", "--epochs", "100000",
                     "--threads", threads, "--data", "processed", "--augmented", "augmented", "--out", "model"],
                    cwd=tmp_path / name, env=user_env(), stdout=subprocess.PIPE, stderr=log, text=True)
        for name, proc in trainings.items():
            out, _ = proc.communicate(timeout=300)
            err = (tmp_path / name / "train.log").read_text()
            assert proc.returncode == 0, (name, err[-3000:])
            budget = json.loads(out.strip().splitlines()[-1])["budget"]
            assert 54 <= budget["actual_s"] <= 63, (name, budget, err[-3000:])
    finally:
        for proc in trainings.values():
            proc.kill()
            proc.wait()


@pytest.mark.e2e
def test_ddp_ranks_follow_one_budget_plan(tmp_path):
    """Two processes under torchrun with a budget: they step together (a disagreement would hang or fail in
    the gradient all-reduce) and end within it."""
    write_tiny_dataset(tmp_path / "processed", n=200)
    from cnnpipe.stages import augment

    augment.run(cfg=AugmentConfig(), data=tmp_path / "processed", augmented=tmp_path / "augmented")
    proc = subprocess.run(
        ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "cnnpipe", "train", "--params",
         str(REPO / "params.yaml"), "--no-tracking", "--budget-s", "6", "--epochs", "300", "--width", "4", "--threads", "1",
         "--batch-size", "16", "--data", str(tmp_path / "processed"), "--augmented", str(tmp_path / "augmented"),
         "--out", str(tmp_path / "model")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, lines  # one results line for the job, from rank 0 (two ranks' could interleave)
    record = json.loads(lines[0])["budget"]
    assert record["actual_s"] <= 6 * 1.05 and record["planned_epochs"] < 300
    assert proc.stderr.count("train.budget_s 6: planned") == 1  # rank 0 speaks for both


def test_an_emulated_avx2_cpu_has_no_native_bf16(monkeypatch):
    """ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 on a bf16 CPU: train.precision bf16 falls back to fp32,
    as on a real AVX2-only CPU (the CPU flags alone still say bf16)."""
    from cnnpipe.engine.device import native_bf16

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    cpu = torch.device("cpu")
    assert native_bf16(cpu)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not native_bf16(cpu)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_bf16")
    assert native_bf16(cpu)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not native_bf16(cpu)
