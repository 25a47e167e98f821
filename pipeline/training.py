"""The cnnpipe pipeline for Kubeflow Pipelines v2: compile it, submit it, or run it on this machine.

Pipeline parameters: the params.yaml text every component reads its block from, and the overrides
users reach for (dataset source and path, architecture, epochs, batch size, learning rate, model
name, promotion rule) plus the MLflow tracking URI every component logs to.
"""

# no `from __future__ import annotations`: KFP reads the pipeline signature's types at runtime

import json
from pathlib import Path

import yaml
from kfp import compiler, dsl

from components import stages


def params_text(path: Path) -> str:
    """A params.yaml as one line of JSON: KFP copies parameter defaults into a comment header of the
    compiled YAML, where a multi-line default would break out of the comment."""
    return json.dumps(yaml.safe_load(path.read_text()))


def _default_params() -> str:
    """Every block at its dataclass defaults: the pipeline imports without a params.yaml beside it."""
    import dataclasses

    from cnnpipe.config import BLOCKS

    return json.dumps({name: dataclasses.asdict(cls()) for name, cls in BLOCKS.items()})


DEFAULT_PARAMS = _default_params()


@dsl.pipeline(name="cnnpipe", description="ingest -> augment -> train -> evaluate -> register (+ promote)")
def cnnpipe_pipeline(params: str = DEFAULT_PARAMS, source: str = "", path: str = "", arch: str = "cnn3",
                     epochs: int = 12, batch_size: int = 64, lr: float = 0.05, model_name: str = "cnnpipe-digits",
                     promotion_metric: str = "accuracy", min_delta: float = 0.001,
                     tracking_uri: str = "http://mlflow.mlflow.svc.cluster.local:5000") -> str:
    data = stages.ingest(params=params, source=source, path=path)
    aug = stages.augment(params=params, data=data.outputs["dataset"])
    fit = stages.train(params=params, arch=arch, epochs=epochs, batch_size=batch_size, lr=lr, tracking_uri=tracking_uri,
                       data=data.outputs["dataset"], augmented=aug.outputs["augmented"])
    # the one step that wants a GPU; the others are CPU-bound data work
    fit.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1).set_cpu_limit("8").set_memory_limit("32G")
    scores = stages.evaluate(params=params, tracking_uri=tracking_uri, model=fit.outputs["model"],
                             data=data.outputs["dataset"])
    reg = stages.register(params=params, model_name=model_name, promotion_metric=promotion_metric, min_delta=min_delta,
                          tracking_uri=tracking_uri, model=fit.outputs["model"], data=data.outputs["dataset"],
                          evaluation=scores.outputs["evaluation"])
    # data steps are pure functions of their inputs: cache them; training, evaluation and registration
    # log to MLflow, so they run every time
    for task in (fit, scores, reg):
        task.set_caching_options(False)
    return reg.outputs["Output"]  # the registered model's URI

def typed_arguments(raw: dict) -> dict:
    """`-p key=value` strings as the pipeline signature's types; an unknown key is a clear error."""
    import inspect

    from cnnpipe.errors import CnnpipeError

    signature = inspect.signature(cnnpipe_pipeline.pipeline_func)
    out = {}
    for key, value in raw.items():
        if key not in signature.parameters:
            raise CnnpipeError(f"pipeline parameter {key!r} does not exist (expected one of: "
                               f"{', '.join(signature.parameters)})")
        kind = signature.parameters[key].annotation
        try:
            out[key] = kind(value) if isinstance(value, str) and kind in (int, float) else value
        except ValueError:
            raise CnnpipeError(f"pipeline parameter {key}: expected {kind.__name__}, got {value!r}") from None
    return out


def compile_pipeline(output: Path, params: str) -> Path:
    """Write the pipeline YAML with `params` (a params.yaml as JSON text) as the default of its `params`."""
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(cnnpipe_pipeline, str(output), pipeline_parameters={"params": params})
    return output


def submit(host: str, arguments: dict, experiment: "str | None", run_name: "str | None", caching: bool) -> dict:
    import kfp

    client = kfp.Client(host=host)
    run = client.create_run_from_pipeline_func(cnnpipe_pipeline, arguments=arguments, run_name=run_name,
                                               experiment_name=experiment, enable_caching=caching)
    return {"run_id": run.run_id, "url": f"{host.rstrip('/')}/#/runs/details/{run.run_id}"}


def run_local(arguments: dict, root: Path, caching: bool) -> dict:
    """The whole pipeline on this machine, every component a subprocess of this environment."""
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root / "outputs"),
               enable_caching=caching, cache_root=str(root / "cache"))
    try:
        task = cnnpipe_pipeline(**arguments)
    except RuntimeError as e:  # kfp.local: a task ended in FAILURE (its log is above)
        import re

        from cnnpipe.errors import CnnpipeError

        plain = re.sub(r"\x1b\[[0-9;]*m", "", str(e).splitlines()[0])  # kfp colours its messages
        raise CnnpipeError(f"pipeline run failed: {plain}") from None
    return {"model_uri": task.output, "pipeline_root": str(root / "outputs")}
