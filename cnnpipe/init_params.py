"""`cnnpipe init PATH`: a complete, commented params.yaml for the dataset at PATH, so that `dvc repro` trains,
evaluates, registers and promotes its model under its own name.

The source is detected as `ingest.source: auto` does; an image folder's layout is checked now (a refused
layout fails here, not at ingest); a sample of its images decides photos (the photo recipe: an ImageNet
backbone at 224 px, from configs/photos.yaml when the project has it) or small images (trained from scratch
at about their own size). Every other knob keeps its default, each with its help text as a comment.
"""

from __future__ import annotations

import dataclasses
import re
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import yaml
from PIL import Image, UnidentifiedImageError

from cnnpipe.config import BLOCKS, IngestConfig, apply_overrides, load_block, read_params
from cnnpipe.data.archive import FileTree
from cnnpipe.data.sources import detect
from cnnpipe.data.sources.common import open_tree
from cnnpipe.data.sources.imagefolder import read_layout
from cnnpipe.errors import CnnpipeError
from cnnpipe.fsio import atomic_file

PHOTO_RECIPE_FILE = Path("configs/photos.yaml")  # relative to the project (the params file's folder)
# the photo settings when the project has no configs/photos.yaml: an ImageNet backbone at its own input size
PHOTO_SETTINGS = {"ingest.image_size": 224, "ingest.channels": 3, "ingest.resize": "center_crop",
                  "train.arch": "timm/efficientnet_lite0", "train.pretrained": "imagenet"}
MIN_PHOTO_SIDE = 64  # images whose median shorter side is at least this are photos: worth an ImageNet backbone
SAMPLE = 64  # images whose headers are read to decide
# sources with one known format: (image_size, channels)
KNOWN_SIZES = {"gtsrb": (32, 3), "cifar10": (32, 3), "pickle": (32, 3)}


@dataclasses.dataclass
class Survey:
    """What init learned about a dataset."""

    source: str
    why: str
    layout: str | None = None
    images: int = 0
    classes: int = 0
    median_size: tuple[int, int] | None = None  # width, height of the sampled images
    gray: bool = False  # every sampled image is grayscale

    @property
    def photos(self) -> bool:
        return self.source == "imagefolder" and self.median_size is not None and min(self.median_size) >= MIN_PHOTO_SIDE


def model_name_for(path: Path) -> str:
    """A registry and experiment name from the dataset's folder or archive name: lower case, dashes."""
    stem = path.resolve().name
    stem = re.sub(r"(\.tar)?\.(zip|tar|tgz|gz)$", "", stem, flags=re.IGNORECASE)
    slug = re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-")
    return slug or "photos"


def _sample_sizes(tree: FileTree, names: list[str]) -> tuple[list[tuple[int, int]], list[str]]:
    """Sizes and modes of up to SAMPLE images spread over `names` (headers only)."""
    import io

    step = max(1, len(names) // SAMPLE)
    sizes, modes = [], []
    for name in names[::step][:SAMPLE]:
        try:
            with Image.open(io.BytesIO(tree.read(name))) as img:
                sizes.append(img.size)
                modes.append(img.mode)
        except (UnidentifiedImageError, OSError, CnnpipeError):
            continue  # ingest lists it as a bad file
    return sizes, modes


def survey(path: Path) -> Survey:
    if not path.exists():
        raise CnnpipeError(f"'{path}' not found (expected a folder of photos or a dataset archive)")
    source, why = detect(path)
    found = Survey(source, why)
    if source != "imagefolder":
        return found
    tree = open_tree(path, IngestConfig())
    layout = read_layout(tree, str(path))
    names = sorted(n for split in layout.files.values() for files in split.values() for n in files)
    sizes, modes = _sample_sizes(tree, names)
    tree.close()
    found.layout, found.images, found.classes = layout.description, len(names), len(layout.files["train"])
    if sizes:
        found.median_size = (int(statistics.median(w for w, _ in sizes)), int(statistics.median(h for _, h in sizes)))
        found.gray = all(m in ("1", "L", "LA", "I", "I;16") for m in modes)
    return found


def value_comments(text: str) -> dict[str, str]:
    """{block.key: the comment beside its value} of a params file's text (a recipe's reasons)."""
    comments, block, key = {}, None, None
    for line in text.splitlines():
        if m := re.match(r"^(\w+):", line):
            block, key = m.group(1), None
        elif block and (m := re.match(r"^  (\w+):[^#]*#\s?(.*)$", line)):
            key = f"{block}.{m.group(1)}"
            comments[key] = m.group(2).strip()
        elif key and (m := re.match(r"^ {4,}#\s?(.*)$", line)):  # the comment goes on under the value
            comments[key] += f" {m.group(1).strip()}"
        else:
            key = None
    return comments


def settings(found: Survey, path: Path, project: Path) -> tuple[dict[str, Any], dict[str, str], str | None]:
    """(the params, {block.key: the comment beside it} with the reasons of the values init chose, the recipe
    file used)."""
    recipe = project / PHOTO_RECIPE_FILE
    base = read_params(recipe) if found.photos and recipe.is_file() else {}
    recipe_comments = value_comments(recipe.read_text()) if base else {}
    params = {block: {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)} | base.get(block, {})
              for block, cls in BLOCKS.items()}
    name = model_name_for(path)
    where = path.resolve()
    # relative to the project when inside it (a clone elsewhere finds it), else absolute (dvc runs from the project)
    spec = where.relative_to(project).as_posix() if where.is_relative_to(project) else str(where)
    chosen = {"ingest.source": found.source, "ingest.path": spec, "ingest.test_path": None,
              "ingest.test_labels": None, "register.model_name": name, "tracking.experiment": name}
    why = {"ingest.source": found.why, "ingest.path": "the dataset init was given",
           "register.model_name": "from the dataset's name: its own registered model",
           "tracking.experiment": "from the dataset's name"}
    why = {key: f"init: {reason}" for key, reason in why.items()}
    if found.photos:
        if not base:
            chosen |= PHOTO_SETTINGS
        size = f"{found.median_size[0]}x{found.median_size[1]}"
        why |= {"ingest.image_size": f"init: photos (median {size}): the photo recipe"
                + (f" ({PHOTO_RECIPE_FILE})" if base else ""),
                "train.arch": "init: photos: an ImageNet backbone, fine-tuned"}
    elif found.source in KNOWN_SIZES:
        chosen["ingest.image_size"], chosen["ingest.channels"] = KNOWN_SIZES[found.source]
        why["ingest.image_size"] = f"init: {found.source}'s own size"
    elif found.median_size is not None:  # small images: trained from scratch at about their size
        side = min(64, max(16, round(min(found.median_size) / 8) * 8))
        chosen |= {"ingest.image_size": side, "ingest.channels": 1 if found.gray else 3, "ingest.resize": "squash"}
        why["ingest.image_size"] = (f"init: small {'grayscale ' if found.gray else ''}images (median "
                                    f"{found.median_size[0]}x{found.median_size[1]}): from scratch at about their size")
    return apply_overrides(params, chosen), recipe_comments | why, str(PHOTO_RECIPE_FILE) if base else None


