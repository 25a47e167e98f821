"""A folder of photos in either layout users bring, a folder or a zip/tar of it (one top folder inside an
archive is looked through):

- split folders: root/{train,val|valid|validation,test}/<class>/<image> (torchvision ImageFolder tutorials,
  Keras image_dataset_from_directory, Ultralytics classify): val and test are used as they come, a missing
  one is carved out of train;
- class folders: root/<class>/<image>, optionally an official test root (ingest.test_path).

Class names are the folder names, sorted (from train/ in the split layout). Anything else is refused with
the layout expected: class folders named like splits (train/ holding images), split and class folders
mixed, a flat folder of images. Files that are not images of a format serving accepts are skipped,
counted and listed in the ingest report.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from cnnpipe.config import IngestConfig
from cnnpipe.data.archive import FileTree
from cnnpipe.data.raw import Entries, Entry, RawDataset
from cnnpipe.data.sources.common import input_record, open_tree, pending, resolve
from cnnpipe.imaging import IMAGE_SUFFIXES
from cnnpipe.errors import CnnpipeError

# folder name -> the split it holds
SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
EXPECTED = "expected class folders (<class>/<image>) or split folders holding class folders (train/<class>/<image>)"


@dataclass
class Layout:
    """A tree's images by split and class folder, before any decoding."""

    kind: str  # "splits" or "classes"
    files: dict[str, dict[str, list[str]]]  # split -> class folder -> image names in the tree
    empty: list[str] = field(default_factory=list)  # class folders without images: "split/class" or "class"
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"} of the files that are not read

    @property
    def description(self) -> str:
        if self.kind == "classes":
            return "class folders"
        return f"split folders ({', '.join(f'{s}/' for s in self.files)})"


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def hidden(parts: tuple[str, ...]) -> bool:
    """A hidden file or folder, or a zip's macOS metadata (__MACOSX/._photo.jpg is no photo)."""
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _relative(tree: FileTree) -> tuple[list[tuple[str, tuple[str, ...]]], list[tuple[str, ...]], list[str]]:
    """(name, parts below the root) of every file, every folder below the root (parts) — an archive's single
    top folder looked through — and the hidden files, left out."""
    every = tree.names()
    names = [n for n in every if not hidden(PurePosixPath(n).parts)]
    parts = [PurePosixPath(n).parts for n in names]
    top = parts[0][0] if tree.path.is_file() and parts and all(len(p) >= 2 and p[0] == parts[0][0] for p in parts) \
        else None
    rel = [(n, p[1:] if top else p) for n, p in zip(names, parts)]
    if tree.path.is_dir():  # a folder also shows folders holding no file at all
        folders = [f for p in tree.path.rglob("*") if p.is_dir() and not hidden(f := p.relative_to(tree.path).parts)]
    else:
        folders = sorted({r[:i] for _, r in rel for i in range(1, len(r))})
    return rel, folders, sorted(set(every) - set(names))


def read_layout(tree: FileTree, where: str) -> Layout:
    """The layout of `tree`, or a one-line CnnpipeError naming `where` and the layout expected."""
    rel, folders, hidden_files = _relative(tree)
    skipped = [{"path": f"{where}:{n}", "reason": f"not an image file ({', '.join(IMAGE_SUFFIXES)})"}
               for n, r in rel if not is_image(n)]
    skipped += [{"path": f"{where}:{n}", "reason": "a hidden file or macOS metadata"} for n in hidden_files]
    images = [(n, r) for n, r in rel if is_image(n)]
    top_folders = sorted({f[0] for f in folders if len(f) == 1})
    splits = [f for f in top_folders if f.lower() in SPLIT_FOLDERS]
    if not images:
        raise CnnpipeError(f"ingest.path '{where}': no images ({', '.join(IMAGE_SUFFIXES)}); {EXPECTED}")
    if all(len(r) == 1 for _, r in images):
        raise CnnpipeError(f"ingest.path '{where}': a flat folder of images, no class folders; {EXPECTED}")
    if not splits:
        return _classes_layout(images, folders, where, skipped)
    others = [f for f in top_folders if f not in splits and any(r[0] == f for _, r in images)]
    if others:
        raise CnnpipeError(f"ingest.path '{where}': split folders ({', '.join(splits)}) beside other folders "
                           f"({', '.join(others[:3])}); {EXPECTED}")
    flat = [s for s in splits if any(len(r) == 2 and r[0] == s for _, r in images)]
    if flat:
        raise CnnpipeError(f"ingest.path '{where}': {flat[0]}/ holds images directly (class folders may not be "
                           f"named like splits: {', '.join(SPLIT_FOLDERS)}); {EXPECTED}")
    by_split: dict[str, list[str]] = defaultdict(list)
    for s in splits:
        by_split[SPLIT_FOLDERS[s.lower()]].append(s)
    twice = [f"{', '.join(v)}" for v in by_split.values() if len(v) > 1]
    if twice:
        raise CnnpipeError(f"ingest.path '{where}': {twice[0]} are the same split; expected one of each "
                           "(train/, val|valid|validation/, test/)")
    if "train" not in by_split:
        raise CnnpipeError(f"ingest.path '{where}': split folders ({', '.join(splits)}) but no train/; {EXPECTED}")
    folder_of = {v[0]: k for k, v in by_split.items()}
    files: dict[str, dict[str, list[str]]] = {s: defaultdict(list) for s in ("train", "val", "test") if s in by_split}
    for n, r in images:
        if len(r) >= 3:
            files[folder_of[r[0]]][r[1]].append(n)
        else:
            skipped.append({"path": f"{where}:{n}", "reason": "an image outside any split folder"})
    empty = sorted(f"{f[0]}/{f[1]}" for f in folders if len(f) == 2 and f[0] in folder_of
                   and f[1] not in files[folder_of[f[0]]])
    return Layout("splits", {s: dict(c) for s, c in files.items()}, empty, skipped)


