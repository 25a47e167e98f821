"""tune: an Optuna study over params.yaml's own knobs (`tune.space`), each trial the real augment
(when an augment.* knob is tuned) and train stages, pruned on the per-epoch validation metric.

The study lives in an Optuna RDB storage (sqlite `optuna.db` beside the MLflow store by default), so
`--jobs N` processes share it and a killed study continues where it stopped: a trial left RUNNING by a
killed process is marked failed, and the budget counts finished (complete or pruned) trials. Every
trial is an MLflow child run of the study's parent run, which gets Optuna's figures and a trials table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from cnnpipe.config import AugmentConfig, TrackingConfig, TrainConfig, TuneConfig, load_block, sqlite_path
from cnnpipe.data.store import MANIFEST_FILE
from cnnpipe.engine.device import available_cores
from cnnpipe.engine.model_folder import read_history
from cnnpipe.errors import CnnpipeError
from cnnpipe.search.space import Dimension, check_val_held_out
from cnnpipe.fsio import atomic_file, write_json
from cnnpipe.stages import augment, train

PARENT_ATTR = "mlflow_parent_run_id"  # study user attribute: the parent run a resumed study logs into
SPACE_ATTR = "space"  # study user attribute: the space it was created with (a resumed study must keep it)
TRIAL_TAG = "cnnpipe.tune.trial"  # on each child run: the Optuna trial number
OWNER_ATTR = "cnnpipe.owner"  # trial user attribute: the process running it (tracking.owner_tags)
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
HEARTBEAT_SECONDS = 10  # a running trial's liveness signal; one silent for GRACE_SECONDS is failed
GRACE_SECONDS = 60


class Pruned(optuna.TrialPruned):
    """Raised from the training loop's per-epoch hook: the pruner stopped this trial."""


@dataclass
class Job:
    """Everything a trial process needs (picklable: `--jobs` workers are spawned)."""

    cfg: TuneConfig
    space: dict[str, Dimension]
    params: dict[str, Any]  # the params file: every untuned knob of a trial
    tracking: TrackingConfig
    storage: str
    data: Path
    augmented: Path
    out: Path
    parent_run_id: str
    threads: int = 0  # torch threads of a trial whose train.threads is 0 (auto); 0 = train decides


def storage_url(cfg: TuneConfig, tracking: TrackingConfig) -> str:
    """The study's storage: tune.storage, else sqlite `optuna.db` beside a sqlite MLflow store."""
    if cfg.storage:
        return cfg.storage
    db = sqlite_path(tracking.uri)
    return f"sqlite:///{(db.parent if db is not None else Path('.')) / 'optuna.db'}"


def _storage(url: str) -> optuna.storages.RDBStorage:
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own one line per trial is enough
    try:
        with warnings.catch_warnings():  # "heartbeat_interval is an experimental feature"
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS)
    except Exception as e:  # SQLAlchemy's URL and connection errors have no common base worth naming
        raise CnnpipeError(f"tune.storage {url!r} cannot be used: {str(e).splitlines()[0]}") from None


def grid_values(dim: Dimension, points: int) -> list[Any]:
    """The values a grid takes along `dim`: a choice's options, else `points` spaced values (geometric for log)."""
    if dim.kind == "choice":
        return list(dim.values)
    low, high = dim.values
    values = np.geomspace(low, high, points) if dim.kind == "log_uniform" else np.linspace(low, high, points)
    if dim.integer:
        return sorted({int(round(v)) for v in values})
    return [float(v) for v in values]


def make_sampler(cfg: TuneConfig, space: dict[str, Dimension], seed: int) -> optuna.samplers.BaseSampler:
    if cfg.sampler == "grid":
        return optuna.samplers.GridSampler({k: grid_values(d, cfg.grid_points) for k, d in space.items()}, seed=seed)
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.startup_trials)


def make_pruner(cfg: TuneConfig) -> optuna.pruners.BasePruner:
    if cfg.pruner == "median":  # pruning starts once the trial has run warmup_epochs
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.startup_trials, n_warmup_steps=cfg.warmup_epochs - 1)
    if cfg.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=cfg.warmup_epochs)
    return optuna.pruners.NopPruner()


def suggest(trial: optuna.Trial, space: dict[str, Dimension]) -> dict[str, Any]:
    """One value per dimension, named by its params.yaml key."""
    values = {}
    for key, dim in space.items():
        if dim.kind == "choice":
            values[key] = trial.suggest_categorical(key, list(dim.values))
        elif dim.integer:
            values[key] = trial.suggest_int(key, int(dim.values[0]), int(dim.values[1]), log=dim.kind == "log_uniform")
        else:
            values[key] = trial.suggest_float(key, dim.values[0], dim.values[1], log=dim.kind == "log_uniform")
    return values


