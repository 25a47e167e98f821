"""Benchmark: training images/s of the fast recipe's net (fastnet-lcn) on this CPU by memory layout
(channels_last or NCHW), batch size, input resolution and width, in the precision the trainer picks here
(bf16 autocast where the CPU has it natively, fp32 elsewhere): the engine's share of train.channels_last,
train.batch_size, train.low_res and the budget's narrowing (train.budget_min_epochs). Beside it, what the
trainer adds to each step before the net: the recipe's augmentation of a uint8 batch (box crops, the affine
resampling, photometric jitter), the downscale to train.low_res and the normalization.

The real training step (forward, cross-entropy, backward, SGD) on random batches. Every shape's net is built
and warmed up once, then --repeats passes each time a block of --steps steps of every shape in turn, and a
shape's figure is its best block: a VM's speed drifts by a third from one second to the next here, and
passes over the whole grid let a slow spell hit every shape alike. Results go to one file per kind of CPU
(step_shapes_cpu.json with native bf16, step_shapes_avx2_cpu.json without).

    .venv/bin/python -m benchmarks.step_shapes [--steps 10] [--repeats 5]
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.harness import RESULTS, ROOT, load_average, record

from cnnpipe.augment import AugmentPolicy, apply_policy, flip_tables
from cnnpipe.config import AugmentConfig, load_block, read_params
from cnnpipe.data.sources.gtsrb import CLASSES
from cnnpipe.engine.device import autocast, native_bf16, set_threads
from cnnpipe.engine.inference import normalize
from cnnpipe.models import build_model

RECIPE = ROOT / "configs/gtsrb-fast.yaml"
ARCH = "fastnet-lcn"  # its net
WIDTHS = (16, 32)  # the recipe's width and where the budget narrows it to
SIZES = (24, 32)  # train.low_res and the full size
BATCHES = (64, 128, 256)
WARM_UP_STEPS = 5


def training_step(width: int, size: int, batch: int, channels_last: bool, precision: str) -> Callable[[], None]:
    """One SGD step of a fresh net on a fixed random batch of this shape, warmed up."""
    torch.manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(ARCH, 3, 43, 32, width).to(memory_format=layout)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=layout)
    y = torch.randint(0, 43, (batch,))
    mixed, _ = autocast(torch.device("cpu"), precision)

    def step() -> None:
        with mixed():
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(WARM_UP_STEPS):
        step()
    return step


def batch_preparation(size: int, batch: int) -> Callable[[], None]:
    """What the trainer does to a 32x32 uint8 batch before the net: the recipe's augmentation (GTSRB's flips, boxes
    a third of the frame in from its edges), the downscale to `size`, the normalization, channels_last."""
    policy = AugmentPolicy.from_config(load_block(AugmentConfig, "augment", read_params(RECIPE), {}, RECIPE),
                                       flip_tables(CLASSES, "auto"))
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, len(CLASSES), (batch,), generator=g)
    boxes = torch.tensor([[5.0, 5.0, 27.0, 27.0]]).repeat(batch, 1)
    mean, std = torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.25)

    def prepare() -> None:
        x, _ = apply_policy(images.float().div_(255.0), labels, policy, g, boxes)
        if size != 32:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        normalize(x, mean, std).contiguous(memory_format=torch.channels_last)

    for _ in range(WARM_UP_STEPS):
        prepare()
    return prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="default: step_shapes_cpu.json on a CPU with native bf16, "
                                                 "step_shapes_avx2_cpu.json on one without")
    args = parser.parse_args()
    bf16 = native_bf16(torch.device("cpu"))
    precision = "bf16" if bf16 else "fp32"
    out = args.out or RESULTS / ("step_shapes_cpu.json" if bf16 else "step_shapes_avx2_cpu.json")
    threads = set_threads(0)
    load_before = load_average()
    shapes = list(itertools.product(WIDTHS, SIZES, BATCHES, (True, False)))
    steps = {shape: training_step(*shape, precision) for shape in shapes}
    preparations = {(size, batch): batch_preparation(size, batch) for size, batch in itertools.product(SIZES, BATCHES)}
    best = dict.fromkeys(shapes, 0.0)
    fastest_ms = dict.fromkeys(preparations, float("inf"))
    for _ in range(args.repeats):
        for shape in shapes:
            start = time.perf_counter()
            for _ in range(args.steps):
                steps[shape]()
            best[shape] = max(best[shape], args.steps * shape[2] / (time.perf_counter() - start))
        for key, prepare in preparations.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                prepare()
            fastest_ms[key] = min(fastest_ms[key], 1000 * (time.perf_counter() - start) / args.steps)
    rows = [{"width": width, "size": size, "batch": batch,
             "channels_last_images_per_s": round(best[width, size, batch, True]),
             "nchw_images_per_s": round(best[width, size, batch, False]),
             "channels_last_speedup": round(best[width, size, batch, True] / best[width, size, batch, False], 2)}
            for width, size, batch in itertools.product(WIDTHS, SIZES, BATCHES)]
    # against a step of the narrowest net the budget trains (the largest share the preparation can take)
    preparation = [{"size": size, "batch": batch, "ms_per_batch": round(ms, 2),
                    "share_of_width16_step": round(ms / (ms + 1000 * batch / best[min(WIDTHS), size, batch, True]), 3)}
                   for (size, batch), ms in fastest_ms.items()]
    for row in [*rows, *preparation]:
        print(row)
    record(out, {"benchmark": f"{ARCH} training step images/s on CPU by layout, batch and resolution "
                              f"({precision}: what train.precision bf16 gives on this CPU), best of repeats",
                 "arch": ARCH, "precision": precision, "threads": threads, "steps": args.steps,
                 "repeats": args.repeats, "rows": rows,
                 "batch_preparation": {"what": f"{RECIPE.relative_to(ROOT)}'s augmentation of a uint8 32x32 batch, "
                                               "the downscale to size, normalization, channels_last (best ms)",
                                       "rows": preparation},
                 "load_average_before": load_before,
                 "load_average_after": load_average()})


if __name__ == "__main__":
    main()
