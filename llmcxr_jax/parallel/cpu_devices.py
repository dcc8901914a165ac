"""One XLA CPU device per core, set up before JAX is imported (launch scripts only).

XLA:CPU runs one program per device and keeps most of its work (convolutions, fusions) on one
thread per device, so a single CPU device leaves cores idle (the VQ-GAN and LLM steps measured
both ways: README, Performance). Splitting the host into devices is the same mechanism the tests
use to simulate a mesh (`--xla_force_host_platform_device_count`); it affects only the CPU
platform, so it is harmless on a GPU or TPU host, where the accelerator stays the default backend.

This module must not import JAX: it only edits `XLA_FLAGS`, which JAX reads at import time.
"""

from __future__ import annotations

import os

COUNT_FLAG = "--xla_force_host_platform_device_count"
ENV_OVERRIDE = "LLMCXR_CPU_DEVICES"  # a device count; 1 keeps XLA's single CPU device


def default_cpu_devices(cores: int, max_devices: int = 8) -> int:
    """The largest power of two <= min(cores, max_devices): global batches of 8 or 16 (the
    presets') stay divisible by the device count."""
    n = 1
    while n * 2 <= min(cores, max_devices):
        n *= 2
    return n


def split_cpu_into_devices(max_devices: int = 8) -> int | None:
    """Add `--xla_force_host_platform_device_count=N` to XLA_FLAGS (N from `LLMCXR_CPU_DEVICES`,
    else one per core, a power of two, at most `max_devices`) unless XLA_FLAGS already sets a
    count. Returns the count set, or None when left alone. Call before importing JAX."""
    flags = os.environ.get("XLA_FLAGS", "")
    if COUNT_FLAG in flags:
        return None
    raw = os.environ.get(ENV_OVERRIDE, "")
    if raw:
        try:
            n = int(raw)
        except ValueError:
            raise ValueError(f"{ENV_OVERRIDE}={raw!r}: expected a device count") from None
        if n < 1:
            raise ValueError(f"{ENV_OVERRIDE}={raw!r}: expected a device count >= 1")
    else:
        n = default_cpu_devices(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                else (os.cpu_count() or 1), max_devices)
    if n == 1:
        return None
    os.environ["XLA_FLAGS"] = f"{flags} {COUNT_FLAG}={n}".strip()
    return n
