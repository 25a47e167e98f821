"""Any class-per-folder image set: root/<class>/*.{png,jpg,jpeg,ppm,bmp,webp}, optionally a test root.

Class names are the training root's folder names, sorted. The root may be a folder or a zip/tar of it
(a single top folder inside the archive is looked through).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import PurePosixPath

from cnnpipe.config import IngestConfig
from cnnpipe.data.archive import FileTree
from cnnpipe.imaging import IMAGE_SUFFIXES
from cnnpipe.data.raw import RawDataset
from cnnpipe.data.raw import Entry
from cnnpipe.data.sources.common import (
    input_record,
    open_tree,
    pending,
    resolve,
)
from cnnpipe.errors import CnnpipeError


def _by_class(tree: FileTree) -> tuple[dict[str, list[str]], set[str]]:
    """Image files per class folder, and every class folder (including empty ones)."""
    names = tree.names()
    dirs = [PurePosixPath(n).parts for n in names]
    # an archive of `root/` holds `root/<class>/<file>`: look through one common top folder
    top = dirs[0][0] if dirs and all(len(d) >= 3 and d[0] == dirs[0][0] for d in dirs) else None
    files: dict[str, list[str]] = defaultdict(list)
    folders: set[str] = set()
    for n, parts in zip(names, dirs):
        rel = parts[1:] if top else parts
        if len(rel) < 2:
            continue  # a file beside the class folders (a README, a CSV)
        folders.add(rel[0])
        if n.lower().endswith(IMAGE_SUFFIXES):
            files[rel[0]].append(n)
    if tree.path.is_dir():  # a folder tree also shows class folders with no files at all
        base = tree.path / top if top else tree.path
        folders |= {p.name for p in base.iterdir() if p.is_dir()}
    return files, folders


def load(cfg: IngestConfig) -> RawDataset:
    path = resolve(cfg.path, cfg, "path")
    tree = open_tree(path, cfg)
    files, folders = _by_class(tree)
    bad: list[dict] = []
    for empty in sorted(folders - set(files)):
        bad.append({"path": f"{path}/{empty}", "error": "empty class folder (no image files): not a class"})
    classes = sorted(files)
    if not classes:
        raise CnnpipeError(f"ingest.path '{path}': no class folders with images ({', '.join(IMAGE_SUFFIXES)})")
    index = {c: i for i, c in enumerate(classes)}
    entries = [Entry(n, index[c]) for c in classes for n in sorted(files[c])]
    pool = pending(tree, entries, cfg)
    count = len(entries) + len(folders - set(files))
    inputs = [input_record(path)]

    test = None
    test_path = resolve(cfg.test_path, cfg, "test_path", required=False)
    if test_path is not None:
        test_tree = open_tree(test_path, cfg)
        test_files, test_folders = _by_class(test_tree)
        test_entries = []
        for c in sorted(test_files):
            if c not in index:
                bad += [{"path": f"{test_path}:{n}", "error": f"class folder {c!r} is not a training class"}
                        for n in test_files[c]]
            else:
                test_entries += [Entry(n, index[c]) for n in sorted(test_files[c])]
        count += sum(len(v) for v in test_files.values())
        test = pending(test_tree, test_entries, cfg)
        inputs.append(input_record(test_path))
    return RawDataset(classes=classes, pool=pool, test=test, inputs=inputs, files=count, bad_files=bad)
