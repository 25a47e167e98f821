"""cnnpipe tune: the search space's validation, a study on digits with pruning, MLflow child runs and
figures, --apply into params.yaml and `dvc repro` of the winner, resuming after a kill, the Katib Experiment."""

from __future__ import annotations

import json
import shutil

import optuna
import pytest
import yaml

from cnnpipe.config import TrackingConfig
from cnnpipe.errors import CnnpipeError
from cnnpipe.search import tune
from cnnpipe.search.space import load_tune
from cnnpipe.tracking import PID_TAG, owner_tags
from tests.helpers import REPO, cnnpipe, make_workspace, run, write_tiny_dataset

PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def with_tune(**tune_block) -> dict:
    return {**PARAMS, "tune": tune_block}


def test_the_shipped_tune_block_is_valid():
    cfg, space = load_tune(PARAMS, {})
    assert cfg.sampler == "tpe" and cfg.metric == "val/accuracy"
    assert space["train.width"].kind == "choice" and space["train.width"].values == (8, 16, 32)
    assert space["train.lr"].kind == "log_uniform" and not space["train.lr"].integer


@pytest.mark.parametrize("entry, message", [
    ({"train.depth": {"choice": [1, 2]}}, r"tune.space.train.depth: 'depth' is not a field of train"),
    ({"evaluate.batch_size": {"choice": [1, 2]}}, r"tune.space.evaluate.batch_size: expected a key augment.FIELD"),
    ({"train.lr": {"gaussian": [0, 1]}}, r"tune.space.train.lr: expected one of \{uniform"),
    ({"train.lr": {"uniform": [0.5, 0.1]}}, r"tune.space.train.lr: uniform expects \[low, high\] with low < high"),
    ({"train.lr": {"log_uniform": [0, 0.1]}}, r"tune.space.train.lr: log_uniform expects low > 0"),
    ({"augment.rotate": {"uniform": [0, 400]}}, r"tune.space.augment.rotate: value 400: expected <= 180"),
    ({"train.arch": {"uniform": [1, 2]}}, r"tune.space.train.arch: uniform needs a numeric field"),
    ({"train.optimizer": {"choice": ["sgd", "lbfgs"]}}, r"tune.space.train.optimizer: value 'lbfgs': expected one of"),
    ({"train.width": {"choice": []}}, r"tune.space.train.width: choice expects a non-empty list"),
])
def test_a_bad_space_entry_is_one_line_naming_the_key(entry, message):
    with pytest.raises(CnnpipeError, match=message) as e:
        load_tune(with_tune(space=entry), {})
    assert "\n" not in str(e.value)


def test_a_bad_setting_is_named_like_any_block():
    with pytest.raises(CnnpipeError, match=r"tune.sampler: expected one of tpe, random, grid"):
        load_tune(with_tune(sampler="bayes"), {})
    with pytest.raises(CnnpipeError, match=r"--jobs: expected an integer"):
        load_tune(with_tune(), {"jobs": "two"})


def test_grid_values_span_each_dimension():
    _, space = load_tune(with_tune(space={"train.lr": {"log_uniform": [0.01, 1.0]}, "train.width": {"uniform": [8, 16]},
                                          "train.optimizer": {"choice": ["sgd", "adam"]}}), {})
    assert tune.grid_values(space["train.lr"], 3) == pytest.approx([0.01, 0.1, 1.0])
    assert tune.grid_values(space["train.width"], 3) == [8, 12, 16]
    assert tune.grid_values(space["train.optimizer"], 3) == ["sgd", "adam"]


