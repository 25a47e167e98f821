"""Benchmark: GTSRB test accuracy against a wall-clock training budget (train.budget_s), on this CPU as it is,
emulating an AVX2-only CPU, and (avx2-1core) emulating it on one thread, a slower chip's speed.

Per budget B, CPU mode and seed: the recipe a user starts from (configs/gtsrb-fast.yaml below LONG_BUDGET_S,
configs/gtsrb.yaml from it) with train.budget_s = B and train.epochs a cap of B / SECONDS_PER_EPOCH_CAP, in its
own process: benchmarks/recipes.py's worker (augment + train on one ingest of the real GTSRB training set, whole
frames + boxes, val and test held out by track; test accuracy on whole frames, the served protocol, without and
with flip TTA; the run's test errors and its most frequent confusions). --set/--label measure a variant of the
recipe under its own name; --split-seed the same on another draw of the held-out tracks. The fixed recipes (--fixed)
run their own epochs: their test accuracy and training time, and the validation accuracy reached by each budget.
The plain PyTorch peer (--peers, benchmarks/peers.py's torch worker) gets, per mode and budget, the epochs that
fit (--seeds runs of them): one epoch timed first, as a user would; "users" as users write it, "same" with cnnpipe's augmentation
(box crops on tv_tensors.BoundingBoxes), optimizer, schedule, EMA and precision. Seconds per full-resolution
epoch, cnnpipe's (the fixed fast recipe) against each peer's: `epoch_time_ratios`.

The AVX2 emulation: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 in the worker's environment. oneDNN's
verbose output then names avx2 kernels (brg_conv_fwd:avx2, jit:avx2) where it named avx512_core(_bf16), and
train.precision bf16 falls back to fp32, as on a real AVX2 CPU (docs/budget.md).

Every invocation with --merge adds its points to the results file (JSON, markdown table, plot), e.g.:

    flock /tmp/cnnpipe-bench.lock .venv/bin/python -m benchmarks.budget [--budgets 30 60 120 300 600] \\
        [--seeds 3] [--modes native avx2] [--fixed fast default] [--peers users same] [--merge]
    ... -m benchmarks.budget --budgets 600 --modes native --fixed --set train.ema=0 train.keep=best \\
        --label no-ema --merge
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import yaml

from benchmarks.harness import code_version, earlier_results, machine_info, record
from benchmarks.recipes import GTSRB_ZIP, RECIPES, prepare, spawn

ROOT = Path(__file__).resolve().parents[1]
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
MODES = {"native": {}, "avx2": AVX2, "avx2-1core": AVX2}
# avx2-1core: the emulation on one thread, a slower chip's speed (~700 img/s in fp32 here, the 430-708 img/s of
# the 2-core AVX2 CPU issue 27 reports): the emulation changes the kernels, not the chip (docs/budget.md)
MODE_THREADS = {"avx2-1core": 1}
PEERS = {"users": "plain PyTorch as users write it: RandomAffine + ColorJitter per image, fp32, configs/gtsrb.yaml's "
                  "optimizer and one-cycle schedule over the epochs that fit",
         "same": "plain PyTorch with cnnpipe's augmentation through torchvision v2 (class-aware flips, box crops on "
                 "tv_tensors.BoundingBoxes, affine, colour), configs/gtsrb-fast.yaml's optimizer, schedule, EMA, "
                 "precision and conv_init, over the epochs that fit"}
LONG_BUDGET_S = 300  # from this budget on, the long recipe (configs/gtsrb.yaml) is the starting point
SECONDS_PER_EPOCH_CAP = 8  # train.epochs = B / 8: a cap the budget reaches first (an epoch takes ~9-14 s here)


def derived_params(recipe: str, budget: float, cap: int | None, work: Path, changes: dict | None = None,
                   label: str = "") -> Path:
    """A recipe with train.budget_s = budget (0: its fixed epochs) and train.epochs = cap (None: the recipe's),
    the low-resolution share of its epochs kept, then `changes` ({"train.ema": 0.999, ...})."""
    params = yaml.safe_load(RECIPES[recipe].read_text())
    train = params["train"]
    cap = cap or train["epochs"]
    share = train["low_res_epochs"] / train["epochs"]
    train.update(budget_s=float(budget), epochs=cap, low_res_epochs=round(share * cap))
    for key, value in (changes or {}).items():
        block, field = key.split(".")
        params[block][field] = value
    path = work / f"params-{recipe}-{budget:g}-{cap}{'-' + label if label else ''}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def parse_changes(items: list[str]) -> dict:
    """--set's BLOCK.KEY=VALUE items as {"block.key": value}, each value read as YAML (0.2 -> float, fastnet -> str)."""
    return {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in items)}


