"""Multi-node training on Kubeflow: the PyTorchJob compiled into the pipeline (checked with the Training
Operator SDK's own models), the run's values the step fills in, the folder transfer through object storage,
and the exact worker command run as two "nodes" on this machine."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from cnnpipe.errors import CnnpipeError
from cnnpipe.pipeline import trainjob
from cnnpipe.pipeline.topology import Topology
from cnnpipe.pipeline.training import arguments, as_parameter, compile_pipeline
from tests.helpers import REPO, free_port, user_env


def compiled(tmp_path: Path, topology: Topology) -> tuple[dict, dict]:
    """The compiled pipeline's spec and its train task's job manifest (None for one node)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    out = compile_pipeline(tmp_path / "pipeline.yaml", {"params": as_parameter(params)}, topology)
    spec, _ = yaml.safe_load_all(out.read_text())
    task = spec["root"]["dag"]["tasks"].get("train-job")
    job = json.loads(task["inputs"]["parameters"]["job"]["runtimeValue"]["constant"]) if task else None
    return spec, job


def node_script(job: dict, kind: str) -> str:
    (container,) = job["spec"]["pytorchReplicaSpecs"][kind]["template"]["spec"]["containers"]
    assert container["command"][:2] == ["sh", "-c"]
    return container["command"][2]


def test_compiled_two_node_pipeline_holds_a_pytorchjob_the_sdk_reads(tmp_path):
    from kubeflow.training import models

    spec, job = compiled(tmp_path, Topology(nodes=2, gpus_per_node=1))
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"ingest", "augment", "train-job", "evaluate", "register"}
    # evaluate and register take the job step's model as they take the single pod's
    assert tasks["evaluate"]["inputs"]["artifacts"]["model"]["taskOutputArtifact"] == {
        "outputArtifactKey": "model", "producerTask": "train-job"}
    assert "accelerator" not in spec["deploymentSpec"]["executors"]["exec-train-job"]["container"].get("resources", {})

    parsed = trainjob.check(job)  # the SDK's models read it and write it back unchanged
    assert isinstance(parsed, models.KubeflowOrgV1PyTorchJob)
    assert isinstance(parsed.spec.pytorch_replica_specs["Master"].template, models.V1PodTemplateSpec)
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert {k: v["replicas"] for k, v in replicas.items()} == {"Master": 1, "Worker": 1}
    assert job["spec"]["nprocPerNode"] == "1"
    for kind in replicas:
        (container,) = replicas[kind]["template"]["spec"]["containers"]
        assert container["name"] == "pytorch" and container["resources"]["limits"] == {
            "cpu": "8", "memory": "32G", "nvidia.com/gpu": "1"}
        # Kubernetes expands $(NAME) only for variables the container declares: every one must be there
        declared = {e["name"] for e in container["env"]}
        assert set(re.findall(r"\$\(([A-Z_]+)\)", node_script(job, kind))) < declared == set(trainjob.RUN_ENV)
        assert 'printf "%s" "$CNNPIPE_PARAMS" > /tmp/cnnpipe/params.yaml' in node_script(job, kind)  # the shell's
    # the node runs the one worker command, rendezvous on the master pod's service
    expected = trainjob.worker_command(
        nodes=2, procs_per_node=1, rdzv_endpoint="$(CNNPIPE_JOB)-master-0:29400", job_id="$(CNNPIPE_JOB)",
        params="/tmp/cnnpipe/params.yaml", data_uri="$(CNNPIPE_DATA)", augmented_uri="$(CNNPIPE_AUGMENTED)",
        model_dir="/tmp/cnnpipe/model", checkpoint="/tmp/cnnpipe/train.pt", tracking_uri="$(CNNPIPE_TRACKING_URI)")
    assert shlex.join(expected) in node_script(job, "Master") == node_script(job, "Worker")
    assert expected[:6] == ["torchrun", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
                            "--rdzv-endpoint=$(CNNPIPE_JOB)-master-0:29400", "--rdzv-id=$(CNNPIPE_JOB)"]


