"""The pipeline's train step on several nodes: a Kubeflow PyTorchJob, built from the Training Operator's own
SDK models (kubeflow-training), every node running the same `cnnpipe train` under torchrun.

Why PyTorchJob (kubeflow.org/v1, Training Operator v1.9) and not TrainJob (trainer.kubeflow.org/v1alpha1,
Kubeflow Trainer v2, SDK `kubeflow`): PyTorchJob is what Kubeflow Platform installs up to 1.10 and what
managed Kubeflow offerings run today, a v1 API; TrainJob is still v1alpha1 and needs JobSet plus a
ClusterTrainingRuntime the cluster's admin installs, with an SDK below 1.0. The command below is plain
torchrun with c10d rendezvous, so moving to a TrainJob later changes the manifest, not the workers.

How a run goes: `cnnpipe pipeline compile -p nodes=N` puts the job's manifest, whole, into the compiled
pipeline (reviewable, and validated here before it reaches a cluster). The KFP step (components.stages
.train_job) gives it a name of its own, fills the run's values into its container's environment (the
dataset's and model's URLs on object storage, params.yaml with the run's overrides applied, the tracking
URI), creates it and waits. Kubernetes expands `$(NAME)` in the command from that environment. Each node
runs torchrun; rendezvous happens on the master pod (`<job>-master-0`, the Training Operator's headless
service); the process that gets rank 0 writes the model folder on its node's disk and that node uploads
it to the model artifact's URL, which the step downloads as its output, so evaluate and register run as
after the single-pod train.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import sys
import uuid
from pathlib import Path
from typing import Any

from kubeflow.training import ApiClient, TrainingClient, constants, models
from kubeflow.training.utils.utils import FakeResponse

from cnnpipe.errors import CnnpipeError
from cnnpipe.pipeline.topology import Topology

RDZV_PORT = 29400  # torchrun's c10d store, on the master pod
CONTAINER = constants.PYTORCHJOB_CONTAINER  # "pytorch": the operator sets its variables in that container only
WORKDIR = "/tmp/cnnpipe"  # on each node's own disk: the params file, rank 0's model folder and checkpoint
# The run's values, set by the KFP step in the container's environment
ENV_JOB, ENV_PARAMS, ENV_DATA, ENV_AUGMENTED, ENV_MODEL, ENV_TRACKING = (
    "CNNPIPE_JOB", "CNNPIPE_PARAMS", "CNNPIPE_DATA", "CNNPIPE_AUGMENTED", "CNNPIPE_MODEL_URL", "CNNPIPE_TRACKING_URI")
RUN_ENV = (ENV_JOB, ENV_PARAMS, ENV_DATA, ENV_AUGMENTED, ENV_MODEL, ENV_TRACKING)
# The job's wall-clock limit, enforced by the cluster (activeDeadlineSeconds: the job fails, its pods stop);
# the step waits that long plus time to schedule the pods, then deletes the job
DEADLINE_SECONDS = 48 * 3600
SCHEDULING_SECONDS = 30 * 60
POLL_SECONDS = 30
NAME_SUFFIX = 9  # "-" and 8 hex digits: one job per run
REPLICA_TYPES = (constants.REPLICA_TYPE_MASTER, constants.REPLICA_TYPE_WORKER)


def worker_command(*, nodes: int, procs_per_node: int, rdzv_endpoint: str, job_id: str, params: str, data_uri: str,
                   augmented_uri: str, model_dir: str, checkpoint: str, tracking_uri: str | None) -> list[str]:
    """What every node runs: torchrun with c10d rendezvous (ranks assigned as nodes join: no node rank
    needed), starting `cnnpipe train` in each process. The job's manifest and the local 2-node test both
    run this."""
    return ["torchrun", f"--nnodes={nodes}", f"--nproc-per-node={procs_per_node}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={job_id}",
            "-m", "cnnpipe", "train", "--params", params, "--data", data_uri, "--augmented", augmented_uri,
            "--out", model_dir, "--checkpoint", checkpoint,
            *(["--tracking-uri", tracking_uri] if tracking_uri is not None else ["--no-tracking"])]


def _node_script(topology: Topology) -> str:
    """The container's shell command: write the params file, train, and on the node that holds rank 0 (the one
    with a model folder) upload it. `$(NAME)`s are expanded by Kubernetes before the shell starts."""
    model_dir = f"{WORKDIR}/model"
    train = worker_command(nodes=topology.nodes, procs_per_node=topology.procs_per_node,
                           rdzv_endpoint=f"$({ENV_JOB})-{constants.REPLICA_TYPE_MASTER.lower()}-0:{RDZV_PORT}",
                           job_id=f"$({ENV_JOB})", params=f"{WORKDIR}/params.yaml", data_uri=f"$({ENV_DATA})",
                           augmented_uri=f"$({ENV_AUGMENTED})", model_dir=model_dir,
                           checkpoint=f"{WORKDIR}/train.pt", tracking_uri=f"$({ENV_TRACKING})")
    upload = ["python3", "-c", "import sys, pathlib, cnnpipe.remote as r; r.upload_dir(pathlib.Path(sys.argv[1]), "
              "sys.argv[2])", model_dir, f"$({ENV_MODEL})"]
    return (f'mkdir -p {WORKDIR} && printf "%s" "${ENV_PARAMS}" > {WORKDIR}/params.yaml && {shlex.join(train)}'
            f" && if [ -d {model_dir} ]; then {shlex.join(upload)}; fi")


def pytorchjob(topology: Topology, image: str, cpu: str, memory: str, name: str = "cnnpipe-train"
               ) -> models.KubeflowOrgV1PyTorchJob:
    """The job for `topology`: one Master and nodes-1 Workers from one pod template (the Training Operator
    needs a Master to set the rendezvous address), `gpus_per_node` nvidia.com/gpu each; the run's values
    left empty for the KFP step."""
    if topology.nodes < 2:
        raise CnnpipeError("a training job is for nodes > 1; one node trains in the pipeline's own train pod")
    limits = {"cpu": cpu, "memory": memory} | ({"nvidia.com/gpu": str(topology.gpus_per_node)}
                                              if topology.gpus_per_node else {})
    container = models.V1Container(
        name=CONTAINER, image=image, command=["sh", "-c", _node_script(topology)],
        env=[models.V1EnvVar(name=key, value="") for key in RUN_ENV],
        ports=[models.V1ContainerPort(name="c10d", container_port=RDZV_PORT)],
        resources=models.V1ResourceRequirements(limits=limits),
        # NCCL and data-loading workers share memory through /dev/shm, 64 MB in a container by default
        volume_mounts=[models.V1VolumeMount(name="dshm", mount_path="/dev/shm")])
    pod = models.V1PodTemplateSpec(spec=models.V1PodSpec(
        containers=[container],
        volumes=[models.V1Volume(name="dshm", empty_dir=models.V1EmptyDirVolumeSource(medium="Memory"))]))
    # Never restart a pod: training state is on its node's disk, so a restarted node could not rejoin; a
    # failed pod fails the job, and the step reports it
    replicas = {constants.REPLICA_TYPE_MASTER: models.KubeflowOrgV1ReplicaSpec(replicas=1, restart_policy="Never",
                                                                               template=pod),
                constants.REPLICA_TYPE_WORKER: models.KubeflowOrgV1ReplicaSpec(replicas=topology.nodes - 1,
                                                                               restart_policy="Never", template=pod)}
    return models.KubeflowOrgV1PyTorchJob(
        api_version=constants.API_VERSION, kind=constants.PYTORCHJOB_KIND,
        metadata=models.V1ObjectMeta(name=name, labels={"app.kubernetes.io/part-of": "cnnpipe"}),
        spec=models.KubeflowOrgV1PyTorchJobSpec(
            nproc_per_node=str(topology.procs_per_node), pytorch_replica_specs=replicas,
            run_policy=models.KubeflowOrgV1RunPolicy(backoff_limit=0, active_deadline_seconds=DEADLINE_SECONDS,
                                                     clean_pod_policy="None")))  # pods (and logs) kept


def manifest(job: models.KubeflowOrgV1PyTorchJob) -> dict[str, Any]:
    """The job as the SDK's API client sends it to Kubernetes (camelCase keys)."""
    return ApiClient().sanitize_for_serialization(job)


