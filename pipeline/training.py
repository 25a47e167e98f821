"""The cnnpipe pipeline for Kubeflow Pipelines v2: compile it, submit it, or run it on this machine.

Pipeline parameters: `params`, the params.yaml every component reads its block from (embedded when
compiled); `overrides`, what the user sets for one run in the syntax of `dvc exp run -S`
(["train.epochs=5", "ingest.path=s3://..."]), empty by default, so an unset parameter always means
"params.yaml decides"; the MLflow tracking URI; the Kubernetes secret holding credentials. Where the train
step runs (`Topology`: nodes and GPUs per node) is chosen when the pipeline is compiled or submitted.
"""

# no `from __future__ import annotations`: KFP reads the pipeline signature's types at runtime

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

from kfp import compiler, dsl, kubernetes

from cnnpipe.components import stages
from cnnpipe.pipeline.topology import Topology


def as_parameter(params: dict) -> str:
    """params.yaml's content as one line of JSON: KFP copies parameter defaults into a comment header of
    the compiled YAML, where a multi-line default would break out of the comment."""
    return json.dumps(params)


def _default_params() -> str:
    """Every block at its dataclass defaults: the pipeline imports without a params.yaml beside it."""
    import dataclasses

    from cnnpipe.config import BLOCKS

    return as_parameter({name: dataclasses.asdict(cls()) for name, cls in BLOCKS.items()})


DEFAULT_PARAMS = _default_params()

# What the tracking server, its S3 artifact store and a DVC remote may need, read from the
# `credentials_secret` Kubernetes secret (`kubectl create secret generic cnnpipe-credentials --from-literal=...`)
CREDENTIAL_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                   "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_S3_ENDPOINT_URL")


def training_job(topology: Topology) -> dict:
    """The multi-node train step's Kubeflow job manifest (validated against the SDK's models)."""
    from cnnpipe.pipeline import trainjob

    job = trainjob.manifest(trainjob.pytorchjob(topology, stages.IMAGE, stages.TRAIN_CPU, stages.TRAIN_MEMORY))
    trainjob.check(job)
    return job


def pipeline_for(topology: Topology):  # noqa: ANN201 - a KFP GraphComponent
    """The pipeline with its train step on `topology`."""
    job = json.dumps(training_job(topology)) if topology.nodes > 1 else None

    @dsl.pipeline(name="cnnpipe", description="ingest -> augment -> train -> evaluate -> register (+ promote)")
    def cnnpipe_pipeline(params: str = DEFAULT_PARAMS,
                         overrides: list = [],  # noqa: B006 - KFP reads the default from the signature
                         tracking_uri: str = "http://mlflow.mlflow.svc.cluster.local:5000",
                         credentials_secret: str = "cnnpipe-credentials") -> str:
        common = {"params": params, "overrides": overrides}
        data = stages.ingest(**common)
        aug = stages.augment(**common, data=data.outputs["data"])
        if job is None:
            fit = stages.train(**common, tracking_uri=tracking_uri, data=data.outputs["data"],
                               augmented=aug.outputs["augmented"])
            # the one step that wants a GPU; the others are CPU-bound data work
            fit.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1).set_cpu_limit(stages.TRAIN_CPU) \
                .set_memory_limit(stages.TRAIN_MEMORY)
        else:  # this step only starts the job and waits; the job's pods train
            fit = stages.train_job(**common, tracking_uri=tracking_uri, credentials_secret=credentials_secret,
                                   job=job, data=data.outputs["data"], augmented=aug.outputs["augmented"])
        scores = stages.evaluate(**common, tracking_uri=tracking_uri, model=fit.outputs["model"],
                                 data=data.outputs["data"])
        reg = stages.register(**common, tracking_uri=tracking_uri, model=fit.outputs["model"],
                              data=data.outputs["data"], evaluation=scores.outputs["evaluation"])
        # data steps are pure functions of their inputs: cache them; training, evaluation and registration
        # log to MLflow, so they run every time
        for task in (fit, scores, reg):
            task.set_caching_options(False)
        for task in (data, fit, scores, reg):  # augment reads and writes only its artifacts
            # credentials only from the cluster: each key of the secret becomes the variable of the same name;
            # optional, since an open tracking server or a public DVC remote needs none
            kubernetes.use_secret_as_env(task, secret_name=credentials_secret,
                                         secret_key_to_env={key: key for key in CREDENTIAL_KEYS}, optional=True)
        return reg.outputs["Output"]  # the registered model's URI

    return cnnpipe_pipeline