def trial_configs(params: dict[str, Any], values: dict[str, Any], *, pruning: bool) -> tuple[AugmentConfig, TrainConfig]:
    """The augment and train blocks of params.yaml with a trial's values put in. With a pruner, every epoch validates
    (train.val_every 1, unless the space tunes it): the pruner compares trials epoch by epoch."""
    blocks = {name: dict(params.get(name) or {}) for name in ("augment", "train")}
    if pruning:
        blocks["train"]["val_every"] = 1
    for key, value in values.items():
        block, _, name = key.partition(".")
        blocks[block][name] = value
    return load_block(AugmentConfig, "augment", blocks, {}), load_block(TrainConfig, "train", blocks, {})


def _objective(job: Job, trial: optuna.Trial) -> float:
    from cnnpipe.tracking import owner_tags

    trial.set_user_attr(OWNER_ATTR, owner_tags())  # who runs it: a killed owner's trial is failed at once
    values = suggest(trial, job.space)
    aug_cfg, train_cfg = trial_configs(job.params, values, pruning=job.cfg.pruner != "none")
    if job.threads and not train_cfg.threads:  # parallel trials share the cores
        train_cfg = dataclasses.replace(train_cfg, threads=job.threads)
    label = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    print(f"trial {trial.number}: {label}", file=sys.stderr, flush=True)
    folder = job.out / "trials" / f"{trial.number:04d}"
    augmented = job.augmented
    if any(key.startswith("augment.") for key in values):  # the policy (and balancing) depends on the trial
        augmented = folder / "augmented"
        augment.run(cfg=aug_cfg, data=job.data, augmented=augmented)

    def report(stats: dict[str, float]) -> None:
        epoch = int(stats["epoch"])
        if job.cfg.metric not in stats:  # an epoch train.val_every did not validate
            return
        trial.report(stats[job.cfg.metric], epoch)
        if trial.should_prune():
            raise Pruned(f"pruned after epoch {epoch}")

    result = train.run(cfg=train_cfg, data=job.data, augmented=augmented, model=folder / "model", tracking=job.tracking,
                       run_tags={"mlflow.parentRunId": job.parent_run_id, TRIAL_TAG: str(trial.number),
                                 "mlflow.runName": f"{job.cfg.study}-{trial.number}"},
                       on_epoch=report)
    history = read_history(folder / "model")
    return float(history[result["kept_epoch"] - 1][job.cfg.metric])  # the epoch train.keep ships, best or last


def _announce(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    value = f" {trial.value:.4f}" if trial.value is not None else ""
    print(f"trial {trial.number}: {trial.state.name.lower()}{value} ({_seconds(trial):.1f} s)", file=sys.stderr,
          flush=True)


def _seconds(trial: optuna.trial.FrozenTrial) -> float:
    if trial.datetime_start is None or trial.datetime_complete is None:
        return float("nan")
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def _work(job: Job, worker: int) -> None:
    """One trial process: start trials until the budget (shared by every process) is spent."""
    cfg = job.cfg
    storage = _storage(job.storage)
    started = len(optuna.load_study(study_name=cfg.study, storage=storage).trials)
    # a resumed study must not replay its first random draws: the seed moves on with the trials already made
    sampler = make_sampler(cfg, job.space, seed=cfg.seed * 1000 + started * 31 + worker)
    study = optuna.load_study(study_name=cfg.study, storage=storage, sampler=sampler, pruner=make_pruner(cfg))
    deadline = time.monotonic() + cfg.timeout if cfg.timeout else None
    while deadline is None or time.monotonic() < deadline:
        counted = study.get_trials(deepcopy=False, states=FINISHED + (optuna.trial.TrialState.RUNNING,))
        if cfg.n_trials and len(counted) >= cfg.n_trials:
            break
        if isinstance(sampler, optuna.samplers.GridSampler) and sampler.is_exhausted(study):
            break
        study.optimize(lambda t: _objective(job, t), n_trials=1, callbacks=[_announce])


def _fail_abandoned(study: optuna.Study) -> int:
    """Fail the RUNNING trials no process works on any more, and only those (a second `cnnpipe tune` on the study may
    be running its own): a heartbeat older than GRACE_SECONDS (Optuna's rule, which study.optimize applies too), an
    owner process (OWNER_ATTR) of this machine that died, or no owner recorded (killed as it started, or made by
    something else) and a start longer than GRACE_SECONDS ago."""
    from cnnpipe.tracking import owner_alive

    def running() -> list[optuna.trial.FrozenTrial]:
        return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))

    before = len(running())
    with warnings.catch_warnings():  # "fail_stale_trials is experimental"
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    failed = before - len(remaining := running())
    for trial in remaining:
        owner = trial.user_attrs.get(OWNER_ATTR)
        age = (datetime.now() - trial.datetime_start).total_seconds() if trial.datetime_start else 0.0
        if (owner_alive(owner) is False) if owner else age > GRACE_SECONDS:
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):  # another process failed it first
                study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
                failed += 1
    return failed