def test_apply_writes_the_best_trial_and_keeps_comments(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    cfg, space = load_tune(PARAMS, {"storage": f"sqlite:///{tmp_path / 'optuna.db'}", "study": "s"})
    study = optuna.create_study(study_name="s", storage=cfg.storage, direction="maximize")
    dists = {"train.lr": optuna.distributions.FloatDistribution(0.01, 0.3, log=True),
             "train.width": optuna.distributions.CategoricalDistribution([8, 16, 32]),
             "augment.rotate": optuna.distributions.FloatDistribution(0, 20)}
    for value, lr in ((0.9, 0.02), (0.97, 0.123)):
        study.add_trial(optuna.trial.create_trial(
            params={"train.lr": lr, "train.width": 32, "augment.rotate": 5.5}, distributions=dists, value=value))
    result = tune.apply(cfg, TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), params)
    assert result["best_value"] == 0.97
    after = yaml.safe_load(params.read_text())
    assert (after["train"]["lr"], after["train"]["width"], after["augment"]["rotate"]) == (0.123, 32, 5.5)
    text = params.read_text()
    # comments and layout survive
    assert "channels_last: true   # faster convolutions (benchmarks/results/train_throughput.json)" in text
    assert "  path: null            # the source's archive" in text
    before = (REPO / "params.yaml").read_text().splitlines()
    assert sum(a != b for a, b in zip(before, text.splitlines())) == 3 and len(before) == len(text.splitlines())


def test_apply_without_a_study_is_a_clear_error(tmp_path):
    cfg, _ = load_tune(PARAMS, {"storage": f"sqlite:///{tmp_path / 'optuna.db'}", "study": "none"})
    with pytest.raises(CnnpipeError, match="no study 'none'"):
        tune.apply(cfg, TrackingConfig(), tmp_path / "params.yaml")


def dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_only_trials_no_process_works_on_are_failed(tmp_path):
    """A second `cnnpipe tune` on the study leaves the first one's running trial alone (it failed it before)."""
    import sqlite3
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}",
                                             heartbeat_interval=tune.HEARTBEAT_SECONDS, grace_period=tune.GRACE_SECONDS)
    study = optuna.create_study(study_name="s", storage=storage)
    with warnings.catch_warnings():  # "Heartbeat of storage is supposed to be used with Study.optimize"
        warnings.simplefilter("ignore", UserWarning)
        live, killed, stale, unowned = [study.ask() for _ in range(4)]
    live.set_user_attr(tune.OWNER_ATTR, owner_tags())  # this process: alive, beating
    killed.set_user_attr(tune.OWNER_ATTR, {**owner_tags(), PID_TAG: str(dead_pid())})
    stale.set_user_attr(tune.OWNER_ATTR, owner_tags())
    for t in (live, stale):
        storage.record_heartbeat(t._trial_id)
    db = sqlite3.connect(tmp_path / "optuna.db")  # the stale one last beat an hour ago
    db.execute("update trial_heartbeats set heartbeat = datetime(heartbeat, '-1 hour') where trial_id = ?",
               (stale._trial_id,))
    db.commit()
    assert tune._fail_abandoned(study) == 2
    states = {t.number: t.state.name for t in study.get_trials()}
    assert states == {live.number: "RUNNING", killed.number: "FAIL", stale.number: "FAIL", unowned.number: "RUNNING"}