cnnpipe_pipeline = pipeline_for(Topology())


TOPOLOGY_KEYS = ("nodes", "gpus_per_node")


def arguments(params: dict, items: list[str]) -> "tuple[dict, Topology]":
    """The run's arguments from `-p` items: `block.key=value` ones become `overrides` (checked against
    params.yaml's blocks now, not inside a pod later), `nodes` and `gpus_per_node` the train step's
    topology, the others set a pipeline parameter."""
    from cnnpipe.config import apply_overrides, parse_assignments
    from cnnpipe.errors import CnnpipeError

    out: dict = {"params": as_parameter(params), "overrides": []}
    topology: dict[str, int] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise CnnpipeError(f"-p {item!r}: expected key=value (a pipeline parameter or block.key)")
        if "." in key:
            apply_overrides(params, parse_assignments([item], "-p", one_per_item=True), "-p")
            out["overrides"].append(item)
        elif key in ("tracking_uri", "credentials_secret"):
            out[key] = value
        elif key in TOPOLOGY_KEYS:
            if not value.isdigit():
                raise CnnpipeError(f"-p {item}: expected a whole number")
            topology[key] = int(value)
        else:
            raise CnnpipeError(f"-p {key}: not a pipeline parameter (expected tracking_uri, credentials_secret, "
                               f"{', '.join(TOPOLOGY_KEYS)} or a param as block.key, e.g. train.epochs=5)")
    return out, Topology(**topology)


def compile_pipeline(output: Path, parameters: dict, topology: Topology = Topology()) -> Path:  # noqa: B008 - frozen
    """Write the pipeline YAML for `topology`, with `parameters` (as `arguments` returns them: `params`, a
    params.yaml as JSON text, and what `-p` set) as its parameters' defaults."""
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline_for(topology), str(output), pipeline_parameters=parameters)
    return output


def submit(host: str, arguments: dict, experiment: "str | None", run_name: "str | None", caching: bool,
           topology: Topology = Topology()) -> dict:  # noqa: B008 - frozen
    import kfp

    with warnings.catch_warnings():  # "This client only works with Kubeflow Pipeline v2.0.0-beta.2 and later"
        warnings.simplefilter("ignore", FutureWarning)
        client = kfp.Client(host=host)
    run = client.create_run_from_pipeline_func(pipeline_for(topology), arguments=arguments, run_name=run_name,
                                               experiment_name=experiment, enable_caching=caching)
    return {"run_id": run.run_id, "url": f"{host.rstrip('/')}/#/runs/details/{run.run_id}"}


