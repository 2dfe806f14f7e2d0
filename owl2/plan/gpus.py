"""The GPUs a plan can target: memory and dense bf16 tensor-core peak, by name.

Memory is the total that ``nvidia-smi`` reports, in GiB (what the CUDA allocator can address, before the CUDA
context takes its share). Peaks are the vendor's dense (not 2:4-sparse) bf16 tensor-core figures at boost clock.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    peak_bf16_tflops: float
    description: str


GPUS: dict[str, GPU] = {
    gpu.name: gpu
    for gpu in (
        GPU("h100-80gb", 79.6, 989.4, "NVIDIA H100 SXM5 80 GB (81,559 MiB)"),
        GPU("h100-pcie", 79.6, 756.0, "NVIDIA H100 PCIe 80 GB"),
        GPU("h200", 140.4, 989.4, "NVIDIA H200 SXM 141 GB (same compute as the H100 SXM)"),
        GPU("a100-40gb", 40.0, 312.0, "NVIDIA A100 40 GB (40,960 MiB)"),
        GPU("a100-80gb", 80.0, 312.0, "NVIDIA A100 80 GB (81,920 MiB)"),
        GPU("l40s", 45.0, 362.1, "NVIDIA L40S 48 GB (46,068 MiB)"),
        GPU("a10g", 22.5, 70.0, "NVIDIA A10G 24 GB (AWS g5; lower tensor clocks than the A10's 125)"),
        GPU("l4", 22.5, 121.0, "NVIDIA L4 24 GB"),
    )
}


class UnknownGPU(ValueError):
    """A GPU name that is not in :data:`GPUS`; the message lists the known names."""


def get_gpu(name: str) -> GPU:
    """The table's entry for ``name`` (e.g. ``h100-80gb``)."""
    if name not in GPUS:
        raise UnknownGPU(f"unknown GPU {name!r}; known GPUs: {', '.join(GPUS)}")
    return GPUS[name]


def peak_tflops(name: str) -> float:
    """Dense bf16 peak of GPU ``name`` in TFLOP/s (the MFU denominator)."""
    return get_gpu(name).peak_bf16_tflops
