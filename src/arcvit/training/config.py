"""Training settings: the recipe (``TrainConfig``), the data (``DataSpec``), and the protocols' splits."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from arcvit.errors import ConfigError

ARC_IMPLS = ("fused", "sequential", "lowrank")
from arcvit.core.config import ARCConfig
from arcvit.methods.registry import SPECS, arc_settings, is_arc_method, takes_targets
from arcvit.methods.targets import parse_targets

PROTOCOL_SPLITS = {  # layout -> protocol -> (train, val, test)
    "vtab": {"final": ("train800val200", None, "test"), "select": ("train800", "val200", "test")},
    "fgvc": {"final": ("trainval", None, "test"), "select": ("train", "val", "test")},
    "folder": {"final": ("train", None, "test"), "select": ("train", "val", "test")},
}


@dataclass
class TrainConfig:
    """Defaults are the ARC paper's VTAB-1k recipe."""

    method: str = "arc"
    rank: int | None = None
    adapter_dropout: float | None = None
    lr: float = 1e-2
    weight_decay: float = 0.0
    batch_size: int = 32
    epochs: int = 100
    warmup_epochs: int = 10
    grad_clip: float = 1.0
    label_smoothing: float = 0.0
    seed: int = 0
    protocol: str = "final"
    recipe: str = "timm"
    precision: str = "32-true"
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    num_workers: int = 0
    grad_checkpointing: bool = False
    arc_impl: str | None = None  # how ARC's adapter is computed (ARCConfig.impl); None: ARCConfig's default
    compile: bool = False  # torch.compile the training module (docs/speed/: measured, not a win on CPU)
    drop_path: float = 0.0
    eval_batch_size: int = 256
    arc_options: dict | None = None  # ARC's extensions over the method's own (ARCConfig fields; docs/methods.md)
    targets: str | None = None  # the Linears lora, dora, vera adapt (methods/targets.py); None: "att,mlp"

    def __post_init__(self) -> None:
        positive = ("lr", "batch_size", "epochs", "devices", "num_nodes", "eval_batch_size")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("batch_size", "epochs", "warmup_epochs", "devices", "num_nodes", "eval_batch_size",
                     "num_workers", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{name} must be a whole number, got {value!r}")
        if not 0 <= self.drop_path < 1:
            raise ConfigError(f"drop_path must be in [0, 1), got {self.drop_path!r}")
        for name in ("weight_decay", "grad_clip", "num_workers", "label_smoothing"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)!r}")
        for name in ("lr", "weight_decay", "grad_clip", "label_smoothing"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if not self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if not 0 <= self.seed < 2 ** 32:
            raise ConfigError(f"seed must be in [0, 2**32), got {self.seed!r}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ConfigError(f"warmup_epochs ({self.warmup_epochs}) must be in [0, epochs) with epochs = "
                              f"{self.epochs}; set --warmup-epochs too")
        if self.method not in SPECS:
            raise ConfigError(f"unknown method {self.method!r}; choose from {', '.join(SPECS)}")
        if self.protocol not in ("final", "select"):
            raise ConfigError(f"protocol must be 'final' or 'select', got {self.protocol!r}")
        if self.recipe not in ("timm", "paper"):
            raise ConfigError(f"recipe must be 'timm' or 'paper', got {self.recipe!r}")
        if self.arc_impl is not None and self.arc_impl not in ARC_IMPLS:
            raise ConfigError(f"arc_impl must be one of {', '.join(ARC_IMPLS)}, got {self.arc_impl!r}")
        if self.rank is not None and self.rank < 1:
            raise ConfigError(f"rank must be a positive integer, got {self.rank!r}")
        self._check_arc_options()
        self._check_targets()

    def _check_targets(self) -> None:
        """``targets`` as "att,mlp" (a recipe may give a list; JSON round-trips it), only for the methods that
        take it."""
        if self.targets is None:
            return
        self.targets = ",".join(parse_targets(self.targets))
        if not takes_targets(self.method):
            raise ConfigError(f"targets apply to lora, dora and vera, not to {self.method}")

    def _check_arc_options(self) -> None:
        """ARC's extensions: only for the ARC family, each an ARCConfig field checked as ARCConfig checks it."""
        if not self.arc_options:
            return
        if not isinstance(self.arc_options, dict):
            raise ConfigError(f"arc_options must be a table of ARC settings, got {self.arc_options!r}")
        if not is_arc_method(self.method):
            raise ConfigError(f"arc_options apply to arc, arc_att and arc_plus, not to {self.method}")
        ARCConfig(**arc_settings(self.method, self.arc_options))

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown setting(s) {', '.join(unknown)}")
        for name, value in d.items():  # a config file can hold any type; flags are typed by argparse
            default = getattr(cls, name, None)
            if isinstance(default, (int, float)) and not isinstance(default, bool) and (
                    isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ConfigError(f"{source}: {name} must be a number, got {value!r}")
        try:
            return cls(**d)
        except TypeError as e:  # e.g. a string where a number belongs, in a config file
            raise ConfigError(f"{source}: a setting has the wrong type ({e})") from None


@dataclass
class DataSpec:
    root: str
    task: str = ""
    layout: str = "auto"
    skip_corrupt: bool = False
    allow_outside_root: bool = False  # list files may name images outside ``root`` (else refused)


# How a run executes rather than what it computes: may change when an interrupted run is resumed elsewhere.
RUNTIME_FIELDS = ("accelerator", "devices", "num_nodes", "strategy", "num_workers", "eval_batch_size")
