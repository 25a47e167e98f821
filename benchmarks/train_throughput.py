"""Benchmark: training throughput of cnnpipe's engine vs a conventional torch DataLoader pipeline.

Both train the same model (fastnet, width 32, channels_last) with the same batch size and SGD on the
real GTSRB training split, with equivalent augmentation:
  - engine: uint8 images held as one tensor, each batch augmented by one batched affine grid +
    photometric jitter (cnnpipe.augment), normalized on the fly;
  - conventional: a Dataset of PIL images, torchvision.transforms.v2 per image (RandomAffine,
    ColorJitter, ToImage, ToDtype, Normalize) in DataLoader workers.
Reported, after a warm-up: images/s of each data pipeline alone (batches produced, no model), and of
training end to end at fastnet widths 32 (the GTSRB recipe) and 16, with the ratios. On 2 CPU cores
the model's own compute bounds the end-to-end ratio; the pipeline-only figures show the data path.

    .venv/bin/python -m benchmarks.train_throughput --data data/gtsrb/processed   # 32x32 RGB processed GTSRB
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from benchmarks.harness import record

from cnnpipe.augment import AugmentPolicy, apply_policy, no_flips
from cnnpipe.data.store import read_dataset
from cnnpipe.engine.inference import normalize, stats_tensors, to_nchw_uint8
from cnnpipe.models import build_model

ROOT = Path(__file__).resolve().parents[1]
TRANSLATE, ROTATE, SCALE, BRIGHTNESS, CONTRAST = 0.1, 10.0, 0.1, 0.3, 0.3


def step(model, opt, x, y):  # noqa: ANN001, ANN201
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def make_model(classes: int, width: int):  # noqa: ANN201
    torch.manual_seed(0)
    model = build_model("fastnet", 3, classes, 32, width).to(memory_format=torch.channels_last)
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)


def engine(images: np.ndarray, labels: np.ndarray, mean, std, batch: int, steps: int, warmup: int,  # noqa: ANN001
           width: int | None) -> float:
    """Images/s of the engine's data path, training a fastnet of `width` (None: no model, data only)."""
    x_all, y_all = to_nchw_uint8(images, torch.device("cpu")), torch.from_numpy(labels)
    m, s = stats_tensors(mean, std, torch.device("cpu"))
    policy = AugmentPolicy(TRANSLATE, ROTATE, SCALE, 0.0, BRIGHTNESS, CONTRAST, 0.0, 0.0, no_flips(43))
    model, opt = make_model(43, width) if width else (None, None)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y_all), generator=g)
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        idx = order[(i * batch) % (len(order) - batch):][:batch]
        x, y = apply_policy(x_all[idx].float().div_(255), y_all[idx], policy, g)
        x = normalize(x, m, s).contiguous(memory_format=torch.channels_last)
        if model is not None:
            step(model, opt, x, y)
    return steps * batch / (time.perf_counter() - start)


class PILDataset(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):  # noqa: ANN001
        self.pils = [Image.fromarray(img) for img in images]
        self.labels, self.transform = labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):  # noqa: ANN204
        return self.transform(self.pils[i]), int(self.labels[i])


def conventional(images: np.ndarray, labels: np.ndarray, mean, std, batch: int, steps: int, warmup: int,  # noqa: ANN001
                 workers: int, width: int | None) -> float:
    transform = v2.Compose([
        v2.RandomAffine(degrees=ROTATE, translate=(TRANSLATE, TRANSLATE), scale=(1 - SCALE, 1 + SCALE)),
        v2.ColorJitter(brightness=BRIGHTNESS, contrast=CONTRAST),
        v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std),
    ])
    loader = torch.utils.data.DataLoader(PILDataset(images, labels, transform), batch_size=batch, shuffle=True,
                                         num_workers=workers, drop_last=True, persistent_workers=workers > 0)
    model, opt = make_model(43, width) if width else (None, None)
    done = 0
    while done < warmup + steps:
        for x, y in loader:
            if done == warmup:
                start = time.perf_counter()
            if model is not None:
                step(model, opt, x.contiguous(memory_format=torch.channels_last), y)
            done += 1
            if done == warmup + steps:
                break
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="processed GTSRB dataset (32x32 RGB)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/train_throughput.json")
    args = parser.parse_args()
    ds = read_dataset(args.data, splits=("train",))
    images, labels = np.asarray(ds.splits["train"].images), np.asarray(ds.splits["train"].labels)
    mean, std = ds.manifest["mean"], ds.manifest["std"]
    rows = {}
    for width in (None, 32, 16):
        label = f"fastnet_w{width}" if width else "data_pipeline_only"
        fast = engine(images, labels, mean, std, args.batch_size, args.steps, args.warmup, width)
        slow = {w: conventional(images, labels, mean, std, args.batch_size, args.steps, args.warmup, w, width)
                for w in (0, 2)}
        rows[label] = {"engine_images_per_s": round(fast),
                       "dataloader_images_per_s": {f"{w}_workers": round(v) for w, v in slow.items()},
                       "ratio_vs_best_dataloader": round(fast / max(slow.values()), 2)}
        print(f"{label}: engine {fast:.0f} img/s, DataLoader {slow[0]:.0f} (0 workers) / {slow[2]:.0f} (2 workers)",
              file=sys.stderr)
    result = {
        "benchmark": f"training throughput, batch {args.batch_size}, channels_last, GTSRB train split 32x32 RGB: "
                     "cnnpipe engine vs DataLoader over PIL images + torchvision v2 per-image transforms",
        **rows,
        "steps": args.steps, "warmup_steps": args.warmup, "threads": torch.get_num_threads(),
    }
    record(args.out, result)


if __name__ == "__main__":
    main()
