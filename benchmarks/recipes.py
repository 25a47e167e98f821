"""Benchmark: cnnpipe's GTSRB recipes over several seeds (run-to-run variance, as airbench reports it).

Each recipe (configs/gtsrb-fast.yaml, configs/gtsrb.yaml) trains in its own process on one split of the
real GTSRB training set (ingest once: whole frames + boxes, val and test held out by track), with
train.seed and augment.seed set to each seed. Per run: the time from the start of the train stage to the
end of each epoch's validation (so validation is counted), validation accuracy per epoch, the test
accuracy of the kept model on whole frames (the served protocol), training seconds and peak RSS of the
process. Summary per recipe: mean +- std (sample) over seeds, and the time to 95 / 98 / 98.84 % val.

    .venv/bin/python -m benchmarks.recipes [--seeds 5] [--recipes fast default]

`run_worker` / `spawn` are shared with benchmarks/peers.py (the same measurement for every contender).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.harness import load_average, record, run

ROOT = Path(__file__).resolve().parents[1]
GTSRB_ZIP = ROOT.parent / "shared/data/GTSRB_Final_Training_Images.zip"
RECIPES = {"fast": ROOT / "configs/gtsrb-fast.yaml", "default": ROOT / "configs/gtsrb.yaml"}
THRESHOLDS = (0.95, 0.98, 0.9884)  # 98.84 %: human accuracy on GTSRB (Stallkamp et al. 2012)


def spawn(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run a worker process (in `cwd`: another checkout's benchmarks); its JSON lines on stdout are epochs ({"epoch",
    "elapsed_s", "val_accuracy"}) and a last one with the final scores. Returns the final record with "epochs" and
    "peak_rss_mb" added."""
    epochs, final = [], []

    def on_line(line: str) -> None:
        if not line.startswith("{"):
            return
        record_ = json.loads(line)
        if "epoch" in record_:
            epochs.append(record_)
            val = record_["val_accuracy"]  # None: an epoch train.val_every skips, or train.train_on_val
            print(f"  {cmd[-1] if len(cmd) > 1 else ''} epoch {record_['epoch']}: val "
                  f"{'-' if val is None else f'{val:.4f}'} at {record_['elapsed_s']:.1f} s", file=sys.stderr, flush=True)
        else:
            final.append(record_)

    measured = run(cmd, env={**os.environ, **(env or {})}, on_line=on_line, stderr_to_terminal=True, cwd=cwd)
    if not final:
        sys.exit(f"worker printed no result: {' '.join(cmd)}")
    return {**final[-1], "epochs": epochs, "peak_rss_mb": measured.peak_group_rss_mb, "time_to_val": time_to(epochs)}


def time_to(epochs: list[dict]) -> dict[str, float | None]:
    """Seconds until validation accuracy first reached each threshold (None: never)."""
    return {f"{t:.2%}": next((round(e["elapsed_s"], 1) for e in epochs
                              if e["val_accuracy"] is not None and e["val_accuracy"] >= t), None)
            for t in THRESHOLDS}


def prepare(zip_path: Path, work: Path, split_seed: int = 0) -> Path:
    """Ingest GTSRB once with the recipes' shared ingest block (its tracks split with `split_seed`); returns the
    processed dataset folder."""
    suffix = f"-split-{split_seed}" if split_seed else ""
    processed = work / f"processed{suffix}"
    if not (processed / "manifest.json").exists():
        cmd = [str(Path(sys.executable).parent / "cnnpipe"), "ingest", "--params", str(RECIPES["default"]),
               "--path", str(zip_path), "--out", str(processed), "--seed", str(split_seed),
               "--report", str(work / f"ingest_report{suffix}.json")]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return processed


