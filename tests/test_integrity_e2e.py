"""Issue 24 end to end: one writer per output and a full disk, through the real CLI (a real tmpfs when this
machine lets the test mount one: root with CAP_SYS_ADMIN; skipped otherwise, and the file-size-limit case of
tests/test_integrity.py covers the same code without privileges)."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO, cnnpipe
from tests.test_integrity import lock_held_elsewhere

pytestmark = pytest.mark.e2e


@contextlib.contextmanager
def tmpfs(path: Path, size: str):  # noqa: ANN201 - yields the mount point
    path.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                                        capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def workspace(tmp_path: Path) -> Path:
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    return tmp_path


def test_two_ingests_into_one_output(tmp_path):
    ws = workspace(tmp_path)
    out = ws / "data/processed"
    out.parent.mkdir()
    with lock_held_elsewhere(out) as pid:
        proc = cnnpipe("ingest", "--workers", "1", "--out", str(out), cwd=ws)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"is being made by pid {pid} on" in lines[0], proc.stderr
    assert not out.exists()


def test_a_full_disk_is_one_line_and_keeps_the_previous_output(tmp_path):
    ws = workspace(tmp_path)
    with tmpfs(tmp_path / "disk", "2m") as disk:
        out = disk / "processed"
        proc = cnnpipe("ingest", "--workers", "1", "--out", str(out), "--report", str(disk / "r.json"), cwd=ws)
        assert proc.returncode == 0, proc.stderr
        before = (out / "manifest.json").read_text()
        free = shutil.disk_usage(disk).free
        (disk / "filler").write_bytes(bytes(max(free - 64 * 1024, 0)))
        proc = cnnpipe("ingest", "--workers", "1", "--image-size", "24", "--out", str(out), "--report",
                       str(disk / "r.json"), cwd=ws)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and f"cannot write '{out}': No space left on device" in lines[0], proc.stderr
        assert (out / "manifest.json").read_text() == before
        assert json.loads(before)["image_size"] == 16
        # no temp folder or lock left; the staging stays for a rerun to resume once there is room (fsio.staged_dir)
        assert [p.name for p in disk.iterdir() if p.name.startswith(".")] == [".processed.staging"]


def test_a_full_tracking_store_is_one_line(tmp_path):
    """SQLite's "database or disk is full" from MLflow's store, however deep it is wrapped."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    from cnnpipe.cli import _medium_error

    with tmpfs(tmp_path / "disk", "4m") as disk:
        uri = f"sqlite:///{disk / 'mlflow.db'}"
        client = MlflowClient(uri)
        run = client.create_run(client.create_experiment("x"))
        (disk / "filler").write_bytes(bytes(max(shutil.disk_usage(disk).free - 8 * 1024, 0)))
        with pytest.raises(Exception) as caught:
            for i in range(200):
                client.log_batch(run.info.run_id, params=[Param(f"p{i}-{j}", "v" * 400) for j in range(50)])
        assert "database or disk is full" in _medium_error(caught.value)


def test_an_archive_of_too_many_entries_is_one_line(tmp_path):
    from tests.test_integrity import empty_members_tar_gz

    ws = workspace(tmp_path)
    archive = empty_members_tar_gz(tmp_path / "many.tar.gz", 2001)
    proc = cnnpipe("ingest", "--source", "imagefolder", "--path", str(archive), "--max-members", "2000",
                   "--out", str(ws / "processed"), cwd=ws)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "more than ingest.max_members=2,000 entries" in lines[0], proc.stderr
