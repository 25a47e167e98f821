"""Registry updates that lose nothing: concurrent promotions and a register re-run, with real processes."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.helpers import cnnpipe, user_env
from tests.registered import MODEL_NAME, make_workspace, train_and_register

pytestmark = pytest.mark.e2e


def history(client) -> list[str]:  # noqa: ANN001 - an MlflowClient
    return json.loads(client.get_registered_model(MODEL_NAME).tags["cnnpipe.champion_history"])


def test_six_concurrent_forced_promotions_all_land_in_the_history(tmp_path):
    import mlflow

    ws = make_workspace(tmp_path)
    first = train_and_register(ws)  # version 1, champion
    uri = f"sqlite:///{ws / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)  # a logged model's versions are resolved through the tracking store
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    v1 = client.get_model_version(MODEL_NAME, first["version"])
    versions = [client.create_model_version(MODEL_NAME, v1.source, v1.run_id, tags=v1.tags).version for _ in range(6)]
    procs = [subprocess.Popen(["cnnpipe", "promote", "--version", str(v), "--force"], cwd=ws, env=user_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for v in versions]
    results = [(p.wait(timeout=600), p.stdout.read(), p.stderr.read()) for p in procs]
    for code, out, err in results:
        assert code == 0, err
        assert json.loads(out)["promoted"] is True
    walked = history(client)
    assert walked[0] == first["version"] and sorted(walked[1:], key=int) == [str(v) for v in versions]
    before = [json.loads(out)["champion_before"] for _, out, _ in results]
    assert sorted(before, key=int) == sorted(walked[:-1], key=int)  # each saw the one before it: a chain
    assert str(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == walked[-1]
    for expected in reversed(walked[:-1]):  # rollback walks the whole chain back
        proc = cnnpipe("rollback", cwd=ws)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["champion"] == expected

    # a register re-run for the same training run reuses its version
    proc = cnnpipe("register", cwd=ws)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["version"] == first["version"] and "reusing it" in proc.stderr
    assert len(client.search_model_versions(f"name = '{MODEL_NAME}'")) == 7


def test_two_first_runs_on_a_new_store_both_work(tmp_path):
    ws = make_workspace(tmp_path)
    proc = cnnpipe("augment", cwd=ws)
    assert proc.returncode == 0, proc.stderr
    assert not (ws / "mlflow.db").exists()
    procs = [subprocess.Popen(["cnnpipe", "train", "--out", f"data/model{i}", "--checkpoint", f"data/ckpt{i}.pt"],
                              cwd=ws, env=user_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for p in procs:
        code = p.wait(timeout=600)
        err = p.stderr.read()
        assert code == 0 or (code == 3 and len(err.strip().splitlines()) == 1), err
    assert all(p.returncode == 0 for p in procs)  # with the lock both get through
