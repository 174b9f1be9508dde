"""The pixel budget applies to every image a request makes the server hold, not only to the upload.

The eval transform resizes an image's shorter side to the model's scale before cropping: a 1,000,000 x 1 PNG
(a few hundred bytes) would become a 32,000,000 x 32 image on the pico model, and a 248,000,000 x 248 one on a
224-pixel model: gigabytes, from a tiny upload. ``ResizePlan`` follows the transform's geometry from the
upload's header alone (its width and height), so that such an upload is refused before anything is allocated.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Callable, Iterator

from arcvit.errors import ConfigError

Size = tuple[int, int]  # (width, height), as PIL says it


def _steps(transform) -> Iterator:
    """The transform's steps, nested ``Compose`` flattened."""
    inner = getattr(transform, "transforms", None)
    if isinstance(inner, (list, tuple)):
        for step in inner:
            yield from _steps(step)
    else:
        yield transform


def _shorter_side(size: Size, target: int, max_size: int | None) -> Size:
    """torchvision's ``Resize(int)``: the shorter side becomes ``target``, the longer one keeps the ratio."""
    width, height = size
    short, long = min(width, height), max(width, height)
    new_short, new_long = target, int(target * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_short, new_long) if width <= height else (new_long, new_short)


def _resize(step, size: Size) -> Size:
    target = step.size
    if isinstance(target, int) or (isinstance(target, (list, tuple)) and len(target) == 1):
        return _shorter_side(size, int(target if isinstance(target, int) else target[0]), step.max_size)
    return int(target[1]), int(target[0])  # a fixed (height, width)


def _keep_ratio(step, size: Size) -> Size:
    """timm's ``ResizeKeepRatio``, asked for its output size on an image of ``size`` (it reads only ``.size``)."""
    height, width = step.get_params(SimpleNamespace(size=size), step.size, step.longest)
    return int(width), int(height)


def _crop(step, _size: Size) -> Size:
    height, width = step.size if len(step.size) == 2 else (step.size[0], step.size[0])
    return int(width), int(height)


# Each known geometry step, by class name: its output size for an input size. Steps not named here and
# without "resize" in their name keep the image's size (conversions, normalisation, tensors).
_GEOMETRY: dict[str, Callable] = {"Resize": _resize, "ResizeKeepRatio": _keep_ratio, "CenterCrop": _crop,
                                  "CenterCropOrPad": _crop}


class ResizePlan:
    """The sizes a transform's steps give an image, known from the image's size alone."""

    def __init__(self, transform) -> None:
        self.geometry = []
        for step in _steps(transform):
            kind = type(step).__name__
            if kind in _GEOMETRY:
                self.geometry.append((_GEOMETRY[kind], step))
            elif "resize" in kind.lower():  # a resize whose output cannot be bounded here: refuse to serve
                raise ConfigError(f"the model's transform step {kind} changes image sizes in a way the server "
                                  "cannot bound before decoding")

    def largest(self, size: Size) -> int:
        """The most pixels any step's output holds for an input of ``size`` (the input itself not counted)."""
        most = 0
        for output, step in self.geometry:
            size = output(step, size)
            most = max(most, size[0] * size[1])
        return most
