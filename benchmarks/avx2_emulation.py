"""Check: does ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 really make a bf16 CPU run as an AVX2-only one?

In a fresh process per mode: a convolution's forward and backward in fp32, then under bf16 autocast, with
ONEDNN_VERBOSE=1; records oneDNN's ISA line, the implementation of every convolution it ran (e.g.
brg_conv_fwd:avx512_core_bf16 vs brg_conv_fwd:avx2), torch's CPU capability, and what cnnpipe's trainer would
do with train.precision bf16 (native bf16, or the fp32 fallback). Writes benchmarks/results/avx2_emulation.json,
or --out (one file per kind of CPU).

    .venv/bin/python -m benchmarks.avx2_emulation [--out benchmarks/results/avx2_emulation_amx.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.budget import MODES
from benchmarks.harness import machine_info, record

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import json, torch
from cnnpipe.engine.device import autocast
torch.set_num_threads(1)
conv = torch.nn.Conv2d(3, 16, 3, padding=1).to(memory_format=torch.channels_last)
x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
conv(x).sum().backward()
with torch.autocast("cpu", dtype=torch.bfloat16):
    conv(x).float().sum().backward()
print("PROBE " + json.dumps({"cpu_capability": torch.backends.cpu.get_cpu_capability(),
                             "trainer_precision_for_bf16": autocast(torch.device("cpu"), "bf16")[1]}), flush=True)
"""


def probe(env: dict[str, str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, cwd=ROOT,
                          env={**os.environ, **env, "ONEDNN_VERBOSE": "1"})
    lines = proc.stdout.splitlines()
    isa = next((line.split("isa:", 1)[1] for line in lines if ",isa:" in line), None)
    conv_lines = [line for line in lines if ",exec,cpu,convolution," in line]
    convs = sorted({",".join(line.split(",")[5:8]) for line in conv_lines})
    result = json.loads(next(line for line in lines if line.startswith("PROBE "))[6:])
    # by the data the kernel read, not its name: an AMX kernel (brg_conv_fwd:avx10_1_512_amx) names no bf16
    return {"env": env, "onednn_isa": isa, "onednn_convolutions": convs, **result,
            "bf16_convolutions_in_onednn": any("src:bf16" in line for line in conv_lines)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/avx2_emulation.json",
                        help="results file (one per kind of CPU)")
    args = parser.parse_args()
    modes = {mode: probe(env) for mode, env in MODES.items()}
    record(args.out, {
        "check": "oneDNN kernels and the trainer's bf16 decision, as the machine is and with the AVX2 emulation "
                 "(a conv forward + backward in fp32, then under bf16 autocast; ONEDNN_VERBOSE=1)",
        "command": " ".join(["python -m benchmarks.avx2_emulation", *sys.argv[1:]]),
        "cpu_flags": machine_info()["cpu_flags"], "modes": modes})


if __name__ == "__main__":
    main()
