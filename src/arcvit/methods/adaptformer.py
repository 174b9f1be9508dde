"""AdaptFormer (Chen et al., 2022), the one baseline adapter written here: no maintained library offers it for timm."""
from __future__ import annotations

import torch
import torch.nn as nn

from arcvit.core.sites import find_blocks, readers
from arcvit.core.specs import block_spec_for
from arcvit.errors import ConfigError, ModelError


class AdaptFormerMLP(nn.Module):
    """A block's MLP plus AdaptFormer's parallel bottleneck: ``mlp(x) + s * up(dropout(relu(down(x))))``.

    The ReLU between ``down`` and ``up`` is why AdaptFormer cannot be folded into the backbone: it costs two
    extra matmuls per token at inference. ``up`` starts at zero, so training starts from the backbone itself.
    x is the MLP's normalised input; the sum passes through the block's layer scale and drop path, if any.
    """

    def __init__(self, mlp: nn.Module, dim: int, bottleneck: int, dropout: float, scale: float = 0.1) -> None:
        super().__init__()
        self.mlp = mlp
        self.down = nn.Linear(dim, bottleneck)  # its default kaiming-uniform(a=sqrt 5) is AdaptFormer's "lora" init
        self.up = nn.Linear(bottleneck, dim)
        self.dropout = nn.Dropout(dropout)
        self.scale = scale
        for tensor in (self.down.bias, self.up.weight, self.up.bias):
            nn.init.zeros_(tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x) + self.scale * self.up(self.dropout(torch.relu(self.down(x))))

    def extra_repr(self) -> str:
        return f"bottleneck={self.down.out_features}, scale={self.scale}"


def _mlp_host(name: str, block: nn.Module, width: int) -> str:
    """The block's MLP as its block spec names it; refused where that module does not return to the width
    (Swinv2's ``intermediate`` is only the MLP's first half), since the bottleneck's output is added to it."""
    host = block_spec_for(block).places["mlp"].host
    mlp = getattr(block, host)
    if not any(isinstance(m, nn.Linear) and m.out_features == width for m in mlp.modules()):
        raise ModelError(f"adaptformer: {name}.{host} ({type(mlp).__name__}) is not a whole MLP returning to the "
                         f"width {width}; AdaptFormer needs a block whose MLP is one module (ViT, DeiT, Swin, ...)")
    return host


def add_adaptformer(model: nn.Module, bottleneck: int, dropout: float) -> None:
    """Put an AdaptFormer bottleneck beside every block's MLP (the backbone is frozen by the caller)."""
    for name, block, _ in find_blocks(model):
        reference = readers(block, "mlp")[0].linear.weight
        if bottleneck > reference.shape[1]:
            raise ConfigError(f"rank {bottleneck} exceeds the model's width {reference.shape[1]} (at {name}): "
                              "AdaptFormer's bottleneck may be no wider than the MLP input it adapts")
        host = _mlp_host(name, block, reference.shape[1])
        adapter = AdaptFormerMLP(getattr(block, host), reference.shape[1], bottleneck, dropout)
        setattr(block, host, adapter.to(device=reference.device, dtype=reference.dtype).train(model.training))


def has_adaptformer(model: nn.Module) -> bool:
    return any(isinstance(m, AdaptFormerMLP) for m in model.modules())
