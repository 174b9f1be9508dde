"""Procedurally rendered structured tasks (counting, position, orientation, distance) in the spirit of
VTAB's dSprites and CLEVR tasks, at the 28x28 grey resolution of arcvit's shipped backbone.

Images are deterministic functions of ``(n, seed)``. Shapes are drawn with Pillow at 4x resolution and
box-filtered down (anti-aliasing), over a random shading gradient with dim specks and pixel noise, so that a
task cannot be solved by reading one pixel. Labels are exactly balanced (``n`` spread over the classes).

Coordinates are continuous pixel units: pixel (row i, column j) covers [j, j+1) x [i, i+1); angles are in
degrees, counter-clockwise from the image's x axis as seen on screen (up is +y).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

from arcvit.data.sources import ArraySource
from arcvit.errors import ConfigError

IMAGE_SIZE = 28
_SUPERSAMPLE = 4
_CELL = IMAGE_SIZE / 3
_ORIENTATION_BINS = 8
_DISTANCE_EDGES = (7.0, 11.0, 15.0, 19.0, 23.0)
# Compact shapes, each inscribed in a circle of its radius (so circles bound them when spacing them out).
_COMPACT_SIDES = {"circle": 24, "square": 4, "triangle": 3, "pentagon": 5}

COUNT_CLASSES = tuple(f"{k} shape{'s' if k > 1 else ''}" for k in range(1, 7))
LOCATION_CLASSES = tuple(f"{row}-{col}" for row in ("top", "middle", "bottom") for col in ("left", "centre", "right"))
ORIENTATION_CLASSES = tuple(f"{b * 180 / _ORIENTATION_BINS:g}-{(b + 1) * 180 / _ORIENTATION_BINS:g} deg"
                            for b in range(_ORIENTATION_BINS))
DISTANCE_CLASSES = tuple(f"{lo:g}-{hi:g} px" for lo, hi in zip(_DISTANCE_EDGES, _DISTANCE_EDGES[1:]))


class _Canvas:
    """A supersampled drawing surface that starts with clutter and ends as a noisy 28x28 uint8 image."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.image = Image.new("L", (IMAGE_SIZE * _SUPERSAMPLE,) * 2, 0)
        self.draw = ImageDraw.Draw(self.image)
        for _ in range(rng.integers(0, 4)):  # dim specks: visible, but never as bright as a shape
            x, y = rng.uniform(1, IMAGE_SIZE - 1, size=2)
            self.shape(_regular(8, rng.uniform(0.4, 0.9)), x, y, 0.0, int(rng.integers(40, 81)))

    def shape(self, vertices: np.ndarray, cx: float, cy: float, angle: float, value: int) -> None:
        """Fill ``vertices`` (shape-local, +y up) rotated by ``angle`` and centred at (cx, cy)."""
        a = math.radians(angle)
        u, v = vertices[:, 0], vertices[:, 1]
        x = cx + u * math.cos(a) - v * math.sin(a)
        y = cy - (u * math.sin(a) + v * math.cos(a))
        self.draw.polygon(list(zip((x * _SUPERSAMPLE).tolist(), (y * _SUPERSAMPLE).tolist())), fill=value)

    def random_compact(self, cx: float, cy: float, radius: float) -> None:
        """A shape of random kind, rotation and brightness."""
        sides = _COMPACT_SIDES[self.rng.choice(list(_COMPACT_SIDES))]
        self.shape(_regular(sides, radius), cx, cy, self.rng.uniform(0, 360), _brightness(self.rng))

    def finish(self) -> np.ndarray:
        small = np.asarray(self.image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX), dtype=np.float64)
        ramp = np.linspace(-0.5, 0.5, IMAGE_SIZE)
        gx, gy = self.rng.normal(size=2)
        shade = self.rng.uniform(0, 30) + self.rng.uniform(0, 25) * (gx * ramp[None, :] + gy * ramp[:, None])
        noisy = np.maximum(small, shade) + self.rng.normal(0, 5, size=small.shape)
        return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _regular(sides: int, radius: float) -> np.ndarray:
    t = 2 * np.pi * np.arange(sides) / sides
    return radius * np.stack([np.cos(t), np.sin(t)], axis=1)


def _elongated(kind: str, length: float, width: float) -> np.ndarray:
    """A shape whose long axis is the local x axis: a bar, an ellipse, or a spike (thin isosceles triangle)."""
    half_l, half_w = length / 2, width / 2
    if kind == "bar":
        return np.array([[half_l, half_w], [-half_l, half_w], [-half_l, -half_w], [half_l, -half_w]])
    if kind == "ellipse":
        t = 2 * np.pi * np.arange(24) / 24
        return np.stack([half_l * np.cos(t), half_w * np.sin(t)], axis=1)
    return np.array([[half_l, 0.0], [-half_l, half_w], [-half_l, -half_w]])


def _brightness(rng: np.random.Generator) -> int:
    return int(rng.integers(170, 256))


