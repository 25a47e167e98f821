"""Which torch device to run on."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch

from cnnpipe.cores import available_cores
from cnnpipe.errors import CnnpipeError


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when present, else CPU; an explicit CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CnnpipeError(f"device: expected auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CnnpipeError(f"device: {name!r} asked for, but torch sees no CUDA device")
    return device


# ONEDNN_MAX_CPU_ISA values that keep oneDNN's bf16 kernels (ALL: no limit)
BF16_ISAS = ("ALL", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512",
             "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16")


def native_bf16(device: torch.device) -> bool:
    """bf16 in hardware: CUDA, or a CPU with AVX512-BF16 or AMX (elsewhere torch emulates it, slower than fp32).
    ATEN_CPU_CAPABILITY=avx2 and ONEDNN_MAX_CPU_ISA=AVX2 (an AVX2-only CPU emulated) count as no bf16: the CPU
    flags still say bf16, but oneDNN's bf16 kernels are then off and bf16 convolutions take aten's slow path."""
    if device.type == "cuda":
        return True
    limited = (torch.backends.cpu.get_cpu_capability() != "AVX512"
               or os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper() not in BF16_ISAS)
    return device.type == "cpu" and not limited and (torch.cpu._is_avx512_bf16_supported()
                                                     or torch.cpu._is_amx_tile_supported())


def autocast(device: torch.device, precision: str) -> tuple[Callable[[], contextlib.AbstractContextManager], str]:
    """The training step's autocast factory for `precision`, and the precision it gives: auto is bf16 on CUDA
    (tensor cores) and fp32 on CPU (runs repeat exactly); bf16 is bf16 where the hardware has it, fp32
    elsewhere (a recipe stays portable)."""
    bf16 = (precision == "bf16" and native_bf16(device)) or (precision == "auto" and device.type == "cuda")
    if not bf16:
        return contextlib.nullcontext, "fp32"
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), "bf16"


def set_threads(requested: int, processes: int = 1) -> int:
    """Set torch's intra-op threads: `requested`, or (0) this process's share of the available cores."""
    threads = requested or max(1, available_cores() // processes)
    torch.set_num_threads(threads)
    return threads