def test_nodes_and_gpus_shape_the_job(tmp_path):
    _, job = compiled(tmp_path, Topology(nodes=4, gpus_per_node=8))
    trainjob.check(job)
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 3 and job["spec"]["nprocPerNode"] == "8"
    assert "--nnodes=4 --nproc-per-node=8" in node_script(job, "Worker")
    cpu_only = trainjob.manifest(trainjob.pytorchjob(Topology(nodes=2, gpus_per_node=0), "img", "4", "8G"))
    (container,) = cpu_only["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"] == {"cpu": "4", "memory": "8G"} and cpu_only["spec"]["nprocPerNode"] == "1"
    # one node is the pipeline's own train pod, unchanged
    spec, job = compiled(tmp_path, Topology())
    assert job is None and "train" in spec["root"]["dag"]["tasks"]
    assert spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]["accelerator"]["resourceCount"] == "1"


@pytest.mark.parametrize("edit, message", [
    (lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"].update(replica=3), "keys the kubeflow.org/v1 API does not know"),
    (lambda j: j["spec"].pop("runPolicy"), "run_policy"),
    (lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"].update(replicas=2), "exactly one Master"),
    (lambda j: j["spec"]["pytorchReplicaSpecs"].update(Chief=j["spec"]["pytorchReplicaSpecs"]["Worker"]), "replicas"),
    (lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0].update(name="main"),
     "container named 'pytorch'"),
    (lambda j: j["metadata"].update(name="Train_Job"), "DNS-1035"),
    (lambda j: j["metadata"].update(name="x" * 50), "DNS-1035"),
])
def test_check_rejects_what_the_api_would(edit, message):
    job = trainjob.manifest(trainjob.pytorchjob(Topology(nodes=2), "img", "1", "1G"))
    trainjob.check(job)
    edit(job)
    with pytest.raises(CnnpipeError, match=message):
        trainjob.check(job)


def test_a_run_gets_its_own_job_name_and_values():
    template = trainjob.manifest(trainjob.pytorchjob(Topology(nodes=3, gpus_per_node=0), "img", "1", "1G"))
    before = json.dumps(template)
    params = {"train": {"epochs": 7}}
    job = trainjob.for_run(template, params=params, tracking_uri="http://mlflow:5000", credentials_secret="creds",
                           data_uri="minio://mlpipeline/v2/artifacts/run/ingest/data",
                           augmented_uri="s3://bucket/aug", model_uri="gs://b/model")
    assert json.dumps(template) == before  # the compiled template is left as it was
    name = job["metadata"]["name"]
    assert re.fullmatch(r"cnnpipe-train-[0-9a-f]{8}", name)
    assert trainjob.for_run(template, params=params, tracking_uri="", credentials_secret="c", data_uri="d",
                            augmented_uri="a", model_uri="m")["metadata"]["name"] != name
    for spec in job["spec"]["pytorchReplicaSpecs"].values():
        (container,) = spec["template"]["spec"]["containers"]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env == {"CNNPIPE_JOB": name, "CNNPIPE_PARAMS": json.dumps(params),
                       "CNNPIPE_DATA": "s3://mlpipeline/v2/artifacts/run/ingest/data",  # KFP's MinIO is S3
                       "CNNPIPE_AUGMENTED": "s3://bucket/aug", "CNNPIPE_MODEL_URL": "gs://b/model",
                       "CNNPIPE_TRACKING_URI": "http://mlflow:5000"}
        assert container["envFrom"] == [{"secretRef": {"name": "creds", "optional": True}}]


def test_pipeline_parameters_nodes_and_gpus_per_node():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    args, topology = arguments(params, ["nodes=2", "gpus_per_node=0", "train.epochs=5"])
    assert topology == Topology(nodes=2, gpus_per_node=0) and topology.procs_per_node == 1
    assert args["overrides"] == ["train.epochs=5"] and "nodes" not in args
    assert arguments(params, [])[1] == Topology(nodes=1, gpus_per_node=1)
    for bad, message in (("nodes=two", "whole number"), ("nodes=0", "1 or more"), ("node=2", "not a pipeline parameter")):
        with pytest.raises(CnnpipeError, match=message):
            arguments(params, [bad])


def test_compile_takes_p_items_as_the_parameters_defaults(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    args, topology = arguments(params, ["train.epochs=5", "tracking_uri=http://mlflow.example.com", "nodes=2"])
    spec, _ = yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml", args, topology).read_text())
    defaults = {k: v.get("defaultValue") for k, v in spec["root"]["inputDefinitions"]["parameters"].items()}
    assert defaults == {"params": as_parameter(params), "overrides": ["train.epochs=5"],
                        "tracking_uri": "http://mlflow.example.com", "credentials_secret": "cnnpipe-credentials"}


def test_job_step_has_train_ports():
    import inspect

    from cnnpipe.stages.spec import STAGES
    from cnnpipe.components import stages

    signature = inspect.signature(stages.train_job.python_func)
    artifacts = {k for k, p in signature.parameters.items() if "Input" in str(p.annotation) or "Output" in str(p.annotation)}
    assert artifacts == {p.name for p in STAGES["train"].ports}


def test_run_local_with_several_nodes_says_a_cluster_is_needed(tmp_path, monkeypatch, capsys):
    from cnnpipe.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["pipeline", "run-local", "--params", str(REPO / "params.yaml"), "-p", "nodes=2"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "cnnpipe pipeline: error: pipeline run-local: -p nodes=2 needs a Kubernetes cluster with Kubeflow's Training "
        "Operator (use `pipeline submit`); run-local trains on this machine, one node"]
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_model_folder_round_trips_through_a_url(tmp_path, scheme):
    from cnnpipe.remote import download_dir, upload_dir

    src = tmp_path / "model"
    (src / "figures").mkdir(parents=True)
    (src / "model.pt").write_bytes(b"\x00weights")
    (src / "figures" / "a.png").write_bytes(b"png")
    url = f"memory://bucket/{tmp_path.name}/model" if scheme == "memory" else f"file://{tmp_path}/remote/model"
    upload_dir(src, url)
    upload_dir(src, url)  # again: the same objects, not a nested copy
    download_dir(url, tmp_path / "fetched")
    assert {p.relative_to(tmp_path / "fetched").as_posix(): p.read_bytes()
            for p in (tmp_path / "fetched").rglob("*") if p.is_file()} == {"model.pt": b"\x00weights",
                                                                           "figures/a.png": b"png"}
    with pytest.raises(CnnpipeError, match="nothing at"):
        download_dir(f"memory://bucket/{tmp_path.name}/missing", tmp_path / "none")
    assert not (tmp_path / "none").exists()


@pytest.mark.e2e
def test_worker_command_on_two_local_nodes_matches_one_process(tmp_path):
    """The exact worker command, as 2 nodes x 1 process on 127.0.0.1 (two torchrun processes meeting at a c10d
    rendezvous, gloo, each streaming its own shards), trains digits as well as one plain `cnnpipe train` on
    the device path does."""
    from cnnpipe.config import AugmentConfig, IngestConfig
    from cnnpipe.engine.model_folder import read_history, read_train_config
    from cnnpipe.stages import augment, ingest

    ingest.run(cfg=IngestConfig(shards="always", shard_images=200), data=tmp_path / "processed", report=tmp_path / "report.json")
    augment.run(cfg=AugmentConfig(), data=tmp_path / "processed", augmented=tmp_path / "augmented")
    text = (REPO / "params.yaml").read_text()
    assert re.search(r"\n  epochs: 12\b", text) and "\n  data_mode: auto " in text
    text = re.sub(r"\n  epochs: 12\b", "\n  epochs: 4", text, count=1)
    # the nodes stream their own shards, as on a cluster; the one process holds the data on its device
    (tmp_path / "stream.yaml").write_text(text.replace("\n  data_mode: auto ", "\n  data_mode: stream "))
    (tmp_path / "device.yaml").write_text(text.replace("\n  data_mode: auto ", "\n  data_mode: device "))
    env = user_env({"OMP_NUM_THREADS": "1"})

    def train_args(out: str) -> dict:
        params = tmp_path / ("stream.yaml" if out == "two_nodes" else "device.yaml")
        return {"params": str(params), "data_uri": str(tmp_path / "processed"),
                "augmented_uri": str(tmp_path / "augmented"), "model_dir": str(tmp_path / out),
                "checkpoint": str(tmp_path / f"{out}.pt"), "tracking_uri": None}

    command = trainjob.worker_command(nodes=2, procs_per_node=1, rdzv_endpoint=f"127.0.0.1:{free_port()}",
                                      job_id="local-2-nodes", **train_args("two_nodes"))
    nodes = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [node.communicate(timeout=900) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    stderr = "".join(err for _, err in outputs)
    assert "2 processes" in stderr and stderr.count("epoch 4/4") == 1  # one world of 2; only rank 0 reports
    assert "streamed from shards" in stderr, stderr[-2000:]

    single = train_args("one_process")
    proc = subprocess.run(["cnnpipe", "train", "--params", single["params"], "--data", single["data_uri"],
                           "--augmented", single["augmented_uri"], "--out", single["model_dir"], "--checkpoint",
                           single["checkpoint"], "--no-tracking"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    results = {}
    for out in ("two_nodes", "one_process"):
        history, config = read_history(tmp_path / out), read_train_config(tmp_path / out)
        kept = history[config["kept_epoch"] - 1]
        results[out] = (float(kept["val/accuracy"]), float(kept["val/loss"]))
    (acc2, loss2), (acc1, loss1) = results["two_nodes"], results["one_process"]
    # the same global batches in the same order (each rank takes every other image of a batch); what differs:
    # each rank's augmentation draws and BatchNorm statistics over half a batch. Measured: accuracy 0.961 vs
    # 0.955, loss 0.124 vs 0.123
    assert acc1 > 0.9 and abs(acc2 - acc1) <= 0.03, results
    assert abs(loss2 - loss1) <= 0.2 * loss1, results
    assert not (tmp_path / "two_nodes.pt").exists()  # the checkpoint goes once the model is written
    assert (tmp_path / "two_nodes" / "model.pt").exists()


@pytest.fixture
def kube_api(tmp_path, monkeypatch):
    """A local HTTP endpoint standing in for the Kubernetes API server with the Training Operator: it keeps
    the PyTorchJobs created through it, and `outcome` says what becomes of them: "Succeeded" (the job's
    rank 0 uploads a model folder to the URL the step gave it, as the real nodes do), "Failed", or "Running"
    (forever). The SDK's TrainingClient reaches it through a kubeconfig, as it would a cluster."""
    import http.server
    import threading

    from cnnpipe.engine.model_folder import CONFIG_FILE, HISTORY_FILE, write_history
    from cnnpipe.remote import upload_dir

    state = {"outcome": "Succeeded", "jobs": {}, "requests": [], "train_on_val": False}
    prefix = "/apis/kubeflow.org/v1/namespaces/default/pytorchjobs"

    def finish(job: dict) -> dict:
        conditions = [{"type": "Created", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}]
        if state["outcome"] == "Succeeded":
            (container,) = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
            env = {e["name"]: e["value"] for e in container["env"]}
            folder = tmp_path / "rank0-model"
            folder.mkdir(exist_ok=True)
            history = [{"epoch": 1, "val/loss": 0.5, "val/accuracy": 0.8}, {"epoch": 2, "val/loss": 0.3, "val/accuracy": 0.9}]
            if state["train_on_val"]:  # no validation: no val columns, no best epoch
                history = [{"epoch": e["epoch"], "train/loss": e["val/loss"]} for e in history]
            write_history(folder / HISTORY_FILE, history)
            (folder / CONFIG_FILE).write_text(json.dumps({"best_epoch": None if state["train_on_val"] else 2,
                                                          "kept_epoch": 2, "parameters": 1234}))
            upload_dir(folder, env["CNNPIPE_MODEL_URL"])
        if state["outcome"] != "Running":
            conditions.append({"type": state["outcome"], "status": "True", "reason": "PyTorchJob" + state["outcome"],
                               "message": f"PyTorchJob {job['metadata']['name']} is {state['outcome'].lower()}.",
                               "lastTransitionTime": "2026-01-01T00:01:00Z"})
        return {**job, "status": {"conditions": conditions}}

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length)) if length else {}
            state["requests"].append((self.command, self.path.split("?")[0]))
            name = self.path.split("?")[0].removeprefix(prefix).strip("/")
            code, reply = 404, {"kind": "Status", "code": 404}
            if self.command == "POST" and self.path.startswith(prefix):
                state["jobs"][body["metadata"]["name"]] = finish(body)
                code, reply = 201, body
            elif name in state["jobs"]:
                code, reply = 200, state["jobs"][name]
                if self.command == "DELETE":
                    del state["jobs"][name]
            data = json.dumps(reply).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _answer

        def log_message(self, *args) -> None:  # noqa: ANN002 - quiet
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    config = {"apiVersion": "v1", "kind": "Config", "current-context": "test",
              "clusters": [{"name": "test", "cluster": {"server": f"http://127.0.0.1:{server.server_address[1]}"}}],
              "users": [{"name": "test", "user": {"token": "t"}}],
              "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test", "namespace": "default"}}]}
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    yield state
    server.shutdown()


