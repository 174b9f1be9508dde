"""Method variants for matched-parameter comparisons: ``M@R`` is method M at rank R (``arc@4``, ``lora@1``).

A bench runs a variant as its own row, so that a method traced over several ranks becomes one line of the
accuracy-vs-trainable-parameters plot: the frontier a PETL comparison is read from.
"""
from __future__ import annotations

from arcvit.core.adapter_file import MAX_RANK
from arcvit.errors import ConfigError
from arcvit.methods import METHODS, SPECS
from arcvit.numbers import whole_number


def split_variant(name: str) -> tuple[str, int | None]:
    """'arc@4' -> ('arc', 4); 'arc' -> ('arc', None). Checked: a known method that has a rank, a positive rank."""
    method, at, rank = name.partition("@")
    if method not in SPECS:
        raise ConfigError(f"unknown method {method!r} in {name!r}; choose from {', '.join(METHODS)} "
                          "(or METHOD@RANK, e.g. arc@4)")
    if not at:
        return method, None
    if SPECS[method].default_rank is None:
        raise ConfigError(f"{name!r}: {method} has no rank to fix")
    return method, whole_number(rank, f"{name!r}: the rank after @", 1, MAX_RANK)  # the bounds of --rank


def line_of(label: str) -> str:
    """The method whose line a plotted point joins: 'arc@4' and 'arc' both join 'arc' (a '*' mark is dropped)."""
    return label.rstrip("*").partition("@")[0]
