"""Kubeflow Pipelines: the compiled pipeline's structure, its errors under kfp.local, and submission. The whole
pipeline's successful kfp.local run (its registered model, its confusion matrix) is in tests/test_parity.py."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.helpers import REPO, cnnpipe

pytestmark = pytest.mark.e2e


def test_compiled_pipeline_has_the_five_stages_typed_and_the_gpu_request(tmp_path):
    proc = cnnpipe("pipeline", "compile", "--params", str(REPO / "params.yaml"), "--output", str(tmp_path / "p.yaml"),
                   cwd=tmp_path, env={"CNNPIPE_IMAGE": "registry.example.com/ml/cnnpipe:1.2"})
    assert proc.returncode == 0, proc.stderr
    spec, platform = yaml.safe_load_all((tmp_path / "p.yaml").read_text())  # KFP's spec, then the Kubernetes one
    # one image for every component, named by one setting
    assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {
        "registry.example.com/ml/cnnpipe:1.2"}
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"ingest", "augment", "train", "evaluate", "register"}
    upstream = {name: set(t.get("dependentTasks", [])) for name, t in tasks.items()}
    assert upstream == {"ingest": set(), "augment": {"ingest"}, "train": {"augment", "ingest"},
                        "evaluate": {"ingest", "train"}, "register": {"evaluate", "ingest", "train"}}
    outputs = {name: {k: v["artifactType"]["schemaTitle"] for k, v in c["outputDefinitions"].get("artifacts", {}).items()}
               for name, c in spec["components"].items()}
    assert outputs["comp-ingest"]["data"] == "system.Dataset"
    assert outputs["comp-train"]["model"] == "system.Model"
    assert outputs["comp-evaluate"] == {"evaluation": "system.Artifact", "metrics": "system.Metrics",
                                        "classification": "system.ClassificationMetrics", "report": "system.HTML"}
    resources = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu" and resources["accelerator"]["resourceCount"] == "1"
    assert tasks["ingest"]["cachingOptions"] == {"enableCache": True} and not tasks["register"]["cachingOptions"]
    params = spec["root"]["inputDefinitions"]["parameters"]
    # params.yaml decides every param: the pipeline's only other inputs are the run's overrides (none by
    # default), where to track, and which secret holds credentials
    assert set(params) == {"params", "overrides", "tracking_uri", "credentials_secret"}
    assert params["overrides"]["parameterType"] == "LIST" and params["overrides"]["defaultValue"] == []
    # credentials reach the stages that talk to MLflow or a DVC remote from a Kubernetes secret, by name
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(executors) == {"exec-ingest", "exec-train", "exec-evaluate", "exec-register"}
    for executor in executors.values():
        (secret,) = executor["secretAsEnv"]
        assert secret["secretNameParameter"] == {"componentInputParameter": "credentials_secret"} and secret["optional"]
        assert {"secretKey": "MLFLOW_TRACKING_PASSWORD", "envVar": "MLFLOW_TRACKING_PASSWORD"} in secret["keyToEnv"]
    # the params file given to compile is the pipeline's default params
    assert json.loads(params["params"]["defaultValue"]) == yaml.safe_load((REPO / "params.yaml").read_text())


def test_a_failing_component_fails_the_run(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    proc = cnnpipe("pipeline", "run-local", "-p", "ingest.source=mnist", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == ("cnnpipe pipeline: error: pipeline run failed: Pipeline 'cnnpipe' "
                                                    "finished with status FAILURE. Inner task failed: 'ingest'.")
    assert "unknown dataset 'mnist'" in proc.stdout + proc.stderr  # the component's own error, in kfp's log


def test_docker_runner_without_an_engine_says_how_to_start_one(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    proc = cnnpipe("pipeline", "run-local", "--runner", "docker", cwd=tmp_path,
                   env={"DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"}, timeout=120)
    assert proc.returncode == 3
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("cnnpipe pipeline: error: pipeline run-local --runner docker: no container engine (")
    assert line.endswith("`export DOCKER_HOST=unix:///tmp/podman.sock`")


@pytest.fixture
def kfp_api():
    """A local HTTP endpoint standing in for the Kubeflow Pipelines API server: it records every request
    and answers the few calls `kfp.Client` makes (health, experiments, runs) as the v2beta1 API does."""
    import http.server
    import threading

    requests: list[tuple[str, str, dict]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length)) if length else {}
            requests.append((self.command, self.path.split("?")[0], body))
            reply = {}
            if self.path.startswith("/apis/v2beta1/experiments"):
                reply = {"experiments": []} if self.command == "GET" else {"experiment_id": "exp-7", **body}
            elif self.path.startswith("/apis/v2beta1/runs") and self.command == "POST":
                reply = {"run_id": "run-42", "display_name": body.get("display_name")}
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _answer

        def log_message(self, *args) -> None:  # noqa: ANN002 - quiet
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()


def test_submit_sends_the_pipeline_with_its_parameters(tmp_path, kfp_api):
    host, requests = kfp_api
    proc = cnnpipe("pipeline", "submit", "--params", str(REPO / "params.yaml"), "--host", host, "--experiment", "digits",
                   "--run-name", "nightly", "-p", "train.epochs=5", "-p", "ingest.dvc_rev=v1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"run_id": "run-42",
                                                                "url": f"{host}/#/runs/details/run-42"}
    assert ("POST", "/apis/v2beta1/experiments", {"display_name": "digits", "namespace": ""}) in requests
    (run,) = [body for method, path, body in requests if (method, path) == ("POST", "/apis/v2beta1/runs")]
    assert run["experiment_id"] == "exp-7" and run["display_name"] == "nightly"
    assert run["runtime_config"]["parameters"] == {"params": json.dumps(yaml.safe_load((REPO / "params.yaml").read_text())),
                                                   "overrides": ["train.epochs=5", "ingest.dvc_rev=v1"]}
    spec = run["pipeline_spec"]["pipeline_spec"]
    assert set(spec["root"]["dag"]["tasks"]) == {"ingest", "augment", "train", "evaluate", "register"}
    assert spec["root"]["dag"]["tasks"]["ingest"]["cachingOptions"] == {"enableCache": True}
    assert "exec-train" in run["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]

    requests.clear()
    proc = cnnpipe("pipeline", "submit", "--params", str(REPO / "params.yaml"), "--host", host, "--no-cache", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (run,) = [body for method, path, body in requests if (method, path) == ("POST", "/apis/v2beta1/runs")]
    tasks = run["pipeline_spec"]["pipeline_spec"]["root"]["dag"]["tasks"]
    assert all(not t.get("cachingOptions", {}).get("enableCache") for t in tasks.values())


def test_submit_with_several_nodes_sends_the_training_job(tmp_path, kfp_api):
    host, requests = kfp_api
    proc = cnnpipe("pipeline", "submit", "--params", str(REPO / "params.yaml"), "--host", host, "-p", "nodes=3",
                   "-p", "gpus_per_node=2", "-p", "train.epochs=5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (run,) = [body for method, path, body in requests if (method, path) == ("POST", "/apis/v2beta1/runs")]
    # the topology is the pipeline's shape, not a run parameter
    assert set(run["runtime_config"]["parameters"]) == {"params", "overrides"}
    spec = run["pipeline_spec"]["pipeline_spec"]
    assert set(spec["root"]["dag"]["tasks"]) == {"ingest", "augment", "train-job", "evaluate", "register"}
    job = json.loads(spec["root"]["dag"]["tasks"]["train-job"]["inputs"]["parameters"]["job"]["runtimeValue"]["constant"])
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2 and job["spec"]["nprocPerNode"] == "2"
