"""Folders on object storage (s3://, gs://, any fsspec URL): what a multi-node training job hands back.

A worker of a Kubeflow training job writes the model folder on its own disk; the pipeline step that
started the job runs in another pod, so the folder travels through object storage.
"""

from __future__ import annotations

from pathlib import Path

from cnnpipe.errors import CnnpipeError
from cnnpipe.fsio import atomic_dir


def upload_dir(local: Path, url: str) -> None:
    """Copy every file under `local` to `url`, keeping relative paths (existing objects are replaced)."""
    import fsspec

    if not local.is_dir():
        raise CnnpipeError(f"upload: '{local}' is not a folder")
    fs, root = fsspec.core.url_to_fs(url)
    # trailing slashes: the folder's content goes to `url` itself, whether or not something is there already
    fs.put(f"{local}/", f"{root.rstrip('/')}/", recursive=True)


def download_dir(url: str, local: Path) -> None:
    """Copy every object under `url` into the folder `local`, which appears only once all of them are there."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    files = fs.find(root)
    if not files:
        raise CnnpipeError(f"download: nothing at '{url}' (expected a folder's files)")
    with atomic_dir(local) as tmp:
        for name in files:
            target = tmp / name[len(root):].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(name, str(target))
