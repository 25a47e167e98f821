"""Benchmark: fastnet training on GTSRB from the device path vs the stream path, with an ImageFolder baseline.

One run, side by side, on the real GTSRB training images (configs/gtsrb.yaml's ingest, augment and train
blocks: 32x32 RGB whole frames + boxes, fastnet width 32, batch 128, the box-crop augmentation):
  - device: `cnnpipe train` with train.data_mode device (the split held as one uint8 tensor);
  - stream: the same with train.data_mode stream (WebDataset shards decoded by DataLoader workers, the
    same batched augmentation on the device);
  - baseline: torchvision ImageFolder over the extracted .ppm files + DataLoader workers, per-image
    torchvision v2 transforms (resize, affine, colour jitter), training the same fastnet.
The two paths run alternately (device, stream, device, stream, ...: `--rounds` runs of `--epochs` each), so a
change in the machine's load hits both alike. Reported: training images/s of every epoch of both paths
(train/images_per_s of the stage's history), the ratio of their medians, the validation accuracy of each
path's last run (same epochs, same seed), the loaders' images/s without a model, the baseline's images/s,
and the load average around each measurement: the machine is shared, so the figures are noisy (run it under
`nice -n 19` like every benchmark here).

    nice -n 19 taskset -c 1 .venv/bin/python benchmarks/stream.py --zip /work/shared/data/GTSRB_Final_Training_Images.zip

On a shared machine, pin it to one core (taskset): both paths then get the same CPU budget, the stream
path's loader process included (threads and loader workers follow the affinity), and two OpenMP threads
spinning at barriers against other jobs' processes do not dominate the measurement. Other jobs still take
varying shares of that core, so every run also reports images per CPU-second: the CPU time of the whole
run (training epoch and validation) of this process and of its loader processes, which other jobs' load
does not change; on one dedicated core it is the images/s the run would reach.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import sys
import time
import zipfile
from pathlib import Path

import torch
from torchvision import datasets
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import record  # noqa: E402
from train_throughput import BRIGHTNESS, CONTRAST, ROTATE, SCALE, TRANSLATE, make_model, step  # noqa: E402

from cnnpipe.config import AugmentConfig, IngestConfig, TrainConfig, load_block, read_params  # noqa: E402
from cnnpipe.data.store import read_dataset  # noqa: E402
from cnnpipe.engine.distributed import Dist  # noqa: E402
from cnnpipe.engine.inference import to_nchw_uint8  # noqa: E402
from cnnpipe.engine.loop import DeviceBatches, TrainData  # noqa: E402
from cnnpipe.engine.model_folder import read_history  # noqa: E402
from cnnpipe.engine.stream import StreamBatches  # noqa: E402
from cnnpipe.stages import augment, ingest, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (the loader processes of finished epochs)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def prepare(zip_path: Path, work: Path, params_path: Path) -> tuple[Path, Path, TrainConfig]:
    """GTSRB ingested with shards and augmented, as configs/gtsrb.yaml says (kept in `work` between runs)."""
    params = read_params(params_path)
    processed, augmented = work / "processed", work / "augmented"
    if not (augmented / "manifest.json").exists():
        cfg = dataclasses.replace(load_block(IngestConfig, "ingest", params, {}, params_path), path=str(zip_path),
                                  shards="always")
        start = time.perf_counter()
        ingest.run(cfg=cfg, data=processed, report=work / "ingest_report.json")
        print(f"ingest with shards: {time.perf_counter() - start:.0f} s", file=sys.stderr)
        augment.run(cfg=load_block(AugmentConfig, "augment", params, {}, params_path), data=processed,
                    augmented=augmented)
    return processed, augmented, load_block(TrainConfig, "train", params, {}, params_path)


def train_paths(cfg: TrainConfig, processed: Path, augmented: Path, work: Path, rounds: int) -> dict[str, dict]:
    """Both paths, alternately: the images/s of every epoch, the load averages (1, 5, 15 min) after every run."""
    out = {mode: {"images_per_s_per_epoch": [], "images_per_cpu_s_per_run": [], "load_average_after_runs": []}
           for mode in ("device", "stream")}
    for _ in range(rounds):
        for mode, row in out.items():
            cpu = cpu_seconds()
            result = train.run(cfg=dataclasses.replace(cfg, data_mode=mode), data=processed, augmented=augmented,
                               model=work / f"model-{mode}", tracking=None, checkpoint=None)
            history = read_history(work / f"model-{mode}")
            row["images_per_cpu_s_per_run"].append(round(cfg.epochs * len_train(augmented) / (cpu_seconds() - cpu)))
            row["images_per_s_per_epoch"] += [round(float(r["train/images_per_s"])) for r in history]
            row["load_average_after_runs"].append(load())
            row["val_accuracy"] = round(result["val_accuracy"], 4)
            print(f"{mode}: {row['images_per_s_per_epoch'][-1]} img/s (load {load()[0]})", file=sys.stderr)
    for row in out.values():
        row["images_per_s_median"] = round(statistics.median(row["images_per_s_per_epoch"]))
        row["images_per_cpu_s_median"] = round(statistics.median(row["images_per_cpu_s_per_run"]))
    return out


def len_train(augmented: Path) -> int:
    return read_dataset(augmented, splits=()).manifest["counts"]["train"]["total"]


def loader_only(source, epoch: int = 1) -> float:  # noqa: ANN001 - a BatchSource
    start, seen = time.perf_counter(), 0
    for x, _, _ in source.epoch(epoch):
        seen += len(x)
    return seen / (time.perf_counter() - start)


def baseline(images_root: Path, mean: list[float], std: list[float], batch: int, steps: int, warmup: int,
             workers: int) -> float:
    """Images/s of fastnet trained from an ImageFolder of the original files, transformed per image."""
    transform = v2.Compose([
        v2.ToImage(), v2.Resize((32, 32), antialias=True),
        v2.RandomAffine(degrees=ROTATE, translate=(TRANSLATE, TRANSLATE), scale=(1 - SCALE, 1 + SCALE)),
        v2.ColorJitter(brightness=BRIGHTNESS, contrast=CONTRAST),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std),
    ])
    folder = datasets.ImageFolder(str(images_root), transform=transform)
    loader = torch.utils.data.DataLoader(folder, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                                         persistent_workers=workers > 0)
    model, opt = make_model(len(folder.classes), 32)
    done = 0
    while done < warmup + steps:
        for x, y in loader:
            if done == warmup:
                start = time.perf_counter()
            step(model, opt, x.contiguous(memory_format=torch.channels_last), y)
            done += 1
            if done == warmup + steps:
                break
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zip", type=Path, default=Path("/work/shared/data/GTSRB_Final_Training_Images.zip"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/cnnpipe-stream-bench"), help="datasets, models")
    parser.add_argument("--params", type=Path, default=ROOT / "configs/gtsrb.yaml")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of every training run")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each path, alternated")
    parser.add_argument("--baseline-steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/stream.json")
    args = parser.parse_args()
    if not args.zip.exists():
        sys.exit(f"{args.zip}: not found (the GTSRB training archive)")
    processed, augmented, cfg = prepare(args.zip, args.work, args.params)
    cfg = dataclasses.replace(cfg, epochs=args.epochs, device="cpu")
    start_load = load()
    paths = train_paths(cfg, processed, augmented, args.work, args.rounds)
    print(f"device {paths['device']['images_per_s_median']} img/s, stream {paths['stream']['images_per_s_median']}",
          file=sys.stderr)

    aug = read_dataset(augmented, splits=("train",))
    split = aug.splits["train"]
    device_source = DeviceBatches(TrainData(to_nchw_uint8(split.images, CPU), torch.from_numpy(split.labels),
                                            None, None, None, None,
                                            None if split.boxes is None else torch.from_numpy(split.boxes)),
                                  cfg.batch_size, cfg.seed, Dist())
    stream_source = StreamBatches(augmented, aug.manifest, batch_size=cfg.batch_size, shuffle_buffer=cfg.shuffle_buffer,
                                  workers=cfg.loader_workers, seed=cfg.seed, dist=Dist(), device=CPU)
    loaders = {"device_batches": round(loader_only(device_source)), "stream_batches": round(loader_only(stream_source)),
               "stream_workers": stream_source.workers, "load_average_after": load()}

    images_root = args.work / "images"
    if not images_root.exists():
        with zipfile.ZipFile(args.zip) as z:
            z.extractall(args.work / "extract")
        (args.work / "extract" / "GTSRB" / "Final_Training" / "Images").rename(images_root)
    before = load()
    imagefolder = baseline(images_root, aug.manifest["mean"], aug.manifest["std"], cfg.batch_size, args.baseline_steps,
                           5, workers=2)

    ratio = paths["stream"]["images_per_s_median"] / paths["device"]["images_per_s_median"]
    cpu_ratio = paths["stream"]["images_per_cpu_s_median"] / paths["device"]["images_per_cpu_s_median"]
    record(args.out, {
        "benchmark": f"fastnet w{cfg.width} training on GTSRB ({len(split.labels)} training images 32x32 RGB, "
                     f"batch {cfg.batch_size}, CPU): train.data_mode device vs stream, alternated "
                     f"({len(aug.manifest['shards']['train'])} WebDataset shards), and an ImageFolder + DataLoader "
                     f"baseline; shared machine, noisy figures (load averages recorded)",
        "epochs": args.epochs, "rounds": args.rounds, "load_average_at_start": start_load,
        "device": paths["device"], "stream": paths["stream"],
        "stream_vs_device": round(ratio, 3), "stream_vs_device_per_cpu_s": round(cpu_ratio, 3),
        "target_stream_vs_device": 0.9,
        "loaders_only_images_per_s": loaders,
        "imagefolder_dataloader": {"images_per_s": round(imagefolder), "workers": 2, "steps": args.baseline_steps,
                                   "load_average_before": before, "load_average_after": load()},
        "threads": torch.get_num_threads(), "cpu_affinity": len(os.sched_getaffinity(0)), "gpu": "not measured",
    })


if __name__ == "__main__":
    main()
