"""Atomic outputs: everything is written to a temp sibling and renamed into place.

A stage that fails (or is killed) leaves no half-written output behind: at worst a
`.tmp-*` sibling that the next run of the same stage removes, or a resumable `.staging`
sibling (staged_dir) that the next run with the same fingerprint continues from.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cnnpipe.errors import CnnpipeError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def ensure_writable_parent(path: Path) -> None:
    """Create `path`'s parent or fail with one line naming `path`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.probe-", delete=True):
            pass
    except OSError as e:
        raise CnnpipeError(f"output path '{path}' is not writable: {e.strerror or e}") from None


def _remove_stale_temps(path: Path) -> None:
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _replace(tmp: Path, path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        # A directory cannot be atomically replaced by rename(2); move the old one aside first.
        old = path.parent / f".{path.name}.tmp-old"
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Yield an empty temp directory that becomes `path` only if the block succeeds."""
    path = Path(path)
    ensure_writable_parent(path)
    _remove_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; outputs get the usual permissions
    try:
        yield tmp
        _replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class Staging:
    """An output in the making: `out` becomes the output; `records` are what an interrupted run with the same
    fingerprint journaled (each `record` call appends a line, so a kill loses at most the line being written)."""

    def __init__(self, root: Path, fingerprint: str | None):
        self.root, self.out = root, root / "out"
        self.records: list[dict] = []
        self.discarded = False
        self._journal = root / "journal.jsonl"
        header = json.dumps({"fingerprint": fingerprint})
        if fingerprint is not None and self._journal.exists():
            lines = self._journal.read_text().splitlines()
            if lines and lines[0] == header:
                for line in lines[1:]:
                    try:
                        self.records.append(json.loads(line))
                    except ValueError:  # the line a kill cut short, and anything after it
                        break
        if not self.records:  # a new start: whatever was here belongs to another input or config
            shutil.rmtree(root, ignore_errors=True)
        self.out.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o777 & ~_umask())
        os.chmod(self.out, 0o777 & ~_umask())
        self._journal.write_text("".join(json.dumps(r) + "\n" for r in [{"fingerprint": fingerprint}, *self.records]))

    def record(self, entry: dict) -> None:
        with open(self._journal, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def discard(self) -> None:
        """Nothing to resume (the run failed for good, on its data): a failure then leaves nothing behind."""
        self.discarded = True


@contextlib.contextmanager
def staged_dir(path: Path | str, fingerprint: str | None) -> Iterator[Staging]:
    """Like atomic_dir, but resumable: the work happens in `.<name>.staging` beside `path`, kept when the
    block fails or is killed, and continued by the next call with the same `fingerprint` (of the config and
    inputs; another fingerprint starts afresh). `out` becomes `path` only if the block succeeds. With no
    fingerprint there is nothing to resume: a temp sibling that a failure removes."""
    path = Path(path)
    ensure_writable_parent(path)
    _remove_stale_temps(path)
    if fingerprint is None:
        root = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    else:
        root = path.parent / f".{path.name}.staging"
    staging = Staging(root, fingerprint)
    try:
        yield staging
        _replace(staging.out, path)
    except BaseException:
        if fingerprint is None or staging.discarded:
            shutil.rmtree(root, ignore_errors=True)
        raise
    shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: Path | str) -> Iterator[Path]:
    """Yield a temp file path that becomes `path` only if the block succeeds."""
    path = Path(path)
    ensure_writable_parent(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path | str, obj: Any) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: Path | str, what: str) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CnnpipeError(f"{what} '{path}' not found") from None
    except (OSError, ValueError) as e:
        raise CnnpipeError(f"{what} '{path}' is not readable JSON: {e}") from None


def file_digest(path: Path | str, algorithm: str = "sha256") -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()
