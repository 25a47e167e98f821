"""Benchmark: training images/s of the fast recipe's net on this CPU by memory layout (channels_last or NCHW),
batch size, input resolution and width, in the precision the trainer picks here (bf16 autocast where the CPU
has it natively, fp32 elsewhere): the engine's share of train.channels_last, train.batch_size, train.low_res
and the budget's narrowing (train.budget_min_epochs). Beside it, what the trainer does to a batch before the
net: the recipe's augmentation of a uint8 batch (flips, box crops and the affine map in one resampling,
photometric jitter), the downscale to train.low_res and the normalization. And the trainer's whole step at the
recipe's batch (cnnpipe.engine.loop.fit on random uint8 images with boxes: preparation, step, EMA update,
scheduler, running metrics), in the same passes as the bare steps, against the bare step and the preparation:
what the trainer adds.

The bare training step (forward, cross-entropy, backward, SGD; not the trainer's EMA update, scheduler step
and running metrics) on random batches. Every shape's net is built and warmed up once, then --repeats passes
each time a block of --images images (whole batches) of every shape in turn, the two layouts in alternating
order; a shape's figure is its best block. Blocks of the same number of images last about as long as the shape
is slow, so a short block of a fast shape gets no better odds of a quiet spell: a VM's speed drifts by up to a
third from one second to the next here. Results go to one file per kind of CPU (step_shapes_cpu.json with
native bf16, step_shapes_avx2_cpu.json without).

    flock /tmp/cnnpipe-bench.lock .venv/bin/python -m benchmarks.step_shapes [--images 1280] [--repeats 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.harness import RESULTS, ROOT, load_average, record

from cnnpipe.augment import AugmentPolicy, apply_policy, flip_tables
from cnnpipe.config import AugmentConfig, TrainConfig, load_block, read_params
from cnnpipe.data.sources.gtsrb import CLASSES
from cnnpipe.engine.device import autocast, set_threads
from cnnpipe.engine.inference import normalize
from cnnpipe.engine.loop import TrainData, fit
from cnnpipe.models import build_model

RECIPE = ROOT / "configs/gtsrb-fast.yaml"
WIDTHS = (16, 32)  # where the budget narrows the recipe's net to, and its own width
SIZES = (24, 32)  # train.low_res and the full size
BATCHES = (64, 128, 256)
WARM_UP_STEPS = 5
CPU = torch.device("cpu")


def training_step(arch: str, width: int, size: int, batch: int, channels_last: bool,
                  precision: str) -> Callable[[], None]:
    """One SGD step of a fresh net on a fixed random batch of this shape, warmed up."""
    torch.manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(arch, 3, len(CLASSES), 32, width).to(memory_format=layout)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=layout)
    y = torch.randint(0, len(CLASSES), (batch,))
    mixed, _ = autocast(CPU, precision)

    def step() -> None:
        with mixed():
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(WARM_UP_STEPS):
        step()
    return step


def batch_preparation(policy: AugmentPolicy, size: int, batch: int) -> Callable[[], None]:
    """What the trainer does to a 32x32 uint8 batch before the net: the augmentation (every box 5 px in from the
    frame's edges, as GTSRB's are), the downscale to `size`, the normalization, channels_last."""
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


def trainer_step_s(train: TrainConfig, policy: AugmentPolicy, width: int, size: int, steps: int) -> float:
    """Seconds per step of the trainer's own loop (fit, no budget) at this width and size: its second epoch (the
    first creates the kernels) of `steps` steps on random uint8 images, every box 5 px in."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n = steps * train.batch_size

    def images(count: int) -> torch.Tensor:
        return torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=g)

    def labels(count: int) -> torch.Tensor:
        return torch.randint(0, len(CLASSES), (count,), generator=g)

    data = TrainData(images(n), labels(n), images(train.batch_size), labels(train.batch_size),
                     torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.25),
                     torch.tensor([[5.0, 5.0, 27.0, 27.0]]).repeat(n, 1))
    low_res = size if size != 32 else 0
    cfg = dataclasses.replace(train, budget_s=0.0, epochs=2, width=width, low_res=low_res,
                              low_res_epochs=2 if low_res else 0, early_stopping_patience=0)
    history = fit(build_model(cfg.arch, 3, len(CLASSES), 32, width), data, cfg, policy).history
    return history[1]["train/epoch_seconds"] / steps