def _classes_layout(images: list[tuple[str, tuple[str, ...]]], folders: list[tuple[str, ...]], where: str,
                    skipped: list[dict]) -> Layout:
    files: dict[str, list[str]] = defaultdict(list)
    for n, r in images:
        if len(r) >= 2:
            files[r[0]].append(n)
        else:
            skipped.append({"path": f"{where}:{n}", "reason": "an image outside any class folder"})
    empty = sorted(f[0] for f in folders if len(f) == 1 and f[0] not in files)
    return Layout("classes", {"train": dict(files)}, empty, skipped)


def _entries(split: dict[str, list[str]], index: dict[str, int], where: str, folder: str,
             bad: list[dict]) -> list[Entry]:
    """The images of one split's class folders, those of a class train/ lacks listed as bad."""
    entries = []
    for c in sorted(split):
        if c in index:
            entries += [Entry(n, index[c]) for n in sorted(split[c])]
        else:
            bad += [{"path": f"{where}:{n}", "error": f"class folder {folder}{c!r} is not a training class"}
                    for n in split[c]]
    return entries


def load(cfg: IngestConfig) -> RawDataset:
    path = resolve(cfg.path, cfg, "path")
    tree = open_tree(path, cfg)
    layout = read_layout(tree, str(path))
    bad = [{"path": f"{path}/{e}", "error": "empty class folder (no image files): not a class"} for e in layout.empty]
    classes = sorted(layout.files["train"])
    if not classes:
        raise CnnpipeError(f"ingest.path '{path}': no class folders with images ({', '.join(IMAGE_SUFFIXES)})")
    index = {c: i for i, c in enumerate(classes)}
    pool = pending(tree, [Entry(n, index[c]) for c in classes for n in sorted(layout.files["train"][c])], cfg)
    official: dict[str, Entries] = {}
    warnings = []
    for split in ("val", "test"):
        if split not in layout.files:
            continue
        official[split] = pending(tree, _entries(layout.files[split], index, str(path), f"{split}/", bad), cfg)
        missing = [c for c in classes if c not in layout.files[split]]
        if missing:
            warnings.append(f"class{'es' if len(missing) > 1 else ''} {', '.join(missing)} missing from {split}/: "
                            f"its {split} metrics cannot score {'them' if len(missing) > 1 else 'it'}")
        extra = sorted(set(layout.files[split]) - set(classes))
        if extra:
            warnings.append(f"{split}/ class folder{'s' if len(extra) > 1 else ''} {', '.join(extra)} not in train/: "
                            "skipped (listed as bad files)")
    count = sum(len(v) for s in layout.files.values() for v in s.values()) + len(layout.empty)
    inputs = [input_record(path)]

    test_path = resolve(cfg.test_path, cfg, "test_path", required=False)
    if test_path is not None:
        if "test" in official:
            raise CnnpipeError(f"ingest.test_path '{test_path}': ingest.path '{path}' has its own test/ folder; "
                               "expected one of the two")
        test_tree = open_tree(test_path, cfg)
        test_layout = read_layout(test_tree, str(test_path))
        if test_layout.kind != "classes":
            raise CnnpipeError(f"ingest.test_path '{test_path}': split folders; expected class folders (<class>/<image>)")
        official["test"] = pending(test_tree, _entries(test_layout.files["train"], index, str(test_path), "", bad), cfg)
        count += sum(len(v) for v in test_layout.files["train"].values())
        layout.skipped += test_layout.skipped
        inputs.append(input_record(test_path))
    return RawDataset(classes=classes, pool=pool, val=official.get("val"), test=official.get("test"), inputs=inputs,
                      files=count, bad_files=bad, skipped_files=layout.skipped, warnings=warnings,
                      layout=layout.description)
