"""What the machine runs well: which low precisions a CPU or GPU runs faster than fp32, read from the CPU's flags or
the GPU's CUDA capability. Training (`trainer.precision: auto`) and inference (`serve --precision auto`) both ask it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@dataclass(frozen=True)
class Hardware:
    """Which low precisions a device runs well (faster than fp32), and why, in words."""

    device: str
    bf16: bool
    fp16: bool
    note: str


def detect_hardware(device: str | torch.device = "cpu") -> Hardware:
    """bf16 runs well on CPUs with AMX or AVX512-BF16 and GPUs of CUDA capability >= 8.0; fp16 on CPUs with AMX-FP16
    or AVX512-FP16 and GPUs of capability >= 7.0."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return Hardware(str(device), (major, minor) >= (8, 0), major >= 7, f"CUDA capability {major}.{minor}")
    if device.type != "cpu":
        return Hardware(str(device), False, False, f"{device.type}: low precision not measured here")
    flags = cpu_flags()
    bf16 = sorted(flags & {"amx_bf16", "avx512_bf16"})
    fp16 = sorted(flags & {"amx_fp16", "avx512_fp16"})
    note = f"CPU with {', '.join(bf16 + fp16)}" if bf16 or fp16 else "CPU without AMX / AVX512-BF16 / AVX512-FP16"
    return Hardware("cpu", bool(bf16), bool(fp16), note)
