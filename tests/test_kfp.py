"""Kubeflow Pipelines: the compiled pipeline's structure, and the whole pipeline run by kfp.local."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.e2e


def cnnpipe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run(["cnnpipe", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


def test_compiled_pipeline_has_the_five_stages_typed_and_the_gpu_request(tmp_path):
    proc = cnnpipe("pipeline", "compile", "--params", str(REPO / "params.yaml"), "--output", str(tmp_path / "p.yaml"),
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    spec = yaml.safe_load((tmp_path / "p.yaml").read_text())
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"ingest", "augment", "train", "evaluate", "register"}
    upstream = {name: set(t.get("dependentTasks", [])) for name, t in tasks.items()}
    assert upstream == {"ingest": set(), "augment": {"ingest"}, "train": {"augment", "ingest"},
                        "evaluate": {"ingest", "train"}, "register": {"evaluate", "ingest", "train"}}
    outputs = {name: {k: v["artifactType"]["schemaTitle"] for k, v in c["outputDefinitions"].get("artifacts", {}).items()}
               for name, c in spec["components"].items()}
    assert outputs["comp-ingest"]["dataset"] == "system.Dataset"
    assert outputs["comp-train"]["model"] == "system.Model"
    assert outputs["comp-evaluate"] == {"evaluation": "system.Artifact", "metrics": "system.Metrics",
                                        "classification": "system.ClassificationMetrics", "report": "system.HTML"}
    resources = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu" and resources["accelerator"]["resourceCount"] == "1"
    assert tasks["ingest"]["cachingOptions"] == {"enableCache": True} and not tasks["register"]["cachingOptions"]
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {"source", "arch", "epochs", "batch_size", "lr", "model_name", "promotion_metric", "min_delta",
            "tracking_uri"} <= set(params)
    # the params file given to compile is the pipeline's default params
    assert json.loads(params["params"]["defaultValue"]) == yaml.safe_load((REPO / "params.yaml").read_text())


def test_run_local_registers_a_model_with_its_confusion_matrix(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    proc = cnnpipe("pipeline", "run-local", "-p", "epochs=3", "-p", "model_name=digits-kfp", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["model_uri"] == "models:/digits-kfp/1"
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    version = client.get_model_version("digits-kfp", "1")
    assert float(version.tags["test.accuracy"]) > 0.9
    executor = next(Path(result["pipeline_root"]).glob("*/evaluate/executor_output.json"))
    artifacts = json.loads(executor.read_text())["artifacts"]
    matrix = artifacts["classification"]["artifacts"][0]["metadata"]["confusionMatrix"]
    assert len(matrix["rows"]) == 10 and [s["displayName"] for s in matrix["annotationSpecs"]][:3] == ["0", "1", "2"]


def test_a_failing_component_fails_the_run(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    proc = cnnpipe("pipeline", "run-local", "-p", "source=mnist", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == ("cnnpipe pipeline: error: pipeline run failed: Pipeline 'cnnpipe' "
                                                    "finished with status FAILURE. Inner task failed: 'ingest'.")
    assert "unknown dataset 'mnist'" in proc.stdout + proc.stderr  # the component's own error, in kfp's log
