"""A transformers vision model as an image classifier that returns logits, as arcvit's loops expect.

Models with their own head (``...ForImageClassification``) keep it: ``classifier``. Models without one
(``ViTModel``, ``Dinov2Model``, ``CLIPVisionModel`` ...) get a Linear on the feature their family's own
``...ForImageClassification`` classifies: the CLS token (ViT, DeiT), CLS next to the mean patch token (DINOv2,
registers left out), the mean patch token (CLIP), the mean token (SigLIP), the pooler's average (Swin) or,
for a model with a projection, its image embedding. The choice (``pool``) is recorded in adapter files.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from arcvit.errors import ModelError

OWN = "own"
POOLS = ("cls", "mean", "patch_mean", "cls+patch_mean", "pooler", "embeds", OWN)
FAMILY_POOL = {"vit": "cls", "deit": "cls", "dinov2": "cls+patch_mean", "dinov2_with_registers": "cls+patch_mean",
               "clip_vision_model": "patch_mean", "siglip_vision_model": "mean", "swin": "pooler",
               "swinv2": "pooler"}
# timm-style preprocessing for a model built without an image processor: HF's ViT processor defaults
DEFAULT_MEAN_STD = (0.5, 0.5, 0.5)


def has_own_head(model: nn.Module) -> bool:
    return isinstance(getattr(model, "classifier", None), nn.Linear)


def default_pool(model: nn.Module) -> str:
    """The pooling the family's own ``...ForImageClassification`` uses (``own`` where the model has a head)."""
    if has_own_head(model):
        return OWN
    if hasattr(model, "visual_projection"):
        return "embeds"
    kind = FAMILY_POOL.get(model.config.model_type)
    if kind is None:
        raise ModelError(f"{type(model).__name__}: arcvit has no classifier head rule for model_type "
                         f"{model.config.model_type!r} (known: {', '.join(sorted(FAMILY_POOL))})")
    return kind


def feature_dim(model: nn.Module, pool: str) -> int:
    config = model.config
    if pool == "embeds":
        return config.projection_dim
    width = getattr(model, "num_features", None)
    width = width if isinstance(width, int) else config.hidden_size
    return 2 * width if pool == "cls+patch_mean" else width


def pooled(output: Any, pool: str, skip: int) -> torch.Tensor:
    """The feature a headless model's output is classified on; ``skip`` tokens (CLS, registers) precede patches."""
    if pool == "pooler":
        return output.pooler_output.flatten(1)
    if pool == "embeds":
        return output.image_embeds
    tokens = output.last_hidden_state
    if pool == "cls":
        return tokens[:, 0]
    if pool == "mean":
        return tokens.mean(1)
    if pool == "patch_mean":
        return tokens[:, skip:].mean(1)
    return torch.cat([tokens[:, 0], tokens[:, skip:].mean(1)], dim=-1)


def _new_linear(model: nn.Module, in_features: int, num_classes: int) -> nn.Linear:
    with warnings.catch_warnings():  # num_classes=0 (a headless backbone for serving): torch notes a no-op init
        warnings.simplefilter("ignore", UserWarning)
        head = nn.Linear(in_features, num_classes)
    nn.init.normal_(head.weight, std=getattr(model.config, "initializer_range", 0.02))
    nn.init.zeros_(head.bias)
    return head.to(device=next(model.parameters()).device, dtype=next(model.parameters()).dtype)


class TransformersClassifier(nn.Module):
    """``model`` (a transformers vision model) with a classifier head; ``forward(images) -> logits``.

    It answers the timm-style calls arcvit makes on a backbone: ``pretrained_cfg`` (preprocessing),
    ``get_classifier``, ``reset_classifier``, ``set_grad_checkpointing``, and ``num_features`` /
    ``forward_features`` / ``forward_head(pre_logits=True)`` that multi-task serving runs per-task heads on.
    """

    def __init__(self, model: nn.Module, num_classes: int, pool: str | None = None,
                 preprocessing: dict | None = None, source: str | None = None) -> None:
        super().__init__()
        pool = pool or default_pool(model)
        if pool not in POOLS or (pool == OWN) != has_own_head(model):
            raise ModelError(f"{type(model).__name__}: head pool {pool!r} does not fit this model "
                             f"(choose one of {', '.join(POOLS)}; 'own' only for models with a classifier)")
        self.model, self.pool = model, pool
        self.source = source or model.config.name_or_path or type(model).__name__
        self.skip = 1 + getattr(model.config, "num_register_tokens", 0)
        self.head = None if pool == OWN else _new_linear(model, feature_dim(model, pool), num_classes)
        self.pretrained_cfg = preprocessing or default_preprocessing(model)
        self.pretrained_cfg["architecture"] = self.source
        if pool == OWN and model.classifier.out_features != num_classes:
            self.reset_classifier(num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        output = self.forward_features(images)
        return output.logits if self.head is None else self.forward_head(output)

    @property
    def num_features(self) -> int:
        """Width of the pooled feature the head reads."""
        return self.get_classifier().in_features

    def forward_features(self, images: torch.Tensor):
        """The wrapped model's own output."""
        return self.model(pixel_values=images)

    def forward_head(self, output, pre_logits: bool = False) -> torch.Tensor:
        """The pooled feature (``pre_logits``) or the logits, from ``forward_features``' output."""
        if self.head is None:
            raise ModelError(f"{type(self.model).__name__} pools inside its own classifier; for per-task heads "
                             "use its base model (e.g. ViTModel rather than ViTForImageClassification)")
        features = pooled(output, self.pool, self.skip)
        return features if pre_logits else self.head(features)

    def get_classifier(self) -> nn.Module:
        return self.model.classifier if self.head is None else self.head

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh head for ``num_classes`` (the model's own one is replaced in place, config updated)."""
        old = self.get_classifier()
        new = _new_linear(self.model, old.in_features, num_classes)
        if self.head is None:
            self.model.classifier = new
            self.model.config.num_labels = num_classes
        else:
            self.head = new

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.model.gradient_checkpointing_enable()
        else:
            self.model.gradient_checkpointing_disable()


def default_preprocessing(model: nn.Module) -> dict:
    """timm-style preprocessing from the model config alone (HF's ViT processor defaults)."""
    size = model.config.image_size
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    return {"input_size": (3, *size), "interpolation": "bilinear", "mean": DEFAULT_MEAN_STD,
            "std": DEFAULT_MEAN_STD, "crop_pct": 1.0}

