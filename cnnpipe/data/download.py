"""Fetch a dataset archive from an http(s) URL: resumable, verified, cached."""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from tqdm import tqdm

from cnnpipe.errors import CnnpipeError
from cnnpipe.fsio import file_digest
from cnnpipe.remote import OverBudget, PastDeadline, bounded_chunks, declared_size

# The official archives' published checksums (md5 is what their publishers and torchvision give).
KNOWN_MD5 = {
    "GTSRB_Final_Training_Images.zip": "f33fd80ac59bff73c82d25ab499e03a3",
    "GTSRB_Final_Test_Images.zip": "c7e4e6327067d32654124b0fe9e82185",
    "GTSRB_Final_Test_GT.zip": "fe31e9c9270bbcd7b84b7f21a9d9d9e5",
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
}


def is_url(path: str) -> bool:
    return urlparse(path).scheme in ("http", "https")


def _verify(path: Path, name: str, url: str, sha256: str | None) -> None:
    if sha256:
        got, want, algo = file_digest(path, "sha256"), sha256.lower(), "sha256"
    else:
        got, want, algo = file_digest(path, "md5"), KNOWN_MD5[name], "md5"
    if got != want:
        raise CnnpipeError(f"download '{url}': {algo} {got} does not match the expected {want}")


def fetch(url: str, cache_dir: Path, sha256: str | None, *, max_bytes: int, deadline_s: float,
          timeout: float = 60.0) -> Path:
    """The verified local copy of `url` in `cache_dir`, downloading (or resuming) what is missing. The file may
    hold at most `max_bytes` (a larger declared size is refused before reading) and must arrive within
    `deadline_s`; the partial file is kept for the next run only when the server serves byte ranges."""
    name = Path(urlparse(url).path).name or "download"
    if not sha256 and name not in KNOWN_MD5:
        raise CnnpipeError(f"ingest.sha256: required to verify '{url}' (no published checksum is known for '{name}')")
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / name
    if final.exists():
        _verify(final, name, url, sha256)
        return final
    part = cache_dir / f"{name}.part"
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    resumable = False
    try:
        with urllib.request.urlopen(request, timeout=min(timeout, deadline_s)) as r:
            resumable = r.status == 206 or r.headers.get("Accept-Ranges", "").lower() == "bytes"
            if have and r.status != 206:  # the server ignored the range: start over
                have = 0
            total = (declared_size(r.headers, url, max_bytes - have) or 0) + have
            with open(part, "ab" if have else "wb") as f, tqdm(total=total or None, initial=have, unit="B",
                                                               unit_scale=True, desc=name, file=sys.stderr,
                                                               disable=not sys.stderr.isatty()) as bar:
                for block in bounded_chunks(r.read1, url, max_bytes - have, deadline_s):
                    f.write(block)
                    bar.update(len(block))
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the range starts at the end: the partial file is complete
            pass
        else:
            raise CnnpipeError(f"download '{url}' failed: HTTP {e.code} {e.reason}") from None
    except OverBudget as e:  # nothing worth resuming
        part.unlink(missing_ok=True)
        raise CnnpipeError(f"download {e}") from None
    except (PastDeadline, urllib.error.URLError, OSError) as e:
        why = str(e) if isinstance(e, PastDeadline) else f"'{url}' failed: {getattr(e, 'reason', e)}"
        if not resumable:  # the server serves no ranges: a next run starts over anyway
            part.unlink(missing_ok=True)
            raise CnnpipeError(f"download {why}") from None
        raise CnnpipeError(f"download {why} (partial file kept in {part}; run again to resume)") from None
    try:
        _verify(part, name, url, sha256)
    except CnnpipeError:
        part.unlink()
        raise
    os.replace(part, final)
    return final
