"""Benchmark: fastnet training on GTSRB from the device path vs the stream path, with an ImageFolder baseline.

One run, side by side, on the real GTSRB training images (configs/gtsrb.yaml's ingest, augment and train
blocks: 32x32 RGB whole frames + boxes, fastnet width 32, batch 128, the box-crop augmentation):
  - device: `cnnpipe train` with train.data_mode device (the split held as one uint8 tensor);
  - stream: the same with train.data_mode stream (WebDataset shards decoded by DataLoader workers, the
    same batched augmentation on the device);
  - baseline: torchvision ImageFolder over the extracted .ppm files + DataLoader workers, per-image
    torchvision v2 transforms (resize, affine, colour jitter), training the same fastnet.
Then torchvision/resnet18 at 224 px (the issue's "the loader is never the bottleneck"): GTSRB frames squashed up
to 224 x 224 (`--per-class-224` of every class, shards of 256 images, the recipe's policy), batch 64, the
recipe's precision: the stream loader alone (StreamBatches plus the loop's augmentation, no model), the model
alone (forward, backward, SGD step on a batch already on the device) and one epoch through the real train stage
with train.data_mode stream, each as images/s and images per CPU-second (the loader's count includes its
worker processes: on a machine whose cores the loader and the model share, images per CPU-second says how much
of the CPU the loader needs to keep up). Also: the loader's start-up per epoch (first batch of the first epoch,
new worker processes, against later epochs', persistent ones) and read_shard's CPU time per image.
The two paths run alternately (device, stream, device, stream, ...: `--rounds` runs of `--epochs` each), so a
change in the machine's load hits both alike. Reported: training images/s of every epoch of both paths
(train/images_per_s of the stage's history), the ratio of their medians, the validation accuracy of each
path's last run (same epochs, same seed), the loaders' images/s without a model, the baseline's images/s,
and the load average around each measurement: the machine is shared, so the figures are noisy (run it under
the machine-wide benchmark lock, so no other benchmark runs at the same time, as below).

    flock /tmp/cnnpipe-bench.lock nice -n 5 taskset -c 1 .venv/bin/python -m benchmarks.stream

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
import gc
import io
import json
import os
import resource
import statistics
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import datasets
from torchvision.transforms import v2

from benchmarks.harness import load_average, record
from benchmarks.train_throughput import BRIGHTNESS, CONTRAST, ROTATE, SCALE, TRANSLATE, make_model, step

from cnnpipe.augment.policy import POLICY_FILE, AugmentPolicy, apply_policy
from cnnpipe.config import AugmentConfig, IngestConfig, TrainConfig, load_block, read_params
from cnnpipe.data.shards import read_shard, shard_list
from cnnpipe.data.store import Split, read_dataset, write_dataset
from cnnpipe.engine.device import autocast
from cnnpipe.engine.distributed import Dist
from cnnpipe.engine.inference import normalize, stats_tensors, to_nchw_uint8
from cnnpipe.engine.loop import DeviceBatches, TrainData
from cnnpipe.engine.model_folder import read_history
from cnnpipe.engine.stream import StreamBatches
from cnnpipe.models import build_model
from cnnpipe.stages import augment, ingest, train

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


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
            row["load_average_after_runs"].append(load_average())
            row["val_accuracy"] = round(result["val_accuracy"], 4)
            print(f"{mode}: {row['images_per_s_per_epoch'][-1]} img/s (load {load_average()[0]})", file=sys.stderr)
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


def loader_start(augmented: Path, manifest: dict, cfg: TrainConfig, repeats: int = 3) -> dict[str, float]:
    """Seconds from asking for an epoch to its first batch (buffer 0: one shard decoded), medians of `repeats`:
    with new loader processes (a new source's first epoch) and with persistent ones (a source's later epochs);
    the difference is the start-up every epoch paid when the loader was made anew per epoch."""
    def first_batch(source: StreamBatches, epoch: int) -> float:
        start = time.perf_counter()
        batches = source.epoch(epoch)
        next(batches)
        seconds = time.perf_counter() - start
        for _ in batches:  # the whole epoch, as in training: no shard left in flight for the next one to wait on
            pass
        return seconds

    def new_source() -> StreamBatches:
        return StreamBatches(augmented, manifest, batch_size=cfg.batch_size, shuffle_buffer=0,
                             workers=cfg.loader_workers, seed=cfg.seed, dist=Dist(), device=CPU)

    new = statistics.median(first_batch(new_source(), 1) for _ in range(repeats))
    kept = new_source()
    first_batch(kept, 1)
    persistent = statistics.median(first_batch(kept, epoch) for epoch in range(2, repeats + 2))
    return {"new_workers_s": round(new, 3), "persistent_workers_s": round(persistent, 3),
            "start_up_saved_per_epoch_s": round(new - persistent, 3)}


def decode_us_per_image(base: Path, manifest: dict) -> float:
    """CPU microseconds per image of read_shard (fetch, sha256, untar, PNG decode) on the first training shard."""
    shard = shard_list(manifest, "train", str(base))[0]
    side, channels = manifest["image_size"], manifest["channels"]
    start = time.process_time()
    read_shard(base, shard, shape=(side, side, channels), num_classes=manifest["num_classes"],
               boxes=bool(manifest.get("boxes")))
    return round((time.process_time() - start) * 1e6 / shard.count, 1)


def gtsrb_224(zip_path: Path, work: Path, per_class: int, shard_images: int) -> tuple[Path, Path]:
    """`per_class` GTSRB training frames of every class (evenly spaced through the class's files) squashed up to
    224 x 224, plus 4 validation and 1 test frame per class, as a processed dataset with shards and its
    augmented copy (configs/gtsrb.yaml's policy; no boxes). Kept in `work` between runs."""
    processed, augmented = work / "processed-224", work / "augmented-224"
    if (augmented / "manifest.json").exists():
        return processed, augmented
    with zipfile.ZipFile(zip_path) as z:
        files: dict[str, list[str]] = {}
        for name in sorted(n for n in z.namelist() if n.endswith(".ppm")):
            files.setdefault(Path(name).parent.name, []).append(name)
        classes = sorted(files)
        parts: dict[str, tuple[list[np.ndarray], list[int]]] = {"train": ([], []), "val": ([], []), "test": ([], [])}
        for label, cls in enumerate(classes):
            picked = files[cls][::max(1, len(files[cls]) // (per_class + 5))][:per_class + 5]
            for i, name in enumerate(picked):
                split = "train" if i < per_class else "val" if i < per_class + 4 else "test"
                image = Image.open(io.BytesIO(z.read(name))).convert("RGB").resize((224, 224), Image.BILINEAR)
                parts[split][0].append(np.asarray(image))
                parts[split][1].append(label)
    splits = {k: Split(np.stack(images), np.array(labels, np.int64)) for k, (images, labels) in parts.items()}
    write_dataset(processed, classes, splits, {"source": {"name": "gtsrb-224", "path": str(zip_path), "inputs": []}},
                  shard_images=shard_images)
    params_path = ROOT / "configs/gtsrb.yaml"
    augment.run(cfg=load_block(AugmentConfig, "augment", read_params(params_path), {}, params_path), data=processed,
                augmented=augmented)
    return processed, augmented


def stream_alone(augmented: Path, cfg: TrainConfig) -> dict[str, float]:
    """One epoch of StreamBatches with the training loop's augmentation and normalization, no model: images/s
    and images per CPU-second (this process and its loader processes, reaped before the count)."""
    manifest = read_dataset(augmented, splits=()).manifest
    policy = AugmentPolicy.from_dict(json.loads((augmented / POLICY_FILE).read_text()), str(augmented / POLICY_FILE))
    mean, std = stats_tensors(manifest["mean"], manifest["std"], CPU)
    source = StreamBatches(augmented, manifest, batch_size=cfg.batch_size, shuffle_buffer=cfg.shuffle_buffer,
                           workers=cfg.loader_workers, seed=cfg.seed, dist=Dist(), device=CPU)
    g = torch.Generator().manual_seed(0)
    cpu, start, seen = cpu_seconds(), time.perf_counter(), 0
    for images, y, boxes in source.epoch(1):
        x, y = apply_policy(images.float().div_(255.0), y, policy, g, boxes)
        normalize(x, mean, std)
        seen += len(y)
    seconds = time.perf_counter() - start
    workers = source.workers
    del source
    gc.collect()  # the loader processes exit and are reaped: their CPU time counts
    return {"images_per_s": round(seen / seconds, 1), "images_per_cpu_s": round(seen / (cpu_seconds() - cpu), 1),
            "loader_workers": workers}


def model_alone(arch: str, classes: int, size: int, batch: int, precision: str, steps: int, warmup: int) -> dict:
    """Forward, backward and SGD step on a synthetic batch already on the device: images/s and per CPU-second."""
    torch.manual_seed(0)
    model = build_model(arch, 3, classes, size, 0).to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    mixed, used = autocast(CPU, precision)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,))
    for i in range(warmup + steps):
        if i == warmup:
            cpu, start = cpu_seconds(), time.perf_counter()
        with mixed():
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {"images_per_s": round(steps * batch / (time.perf_counter() - start), 1),
            "images_per_cpu_s": round(steps * batch / (cpu_seconds() - cpu), 1), "precision": used, "steps": steps}


def resnet18_224(args: argparse.Namespace, cfg: TrainConfig) -> dict:
    """torchvision/resnet18 at 224 px: the stream loader alone, the model alone, and training through the stream
    path (the real train stage, one epoch)."""
    processed, augmented = gtsrb_224(args.zip, args.work, args.per_class_224, shard_images=256)
    cfg = dataclasses.replace(cfg, arch="torchvision/resnet18", batch_size=64, lr=0.05, epochs=1, data_mode="stream",
                              shuffle_buffer=1024)
    manifest = read_dataset(augmented, splits=()).manifest
    before = load_average()
    loader = {**stream_alone(augmented, cfg), "decode_us_per_image": decode_us_per_image(augmented, manifest)}
    model = model_alone(cfg.arch, manifest["num_classes"], 224, cfg.batch_size, cfg.precision, args.model_steps_224, 2)
    cpu = cpu_seconds()
    train.run(cfg=cfg, data=processed, augmented=augmented, model=args.work / "model-resnet18-224", tracking=None,
              checkpoint=None)
    trained = manifest["counts"]["train"]["total"]
    training = {"images_per_s": round(float(read_history(args.work / "model-resnet18-224")[-1]["train/images_per_s"]), 1),
                "images_per_cpu_s": round(trained / (cpu_seconds() - cpu), 1)}
    return {"train_images": trained, "shard_images": 256, "batch_size": cfg.batch_size,
            "shuffle_buffer": cfg.shuffle_buffer, "stream_loader_alone": loader, "model_alone": model,
            "training_through_stream": training,
            "loader_vs_model": round(loader["images_per_s"] / model["images_per_s"], 2),
            "loader_vs_model_per_cpu_s": round(loader["images_per_cpu_s"] / model["images_per_cpu_s"], 2),
            "training_vs_model": round(training["images_per_s"] / model["images_per_s"], 3),
            "load_average_before": before, "load_average_after": load_average()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zip", type=Path, default=Path("/work/shared/data/GTSRB_Final_Training_Images.zip"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/cnnpipe-stream-bench"),
                        help="datasets, models; kept between runs, so remove it when ingest's shards change")
    parser.add_argument("--params", type=Path, default=ROOT / "configs/gtsrb.yaml")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of every training run")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each path, alternated")
    parser.add_argument("--baseline-steps", type=int, default=60)
    parser.add_argument("--per-class-224", type=int, default=16, help="training frames per class of the 224 px set")
    parser.add_argument("--model-steps-224", type=int, default=4, help="timed steps of resnet18 alone")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/stream.json")
    args = parser.parse_args()
    if not args.zip.exists():
        sys.exit(f"{args.zip}: not found (the GTSRB training archive)")
    processed, augmented, cfg = prepare(args.zip, args.work, args.params)
    cfg = dataclasses.replace(cfg, epochs=args.epochs, device="cpu")
    start_load = load_average()
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
               "stream_workers": stream_source.workers, "load_average_after": load_average()}
    del stream_source
    start_up = loader_start(augmented, aug.manifest, cfg)
    loaders["decode_us_per_image"] = decode_us_per_image(augmented, aug.manifest)

    images_root = args.work / "images"
    if not images_root.exists():
        with zipfile.ZipFile(args.zip) as z:
            z.extractall(args.work / "extract")
        (args.work / "extract" / "GTSRB" / "Final_Training" / "Images").rename(images_root)
    before = load_average()
    imagefolder = baseline(images_root, aug.manifest["mean"], aug.manifest["std"], cfg.batch_size, args.baseline_steps,
                           5, workers=2)
    resnet = resnet18_224(args, cfg)

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
        "loader_start": start_up,
        "resnet18_224": resnet,
        "imagefolder_dataloader": {"images_per_s": round(imagefolder), "workers": 2, "steps": args.baseline_steps,
                                   "load_average_before": before, "load_average_after": load_average()},
        "threads": torch.get_num_threads(), "cpu_affinity": len(os.sched_getaffinity(0)), "gpu": "not measured",
    })


if __name__ == "__main__":
    main()
