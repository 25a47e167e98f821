"""Benchmark: the same wall-clock budget for `cnnpipe tune` (TPE + median pruning) and for a grid of the
same space (no pruning), on the real GTSRB training set, through the real CLI.

ingest and augment run once; then each search is one `cnnpipe tune` child process over the space
below with `tune.timeout` = the budget (trials are started until it is spent; the last one finishes).
Records the best validation accuracy each reached, its trials (complete / pruned), its wall time and
the load average around each run: the machine is shared, so the figures are disturbed by others.

    .venv/bin/python -m benchmarks.tune_gtsrb [--budget 600] [--zip PATH] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import yaml

from benchmarks.harness import cnnpipe, load_average, record

ROOT = Path(__file__).resolve().parents[1]
# short trials, so that a budget of minutes holds enough of them to compare the two searches
TRIAL = {"arch": "fastnet", "epochs": 3, "batch_size": 256}
SPACE = {"train.lr": {"log_uniform": [0.02, 1.0]}, "train.width": {"choice": [8, 16]},
         "augment.rotate": {"uniform": [0, 20]}}
SEARCHES = {"tpe": {"sampler": "tpe", "pruner": "median"}, "grid": {"sampler": "grid", "pruner": "none"}}


def cnnpipe_json(args: list[str], cwd: Path) -> tuple[dict, float]:
    measured = cnnpipe(*args, cwd=cwd)
    return measured.json_line(), measured.wall_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zip", type=Path, default=Path("/work/shared/data/GTSRB_Final_Training_Images.zip"))
    parser.add_argument("--budget", type=float, default=600, help="seconds of trials given to each search")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cnnpipe-tune-benchmark"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/tune_gtsrb.json")
    args = parser.parse_args()
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((ROOT / "configs/gtsrb.yaml").read_text())
    params["ingest"]["path"] = str(args.zip)
    params["train"] |= TRIAL
    params["tracking"] = {"uri": f"sqlite:///{w / 'mlflow.db'}", "experiment": "tune-benchmark"}
    params["tune"] = {"timeout": args.budget, "n_trials": 0, "grid_points": 3, "startup_trials": 3,
                      "warmup_epochs": 1, "seed": 0, "space": SPACE}
    (w / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cnnpipe_json(["ingest", "--out", "processed", "--report", "ingest_report.json"], w)
    cnnpipe_json(["augment", "--data", "processed", "--out", "augmented"], w)
    results = {}
    for name, settings in SEARCHES.items():
        study = f"{name}-{int(time.time())}"  # a fresh study per benchmark run
        flags = [f"--{k}={v}" for k, v in settings.items()]
        load_before = load_average()
        summary, wall = cnnpipe_json(["tune", "--study", study, *flags, "--data", "processed", "--augmented", "augmented",
                                 "--out", f"tune/{study}"], w)
        results[name] = {**settings, "best_val_accuracy": summary.get("best_value"),
                         "best_params": summary.get("best_params"), "trials": summary["trials"],
                         "complete_trials": summary["complete_trials"], "pruned_trials": summary["pruned_trials"],
                         "wall_s": round(wall, 1), "loadavg_before": [round(x, 2) for x in load_before],
                         "loadavg_after": load_average(),
                         "torch_threads": os.environ.get("OMP_NUM_THREADS", "default")}
    record(args.out, {
        "benchmark": f"GTSRB training set: the same {args.budget:.0f} s budget for tune (TPE + median pruning) "
                     f"and for a grid of the same space; val held out by track",
        "budget_s": args.budget, "space": SPACE, "trial": TRIAL, "grid_points": 3,
        "note": "shared 2-core machine: other engineers' jobs ran meanwhile (see loadavg); "
                "a budget is for starting trials, the last one runs to its end",
        **results,
    })


if __name__ == "__main__":
    main()
