"""Read files out of a zip, a tar(.gz) or a folder, without extracting anything to disk.

Member paths that would escape the archive root (absolute paths, `..`, links) are rejected: a
crafted archive is refused as a whole rather than half-read. What a member may cost in memory is
checked from its header before it is read (declared size, compression ratio), and again while
reading a tar member (whose header a compressed stream cannot vouch for): a member over the
limits is refused (an image is then listed as a bad file), never read whole first.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cnnpipe.errors import CnnpipeError

MiB = 2**20
RATIO_FLOOR = MiB  # a member that inflates to less than this is harmless whatever its compression ratio
CHUNK = MiB  # a tar member is read this much at a time; no tar header may be longer
MAX_NAME_CHARS = 4096  # a member name longer than any file system's path (PATH_MAX) is no dataset's


class MemberRefused(CnnpipeError):
    """One archive member is over the limits or unreadable: the rest of the archive is still usable."""


@dataclass(frozen=True)
class ArchiveLimits:
    max_member_mb: float  # one member, inflated
    max_ratio: float  # inflated / compressed size of a member over RATIO_FLOOR
    max_total_mb: float  # all members together, as declared (a tar's are held in memory)
    max_members: int  # entries of a zip or tar (folders, empty files and links count too)


def _check_member(archive: Path, name: str) -> str:
    if len(name) > MAX_NAME_CHARS:
        raise CnnpipeError(f"archive '{archive}': a member name of {len(name):,} characters (over {MAX_NAME_CHARS}); "
                           f"refusing the archive")
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or (p.parts and p.parts[0].endswith(":")):
        raise CnnpipeError(f"archive '{archive}': member '{name}' escapes the archive root; refusing the archive")
    return str(p)


class FileTree:
    """The regular files under a folder or inside an archive, by relative POSIX path.

    A folder's or a zip's tree pickles as its path (a decoding process reopens it, without listing a folder
    again); a tar's is held in memory, so a process gets `for_chunk`'s members instead, never the whole tar.
    """

    def __init__(self, path: Path, limits: ArchiveLimits, listed: bool = True):
        self.path, self.limits = path, limits
        self._refused: dict[str, str] = {}  # tar members not kept, and why
        if path.is_dir():
            self._kind = "dir"
            self._names = sorted(str(p.relative_to(path).as_posix()) for p in path.rglob("*") if p.is_file()) \
                if listed else []
        elif zipfile.is_zipfile(path):
            self._kind = "zip"
            self._check_count(_zip_entries(path))  # before zipfile reads the central directory into objects
            self._zip = zipfile.ZipFile(path)
            infos = [i for i in self._zip.infolist() if not i.is_dir()]
            self._check_total(sum(i.file_size for i in infos))
            self._zip_infos = {_check_member(path, i.filename): i for i in infos}
            self._names = sorted(self._zip_infos)
        elif path.is_file() and _is_tar(path):
            self._kind = "tar"
            self._members = self._read_tar()
            self._names = sorted([*self._members, *self._refused])
        elif path.exists():
            raise CnnpipeError(f"'{path}' is neither a folder, a zip nor a tar archive")
        else:
            raise CnnpipeError(f"'{path}' not found")

    def _check_count(self, entries: int) -> None:
        """A zip's declared entries, or a tar's counted so far (it stops at the first one too many)."""
        if entries > self.limits.max_members:
            raise CnnpipeError(f"archive '{self.path}': more than ingest.max_members={self.limits.max_members:,} "
                               f"entries ({'at least ' if self._kind == 'tar' else ''}{entries:,}); refusing the archive")

    def _check_total(self, size: int) -> None:
        if size > self.limits.max_total_mb * MiB:
            raise CnnpipeError(f"archive '{self.path}': its members declare {size / MiB:.0f} MiB in all, over "
                               f"ingest.max_total_mb={self.limits.max_total_mb:g}; refusing the archive")

    def _too_costly(self, size: int, packed: int) -> str | None:
        """Why a member of `size` bytes inflated from `packed` may not be read, or None."""
        if size > self.limits.max_member_mb * MiB:
            return f"{size / MiB:.1f} MiB inflated, over ingest.max_member_mb={self.limits.max_member_mb:g}"
        if size > RATIO_FLOOR and size > self.limits.max_ratio * max(packed, 1):
            return (f"compression ratio {size / max(packed, 1):.0f}:1, over "
                    f"ingest.max_compression_ratio={self.limits.max_ratio:g}")
        return None

    def _read_tar(self) -> dict[str, bytes]:
        members: dict[str, bytes] = {}
        total = entries = 0
        # one pass (a .tar.gz has no random access), through a stream whose reads are bounded (tarfile reads a GNU
        # long name or a pax header whole)
        with open(self.path, "rb") as raw, tarfile.open(fileobj=_BoundedReads(raw, self.path), mode="r:") as tar:
            while (m := tar.next()) is not None:
                tar.members.clear()  # tarfile keeps every header it has read: a million empty members, a million
                entries += 1
                self._check_count(entries)
                name = _check_member(self.path, m.name)
                if m.issym() or m.islnk() or m.isdev():
                    raise CnnpipeError(f"archive '{self.path}': member '{m.name}' is a link or device; refusing the archive")
                if not m.isfile():
                    continue
                if m.size > self.limits.max_member_mb * MiB:
                    self._refused[name] = self._too_costly(m.size, m.size)
                    continue
                self._check_total(total + m.size)
                members[name] = self._read_bounded(tar.extractfile(m), m.size, raw, total)
                total += m.size
        return members

    def _read_bounded(self, f, size: int, raw, before: int) -> bytes:  # noqa: ANN001 - file objects
        """A tar member's bytes, read in chunks while the archive inflates within the ratio limit (a
        compressed tar has no per-member sizes: the stream's position is what was inflated from so far)."""
        chunks, got = [], 0
        while got < size:
            chunk = f.read(min(CHUNK, size - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
            inflated = before + got
            if inflated > RATIO_FLOOR and inflated > self.limits.max_ratio * max(raw.tell(), 1):
                raise CnnpipeError(f"archive '{self.path}': inflates {inflated / max(raw.tell(), 1):.0f}:1, over "
                                   f"ingest.max_compression_ratio={self.limits.max_ratio:g}; refusing the archive")
        return b"".join(chunks)

    def __reduce__(self) -> tuple:
        if self._kind == "tar":
            raise TypeError(f"the tar '{self.path}' is held in memory: send FileTree.for_chunk's members")
        return FileTree, (self.path, self.limits, self._kind != "dir")

    def for_chunk(self, names: list[str]) -> FileTree | ChunkMembers:
        """What a decoding process needs to read `names`: this tree (reopened there), or for a tar those
        members' bytes (the parent holds the tar; a process gets one chunk's worth)."""
        return ChunkMembers(self, names) if self._kind == "tar" else self

    def names(self) -> list[str]:
        return self._names

    def read(self, name: str) -> bytes:
        """A member's bytes; MemberRefused when it is over the limits or unreadable."""
        where = f"archive '{self.path}': member '{name}'"
        if self._kind == "dir":
            p = self.path / name
            why = self._too_costly(p.stat().st_size, p.stat().st_size)
            if why:
                raise MemberRefused(f"'{p}': {why}; not read")
            return p.read_bytes()
        if self._kind == "tar":
            if name in self._refused:
                raise MemberRefused(f"{where}: {self._refused[name]}; not read")
            return self._members[name]
        info = self._zip_infos[name]
        why = self._too_costly(info.file_size, info.compress_size)
        if why:
            raise MemberRefused(f"{where}: {why}; not read")
        try:
            with self._zip.open(info) as f:  # yields at most the declared size, then checks the CRC
                return f.read()
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
            raise MemberRefused(f"{where}: unreadable ({e})") from None

    def find(self, suffix: str) -> Iterator[str]:
        """Names ending in `suffix` (case-insensitive)."""
        low = suffix.lower()
        return (n for n in self._names if n.lower().endswith(low))

    def close(self) -> None:
        if self._kind == "zip":
            self._zip.close()


def _zip_entries(path: Path) -> int:
    """The entry count a zip's end record (zip64's when there is one) declares."""
    with open(path, "rb") as f:
        end = zipfile._EndRecData(f)  # the stdlib's own reader of the end record; no public API exposes it
    if end is None:
        raise CnnpipeError(f"archive '{path}': no zip end record")
    return int(end[zipfile._ECD_ENTRIES_TOTAL])


def _is_tar(path: Path) -> bool:
    """tarfile.is_tarfile reads the first header whole, however long: this reads it through _BoundedReads."""
    try:
        with open(path, "rb") as raw, tarfile.open(fileobj=_BoundedReads(raw, path), mode="r:"):
            return True
    except tarfile.TarError:
        return False


class _BoundedReads:
    """A tar's decompressed stream (gzip, bzip2, xz or none, by its magic bytes) whose single reads are at most
    CHUNK: tarfile reads a member in CHUNK pieces here, and a header (a long name, a pax record) in one read."""

    def __init__(self, raw, path: Path):  # noqa: ANN001 - a binary file
        magic = raw.read(6)
        raw.seek(0)
        self.path = path
        self._f = gzip.GzipFile(fileobj=raw) if magic.startswith(b"\x1f\x8b") else \
            bz2.BZ2File(raw) if magic.startswith(b"BZh") else \
            lzma.LZMAFile(raw) if magic.startswith(b"\xfd7zXZ\x00") else raw

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > CHUNK:
            raise CnnpipeError(f"archive '{self.path}': a tar header of {size:,} bytes (a member name or pax record "
                               f"that long); refusing the archive")
        try:
            return self._f.read(size)
        except (OSError, EOFError, lzma.LZMAError, zlib.error) as e:
            raise CnnpipeError(f"archive '{self.path}': not a readable tar ({e})") from None

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()


class ChunkMembers:
    """Some members of a tar's FileTree, read in the parent: the picklable part a decoding process gets."""

    def __init__(self, tree: FileTree, names: list[str]):
        self.path = tree.path
        self._members: dict[str, bytes] = {}
        self._refused: dict[str, str] = {}
        for name in names:
            try:
                self._members[name] = tree.read(name)
            except MemberRefused as e:
                self._refused[name] = str(e)

    def read(self, name: str) -> bytes:
        if name in self._refused:
            raise MemberRefused(self._refused[name])
        return self._members[name]
