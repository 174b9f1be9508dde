"""Training settings: the recipe (``TrainConfig``), the data (``DataSpec``), and the protocols' splits."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from arcvit.core.adapter_file import MAX_RANK
from arcvit.core.config import ARCConfig
from arcvit.errors import ConfigError
from arcvit.methods.registry import SPECS, arc_settings, is_arc_method, takes_targets
from arcvit.methods.targets import parse_targets
from arcvit.numbers import Range

ARC_IMPLS = ("fused", "sequential", "lowrank")
PROTOCOLS = ("final", "select")
RECIPES = ("timm", "paper")
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", "transformer-engine",
              "transformer-engine-float16")  # Lightning Fabric's precision names
ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps", "tpu")
STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_fork", "fsdp")  # the ones arcvit's loop and checkpoints handle
FRACTION = Range(0, 1, below=True)
BATCH = Range(1, 65536, whole=True)

PROTOCOL_SPLITS = {  # layout -> protocol -> (train, val, test)
    "vtab": {"final": ("train800val200", None, "test"), "select": ("train800", "val200", "test")},
    "fgvc": {"final": ("trainval", None, "test"), "select": ("train", "val", "test")},
    "folder": {"final": ("train", None, "test"), "select": ("train", "val", "test")},
}


def setting(default: Any, help: str, *, bounds: Range | None = None, choices: tuple[str, ...] | None = None) -> Any:
    """A TrainConfig field that carries its help and its range or choices: the flags, their checks, the checks of
    a recipe file and docs/settings.md are all made from these."""
    return field(default=default, metadata={"help": help, "bounds": bounds, "choices": choices})


@dataclass
class TrainConfig:
    """Defaults are the ARC paper's VTAB-1k recipe."""

    method: str = setting("arc", "the adaptation method (docs/methods.md)", choices=tuple(SPECS))
    rank: int | None = setting(None, "bottleneck or rank",
                               bounds=Range(1, MAX_RANK, whole=True))
    adapter_dropout: float | None = setting(None, "dropout inside the adapter",
                                            bounds=FRACTION)
    lr: float = setting(1e-2, "peak learning rate (AdamW, cosine schedule)", bounds=Range(0, 1e6, above=True))
    weight_decay: float = setting(0.0, "AdamW weight decay", bounds=Range(0, 100))
    batch_size: int = setting(32, "images per optimizer step (all processes together)", bounds=BATCH)
    epochs: int = setting(100, "passes over the training split", bounds=Range(1, 100_000, whole=True))
    warmup_epochs: int = setting(10, "linear warm-up epochs, fewer than epochs", bounds=Range(0, 100_000, whole=True))
    grad_clip: float = setting(1.0, "gradient norm clip; 0: none", bounds=Range(0, 1e6))
    label_smoothing: float = setting(0.0, "label smoothing of the cross-entropy", bounds=FRACTION)
    seed: int = setting(0, "seed of the adapter's initialisation, the data order and augmentation",
                        bounds=Range(0, 2**32 - 1, whole=True))
    protocol: str = setting("final", "final: train on train+val, report test; select: train, report val",
                            choices=PROTOCOLS)
    recipe: str = setting("timm", "data transforms: the backbone's own (timm) or the paper's", choices=RECIPES)
    precision: str = setting("32-true", "Lightning Fabric precision", choices=PRECISIONS)
    accelerator: str = setting("auto", "Lightning Fabric accelerator", choices=ACCELERATORS)
    devices: int = setting(1, "processes per node", bounds=Range(1, 1024, whole=True))
    num_nodes: int = setting(1, "machines", bounds=Range(1, 4096, whole=True))
    strategy: str = setting("auto", "Lightning Fabric strategy (docs/scaling.md)", choices=STRATEGIES)
    num_workers: int = setting(0, "data loader worker processes", bounds=Range(0, 1024, whole=True))
    grad_checkpointing: bool = setting(False, "recompute block activations in the backward pass (less memory)")
    arc_impl: str | None = setting(None, "how ARC's adapter is computed (ARCConfig.impl)",
                                   choices=ARC_IMPLS)
    compile: bool = setting(False, "torch.compile the training module (docs/speed/: not a win on CPU)")
    drop_path: float = setting(0.0, "stochastic depth of the backbone's blocks", bounds=FRACTION)
    eval_batch_size: int = setting(256, "images per evaluation batch", bounds=BATCH)
    arc_options: dict | None = setting(None, "ARC's extensions over the method's own, as a JSON "
                                             "object of ARCConfig fields (docs/methods.md)")
    targets: str | None = setting(None, "the Linears lora, dora and vera adapt: att, mlp, proj, "
                                        "fc2 or Linear names (their own: att,mlp)")

    def __post_init__(self) -> None:
        for f in fields(self):
            self._check_setting(f.name, getattr(self, f.name), f.default, f.metadata)
        if not self.warmup_epochs < self.epochs:
            raise ConfigError(f"warmup_epochs ({self.warmup_epochs}) must be in [0, epochs) with epochs = "
                              f"{self.epochs}; set --warmup-epochs too")
        self._check_arc_options()
        self._check_targets()

    @staticmethod
    def _check_setting(name: str, value: Any, default: Any, meta: Any) -> None:
        """One setting against its declaration: its range, its choices, or its kind (None where that is the
        default)."""
        if value is None and default is None:
            return
        if meta.get("bounds"):
            meta["bounds"].check(value, name)
        elif meta.get("choices") and value not in meta["choices"]:
            raise ConfigError(f"{name}: {str(value)[:40]!r} is not one of {', '.join(meta['choices'])}")
        elif isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r}")

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
        try:
            return cls(**d)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:  # e.g. a string where a number belongs, in a config file
            raise ConfigError(f"{source}: a setting has the wrong type ({e})") from None


def setting_bounds(name: str) -> Range:
    """The stated range of a numeric TrainConfig setting (other commands' flags for the same quantity reuse it)."""
    return next(f.metadata["bounds"] for f in fields(TrainConfig) if f.name == name)


def settings_markdown() -> str:
    """docs/settings.md: every TrainConfig setting with its flag, default, range or choices and help."""
    rows = ["# Training settings", "",
            "Generated from `arcvit.training.config.TrainConfig` (each field's metadata is also what `arcvit train`",
            "and `arcvit tune` parse and check, and what a recipe file's values are checked against); regenerate",
            "with `python -c \"from arcvit.training.config import settings_markdown as m; print(m(), end='')\" > "
            "docs/settings.md`.", "",
            "| setting | flag | default | allowed | what it sets |", "|---|---|---|---|---|"]
    for f in fields(TrainConfig):
        meta = f.metadata
        allowed = meta["bounds"].describe() if meta["bounds"] else ", ".join(meta["choices"] or ()) or \
            ("true, false" if isinstance(f.default, bool) else "see the text")
        flag = f"`--{f.name.replace('_', '-')}`"
        default = "the method's own" if f.default is None else f"`{f.default}`"
        rows.append(f"| `{f.name}` | {flag} | {default} | {allowed} | {meta['help']} |")
    return "\n".join(rows) + "\n"


@dataclass
class DataSpec:
    root: str
    task: str = ""
    layout: str = "auto"
    skip_corrupt: bool = False
    allow_outside_root: bool = False  # list files may name images outside ``root`` (else refused)


# How a run executes rather than what it computes: may change when an interrupted run is resumed elsewhere.
RUNTIME_FIELDS = ("accelerator", "devices", "num_nodes", "strategy", "num_workers", "eval_batch_size")