def test_outputs(model: Path, processed: Path,
                 crops: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """The model folder `model`'s class probabilities on `processed`'s test split, without and with flip TTA (what
    evaluate scores as *_tta), and the split's labels: whole frames, the served protocol. With `crops`, also on each
    frame cropped to its sign's box by the server's own preprocessing (evaluate's test_roi), without TTA; None when
    the split has no boxes. The model is loaded and the split read once."""
    import torch

    from cnnpipe.calibration import tta_probabilities
    from cnnpipe.data.store import read_dataset
    from cnnpipe.engine.checkpoint import load_model
    from cnnpipe.engine.inference import predict_logits, stats_tensors, to_nchw_uint8
    from cnnpipe.engine.model_folder import CONFIG_FILE, MODEL_FILE
    from cnnpipe.engine.predictor import Predictor
    from cnnpipe.imaging import as_requests

    net, spec = load_model(model / MODEL_FILE)
    test = read_dataset(processed, splits=("test",)).splits["test"]
    device = torch.device("cpu")
    mean, std = stats_tensors(spec.mean, spec.std, device)

    def probs_of(x: torch.Tensor) -> torch.Tensor:
        return predict_logits(net, x, mean, std).softmax(1)
    images = to_nchw_uint8(test.images, device)
    flips = json.loads((model / CONFIG_FILE).read_text()).get("flips")
    cropped = None
    if crops and test.boxes is not None:
        frames = Predictor(net, spec, device).preprocess(as_requests(test.images, test.boxes))
        cropped = probs_of(to_nchw_uint8(frames, device)).numpy()
    return (probs_of(images).numpy(), tta_probabilities(probs_of, images, flips).numpy(), np.asarray(test.labels),
            cropped)


def probabilities_on_test(model: Path, processed: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Whole frames only: test_outputs without the crops."""
    return test_outputs(model, processed)[:3]


def errors(probs: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy of `probs`' argmax, and where the errors are: a GTSRB track is 30 frames of one sign, so one misread
    track is 30 errors of one (true, predicted) pair."""
    predicted = probs.argmax(1)
    pairs = Counter(zip(labels.tolist(), predicted.tolist()))
    return {"accuracy": round(float((predicted == labels).mean()), 5), "errors": int((predicted != labels).sum()),
            "top_confusions": [[true, pred, n] for (true, pred), n in pairs.most_common() if true != pred][:3]}


def score(model: Path, processed: Path) -> dict:
    """Test accuracy of the model folder `model` on `processed`'s test split (whole frames), without and with flip
    TTA, and where its errors are; then on the frames cropped to their boxes (what a user who crops sends), without
    TTA, and its errors there."""
    probs, tta, labels, cropped = test_outputs(model, processed, crops=True)
    plain = errors(probs, labels)
    scored = {"test_accuracy": plain["accuracy"], "test_accuracy_tta": errors(tta, labels)["accuracy"],
              "test_errors": plain["errors"], "top_confusions": plain["top_confusions"]}
    if cropped is None:  # no boxes: no crops to score
        return scored
    roi = errors(cropped, labels)
    return {**scored, "test_accuracy_roi": roi["accuracy"], "top_confusions_roi": roi["top_confusions"]}


def run_worker(params: Path, processed: Path, work: Path, seed: int) -> None:
    """In this process: augment + train `params` with `seed` on `processed`, print epochs, then test accuracy."""
    from cnnpipe.config import AugmentConfig, TrainConfig, load_block, read_params
    from cnnpipe.stages import augment, train

    raw = read_params(params)
    seeded = {"seed": seed}
    threads = {"threads": int(os.environ["CNNPIPE_BENCH_THREADS"])} if "CNNPIPE_BENCH_THREADS" in os.environ else {}
    t0 = time.perf_counter()
    augment.run(cfg=load_block(AugmentConfig, "augment", raw, seeded, params), data=processed,
                augmented=work / "augmented")
    t_train = time.perf_counter()

    def on_epoch(stats: dict[str, float]) -> None:
        print(json.dumps({"epoch": int(stats["epoch"]), "elapsed_s": time.perf_counter() - t_train,
                          "val_accuracy": stats.get("val/accuracy")}), flush=True)

    cfg = load_block(TrainConfig, "train", raw, {**seeded, **threads}, params)
    out = train.run(cfg=cfg, data=processed, augmented=work / "augmented", model=work / "model", tracking=None,
                    on_epoch=on_epoch)
    train_s = time.perf_counter() - t_train
    val = out["val_accuracy"]  # None: train.train_on_val
    print(json.dumps({**score(work / "model", processed), "val_accuracy_kept": None if val is None else round(val, 5),
                      "kept_epoch": out["kept_epoch"], "epochs_run": out["epochs"], "train_s": round(train_s, 1),
                      "augment_s": round(t_train - t0, 1), "budget": out.get("budget")}), flush=True)


def summarize(runs: list[dict]) -> dict:
    def stat(values: list[float]) -> dict:
        return {"mean": round(statistics.mean(values), 5),
                "std": round(statistics.stdev(values), 5) if len(values) > 1 else None,
                "min": min(values), "max": max(values)}

    out = {"n": len(runs), "test_accuracy": stat([r["test_accuracy"] for r in runs]),
           "train_s": stat([r["train_s"] for r in runs]),
           "peak_rss_mb": stat([r["peak_rss_mb"] for r in runs])}
    for t in THRESHOLDS:
        key = f"{t:.2%}"
        times = [r["time_to_val"][key] for r in runs]
        reached = [x for x in times if x is not None]
        out[f"time_to_val_{key}"] = {**(stat(reached) if reached else {}), "reached": f"{len(reached)}/{len(runs)}"}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zip", type=Path, default=GTSRB_ZIP)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--recipes", nargs="+", default=["fast", "default"], choices=sorted(RECIPES))
    parser.add_argument("--parallel", type=int, default=1,
                        help="runs at a time, sharing the cores (accuracy is unaffected; times then are not quiet)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cnnpipe-recipes"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/recipes_gtsrb.json")
    parser.add_argument("--worker", nargs=4, metavar=("PARAMS", "PROCESSED", "WORK", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument("--score", nargs=2, metavar=("MODEL", "PROCESSED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.score:
        print(json.dumps(score(Path(args.score[0]), Path(args.score[1]))), flush=True)
        return
    if args.worker:
        params, processed, work, seed = args.worker
        run_worker(Path(params), Path(processed), Path(work), int(seed))
        return
    if not args.zip.exists():
        sys.exit(f"GTSRB zip not found: {args.zip}")
    load_before = load_average()
    processed = prepare(args.zip, args.work)
    results = {}
    threads = max(1, len(os.sched_getaffinity(0)) // args.parallel)
    for name in args.recipes:
        def one(seed: int, name: str = name) -> dict:
            print(f"{name}: seed {seed}", file=sys.stderr, flush=True)
            return {"seed": seed, **spawn([sys.executable, "-m", "benchmarks.recipes", "--worker", str(RECIPES[name]),
                                           str(processed), str(args.work / f"{name}-{seed}"), str(seed)],
                                          env={"CNNPIPE_BENCH_THREADS": str(threads)})}

        with ThreadPoolExecutor(args.parallel) as pool:
            runs = list(pool.map(one, range(args.seeds)))
        results[name] = {"params": str(RECIPES[name].relative_to(ROOT)), "summary": summarize(runs), "runs": runs}
    rows = ["| recipe | runs | test accuracy (mean ± std) | min – max | to 98.84 % val | training time |",
            "|---|---:|---:|---:|---:|---:|"]
    for r in results.values():
        m = r["summary"]
        acc, reach, train_s = m["test_accuracy"], m["time_to_val_98.84%"], m["train_s"]
        reached = f"{reach['mean']:.0f} s ({reach['reached']} runs)" if "mean" in reach else f"never (0/{m['n']})"
        rows.append(f"| {r['params']} | {m['n']} | {100 * acc['mean']:.2f} ± {100 * (acc['std'] or 0):.2f} % | "
                    f"{100 * acc['min']:.2f} – {100 * acc['max']:.2f} % | {reached} | {train_s['mean']:.0f} s |")
    args.out.with_suffix(".md").write_text("\n".join(rows) + "\n")
    record(args.out, {
        "benchmark": "GTSRB recipes over seeds: augment + train in one process per run; test = the track-held-out "
                     "split on whole frames (served protocol); times from the start of train to the end of each "
                     "epoch's validation",
        "seeds": args.seeds, "parallel_runs": args.parallel, "threads_per_run": threads, "results": results,
        "load_average_before": load_before, "load_average_after": load_average(),
    })


if __name__ == "__main__":
    main()