def parse(data: dict[str, Any]) -> models.KubeflowOrgV1PyTorchJob:
    """A manifest into the SDK's models, as the SDK reads a job from the cluster; required fields are checked
    by the models (client-side validation)."""
    try:
        return ApiClient().deserialize(FakeResponse(data), constants.PYTORCHJOB_MODEL)
    except ValueError as e:  # "Invalid value for `run_policy`, must not be `None`"
        raise CnnpipeError(f"PyTorchJob manifest: {e}") from None


def check(data: dict[str, Any]) -> models.KubeflowOrgV1PyTorchJob:
    """The manifest read by the SDK's models and written back unchanged (so no key is unknown to the API), and
    what the Training Operator's admission webhook checks of a PyTorchJob: a DNS-1035 name short enough for
    its services, Master and Worker replicas only, one Master, a `pytorch` container with an image in each."""
    job = parse(data)
    if manifest(job) != data:
        raise CnnpipeError("PyTorchJob manifest: keys the kubeflow.org/v1 API does not know (it does not survive "
                           "a round trip through the SDK's models)")
    if (job.api_version, job.kind) != (constants.API_VERSION, constants.PYTORCHJOB_KIND):
        raise CnnpipeError(f"PyTorchJob manifest: apiVersion/kind {job.api_version}/{job.kind}")
    name, specs = job.metadata.name or "", job.spec.pytorch_replica_specs
    # the operator names pods and services <name>-<type>-<index>, DNS labels (at most 63 characters), and
    # the step adds a suffix to the compiled name
    longest = max(len(f"{name}-{kind.lower()}-{max(0, spec.replicas - 1)}") for kind, spec in specs.items())
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) or longest + NAME_SUFFIX > 63:
        raise CnnpipeError(f"PyTorchJob name {name!r}: expected a DNS-1035 label short enough for its pods' names")
    if set(specs) - set(REPLICA_TYPES) or specs.get(constants.REPLICA_TYPE_MASTER) is None:
        raise CnnpipeError(f"PyTorchJob replicas {sorted(specs)}: expected Master and optionally Worker")
    if specs[constants.REPLICA_TYPE_MASTER].replicas != 1:
        raise CnnpipeError("PyTorchJob: expected exactly one Master replica")
    for kind, spec in specs.items():
        containers = {c.name: c for c in spec.template.spec.containers}
        if CONTAINER not in containers or not containers[CONTAINER].image:
            raise CnnpipeError(f"PyTorchJob {kind}: expected a container named {CONTAINER!r} with an image")
    return job