def best_block_s(fn: Callable[[], None], calls: int, best: float) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return min(best, time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1280, help="per timed block (rounded up to whole batches)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="default: step_shapes_cpu.json on a CPU with native bf16, "
                                                 "step_shapes_avx2_cpu.json on one without")
    args = parser.parse_args()
    params = read_params(RECIPE)
    train = load_block(TrainConfig, "train", params, {}, RECIPE)
    policy = AugmentPolicy.from_config(load_block(AugmentConfig, "augment", params, {}, RECIPE),
                                       flip_tables(CLASSES, "auto"))
    _, precision = autocast(CPU, train.precision)  # what the recipe trains in on this CPU
    out = args.out or RESULTS / ("step_shapes_cpu.json" if precision == "bf16" else "step_shapes_avx2_cpu.json")
    threads = set_threads(0)
    load_before = load_average()

    def calls(batch: int) -> int:
        return -(-args.images // batch)

    shapes = list(itertools.product(WIDTHS, SIZES, BATCHES))
    steps = {(*shape, layout): training_step(train.arch, *shape, layout, precision)
             for shape in shapes for layout in (True, False)}
    preparations = {(size, batch): batch_preparation(policy, size, batch)
                    for size, batch in itertools.product(SIZES, BATCHES)}
    step_s = dict.fromkeys(steps, float("inf"))
    trainer_s = dict.fromkeys(itertools.product(WIDTHS, SIZES), float("inf"))
    preparation_s = dict.fromkeys(preparations, float("inf"))
    for repeat in range(args.repeats):
        for shape in shapes:
            for layout in (True, False) if repeat % 2 == 0 else (False, True):
                key = (*shape, layout)
                step_s[key] = best_block_s(steps[key], calls(shape[2]), step_s[key])
        for key, prepare in preparations.items():
            preparation_s[key] = best_block_s(prepare, calls(key[1]), preparation_s[key])
        # in the same passes as the bare steps: separate runs of this VM differ by ~10 %
        for width, size in trainer_s:
            trainer_s[width, size] = min(trainer_s[width, size],
                                         trainer_step_s(train, policy, width, size, calls(train.batch_size)))

    def images_per_s(width: int, size: int, batch: int, channels_last: bool) -> float:
        return calls(batch) * batch / step_s[width, size, batch, channels_last]

    rows = [{"width": width, "size": size, "batch": batch,
             "channels_last_images_per_s": round(images_per_s(width, size, batch, True)),
             "nchw_images_per_s": round(images_per_s(width, size, batch, False)),
             "channels_last_speedup": round(step_s[width, size, batch, False] / step_s[width, size, batch, True], 2)}
            for width, size, batch in shapes]
    preparation_rows = []
    for (size, batch), seconds in preparation_s.items():
        ms = 1000 * seconds / calls(batch)
        # against a step of the narrowest net the budget trains (the largest share the preparation can take)
        step_ms = 1000 * batch / images_per_s(min(WIDTHS), size, batch, True)
        preparation_rows.append({"size": size, "batch": batch, "ms_per_batch": round(ms, 2),
                                 "share_of_width16_step": round(ms / (ms + step_ms), 3)})
    trainer_rows = []
    for (width, size), seconds in trainer_s.items():
        batch = train.batch_size
        step_ms = 1000 * seconds
        bare_ms = 1000 * batch / images_per_s(width, size, batch, train.channels_last)
        prepare_ms = 1000 * preparation_s[size, batch] / calls(batch)
        trainer_rows.append({"width": width, "size": size, "batch": batch, "trainer_ms_per_step": round(step_ms, 1),
                             "bare_step_ms": round(bare_ms, 1), "preparation_ms": round(prepare_ms, 1),
                             "rest_share": round((step_ms - bare_ms - prepare_ms) / step_ms, 3)})
    for row in [*rows, *preparation_rows, *trainer_rows]:
        print(row)
    record(out, {"benchmark": f"{train.arch} training step images/s on CPU by layout, width, resolution and batch "
                              f"({precision}: what train.precision {train.precision} gives on this CPU), best block",
                 "arch": train.arch, "precision": precision, "threads": threads, "images_per_block": args.images,
                 "repeats": args.repeats, "rows": rows,
                 "batch_preparation": {"what": f"{RECIPE.relative_to(ROOT)}'s augmentation of a uint8 32x32 batch, "
                                               "the downscale to size, normalization, channels_last (best block)",
                                       "rows": preparation_rows},
                 "trainer": {"what": "the trainer's step at the recipe's batch (cnnpipe.engine.loop.fit, no budget, "
                                     f"in each of the {args.repeats} passes a fresh run's second epoch of "
                                     f"{calls(train.batch_size) * train.batch_size} images, the first creating the "
                                     "kernels; best pass) against the bare step and the preparation above; "
                                     "rest_share: the trainer's other work (each epoch's shuffle, the batches' "
                                     "gather, EMA update, scheduler, running metrics) and the noise between "
                                     "separate timings, as a share of its step",
                             "rows": trainer_rows},
                 "load_average_before": load_before, "load_average_after": load_average()})


if __name__ == "__main__":
    main()
