"""Training to a wall-clock budget (train.budget_s): how many epochs and steps fit, re-planned as the speed drifts.

The training loop measures the real cost of a step (at each resolution it trains at) and of a validation pass
on its first steps, after a few steps of warm-up; `plan_budget` turns those costs into a plan (epochs, the steps
of the last one, the low-resolution epochs) that ends inside the budget, train.epochs being a cap. Every few
steps and after every epoch the loop measures again; `replan` changes the rest of the plan when the costs
have drifted so that the plan would overrun or leave time unused. The learning-rate schedule follows the plan
(`Progress`): it ends exactly at the planned last step.

The one decision no re-plan undoes, training a narrower net (train.budget_min_epochs), is not taken on steps timed
while another process took the cores (`core_waits`): the run goes on at its width and decides on the first window in
which the cores were its own, or on what it measured once MEASURE_SHARE of the budget has gone.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from cnnpipe.engine.distributed import Dist, broadcast_ints

WARMUP_STEPS = 3  # steps not timed at each resolution: first calls create the kernels (oneDNN primitives, cuDNN plans)
MEASURE_STEPS = 10  # steps timed after them; a fixed count, so every DDP rank plans at the same step
MEASURE_SHARE = 0.1  # of the budget the first measurements may take before the first plan
PLAN_SHARE = 0.97  # of the remaining time a plan fills: room for the measurements' noise
DRIFT = 0.1  # re-plan when the rest of the plan would overrun, or finish this share of the remaining time early
SMOOTHING = 0.3  # weight of the latest window in a falling step cost's moving average; a rising one is taken as
                 # measured: a neighbour taking a core must shorten the plan now, not after several windows
SHARED_CORES = 0.1  # a timed window ran beside another busy process when this process's threads, together, waited
                    # for a core this many cores' worth of its time or more: alone a hundredth of a core, beside a
                    # busy process most of one (docs/budget.md); low, so that a window the neighbour left halfway
                    # through, its cost still inflated, does not count as the run's own
CHECKS_PER_RUN = 25  # mid-epoch checks of the clock over a run (and one after every epoch): every that share of the
                     # planned steps or of the budget's seconds, whichever comes first (steps that turn several
                     # times slower would otherwise stretch a window, and the overrun, as many times)


@dataclass(frozen=True)
class Costs:
    """Measured seconds."""

    step_s: float  # one training step at full resolution: batch, augmentation, forward, backward, update
    low_res_step_s: float  # one step at train.low_res (= step_s without a low-resolution phase)
    val_s: float  # one validation pass
    epoch_overhead_s: float = 0.0  # per epoch besides its steps and validation: checkpoint, tracking


@dataclass(frozen=True)
class Plan:
    epochs: int
    last_epoch_steps: int  # the last epoch may be partial
    low_res_epochs: int
    fits: bool = True  # False: not even one step more fits in the remaining time; the run ends as soon as it can

    def steps_in(self, epoch: int, steps_per_epoch: int) -> int:
        return steps_per_epoch if epoch < self.epochs else min(self.last_epoch_steps, steps_per_epoch)

    def total_steps(self, steps_per_epoch: int) -> int:
        return (self.epochs - 1) * steps_per_epoch + min(self.last_epoch_steps, steps_per_epoch)


@dataclass(frozen=True)
class Position:
    """Where the run is when it plans: in `epoch` (1-based) after `steps_done` of its steps."""

    epoch: int = 1
    steps_done: int = 0
    low_res_done: int = 0  # epochs up to `epoch` already started at low resolution
    low_res_over: bool = False  # a full-resolution epoch has started (or there is no low-resolution phase)


def _low_res_epochs(n: int, share: float, at: Position) -> int:
    """Low-resolution epochs of an n-epoch plan: the configured share of them (never the last one unless all
    are), never fewer than those already started at low resolution, no more once the phase is over."""
    if at.low_res_over:
        return at.low_res_done
    target = round(share * n) if share < 1 else n
    if share < 1:
        target = min(target, n - 1)
    return min(n, max(target, at.low_res_done))


def validated(epoch: int, last_epoch: int, val_every: int) -> bool:
    """Does `epoch` end with a validation pass (train.val_every): every val_every-th epoch and the last (0: the last
    only)?"""
    return epoch >= last_epoch or (val_every > 0 and epoch % val_every == 0)


def validations(first: int, last_epoch: int, val_every: int) -> int:
    """Validation passes in epochs first..last_epoch (first <= last_epoch) of a plan ending at last_epoch."""
    every = 0 if val_every <= 0 else (last_epoch - 1) // val_every - (first - 1) // val_every
    return every + 1


def remaining_cost(plan: Plan, costs: Costs, steps_per_epoch: int, at: Position, val_every: int = 1) -> float:
    """Seconds the rest of `plan` takes from `at` (the current epoch's validation included, when it has one)."""
    seconds = 0.0
    for epoch in range(at.epoch, plan.epochs + 1):
        steps = plan.steps_in(epoch, steps_per_epoch) - (at.steps_done if epoch == at.epoch else 0)
        step_s = costs.low_res_step_s if epoch <= plan.low_res_epochs else costs.step_s
        seconds += (max(steps, 0) * step_s + costs.epoch_overhead_s
                    + (costs.val_s if validated(epoch, plan.epochs, val_every) else 0.0))
    return seconds


def _cost_before_last_steps(n: int, low: int, costs: Costs, steps_per_epoch: int, at: Position,
                            val_every: int) -> float:
    """Seconds an n-epoch plan (`low` of them at low resolution) takes from `at` besides its last epoch's steps:
    the epochs before it in full, every epoch's overhead and its validation passes. Arithmetic, not a loop over
    epochs: plan_budget asks it for every candidate n, and n may run to tens of thousands (tiny epochs, long
    budgets)."""
    before = n - at.epoch  # whole epochs before the last, the current one first
    low_before = max(0, min(low, n - 1) - at.epoch + 1)
    steps = before * steps_per_epoch - (at.steps_done if before else 0)
    low_steps = low_before * steps_per_epoch - (at.steps_done if low_before else 0)
    return (low_steps * costs.low_res_step_s + (steps - low_steps) * costs.step_s
            + (before + 1) * costs.epoch_overhead_s + validations(at.epoch, n, val_every) * costs.val_s)


def plan_budget(*, remaining_s: float, costs: Costs, steps_per_epoch: int, max_epochs: int, low_res_share: float,
                at: Position = Position(), val_every: int = 1) -> Plan:
    """The plan that trains the most steps within PLAN_SHARE of `remaining_s` from `at`, in at most `max_epochs`
    epochs, the last one possibly partial but, when it is a new partial epoch, no shorter than its validation (fewer
    epochs on a tie: fewer validation passes). When nothing more
    fits, a plan that stops as soon as it can (fits=False): the current epoch ends after its steps done
    (at least one step)."""
    usable = remaining_s * PLAN_SHARE
    best: Plan | None = None
    best_steps = -1
    for n in range(at.epoch, max(max_epochs, at.epoch) + 1):
        low = _low_res_epochs(n, low_res_share, at)
        # what the epochs before the last cost, and the last's validation: the rest buys its steps
        spare = usable - _cost_before_last_steps(n, low, costs, steps_per_epoch, at, val_every)
        if spare < 0:  # every epoch more only adds cost: no larger n fits either (and max_epochs may be huge)
            break
        last_step_s = costs.low_res_step_s if n <= low else costs.step_s
        last = min(steps_per_epoch, (at.steps_done if n == at.epoch else 0)
                   + math.floor(max(spare, -1.0) / max(last_step_s, 1e-9)))
        # a new partial last epoch must train at least as long as its validation takes: a few steps are not worth
        # a pass (a whole epoch always is, however short: tiny datasets have one-step epochs)
        least = 1 if n == at.epoch else min(steps_per_epoch, math.ceil((costs.val_s + costs.epoch_overhead_s)
                                                                       / max(last_step_s, 1e-9)))
        if spare < 0 or last < max(least, at.steps_done if n == at.epoch else 1, 1):
            continue
        total = (n - 1) * steps_per_epoch + last
        if total > best_steps:
            best, best_steps = Plan(n, last, low), total
    if best is None:  # stop: between epochs, after the one before; in an epoch, after its steps done (>= 1)
        if at.steps_done == 0 and at.epoch > 1:
            return Plan(at.epoch - 1, steps_per_epoch, min(at.low_res_done, at.epoch - 1), fits=False)
        return Plan(at.epoch, max(at.steps_done, 1), _low_res_epochs(at.epoch, low_res_share, at), fits=False)
    return best


def replan(plan: Plan, *, remaining_s: float, costs: Costs, steps_per_epoch: int, max_epochs: int,
           low_res_share: float, at: Position, val_every: int = 1) -> Plan:
    """`plan`, or a new plan from `at` when the rest of `plan` at `costs` would overrun `remaining_s` or end
    more than DRIFT of it early (and a new plan could use that time)."""
    needed = remaining_cost(plan, costs, steps_per_epoch, at, val_every)
    if needed <= remaining_s and (needed >= remaining_s * (1 - DRIFT) or not plan.fits):
        return plan
    new = plan_budget(remaining_s=remaining_s, costs=costs, steps_per_epoch=steps_per_epoch, max_epochs=max_epochs,
                      low_res_share=low_res_share, at=at, val_every=val_every)
    return plan if new == plan else new


@dataclass
class Progress:
    """The learning-rate schedule's progress, 0 at the first step and 1 at `total`. Re-targeting to a new total
    keeps the progress reached and spreads the rest over the new remaining steps: the rate never jumps and the
    schedule ends at the plan's last step."""

    total: int
    anchor_step: int = 0
    anchor_progress: float = 0.0

    def at(self, step: int) -> float:
        if self.anchor_step == 0 and self.anchor_progress == 0.0:
            return step / max(self.total, 1)  # as without a budget, to the last bit
        left = max(self.total - self.anchor_step, 1)
        return min(1.0, self.anchor_progress + (step - self.anchor_step) * (1 - self.anchor_progress) / left)

    def retarget(self, step: int, total: int) -> None:
        self.anchor_progress, self.anchor_step, self.total = self.at(step), step, max(total, step)


@dataclass
class BudgetState:
    """What a budgeted run knows; saved in checkpoints, so a resumed run keeps its plan and its clock."""

    budget_s: float
    plan: Plan | None = None  # None until the first measurements
    costs: Costs | None = None
    used_s: float = 0.0  # by the epochs before the last checkpoint (a resumed run's earlier processes)
    replans: int = 0
    first_plan: Plan | None = None
    schedule: Progress | None = None  # the learning-rate schedule's progress, re-targeted with the plan
    # where the seconds went (the rest of used_s: the epochs' overhead, a narrower net's start, the steps it replaced)
    training_s: float = 0.0  # in training steps
    validation_s: float = 0.0  # in validation passes and the timing of one
    validations: int = 0  # passes

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> BudgetState:
        plan = lambda p: Plan(**p) if p else None  # noqa: E731
        return cls(d["budget_s"], plan(d["plan"]), Costs(**d["costs"]) if d["costs"] else None, d["used_s"],
                   d["replans"], plan(d["first_plan"]), Progress(**d["schedule"]) if d["schedule"] else None,
                   # a checkpoint written before these were recorded counts from the resume
                   d.get("training_s", 0.0), d.get("validation_s", 0.0), d.get("validations", 0))


def floored_epochs(epochs: float) -> str:
    """Epochs that fit, floored to hundredths: a count just short of train.budget_min_epochs never reads as it
    (2.96 -> "2.96", where rounding to tenths printed "3.0 epochs fit ... starting again at width 16"); the 1e-9
    keeps a binary fraction's shortfall from flooring 2.3 (229.99999999999997 hundredths) to 2.29."""
    return f"{math.floor(epochs * 100 + 1e-9) / 100:.2f}"


class NarrowerNet(Exception):  # noqa: N818 (not an error: the caller trains a narrower net)
    """Fewer than `narrow_below` epochs fit (`epochs`: a plan's steps over an epoch's steps), found in the first
    epoch: the caller starts again with a narrower net (train.budget_min_epochs), on the same clock (`started`)."""

    def __init__(self, epochs: float, started: float) -> None:
        super().__init__(f"{floored_epochs(epochs)} epochs fit")
        self.epochs, self.started = epochs, started


def core_waits() -> dict[int, int] | None:
    """Nanoseconds each of this process's threads has so far waited on a run queue for a core, by thread id (Linux's
    schedstat). None where the kernel does not say (other OSes, no /proc): every window then counts as the run's own."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    waited = {}
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/schedstat") as f:
                waited[int(task)] = int(f.read().split()[1])
        except (OSError, ValueError, IndexError):  # a thread that ended since the listing; no schedstat
            continue
    return waited or None


class BudgetKeeper:
    """The clock, the measurements and the plan of one budgeted run. Every rank measures; rank 0's plan is the
    one all ranks follow (broadcast at each planning point, which all ranks reach at the same step)."""

    def __init__(self, state: BudgetState, *, max_epochs: int, low_res_share: float, full_over_low_pixels: float,
                 dist: Dist, device: torch.device, started: float | None = None, narrow_below: float = 0.0,
                 val_every: int = 1, waits: Callable[[], dict[int, int] | None] = core_waits):
        """`narrow_below`: raise NarrowerNet when the first plan fits fewer epochs, or sooner, when even the steps
        timed so far (each resolution at its cost, one not timed yet at the cheapest timed) with no validation would
        (saving the rest of the measurements); a decision on costs measured beside another busy process (`waits()`:
        nanoseconds each thread waited for a core) waits."""
        self.state, self.max_epochs, self.low_res_share, self.val_every = state, max_epochs, low_res_share, val_every
        self.narrow_below = narrow_below if state.plan is None else 0.0
        self.pixel_ratio = full_over_low_pixels  # estimates a full-resolution step when none was measured yet
        self.dist, self.device = dist, device
        self.started = started if started is not None else self.now()  # perf_counter() when training began
        self.waits = waits
        self.window_start, self.window_steps, self.window_waits = self.started, 0, None
        self.shared_at: dict[bool, bool] = {}  # low resolution? -> its step cost was measured beside a neighbour
        self.val_shared = False  # ... the validation pass's
        self.narrow_pending = False  # too few epochs fit on shared cores: decided on a later window of epoch 1
        self.epochs_started = 0
        self.val_s: float | None = None
        self.overhead_s: float | None = None
        self.val_end = self.started
        self.measured: dict[bool, float] = {}  # low resolution? -> seconds per step
        self.epoch_start = self.started
        self.val_timing_in_epoch = 0.0  # seconds the current epoch spent timing a validation pass (not training)
        self.measuring_since = time.perf_counter()  # a narrower net's measurements start afresh on the same clock
        self.planned_at_epoch_start = False

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def elapsed(self) -> float:
        return self.state.used_s + time.perf_counter() - self.started

    # the first epoch: which steps are timed, and at which resolution
    def probing_full_res(self, epoch: int, step: int, low_res: bool) -> bool:
        """In a fresh run's first epoch at low resolution, the block of steps after the timed low-resolution ones
        (warm-up, then timed; `step` 0-based) trains at full resolution to time that cost too: real steps."""
        per = WARMUP_STEPS + MEASURE_STEPS
        return self.state.plan is None and epoch == 1 and low_res and self.low_res_share < 1 and per <= step < 2 * per

    def before_step(self, epoch: int, step: int) -> None:
        """Call before step `step` (0-based) of `epoch`: opens a timing window after the warm-up steps."""
        if epoch == 1 and self.state.plan is None and step % (WARMUP_STEPS + MEASURE_STEPS) == WARMUP_STEPS:
            self._open_window(self.now())

    def after_step(self, *, epoch: int, step: int, low_res: bool, epoch_low_res: bool, steps_per_epoch: int,
                   time_val: Callable[[], float]) -> Plan | None:
        """Call after step `step` (1-based count in `epoch`, an epoch at `epoch_low_res`) trained at `low_res`;
        returns the new plan when it plans or re-plans here. `time_val()` measures a validation pass (seconds)."""
        self.window_steps += 1
        if self.state.plan is None:
            if epoch != 1:
                return None
            # steps so slow that measuring them all would spend the budget: plan from those done
            late = self._deferral_over()
            if step % (WARMUP_STEPS + MEASURE_STEPS) != 0 and not late:
                return None
            self.measured[low_res] = (self.now() - self.window_start) / max(self.window_steps, 1)
            at = Position(epoch, step, int(epoch_low_res), not epoch_low_res)
            if self.narrow_below:
                self.shared_at[low_res] = self._shared_since(self.window_waits, self.window_start)
                # a bound before the validation pass is timed (it costs a pass and its warm-up): no validation, and
                # a resolution not timed yet at the cheapest cost timed
                cheapest = min(self.measured.values())
                full, low = self.measured.get(False, cheapest), self.measured.get(True, cheapest)
                bound = Costs(full, low, 0.0)
                self._narrow_if(plan_budget(remaining_s=self.state.budget_s - self.elapsed(),
                                            costs=bound, steps_per_epoch=steps_per_epoch,
                                            max_epochs=self.max_epochs, low_res_share=self.low_res_share, at=at),
                                steps_per_epoch, shared=any(self.shared_at.values()))
            if self.low_res_share < 1 and low_res and False not in self.measured and not late:
                return None  # next: the full-resolution probe
            self._time_val(time_val)
            return self._first_plan(at, steps_per_epoch)
        due = (self.window_steps >= self._check_every(steps_per_epoch)
               or time.perf_counter() - self.window_start >= self.state.budget_s / CHECKS_PER_RUN)
        if not broadcast_ints([due], self.dist, self.device)[0]:  # rank 0's clock decides: ranks plan together
            return None
        step_s = (self.now() - self.window_start) / self.window_steps
        shared = self.narrow_pending and self._shared_since(self.window_waits, self.window_start)
        if shared:  # this resolution's cost now holds the neighbour's too: the next window of its own replaces it
            self.shared_at[low_res] = True
        elif self.narrow_pending:
            self._unshare(low_res, step_s, time_val)
        self._measure(low_res, step_s)
        self._open_window(time.perf_counter())
        low_done = epoch if epoch_low_res else min(self.state.plan.low_res_epochs, epoch - 1)
        at = Position(epoch, step, low_done, not epoch_low_res)
        if self.narrow_pending and (not shared or self._deferral_over()):  # pending only in epoch 1 (epoch_started)
            self.narrow_pending = False
            self._narrow_if(plan_budget(remaining_s=self.state.budget_s - self.elapsed(), costs=self._costs(),
                                        steps_per_epoch=steps_per_epoch, max_epochs=self.max_epochs,
                                        low_res_share=self.low_res_share, at=at, val_every=self.val_every),
                            steps_per_epoch, shared=False)
        return self._replan(at, steps_per_epoch)

    def epoch_started(self) -> None:
        now = self.now()
        if self.epochs_started:  # since the last epoch's validation (or its last step): checkpoint, tracking, callbacks
            self.overhead_s = now - self.val_end
        self.epochs_started += 1
        if self.epochs_started > 1:  # an epoch trained at this width: narrowing now would throw it away
            self.narrow_below, self.narrow_pending = 0.0, False
        self.epoch_start, self.val_timing_in_epoch = now, 0.0
        self._open_window(now)
        self.planned_at_epoch_start = self.state.plan is not None

    def after_training_steps(self, *, steps: int, low_res: bool) -> None:
        """Call after an epoch's last step: the epoch's average step cost is the latest measure (not in the epoch
        the first plan was made in, whose warm-up and probe steps it would count)."""
        seconds = self.now() - self.epoch_start
        self.state.training_s += seconds - self.val_timing_in_epoch
        if steps and (self.planned_at_epoch_start or low_res not in self.measured):
            self._measure(low_res, seconds / steps)

    def after_validation(self, seconds: float | None) -> None:
        """Call after an epoch's validation pass of `seconds`, or after its last step when it has none (None)."""
        if seconds is not None:
            self.val_s = seconds
            self.state.validation_s += seconds
            self.state.validations += 1
        self.val_end = self.now()

    def after_epoch(self, *, epoch: int, low_res: bool, steps_per_epoch: int) -> Plan | None:
        """Call after an epoch's validation (when it has none: after after_validation(None)), before its checkpoint;
        after the planned last epoch the run ends."""
        if self.state.plan is not None and epoch >= self.state.plan.epochs:
            return None
        at = Position(epoch + 1, 0, min(epoch, self.state.plan.low_res_epochs) if self.state.plan else int(low_res),
                      not low_res)
        if self.state.plan is None:
            return self._first_plan(at, steps_per_epoch)
        return self._replan(at, steps_per_epoch)

    def record(self) -> dict:
        s = self.state
        out = {"budget_s": s.budget_s, "actual_s": round(self.elapsed(), 2), "replans": s.replans,
               "training_s": round(s.training_s, 2), "validation_s": round(s.validation_s, 2),
               "validations": s.validations}
        if s.plan is not None:
            out |= {"planned_epochs": s.plan.epochs, "last_epoch_steps": s.plan.last_epoch_steps,
                    "low_res_epochs": s.plan.low_res_epochs, "fits": s.plan.fits,
                    "first_plan_epochs": s.first_plan.epochs if s.first_plan else s.plan.epochs}
        if s.costs is not None:
            out |= {"step_s": round(s.costs.step_s, 5), "val_s": round(s.costs.val_s, 4),
                    "epoch_overhead_s": round(s.costs.epoch_overhead_s, 4)}
            if self.low_res_share:
                out["low_res_step_s"] = round(s.costs.low_res_step_s, 5)
        return out

    def _measure(self, low_res: bool, step_s: float) -> None:
        old = self.measured.get(low_res)
        self.measured[low_res] = step_s if old is None or step_s > old else SMOOTHING * step_s + (1 - SMOOTHING) * old

    def _check_every(self, steps_per_epoch: int) -> int:
        return max(MEASURE_STEPS, self.state.plan.total_steps(steps_per_epoch) // CHECKS_PER_RUN)

    def _costs(self) -> Costs:
        old = self.state.costs  # a resumed run's, until it measures again
        low = self.measured.get(True, old.low_res_step_s if old else None)
        full = self.measured.get(False, old.step_s if old else (low or 0.0) * self.pixel_ratio)
        return Costs(full, low if low is not None else full,
                     self.val_s if self.val_s is not None else (old.val_s if old else 0.0),
                     self.overhead_s if self.overhead_s is not None else (old.epoch_overhead_s if old else 0.0))

    def _agree(self, plan: Plan) -> Plan:
        epochs, last, low, fits = broadcast_ints([plan.epochs, plan.last_epoch_steps, plan.low_res_epochs,
                                                  int(plan.fits)], self.dist, self.device)
        return Plan(epochs, last, low, bool(fits))

    def _open_window(self, now: float) -> None:
        self.window_start, self.window_steps = now, 0
        self.window_waits = self.waits() if self.narrow_below else None  # read only while the width may change

    def _shared_since(self, waits: dict[int, int] | None, since: float) -> bool:
        """Did this process's threads wait for a core SHARED_CORES cores' worth of the time since `since`, when
        they had waited `waits` (rank 0's answer, on every rank)? A thread that ended since takes its count along;
        one started since counts whole."""
        now, after = time.perf_counter(), self.waits()
        shared = False
        if waits is not None and after is not None:
            waited_ns = sum(ns - waits.get(thread, 0) for thread, ns in after.items())
            shared = waited_ns / 1e9 >= SHARED_CORES * (now - since)
        return bool(broadcast_ints([shared], self.dist, self.device)[0])

    def _time_val(self, time_val: Callable[[], float]) -> None:
        waits, since = self.waits() if self.narrow_below else None, self.now()
        self.val_s = time_val()
        timing_s = self.now() - since
        self.state.validation_s += timing_s
        self.val_timing_in_epoch += timing_s
        self.val_shared = bool(self.narrow_below) and self._shared_since(waits, since)

    def _unshare(self, low_res: bool, step_s: float, time_val: Callable[[], float]) -> None:
        """The cores are the run's again (a window at `low_res` of `step_s` a step, timed on them): what was measured
        beside the neighbour comes down, this resolution's step to this window's cost, the other's to a bound from it
        (a full-resolution step at most the pixels' ratio dearer, a low-resolution one no dearer; either no dearer than
        measured), and the validation pass is timed again."""
        for res, was_shared in self.shared_at.items():
            if was_shared and res in self.measured:
                estimate = step_s * self.pixel_ratio if low_res and not res else step_s  # a low-res step: no dearer
                self.measured[res] = min(self.measured[res], estimate)
                self.shared_at[res] = False
        if self.val_shared:
            self._time_val(time_val)

    def _deferral_over(self) -> bool:
        """Past MEASURE_SHARE of the budget since this net's measurements began (rank 0's clock decides): the end
        of the first measurements and of a narrowing's wait."""
        over = time.perf_counter() - self.measuring_since >= MEASURE_SHARE * self.state.budget_s
        return bool(broadcast_ints([over], self.dist, self.device)[0])

    def _narrow_if(self, plan: Plan, steps_per_epoch: int, *, shared: bool) -> None:
        """Raise NarrowerNet when `plan` (rank 0's decides) fits fewer than narrow_below epochs; when its costs were
        measured on shared cores (`shared`), only once the deferral is over: until then, narrow_pending."""
        epochs = plan.total_steps(steps_per_epoch) / max(steps_per_epoch, 1)
        if broadcast_ints([epochs < self.narrow_below], self.dist, self.device)[0]:
            if shared and not self._deferral_over():
                self.narrow_pending = True
                return
            raise NarrowerNet(epochs, self.started)

    def _first_plan(self, at: Position, steps_per_epoch: int) -> Plan:
        self.state.costs = self._costs()
        plan = self._agree(plan_budget(remaining_s=self.state.budget_s - self.elapsed(), costs=self.state.costs,
                                       steps_per_epoch=steps_per_epoch, max_epochs=self.max_epochs,
                                       low_res_share=self.low_res_share, at=at, val_every=self.val_every))
        if self.narrow_below and at.epoch == 1:  # not after an epoch: its metrics are logged, its checkpoint saved
            self.narrow_pending = False  # this plan's verdict replaces the early bound's
            self._narrow_if(plan, steps_per_epoch, shared=any(self.shared_at.values()) or self.val_shared)
        self.state.plan = self.state.first_plan = plan
        self._open_window(self.now())
        return plan

    def _replan(self, at: Position, steps_per_epoch: int) -> Plan | None:
        self.state.costs = self._costs()
        plan = self._agree(replan(self.state.plan, remaining_s=self.state.budget_s - self.elapsed(),
                                  costs=self.state.costs, steps_per_epoch=steps_per_epoch, max_epochs=self.max_epochs,
                                  low_res_share=self.low_res_share, at=at, val_every=self.val_every))
        if plan == self.state.plan:
            return None
        self.state.plan = plan
        self.state.replans += 1
        return plan
