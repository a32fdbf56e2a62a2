"""Deployment targets come from the ISA flags the CPU reports: one registered model per target."""

from __future__ import annotations

import pytest

from ssdopt.backends import device


@pytest.mark.parametrize(
    ("flags", "target"),
    [
        (["avx2", "avx512_vnni", "avx512f", "amx_int8", "amx_tile"], "cpu-amx"),
        (["avx2", "avx512_vnni", "avx512f"], "cpu-avx512-vnni"),
        (["avx2", "avx512f"], "cpu-avx512"),
        (["avx2", "fma"], "cpu-avx2"),
        ([], "cpu-x86_64"),
    ],
)
def test_target_is_the_widest_isa_tier(
    flags: list[str], target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = {"kind": "cpu", "name": "Some CPU", "machine": "x86_64", "flags": flags}
    monkeypatch.setattr(device, "cpu_info", lambda: fake)
    assert device.deployment_target("cpu") == target


def test_gpu_target_names_architecture_and_model() -> None:
    info = {"kind": "cuda", "name": "NVIDIA H200", "compute_capability": "9.0", "memory_mib": 143771}
    assert device.target_of(info) == "cuda-sm90-nvidia-h200"
    assert device.target_of({"kind": "cuda", "name": None, "compute_capability": None}) == "cuda-unknown-gpu"