def render(params: dict[str, Any], comments: dict[str, str], header: list[str]) -> str:
    """params.yaml text: every field of every block, its help text as a comment above it, `comments` (init's
    reasons, the recipe's) beside the values."""
    def scalar(value: Any) -> str:
        return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("\n...").strip()

    lines = ["# yaml-language-server: $schema=params.schema.json", *(f"# {h}" for h in header)]  # editors check it
    for block, cls in BLOCKS.items():
        lines.append(f"\n{block}:")
        for f in dataclasses.fields(cls):
            lines += textwrap.wrap(f.metadata["help"], 116, initial_indent="  # ", subsequent_indent="  # ")
            comment = comments.get(f"{block}.{f.name}")
            lines.append(f"  {f.name}: {scalar(params[block][f.name])}" + (f"  # {comment}" if comment else ""))
    return "\n".join(lines) + "\n"


def _committed_and_unchanged(path: Path) -> bool:
    """Whether git holds `path` exactly as it is (overwriting it loses nothing: `git checkout` restores it)."""
    def git(*args: str) -> int:
        try:
            return subprocess.run(["git", *args], cwd=path.parent, capture_output=True, timeout=30).returncode
        except (OSError, subprocess.TimeoutExpired):
            return 1

    return git("ls-files", "--error-unmatch", path.name) == 0 and git("diff", "--quiet", "HEAD", "--", path.name) == 0


def run(*, path: Path, params_file: Path, force: bool, overrides: dict[str, Any]) -> dict:
    """Write `params_file` for the dataset at `path` (`overrides`: block.key values on top); refuse to replace
    a params file with changes git does not hold unless `force`."""
    if params_file.exists() and not force and not _committed_and_unchanged(params_file):
        raise CnnpipeError(f"'{params_file}' exists with changes git does not hold; expected --force to "
                           "overwrite it")
    found = survey(path)
    params, why, recipe = settings(found, path, params_file.resolve().parent)
    params = apply_overrides(params, overrides)
    why |= {key: "init: set with -S" for key in overrides}
    for block, cls in BLOCKS.items():  # what is written must load: an override is checked as params.yaml's values
        load_block(cls, block, params, {}, params_file)
    kind = "photos" if found.photos else found.source
    header = [f"params.yaml for '{path}' ({kind}), written by `cnnpipe init`; next: dvc repro",
              f"source: {found.source}: {found.why}" + (f"; {found.layout}" if found.layout else "")
              + (f"; {found.images} images in {found.classes} classes" if found.images else ""),
              "Every knob of the pipeline, one block per stage (`cnnpipe <stage> --help` explains each field; a flag of",
              "the same name overrides it for one run, `dvc exp run -S train.epochs=5` for an experiment)."]
    with atomic_file(params_file) as tmp:
        tmp.write_text(render(params, why, header))
    print(f"wrote {params_file} for {kind} at '{path}' (model {params['register']['model_name']!r}); next: dvc repro",
          file=sys.stderr)
    return {"params": str(params_file), "source": found.source, "detected_from": found.why, "layout": found.layout,
            "images": found.images, "classes": found.classes, "photos": found.photos, "recipe": recipe,
            "image_size": params["ingest"]["image_size"], "arch": params["train"]["arch"],
            "model_name": params["register"]["model_name"], "next": "dvc repro"}
