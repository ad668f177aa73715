"""Accelerator kinds: memory, dense bf16/fp16 peak and link bandwidths, for the planner and for MFU in the logs.

Published figures (NVIDIA data sheets, DGX/HGX: NVLink and one 200/400 Gb/s NIC per GPU; Huawei Ascend 910:
32 GB HBM, 256 TFLOP/s fp16, HCCS, 100 Gb/s RoCE per chip).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    """A device kind: memory, dense bf16/fp16 peak, link bandwidths per device (GB/s, one direction)."""

    name: str
    memory_gib: float
    peak_tflops: float
    intra_node_gbps: float
    inter_node_gbps: float
    per_node: int = 8


DEVICES = {
    "A100-40": Device("A100-40", 40, 312, 300, 25),
    "A100-80": Device("A100-80", 80, 312, 300, 25),
    "H100-80": Device("H100-80", 80, 989, 450, 50),
    "H200": Device("H200", 141, 989, 450, 50),
    "Ascend910": Device("Ascend910", 32, 256, 30, 12.5),
}

# Substrings of CUDA device names (``torch.cuda.get_device_name()``) -> the kind above; first match wins. Both A100
# sizes have the same peak.
_CUDA_NAMES = (("H200", "H200"), ("H100", "H100-80"), ("A100", "A100-80"))


def device_for_cuda_name(name: str) -> Device | None:
    """The device kind of a CUDA device name such as ``NVIDIA H100 80GB HBM3``, or None when unknown."""
    return next((DEVICES[kind] for key, kind in _CUDA_NAMES if key in name), None)


def peak_tflops_for_cuda_name(name: str) -> float:
    """Dense bf16 peak of a CUDA device by name; 0.0 when unknown (MFU is then not reported)."""
    dev = device_for_cuda_name(name)
    return dev.peak_tflops if dev else 0.0
