"""arcvit's own small pretrained backbone, registered with timm.

No pretrained ViT can be downloaded on an offline machine and none ships in a package, so arcvit ships one:
``vit_pico_patch7_28.fmnist_arcvit``, a 1.2M-parameter timm VisionTransformer pretrained by
``scripts/pretrain_fmnist_vit.py`` on Fashion-MNIST. It is self-pretrained (not a Google or timm release), and
exists so that the demo, the offline benchmark and the tests exercise real pretrained weights end to end.
Registering it with timm means ``timm.create_model(name, pretrained=True)`` loads it through timm's own
pretrained-weight path, exactly as a hub model would.
"""
from __future__ import annotations

from pathlib import Path

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from arcvit.backends import DEFAULT_BACKBONE

WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "weights"
PICO_NAME, PICO_TAG = DEFAULT_BACKBONE.split(".")
PICO_WEIGHTS = WEIGHTS_DIR / f"{PICO_NAME}.{PICO_TAG}.safetensors"
PICO_PROVENANCE = WEIGHTS_DIR / f"{PICO_NAME}.{PICO_TAG}.json"

# Fashion-MNIST pixel statistics (grey, replicated over the three input channels).
FMNIST_MEAN = (0.2860, 0.2860, 0.2860)
FMNIST_STD = (0.3530, 0.3530, 0.3530)

PICO_ARCH = dict(img_size=28, patch_size=7, embed_dim=128, depth=6, num_heads=4, mlp_ratio=4.0)

default_cfgs = generate_default_cfgs({
    f"{PICO_NAME}.{PICO_TAG}": {
        "file": str(PICO_WEIGHTS),
        "num_classes": 10,
        "input_size": (3, 28, 28),
        "pool_size": None,
        "crop_pct": 1.0,
        "crop_mode": "center",
        "interpolation": "bicubic",
        "mean": FMNIST_MEAN,
        "std": FMNIST_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "mit",
        "notes": ("Self-pretrained by arcvit on Fashion-MNIST (scripts/pretrain_fmnist_vit.py); "
                  "see the .json beside the weights for provenance.",),
    },
})


@register_model
def vit_pico_patch7_28(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Pico/7 at 28x28: 6 blocks of width 128, 4 heads, 16 patch tokens plus a class token."""
    args = {**PICO_ARCH, **kwargs}
    return build_model_with_cfg(
        VisionTransformer, PICO_NAME, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **args)