def params_sha256(params: Path) -> str:
    """What identifies a derived params file: a run is reused only for the same bytes."""
    return hashlib.sha256(params.read_bytes()).hexdigest()


def val_by(epochs: list[dict], seconds: float) -> float | None:
    """The best validation accuracy a run had reached `seconds` into its training (None: no epoch by then)."""
    reached = [e["val_accuracy"] for e in epochs if e["elapsed_s"] <= seconds and e["val_accuracy"] is not None]
    return max(reached) if reached else None


def stat(values: list[float]) -> dict:
    return {"mean": round(statistics.mean(values), 5), "std": round(statistics.stdev(values), 5) if len(values) > 1
            else None, "n": len(values)}


def plot(results: dict, budgets: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for (mode, res), color in zip(results.items(), ("tab:blue", "tab:orange", "tab:red")):
        xs = [b for b in budgets if f"{b:g}" in res["budgeted"]]
        ys = [100 * res["budgeted"][f"{b:g}"]["test_accuracy"]["mean"] for b in xs]
        actual = [res["budgeted"][f"{b:g}"]["actual_s"]["mean"] for b in xs]
        ax.plot(xs, ys, "o-", color=color, label=f"budgeted ({mode})")
        variants = [(float(point.split()[0]), 100 * r["test_accuracy"]["mean"])
                    for point, r in res["budgeted"].items() if " " in point]  # --label and --split-seed points
        if variants:  # one legend entry for all: their names are in the results table
            ax.plot(*zip(*variants), "D", color=color, markerfacecolor="none", markersize=5, linestyle="none",
                    label=f"budgeted, variants and other splits ({mode})")
        for x, y, a in zip(xs, ys, actual):
            ax.annotate(f"{a:.0f} s", (x, y), textcoords="offset points", xytext=(4, -12), fontsize=7, color=color)
        for variant, marker in zip(PEERS, ("x", "+")):
            points = sorted((float(b), peer_runs(r)) for b, r in res.get("peers", {}).get(variant, {}).items())
            if points:  # each point the mean of its seeds
                ax.plot([statistics.mean(r["train_s"] for r in runs) for _, runs in points],
                        [100 * statistics.mean(r["test_accuracy"] for r in runs) for _, runs in points], marker,
                        color=color, linestyle="--", linewidth=0.8, label=f"PyTorch peer, {variant} ({mode})")
        for name, fixed in res["fixed"].items():
            ax.plot(fixed["train_s"]["mean"], 100 * fixed["test_accuracy"]["mean"], "s" if name == "fast" else "^",
                    color=color, markerfacecolor="none", markersize=9, label=f"{name} recipe, fixed epochs ({mode})")
    ax.axhline(98.84, color="grey", linestyle=":", linewidth=1, label="human (98.84 %)")
    ax.set_xscale("log")
    ax.set_xticks(budgets, [f"{b:g}" for b in budgets])  # the budgets, not powers of ten
    ax.minorticks_off()
    ax.set_xlabel("training + validation wall-clock (s): the budget, or a fixed recipe's time")
    ax.set_ylabel("test accuracy, whole frames (%)")
    ax.set_title("GTSRB: accuracy against a training budget (2 cores)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: the points crowd the axes
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def recipe_for(budget: float) -> tuple[str, int]:
    """The recipe a budget starts from and its epoch cap (B / SECONDS_PER_EPOCH_CAP: the budget binds before the
    cap on this machine): configs/gtsrb-fast.yaml below LONG_BUDGET_S, configs/gtsrb.yaml from it."""
    return "default" if budget >= LONG_BUDGET_S else "fast", max(5, math.ceil(budget / SECONDS_PER_EPOCH_CAP))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zip", type=Path, default=GTSRB_ZIP)
    parser.add_argument("--budgets", type=float, nargs="*", default=[30, 60, 120, 300, 600])
    parser.add_argument("--set", nargs="*", default=[], metavar="BLOCK.KEY=VALUE",
                        help="a recipe variant: these params changed at every budget (needs --label)")
    parser.add_argument("--label", default="", help="the variant's name: its points are '<budget> <label>'")
    parser.add_argument("--split-seed", type=int, default=0,
                        help="ingest's seed: another draw of the tracks held out for validation and test (its "
                             "points are '<budget> [<label> ]split-<seed>')")
    parser.add_argument("--seeds", type=int, default=3,
                        help="per point, the peers' too (0: only the peers, one seed); with --merge, seeds a point "
                             "already has are kept")
    parser.add_argument("--modes", nargs="+", default=["native", "avx2"], choices=list(MODES))
    parser.add_argument("--fixed", nargs="*", default=["fast", "default"], choices=sorted(RECIPES),
                        help="fixed-epoch recipes to compare (none: only the budgeted trainer)")
    parser.add_argument("--peers", nargs="*", default=["users", "same"], choices=list(PEERS),
                        help="the plain PyTorch peer (benchmarks/peers.py) at each budget: as users write it, and "
                             "with cnnpipe's augmentation (none: no peer)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per run (0 = the cores; 1 on a crowded machine: a 2-thread step waits "
                             "for whichever of its threads is descheduled)")
    parser.add_argument("--rescore", action="store_true",
                        help="train nothing: score again the model folders --work kept of the file's points at "
                             "--budgets (and --label, --split-seed) to add their test errors, top confusions and accuracy on "
                             "frames cropped to their boxes; "
                             "every point is kept (with --budgets and nothing after it: the table and plot redrawn)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the results file's other points (those this run does not measure)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cnnpipe-recipes"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/budget_gtsrb.json")
    args = parser.parse_args()
    if not args.zip.exists():
        sys.exit(f"GTSRB zip not found: {args.zip}")
    changes = parse_changes(args.set)
    if changes and not args.label:
        sys.exit("--set needs --label (a variant's points must not replace the recipe's)")
    if args.rescore and not args.out.exists():
        sys.exit(f"--rescore scores the points of a results file: {args.out} not found")
    if args.split_seed and args.fixed:
        sys.exit("--split-seed measures the budgeted trainer: pass --fixed and --peers without names")
    # --rescore only adds to the file's runs: it keeps every point, --merge or not
    previous = earlier_results(args.out) if args.merge or args.rescore else {}
    processed = prepare(args.zip, args.work, args.split_seed)
    label = " ".join(filter(None, [args.label, f"split-{args.split_seed}" if args.split_seed else ""]))
    threads = args.threads or len(os.sched_getaffinity(0))

    def threads_of(mode: str) -> int:
        return MODE_THREADS.get(mode, threads)
    results: dict = previous.get("results", {})
    for mode in [] if args.rescore else args.modes:  # --rescore adds no mode the file does not have
        results.setdefault(mode, {"env": MODES[mode], "budgeted": {}, "fixed": {}})
    commands = [*previous.get("commands", []), " ".join(["python -m benchmarks.budget", *sys.argv[1:]])]
    load = {"before": [*previous.get("load_average_before", []), [round(x, 2) for x in os.getloadavg()]]}

    def worker(mode: str, params: Path, name: str, seed: int) -> dict:
        print(f"{mode}: {name}, seed {seed}", file=sys.stderr, flush=True)
        load_1min = os.getloadavg()[0]
        run = spawn([sys.executable, "-m", "benchmarks.recipes", "--worker", str(params), str(processed),
                     str(args.work / f"{name}-{mode}-{seed}"), str(seed)],
                    env={**MODES[mode], "CNNPIPE_BENCH_THREADS": str(threads_of(mode))})
        return {"seed": seed, "threads": threads_of(mode), "load_1min_before": round(load_1min, 2),
                "code": code_version(), **run}

    def save_all() -> None:
        load["after"] = [round(x, 2) for x in os.getloadavg()]
        save(args.out, results, threads, commands, load)

    def peer(mode: str, variant: str, budget: float, epochs: int, seed: int = 0) -> dict:
        print(f"{mode}: peer ({variant}), {epochs} epochs, budget {budget:g} s, seed {seed}", file=sys.stderr,
              flush=True)
        load_1min = os.getloadavg()[0]
        run = spawn([sys.executable, "-m", "benchmarks.peers", "--budget", f"{budget:g}", "--threads",
                     str(threads_of(mode)), "--augment", variant, "--epochs", str(epochs), "--seed", str(seed),
                     "--worker", "torch", str(processed)],
                    env={**MODES[mode], "OMP_NUM_THREADS": str(threads_of(mode))})
        return {"seed": seed, "threads": threads_of(mode), "load_1min_before": round(load_1min, 2),
                "code": code_version(), **run}

    if args.rescore:
        for mode in args.modes:
            for budget in args.budgets:
                point = f"{budget:g} {label}".strip()
                for run in results.get(mode, {}).get("budgeted", {}).get(point, {}).get("runs", []):
                    model = args.work / f"budget-{point.replace(' ', '-')}-{mode}-{run['seed']}" / "model"
                    if "test_accuracy_roi" in run or not model.exists():
                        continue
                    scored = spawn([sys.executable, "-m", "benchmarks.recipes", "--score", str(model), str(processed)])
                    # a folder trained again since (another params file, another code) is not this run's model
                    if abs(scored["test_accuracy"] - run["test_accuracy"]) > 1e-4:
                        print(f"{model}: test accuracy {scored['test_accuracy']}, the run recorded "
                              f"{run['test_accuracy']}: not this run's model, skipped", file=sys.stderr)
                        continue
                    run.update({k: scored[k] for k in ("test_errors", "top_confusions", "test_accuracy_roi",
                                                       "top_confusions_roi") if k in scored})  # no boxes: no ROI
        save_all()
        return
    # the fixed recipes first (the reference), then both modes at each budget in the order given: a run cut short
    # keeps what it measured
    for name in args.fixed:
        params = derived_params(name, 0.0, None, args.work)
        for mode in args.modes:
            runs = [worker(mode, params, f"fixed-{name}", seed) for seed in range(args.seeds)]
            results[mode]["fixed"][name] = {
                "params": f"{RECIPES[name].relative_to(ROOT)} with train.budget_s 0 (its fixed epochs)",
                "params_low_res_epochs": yaml.safe_load(params.read_text())["train"]["low_res_epochs"],
                "test_accuracy": stat([r["test_accuracy"] for r in runs]),
                **({"test_accuracy_tta": stat([r["test_accuracy_tta"] for r in runs])}
                   if all("test_accuracy_tta" in r for r in runs) else {}),
                "train_s": stat([r["train_s"] for r in runs]), "runs": runs}
            save_all()
    for budget in args.budgets:
        recipe, cap = recipe_for(budget)
        params = derived_params(recipe, budget, cap, args.work, changes, args.label)
        point = f"{budget:g} {label}".strip()
        digest = params_sha256(params)
        for mode in args.modes:
            described = (f"{RECIPES[recipe].relative_to(ROOT)} with train.budget_s {budget:g}, "
                         f"epochs {yaml.safe_load(params.read_text())['train']['epochs']} (cap)"
                         + "".join(f", {k} {v}" for k, v in changes.items()))
            # --merge keeps the seeds this point already has when its params file is the same byte for byte (a
            # recipe edited since, its arch say, starts the point over): a run cut short, or more seeds, goes on
            kept = results[mode]["budgeted"].get(point, {})
            kept = {r["seed"]: r for r in kept.get("runs", [])} if kept.get("params_sha256") == digest else {}
            runs = merged_runs(kept, args.seeds, partial(worker, mode, params, f"budget-{point.replace(' ', '-')}"))
            if runs:  # --seeds 0: only the peers
                results[mode]["budgeted"][point] = {
                    "params": described, "params_sha256": digest,
                    "test_accuracy": stat([r["test_accuracy"] for r in runs]),
                    **({"test_accuracy_tta": stat([r["test_accuracy_tta"] for r in runs])}
                       if all("test_accuracy_tta" in r for r in runs) else {}),
                    "actual_s": stat([r["budget"]["actual_s"] for r in runs]),
                    "within_5_percent": sum(r["budget"]["actual_s"] <= 1.05 * budget for r in runs),
                    "runs": runs}
            save_all()
            for variant in args.peers if not label else ():
                # the epochs a user would set after timing one: one epoch timed (validation included), then
                # as many as fit in the budget, the schedule over them
                probe = results[mode].setdefault("peer_epoch_s", {}).get(variant)
                if probe is None:
                    probe = peer(mode, variant, math.inf, 1)["epochs"][0]["elapsed_s"]
                    results[mode]["peer_epoch_s"][variant] = round(probe, 2)
                epochs = max(1, math.floor(budget / probe))
                by_budget = results[mode].setdefault("peers", {}).setdefault(variant, {})
                # --merge keeps the seeds this point has run with the same epochs (the same probe)
                kept = {r["seed"]: r for r in peer_runs(by_budget.get(f"{budget:g}")) if r["epochs_planned"] == epochs}
                runs = merged_runs(kept, max(1, args.seeds), partial(peer, mode, variant, budget, epochs))
                by_budget[f"{budget:g}"] = peer_point(PEERS[variant], runs)
                save_all()


def steady_epoch_s(runs: list[dict], after: int = 0) -> float | None:
    """The shortest time between two consecutive epochs' ends past epoch `after` (validation included): an
    epoch once the process has warmed up."""
    gaps = [b["elapsed_s"] - a["elapsed_s"] for run in runs for a, b in zip(run["epochs"], run["epochs"][1:])
            if a["epoch"] >= after]
    return round(min(gaps), 2) if gaps else None


def epoch_time_ratios(res: dict) -> dict:
    """Seconds per full-resolution epoch (validation included) of cnnpipe's fixed fast recipe and of each peer,
    and the peers' over cnnpipe's: engine against engine ("same" augmentation) and against the script users
    write ("users")."""
    fast = res["fixed"].get("fast")
    if not fast:
        return {}
    low_res = int(fast["params_low_res_epochs"]) if "params_low_res_epochs" in fast else 0
    ours = steady_epoch_s(fast["runs"], after=low_res + 1)
    out: dict = {"cnnpipe_epoch_s": ours}
    for variant, by_budget in res.get("peers", {}).items():
        theirs = steady_epoch_s([r for point in by_budget.values() for r in peer_runs(point)]) \
            or res.get("peer_epoch_s", {}).get(variant)
        if ours and theirs:
            out[variant] = {"epoch_s": theirs, "ratio": round(theirs / ours, 2)}
    return out


def merged_runs(kept: dict[int, dict], seeds: int, run: Callable[[int], dict]) -> list[dict]:
    """Seeds 0..seeds-1, each kept run reused and the others run, then every other kept seed: by seed. --merge adds
    seeds to a point, never drops one."""
    for seed in range(seeds):
        if seed not in kept:
            kept[seed] = run(seed)
    return [kept[seed] for seed in sorted(kept)]


def peer_runs(point: dict | None) -> list[dict]:
    """A peer point's runs, one per seed (a point recorded before peers had seeds is its one run, seed 0)."""
    if point is None:
        return []
    return point.get("runs", [point])


def peer_point(what: str, runs: list[dict]) -> dict:
    """A peer's point: its runs and, under the keys a one-run point had, their mean (epochs_run: the most run)."""
    accuracy = stat([r["test_accuracy"] for r in runs])
    return {"what": what, "test_accuracy": accuracy["mean"], "test_accuracy_std": accuracy["std"],
            "seeds": len(runs), "train_s": round(statistics.mean(r["train_s"] for r in runs), 1),
            "train_s_max": max(r["train_s"] for r in runs), "epochs_planned": runs[0]["epochs_planned"],
            "epochs_run": max(r["epochs_run"] for r in runs), "epochs_run_min": min(r["epochs_run"] for r in runs),
            "runs": runs}


def peer_cell(point: dict | None) -> str:
    """A peer point in the table: peer_point's summary (a point recorded before seeds is its one run)."""
    if point is None:
        return "not run"
    seeds, std = point.get("seeds", 1), point.get("test_accuracy_std")
    low, high = point.get("epochs_run_min", point["epochs_run"]), point["epochs_run"]
    return (f"{100 * point['test_accuracy']:.2f}{f' ± {100 * std:.2f}' if std is not None else ''} % "
            f"({seeds} seed{'s' if seeds > 1 else ''}), {low if low == high else f'{low}-{high}'} ep., "
            f"{point.get('train_s_max', point['train_s']):.0f} s")


def codes(runs: list[dict]) -> str:
    """The commits a point's runs ran (benchmarks.harness.code_version), for the table's "code" column."""
    return ", ".join(sorted({run.get("code", "?") for run in runs}))


def save(out: Path, results: dict, threads: int, commands: list[str], load: dict) -> None:
    """The results so far: JSON, markdown table, plot (written after every point: a long run cut short keeps them)."""
    points = sorted({b for res in results.values() for b in res["budgeted"]}, key=lambda k: (float(k.split()[0]), k))
    fixed = sorted({n for res in results.values() for n in res["fixed"]})
    peers = [v for v in PEERS if any(v in res.get("peers", {}) for res in results.values())]
    header = ["CPU mode", "budget", "budgeted: test accuracy (mean ± std)", "with flip TTA", "seeds",
              "actual time (max)",
              "within 5 %", "code", *(f"{n} recipe, fixed epochs: best val by then" for n in fixed),
              *(f"PyTorch peer ({v}): test accuracy, epochs, time" for v in peers)]
    rows = [header, ["---", "---:"] + ["---:"] * (len(header) - 2)]

    def pct(acc: dict | None) -> str:
        if acc is None:
            return "not measured"
        return f"{100 * acc['mean']:.2f}" + (f" ± {100 * acc['std']:.2f}" if acc["std"] is not None else "") + " %"

    for mode, res in results.items():
        for point in points:
            b = float(point.split()[0])
            r = res["budgeted"].get(point)
            if r is None:
                continue
            cells = [mode, f"{b:g} s" + point[len(f"{b:g}"):], pct(r["test_accuracy"]), pct(r.get("test_accuracy_tta")),
                     str(r["test_accuracy"]["n"]), f"{max(run['budget']['actual_s'] for run in r['runs']):.1f} s",
                     f"{r['within_5_percent']}/{r['test_accuracy']['n']}", codes(r["runs"])]
            if "split-" in point:  # the fixed recipes and the peers ran on split 0's tracks, not this draw's
                rows.append([*cells, *("another split" for _ in (*fixed, *peers))])
                continue
            by_then = []
            for n in fixed:
                runs = res["fixed"].get(n, {}).get("runs", [])
                reached = [val_by(run["epochs"], b) for run in runs]
                by_then.append(" / ".join("—" if v is None else f"{100 * v:.2f} %" for v in reached) or "not run")
            rows.append([*cells, *by_then,
                         *(peer_cell(res.get("peers", {}).get(v, {}).get(f"{b:g}")) for v in peers)])
        for n, f in res["fixed"].items():
            rows.append([mode, f"{n} recipe as is", f"(fixed epochs) {pct(f['test_accuracy'])}",
                         pct(f.get("test_accuracy_tta")), str(f["test_accuracy"]["n"]),
                         f"{max(run['train_s'] for run in f['runs']):.1f} s", "—",
                         codes(f["runs"]),
                         *("" for _ in (*fixed, *peers))])
    for res in results.values():
        res["epoch_time_ratios"] = epoch_time_ratios(res)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join("| " + " | ".join(row) + " |" for row in rows) + "\n")
    plot(results, sorted({float(p.split()[0]) for p in points}), out.with_suffix(".png"))
    record(out, {
        "benchmark": "GTSRB test accuracy (whole frames, track-held-out split) against train.budget_s; the fixed "
                     "recipes as they are; actual_s = the trainer's own count of training + validation seconds (from the "
                     "first step: set-up excluded since b9d6be5), "
                     "train_s = the worker's from the start of the train stage (data loading included)",
        "commands": commands, "command": commands[-1], "threads_per_run": threads,
        # every point under one flat name (<mode>_<budget>[_<label>]) a docs placeholder can address
        "points": {f"{mode}_{point.replace(' ', '_')}": {
            "test_accuracy": r["test_accuracy"]["mean"], "test_accuracy_std": r["test_accuracy"]["std"],
            "test_accuracy_tta": r.get("test_accuracy_tta", {}).get("mean"), "seeds": r["test_accuracy"]["n"],
            # frames cropped to their boxes (a point measured or rescored since benchmarks.recipes scored them)
            "test_accuracy_roi": stat([run["test_accuracy_roi"] for run in r["runs"]])["mean"]
            if all("test_accuracy_roi" in run for run in r["runs"]) else None,
            "actual_s_max": max(run["budget"]["actual_s"] for run in r["runs"]),
            "within_5_percent": r["within_5_percent"],
            "epochs_run_min": min(run["epochs_run"] for run in r["runs"]),
            "epochs_run_max": max(run["epochs_run"] for run in r["runs"]),
            # the share of actual_s spent in training steps (runs recorded since the budget records training_s)
            "training_share": stat(shares)["mean"] if (shares := [run["budget"]["training_s"] / run["budget"]["actual_s"]
                                                                  for run in r["runs"] if "training_s" in run["budget"]])
            else None,
            "runs": [{**{k: run[k] for k in ("seed", "test_accuracy", "val_accuracy_kept", "kept_epoch", "epochs_run")},
                      **{k: run[k] for k in ("test_accuracy_tta", "test_errors", "top_confusions", "test_accuracy_roi",
                                             "top_confusions_roi") if k in run},
                      **{k: run["budget"][k] for k in ("training_s", "validation_s", "validations") if k in run["budget"]},
                      "width": run["budget"].get("width")}  # train.budget_min_epochs may have narrowed the net
                     for run in r["runs"]]}
            for mode, res in results.items() for point, r in res["budgeted"].items()},
        "runs_within_5_percent": sum(r["within_5_percent"] for res in results.values()
                                     for r in res["budgeted"].values()),
        "runs_budgeted": sum(r["test_accuracy"]["n"] for res in results.values() for r in res["budgeted"].values()),
        "cpu_flags": machine_info()["cpu_flags"], "results": results,
        "load_average_before": load["before"], "load_average_after": load["after"],
        "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    })


if __name__ == "__main__":
    main()
