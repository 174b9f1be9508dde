"""Create a transformers vision backbone from ``transformers:ORG/NAME`` (a hub id or a local folder).

The model class is the one its config names (``architectures``), else ``AutoModel``; preprocessing comes
from the folder's image processor config, translated to the timm-style ``pretrained_cfg`` that
``arcvit.data.transforms.build_transform`` reads.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModel
from transformers.utils import logging as hf_logging

from arcvit.backends.transformers.checks import (
    PROCESSOR,
    check_config_files,
    check_preprocessing,
    check_weight_files,
    file_name,
    model_class,
)
from arcvit.backends.transformers.heads import TransformersClassifier, default_pool, default_preprocessing
from arcvit.errors import ModelError, first_line

PREFIX = "transformers:"
# PIL resampling codes (what image processors store) -> timm interpolation names
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def source_of(name: str) -> str:
    """``transformers:ORG/NAME`` -> ``ORG/NAME`` (a hub id or a local folder)."""
    source = name.removeprefix(PREFIX)
    if not source:
        raise ModelError(f"backbone {name!r}: name a hub id or a local folder after {PREFIX!r}")
    return source


def _fail(source: str, what: str, error: Exception) -> ModelError:
    detail = first_line(error, 200)
    hint = "" if Path(source).is_dir() else (" Offline? Pass a local folder written by save_pretrained "
                                             "(config.json, weights and preprocessor_config.json)")
    return ModelError(f"cannot load the {what} of transformers model {source!r} ({type(error).__name__}: "
                      f"{detail}).{hint}")


def preprocessing(source: str, model: nn.Module) -> dict[str, Any]:
    """timm-style input size, interpolation, mean/std and crop from the model's image processor config,
    checked to fit the model (``checks.check_preprocessing``)."""
    try:
        processor = AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, StrictDataclassError) as e:
        if (Path(source) / PROCESSOR).is_file() or not Path(source).is_dir():
            raise _fail(source, "image processor", e) from None
        return default_preprocessing(model)  # a folder without one: the config's image size, HF's defaults
    try:
        cfg = _timm_preprocessing(processor)
    except (TypeError, ValueError, AttributeError) as e:
        raise ModelError(f"{file_name(source, PROCESSOR)}: field size/crop_size: not a usable image size "
                         f"({type(e).__name__}: {str(e)[:120]})") from None
    resample = getattr(processor, "resample", 2)
    if not isinstance(resample, int) or isinstance(resample, bool) or int(resample) not in RESAMPLE:
        raise ModelError(f"{file_name(source, PROCESSOR)}: field resample: {resample!r} is not a PIL "
                         f"resampling code ({', '.join(f'{k} {v}' for k, v in RESAMPLE.items())})")
    cfg["interpolation"] = RESAMPLE[int(resample)]
    check_preprocessing(cfg, model, source)
    return cfg


def _timm_preprocessing(processor: Any) -> dict[str, Any]:
    size = processor.size
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    if crop is not None and crop.height:
        resize = size.shortest_edge or min(size.height, size.width)
        out = {"input_size": (3, crop.height, crop.width), "crop_pct": min(crop.height, crop.width) / resize,
               "crop_mode": "center"}
    elif size.shortest_edge:
        out = {"input_size": (3, size.shortest_edge, size.shortest_edge), "crop_pct": 1.0, "crop_mode": "center"}
    else:  # a fixed height x width resize, no crop: timm's "squash"
        out = {"input_size": (3, size.height, size.width), "crop_pct": 1.0, "crop_mode": "squash"}
    mean, std = processor.image_mean, processor.image_std
    return {**out, "mean": tuple(mean) if isinstance(mean, (list, tuple)) else mean,
            "std": tuple(std) if isinstance(std, (list, tuple)) else std}


def create_backbone(name: str, num_classes: int, checkpoint: str | Path | None = None, pretrained: bool = True,
                    drop_path_rate: float = 0.0) -> TransformersClassifier:
    """A transformers vision model with a ``num_classes`` head: its own one, or one added the family's way."""
    source = source_of(name)
    with _offline_if_unreachable(source):
        return _create(source, num_classes, checkpoint, pretrained, drop_path_rate)


@contextlib.contextmanager
def _offline_if_unreachable(source: str) -> Iterator[None]:
    """A hub id with the Hub unreachable: huggingface_hub's offline mode (cache only, no minute of retries)."""
    from huggingface_hub import constants

    from arcvit.backends.timm.hub import hub_reachable
    if Path(source).is_dir() or hub_reachable():
        yield
        return
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _create(source: str, num_classes: int, checkpoint: str | Path | None, pretrained: bool,
            drop_path_rate: float) -> TransformersClassifier:
    folder = Path(source) if Path(source).is_dir() else None
    if folder is not None:
        check_config_files(folder)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError, TypeError, StrictDataclassError) as e:
        raise _fail(source, "config", e) from None
    if drop_path_rate:
        if not hasattr(config, "drop_path_rate"):
            raise ModelError(f"{source}: {type(config).__name__} has no drop_path_rate; train with drop_path 0")
        config.drop_path_rate = drop_path_rate
    cls = model_class(config, source) or AutoModel
    load = pretrained and checkpoint is None
    if load and folder is not None:
        check_weight_files(folder)
    try:
        with _quiet():
            if load:  # safetensors only: a pickled .bin is never read
                model, info = cls.from_pretrained(source, config=config, output_loading_info=True,
                                                  use_safetensors=True)
                _drop_unloaded_pooler(model, source, list(info["missing_keys"]))
            else:
                model = cls._from_config(config) if cls is not AutoModel else AutoModel.from_config(config)
    except (OSError, ValueError, RuntimeError, TypeError, SafetensorError) as e:
        raise _fail(source, "weights" if load else "model", e) from None
    # a local folder is named by its folder name, so that an adapter does not depend on where it is read from
    label = Path(source).resolve().name if Path(source).is_dir() else source
    classifier = TransformersClassifier(model, num_classes, preprocessing=preprocessing(source, model),
                                        source=PREFIX + label)
    if checkpoint is not None:
        _load_checkpoint(classifier, Path(checkpoint))
    return classifier


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No loading bars or load reports from transformers: arcvit reports what matters itself."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _drop_unloaded_pooler(model: nn.Module, source: str, missing: list[str]) -> None:
    """A folder saved without the pooler (``add_pooling_layer=False``) loads with a random one: drop it, as it is
    unused by the head arcvit adds and would make the backbone's fingerprint change from one load to the next.
    Any other weight missing from the folder is an error."""
    if missing and all(k.startswith("pooler.") for k in missing) and default_pool(model) != "pooler":
        model.pooler = None
    elif missing:
        raise ModelError(f"{source}: the weights do not fit {type(model).__name__} (missing: {missing[:5]})")


def _load_checkpoint(model: TransformersClassifier, path: Path) -> None:
    from arcvit.backends.timm.create import read_checkpoint
    state = read_checkpoint(path)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of another shape
        reason = str(e).splitlines()[-1].strip()
        raise ModelError(f"{path}: does not fit {type(model.model).__name__} ({reason})") from None
    inner = [k[len("model."):] for k in missing if k.startswith("model.")]
    if len(inner) == len(missing):  # a merged file from a model whose unused pooler was dropped
        _drop_unloaded_pooler(model.model, str(path), inner)
        missing = []
    if missing or unexpected:
        raise ModelError(f"{path}: does not fit {type(model.model).__name__} with an arcvit head (missing: "
                         f"{missing[:5]}, unexpected: {unexpected[:5]})")
