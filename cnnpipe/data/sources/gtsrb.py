"""GTSRB, the German Traffic Sign Recognition Benchmark, in its official layout.

Training: GTSRB_Final_Training_Images.zip (or the extracted folder) with
`GTSRB/Final_Training/Images/000NN/TTTTT_FFFFF.ppm` and a semicolon-separated `GT-000NN.csv` per class
(Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId). Test: GTSRB_Final_Test_Images.zip plus
GT-final_test.csv (or GTSRB_Final_Test_GT.zip). Each training track (TTTTT) is 30 frames of one
physical sign, so tracks are the split's groups: frames of one sign never straddle train and val.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import PurePosixPath

import numpy as np

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

CLASSES = [
    "Speed limit (20km/h)", "Speed limit (30km/h)", "Speed limit (50km/h)", "Speed limit (60km/h)",
    "Speed limit (70km/h)", "Speed limit (80km/h)", "End of speed limit (80km/h)", "Speed limit (100km/h)",
    "Speed limit (120km/h)", "No passing", "No passing for heavy vehicles", "Right-of-way at next intersection",
    "Priority road", "Yield", "Stop", "No vehicles", "Heavy vehicles prohibited", "No entry", "General caution",
    "Dangerous curve to the left", "Dangerous curve to the right", "Double curve", "Bumpy road", "Slippery road",
    "Road narrows on the right", "Road work", "Traffic signals", "Pedestrians", "Children crossing",
    "Bicycles crossing", "Beware of ice/snow", "Wild animals crossing", "End of all speed and passing limits",
    "Turn right ahead", "Turn left ahead", "Ahead only", "Go straight or right", "Go straight or left",
    "Keep right", "Keep left", "Roundabout mandatory", "End of no passing", "End of no passing by heavy vehicles",
]


def _rows(data: bytes, where: str) -> list[dict]:
    try:
        rows = list(csv.DictReader(io.StringIO(data.decode("utf-8-sig")), delimiter=";"))
    except (UnicodeDecodeError, csv.Error) as e:
        raise CnnpipeError(f"GTSRB annotations '{where}': not a semicolon-separated CSV ({e})") from None
    need = {"Filename", "ClassId"}
    if rows and not need <= set(rows[0]):
        raise CnnpipeError(f"GTSRB annotations '{where}': expected columns {sorted(need)}, got {sorted(rows[0])}")
    return rows


def _roi(row: dict) -> tuple[float, float, float, float, float, float] | None:
    """The sign's inclusive box and the size of the image the CSV describes (None when the row has no such
    columns); ValueError naming what is wrong with a row whose numbers are bad or whose box is not in the image."""
    keys = ("Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "Width", "Height")
    if any(row.get(k) is None for k in keys):
        return None
    try:
        x1, y1, x2, y2, w, h = (float(row[k]) for k in keys)
    except ValueError:
        raise ValueError(f"ROI/size not numbers: {', '.join(f'{k}={row[k]!r}' for k in keys)}") from None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2, w, h)) or w <= 0 or h <= 0:
        raise ValueError(f"bad image size {row['Width']!r} x {row['Height']!r} or a non-finite ROI")
    if not (0 <= x1 < x2 < w and 0 <= y1 < y2 < h):
        raise ValueError(f"ROI ({x1:g}, {y1:g})-({x2:g}, {y2:g}) is inverted or outside the {w:g} x {h:g} image")
    return x1, y1, x2, y2, w, h


def _entries(tree: FileTree, rows: list[dict], folder: str, cfg: IngestConfig, bad: list[dict],
             names: set[str]) -> list[tuple[Entry, str]]:
    out = []
    for row in rows:
        name = _member(folder, row["Filename"])
        try:
            label = int(row["ClassId"])
        except (TypeError, ValueError):
            label = -1
        if not 0 <= label < len(CLASSES):
            bad.append({"path": f"{tree.path}:{name}", "error": f"label {row['ClassId']!r} outside the 43 GTSRB classes"})
            continue
        if name not in names:
            bad.append({"path": f"{tree.path}:{name}", "error": "listed in the annotations but missing"})
            continue
        try:
            roi = _roi(row)  # fixed crops (roi_crop) and stored boxes both need it
        except ValueError as e:  # a bad annotation spoils its row only
            bad.append({"path": f"{tree.path}:{name}", "error": f"annotation row: {e}"})
            continue
        out.append((Entry(name, label, roi), row["Filename"]))
    return out


def _member(folder: str, filename: str) -> str:
    """The archive member a CSV row names (rows name files relative to the CSV's folder)."""
    return f"{folder}/{filename}" if folder else filename


def _test_rows(labels_path, test_names: set[str], cfg: IngestConfig) -> list[dict]:  # noqa: ANN001 - a Path
    """GT-final_test.csv's rows, from the CSV itself or from GTSRB_Final_Test_GT.zip / its folder."""
    if labels_path.is_file() and labels_path.suffix.lower() == ".csv":
        rows = _rows(labels_path.read_bytes(), str(labels_path))
    else:
        tree = open_tree(labels_path, cfg)
        gt = next(tree.find("GT-final_test.csv"), None)
        if gt is None:
            raise CnnpipeError(f"ingest.test_labels '{labels_path}': expected GT-final_test.csv inside")
        rows = _rows(tree.read(gt), f"{labels_path}:{gt}")
        tree.close()
    by_base = {PurePosixPath(n).name: n for n in test_names}  # the CSV names files without their folder
    return [{**r, "Filename": by_base.get(r["Filename"], r["Filename"])} for r in rows]


def load(cfg: IngestConfig) -> RawDataset:
    path = resolve(cfg.path, cfg, "path")
    tree = open_tree(path, cfg)
    bad: list[dict] = []
    names = set(tree.names())
    csvs = sorted(n for n in tree.find(".csv") if PurePosixPath(n).name.startswith("GT-0"))
    if not csvs:
        raise CnnpipeError(f"ingest.path '{path}': no GTSRB annotations (GTSRB/Final_Training/Images/000NN/GT-000NN.csv)")
    entries: list[Entry] = []
    groups: list[str] = []
    annotated: set[str] = set()  # every file a CSV lists, usable or not
    rows_seen = 0
    for csv_name in csvs:
        folder = str(PurePosixPath(csv_name).parent)
        rows = _rows(tree.read(csv_name), f"{path}:{csv_name}")
        rows_seen += len(rows)
        annotated.update(_member(folder, r["Filename"]) for r in rows)
        for entry, filename in _entries(tree, rows, folder, cfg, bad, names):
            entries.append(entry)
            groups.append(f"{entry.label}/{filename.split('_')[0]}")  # class + track: one physical sign
    annotated_folders = {str(PurePosixPath(c).parent) for c in csvs}
    stray = sorted(n for n in names if n.lower().endswith(IMAGE_SUFFIXES) and n not in annotated)
    for n in stray:
        why = "not listed in its folder's GT-*.csv" if str(PurePosixPath(n).parent) in annotated_folders \
            else "in a folder without a GT-*.csv"
        bad.append({"path": f"{path}:{n}", "error": f"image {why}"})
    pool = pending(tree, entries, cfg)
    inputs = [input_record(path)]
    files = rows_seen + len(stray)

    test = None
    test_path = resolve(cfg.test_path, cfg, "test_path", required=False)
    if test_path is not None:
        labels_path = resolve(cfg.test_labels, cfg, "test_labels")
        test_tree = open_tree(test_path, cfg)
        test_names = set(test_tree.names())
        rows = _test_rows(labels_path, test_names, cfg)
        test_entries = [e for e, _ in _entries(test_tree, rows, "", cfg, bad, test_names)]
        test = pending(test_tree, test_entries, cfg)
        files += len(rows)
        inputs += [input_record(test_path), input_record(labels_path)]

    if test is not None and pool.keep_boxes != test.keep_boxes:  # a split without boxes: none keeps them
        pool.keep_boxes = test.keep_boxes = False
    return RawDataset(classes=list(CLASSES), pool=pool, groups=np.asarray(groups), test=test,
                      inputs=inputs, files=files, bad_files=bad, cropped=cfg.roi_crop)
