"""Accelerator kinds: memory, dense bf16/fp16 peak and link bandwidths, for the planner, for launch-time validation
(``--gpu``) and for MFU in the logs.

Bandwidths are per device and per direction, in GB/s (10^9 bytes): what one device can send while it receives as
much, which is what a ring collective's time depends on. Intra-node is the device-to-device fabric (NVLink through
NVSwitch, Huawei's HCCS); inter-node is the network, counted as one NIC per device as DGX/HGX systems and Atlas 800
servers wire it (rail-optimised: every device of a node talks to its peer of another node through its own NIC).
"""

from __future__ import annotations

from dataclasses import dataclass

from common.config import ConfigError


@dataclass(frozen=True)
class Device:
    """A device kind: memory, dense bf16/fp16 peak, link bandwidths per device (GB/s, one direction)."""

    name: str
    memory_gib: float  # the data sheet's capacity; CUDA reports a little less usable, which reserve_gib covers
    peak_tflops: float  # dense bf16/fp16 tensor-core peak, without structured sparsity
    intra_node_gbps: float  # device-to-device inside a node, one direction
    inter_node_gbps: float  # the device's own NIC to other nodes, one direction
    per_node: int = 8
    aliases: tuple[str, ...] = ()  # other spellings accepted by --gpu (compared without case)


DEVICES = {
    # NVIDIA A100 Tensor Core GPU data sheet (SXM4): 40/80 GB HBM2(e), 312 TFLOP/s dense BF16, NVLink 3 at 600 GB/s
    # bidirectional = 300 GB/s each way. DGX A100 data sheet: 8 x 200 Gb/s HDR InfiniBand for compute, one per GPU:
    # 25 GB/s.
    "A100-40": Device("A100-40", 40, 312, 300, 25, aliases=("a100-40gb", "a100-sxm4-40gb")),
    "A100-80": Device("A100-80", 80, 312, 300, 25, aliases=("a100-80gb", "a100-sxm4-80gb", "a100")),
    # NVIDIA H100 Tensor Core GPU data sheet (SXM5): 80 GB HBM3, 989 TFLOP/s dense BF16 (1,979 with sparsity), NVLink
    # 4 at 900 GB/s bidirectional = 450 GB/s each way. DGX H100 data sheet: 8 x 400 Gb/s NDR (ConnectX-7), one per
    # GPU: 50 GB/s.
    "H100-80": Device("H100-80", 80, 989, 450, 50, aliases=("h100-80gb", "h100-sxm", "h100")),
    # NVIDIA H200 Tensor Core GPU data sheet (SXM): 141 GB HBM3e, the H100's 989 TFLOP/s and 900 GB/s NVLink; HGX H200
    # reference design: one 400 Gb/s NIC per GPU (50 GB/s).
    "H200": Device("H200", 141, 989, 450, 50, aliases=("h200-141gb", "h200-sxm")),
    # Huawei Ascend 910 (Atlas 800 training server, model 9000): 32 GB HBM2, 256 TFLOP/s FP16, HCCS between the chips
    # of a node at 30 GB/s, and one integrated 100 Gb/s RoCE v2 port per chip: 12.5 GB/s.
    "Ascend910": Device("Ascend910", 32, 256, 30, 12.5, aliases=("ascend-910", "910")),
}


def find_device(name: str) -> Device:
    """The device kind called ``name`` or one of its aliases, without regard to case (``h100-80gb``, ``H100-80``);
    an unknown name is refused listing the known ones."""
    wanted = name.strip().lower()
    for dev in DEVICES.values():
        if wanted == dev.name.lower() or wanted in dev.aliases:
            return dev
    known = ", ".join(f"{d.name} ({', '.join(d.aliases)})" if d.aliases else d.name for d in DEVICES.values())
    raise ConfigError(f"--gpu {name!r} is not a known device kind; known: {known}")


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
