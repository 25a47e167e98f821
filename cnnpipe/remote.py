"""Datasets and model folders on object storage or the web: s3://, gs://, http(s):// next to local paths.

A location is a `Path` (local) or a URL string. Datasets: only whole small files are read (manifests, arrays
of the validation split, one shard at a time); nothing is listed, so a plain http(s) server works too.
Model folders: a worker of a Kubeflow training job writes the model on its own disk and uploads it; the
pipeline step that started the job (another pod) downloads it (upload_dir / download_dir).

s3:// goes through boto3 (the `sagemaker`/`stream` extras), which takes credentials and the endpoint
(AWS_ENDPOINT_URL) from its standard chain. s3fs is not used: every s3fs release pins aiobotocore, which
pins a botocore older than the boto3 the project already requires. Other schemes (gs://, http(s)://, ...)
go through fsspec and its plugins (gcsfs for gs://).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from cnnpipe.errors import CnnpipeError
from cnnpipe.fsio import atomic_dir

Location = Path | str
REMOTE_SCHEMES = ("s3", "gs", "gcs", "http", "https")


def is_remote(location: Location) -> bool:
    return isinstance(location, str) and urlparse(location).scheme in REMOTE_SCHEMES


def location_arg(value: str) -> Location:
    """argparse type of a dataset flag: a URL stays a string (Path would fold `s3://` into `s3:/`)."""
    return value.rstrip("/") if is_remote(value) else Path(value)


def join(location: Location, *names: str) -> Location:
    if is_remote(location):
        return "/".join([str(location).rstrip("/"), *names])
    return Path(location).joinpath(*names)


def read_bytes(location: Location) -> bytes:
    """The whole file at `location`; a missing or unreachable file is one line naming it."""
    if not is_remote(location):
        try:
            return Path(location).read_bytes()
        except FileNotFoundError:
            raise CnnpipeError(f"'{location}': not found") from None
        except OSError as e:
            raise CnnpipeError(f"'{location}': cannot be read: {e.strerror or e}") from None
    url = str(location)
    if urlparse(url).scheme == "s3":
        return _read_s3(url)
    try:
        import fsspec

        with fsspec.open(url, "rb") as f:
            return f.read()
    except ImportError as e:  # fsspec's message names the plugin to install (gcsfs for gs://)
        raise CnnpipeError(f"'{url}': {e}") from None
    except FileNotFoundError:
        raise CnnpipeError(f"'{url}': not found") from None
    except Exception as e:  # noqa: BLE001 - every transport error is one line naming the URL
        raise CnnpipeError(f"'{url}': cannot be read: {type(e).__name__}: {e}") from None


def _read_s3(url: str) -> bytes:
    try:
        import boto3
        import botocore.exceptions
    except ImportError:
        raise CnnpipeError(f"'{url}': reading s3:// needs boto3 (pip install 'cnnpipe[stream]')") from None
    parts = urlparse(url)
    try:
        obj = boto3.client("s3").get_object(Bucket=parts.netloc, Key=parts.path.lstrip("/"))
        return obj["Body"].read()
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


def download_dir(url: str, local: Path) -> None:
    """Copy every object under `url` into the folder `local`, which appears only once all of them are there."""
    if urlparse(url).scheme == "s3":
        parts, client = urlparse(url), _s3_client()
        prefix = parts.path.strip("/") + "/"
        keys = [obj["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=parts.netloc,
                                                                                          Prefix=prefix)
                for obj in page.get("Contents", [])]
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
    with atomic_dir(local) as tmp:
        for name, relative in names.items():
            target = tmp / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            fetch(name, target)
