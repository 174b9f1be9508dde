"""The search space of ``arcvit tune``: per method, which training settings are searched and over what range.

Read from the packaged ``configs/search_space.toml`` (its header explains the format), with a user's file applied
over it entry by entry. Every name, range and value is checked when the file is read, before any trial runs.
"""
from __future__ import annotations

import math
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arcvit.errors import ConfigError
from arcvit.methods.registry import METHODS, SPECS

SEARCH_SPACE_FILE = Path(__file__).resolve().parent.parent / "configs" / "search_space.toml"
SEARCHABLE = ("lr", "weight_decay", "rank", "adapter_dropout", "label_smoothing", "drop_path", "epochs",
              "warmup_epochs", "batch_size", "grad_clip")
WHOLE = ("rank", "epochs", "warmup_epochs", "batch_size")  # integer settings: their ranges have integer ends
ADAPTER_ONLY = ("rank", "adapter_dropout")
EDGE_FRACTION = 0.05  # a tuned value this close to an end of its range (of its width; log width on a log scale)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Range:
    """One searched setting: ``choices``, or ``low``..``high`` (log scale if ``log``)."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None

    def suggest(self, trial: Any) -> Any:
        """The trial's value for this setting (``trial``: an optuna.Trial)."""
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if isinstance(self.low, int) and isinstance(self.high, int):
            return trial.suggest_int(self.name, self.low, self.high, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def ends(self) -> tuple[Any, ...]:
        """The extreme values a trial can get, to check them as settings before searching."""
        return (min(self.choices), max(self.choices)) if self.choices is not None else (self.low, self.high)

    def to_dict(self) -> dict[str, Any]:
        if self.choices is not None:
            return {"choices": list(self.choices)}
        return {"low": self.low, "high": self.high, "log": self.log}

    def edge(self, value: Any) -> str | None:
        """'low' or 'high' when ``value`` lies within ``EDGE_FRACTION`` of that end of the range: the best value
        may lie beyond it, so the range binds. Choices: the smallest or largest of three or more."""
        if not _number(value):
            return None
        if self.choices is not None:
            if len(self.choices) < 3:
                return None
            return "low" if value == min(self.choices) else "high" if value == max(self.choices) else None
        scale = math.log if self.log else float
        position = (scale(value) - scale(self.low)) / (scale(self.high) - scale(self.low))
        return "low" if position <= EDGE_FRACTION else "high" if position >= 1 - EDGE_FRACTION else None


def at_edges(ranges: Mapping[str, Range], params: Mapping[str, Any]) -> dict[str, str]:
    """The searched settings of one trial that sit at an edge of their range: name -> 'low' or 'high'."""
    edges = {name: r.edge(params.get(name)) for name, r in ranges.items()}
    return {name: end for name, end in edges.items() if end is not None}


def edges_text(edges: Mapping[str, str]) -> str:
    """'lr (high), rank (low)'; empty when nothing sits at an edge."""
    return ", ".join(f"{name} ({end})" for name, end in edges.items())


def _range(name: str, table: Mapping[str, Any], where: str) -> Range:
    unknown = sorted(set(table) - {"low", "high", "log", "choices"})
    if unknown:
        raise ConfigError(f"{where}: {name}: unknown key(s) {', '.join(unknown)}; a range is {{low, high, log}} "
                          "or {choices}")
    if "choices" in table:
        choices = table["choices"]
        if set(table) != {"choices"} or not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: {name}: choices must be a non-empty list, alone; got {dict(table)!r}")
        if not all(_number(c) for c in choices) or (name in WHOLE and not all(isinstance(c, int) for c in choices)):
            raise ConfigError(f"{where}: {name}: choices must be {'whole ' if name in WHOLE else ''}numbers, "
                              f"got {choices!r}")
        return Range(name, choices=tuple(dict.fromkeys(choices)))
    low, high, log = table.get("low"), table.get("high"), table.get("log", False)
    if not (_number(low) and _number(high)) or not isinstance(log, bool):
        raise ConfigError(f"{where}: {name}: a range needs numbers low and high (and log true/false), "
                          f"got {dict(table)!r}")
    if name in WHOLE and not (isinstance(low, int) and isinstance(high, int)):
        raise ConfigError(f"{where}: {name}: a whole-number setting needs whole-number ends, got {low!r}..{high!r}")
    if not low < high:
        raise ConfigError(f"{where}: {name}: empty range {low!r}..{high!r} (low must be below high; "
                          "a plain value fixes a setting)")
    if log and low <= 0:
        raise ConfigError(f"{where}: {name}: a log-scale range must start above 0, got low = {low!r}")
    if isinstance(low, int) != isinstance(high, int):
        low, high = float(low), float(high)
    return Range(name, low, high, log)


def _entries(table: Any, where: str, method: str | None) -> dict[str, Range | Any]:
    """One table of entries: a Range for a searched setting, the value itself for a fixed one."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table of settings, got {table!r}")
    entries = {}
    for name, value in table.items():
        if name not in SEARCHABLE:
            raise ConfigError(f"{where}: unknown parameter {name!r}; searchable: {', '.join(SEARCHABLE)}")
        if method is not None and name in ADAPTER_ONLY and SPECS[method].default_rank is None:
            raise ConfigError(f"{where}: {method} has no {name} to search")
        if isinstance(value, dict):
            entries[name] = _range(name, value, where)
        elif _number(value):
            entries[name] = value
        else:
            raise ConfigError(f"{where}: {name}: expected a range table or a number, got {value!r}")
    return entries


def read_space_file(path: str | Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The ``[defaults]`` entries and the ``[methods.M]`` entries of one search-space file, all checked."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such search-space file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({e})") from None
    unexpected = sorted(set(data) - {"defaults", "methods"})
    if unexpected:
        raise ConfigError(f"{path}: unexpected {', '.join(map(repr, unexpected))}; a search space holds "
                          "[defaults] and [methods.<method>] tables")
    methods = data.get("methods", {})
    if not isinstance(methods, dict):
        raise ConfigError(f"{path}: expected [methods.<method>] tables")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ConfigError(f"{path}: [methods]: unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    return (_entries(data.get("defaults", {}), f"{path}: [defaults]", None),
            {m: _entries(t, f"{path}: [methods.{m}]", m) for m, t in methods.items()})


@dataclass(frozen=True)
class SearchSpace:
    """What ``arcvit tune`` searches for one method: ``ranges`` are searched, ``fixed`` set for every trial."""

    method: str
    ranges: dict[str, Range]
    fixed: dict[str, Any]

    def without(self, names: Iterable[str]) -> SearchSpace:
        """This space less the settings that flags fix."""
        names = set(names)
        return SearchSpace(self.method, {k: r for k, r in self.ranges.items() if k not in names},
                           {k: v for k, v in self.fixed.items() if k not in names})

    def to_dict(self) -> dict[str, Any]:
        return {"ranges": {k: r.to_dict() for k, r in self.ranges.items()}, "fixed": dict(self.fixed)}


def load_search_space(method: str, override: str | Path | None = None,
                      packaged: str | Path = SEARCH_SPACE_FILE) -> SearchSpace:
    """The space for ``method``: the packaged file, then ``override`` over it; in each file ``[defaults]`` then
    ``[methods.<method>]``. Both files are checked in full, every method's tables included."""
    if method not in SPECS:
        raise ConfigError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    entries: dict[str, Any] = {}
    for path in (packaged, override):
        if path is None:
            continue
        defaults, methods = read_space_file(path)
        if SPECS[method].default_rank is None:
            defaults = {k: v for k, v in defaults.items() if k not in ADAPTER_ONLY}
        entries |= defaults | methods.get(method, {})
    return SearchSpace(method, {k: v for k, v in entries.items() if isinstance(v, Range)},
                       {k: v for k, v in entries.items() if not isinstance(v, Range)})