@pytest.mark.e2e
def test_resume_fails_an_abandoned_trial_and_counts_finished_trials(tmp_path, monkeypatch):
    """A study killed mid-trial (a trial left RUNNING) continues: that trial is failed, not counted, and
    the budget is met with finished trials; every trial of both runs is a child of the one parent run."""
    from cnnpipe.config import AugmentConfig
    from cnnpipe.stages import augment

    monkeypatch.chdir(tmp_path)
    data = write_tiny_dataset(tmp_path / "processed", classes=3, size=8)
    augment.run(cfg=AugmentConfig(), data=data, augmented=tmp_path / "augmented")
    params = {"augment": {}, "train": {"arch": "mlp", "width": 8, "epochs": 2, "batch_size": 8, "device": "cpu"},
              "tune": {"study": "r", "storage": f"sqlite:///{tmp_path / 'optuna.db'}", "n_trials": 3, "pruner": "none",
                       "space": {"train.lr": {"log_uniform": [0.01, 0.5]}}}}
    tracking = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="t")
    cfg, space = load_tune(params, {})
    killed = optuna.create_study(study_name="r", storage=cfg.storage, direction="maximize")
    # what a killed process leaves behind: a trial RUNNING forever, its owner dead
    killed.ask().set_user_attr(tune.OWNER_ATTR, {**owner_tags(), PID_TAG: str(dead_pid())})

    first = tune.run(cfg, space, params, tracking, data, tmp_path / "augmented", tmp_path / "out")
    states = [t.state.name for t in optuna.load_study(study_name="r", storage=cfg.storage).trials]
    assert states == ["FAIL", "COMPLETE", "COMPLETE", "COMPLETE"]
    assert (first["complete_trials"], first["fail_trials"]) == (3, 1)
    from cnnpipe.engine.model_folder import read_history, read_train_config

    for trial in optuna.load_study(study_name="r", storage=cfg.storage).get_trials(states=tune.FINISHED):
        model = tmp_path / "out" / "trials" / f"{trial.number:04d}" / "model"
        kept = read_train_config(model)["kept_epoch"]  # the weights train.keep ships: the value tune reports
        assert trial.value == pytest.approx(float(read_history(model)[kept - 1][cfg.metric]))

    cfg, space = load_tune(params, {"n_trials": 4})
    again = tune.run(cfg, space, params, tracking, data, tmp_path / "augmented", tmp_path / "out")
    assert again["parent_run_id"] == first["parent_run_id"] and again["complete_trials"] == 4
    from mlflow import MlflowClient

    children = MlflowClient(tracking.uri).search_runs(
        [MlflowClient(tracking.uri).get_run(first["parent_run_id"]).info.experiment_id],
        f"tags.mlflow.parentRunId = '{first['parent_run_id']}'")
    assert sorted(c.data.tags[tune.TRIAL_TAG] for c in children) == ["1", "2", "3", "4"]
    assert {c.data.tags["tune.state"] for c in children} == {"complete"}

    params["tune"]["space"] = {"train.lr": {"uniform": [0.01, 0.5]}}
    with pytest.raises(CnnpipeError, match="was created with another space"):
        tune.run(*load_tune(params, {}), params, tracking, data, tmp_path / "augmented", tmp_path / "out")


@pytest.mark.e2e
def test_study_on_digits_prunes_logs_applies_and_dvc_repro_trains_the_winner(tmp_path):
    ws = make_workspace(tmp_path)
    text = (REPO / "params.yaml").read_text()  # tiny trials: the test is about the machinery, not accuracy
    for old, new in (("  epochs: 12", "  epochs: 3"), ("  width: 16", "  width: 8"), ("  n_trials: 20", "  n_trials: 6"),
                     ("  startup_trials: 5", "  startup_trials: 2"), ("  tsne_samples: 2000", "  tsne_samples: 0"),
                     ("train.lr: {log_uniform: [0.01, 0.3]}", "train.lr: {log_uniform: [0.001, 0.5]}"),
                     ("train.width: {choice: [8, 16, 32]}", "train.width: {choice: [4, 8]}")):
        assert old in text, old
        text = text.replace(old, new)
    (ws / "params.yaml").write_text(text)
    run(["dvc", "repro", "augment"], ws)

    proc = cnnpipe("tune", cwd=ws)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["trials"] == 6 and result["pruned_trials"] >= 1 and result["complete_trials"] >= 2, result
    assert (ws / "optuna.db").exists()  # beside the MLflow store
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    parent = client.get_run(result["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 6
    by_state = {c.data.tags["tune.state"]: c for c in children}
    assert by_state["pruned"].info.status == "KILLED" and by_state["complete"].info.status == "FINISHED"
    for child in children:
        assert "tune/duration_seconds" in child.data.metrics and "tune.train.lr" in child.data.params
        assert len(client.get_metric_history(child.info.run_id, "val/accuracy")) >= 1
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "tune/figures")}
    assert {"tune/figures/optimization_history.png", "tune/figures/parallel_coordinate.png",
            "tune/figures/param_importances.png"} <= artifacts
    assert "tune/trials.csv" in {a.path for a in client.list_artifacts(parent.info.run_id, "tune")}
    assert parent.data.metrics["best/val/accuracy"] == pytest.approx(result["best_value"])

    proc = cnnpipe("tune", "--apply", cwd=ws)
    assert proc.returncode == 0, proc.stderr
    best = result["best_params"]
    applied = yaml.safe_load((ws / "params.yaml").read_text())
    assert applied["train"]["lr"] == best["train.lr"] and applied["train"]["width"] == best["train.width"]
    assert applied["augment"]["rotate"] == best["augment.rotate"]

    out = run(["dvc", "repro", "train"], ws)  # evaluate and register follow as in any `dvc repro`
    for stage in ("augment", "train"):
        assert f"Running stage '{stage}'" in out
    trained = json.loads((ws / "data/model/train_config.json").read_text())["train"]
    assert (trained["lr"], trained["width"]) == (best["train.lr"], best["train.width"])
    assert json.loads((ws / "data/augmented/policy.json").read_text())["rotate"] == best["augment.rotate"]


