"""Benchmark: fine-tuning a registered model vs training from scratch, on real GTSRB, through the real CLI.

GTSRB is ingested once (configs/gtsrb.yaml: 32x32 RGB, ROI crop, track-held-out val and test) and cut
by class: the source task is classes 0-21 (`--source-fraction` of their training images, 30 %, to keep
the run short on a shared CPU), the target task classes 22-42 with only `--fraction` (10 %) of their
training images (val and test whole). The source model is trained, evaluated and registered
as `cnnpipe-gtsrb` (champion) in a fresh SQLite store; the target model is then trained twice with
the same params and seed: from scratch, and with `--pretrained models:/cnnpipe-gtsrb@champion`
(new head, the backbone at a lower learning rate). Records both test accuracies and training times.

    .venv/bin/python -m benchmarks.transfer_gtsrb [--zip PATH] [--work DIR] [--arch fastnet]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np

from benchmarks.harness import load_average, record, stage
from cnnpipe.data.store import Split, read_dataset, write_dataset
from cnnpipe.engine.model_folder import read_history

ROOT = Path(__file__).resolve().parents[1]


def subset(src: Path, dst: Path, keep: range, train_fraction: float, seed: int = 0) -> dict[str, int]:
    """The classes `keep` of dataset `src`, relabelled 0..n-1, with `train_fraction` of each class's training images."""
    ds = read_dataset(src)
    rng = np.random.default_rng(seed)
    splits = {}
    for name, s in ds.splits.items():
        idx = np.flatnonzero(np.isin(s.labels, list(keep)))
        if name == "train" and train_fraction < 1:
            idx = np.concatenate([rng.choice(idx[s.labels[idx] == k], max(1, round(train_fraction * (s.labels[idx] == k).sum())),
                                             replace=False) for k in keep])
            idx.sort()
        splits[name] = Split(np.asarray(s.images[idx]), s.labels[idx] - keep.start)
    write_dataset(dst, [ds.classes[k] for k in keep], splits, {"source": ds.manifest["source"],
                                                               "resize": ds.manifest.get("resize", "squash")})
    return {name: len(s.labels) for name, s in splits.items()}


def train_and_test(w: Path, p: list[str], data: str, name: str, extra: list[str]) -> dict:
    wall, peak = stage(["train", *p, "--data", f"{w}/{data}", "--augmented", f"{w}/{data}-aug", "--out", f"{w}/{name}",
                        "--checkpoint", f"{w}/{name}.ckpt", *extra])
    stage(["evaluate", *p, "--data", f"{w}/{data}", "--model", f"{w}/{name}", "--out", f"{w}/{name}-eval",
           "--tsne-samples", "0"])
    history = read_history(w / name)
    metrics = json.loads((w / f"{name}-eval/metrics.json").read_text())
    return {"test_accuracy": metrics["test"]["accuracy"], "val_accuracy": metrics["val"]["accuracy"],
            "val_accuracy_per_epoch": [round(float(e["val/accuracy"]), 4) for e in history],
            "training_seconds": round(sum(float(e["train/epoch_seconds"]) for e in history), 1),
            "train_stage_wall_s": round(wall, 1), "peak_rss_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zip", type=Path, default=ROOT.parent / "shared/data/GTSRB_Final_Training_Images.zip")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cnnpipe-transfer-benchmark"))
    parser.add_argument("--arch", default="fastnet")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--source-epochs", type=int, default=5)
    parser.add_argument("--target-epochs", type=int, default=10)
    parser.add_argument("--source-fraction", type=float, default=0.3, help="of the source classes' training images")
    parser.add_argument("--fraction", type=float, default=0.1, help="of the target classes' training images")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/transfer_gtsrb.json")
    args = parser.parse_args()
    w = args.work
    shutil.rmtree(w, ignore_errors=True)
    w.mkdir(parents=True)
    load_before = load_average()
    import yaml

    params = yaml.safe_load((ROOT / "configs/gtsrb.yaml").read_text())
    params["tracking"]["uri"] = f"sqlite:///{w / 'mlflow.db'}"
    params["train"] |= {"arch": args.arch, "width": args.width}
    params["register"]["model_name"] = "cnnpipe-gtsrb"
    (w / "params.yaml").write_text(yaml.safe_dump(params))
    p = ["--params", str(w / "params.yaml")]
    stage(["ingest", *p, "--path", str(args.zip), "--out", f"{w}/all", "--report", f"{w}/ingest_report.json"])
    sizes = {"source": subset(w / "all", w / "source", range(0, 22), args.source_fraction),
             "target": subset(w / "all", w / "target", range(22, 43), args.fraction)}
    for data in ("source", "target"):
        stage(["augment", *p, "--data", f"{w}/{data}", "--out", f"{w}/{data}-aug"])
    source = train_and_test(w, p, "source", "source-model", ["--epochs", str(args.source_epochs)])
    stage(["register", *p, "--model", f"{w}/source-model", "--data", f"{w}/source", "--evaluation",
           f"{w}/source-model-eval", "--out", f"{w}/registered.json"])
    target = ["--epochs", str(args.target_epochs)]
    scratch = train_and_test(w, p, "target", "scratch", target)
    tuned = train_and_test(w, p, "target", "finetuned", [*target, "--pretrained", "models:/cnnpipe-gtsrb@champion",
                                                         "--freeze-epochs", "2", "--backbone-lr", "0.3"])
    result = {
        "benchmark": f"GTSRB transfer: {args.arch} trained and registered on classes 0-21 "
                     f"({args.source_fraction:.0%} of their training images), then on classes 22-42 "
                     f"with {args.fraction:.0%} of their training images, fine-tuned from models:/cnnpipe-gtsrb@champion "
                     "vs from scratch (same params, seed, epochs; test split held out by track)",
        "images": sizes, "arch": args.arch, "width": args.width, "source_fraction": args.source_fraction,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "source_model": source, "target_from_scratch": scratch, "target_finetuned": tuned,
        "finetune_knobs": {"freeze_epochs": 2, "backbone_lr": 0.3},
        "epochs": {"source": args.source_epochs, "target": args.target_epochs},
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "note": "shared 2-core machine: other jobs ran meanwhile (see the load averages); times are disturbed",
    }
    record(args.out, result)


if __name__ == "__main__":
    main()
