"""Read files out of a zip, a tar(.gz) or a folder, without extracting anything to disk.

Member paths that would escape the archive root (absolute paths, `..`, links) are rejected: a
crafted archive is refused as a whole rather than half-read.
"""

from __future__ import annotations

import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from cnnpipe.errors import CnnpipeError


def _check_member(archive: Path, name: str) -> str:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or (p.parts and p.parts[0].endswith(":")):
        raise CnnpipeError(f"archive '{archive}': member '{name}' escapes the archive root; refusing the archive")
    return str(p)


class FileTree:
    """The regular files under a folder or inside an archive, by relative POSIX path."""

    def __init__(self, path: Path):
        self.path = path
        if path.is_dir():
            self._kind = "dir"
            self._names = sorted(str(p.relative_to(path).as_posix()) for p in path.rglob("*") if p.is_file())
        elif zipfile.is_zipfile(path):
            self._kind = "zip"
            self._zip = zipfile.ZipFile(path)
            infos = self._zip.infolist()
            self._zip_names = {_check_member(path, i.filename): i.filename for i in infos if not i.is_dir()}
            self._names = sorted(self._zip_names)
        elif path.is_file() and tarfile.is_tarfile(path):
            self._kind = "tar"
            self._members: dict[str, bytes] = {}
            with tarfile.open(path) as tar:  # one sequential pass: a .tar.gz has no random access
                for m in tar:
                    name = _check_member(path, m.name)
                    if m.issym() or m.islnk() or m.isdev():
                        raise CnnpipeError(f"archive '{path}': member '{m.name}' is a link or device; refusing the archive")
                    if m.isfile():
                        self._members[name] = tar.extractfile(m).read()
            self._names = sorted(self._members)
        elif path.exists():
            raise CnnpipeError(f"'{path}' is neither a folder, a zip nor a tar archive")
        else:
            raise CnnpipeError(f"'{path}' not found")

    def names(self) -> list[str]:
        return self._names

    def read(self, name: str) -> bytes:
        if self._kind == "dir":
            return (self.path / name).read_bytes()
        if self._kind == "zip":
            return self._zip.read(self._zip_names[name])
        return self._members[name]

    def find(self, suffix: str) -> Iterator[str]:
        """Names ending in `suffix` (case-insensitive)."""
        low = suffix.lower()
        return (n for n in self._names if n.lower().endswith(low))

    def close(self) -> None:
        if self._kind == "zip":
            self._zip.close()
