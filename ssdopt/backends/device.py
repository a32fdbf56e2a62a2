"""Which device an engine is built for: CPU model + ISA flags, or GPU name + compute capability.

Optimised engines are hardware specific (ONNX Runtime's NCHWc layout depends on AVX2 vs AVX-512;
OpenVINO picks kernels per ISA; TensorRT engines per GPU), so the device is recorded at build and
compared at load.
"""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path
from typing import Any

# ISA extensions that change which kernels a runtime picks (and whether int8/bf16 are fast).
CPU_FLAGS_THAT_MATTER = (
    "sse4_1",
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_bf16",
    "amx_int8",
    "amx_tile",
)


@lru_cache(maxsize=1)
def cpu_info() -> dict[str, Any]:
    """{"kind": "cpu", "name": model name, "flags": [relevant ISA flags], "machine": arch}."""
    name, flags = platform.processor() or "unknown", set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and name in ("unknown", "", platform.machine()):
                name = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    return {
        "kind": "cpu",
        "name": name,
        "machine": platform.machine(),
        "flags": sorted(f for f in CPU_FLAGS_THAT_MATTER if f in flags),
    }


def cuda_info(index: int = 0) -> dict[str, Any] | None:
    """{"kind": "cuda", "name", "compute_capability": "9.0", "memory_mib"} via cuda-python, or None."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return None
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or count <= index:
        return None
    err, props = cudart.cudaGetDeviceProperties(index)
    if err != cudart.cudaError_t.cudaSuccess:
        return None
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return {
        "kind": "cuda",
        "name": name.rstrip("\x00"),
        "compute_capability": f"{props.major}.{props.minor}",
        "memory_mib": int(props.totalGlobalMem) // (1 << 20),
    }


def device_info(device: str) -> dict[str, Any]:
    """The record for `device` ("cpu" or "cuda"); cuda without a GPU gives {"kind": "cuda", "name": None}."""
    if device == "cuda":
        return cuda_info() or {"kind": "cuda", "name": None, "compute_capability": None}
    return cpu_info()


def same_device(recorded: dict[str, Any], current: dict[str, Any]) -> bool:
    """Same kind and model; CPUs also the same relevant ISA flags, GPUs the same compute capability."""
    if recorded.get("kind") != current.get("kind") or recorded.get("name") != current.get("name"):
        return False
    if recorded.get("kind") == "cpu":
        return list(recorded.get("flags", [])) == list(current.get("flags", []))
    return recorded.get("compute_capability") == current.get("compute_capability")


def describe(device: dict[str, Any]) -> str:
    """Human-readable one-liner for messages."""
    if device.get("kind") == "cpu":
        return f"CPU {device.get('name')} ({' '.join(device.get('flags', [])) or 'no listed ISA flags'})"
    return f"GPU {device.get('name')} (compute capability {device.get('compute_capability')})"


def deployment_target(device: str = "cpu") -> str:
    """Short name of the hardware an engine is built for here; one registered model per target.

    cpu: the widest ISA tier that changes kernels (cpu-amx, cpu-avx512-vnni, cpu-avx512, cpu-avx2);
    cuda: compute capability and GPU name, e.g. "cuda-sm90-nvidia-h200".
    """
    return target_of(device_info(device))


TARGET_PATTERN = r"[a-z0-9][a-z0-9._-]{0,99}"


def resolve_target(
    explicit: str | None = None, engine_device: dict[str, Any] | None = None, device: str = "cpu"
) -> str:
    """The deployment target an engine is registered under, one rule for the flows and the CLI:

    1. `explicit` (the flow's `target` parameter, which a work pool's deployment sets to the pool's
       target; params.yaml `optimize.target`; the CLI's `--target`) wins;
    2. else the target of the engine's own metadata (`metadata["device"]`: where it was built);
    3. else this machine's target for `device` (an engine that failed to build has no metadata).
    """
    if explicit is not None:
        import re

        from ssdopt.errors import SsdoptError

        if not isinstance(explicit, str) or not re.fullmatch(TARGET_PATTERN, explicit):
            raise SsdoptError(
                f"deployment target {explicit!r}",
                "a lower-case name of letters, digits, '.', '_' and '-' (e.g. cpu-avx2, cuda-sm90)",
                "fix the deployment's `target` parameter, params.yaml optimize.target or --target",
            )
        return explicit
    if engine_device:
        return target_of(engine_device)
    return deployment_target(device)


def local_targets() -> list[str]:
    """This machine's deployment targets: its CPU's, and its first GPU's where one is visible."""
    gpu = cuda_info()
    return [target_of(cpu_info())] + ([target_of(gpu)] if gpu else [])


def target_of(info: dict[str, Any]) -> str:
    """The deployment target of a device record (an engine's metadata["device"], or this machine's)."""
    if info.get("kind") == "cuda":  # e.g. cuda-sm90-nvidia-h200: architecture and model
        name = "".join(ch if ch.isalnum() else "-" for ch in (info.get("name") or "unknown-gpu").lower())
        sm = str(info.get("compute_capability") or "").replace(".", "")
        return "-".join(part for part in ("cuda", f"sm{sm}" if sm else "", name.strip("-")) if part)
    flags = set(info.get("flags", ()))
    for tier, needed in (
        ("cpu-amx", "amx_int8"),
        ("cpu-avx512-vnni", "avx512_vnni"),
        ("cpu-avx512", "avx512f"),
        ("cpu-avx2", "avx2"),
    ):
        if needed in flags:
            return tier
    return f"cpu-{info.get('machine', 'generic')}"