def _inside(rng: np.random.Generator, margin: float, size: int = 2) -> np.ndarray:
    """Random centre(s) keeping a shape of bounding radius ``margin`` one pixel clear of the border."""
    return rng.uniform(margin + 1, IMAGE_SIZE - 1 - margin, size=size)


def _draw_count(canvas: _Canvas, label: int) -> None:
    """``label + 1`` shapes whose bounding circles stay 2 px apart (so they never touch, even 8-connected)."""
    rng = canvas.rng
    radii = rng.uniform(2.5, 3.5, size=label + 1)
    placed: list[tuple[np.ndarray, float]] = []
    while len(placed) < len(radii):
        r = radii[len(placed)]
        for _ in range(100):
            c = _inside(rng, r)
            if all(np.hypot(*(c - d)) >= r + s + 2 for d, s in placed):
                placed.append((c, r))
                break
        else:  # jammed: start the layout again
            placed.clear()
    for (x, y), r in placed:
        canvas.random_compact(x, y, r)


def _draw_location(canvas: _Canvas, label: int) -> None:
    """One shape whose centre lies in grid cell ``label`` (row-major), at least 0.5 px from the cell's edges."""
    rng = canvas.rng
    r = rng.uniform(2.5, 4.5)
    row, col = divmod(label, 3)
    x, y = (rng.uniform(max(k * _CELL + 0.5, r + 1), min((k + 1) * _CELL - 0.5, IMAGE_SIZE - 1 - r))
            for k in (col, row))
    canvas.random_compact(x, y, r)


def _draw_orientation(canvas: _Canvas, label: int) -> None:
    """One elongated shape whose long axis, taken modulo 180 degrees, falls in angle bin ``label``."""
    rng = canvas.rng
    kind = rng.choice(["bar", "ellipse", "spike"])
    length, width = rng.uniform(12, 18), rng.uniform(3, 5)
    angle = (label + rng.uniform()) * 180 / _ORIENTATION_BINS + 180 * rng.integers(0, 2)
    x, y = _inside(rng, length / 2)
    canvas.shape(_elongated(kind, length, width), x, y, angle, _brightness(rng))


def _draw_distance(canvas: _Canvas, label: int) -> None:
    """Two shapes whose centres are a distance in bin ``label`` apart (0.5 px clear of the bin's edges)."""
    rng = canvas.rng
    r1, r2 = rng.uniform(2.5, 3.0, size=2)
    d = rng.uniform(_DISTANCE_EDGES[label] + 0.5, _DISTANCE_EDGES[label + 1] - 0.5)
    while True:
        first = _inside(rng, r1)
        phi = rng.uniform(0, 2 * np.pi)
        second = first + d * np.array([np.cos(phi), np.sin(phi)])
        if np.all((second >= r2 + 1) & (second <= IMAGE_SIZE - 1 - r2)):
            break
    canvas.random_compact(*first, r1)
    canvas.random_compact(*second, r2)


def _render(name: str, class_names: tuple[str, ...], description: str,
            draw_one: Callable[[_Canvas, int], None], n: int, seed: int) -> ArraySource:
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"{name}: number of images must be a positive integer, got {n!r}")
    rng = np.random.default_rng([seed, *name.encode()])  # distinct streams per task for the same seed
    labels = rng.permutation(np.arange(n) % len(class_names)).astype(np.int64)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for i, label in enumerate(labels.tolist()):
        canvas = _Canvas(rng)
        draw_one(canvas, label)
        images[i] = canvas.finish()
    return ArraySource(name, images, labels, class_names, description)


def render_count(n: int = 2000, seed: int = 0) -> ArraySource:
    """How many shapes (1-6) are there? (cf. CLEVR count)"""
    return _render("shapes_count", COUNT_CLASSES, "count 1-6 non-touching shapes (label = count - 1)",
                   _draw_count, n, seed)


def render_location(n: int = 2000, seed: int = 0) -> ArraySource:
    """Which cell of a 3x3 grid holds the shape's centre? (cf. dSprites location)"""
    return _render("shapes_location", LOCATION_CLASSES, "3x3 grid cell of one shape's centre, row-major",
                   _draw_location, n, seed)


def render_orientation(n: int = 2000, seed: int = 0) -> ArraySource:
    """Which of 8 bins over 180 degrees holds the long axis of a bar, ellipse or spike? (cf. dSprites orientation)"""
    return _render("shapes_orientation", ORIENTATION_CLASSES, "orientation of an elongated shape, 8 bins over 180 deg",
                   _draw_orientation, n, seed)


def render_distance(n: int = 2000, seed: int = 0) -> ArraySource:
    """How far apart are the centres of two shapes, in 4 bins? (cf. CLEVR distance)"""
    return _render("shapes_distance", DISTANCE_CLASSES, "distance between two shapes' centres, 4 bins of 4 px",
                   _draw_distance, n, seed)
