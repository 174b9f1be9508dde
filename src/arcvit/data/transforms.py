"""Image preprocessing for a backbone: timm's recipe for its pretrained config, or the ARC paper's fixed one.

The paper's recipe is what its reported figures used (NOAH's for VTAB-1k, VPT's for FGVC): ImageNet mean/std
whatever the backbone was trained with. The timm recipe instead follows the backbone's own pretrained config,
which is the right choice for backbones normalised differently (e.g. augreg's 0.5/0.5, arcvit's pico model).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch.nn as nn
from timm.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    create_transform,
    resolve_data_config,
    resolve_model_data_config,
)
from timm.data.transforms import str_to_interp_mode
from torchvision import transforms as T

from arcvit.data.images import to_rgb
from arcvit.errors import ConfigError

RECIPES = ("timm", "paper")
LAYOUTS = ("vtab", "fgvc", "folder")
# VPT's FGVC recipe resizes the shorter side to 256 before cropping 224 (bilinear, torchvision's default).
FGVC_RESIZE, FGVC_CROP = 256, 224


def data_config(model_or_pretrained_cfg: nn.Module | Any) -> dict[str, Any]:
    """timm's resolved data config (input_size, interpolation, mean, std, crop_pct) for a model or a
    pretrained cfg (a dict or timm's PretrainedCfg). A model built at another image size (timm's ``img_size``)
    keeps its pretrained cfg's size, so the size its patch embedding was built for wins."""
    if isinstance(model_or_pretrained_cfg, nn.Module):
        cfg = resolve_model_data_config(model_or_pretrained_cfg)
        built = getattr(getattr(model_or_pretrained_cfg, "patch_embed", None), "img_size", None)
        if built is not None:
            cfg["input_size"] = (3, *built) if isinstance(built, (tuple, list)) else (3, built, built)
        return cfg
    cfg = model_or_pretrained_cfg
    return resolve_data_config(pretrained_cfg=cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))


def _resize_crop(size: Sequence[int], resize: int, interpolation: str, mean: Sequence[float],
                 std: Sequence[float], train: bool) -> list[Callable]:
    """Resize the shorter side, then a random crop and flip (train) or a centre crop (eval)."""
    crop = [T.RandomCrop(size), T.RandomHorizontalFlip()] if train else [T.CenterCrop(size)]
    return [T.Resize(resize, interpolation=str_to_interp_mode(interpolation)), *crop,
            T.ToTensor(), T.Normalize(mean, std)]


def build_transform(model_or_pretrained_cfg: nn.Module | Any, *, recipe: str = "timm", train: bool,
                    layout: str = "vtab") -> Callable:
    """The PIL-image → tensor transform for training (``train``) or evaluation on a ``layout`` data set.

    - paper, vtab/folder: resize to the input size (bicubic), ImageNet mean/std, no augmentation.
    - paper, fgvc: resize the shorter side to 256/224 × input (bilinear), random crop + flip (train) or centre crop.
    - timm, vtab/folder and fgvc eval: timm's eval transform for the backbone (no augmentation).
    - timm, fgvc train: as the paper's, but resized by the backbone's crop_pct (so the object scale matches
      timm's eval transform) and normalised with the backbone's mean/std and interpolation.
    """
    if recipe not in RECIPES:
        raise ConfigError(f"recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
    if layout not in LAYOUTS:
        raise ConfigError(f"layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    cfg = data_config(model_or_pretrained_cfg)
    size = tuple(cfg["input_size"][1:])
    if recipe == "paper" and layout == "fgvc":
        steps = _resize_crop(size, max(size) * FGVC_RESIZE // FGVC_CROP, "bilinear",
                             IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, train)
    elif recipe == "paper":
        steps = [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                 T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    elif layout == "fgvc" and train:
        steps = _resize_crop(size, int(max(size) / cfg["crop_pct"]), cfg["interpolation"],
                             cfg["mean"], cfg["std"], train)
    else:
        steps = [create_transform(**cfg, is_training=False)]
    return T.Compose([T.Lambda(to_rgb), *steps])