def _space_record(space: dict[str, Dimension]) -> str:
    return json.dumps({k: {d.kind: list(d.values)} for k, d in space.items()}, sort_keys=True)


def run(cfg: TuneConfig, space: dict[str, Dimension], params: dict[str, Any], tracking: TrackingConfig,
        data: Path, augmented: Path, out: Path) -> dict:
    """Run (or continue) the study until its budget is spent, then log its figures and trials table."""
    from cnnpipe.tracking import Tracker

    if not space:
        raise CnnpipeError("tune.space: expected at least one dimension, e.g. train.lr: {log_uniform: [0.01, 1.0]}")
    if not cfg.n_trials and not cfg.timeout and cfg.sampler != "grid":
        raise CnnpipeError("tune: give a budget, tune.n_trials or tune.timeout (both are 0)")
    check_val_held_out(params, space, cfg.metric)
    for path, what in ((data / MANIFEST_FILE, "dataset"), (augmented / MANIFEST_FILE, "augmented dataset")):
        if not path.exists():
            raise CnnpipeError(f"{what} '{path.parent}' not found (run `dvc repro augment` first)")
    url = storage_url(cfg, tracking)
    storage = _storage(url)
    study = optuna.create_study(study_name=cfg.study, storage=storage, direction=cfg.direction, load_if_exists=True)
    if study.direction.name.lower() != cfg.direction:
        raise CnnpipeError(f"tune.direction: study {cfg.study!r} in {url} was created to {study.direction.name.lower()}; "
                           f"use another tune.study to {cfg.direction}")
    recorded = study.user_attrs.get(SPACE_ATTR)
    if recorded is not None and recorded != _space_record(space):
        raise CnnpipeError(f"tune.space: study {cfg.study!r} in {url} was created with another space ({recorded}); "
                           f"use another tune.study for a new space")
    abandoned = _fail_abandoned(study)
    if abandoned:
        print(f"tune: {abandoned} trial(s) left running by an interrupted run marked failed", file=sys.stderr)
    if PARENT_ATTR in study.user_attrs:
        parent = Tracker.reopen(tracking, study.user_attrs[PARENT_ATTR], f"study {cfg.study} in {url}")
    else:
        parent = Tracker.start(tracking, run_name=cfg.study, tags={"cnnpipe.tune": cfg.study})
        parent.log_params({k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("storage", "space")},
                          prefix="tune.")
        parent.log_params({"space": _space_record(space), "storage": url}, prefix="tune.")
        study.set_user_attr(PARENT_ATTR, parent.run_id)
        study.set_user_attr(SPACE_ATTR, _space_record(space))
    if cfg.pruner != "none" and (params.get("train") or {}).get("val_every", 1) != 1 and "train.val_every" not in space:
        print(f"tune: train.val_every {params['train']['val_every']}: trials validate every epoch (tune.pruner "
              f"{cfg.pruner} compares them epoch by epoch)", file=sys.stderr)
    job = Job(cfg, space, params, tracking, url, data, augmented, out, parent.run_id)
    try:
        if cfg.jobs == 1:
            _work(job, 0)
        else:
            _run_workers(job)
        summary = _summarize(job, parent)
    except BaseException:
        parent.finish(ok=False)
        raise
    parent.finish(ok=True)
    return summary


