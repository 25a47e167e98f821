"""Benchmark: training images/s of the fast recipe's net (fastnet-lcn) on this CPU by memory layout
(channels_last or NCHW), batch size, input resolution and width, in the precision the trainer picks here
(bf16 autocast where the CPU has it natively, fp32 elsewhere): the engine's share of train.channels_last,
train.batch_size, train.low_res and the budget's narrowing (train.budget_min_epochs).

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

from benchmarks.harness import RESULTS, load_average, record

from cnnpipe.engine.device import autocast, native_bf16, set_threads
from cnnpipe.models import build_model

ARCH = "fastnet-lcn"  # configs/gtsrb-fast.yaml's net
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
    best = dict.fromkeys(shapes, 0.0)
    for _ in range(args.repeats):
        for shape in shapes:
            start = time.perf_counter()
            for _ in range(args.steps):
                steps[shape]()
            best[shape] = max(best[shape], args.steps * shape[2] / (time.perf_counter() - start))
    rows = [{"width": width, "size": size, "batch": batch,
             "channels_last_images_per_s": round(best[width, size, batch, True]),
             "nchw_images_per_s": round(best[width, size, batch, False]),
             "channels_last_speedup": round(best[width, size, batch, True] / best[width, size, batch, False], 2)}
            for width, size, batch in itertools.product(WIDTHS, SIZES, BATCHES)]
    for row in rows:
        print(row)
    record(out, {"benchmark": f"{ARCH} training step images/s on CPU by layout, batch and resolution "
                              f"({precision}: what train.precision bf16 gives on this CPU), best of repeats",
                 "arch": ARCH, "precision": precision, "threads": threads, "steps": args.steps,
                 "repeats": args.repeats, "rows": rows, "load_average_before": load_before,
                 "load_average_after": load_average()})


if __name__ == "__main__":
    main()
