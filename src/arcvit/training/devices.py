"""The accelerator and device count a command asked for, checked before anything is built on them."""
from __future__ import annotations

import os

import torch

from arcvit.errors import ConfigError

_GPU_NAMES = ("cuda", "gpu")


def require_accelerator(name: str) -> None:
    """Refuse, in one line, an accelerator this machine does not have (Fabric raises a RuntimeError)."""
    if name in _GPU_NAMES and not torch.cuda.is_available():
        raise ConfigError(f"--accelerator {name}: no CUDA GPU is visible on this machine "
                          "(torch.cuda.is_available() is False); use --accelerator cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--accelerator mps: Apple's MPS backend is not available on this machine")


def torch_device(name: str) -> torch.device:
    """The torch device for a Fabric-style accelerator name ('auto' picks CUDA when present)."""
    require_accelerator(name)
    if name in _GPU_NAMES or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("mps" if name == "mps" else "cpu")


def _cpu_count() -> int:
    """The CPUs this process may run on (its affinity where the OS tells it, else every CPU)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def available_devices(accelerator: str) -> tuple[int, str] | None:
    """How many devices ``accelerator`` has on this machine, and what they are called; None for an accelerator
    this module does not know (Fabric checks those itself)."""
    if accelerator not in (*_GPU_NAMES, "mps", "cpu", "auto"):
        return None
    kind = torch_device(accelerator).type
    if kind == "cuda":
        return torch.cuda.device_count(), "CUDA GPU(s)"
    return (1, "MPS device") if kind == "mps" else (_cpu_count(), "CPU(s)")


def require_devices(accelerator: str, devices: int) -> None:
    """Refuse, in one line, more devices per machine than it has: on CPU, Fabric would start ``devices``
    processes on fewer cores; on CUDA, fail after the data is loaded."""
    require_accelerator(accelerator)
    found = available_devices(accelerator)
    if found is not None and devices > found[0]:
        count, what = found
        raise ConfigError(f"--devices {devices}: this machine has {count} {what} for --accelerator {accelerator}; "
                          f"use --devices {count} or fewer (devices counts per machine; --num-nodes the machines)")
