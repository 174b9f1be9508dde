"""ARCConfig: every setting of the ARC adapter, validated once, serialisable to the adapter file."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from arcvit.errors import ConfigError

Mode = Literal["arc", "arc_att"]
Impl = Literal["fused", "lowrank", "sequential"]


@dataclass(frozen=True)
class ARCConfig:
    """Settings of ARC (Adapter Re-Composing, Dong et al., NeurIPS 2023).

    rank: bottleneck r of the shared down-projections D (d x r).
    mode: "arc" adapts the attention and MLP inputs of every block; "arc_att" only the attention input.
    dropout: adapter dropout on x (D * c), active in train mode only (paper: 0.1).
    blocks: indices of the blocks to adapt (counted over all blocks in forward order); None adapts all.
    bias: learn the per-block bias b. Needs a bias slot in the following Linear to be mergeable.
    train_head: the classifier head trains (the paper trains it).
    zero_head: zero the classifier head on apply (the paper's init); False keeps its weights.
    impl: how an adapter is computed; all three give the same outputs (to fp32 rounding) and merge alike.
        "fused" (default) puts the adapter on the block's LayerNorm and computes both as one autograd Function
        that rebuilds the adapter's input from the norm's in backward, so that training keeps what BitFit keeps
        plus the r-wide codes (arcvit.core.fused); where the norm is not a plain LayerNorm (RMSNorm) or Swin
        pads the attention input, those sites fall back to "sequential". "sequential" computes
        h = x + drop(x (D*c)) D^T + b in front of the readers, then the readers. "lowrank" applies an adapter in
        front of a single Linear W as its low-rank update, x W^T + drop(x (D*c)) (W D)^T + W b + b_W.
        benchmarks/speed.py measures them (docs/speed/): "fused" trains at BitFit's memory, the others keep one
        more full-width activation per site.
    """

    rank: int = 50
    mode: Mode = "arc"
    dropout: float = 0.1
    blocks: tuple[int, ...] | None = None
    bias: bool = True
    train_head: bool = True
    zero_head: bool = True
    impl: Impl = "fused"

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ConfigError(f"rank must be a positive integer, got {self.rank!r}")
        if self.mode not in ("arc", "arc_att"):
            raise ConfigError(f"mode must be 'arc' or 'arc_att', got {self.mode!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.zero_head and not self.train_head:
            raise ConfigError("zero_head=True with train_head=False would leave a zero head that never trains; "
                              "set zero_head=False to keep the backbone's head frozen")
        if self.impl not in ("fused", "lowrank", "sequential"):
            raise ConfigError(f"impl must be 'fused', 'lowrank' or 'sequential', got {self.impl!r}")
        if self.blocks is not None:
            blocks = tuple(self.blocks)
            if not blocks or any(not isinstance(b, int) or b < 0 for b in blocks):
                raise ConfigError(f"blocks must be non-negative block indices, got {self.blocks!r}")
            object.__setattr__(self, "blocks", tuple(sorted(set(blocks))))

    @property
    def positions(self) -> tuple[str, ...]:
        return ("att", "mlp") if self.mode == "arc" else ("att",)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["blocks"] = list(self.blocks) if self.blocks is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ARCConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown ARC config field(s): {', '.join(sorted(unknown))}")
        d = dict(d)
        if d.get("blocks") is not None:
            d["blocks"] = tuple(d["blocks"])
        return cls(**d)
