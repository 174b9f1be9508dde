"""ARCConfig: every setting of the ARC adapter, validated once, serialisable to the adapter file."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from arcvit.errors import ConfigError

Mode = Literal["arc", "arc_att"]
Impl = Literal["fused", "lowrank", "sequential"]
EXTRA_POSITIONS = ("proj", "fc2")  # the inputs of the attention's output projection and of the MLP's fc2
BASIS_INITS = ("xavier", "orthogonal", "data")
SCALE_INITS = ("zero", "random")
# The fields beyond the paper's ARC, at the values that leave it exactly the paper's method: a config whose
# extensions are all at these values is written to adapter files without them, as arcvit 0.2 wrote it.
EXTENSION_DEFAULTS = {"extra_positions": (), "channel_scale": False, "private_rank": 0, "basis_init": "xavier",
                      "att_scale_init": "zero", "shared_lr_scale": 1.0}


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

    Extensions (ARC+, docs/methods.md; each folds exactly into the Linear that reads the site, and each at its
    default leaves the paper's ARC):
    extra_positions: also adapt the inputs of the attention's output projection ("proj") and of the MLP's
        second Linear ("fc2"), each with its own shared basis (fc2's is 4d x r on a ViT).
    channel_scale: a per-site, per-channel scale s (d, zero at init): h = x (1 + s) + ... (SSF-like).
    private_rank: k > 0 adds a per-site private low-rank term x P Q^T (P, Q: d x k; Q zero at init).
    basis_init: D's initialisation: "xavier" (the paper's), "orthogonal" (orthonormal columns scaled to
        xavier's expected norm), "data" (the top-r principal directions of each position's inputs, set from a
        few training batches by ``arcvit.core.basis.init_basis_from_data``; orthogonal until then).
    att_scale_init: c at the attention position starts at "zero" (the paper's) or "random" (xavier, like the
        MLP position's).
    shared_lr_scale: the learning rate of the shared bases D relative to the per-site tensors (training only).
    """

    rank: int = 50
    mode: Mode = "arc"
    dropout: float = 0.1
    blocks: tuple[int, ...] | None = None
    bias: bool = True
    train_head: bool = True
    zero_head: bool = True
    impl: Impl = "fused"
    extra_positions: tuple[str, ...] = ()
    channel_scale: bool = False
    private_rank: int = 0
    basis_init: str = "xavier"
    att_scale_init: str = "zero"
    shared_lr_scale: float = 1.0

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
        self._check_extensions()

    def _check_extensions(self) -> None:
        extra = self.extra_positions
        if not isinstance(extra, (tuple, list)) or any(p not in EXTRA_POSITIONS for p in extra) \
                or len(set(extra)) != len(extra):
            raise ConfigError(f"extra_positions must be distinct names among {', '.join(EXTRA_POSITIONS)}, "
                              f"got {extra!r}")
        object.__setattr__(self, "extra_positions", tuple(p for p in EXTRA_POSITIONS if p in extra))
        if type(self.channel_scale) is not bool:
            raise ConfigError(f"channel_scale must be true or false, got {self.channel_scale!r}")
        if type(self.private_rank) is not int or self.private_rank < 0:
            raise ConfigError(f"private_rank must be a whole number >= 0, got {self.private_rank!r}")
        if self.basis_init not in BASIS_INITS:
            raise ConfigError(f"basis_init must be one of {', '.join(BASIS_INITS)}, got {self.basis_init!r}")
        if self.att_scale_init not in SCALE_INITS:
            raise ConfigError(f"att_scale_init must be one of {', '.join(SCALE_INITS)}, got {self.att_scale_init!r}")
        lr_scale = self.shared_lr_scale
        if type(lr_scale) not in (int, float) or not 1e-3 <= lr_scale <= 1e3:
            raise ConfigError(f"shared_lr_scale must be a number in [0.001, 1000], got {lr_scale!r}")

    @property
    def positions(self) -> tuple[str, ...]:
        return (("att", "mlp") if self.mode == "arc" else ("att",)) + self.extra_positions

    @property
    def extended(self) -> bool:
        """Whether any extension beyond the paper's ARC is on."""
        return any(getattr(self, name) != value for name, value in EXTENSION_DEFAULTS.items())

    @property
    def label(self) -> str:
        """How reports and servers name the method: ARC, ARC_att, or ARC+ when an extension is on."""
        return "ARC+" if self.extended else "ARC_att" if self.mode == "arc_att" else "ARC"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["blocks"] = list(self.blocks) if self.blocks is not None else None
        if not self.extended:  # the paper's ARC: the file arcvit 0.2 wrote
            return {k: v for k, v in d.items() if k not in EXTENSION_DEFAULTS}
        d["extra_positions"] = list(self.extra_positions)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ARCConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown ARC config field(s): {', '.join(sorted(unknown))}")
        d = dict(d)
        for name in ("blocks", "extra_positions"):
            if isinstance(d.get(name), list):
                d[name] = tuple(d[name])
        return cls(**d)
