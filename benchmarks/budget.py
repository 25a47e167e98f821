"""Benchmark: GTSRB test accuracy against a wall-clock training budget (train.budget_s), on this CPU as it is and
emulating an AVX2-only CPU.

Per budget B, CPU mode and seed: configs/gtsrb-fast.yaml with train.budget_s = B (train.epochs a cap that grows
with B, the low-resolution share of its epochs kept) trains in its own process: benchmarks/recipes.py's worker
(augment + train on one ingest of the real GTSRB training set, whole frames + boxes, val and test held out by
track; test accuracy on whole frames, the served protocol). The fixed recipes (configs/gtsrb-fast.yaml,
configs/gtsrb.yaml) run as they are, their own epochs, once per mode and seed: their test accuracy at their own
training time, and the validation accuracy they had reached by each budget.

The AVX2 emulation: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 in the worker's environment. oneDNN's
verbose output then names avx2 kernels (brg_conv_fwd:avx2, jit:avx2) where it named avx512_core(_bf16), and
train.precision bf16 falls back to fp32, as on a real AVX2 CPU (docs/budget.md).

    flock /tmp/cnnpipe-bench.lock .venv/bin/python -m benchmarks.budget [--budgets 30 60 120 300 600] \\
        [--seeds 3] [--modes native avx2] [--fixed fast default]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import yaml

from benchmarks.harness import machine_info, record
from benchmarks.recipes import GTSRB_ZIP, RECIPES, prepare, spawn

ROOT = Path(__file__).resolve().parents[1]
MODES = {"native": {}, "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}
SECONDS_PER_EPOCH_CAP = 8  # train.epochs = B / 8: a cap the budget reaches first (an epoch takes ~9-14 s here)


def derived_params(recipe: str, budget: float, cap: int | None, work: Path) -> Path:
    """A recipe with train.budget_s = budget (0: its fixed epochs) and train.epochs = cap (None: the recipe's),
    the low-resolution share of its epochs kept."""
    params = yaml.safe_load(RECIPES[recipe].read_text())
    train = params["train"]
    cap = cap or train["epochs"]
    share = train["low_res_epochs"] / train["epochs"]
    train.update(budget_s=float(budget), epochs=cap, low_res_epochs=round(share * cap))
    path = work / f"params-{recipe}-{budget:g}-{cap}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def val_by(epochs: list[dict], seconds: float) -> float | None:
    """The best validation accuracy a run had reached `seconds` into its training (None: no epoch by then)."""
    reached = [e["val_accuracy"] for e in epochs if e["elapsed_s"] <= seconds]
    return max(reached) if reached else None


def stat(values: list[float]) -> dict:
    return {"mean": round(statistics.mean(values), 5), "std": round(statistics.stdev(values), 5) if len(values) > 1
            else None, "n": len(values)}


def plot(results: dict, budgets: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (mode, res), color in zip(results.items(), ("tab:blue", "tab:orange")):
        xs = [b for b in budgets if f"{b:g}" in res["budgeted"]]
        ys = [100 * res["budgeted"][f"{b:g}"]["test_accuracy"]["mean"] for b in xs]
        actual = [res["budgeted"][f"{b:g}"]["actual_s"]["mean"] for b in xs]
        ax.plot(xs, ys, "o-", color=color, label=f"budgeted ({mode})")
        for x, y, a in zip(xs, ys, actual):
            ax.annotate(f"{a:.0f} s", (x, y), textcoords="offset points", xytext=(4, -12), fontsize=7, color=color)
        for name, fixed in res["fixed"].items():
            ax.plot(fixed["train_s"]["mean"], 100 * fixed["test_accuracy"]["mean"], "s" if name == "fast" else "^",
                    color=color, markerfacecolor="none", markersize=9, label=f"{name} recipe, fixed epochs ({mode})")
    ax.axhline(98.84, color="grey", linestyle=":", linewidth=1, label="human (98.84 %)")
    ax.set_xscale("log")
    ax.set_xlabel("training + validation wall-clock (s): the budget, or a fixed recipe's time")
    ax.set_ylabel("test accuracy, whole frames (%)")
    ax.set_title("GTSRB: accuracy against a training budget (2 cores)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zip", type=Path, default=GTSRB_ZIP)
    parser.add_argument("--budgets", type=float, nargs="+", default=[30, 60, 120, 300, 600])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--fixed", nargs="*", default=["fast", "default"], choices=sorted(RECIPES),
                        help="fixed-epoch recipes to compare (none: only the budgeted trainer)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per run (0 = the cores; 1 on a crowded machine: a 2-thread step waits "
                             "for whichever of its threads is descheduled)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cnnpipe-recipes"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/budget_gtsrb.json")
    args = parser.parse_args()
    if not args.zip.exists():
        sys.exit(f"GTSRB zip not found: {args.zip}")
    load_before = [round(x, 2) for x in os.getloadavg()]
    processed = prepare(args.zip, args.work)
    threads = args.threads or len(os.sched_getaffinity(0))
    results: dict = {mode: {"env": MODES[mode], "budgeted": {}, "fixed": {}} for mode in args.modes}

    def worker(mode: str, params: Path, name: str, seed: int) -> dict:
        print(f"{mode}: {name}, seed {seed}", file=sys.stderr, flush=True)
        load = os.getloadavg()[0]
        run = spawn([sys.executable, "-m", "benchmarks.recipes", "--worker", str(params), str(processed),
                     str(args.work / f"{name}-{mode}-{seed}"), str(seed)],
                    env={**MODES[mode], "CNNPIPE_BENCH_THREADS": str(threads)})
        return {"seed": seed, "load_1min_before": round(load, 2), **run}

    # the fixed recipes first (the reference), then both modes at each budget, the shortest first: a run cut short
    # still compares them
    for name in args.fixed:
        params = derived_params(name, 0.0, None, args.work)
        for mode in args.modes:
            runs = [worker(mode, params, f"fixed-{name}", seed) for seed in range(args.seeds)]
            results[mode]["fixed"][name] = {
                "params": f"{RECIPES[name].relative_to(ROOT)} with train.budget_s 0 (its fixed epochs)",
                "test_accuracy": stat([r["test_accuracy"] for r in runs]),
                "train_s": stat([r["train_s"] for r in runs]),
                "val_accuracy_by_budget": {f"{b:g}": [val_by(r["epochs"], b) for r in runs] for b in args.budgets},
                "runs": runs}
            save(args, results, threads, load_before)
    for budget in args.budgets:
        params = derived_params("fast", budget, max(5, math.ceil(budget / SECONDS_PER_EPOCH_CAP)), args.work)
        for mode in args.modes:
            runs = [worker(mode, params, f"budget-{budget:g}", seed) for seed in range(args.seeds)]
            results[mode]["budgeted"][f"{budget:g}"] = {
                "params": f"configs/gtsrb-fast.yaml with train.budget_s {budget:g}, "
                          f"epochs {yaml.safe_load(params.read_text())['train']['epochs']} (cap)",
                "test_accuracy": stat([r["test_accuracy"] for r in runs]),
                "actual_s": stat([r["budget"]["actual_s"] for r in runs]),
                "within_5_percent": sum(r["budget"]["actual_s"] <= 1.05 * budget for r in runs),
                "runs": runs}
            save(args, results, threads, load_before)


def save(args: argparse.Namespace, results: dict, threads: int, load_before: list[float]) -> None:
    """The results so far: JSON, markdown table, plot (written after every point: a long run cut short keeps them)."""
    header = ["CPU mode", "budget", "budgeted: test accuracy", "actual time", "within 5 %",
              *(f"{n} recipe: val reached by then" for n in args.fixed)]
    rows = [header, ["---"] + ["---:"] * (len(header) - 1)]
    for mode, res in results.items():
        for b, r in res["budgeted"].items():
            acc, actual = r["test_accuracy"], r["actual_s"]
            spread = f" ± {100 * acc['std']:.2f}" if acc["std"] is not None else ""
            rows.append([mode, f"{b} s", f"{100 * acc['mean']:.2f}{spread} %", f"{actual['mean']:.1f} s",
                         f"{r['within_5_percent']}/{acc['n']}",
                         *(" / ".join("—" if v is None else f"{100 * v:.2f} %"
                                      for v in res["fixed"][n]["val_accuracy_by_budget"][b])
                           if n in res["fixed"] else "not run" for n in args.fixed)])
        for n, f in res["fixed"].items():
            rows.append([mode, f"{n} recipe as is", f"(test) {100 * f['test_accuracy']['mean']:.2f} %",
                         f"{f['train_s']['mean']:.1f} s", "—", *("" for _ in args.fixed)])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join("| " + " | ".join(row) + " |" for row in rows) + "\n")
    plot(results, args.budgets, args.out.with_suffix(".png"))
    record(args.out, {
        "benchmark": "GTSRB test accuracy (whole frames, track-held-out split) against train.budget_s; the fixed "
                     "recipes as they are; actual_s = the trainer's own count of training + validation seconds, "
                     "train_s = the worker's from the start of the train stage (data loading included)",
        "command": " ".join(["python -m benchmarks.budget", *sys.argv[1:]]), "budgets": args.budgets, "seeds": args.seeds,
        "threads_per_run": threads, "cpu_flags": machine_info()["cpu_flags"], "results": results,
        "load_average_before": load_before, "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    })

if __name__ == "__main__":
    main()