def step(tmp_path: Path, template: dict | None = None, **kwargs) -> dict:
    """The train-job step as KFP runs it: the compiled manifest, this run's values, a fresh output folder."""
    template = template or trainjob.manifest(trainjob.pytorchjob(Topology(nodes=2), "img", "1", "1G"))
    return trainjob.run(template, params=yaml.safe_load((REPO / "params.yaml").read_text()),
                        overrides=["train.epochs=2"], tracking_uri="http://mlflow:5000", credentials_secret="creds",
                        data_uri="memory://store/data", augmented_uri="memory://store/augmented",
                        model_uri=f"memory://store/{tmp_path.name}/model", model_dir=tmp_path / "out" / "model",
                        poll_seconds=1, **kwargs)


def test_step_creates_the_job_waits_and_outputs_its_model(tmp_path, kube_api, monkeypatch):
    monkeypatch.setenv("KFP_POD_NAME", "cnnpipe-abc-train-job-driver")
    monkeypatch.setenv("KFP_POD_UID", "a1b2c3d4-0000-0000-0000-a1b2c3d4e5f6")
    result = step(tmp_path)
    (name, job), = kube_api["jobs"].items()
    assert result == {"epochs": 2, "best_epoch": 2, "kept_epoch": 2, "val_accuracy": 0.9, "val_loss": 0.3,
                      "parameters": 1234, "job": name}
    assert sorted(p.name for p in (tmp_path / "out" / "model").iterdir()) == ["history.csv", "train_config.json"]
    (container,) = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert json.loads(env["CNNPIPE_PARAMS"])["train"]["epochs"] == 2  # the run's overrides, applied
    # cancelling the run deletes the step's pod, and with it the job
    assert job["metadata"]["ownerReferences"] == [{"apiVersion": "v1", "kind": "Pod", "name": "cnnpipe-abc-train-job-driver",
                                                   "uid": "a1b2c3d4-0000-0000-0000-a1b2c3d4e5f6"}]


