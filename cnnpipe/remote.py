"""Datasets and model folders on object storage or the web: s3://, gs://, http(s):// next to local paths.

A location is a `Path` (local) or a URL string. Datasets: only whole small files are read (manifests, arrays
of the validation split, one shard at a time); nothing is listed, so a plain http(s) server works too.
Model folders: a worker of a Kubeflow training job writes the model on its own disk and uploads it; the
pipeline step that started the job (another pod) downloads it (upload_dir / download_dir).

s3:// goes through boto3 (the `sagemaker`/`stream` extras), which takes credentials and the endpoint
(AWS_ENDPOINT_URL) from its standard chain. s3fs is not used: every s3fs release pins aiobotocore, which
pins a botocore older than the boto3 the project already requires. http(s):// goes through urllib (whose
reads a deadline can bound); other schemes (gs://, ...) through fsspec and its plugins (gcsfs for gs://).

Every read is bounded: the caller gives the most bytes the file may hold (from the manifest, or a budget),
a size a server declares beyond it is refused before reading, and the read stops one chunk past it; a
read has a total deadline (DEADLINE_FLOOR_S plus the time the budget takes at MIN_RATE), so a server
trickling bytes cannot hold it forever. download_dir writes only inside its folder: a key whose path would
leave it (`..`, absolute) refuses the download.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from cnnpipe.errors import CnnpipeError
from cnnpipe.fsio import atomic_dir

Location = Path | str
REMOTE_SCHEMES = ("s3", "gs", "gcs", "http", "https")
CHUNK = 1 << 20
DEADLINE_FLOOR_S = 60.0  # every remote read may take this long, plus its budget at MIN_RATE
MIN_RATE = 1 << 20  # bytes/s: a read slower than this on average past the floor is abandoned
SOCKET_TIMEOUT_S = 30.0  # one silent socket read


class OverBudget(CnnpipeError):
    """A remote file larger than its caller's budget (declared, or read)."""


class PastDeadline(CnnpipeError):
    """A remote read not finished within its deadline."""


def deadline_for(max_bytes: int) -> float:
    """Seconds a read of at most `max_bytes` may take, in all."""
    return DEADLINE_FLOOR_S + max_bytes / MIN_RATE


def bounded_chunks(read: Callable[[int], bytes], where: str, max_bytes: int, deadline_s: float) -> Iterator[bytes]:
    """The chunks `read(n)` returns until it returns nothing; CnnpipeError past `max_bytes` or `deadline_s`.
    `read` must return what it has (one socket read), not wait for n bytes."""
    start, got = time.monotonic(), 0
    while chunk := read(CHUNK):
        got += len(chunk)
        if got > max_bytes:
            raise OverBudget(f"'{where}': more than the {max_bytes:,} bytes expected; not read further")
        if time.monotonic() - start > deadline_s:
            raise PastDeadline(f"'{where}': not read within {deadline_s:.0f} s ({got:,} bytes so far); abandoned")
        yield chunk


def is_remote(location: Location) -> bool:
    return isinstance(location, str) and urlparse(location).scheme in REMOTE_SCHEMES


def location_arg(value: str) -> Location:
    """argparse type of a dataset flag: a URL stays a string (Path would fold `s3://` into `s3:/`)."""
    return value.rstrip("/") if is_remote(value) else Path(value)


def join(location: Location, *names: str) -> Location:
    if is_remote(location):
        return "/".join([str(location).rstrip("/"), *names])
    return Path(location).joinpath(*names)


def read_bytes(location: Location, *, max_bytes: int, deadline_s: float | None = None) -> bytes:
    """The whole file at `location`, which may hold at most `max_bytes` and must arrive within `deadline_s`
    (default: deadline_for(max_bytes)); a missing, unreachable, oversized or endless file is one line naming it."""
    deadline_s = deadline_for(max_bytes) if deadline_s is None else deadline_s
    if not is_remote(location):
        try:
            with open(location, "rb") as f:
                return b"".join(bounded_chunks(f.read, str(location), max_bytes, deadline_s))
        except FileNotFoundError:
            raise CnnpipeError(f"'{location}': not found") from None
        except OSError as e:
            raise CnnpipeError(f"'{location}': cannot be read: {e.strerror or e}") from None
    url = str(location)
    scheme = urlparse(url).scheme
    if scheme == "s3":
        return _read_s3(url, max_bytes, deadline_s)
    if scheme in ("http", "https"):
        return _read_http(url, max_bytes, deadline_s)
    try:
        import fsspec

        with fsspec.open(url, "rb") as f:
            size = getattr(f, "size", None)
            if isinstance(size, int) and size > max_bytes:
                raise OverBudget(f"'{url}': {size:,} bytes, more than the {max_bytes:,} expected; not read")
            return b"".join(bounded_chunks(f.read, url, max_bytes, deadline_s))
    except ImportError as e:  # fsspec's message names the plugin to install (gcsfs for gs://)
        raise CnnpipeError(f"'{url}': {e}") from None
    except FileNotFoundError:
        raise CnnpipeError(f"'{url}': not found") from None
    except CnnpipeError:
        raise
    except Exception as e:  # noqa: BLE001 - every transport error is one line naming the URL
        raise CnnpipeError(f"'{url}': cannot be read: {type(e).__name__}: {e}") from None