def _run_workers(job: Job) -> None:
    # spawned, not forked: torch and the MLflow client must start fresh in every process
    context = multiprocessing.get_context("spawn")
    job = dataclasses.replace(job, threads=max(1, available_cores() // job.cfg.jobs))
    workers = [context.Process(target=_work, args=(job, i)) for i in range(job.cfg.jobs)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    failed = [w.exitcode for w in workers if w.exitcode != 0]
    if failed:
        raise CnnpipeError(f"tune: {len(failed)} of {len(workers)} trial processes failed (exit codes {failed}); "
                           f"finished trials are kept in the study, run `cnnpipe tune` again to continue")


def _summarize(job: Job, parent: Any) -> dict:
    """Mirror every trial's state onto its child run; write and log the trials table, best trial and figures."""
    from cnnpipe.tracking import Tracker

    cfg = job.cfg
    study = optuna.load_study(study_name=cfg.study, storage=_storage(job.storage))
    children = {c.data.tags.get(TRIAL_TAG): c for c in parent.child_runs()}
    rows = []
    for t in study.get_trials(deepcopy=False):
        child = children.get(str(t.number))
        state = t.state.name.lower()
        if child is not None:
            run = Tracker(job.tracking.uri, child.info.run_id)
            run.set_tags({"tune.state": state})
            run.log_params(t.params, prefix="tune.")
            if t.datetime_complete is not None:
                run.log_metrics({"tune/duration_seconds": _seconds(t)})
            if state == "pruned":
                run.set_status("KILLED")
            elif state == "fail" and child.info.status == "RUNNING":
                run.set_status("FAILED")
        rows.append({"trial": t.number, "state": state, "value": t.value, "epochs": len(t.intermediate_values),
                     "seconds": round(_seconds(t), 1), **t.params,
                     "run_id": child.info.run_id if child is not None else ""})
    figures = job.out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    with atomic_file(job.out / "trials.csv") as tmp:
        import pandas as pd

        pd.DataFrame(rows).to_csv(tmp, index=False)
    parent.log_artifact(job.out / "trials.csv", "tune")
    drawn = _figures(study, figures)
    for path in drawn:
        parent.log_artifact(path, "tune/figures")
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    counts = {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "fail")}
    parent.log_metrics({f"tune/{k}_trials": v for k, v in counts.items()})
    summary = {"study": cfg.study, "storage": job.storage, "parent_run_id": parent.run_id, "trials": len(rows),
               **{f"{k}_trials": v for k, v in counts.items()}, "table": str(job.out / "trials.csv"),
               "figures": [str(p) for p in drawn]}
    if complete:
        best = study.best_trial
        write_json(job.out / "best.json", {"trial": best.number, "value": best.value, "metric": cfg.metric,
                                           "params": best.params})
        parent.log_artifact(job.out / "best.json", "tune")
        parent.log_metrics({f"best/{cfg.metric}": best.value})
        parent.set_tags({"tune.best_trial": str(best.number), "tune.best_params": json.dumps(best.params),
                         "tune.best_run": rows[best.number]["run_id"] if best.number < len(rows) else ""})
        summary |= {"best_trial": best.number, "best_value": best.value, "best_params": best.params}
    return summary


def _figures(study: optuna.Study, folder: Path) -> list[Path]:
    """Optuna's own plots of the study, as PNG files (param importances need two complete trials)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    wanted = {"optimization_history": plots.plot_optimization_history,
              "parallel_coordinate": plots.plot_parallel_coordinate}
    if len(complete) >= 2 and len({json.dumps(t.params, sort_keys=True) for t in complete}) >= 2:
        wanted["param_importances"] = plots.plot_param_importances
    drawn = []
    for name, plot in wanted.items():
        with warnings.catch_warnings():  # Optuna marks its matplotlib backend experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            ax = plot(study)
        figure = (ax.flat[0] if isinstance(ax, np.ndarray) else ax).figure
        figure.set_size_inches(9, 5)
        figure.tight_layout()
        with atomic_file(folder / f"{name}.png") as tmp:
            figure.savefig(tmp, format="png", dpi=100)
        plt.close(figure)
        drawn.append(folder / f"{name}.png")
    return drawn


def apply(cfg: TuneConfig, tracking: TrackingConfig, params_path: Path) -> dict:
    """Write the best trial's values into `params_path`, keeping its comments and layout."""
    from ruamel.yaml import YAML

    url = storage_url(cfg, tracking)
    try:
        study = optuna.load_study(study_name=cfg.study, storage=_storage(url))
    except KeyError:
        raise CnnpipeError(f"tune.study: no study {cfg.study!r} in {url} (run `cnnpipe tune` first)") from None
    try:
        best = study.best_trial
    except ValueError:
        raise CnnpipeError(f"tune.study: study {cfg.study!r} in {url} has no complete trial yet") from None
    yaml = YAML()  # round-trip: comments, order and quoting survive
    yaml.preserve_quotes = True
    yaml.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc = yaml.load(params_path.read_text())
    changed = {}
    for key, value in best.params.items():
        block, _, name = key.partition(".")
        if doc.get(block) is None:
            raise CnnpipeError(f"params file '{params_path}': missing block '{block}' to apply {key} to")
        if doc[block].get(name) != value:
            changed[key] = {"from": doc[block].get(name), "to": value}
        doc[block][name] = value
    with atomic_file(params_path) as tmp, open(tmp, "w") as f:
        yaml.dump(doc, f)
    return {"study": cfg.study, "best_trial": best.number, "best_value": best.value, "applied": best.params,
            "changed": changed, "params": str(params_path)}