def test_katib_experiment_serializes_and_reads_back_through_katib_models(tmp_path):
    from kubeflow.katib import ApiClient, models

    from cnnpipe.pipeline import katib

    params = with_tune(**{**PARAMS["tune"], "jobs": 2, "n_trials": 12})
    cfg, space = load_tune(params, {})
    out = katib.write_experiment(tmp_path / "exp.yaml", cfg, space, params, "http://mlflow:5000")
    manifest = yaml.safe_load(out.read_text())
    assert manifest["apiVersion"] == "kubeflow.org/v1beta1" and manifest["kind"] == "Experiment"
    spec = manifest["spec"]
    assert (spec["maxTrialCount"], spec["parallelTrialCount"], spec["algorithm"]["algorithmName"]) == (12, 2, "tpe")
    assert spec["objective"] == {"objectiveMetricName": "val", "type": "maximize"}
    assert spec["earlyStopping"]["algorithmName"] == "medianstop"
    by_name = {p["name"]: p for p in spec["parameters"]}
    assert by_name["train-lr"]["feasibleSpace"] == {"distribution": "logUniform", "max": "0.3", "min": "0.01"}
    assert by_name["train-width"]["parameterType"] == "categorical"
    assert by_name["augment-rotate"]["parameterType"] == "double"
    command = spec["trialTemplate"]["trialSpec"]["spec"]["template"]["spec"]["containers"][0]["command"][2]
    assert "--lr=${trialParameters.train-lr}" in command and "--rotate=${trialParameters.augment-rotate}" in command
    # Katib's own deserializer reads it back into the same model objects
    back = ApiClient()._ApiClient__deserialize(manifest, "V1beta1Experiment")
    assert isinstance(back, models.V1beta1Experiment)
    assert back == ApiClient()._ApiClient__deserialize(json.loads(json.dumps(manifest)), "V1beta1Experiment")
    assert back.spec.parameters[0].feasible_space.distribution == "logUniform"

    # the collector's filter really reads train's per-epoch line
    import re

    line = "epoch 3/12  train loss 0.4000 acc 0.9000  val loss 0.2465 acc 0.9218  3140 img/s (0.4 s)"
    assert re.search(spec["metricsCollectorSpec"]["source"]["filter"]["metricsFormat"][0], line).groups() == \
        ("val", "0.9218")


def test_katib_grid_uses_the_same_values_and_rejects_what_katib_lacks(tmp_path):
    from cnnpipe.pipeline import katib

    cfg, space = load_tune(with_tune(**{**PARAMS["tune"], "sampler": "grid"}), {})
    manifest = yaml.safe_load(katib.write_experiment(tmp_path / "g.yaml", cfg, space, PARAMS, "x").read_text())
    lr = next(p for p in manifest["spec"]["parameters"] if p["name"] == "train-lr")
    assert [float(v) for v in lr["feasibleSpace"]["list"]] == pytest.approx(tune.grid_values(space["train.lr"], 3))
    cfg, space = load_tune(with_tune(**{**PARAMS["tune"], "pruner": "successive_halving"}), {})
    with pytest.raises(CnnpipeError, match="Katib has no successive-halving"):
        katib.experiment(cfg, space, PARAMS, "x")
    manifest["spec"]["trialTemplate"]["trialSpec"] = {}
    with pytest.raises(CnnpipeError, match="'train-lr' is not used in the trial spec"):
        katib.check(manifest)