def declared_size(headers, where: str, max_bytes: int) -> int | None:  # noqa: ANN001 - an HTTP message
    """The Content-Length a server declares, refused when over `max_bytes` (None: it declares none)."""
    try:
        size = int(headers.get("Content-Length", ""))
    except ValueError:
        return None
    if size > max_bytes:
        raise OverBudget(f"'{where}': the server declares {size:,} bytes, more than the {max_bytes:,} expected; "
                         f"not read")
    return size


def _read_http(url: str, max_bytes: int, deadline_s: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=min(SOCKET_TIMEOUT_S, deadline_s)) as r:
            declared_size(r.headers, url, max_bytes)
            return b"".join(bounded_chunks(r.read1, url, max_bytes, deadline_s))
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise CnnpipeError(f"'{url}': not found") from None
        raise CnnpipeError(f"'{url}': cannot be read: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise CnnpipeError(f"'{url}': cannot be read: {getattr(e, 'reason', e)}") from None


def _read_s3(url: str, max_bytes: int, deadline_s: float) -> bytes:
    try:
        import boto3
        import botocore.exceptions
    except ImportError:
        raise CnnpipeError(f"'{url}': reading s3:// needs boto3 (pip install 'cnnpipe[stream]')") from None
    parts = urlparse(url)
    try:
        obj = boto3.client("s3").get_object(Bucket=parts.netloc, Key=parts.path.lstrip("/"))
        if obj.get("ContentLength", 0) > max_bytes:
            raise OverBudget(f"'{url}': {obj['ContentLength']:,} bytes, more than the {max_bytes:,} expected; "
                             f"not read")
        return b"".join(bounded_chunks(obj["Body"].read, url, max_bytes, deadline_s))
    except botocore.exceptions.ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "NoSuchBucket", "404"):
            raise CnnpipeError(f"'{url}': not found") from None
        raise CnnpipeError(f"'{url}': cannot be read: {e}") from None
    except botocore.exceptions.BotoCoreError as e:
        raise CnnpipeError(f"'{url}': cannot be read: {e}") from None


def _s3_client():  # noqa: ANN202 - a boto3 client
    try:
        import boto3
    except ImportError:
        raise CnnpipeError("s3:// needs boto3 (pip install 'cnnpipe[stream]')") from None
    return boto3.client("s3")


def upload_dir(local: Path, url: str) -> None:
    """Copy every file under `local` to `url`, keeping relative paths (existing objects are replaced)."""
    if not local.is_dir():
        raise CnnpipeError(f"upload: '{local}' is not a folder")
    files = sorted(p for p in local.rglob("*") if p.is_file())
    if urlparse(url).scheme == "s3":
        parts, client = urlparse(url), _s3_client()
        prefix = parts.path.strip("/")
        for path in files:
            client.upload_file(str(path), parts.netloc, "/".join(filter(None, [prefix, path.relative_to(local).as_posix()])))
        return
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    # trailing slashes: the folder's content goes to `url` itself, whether or not something is there already
    fs.put(f"{local}/", f"{root.rstrip('/')}/", recursive=True)


def inside(relative: str, where: str) -> str:
    """`relative` (an object's path under a download's prefix) if it stays inside the folder it goes to."""
    p = PurePosixPath(relative.replace("\\", "/"))
    if not relative or p.is_absolute() or ".." in p.parts or (p.parts and p.parts[0].endswith(":")):
        raise CnnpipeError(f"download '{where}': object {relative!r} would be written outside the folder; "
                           f"refusing the download")
    return str(p)


def download_dir(url: str, local: Path) -> None:
    """Copy every object under `url` into the folder `local`, which appears only once all of them are there;
    an object whose relative path leaves the folder refuses the whole download."""
    if urlparse(url).scheme == "s3":
        parts, client = urlparse(url), _s3_client()
        prefix = parts.path.strip("/") + "/"
        keys = [obj["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=parts.netloc,
                                                                                          Prefix=prefix)
                for obj in page.get("Contents", []) if not obj["Key"].endswith("/")]  # "folder" markers
        fetch = (lambda key, target: client.download_file(parts.netloc, key, str(target)))
        names = {key: key[len(prefix):] for key in keys}
    else:
        import fsspec

        fs, root = fsspec.core.url_to_fs(url)
        root = root.rstrip("/")
        names = {name: name[len(root):].lstrip("/") for name in fs.find(root)}
        fetch = (lambda name, target: fs.get_file(name, str(target)))
    if not names:
        raise CnnpipeError(f"download: nothing at '{url}' (expected a folder's files)")
    names = {name: inside(relative, url) for name, relative in names.items()}  # all checked before any is written
    with atomic_dir(local) as tmp:
        for name, relative in names.items():
            target = tmp / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            fetch(name, target)
