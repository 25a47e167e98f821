"""Benchmark: training images/s of fastnet and the recipes' fastnet-lcn on this CPU in fp32 and with bf16 autocast
(train.precision), and with torch.compile (train.compile: inductor, which builds C++ kernels with the system's
compiler).

Steps of the real training step (forward, cross-entropy, backward, SGD) on random 32x32 RGB batches of
128, channels_last, after a warm-up; best of --repeats timed blocks per precision, interleaved so a
background load hits both alike. bf16 is measured only where the CPU has it natively (AVX512-BF16/AMX).
torch.compile: width 32 in bf16, its compile time (the first two steps) and its images/s against eager's,
also interleaved; the compile cache is disabled so every run pays what a first training run pays.

    .venv/bin/python -m benchmarks.precision [--steps 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.harness import load_average, record

from cnnpipe.engine.device import autocast, native_bf16, set_threads
from cnnpipe.models import build_model

ROOT = Path(__file__).resolve().parents[1]


ARCH_WIDTHS = {"fastnet": (16, 32), "fastnet-lcn": (16, 32, 48)}  # the recipes' net at its widths: 16 narrowed, 32, 48


def images_per_s(width: int, precision: str, steps: int, batch: int = 128, compiled: bool = False,
                 size: int = 32, arch: str = "fastnet") -> tuple[float, float]:
    """(images/s of `steps` steps after a warm-up, seconds of the warm-up: compilation when `compiled`)."""
    torch.manual_seed(0)
    model = build_model(arch, 3, 43, 32, width).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 43, (batch,))
    mixed, _ = autocast(torch.device("cpu"), precision)
    net = torch.compile(model) if compiled else model

    def step() -> None:
        with mixed():
            loss = F.cross_entropy(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    start = time.perf_counter()
    for _ in range(3):
        step()
    warm_up = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - start), warm_up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/precision_cpu.json")
    args = parser.parse_args()
    if not native_bf16(torch.device("cpu")):
        sys.exit("this CPU has no native bf16 (AVX512-BF16 or AMX): train.precision bf16 trains in fp32 here")
    threads = set_threads(0)
    load_before = load_average()
    result = {}
    for arch, widths in ARCH_WIDTHS.items():
        for width in widths:
            best = {"fp32": 0.0, "bf16": 0.0}
            for _ in range(args.repeats):
                for precision in best:
                    best[precision] = max(best[precision], images_per_s(width, precision, args.steps, arch=arch)[0])
            result[f"{arch}_w{width}"] = {"fp32_images_per_s": round(best["fp32"]),
                                          "bf16_images_per_s": round(best["bf16"]),
                                          "speedup": round(best["bf16"] / best["fp32"], 2)}
    torch.compiler.config.force_disable_caches = True  # every compile as a first run's
    best = {"eager": 0.0, "compiled": 0.0}
    compile_s = []
    for _ in range(args.repeats):
        best["eager"] = max(best["eager"], images_per_s(32, "bf16", args.steps)[0])
        rate, warm_up = images_per_s(32, "bf16", args.steps, compiled=True)
        best["compiled"], compile_s = max(best["compiled"], rate), [*compile_s, round(warm_up, 1)]
    result["compile_fastnet_w32_bf16"] = {"eager_images_per_s": round(best["eager"]),
                                          "compiled_images_per_s": round(best["compiled"]),
                                          "speedup": round(best["compiled"] / best["eager"], 2),
                                          "compile_s": compile_s}
    # progressive resizing (train.low_res): what a step at a lower resolution costs
    for size in (16, 20, 24, 28):
        result.setdefault("step_cost_vs_32px_bf16_w32", {})[str(size)] = round(
            best["eager"] / max(images_per_s(32, "bf16", args.steps, size=size)[0] for _ in range(args.repeats)), 3)
    record(args.out, {"benchmark": "fastnet and fastnet-lcn training step images/s on CPU, fp32 vs bf16 autocast "
                                   "(batch 128, 32x32 RGB, channels_last), best of repeats", "threads": threads,
                      "steps": args.steps, "repeats": args.repeats, **result, "load_average_before": load_before,
                      "load_average_after": load_average()})


if __name__ == "__main__":
    main()