def object_url(uri: str) -> str:
    """An artifact's URI as fsspec reads it: KFP names its default MinIO store minio://, which is S3 (the
    endpoint comes from the credentials' AWS_ENDPOINT_URL)."""
    return "s3://" + uri.removeprefix("minio://") if uri.startswith("minio://") else uri


def for_run(template: dict[str, Any], *, params: dict[str, Any], tracking_uri: str, credentials_secret: str,
            data_uri: str, augmented_uri: str, model_uri: str, owner: dict[str, str] | None = None) -> dict[str, Any]:
    """The compiled job with a name of its own and the run's values in its environment; the credentials
    secret's keys become variables of the same names (optional, as for the pipeline's own steps). With
    `owner` (the step's pod), Kubernetes deletes the job when that pod goes: a cancelled run stops its nodes."""
    job = copy.deepcopy(template)
    name = f"{job['metadata']['name']}-{uuid.uuid4().hex[:NAME_SUFFIX - 1]}"
    job["metadata"]["name"] = name
    if owner is not None:
        job["metadata"]["ownerReferences"] = [{"apiVersion": "v1", "kind": "Pod", **owner}]
    values = {ENV_JOB: name, ENV_PARAMS: json.dumps(params), ENV_DATA: object_url(data_uri),
              ENV_AUGMENTED: object_url(augmented_uri), ENV_MODEL: object_url(model_uri), ENV_TRACKING: tracking_uri}
    for spec in job["spec"]["pytorchReplicaSpecs"].values():
        for container in spec["template"]["spec"]["containers"]:
            if container["name"] == CONTAINER:
                container["env"] = [{"name": e["name"], "value": values.get(e["name"], e.get("value", ""))}
                                    for e in container["env"]]
                container["envFrom"] = [{"secretRef": {"name": credentials_secret, "optional": True}}]
    check(job)
    return job


