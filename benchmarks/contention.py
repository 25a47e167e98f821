"""A busy neighbour at a budgeted run's start, and the narrowing rule (train.budget_min_epochs; docs/budget.md).

`--rates`: how many cores' worth of their time this process's threads waited for a core (cnnpipe.engine.budget.
core_waits, what the budget keeper reads: the waits over the wall time) and the cost of a step, over training steps
of the fast recipe's net (fastnet-lcn, width 32, batches of 128 at 32 px, fp32, channels_last, SGD, 2 threads) alone
and beside each neighbour: the evidence for SHARED_CORES.

`--budget B`: benchmarks.recipes' worker (augment, train, score on GTSRB's test split) with configs/gtsrb-fast.yaml
at B seconds and the epoch cap benchmarks.budget gives it (`--min-epochs`: its train.budget_min_epochs instead):
with a neighbour (`--neighbour`) from the end of the augment stage (the trainer then loads the data and starts its
clock) for `--neighbour-s` seconds, with another checkout's code first (`--old ROOT`, its own .venv and benchmarks:
the rule as it was there), then this checkout's; then alone. Each run is recorded as it ends: its width, first plan,
epochs, actual time, test accuracy.

    python -m benchmarks.contention --rates
    python -m benchmarks.contention --budget 200 --min-epochs 10 --neighbour busy-cores --neighbour-s 12 [--old ROOT]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from benchmarks.budget import derived_params, recipe_for
from benchmarks.harness import RESULTS, ROOT, code_version, earlier_results, record
from benchmarks.recipes import GTSRB_ZIP, RECIPES, prepare, spawn
from cnnpipe.cores import available_cores

LOOP = "import os\nparent = os.getppid()\n"  # each neighbour ends with the benchmark, however that ends
NEIGHBOURS = {  # each a separate process, as another user's job would be: (what it is, the code of each process)
    "busy-core": ("one busy core (a Python loop)", [LOOP + "while os.getppid() == parent: pass"]),
    "busy-cores": ("every core busy (a Python loop per core)",
                   [LOOP + "while os.getppid() == parent: pass"] * available_cores()),
    "torch-job": ("a 2-thread torch job (matrix products)",
                  [LOOP + "import torch\ntorch.set_num_threads(2)\na = torch.randn(1024, 1024)\n"
                          "while os.getppid() == parent: a @ a"]),
}
STEPS = 30  # timed steps per case (~4 s alone, up to ~25 s beside a neighbour), after WARMUP
WARMUP = 5


def start(neighbour: str, procs: list[subprocess.Popen]) -> None:
    """Start `neighbour`'s processes into `procs` (so that a failed start still stops those started)."""
    for code in NEIGHBOURS.get(neighbour, ("", []))[1]:
        procs.append(subprocess.Popen([sys.executable, "-c", code]))


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def rates() -> dict:
    """Cores' worth of time the threads waited for a core, and ms a step, alone and beside each neighbour, the cases
    in turn twice."""
    import torch

    from benchmarks.step_shapes import training_step
    from cnnpipe.engine.budget import core_waits

    if core_waits() is None:
        sys.exit("this kernel does not say how long threads waited for a core (no /proc/self/task/*/schedstat)")
    torch.set_num_threads(2)
    step = training_step("fastnet-lcn", 32, 32, 128, channels_last=True, precision="fp32")

    out: dict[str, list[dict]] = {}
    for _ in range(2):
        for case in ["alone", *NEIGHBOURS]:
            procs: list[subprocess.Popen] = []
            try:
                start(case, procs)
                time.sleep(3.0 if case == "torch-job" else 0.5)  # the neighbours running (torch takes seconds to load)
                for _ in range(WARMUP):
                    step()
                before, t0 = core_waits(), time.perf_counter()
                for _ in range(STEPS):
                    step()
                after, seconds = core_waits(), time.perf_counter() - t0
            finally:
                stop(procs)
            waited_s = sum(ns - before.get(thread, 0) for thread, ns in after.items()) / 1e9
            out.setdefault(case, []).append({"waited_cores": round(waited_s / seconds, 3),
                                             "step_ms": round(1000 * seconds / STEPS, 1)})
            print(f"{case}: {out[case][-1]}", file=sys.stderr, flush=True)
    return out


