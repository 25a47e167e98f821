"""The tune block's search as a Katib Experiment (Kubeflow's tuner), built from Katib's own API models.

Each Katib trial is a Kubernetes Job running the project's image: ingest, augment and train with the
trial's values as flags, the params file coming from an environment variable. Katib's StdOut metrics
collector reads train's per-epoch line (`... val loss 0.1234 acc 0.9650 ...`) as the metric `val`
(accuracy) or `val` (loss), per epoch, which its median-stop early stopping also uses.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Any

import yaml
from kubeflow.katib import ApiClient, models

from cnnpipe.config import TuneConfig
from cnnpipe.search.space import Dimension, check_val_held_out
from cnnpipe.errors import CnnpipeError
from cnnpipe.fsio import atomic_file
from cnnpipe.search.tune import grid_values
from cnnpipe.components.stages import IMAGE
from cnnpipe.pipeline.training import cnnpipe_pipeline

ALGORITHMS = {"tpe": "tpe", "random": "random", "grid": "grid"}  # Katib's suggestion services
# Katib's StdOut collector: a regex with two groups, the metric's name and its value
METRIC_FORMATS = {"val/accuracy": r"(val) loss [-+.0-9eE]+ acc ([-+.0-9eE]+)",
                  "val/loss": r"(val) loss ([-+.0-9eE]+)"}
# the pipeline's in-cluster tracking server, when no --tracking-uri is given
CLUSTER_TRACKING_URI = inspect.signature(cnnpipe_pipeline.pipeline_func).parameters["tracking_uri"].default
PARAMS_ENV = "CNNPIPE_PARAMS"  # the params file (as JSON, which is YAML) every step of a trial reads


def _name(key: str) -> str:
    """A Katib parameter name (DNS-label-like) for a params key: train.lr -> train-lr."""
    return key.replace(".", "-").replace("_", "-")


def _parameter(dim: Dimension, cfg: TuneConfig) -> models.V1beta1ParameterSpec:
    if cfg.sampler == "grid" or dim.kind == "choice":  # a grid is the same list of values as `cnnpipe tune`'s
        values = grid_values(dim, cfg.grid_points) if cfg.sampler == "grid" else list(dim.values)
        return models.V1beta1ParameterSpec(name=_name(dim.key), parameter_type="categorical",
                                           feasible_space=models.V1beta1FeasibleSpace(list=[str(v) for v in values]))
    space = models.V1beta1FeasibleSpace(min=str(dim.values[0]), max=str(dim.values[1]),
                                        distribution="logUniform" if dim.kind == "log_uniform" else "uniform")
    return models.V1beta1ParameterSpec(name=_name(dim.key), parameter_type="int" if dim.integer else "double",
                                       feasible_space=space)


def _command(space: dict[str, Dimension], workdir: str) -> str:
    """ingest -> augment -> train in one container, each tuned knob a flag of its stage."""
    def flags(block: str) -> str:
        return "".join(f" --{key.split('.', 1)[1].replace('_', '-')}=${{trialParameters.{_name(key)}}}"
                       for key in space if key.startswith(f"{block}."))

    w, p = workdir, f"--params {workdir}/params.yaml"
    return (f'mkdir -p {w} && printf "%s" "${PARAMS_ENV}" > {w}/params.yaml'
            f" && cnnpipe ingest {p} --out {w}/processed --report {w}/ingest_report.json"
            f" && cnnpipe augment {p} --data {w}/processed --out {w}/augmented{flags('augment')}"
            f" && cnnpipe train {p} --data {w}/processed --augmented {w}/augmented --out {w}/model"
            f" --checkpoint {w}/train.pt{flags('train')}")


def experiment(cfg: TuneConfig, space: dict[str, Dimension], params: dict[str, Any], tracking_uri: str,
               image: str = IMAGE, workdir: str = "/tmp/cnnpipe") -> models.V1beta1Experiment:
    """The Katib Experiment of this search: same space, metric, budget, parallelism and early stopping."""
    if not space:
        raise CnnpipeError("tune.space: expected at least one dimension to compile a Katib Experiment")
    check_val_held_out(params, space, cfg.metric)
    if cfg.pruner == "successive_halving":
        raise CnnpipeError("tune.pruner: Katib has no successive-halving early stopping; use median (Katib's "
                           "medianstop) or none")
    early = None
    if cfg.pruner == "median":
        early = models.V1beta1EarlyStoppingSpec(algorithm_name="medianstop", algorithm_settings=[
            models.V1beta1EarlyStoppingSetting(name="min_trials_required", value=str(max(1, cfg.startup_trials))),
            models.V1beta1EarlyStoppingSetting(name="start_step", value=str(cfg.warmup_epochs))])
    settings = [models.V1beta1AlgorithmSetting(name="random_state", value=str(cfg.seed))] \
        if cfg.sampler != "grid" else None
    container = {"name": "training-container", "image": image, "command": ["sh", "-c", _command(space, workdir)],
                 "env": [{"name": PARAMS_ENV, "value": json.dumps(params)},
                         {"name": "MLFLOW_TRACKING_URI", "value": tracking_uri}]}
    trial_spec = {"apiVersion": "batch/v1", "kind": "Job",
                  "spec": {"template": {"spec": {"containers": [container], "restartPolicy": "Never"}}}}
    name = re.sub(r"[^a-z0-9-]+", "-", cfg.study.lower()).strip("-") or "cnnpipe-tune"
    return models.V1beta1Experiment(
        api_version="kubeflow.org/v1beta1", kind="Experiment",
        metadata={"name": name},
        spec=models.V1beta1ExperimentSpec(
            objective=models.V1beta1ObjectiveSpec(type=cfg.direction, objective_metric_name="val"),
            algorithm=models.V1beta1AlgorithmSpec(algorithm_name=ALGORITHMS[cfg.sampler], algorithm_settings=settings),
            early_stopping=early,
            max_trial_count=cfg.n_trials or None,
            parallel_trial_count=cfg.jobs,
            max_failed_trial_count=max(1, cfg.n_trials // 4) if cfg.n_trials else None,
            metrics_collector_spec=models.V1beta1MetricsCollectorSpec(
                collector=models.V1beta1CollectorSpec(kind="StdOut"),
                source=models.V1beta1SourceSpec(filter=models.V1beta1FilterSpec(
                    metrics_format=[METRIC_FORMATS[cfg.metric]]))),
            parameters=[_parameter(d, cfg) for d in space.values()],
            trial_template=models.V1beta1TrialTemplate(
                primary_container_name="training-container",
                trial_parameters=[models.V1beta1TrialParameterSpec(name=_name(k), reference=_name(k),
                                                                   description=f"params.yaml {k}") for k in space],
                trial_spec=trial_spec),
        ))


def check(manifest: dict[str, Any]) -> None:
    """What Katib's admission webhook checks of the trial template: every parameter is a trial parameter
    and every trial parameter is used in the trial spec (else Katib rejects the Experiment)."""
    spec = manifest["spec"]
    names = {p["name"] for p in spec["parameters"]}
    trial_params = {p["name"]: p["reference"] for p in spec["trialTemplate"]["trialParameters"]}
    text = json.dumps(spec["trialTemplate"]["trialSpec"])
    for name, reference in trial_params.items():
        if reference not in names:
            raise CnnpipeError(f"Katib trial parameter {name!r} references no parameter of the Experiment")
        if f"${{trialParameters.{name}}}" not in text:
            raise CnnpipeError(f"Katib trial parameter {name!r} is not used in the trial spec")


def write_experiment(output: Path, cfg: TuneConfig, space: dict[str, Dimension], params: dict[str, Any],
                     tracking_uri: str) -> Path:
    """Serialize the Experiment as Katib's API client would send it, check it, write it as YAML."""
    manifest = ApiClient().sanitize_for_serialization(experiment(cfg, space, params, tracking_uri))
    check(manifest)
    with atomic_file(output) as tmp:
        tmp.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return output
