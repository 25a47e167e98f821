"""Benchmark: what averaging trained GTSRB models buys, measured before building it (issue 27's "short ensemble").

Scores model folders that benchmarks/budget.py kept (--work/budget-<B>-<mode>-<seed>/model) on the test split they
were trained for (whole frames, the served protocol), each alone and as ensembles: the mean of their softmax
outputs, without and with flip TTA, for every subset of --size of them. k models of a budget B/k each are what
one budget B could train as an ensemble; k models of budget B each bound what averaging adds at B.

    .venv/bin/python -m benchmarks.ensemble --group 300-x2 --size 2 --merge \\
        --processed /tmp/cnnpipe-recipes/processed --models /tmp/cnnpipe-recipes/budget-300-native-{0,1,2}/model
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

import numpy as np

from benchmarks.budget import stat
from benchmarks.harness import earlier_results, record
from benchmarks.recipes import errors, probabilities_on_test

ROOT = Path(__file__).resolve().parents[1]


def measure(models: list[Path], processed: Path, size: int) -> dict:
    """Every model alone, then every `size`-subset averaged."""
    scored = [probabilities_on_test(model, processed) for model in models]
    labels = scored[0][2]
    names = [model.parent.name for model in models]
    members = [{"model": name, **errors(probs, labels), "accuracy_tta": errors(tta, labels)["accuracy"]}
               for name, (probs, tta, _) in zip(names, scored)]
    ensembles = []
    for subset in itertools.combinations(range(len(models)), size):
        probs = np.mean([scored[i][0] for i in subset], axis=0)
        tta = np.mean([scored[i][1] for i in subset], axis=0)
        ensembles.append({"models": [names[i] for i in subset], **errors(probs, labels),
                          "accuracy_tta": errors(tta, labels)["accuracy"],
                          "members_mean_accuracy": round(statistics.mean(members[i]["accuracy"] for i in subset), 5)})
    return {"size": size, "members": members, "ensembles": ensembles,
            "member_accuracy": stat([m["accuracy"] for m in members]),
            "ensemble_accuracy": stat([e["accuracy"] for e in ensembles]),
            "ensemble_accuracy_tta": stat([e["accuracy_tta"] for e in ensembles]),
            "gain": stat([e["accuracy"] - e["members_mean_accuracy"] for e in ensembles])}


def table(groups: dict) -> str:
    def pct(stat: dict) -> str:
        std = f" ± {100 * stat['std']:.2f}" if stat["std"] is not None else ""
        return f"{100 * stat['mean']:.2f}{std} %"
    rows = ["| group | models | ensembles of | each model alone | ensemble | with flip TTA | gain over its members | "
            "errors per ensemble |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, g in groups.items():
        rows.append(f"| {name} | {len(g['members'])} | {g['size']} | {pct(g['member_accuracy'])} | "
                    f"{pct(g['ensemble_accuracy'])} | {pct(g['ensemble_accuracy_tta'])} | "
                    f"{100 * g['gain']['mean']:+.2f} points | {', '.join(str(e['errors']) for e in g['ensembles'])} |")
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, nargs="+", required=True, help="model folders (train's --model)")
    parser.add_argument("--size", type=int, default=2, help="models per ensemble")
    parser.add_argument("--group", required=True, help="this set of models' name in the results file")
    parser.add_argument("--processed", type=Path, required=True,
                        help="the ingested dataset the models were trained on, whose test split is scored "
                             "(benchmarks.budget's --work/processed, or processed-split-N for --split-seed N)")
    parser.add_argument("--merge", action="store_true", help="keep the results file's other groups")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/ensemble_gtsrb.json")
    args = parser.parse_args()
    missing = [str(m) for m in args.models if not m.is_dir()]
    if missing:
        raise SystemExit(f"not a model folder: {', '.join(missing)}")
    if not 2 <= args.size <= len(args.models):
        raise SystemExit(f"--size: expected 2 to {len(args.models)} (the models given), got {args.size}")
    previous = earlier_results(args.out) if args.merge else {}
    groups = {**previous.get("groups", {}), args.group: measure(args.models, args.processed, args.size)}
    commands = [*previous.get("commands", []), " ".join(["python -m benchmarks.ensemble", *sys.argv[1:]])]
    args.out.with_suffix(".md").write_text(table(groups))
    record(args.out, {"benchmark": "GTSRB test accuracy (whole frames) of trained models alone and of the mean of "
                                   "their softmax outputs", "groups": groups, "commands": commands})


if __name__ == "__main__":
    main()