def budget_runs(args: argparse.Namespace, runs: list[dict], save: Callable[[], None]) -> None:
    """The runs, appended to `runs` and saved (`save()`) one by one."""
    processed = prepare(args.zip, args.work)
    changes = {} if args.min_epochs is None else {"train.budget_min_epochs": args.min_epochs}
    path = derived_params("fast", args.budget, recipe_for(args.budget)[1], args.work, changes, label="contention")
    cases = [(args.neighbour, args.old, args.neighbour_s)] if args.old else []
    cases += [(args.neighbour, ROOT, args.neighbour_s), ("alone", ROOT, 0.0)]
    for case, root, seconds in cases:
        for seed in range(args.seeds):
            work = args.work / f"contention-{args.budget:g}-{len(runs)}"
            shutil.rmtree(work, ignore_errors=True)
            ended = threading.Event()

            def neighbour(work: Path = work, case: str = case, seconds: float = seconds, ended=ended) -> None:
                while seconds and not ended.is_set() and not (work / "augmented").exists():  # then training starts
                    time.sleep(0.05)
                procs: list[subprocess.Popen] = []
                try:
                    if seconds and not ended.is_set():
                        start(case, procs)
                    ended.wait(seconds)
                finally:
                    stop(procs)

            code = code_version(root)
            print(f"{case} for {seconds:g} s, code {code}, seed {seed}", file=sys.stderr, flush=True)
            side = threading.Thread(target=neighbour)
            side.start()
            try:
                python = sys.executable if root == ROOT else str(root / ".venv/bin/python")
                run = spawn([python, "-m", "benchmarks.recipes", "--worker", str(path), str(processed), str(work),
                             str(seed)], env={"CNNPIPE_BENCH_THREADS": "2"}, cwd=root)
            finally:
                ended.set()
                side.join()
            b = run["budget"]
            runs.append({"case": case, "neighbour_s": seconds, "code": code, "seed": seed, "width": b["width"],
                         "first_plan_epochs": b.get("first_plan_epochs"), "planned_epochs": b.get("planned_epochs"),
                         "actual_s": b["actual_s"], "step_s": b.get("step_s"), "test_accuracy": run["test_accuracy"]})
            print(runs[-1], file=sys.stderr, flush=True)
            save()


def write_tables(result: dict, out: Path) -> None:
    """`out`'s .md: the waits table; `out`'s stem + _runs.md: the budgeted runs (two files: a page takes each table
    by its file)."""
    rows = ["| beside | cores' worth of time the threads waited for a core, each pass | ms a step, each pass |",
            "| --- | ---: | ---: |"]
    for case, passes in result.get("rates", {}).get("cases", {}).items():
        waited = ", ".join(f"{p['waited_cores']:.2f}" for p in passes)
        step_ms = ", ".join(f"{p['step_ms']:.0f}" for p in passes)
        rows.append(f"| {NEIGHBOURS[case][0] if case in NEIGHBOURS else case} | {waited} | {step_ms} |")
    out.with_suffix(".md").write_text("\n".join(rows) + "\n")
    rows = ["| budget, neighbour | code | seed | width trained | first plan (of the net trained) | last plan | "
            "actual time | ms a step (last plan) | test accuracy |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for point in result.get("budgeted", {}).values():
        for r in point["runs"]:
            beside = (f"{NEIGHBOURS[r['case']][0]} for {r['neighbour_s']:g} s" if r["case"] in NEIGHBOURS
                      else r["case"])
            step_ms = "-" if r["step_s"] is None else f"{1000 * r['step_s']:.0f}"
            rows.append(f"| {point['budget_s']:g} s (budget_min_epochs {point['min_epochs']:g}), {beside} | "
                        f"{r['code']} | {r['seed']} | {r['width']} | {r['first_plan_epochs']} epochs | "
                        f"{r['planned_epochs']} epochs | {r['actual_s']:.1f} s | {step_ms} | "
                        f"{100 * r['test_accuracy']:.2f} % |")
    out.with_name(f"{out.stem}_runs.md").write_text("\n".join(rows) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rates", action="store_true", help="how long the threads wait for a core, alone and shared")
    parser.add_argument("--budget", type=float, help="seconds: budgeted GTSRB runs (configs/gtsrb-fast.yaml)")
    parser.add_argument("--min-epochs", type=float, help="train.budget_min_epochs (default: the recipe's)")
    parser.add_argument("--neighbour", default="busy-core", choices=sorted(NEIGHBOURS))
    parser.add_argument("--neighbour-s", type=float, default=8.0, help="seconds the neighbour runs")
    parser.add_argument("--old", type=Path, help="another checkout (with its .venv): the same runs with its code")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--label", default="", help="a suffix of the point's name (another variant of the code)")
    parser.add_argument("--zip", type=Path, default=GTSRB_ZIP)
    parser.add_argument("--work", type=Path, default=Path("/tmp/cnnpipe-recipes"))
    parser.add_argument("--out", type=Path, default=RESULTS / "contention.json")
    args = parser.parse_args()
    if not args.rates and not args.budget:
        parser.error("--rates, --budget or both")
    if args.budget and not args.zip.exists():
        sys.exit(f"GTSRB zip not found: {args.zip}")
    result = earlier_results(args.out)
    result.pop("command", None)  # record() writes this one's; each part keeps its own below
    result["code"] = code_version()
    command = " ".join(["python -m benchmarks.contention", *sys.argv[1:]])

    def save() -> None:
        record(args.out, result)
        write_tables(result, args.out)

    if args.rates:
        result["rates"] = {"command": command, "code": result["code"], "date": time.strftime("%Y-%m-%d"),
                           "cases": rates()}
        save()
    if args.budget:
        min_epochs = args.min_epochs if args.min_epochs is not None else \
            yaml.safe_load(RECIPES["fast"].read_text())["train"]["budget_min_epochs"]
        key = f"{args.budget:g}s_min{min_epochs:g}_{args.neighbour}_{args.neighbour_s:g}s{'_' + args.label if args.label else ''}"
        point = result.setdefault("budgeted", {})[key] = {
            "command": command, "date": time.strftime("%Y-%m-%d"), "budget_s": args.budget, "min_epochs": min_epochs,
            "runs": []}
        budget_runs(args, point["runs"], save)


if __name__ == "__main__":
    main()
