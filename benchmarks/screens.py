"""Benchmark: screens of GTSRB recipe variants, cheap enough to try many before one earns a budgeted run.

A variant is configs/gtsrb-fast.yaml with some params changed (--set), trained for the recipe's fixed epochs (no
budget: the machine's speed, or a neighbour, does not change what is trained), bf16 as the recipe says, on one
ingest of the real GTSRB training set (benchmarks/recipes.py's worker: whole frames + boxes, val and test held out
by track; test accuracy on whole frames, the served protocol, without and with flip TTA). A run is deterministic
for its seed, so every variant runs the same seeds and compares paired. A screen only ranks: what wins here is
then measured against its budget (benchmarks/budget.py --set ... --label ...).

    flock /tmp/cnnpipe-bench.lock .venv/bin/python -m benchmarks.screens --name ls0.2 \\
        --set train.label_smoothing=0.2 [--seeds 0 1] [--note "..."]

Each variant's runs merge into benchmarks/results/screens_gtsrb.json; a seed already there with the same params
file (byte for byte) and the same code is kept, so a screen cut short goes on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


from benchmarks.budget import derived_params, params_sha256, parse_changes
from benchmarks.harness import code_version, earlier_results, machine_info
from benchmarks.recipes import GTSRB_ZIP, prepare, spawn

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "fast"
THREADS = 2  # the recipe's machine: 2 cores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", required=True, help="the variant's name in the results file")
    parser.add_argument("--set", nargs="*", default=[], metavar="BLOCK.KEY=VALUE", help="params changed from the recipe")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--note", default="", help="what the params do not say (a code change measured before commit)")
    parser.add_argument("--zip", type=Path, default=GTSRB_ZIP)
    parser.add_argument("--work", type=Path, default=Path("/tmp/cnnpipe-recipes"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/screens_gtsrb.json")
    args = parser.parse_args()
    if not args.zip.exists():
        sys.exit(f"GTSRB zip not found: {args.zip}")
    changes = parse_changes(args.set)
    results = earlier_results(args.out) or {"variants": {}}
    processed = prepare(args.zip, args.work)
    params = derived_params(RECIPE, 0.0, None, args.work / "screens", changes, args.name)
    digest = params_sha256(params)
    code = code_version()

    previous = results["variants"].get(args.name, {})
    same = previous.get("params_sha256") == digest and previous.get("code") == code
    runs = {r["seed"]: r for r in previous.get("runs", [])} if same else {}
    for seed in args.seeds:
        if seed in runs:
            continue
        print(f"{args.name}: seed {seed}", file=sys.stderr, flush=True)
        run = spawn([sys.executable, "-m", "benchmarks.recipes", "--worker", str(params), str(processed),
                     str(args.work / f"screen-{args.name}-{seed}"), str(seed)],
                    env={"CNNPIPE_BENCH_THREADS": str(THREADS)})
        runs[seed] = {"seed": seed, **{k: run[k] for k in ("test_accuracy", "test_accuracy_tta", "val_accuracy_kept",
                                                           "kept_epoch", "epochs_run", "train_s", "augment_s")}}
        ordered = [runs[s] for s in sorted(runs)]
        results["variants"][args.name] = {
            "changes": changes, **({"note": args.note} if args.note else {}), "code": code,
            "params_sha256": digest, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "test_accuracy_mean": round(statistics.mean(r["test_accuracy"] for r in ordered), 5),
            "test_accuracy_tta_mean": round(statistics.mean(r["test_accuracy_tta"] for r in ordered), 5),
            "runs": ordered}
        results["machine"] = machine_info()
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({"variant": args.name, **{k: results["variants"][args.name][k]
                                              for k in ("test_accuracy_mean", "test_accuracy_tta_mean")},
                      "seeds": sorted(runs)}))


if __name__ == "__main__":
    main()
