"""Recipes: layered training settings in a TOML (or JSON) file, read the same way by train, bench and tune.

Layers, most specific last: ``[defaults]`` < ``[tasks.T]`` < ``[methods.M]`` < ``[tasks.T.methods.M]``, and
command-line flags above all. A method's own layer beats a task's because learning rates live on a method's
scale (full fine-tuning needs a far smaller one); a setting for one method on one task goes in
``[tasks.T.methods.M]``. Rank and adapter dropout in the shared layers reach only methods with an adapter,
targets only the methods that adapt chosen Linears (lora, dora, vera).
Every name and setting is checked when the file is read, before anything trains.
"""
from __future__ import annotations

import json
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from arcvit.data.layouts import task_key
from arcvit.errors import ArcvitError, ConfigError
from arcvit.methods.registry import METHODS, SPECS, takes_targets
from arcvit.training.config import TrainConfig

ADAPTER_FIELDS = ("rank", "adapter_dropout")  # only methods with an adapter have them; None: its default
SECTIONS = ("defaults", "methods", "tasks")


@dataclass(frozen=True)
class Recipe:
    """The layers of one recipe file, tasks under their canonical names."""

    source: str = "flags"
    defaults: Mapping[str, Any] = field(default_factory=dict)
    methods: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    tasks: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    task_methods: Mapping[tuple[str, str], Mapping[str, Any]] = field(default_factory=dict)

    def settings(self, task: str, method: str) -> dict[str, Any]:
        """The merged settings of one (task, method), flags not yet applied."""
        shared = {**self.defaults, **self.tasks.get(task, {})}
        if SPECS[method].default_rank is None:
            shared = {k: v for k, v in shared.items() if k not in ADAPTER_FIELDS}
        return {**shared_settings(shared, method), **self.methods.get(method, {}),
                **self.task_methods.get((task, method), {})}


def shared_settings(settings: Mapping[str, Any], method: str) -> dict[str, Any]:
    """Settings given to every method of a recipe or a bench, less ``targets`` for a method that has none."""
    return {k: v for k, v in settings.items() if k != "targets" or takes_targets(method)}


def _layer(value: Any, where: str, reserved: tuple[str, ...]) -> dict[str, Any]:
    """One table of settings, checked against TrainConfig's fields."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a table of settings, got {value!r}")
    taken = [k for k in reserved if k in value]
    if taken:
        raise ConfigError(f"{where}: {', '.join(taken)}: set by the command (--method, --seeds), not a recipe")
    unknown = sorted(set(value) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}")
    return dict(value)


def _methods_layers(value: Any, where: str, reserved: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """The ``[<section>.<method>]`` tables."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected [<method>] tables")
    unknown = sorted(set(value) - set(METHODS))
    if unknown:
        raise ConfigError(f"{where}]: unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    return {m: _layer(v, f"{where}.{m}]", reserved) for m, v in value.items()}


def _read(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
        return json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(f"{path}: no such config file") from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot parse ({e})") from None


def load_recipe(path: str | Path, canonical: Callable[[str], str] = task_key,
                reserved: tuple[str, ...] = ("method",)) -> Recipe:
    """Read and check a recipe; ``canonical`` names (and validates) its tasks, ``reserved`` settings are the
    caller's own (the bench sets method and seed itself)."""
    path = Path(path)
    data = _read(path)
    for section, value in data.items():
        if section not in SECTIONS or not isinstance(value, dict):
            raise ConfigError(f"{path}: unexpected {section!r}; a recipe holds [defaults], [methods.<method>], "
                              "[tasks.<task>] and [tasks.<task>.methods.<method>] tables")
    tasks, task_methods = {}, {}
    for name, table in data.get("tasks", {}).items():
        try:
            task = canonical(name)
        except ArcvitError as e:
            raise ConfigError(f"{path}: [tasks.{name}]: {e}") from None
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [tasks.{name}]: expected a table of settings, got {table!r}")
        tasks[task] = _layer({k: v for k, v in table.items() if k != "methods"}, f"{path}: [tasks.{name}]", reserved)
        for method, layer in _methods_layers(table.get("methods", {}), f"{path}: [tasks.{name}.methods",
                                             reserved).items():
            task_methods[(task, method)] = layer
    return Recipe(str(path), _layer(data.get("defaults", {}), f"{path}: [defaults]", reserved),
                  _methods_layers(data.get("methods", {}), f"{path}: [methods", reserved), tasks, task_methods)


def train_config(recipe: Recipe, task: str, method: str, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """The TrainConfig of one (task, method): the recipe's layers, then ``overrides`` (flags).

    An ``epochs`` override keeps the warm-up fraction of a recipe that sets epochs or warm-up (rounded down):
    10 warm-up epochs of 100 become 1 of 10.
    """
    settings = recipe.settings(task, method)
    if SPECS[method].default_rank is None and any(settings.get(k) is not None for k in ADAPTER_FIELDS):
        raise ConfigError(f"{recipe.source}: {method} has no rank or adapter dropout to set (task {task})")
    overrides = dict(overrides or {})
    if "epochs" in overrides and ("epochs" in settings or "warmup_epochs" in settings):
        defaults = TrainConfig()
        warmup = settings.get("warmup_epochs", defaults.warmup_epochs)
        settings["warmup_epochs"] = warmup * overrides["epochs"] // max(1, settings.get("epochs", defaults.epochs))
    settings |= overrides | {"method": method}
    where = f"task {task}, method {method}" if task else f"method {method}"
    return TrainConfig.from_dict(settings, source=f"{recipe.source} ({where})")
