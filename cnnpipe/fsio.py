"""Atomic outputs: everything is written to a temp sibling and renamed into place.

A stage that fails (or is killed) leaves no half-written output behind: at worst a
`.tmp-*` sibling that the next run of the same stage removes, or a resumable `.staging`
sibling (staged_dir) that the next run with the same fingerprint continues from.

One process at a time makes an output folder: atomic_dir and staged_dir hold a lock beside it
(`.<name>.lock`, naming its holder), so a second writer exits 2 naming the first instead of removing
its temp files under it. A full disk (or quota, read-only file system, file size limit) while writing an
output is one line naming the output, and the previous output stays as it was.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

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


# errors of the medium written to, not of the data: what a full disk, a quota, a file size limit or a read-only
# mount raise
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def write_error(e: OSError, path: Path | str) -> CnnpipeError:
    """The one line for an OSError of WRITE_ERRNOS while writing `path`."""
    where = f" (at '{e.filename}')" if e.filename and str(e.filename) != str(path) else ""
    return CnnpipeError(f"cannot write '{path}': {e.strerror or e}{where}; any previous '{path}' is unchanged")


@contextlib.contextmanager
def _write_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        raise write_error(e, path) from None


@contextlib.contextmanager
def output_lock(path: Path) -> Iterator[None]:
    """Hold `.<name>.lock` beside `path` while making it; another holder: CnnpipeError naming it (pid, host,
    command, since when). The lock is the kernel's (flock): a killed holder's lock goes with it."""
    from filelock import FileLock, Timeout

    lock_path = path.parent / f".{path.name}.lock"
    lock = FileLock(str(lock_path))
    try:
        with _write_errors(path):
            lock.acquire(timeout=0)
        with contextlib.suppress(OSError), open(lock_path, "w") as f:  # who holds it, for the next one's message
            f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                    f"{' '.join(sys.argv)[:300]}")
    except Timeout:
        try:
            who = lock_path.read_text(errors="replace").strip() or "another process"
        except OSError:
            who = "another process"
        raise CnnpipeError(f"output '{path}' is being made by {who} (lock '{lock_path}'); wait for it to finish, "
                           f"or stop it") from None
    try:
        yield
    finally:
        lock_path.unlink(missing_ok=True)  # before releasing: a contender holding the old inode sees it unlinked
        lock.release()


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
    with output_lock(path), _write_errors(path):
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
    with output_lock(path), _write_errors(path):
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
    with _write_errors(path):
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


def read_regular_file(path: Path | str, max_bytes: int) -> bytes:
    """A regular file's bytes, at most `max_bytes`: a device (/dev/zero), a FIFO or a folder is refused without
    waiting on it, and so is a larger file (also one that grows while read). OSError or CnnpipeError naming it."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens at once instead of waiting for a writer
    try:
        st = os.fstat(fd)  # of what was opened, not of a name that may have changed since
        if not stat.S_ISREG(st.st_mode):
            raise CnnpipeError(f"'{path}': not a regular file")
        if st.st_size > max_bytes:
            raise CnnpipeError(f"'{path}': {st.st_size:,} bytes, over the budget of {max_bytes:,}")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise CnnpipeError(f"'{path}': over the budget of {max_bytes:,} bytes")
        return data
    finally:
        os.close(fd)


def write_array(path: Path | str, array: Any) -> None:
    """An array's raw bytes into `path` (what ndarray.tofile writes, but a full disk is an OSError with its errno,
    not numpy's "N requested and M written")."""
    with open(path, "wb") as f:
        f.write(memoryview(np.ascontiguousarray(array)).cast("B"))


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
