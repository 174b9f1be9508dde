"""Model libraries arcvit adapts: each backend registers its block specs and model hooks with the core.

``create_backbone`` is the one entry point for a backbone by name: ``transformers:ORG/NAME`` (a hub id or a
local folder) goes to the transformers backend, imported only then; any other name is a timm model.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

TRANSFORMERS_PREFIX = "transformers:"
DEFAULT_BACKBONE = "vit_pico_patch7_28.fmnist_arcvit"  # the shipped self-pretrained ViT (backends/timm/zoo.py)


def backbone_name(name: str) -> str:
    """A backbone name as run folders and merged files record it: a local transformers folder as an absolute
    path, so the file names the same model from any working directory."""
    folder = Path(name.removeprefix(TRANSFORMERS_PREFIX)).expanduser()
    if name.startswith(TRANSFORMERS_PREFIX) and folder.is_dir():
        return TRANSFORMERS_PREFIX + str(folder.resolve())
    return name


def create_backbone(name: str, num_classes: int, checkpoint: str | Path | None = None, pretrained: bool = True,
                    **kwargs) -> nn.Module:
    """A backbone with a fresh ``num_classes`` head, from the library its name points to."""
    if name.startswith(TRANSFORMERS_PREFIX):
        from arcvit.backends.transformers import create_backbone as create  # ModelError without transformers
    else:
        from arcvit.backends.timm.create import create_backbone as create
    return create(name, num_classes, checkpoint=checkpoint, pretrained=pretrained, **kwargs)