def _failure(client: TrainingClient, name: str) -> str | None:
    """The operator's own words on why the job failed (its Failed condition), if it can be read."""
    try:
        conditions = client.get_job_conditions(name=name)
    except (RuntimeError, TimeoutError):
        return None
    failed = [c for c in conditions if c.type == constants.JOB_CONDITION_FAILED
              and c.status == constants.CONDITION_STATUS_TRUE]
    return f"{failed[-1].reason}: {failed[-1].message}" if failed else None


def run(template: dict[str, Any], *, params: dict[str, Any], overrides: list[str], tracking_uri: str,
        credentials_secret: str, data_uri: str, augmented_uri: str, model_uri: str, model_dir: Path,
        poll_seconds: int = POLL_SECONDS, wait_margin_seconds: int = SCHEDULING_SECONDS) -> dict:
    """Create the job for this run, wait until it succeeds, fetch its model folder into `model_dir`; the
    model's summary, as the single-pod train returns it. Waits the job's activeDeadlineSeconds plus
    `wait_margin_seconds` (to schedule its pods), then deletes it."""
    import os

    from cnnpipe.config import apply_overrides, parse_assignments
    from cnnpipe.engine.model_folder import RUN_FILE, read_history, read_train_config
    from cnnpipe.remote import download_dir

    params = apply_overrides(params, parse_assignments(overrides, "overrides", one_per_item=True), "overrides")
    # KFP's launcher gives the step its own pod's name and uid (the Kubernetes downward API)
    pod = {"name": os.environ.get("KFP_POD_NAME", ""), "uid": os.environ.get("KFP_POD_UID", "")}
    job = for_run(template, params=params, tracking_uri=tracking_uri, credentials_secret=credentials_secret,
                  data_uri=data_uri, augmented_uri=augmented_uri, model_uri=model_uri,
                  owner=pod if all(pod.values()) else None)
    name = job["metadata"]["name"]
    # in a pod: its service account and namespace; elsewhere the kubeconfig KUBECONFIG names (read now, not
    # when the kubernetes package was imported)
    client = TrainingClient(config_file=os.environ.get("KUBECONFIG"), job_kind=constants.PYTORCHJOB_KIND)
    where = f"PyTorchJob {client.namespace}/{name}"
    logs = f"`kubectl logs -n {client.namespace} -l {constants.JOB_NAME_LABEL}={name}`"
    try:
        client.create_job(parse(job))
    except RuntimeError as e:  # the SDK's "Failed to create PyTorchJob: ns/name", its cause chained
        raise CnnpipeError(f"{where}: not created ({e.__cause__ or e})") from None
    print(f"{where} created: {job['spec']['pytorchReplicaSpecs']['Worker']['replicas'] + 1} nodes, "
          f"{job['spec']['nprocPerNode']} processes each", file=sys.stderr)
    wait = job["spec"]["runPolicy"]["activeDeadlineSeconds"] + wait_margin_seconds
    try:
        client.wait_for_job_conditions(name, expected_conditions={constants.JOB_CONDITION_SUCCEEDED},
                                       wait_timeout=wait, polling_interval=poll_seconds)
    except TimeoutError:
        client.delete_job(name)
        raise CnnpipeError(f"{where}: not finished after {wait} s; deleted (its pods' logs: {logs})") from None
    except RuntimeError as e:  # the job reached Failed, or the API could not be read
        raise CnnpipeError(f"{where} failed: {_failure(client, name) or ' '.join(str(e).split())} "
                           f"(its pods' logs: {logs})") from None
    download_dir(object_url(model_uri), model_dir)
    config, history = read_train_config(model_dir), read_history(model_dir)
    kept = history[config["kept_epoch"] - 1]
    run_file = model_dir / RUN_FILE
    val = {k: float(kept[f"val/{k}"]) if f"val/{k}" in kept else None  # none: train.train_on_val
           for k in ("accuracy", "loss")}
    return {"epochs": len(history), "best_epoch": config["best_epoch"], "kept_epoch": config["kept_epoch"],
            "val_accuracy": val["accuracy"], "val_loss": val["loss"],
            "parameters": config["parameters"], "job": name,
            **({"run_id": json.loads(run_file.read_text())["run_id"]} if run_file.exists() else {})}
