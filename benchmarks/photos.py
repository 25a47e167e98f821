"""Benchmark: your own photos, from scratch vs the offline pretrained photo recipe (configs/photos.yaml).

Takes photo folders (a root of class folders, e.g. a cats-vs-dogs sample: cats/*.jpg, dogs/*.jpg; never
committed) and runs the real CLI on each: `cnnpipe ingest` (the recipe's carve: 70/15/15 % train/val/test
per class), `augment`, `train --no-tracking`, `evaluate --no-tracking`, once per recipe:

- `pretrained-224`: configs/photos.yaml as shipped (EfficientNet-Lite0, ImageNet weights from the package, 224 px);
- `scratch`: cnnpipe's fastnet at 128 px from random weights, 12 epochs (what worked offline before the recipe);
- `pretrained-160`: the recipe at 160 px (the size measurement).

Records test accuracy (with and without TTA), ECE, the training time (the train stage's wall time, startup
and every epoch's validation included, the epochs' own seconds, and its CPU seconds: on a machine shared with
other jobs, CPU seconds / 2 is what two free cores would take), the kept epoch and the machine. Evaluate skips
t-SNE (not timed, only slow).

    flock /tmp/cnnpipe-bench.lock nice -n 5 .venv/bin/python -m benchmarks.photos /tmp/photos/cats-vs-dogs [...] \
        [--recipes pretrained-224,scratch,pretrained-160] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import load_average, record
from cnnpipe.engine.model_folder import read_history, read_train_config

ROOT = Path(__file__).resolve().parents[1]

PARAMS = ROOT / "configs/photos.yaml"
# per recipe: -S overrides of configs/photos.yaml
RECIPES = {
    "pretrained-224": ["ingest.image_size=224"],  # configs/photos.yaml as shipped
    "scratch": ["ingest.image_size=128", "train.arch=fastnet", "train.pretrained=null", "train.width=32",
                "train.freeze_epochs=0", "train.backbone_lr=1.0", "train.epochs=12", "train.batch_size=64",
                "train.optimizer=sgd", "train.lr=0.2", "train.weight_decay=0.0005", "train.precision=bf16"],
    "pretrained-160": ["ingest.image_size=160"],
}


def stage(args: list[str]) -> tuple[float, float]:
    """Run `cnnpipe <args>` in a child; (wall seconds, CPU seconds of that child: user + system). On a machine
    shared with other jobs the wall time stretches; CPU seconds / 2 is what 2 free cores would take."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([str(Path(sys.executable).parent / "cnnpipe"), *args], stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"cnnpipe {args[0]} failed:\n{proc.stderr[-3000:]}")
    sys.stderr.write(proc.stderr)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def run_recipe(photos: Path, recipe: str, work: Path) -> dict:
    sets = [a for s in RECIPES[recipe] for a in ("-S", s)]
    p = ["--params", str(PARAMS), *sets]
    d = work / recipe
    stage(["ingest", *p, "--source", "imagefolder", "--path", str(photos), "--out", f"{d}/processed",
           "--report", f"{d}/ingest_report.json"])
    stage(["augment", *p, "--data", f"{d}/processed", "--out", f"{d}/augmented"])
    train_wall, train_cpu = stage(["train", *p, "--no-tracking", "--data", f"{d}/processed", "--augmented",
                                   f"{d}/augmented", "--out", f"{d}/model"])
    stage(["evaluate", *p, "-S", "evaluate.tsne_samples=0", "--no-tracking", "--model", f"{d}/model", "--data", f"{d}/processed",
           "--out", f"{d}/evaluation"])
    metrics = json.loads((d / "evaluation/metrics.json").read_text())
    counts = json.loads((d / "processed/manifest.json").read_text())["counts"]
    history = read_history(d / "model")
    config = read_train_config(d / "model")
    test = metrics["test"]
    return {
        "recipe": recipe, "overrides": RECIPES[recipe], "images": {k: v["total"] for k, v in counts.items()},
        "test_accuracy": test["accuracy"], "test_accuracy_tta": test.get("accuracy_tta"),
        "test_ece": test["ece"], "val_accuracy": metrics["val"]["accuracy"],
        "train_wall_s": round(train_wall, 1), "train_cpu_s": round(train_cpu, 1),
        "train_free_2_cores_s": round(train_cpu / 2, 1),
        "epochs_s": round(sum(float(h["train/epoch_seconds"]) for h in history), 1),
        "epochs": len(history), "kept_epoch": config["kept_epoch"],
        "val_accuracy_per_epoch": [round(float(h["val/accuracy"]), 4) for h in history],
    }


def write_table(result: dict, path: Path) -> None:
    lines = ["| photo set | recipe | train / val / test images | test accuracy | with TTA | training: CPU s / 2 | "
             "training: wall (busy machine) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        i = r["images"]
        tta = f"{r['test_accuracy_tta']:.2%}" if r["test_accuracy_tta"] is not None else "-"
        lines.append(f"| {r['dataset']} | {r['recipe']} | {i['train']} / {i['val']} / {i['test']} | "
                     f"{r['test_accuracy']:.2%} | {tta} | {r['train_free_2_cores_s']:.0f} s | {r['train_wall_s']:.0f} s |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("photos", type=Path, nargs="+", help="photo folders: each a root of class folders")
    parser.add_argument("--recipes", default="pretrained-224,scratch,pretrained-160")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cnnpipe-photos-benchmark"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/photos.json")
    args = parser.parse_args()
    recipes = args.recipes.split(",")
    unknown = set(recipes) - set(RECIPES)
    if unknown:
        sys.exit(f"--recipes: unknown {sorted(unknown)} (expected some of {', '.join(RECIPES)})")
    load_before = load_average()
    rows = []
    for photos in args.photos:
        for recipe in recipes:
            work = args.work / photos.name
            shutil.rmtree(work / recipe, ignore_errors=True)
            rows.append({"dataset": photos.name, **run_recipe(photos, recipe, work)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            write(args, rows, load_before)  # after every row: a long run stopped midway keeps what it measured


def write(args: argparse.Namespace, rows: list[dict], load_before: list[float]) -> None:
    result = {
        "benchmark": "photo folders: from scratch vs the offline pretrained recipe (configs/photos.yaml), real CLI, CPU",
        "rows": rows,
        "threads": "train.threads 0: the cores available (2)",
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "note": "shared 2-core machine: other jobs ran meanwhile (see the load averages); times are upper bounds",
    }
    record(args.out, result)
    write_table(result, args.out.with_suffix(".md"))


if __name__ == "__main__":
    main()