def test_searches_refuse_to_train_trials_on_the_val_split_they_rank_by(tmp_path):
    """train.train_on_val set, or searched over: Optuna and Katib both refuse in one line before any trial."""
    from cnnpipe.pipeline import katib

    on = {**PARAMS, "train": {**PARAMS["train"], "train_on_val": True}}
    searched = with_tune(**{**PARAMS["tune"], "space": {"train.train_on_val": {"choice": [False, True]}}})
    refused = r"^train.train_on_val: a search ranks trials by the val split's val/accuracy, which the trials would"
    for params in (on, searched):
        cfg, space = load_tune(params, {})
        with pytest.raises(CnnpipeError, match=refused):
            tune.run(cfg, space, params, TrackingConfig(), tmp_path, tmp_path, tmp_path / "out")
        with pytest.raises(CnnpipeError, match=refused) as e:
            katib.experiment(cfg, space, params, "x")
        assert "\n" not in str(e.value)


@pytest.mark.e2e  # whole stages on real models: seconds each, so not in the unit tier
def test_pipeline_compile_tune_writes_the_experiment(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    proc = cnnpipe("pipeline", "compile", "--tune", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["compiled"] == "katib-experiment.yaml"
    assert yaml.safe_load((tmp_path / "katib-experiment.yaml").read_text())["kind"] == "Experiment"


@pytest.mark.e2e
def test_katib_trial_command_runs_and_its_metric_line_is_collected(tmp_path):
    """The trial container's command, with Katib's substitution done by hand, run here: the stages accept
    every flag, and the collector's filter finds the objective in what train prints."""
    import os
    import re
    import subprocess

    from kubeflow.katib import ApiClient

    from cnnpipe.pipeline import katib

    params = {**PARAMS, "train": {**PARAMS["train"], "epochs": 1}}
    cfg, space = load_tune(params, {})
    manifest = ApiClient().sanitize_for_serialization(katib.experiment(cfg, space, params, f"sqlite:///{tmp_path / 'm.db'}",
                                                        workdir=str(tmp_path / "trial")))
    container = manifest["spec"]["trialTemplate"]["trialSpec"]["spec"]["template"]["spec"]["containers"][0]
    values = {"train-lr": "0.05", "train-width": "8", "augment-rotate": "5.0"}
    command = re.sub(r"\$\{trialParameters\.([\w-]+)\}", lambda m: values[m.group(1)], container["command"][2])
    env = {**os.environ, **{e["name"]: e["value"] for e in container["env"]}}
    proc = subprocess.run(["sh", "-c", command], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = json.loads((tmp_path / "trial/model/train_config.json").read_text())["train"]
    assert (trained["lr"], trained["width"]) == (0.05, 8)
    found = re.findall(manifest["spec"]["metricsCollectorSpec"]["source"]["filter"]["metricsFormat"][0],
                       proc.stdout + proc.stderr)
    assert len(found) == 1 and found[0][0] == "val" and 0 < float(found[0][1]) <= 1


def test_trials_validate_every_epoch_for_the_pruner():
    """configs/gtsrb-fast.yaml validates its last epoch only (train.val_every 0); a pruner compares trials epoch by
    epoch, so its trials validate every epoch, unless the space tunes val_every; without a pruner the params stand."""
    params = {"train": {"val_every": 0, "lr": 0.1}}
    assert tune.trial_configs(params, {}, pruning=True)[1].val_every == 1
    assert tune.trial_configs(params, {"train.val_every": 3}, pruning=True)[1].val_every == 3
    assert tune.trial_configs(params, {"train.lr": 0.2}, pruning=False)[1].val_every == 0
