"""One params file, three orchestrators, the same model: a params.yaml far from the defaults (another
architecture, width, epochs, learning rate, model name and experiment) through `dvc repro`,
`mlflow run .` and `cnnpipe pipeline run-local` gives bit-identical weights on CPU, the same metrics,
the same registered model and the same experiment. The KFP run also hands KFP its confusion matrix, and a `-p`
override makes its register component promote the version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import cnnpipe, make_workspace, run

pytestmark = pytest.mark.e2e

CHANGES = {"train": {"arch": "fastnet", "width": 8, "epochs": 3, "lr": 0.1, "batch_size": 32},
           "register": {"model_name": "parity-digits", "auto_promote": False},
           "tracking": {"experiment": "parity"}}


def weights(model_file: Path) -> dict[str, torch.Tensor]:
    return torch.load(model_file, map_location="cpu", weights_only=True)["state_dict"]


def test_dvc_mlflow_and_kfp_train_the_same_model_from_one_params_file(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    params = yaml.safe_load((ws / "params.yaml").read_text())
    for block, values in CHANGES.items():
        params[block].update(values)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    run(["dvc", "repro"], ws)
    run(["mlflow", "run", ".", "--env-manager", "local", "-P", "workdir=data/mlproject"], ws)
    # a -p override reaches the register component: promotion changes no weight or metric
    proc = cnnpipe("pipeline", "run-local", "--root", "data/kfp", "-p", "register.auto_promote=true", cwd=ws)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = proc.stdout.splitlines()  # one JSON line of results; kfp's own logs go to stderr
    result = json.loads(line)
    assert result["model_uri"] == "models:/parity-digits/3"
    # the evaluate component's confusion matrix, as the KFP UI reads it
    executor = next(Path(result["pipeline_root"]).glob("*/evaluate/executor_output.json"))
    metadata = json.loads(executor.read_text())["artifacts"]["classification"]["artifacts"][0]["metadata"]
    assert len(metadata["confusionMatrix"]["rows"]) == 10
    assert [s["displayName"] for s in metadata["confusionMatrix"]["annotationSpecs"]][:3] == ["0", "1", "2"]

    (kfp_model,) = (ws / "data/kfp/outputs").glob("*/train/model/model.pt")
    models = {"dvc": ws / "data/model/model.pt", "mlflow": ws / "data/mlproject/model/model.pt", "kfp": kfp_model}
    reference = weights(models["dvc"])
    assert sum(t.numel() for t in reference.values()) > 0
    for name, file in models.items():
        got = weights(file)
        assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in got), name

    from mlflow import MlflowClient

    uri = f"sqlite:///{ws / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = client.search_model_versions("name='parity-digits'")
    assert len(versions) == 3  # nothing registered under the default name
    runs = [client.get_run(v.run_id) for v in versions]
    assert {client.get_experiment(r.info.experiment_id).name for r in runs} == {"parity"}
    for r in runs:
        assert r.data.params["train.arch"] == "fastnet" and r.data.params["train.lr"] == "0.1"
        assert r.data.params["train.epochs"] == "3" and r.data.params["train.width"] == "8"
    test_metrics = {(r.data.metrics["test/accuracy"], r.data.metrics["test/loss"]) for r in runs}
    assert len(test_metrics) == 1, test_metrics
    ((accuracy, _),) = test_metrics
    (kfp_version,) = [v for v in versions if str(v.version) == "3"]
    assert float(kfp_version.tags["test.accuracy"]) == pytest.approx(accuracy) and accuracy > 0.5
    assert str(client.get_model_version_by_alias("parity-digits", "champion").version) == "3"
