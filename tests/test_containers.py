"""The project's image, built for real with podman (container/build.sh), and the whole pipeline run with
every component in it through kfp.local.DockerRunner on podman's Docker API. Skips where podman and
runc are absent (.ci/run installs them)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, cnnpipe

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not (shutil.which("podman") and shutil.which("runc")),
                                 reason="no container engine here (podman and runc)")]

IMAGE = "localhost/cnnpipe:test"
CONF = str(REPO / "container" / "containers.conf")
PODMAN_ENV = {**os.environ, "CONTAINERS_CONF": CONF}


@pytest.fixture(scope="module")
def image() -> str:
    """Built from the working tree (podman's layer cache makes a rebuild of unchanged code a second)."""
    proc = subprocess.run(["bash", str(REPO / "container" / "build.sh")], capture_output=True, text=True,
                          env={**PODMAN_ENV, "CNNPIPE_IMAGE": IMAGE}, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return IMAGE


@pytest.fixture(scope="module")
def docker_host(tmp_path_factory) -> str:
    """podman's Docker-compatible API on a socket of our own, stopped (server and its child) afterwards."""
    sock = tmp_path_factory.mktemp("podman") / "podman.sock"
    service = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{sock}"], start_new_session=True,
                               env=PODMAN_ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while not sock.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert sock.exists(), "podman system service did not start"
    yield f"unix://{sock}"
    os.killpg(service.pid, signal.SIGTERM)
    service.wait(timeout=30)


def run_local(tmp_path: Path, docker_host: str, image: str, *params: str, runner: str = "docker",
              root: str = "data/kfp") -> subprocess.CompletedProcess:
    if not (tmp_path / "params.yaml").exists():
        (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    args = [arg for p in params for arg in ("-p", p)]
    return cnnpipe("pipeline", "run-local", "--runner", runner, "--root", root, *args, cwd=tmp_path,
                   env={"DOCKER_HOST": docker_host, "CNNPIPE_IMAGE": image}, timeout=1200)


def leftover_containers() -> list[str]:
    out = subprocess.run(["podman", "ps", "-a", "--filter", f"ancestor={IMAGE}", "--format", "{{.ID}}"],
                         capture_output=True, text=True, env=PODMAN_ENV, check=True)
    return out.stdout.split()


def test_image_has_cnnpipe_kfp_and_cuda_torch_and_needs_no_network(image):
    proc = subprocess.run(["podman", "run", "--rm", "--network", "none", image, "python3", "-c",
                           "import cnnpipe, cnnpipe.components, kfp, torch, mlflow, dvc; "
                           "print(cnnpipe.__version__, kfp.__version__, torch.version.cuda is not None)"],
                          capture_output=True, text=True, env=PODMAN_ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    version, kfp_version, cuda = proc.stdout.split()
    assert (version, cuda) == ("0.1.0", "True") and kfp_version.startswith("2.")


def test_pipeline_runs_with_every_component_in_the_image(tmp_path, image, docker_host):
    """The non-default params of tests/test_parity.py, in the image and as subprocesses: the same weights."""
    import torch
    import yaml

    from tests.test_parity import CHANGES, weights

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for block, values in CHANGES.items():
        params[block].update(values)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = run_local(tmp_path, docker_host, image, "register.model_name=digits-container", "register.auto_promote=true")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (line,) = proc.stdout.splitlines()  # one JSON line; the containers' logs went to stderr
    result = json.loads(line)
    assert result["model_uri"] == "models:/digits-container/1" and result["runner"] == "docker"
    # the five components ran in the image (its venv), one container each, all removed afterwards
    assert proc.stderr.count(f"container of {image} exited with 0") == 5
    assert not leftover_containers()
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    version = client.get_model_version("digits-container", "1")
    assert float(version.tags["test.accuracy"]) > 0.5  # 3 epochs of a width-8 net: parity, not accuracy, is checked
    assert str(client.get_model_version_by_alias("digits-container", "champion").version) == "1"
    assert client.get_experiment(client.get_run(version.run_id).info.experiment_id).name == "parity"
    local = run_local(tmp_path, docker_host, image, "register.model_name=digits-subprocess", runner="subprocess",
                      root="data/kfp-subprocess")
    assert local.returncode == 0, local.stderr[-3000:]
    (in_image,) = (tmp_path / "data/kfp/outputs").glob("*/train/model/model.pt")
    (here,) = (tmp_path / "data/kfp-subprocess/outputs").glob("*/train/model/model.pt")
    a, b = weights(in_image), weights(here)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert client.get_model_version("digits-subprocess", "1").tags["test.accuracy"] == version.tags["test.accuracy"]
    executor = next(Path(result["pipeline_root"]).glob("*/evaluate/executor_output.json"))
    matrix = json.loads(executor.read_text())["artifacts"]["classification"]["artifacts"][0]["metadata"]
    assert len(matrix["confusionMatrix"]["rows"]) == 10


def test_a_component_that_raises_in_its_container_fails_the_run(tmp_path, image, docker_host):
    proc = run_local(tmp_path, docker_host, image, "ingest.source=mnist")
    assert proc.returncode == 2 and not proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == ("cnnpipe pipeline: error: pipeline run failed: Pipeline 'cnnpipe' "
                                                    "finished with status FAILURE. Inner task failed: 'ingest'.")
    assert f"container of {image} exited with 1" in proc.stderr and "unknown dataset 'mnist'" in proc.stderr
    assert not leftover_containers()


def test_a_missing_image_is_a_clear_error(tmp_path, docker_host):
    proc = run_local(tmp_path, docker_host, "localhost/cnnpipe:never-built")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("cnnpipe pipeline: error: pipeline run-local --runner docker: image "
                                   "'localhost/cnnpipe:never-built' not found (build it with container/build.sh, or set "
                                   "CNNPIPE_IMAGE to an image the engine has)")