def run_local(arguments: dict, root: Path, caching: bool, runner: str = "subprocess") -> dict:
    """The whole pipeline on this machine: every component a subprocess of this environment, or (runner
    "docker") a container of the components' image through a Docker-compatible engine (Docker, or podman's
    service: DOCKER_HOST=unix:///path/podman.sock)."""
    from kfp import local

    from cnnpipe.errors import CnnpipeError

    if runner == "docker":
        arguments, run_args = _container_arguments(arguments)
        chosen, patched = local.DockerRunner(**run_args), _container_exit_codes()
    else:
        chosen, patched = local.SubprocessRunner(use_venv=False), contextlib.nullcontext()
    local.init(runner=chosen, pipeline_root=str(root / "outputs"), enable_caching=caching,
               cache_root=str(root / "cache"))
    try:
        with patched, _stdout_to_stderr(), warnings.catch_warnings():
            # SubprocessRunner warns about any image without "python" in its name; ours is the one this
            # environment was installed from
            warnings.filterwarnings("ignore", message=".*non-Python base image", category=RuntimeWarning)
            task = cnnpipe_pipeline(**arguments)
    except RuntimeError as e:  # kfp.local: a task ended in FAILURE (its log is above)
        import re

        plain = re.sub(r"\x1b\[[0-9;]*m", "", str(e).splitlines()[0])  # kfp colours its messages
        raise CnnpipeError(f"pipeline run failed: {plain}") from None
    return {"model_uri": task.output, "pipeline_root": str(root / "outputs"), "runner": runner}


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """kfp.local prints every task's log on stdout, as do the components it starts: send all of it to stderr
    (at the file-descriptor level, for child processes too), so stdout carries only the command's result."""
    import os
    import sys

    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _container_arguments(arguments: dict) -> "tuple[dict, dict]":
    """What containers need to see of this machine: a local data path (read-only), a local DVC repository
    and a SQLite tracking store's folder, mounted at the same absolute paths. With a SQLite store the
    containers get no network at all (the image holds everything); with a tracking server or a DVC
    repository to clone, the host's network."""
    import docker
    from docker.types import Mount

    from cnnpipe.config import sqlite_path
    from cnnpipe.errors import CnnpipeError, ServiceUnavailable

    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as e:
        raise ServiceUnavailable(f"pipeline run-local --runner docker: no container engine ({e}); start Docker, or "
                                 "podman's: `podman system service --time=0 unix:///tmp/podman.sock &` and "
                                 "`export DOCKER_HOST=unix:///tmp/podman.sock`") from None
    try:
        client.images.get(stages.IMAGE)
    except docker.errors.ImageNotFound:
        raise CnnpipeError(f"pipeline run-local --runner docker: image {stages.IMAGE!r} not found (build it with "
                           "container/build.sh, or set CNNPIPE_IMAGE to an image the engine has)") from None
    finally:
        client.close()
    from cnnpipe.config import apply_overrides, parse_assignments

    ingest = apply_overrides(json.loads(arguments["params"]),
                             parse_assignments(arguments["overrides"], "-p", one_per_item=True))["ingest"]
    arguments, mounts = {**arguments, "overrides": list(arguments["overrides"])}, []
    for key, read_only in (("path", True), ("dvc_repo", False)):  # DVC writes locks into its repository
        if ingest.get(key) and Path(ingest[key]).exists():
            local = str(Path(ingest[key]).resolve())
            arguments["overrides"].append(f"ingest.{key}={local}")  # the same path inside the container
            mounts.append(Mount(local, local, type="bind", read_only=read_only))
    db = sqlite_path(arguments["tracking_uri"])
    if db is not None:
        mounts.append(Mount(str(db.parent), str(db.parent), type="bind"))
    offline = db is not None and not ingest.get("dvc_repo")
    return arguments, {"mounts": mounts, "network_mode": "none" if offline else "host"}


def _run_container(client, image: str, command: list, volumes: dict, **run_args) -> int:  # noqa: ANN001
    """kfp.local's run_docker_container without its bug: it starts containers with auto-remove, and when one
    is gone before its exit code is read it returns 0, so a component that raised passed (seen with podman).
    Here the container stays until its exit code is read, then is removed."""
    container = client.containers.run(image=image, command=command, volumes=volumes, detach=True, stdout=True,
                                      stderr=True, auto_remove=False, **run_args)
    try:
        for line in container.logs(stream=True, follow=True):
            print(line.decode(errors="replace"), end="")
        code = container.wait()["StatusCode"]
        print(f"container of {image} exited with {code}")
        return code
    finally:
        container.remove(force=True)


@contextlib.contextmanager
def _container_exit_codes() -> Iterator[None]:
    """While the pipeline runs, kfp.local's DockerRunner starts containers with _run_container."""
    from kfp.local import docker_task_handler

    original = docker_task_handler.run_docker_container
    docker_task_handler.run_docker_container = _run_container
    try:
        yield
    finally:
        docker_task_handler.run_docker_container = original
