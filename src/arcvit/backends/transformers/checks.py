"""Checks of a transformers model folder before and after transformers reads it, so that a broken or crafted
folder is one line naming the file and field, never a traceback from deep inside transformers or a model
that runs on wrong preprocessing.

- ``config.json``: sizes are whole numbers within bounds (a huge one would be allocated before anything
  else fails), probabilities within [0, 1), the width divides into the heads, ``architectures`` names a
  transformers vision class that fits the config's ``model_type``.
- weights: only ``.safetensors`` are read (a ``.bin``/``.pt`` pickle is refused, never unpickled), and each
  file's header must cover its bytes (a truncated file is named).
- ``preprocessor_config.json``: sizes within bounds and accepted by the model's own embeddings (a ViT built
  for 224 refuses 384), one finite mean and one positive finite std per input channel, a known resample.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError, safe_open
from torch import nn

from arcvit.core import headers
from arcvit.errors import ModelError, first_line

CONFIG = "config.json"
PROCESSOR = "preprocessor_config.json"
# config.json sizes (bounds far above any released vision model: ViT-22B has width 6144 and 48 blocks)
SIZE_BOUNDS = {"hidden_size": 1 << 15, "intermediate_size": 1 << 17, "num_hidden_layers": 512,
               "num_attention_heads": 1024, "num_channels": 64, "embed_dim": 1 << 15, "projection_dim": 1 << 15,
               "num_register_tokens": 1024, "window_size": 1024, "patch_size": 1024, "image_size": 8192,
               "num_labels": headers.MAX_CLASSES}
LIST_SIZES = ("depths", "num_heads")
PROBABILITIES = ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout", "dropout",
                 "drop_path_rate")
MAX_SIDE = 8192  # pixels per side of a preprocessed image
PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_config_files(folder: Path) -> None:
    """``config.json`` of a local folder, field by field, and ``preprocessor_config.json`` as a JSON object,
    before transformers builds anything from them."""
    for name in (CONFIG, PROCESSOR):
        path = folder / name
        if not path.is_file():
            continue  # transformers names a missing config; a missing processor means HF's defaults
        try:
            config = headers.read_json_file(path)
            headers.mapping(config, "(top level)")
            if name == CONFIG:
                _check_config_fields(config)
        except headers.HeaderError as e:
            raise ModelError(f"{path}: {e}") from None


def _check_config_fields(config: dict) -> None:
    for name, bound in SIZE_BOUNDS.items():
        value = config.get(name)
        if name in ("patch_size", "image_size") and isinstance(value, list):
            for i, side in enumerate(value):
                headers.count(side, f"{name}[{i}]", high=bound)
        elif value is not None:
            headers.count(value, name, high=bound)
    for name in LIST_SIZES:
        value = config.get(name)
        if value is not None:
            if not isinstance(value, list) or not value:
                raise headers.HeaderError(f"field {name}: expected a list of whole numbers, got {value!r:.40}")
            for i, item in enumerate(value):
                headers.count(item, f"{name}[{i}]", high=SIZE_BOUNDS["num_hidden_layers"])
    for name in PROBABILITIES:
        value = config.get(name)
        if value is not None and (type(value) not in (int, float) or not 0 <= value < 1):
            raise headers.HeaderError(f"field {name}: expected a probability in [0, 1), got {value!r:.40}")
    width, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if width and heads and width % heads:
        raise headers.HeaderError(f"field hidden_size: {width} does not split into num_attention_heads {heads}")
    names = config.get("architectures")
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
        raise headers.HeaderError(f"field architectures: expected a list of class names, got {names!r:.40}")


def model_class(config: Any, source: str) -> type | None:
    """The class ``architectures`` names (a transformers vision model for this config); None if it names none."""
    for name in config.architectures or []:
        cls = getattr(transformers, name, None)
        where = f"{file_name(source, CONFIG)}: field architectures: {name!r}"
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ModelError(f"{where} is not a model class of transformers {transformers.__version__}")
        if getattr(cls, "main_input_name", None) != "pixel_values":
            raise ModelError(f"{where} is not a vision model (it reads {getattr(cls, 'main_input_name', None)!r}, "
                             "not images)")
        wanted = getattr(cls, "config_class", None)
        if isinstance(wanted, type) and not isinstance(config, wanted):
            raise ModelError(f"{where} needs a {wanted.__name__}, but model_type {config.model_type!r} gives a "
                             f"{type(config).__name__}")
        return cls
    return None


def check_weight_files(folder: Path) -> None:
    """Only safetensors weights, each whole (its header covers the file): checked before transformers reads."""
    tensors = sorted(folder.glob("*.safetensors"))
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLED_WEIGHTS)
    if not tensors and pickles:
        raise ModelError(f"{pickles[0]}: refused: arcvit reads transformers weights only from .safetensors "
                         "(this format is a pickle, which can run code when loaded); save the model again with "
                         "save_pretrained (safetensors is its default)")
    for path in tensors:
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise ModelError(f"{path}: not a readable safetensors file ({e}); truncated or corrupt?") from None


def check_preprocessing(cfg: dict[str, Any], model: nn.Module, source: str) -> None:
    """timm-style preprocessing read from an image processor: within bounds, and fit for ``model``."""
    where = file_name(source, PROCESSOR)
    channels = getattr(model.config, "num_channels", 3)
    _, height, width = cfg["input_size"]
    for field, values, low in (("image_mean", cfg["mean"], -math.inf), ("image_std", cfg["std"], 0.0)):
        if not isinstance(values, (list, tuple)) or len(values) != channels or not all(
                type(v) in (int, float) and math.isfinite(v) and v > low for v in values):
            need = "positive" if low == 0 else "finite"
            raise ModelError(f"{where}: field {field}: expected {channels} {need} numbers (one per channel), "
                             f"got {values!r:.60}")
    if not all(type(s) is int and 0 < s <= MAX_SIDE for s in (height, width)):
        raise ModelError(f"{where}: field size/crop_size: {height} x {width} pixels is outside 1..{MAX_SIDE}")
    embeddings = next((m for m in model.modules() if type(m).__name__.endswith("Embeddings")), None)
    if embeddings is None:
        return
    parameter = next(model.parameters())
    try:
        with torch.no_grad():
            embeddings(torch.zeros(1, channels, height, width, dtype=parameter.dtype, device=parameter.device))
    except (ValueError, RuntimeError) as e:
        reason = first_line(e, 200)
        raise ModelError(f"{where}: field size/crop_size: {height} x {width} images do not fit "
                         f"{type(model).__name__} (its {CONFIG} has image_size "
                         f"{getattr(model.config, 'image_size', '?')}): {reason}") from None


def file_name(source: str, name: str) -> str:
    """A local folder's file, or the hub id and the file's name."""
    return str(Path(source) / name) if Path(source).is_dir() else f"{source} ({name})"
