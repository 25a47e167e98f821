"""Inputs read from a DVC repository at a git revision (`dvc.api`), so a run trains on an exact,
named version of the data. The repo is a git URL or a local path; its DVC remote supplies the files.
Copies are cached by commit and path: a commit's files never change, so a cached copy is reused as is.
"""

from __future__ import annotations

from pathlib import Path

from cnnpipe.errors import CnnpipeError
from cnnpipe.fsio import atomic_dir, atomic_file


def resolve_commit(repo: str, rev: str | None) -> str:
    """The commit `rev` (a tag, branch or commit; None: the default branch) names in `repo`."""
    from dvc.api import DVCFileSystem
    from dvc.scm import CloneError, RevError

    fs = DVCFileSystem(repo, rev=rev)
    try:
        return fs.repo.get_rev()  # the clone and the revision are looked up here, lazily
    except CloneError as e:
        raise CnnpipeError(f"ingest.dvc_repo: cannot clone {repo!r}: {e.__cause__ or e}") from None
    except RevError:
        raise CnnpipeError(f"ingest.dvc_rev: {rev!r} is not a revision of {repo!r}") from None
    finally:
        fs.close()


def fetch(repo: str, commit: str, path: str, cache_dir: Path, field: str = "path") -> Path:
    """A local copy of `path` (a file or folder tracked by git or DVC; params field `field`) as it is at
    `commit` of `repo`."""
    from dvc.api import DVCFileSystem
    from dvc.exceptions import DvcException
    from dvc_data.index import DataIndexError

    rel = Path(path)
    if rel.is_absolute() or ".." in rel.parts:
        raise CnnpipeError(f"ingest.{field} {path!r}: expected a path inside the DVC repository {repo!r}")
    final = cache_dir / "dvc" / commit / rel
    if final.exists():
        return final
    fs = DVCFileSystem(repo, rev=commit)
    try:
        if not fs.exists(rel.as_posix()):
            raise CnnpipeError(f"ingest.{field} {path!r}: not in {repo!r} at {commit[:12]}")
        if fs.isdir(rel.as_posix()):
            with atomic_dir(final) as tmp:
                fs.get(f"{rel.as_posix()}/", f"{tmp}/", recursive=True)  # trailing slashes: the folder's contents
        else:
            with atomic_file(final) as tmp:
                fs.get_file(rel.as_posix(), str(tmp))
    except (OSError, DvcException, DataIndexError) as e:  # a remote without the files, an unreachable remote
        raise CnnpipeError(f"ingest.{field} {path!r}: cannot fetch from {repo!r} at {commit[:12]}: {e}") from None
    finally:
        fs.close()
    return final
