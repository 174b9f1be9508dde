"""Numbers a person types (command-line options, request fields), one parser per kind, so that every option of a
kind is read the same way and refused with the same one line.

Python's own ``int()`` and ``float()`` accept far more than a person means to type: ``'١٢'`` (Arabic-Indic
digits), ``'１０'`` (full-width), ``'1_000'``, ``' 5 '``, ``'+5'``, ``'nan'``, ``'inf'``. Here a number is ASCII
digits within stated bounds: a whole number is digits only; a decimal number has at most one ``.``; a real
number may also carry an exponent (``1e-3``, for learning rates). Anything else is one error naming the option
and its bounds. Every package may use this module (docs/architecture.md).
"""
from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from typing import Callable, NamedTuple

from arcvit.errors import ConfigError

MAX_CHARS = 32  # longer text is out of every bound here: refused before converting (int() of 5000 digits raises)


class _Kind(NamedTuple):
    noun: str
    pattern: re.Pattern
    spelling: str  # what the refusal says a number of this kind looks like
    convert: Callable[[str], float]


_WHOLE = _Kind("a whole number", re.compile(r"[0-9]+"), "ASCII digits", int)
_DECIMAL = _Kind("a number", re.compile(r"[0-9]+(?:\.[0-9]+)?"), "ASCII digits", float)
_REAL = _Kind("a number", re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"),
              "ASCII digits, optionally with an exponent as in 1e-3", float)


def _show(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"  # 4294967295, not 4.29497e+09


def _bounds(low: float, high: float, above: bool, below: bool) -> str:
    """'from 1 to 64', or with an open end '0 < x <= 10' (``above``: low itself is out; ``below``: high is out)."""
    if not (above or below):
        return f"from {_show(low)} to {_show(high)}"
    return f"{_show(low)} {'<' if above else '<='} x {'<' if below else '<='} {_show(high)}"


def _within(value: float, low: float, high: float, above: bool, below: bool) -> bool:
    """Finite and inside the bounds (``above``/``below``: that bound itself is out)."""
    return math.isfinite(value) and (low < value if above else low <= value) and (
        value < high if below else value <= high)


def _parse(kind: _Kind, text: object, name: str, low: float, high: float, above: bool = False,
           below: bool = False) -> float:
    """``text`` as ``kind`` within the bounds, else a ConfigError that names ``name`` (when given) and the bounds."""
    value = None
    if isinstance(text, str) and len(text) <= MAX_CHARS and kind.pattern.fullmatch(text):
        value = kind.convert(text)
    if value is None or not _within(value, low, high, above, below):
        prefix = f"{name}: " if name else ""
        raise ConfigError(f"{prefix}expected {kind.noun} {_bounds(low, high, above, below)} ({kind.spelling}), "
                          f"got {text!r}")
    return value


def whole_number(text: object, name: str, low: int, high: int) -> int:
    """``text`` as an int in [low, high]: ASCII digits only (no sign, space, '_', '.', or other scripts' digits)."""
    return _parse(_WHOLE, text, name, low, high)


def decimal_number(text: object, name: str, low: float, high: float) -> float:
    """``text`` as a float in [low, high]: ASCII digits with at most one '.', no exponent, sign, nan or inf."""
    return _parse(_DECIMAL, text, name, low, high)


def real_number(text: object, name: str, low: float, high: float, above: bool = False,
                below: bool = False) -> float:
    """``text`` as a finite float within the bounds (``above``/``below``: the bound itself is out): a decimal
    number, optionally with an ASCII exponent (``1e-3``, ``3E-2``); never nan, inf, a sign in front or '_'."""
    return _parse(_REAL, text, name, low, high, above, below)


def _flag(kind: _Kind, low: float, high: float, above: bool = False, below: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            return _parse(kind, text, "", low, high, above, below)
        except ConfigError as e:  # argparse names the flag: "argument --lr: expected ..."
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def whole_flag(low: int, high: int) -> Callable[[str], int]:
    """An argparse ``type=`` for a whole number in [low, high]; a refusal is argparse's one-line error (exit 2)."""
    return _flag(_WHOLE, low, high)


def real_flag(low: float, high: float, above: bool = False, below: bool = False) -> Callable[[str], float]:
    """An argparse ``type=`` for a finite real number within the bounds (see ``real_number``)."""
    return _flag(_REAL, low, high, above, below)


@dataclass(frozen=True)
class Range:
    """The stated range of one numeric setting, written once and read three ways: as a flag's parser, as the
    check of a value from a recipe file or Python, and as the text of the docs and ``--help``."""

    low: float
    high: float
    whole: bool = False
    above: bool = False  # low itself is out
    below: bool = False  # high itself is out

    def flag(self) -> Callable[[str], float]:
        return whole_flag(int(self.low), int(self.high)) if self.whole else \
            real_flag(self.low, self.high, self.above, self.below)

    def describe(self) -> str:
        return _bounds(self.low, self.high, self.above, self.below)

    def check(self, value: object, name: str) -> float:
        """``value`` (already a number: from TOML, JSON or Python) of the right kind and within range."""
        kind = (int,) if self.whole else (int, float)
        noun = _WHOLE.noun if self.whole else _REAL.noun
        if not (isinstance(value, kind) and not isinstance(value, bool) and
                _within(value, self.low, self.high, self.above, self.below)):
            raise ConfigError(f"{name}: expected {noun} {self.describe()}, got {value!r}")
        return value
