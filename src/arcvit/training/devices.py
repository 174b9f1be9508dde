"""The accelerator a command asked for, checked before anything is built on it."""
from __future__ import annotations

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