def test_step_outputs_a_model_trained_on_val_without_val_scores(tmp_path, kube_api):
    """train.train_on_val: the job's history has no val columns; the step says so with None, not a crash."""
    kube_api["train_on_val"] = True
    result = step(tmp_path)
    assert {k: result[k] for k in ("best_epoch", "kept_epoch", "val_accuracy", "val_loss")} == \
        {"best_epoch": None, "kept_epoch": 2, "val_accuracy": None, "val_loss": None}


def test_step_fails_with_the_jobs_name_when_the_job_fails(tmp_path, kube_api):
    kube_api["outcome"] = "Failed"
    with pytest.raises(CnnpipeError) as failure:
        step(tmp_path)
    (name,) = kube_api["jobs"]
    assert str(failure.value) == (f"PyTorchJob default/{name} failed: PyTorchJobFailed: PyTorchJob {name} is failed. "
                                  f"(its pods' logs: `kubectl logs -n default -l training.kubeflow.org/job-name={name}`)")
    assert not (tmp_path / "out" / "model").exists()


def test_step_deletes_a_job_that_outlives_its_deadline(tmp_path, kube_api):
    kube_api["outcome"] = "Running"
    template = trainjob.manifest(trainjob.pytorchjob(Topology(nodes=2), "img", "1", "1G"))
    template["spec"]["runPolicy"]["activeDeadlineSeconds"] = 1
    with pytest.raises(CnnpipeError, match=r"cnnpipe-train-[0-9a-f]{8}: not finished after 2 s; deleted"):
        step(tmp_path, template, wait_margin_seconds=1)
    assert kube_api["jobs"] == {} and [m for m, _ in kube_api["requests"]].count("DELETE") == 1
