"""The timm backend: timm's block families, its classifier and naming hooks, creation, and the shipped ViT."""
from __future__ import annotations

import torch.nn as nn

from arcvit.backends.timm import specs, zoo  # noqa: F401  (registering: block specs; the shipped backbone)
from arcvit.core.specs import register_backend


class TimmBackend:
    """Every timm model has ``get_classifier`` and a ``pretrained_cfg`` naming its architecture."""

    name = "timm"

    def owns(self, model: nn.Module) -> bool:
        return type(model).__module__.startswith("timm.")

    def classifier(self, model: nn.Module) -> nn.Module | None:
        get = getattr(model, "get_classifier", None)
        return get() if callable(get) else None

    def identity(self, model: nn.Module) -> dict:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        return {"library": "timm", "name": cfg.get("architecture") or type(model).__name__,
                "class": type(model).__name__}


register_backend(TimmBackend())
