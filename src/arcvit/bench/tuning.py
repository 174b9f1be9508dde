"""``arcvit bench --tune N``: every (task, method) of a bench is tuned with the same budget, N trials of
``arcvit tune`` on validation, before its final runs use the best settings.

Each study lives in ``<bench>/tune/<task>/<method>/`` (resumable, like every part of a bench). The settings a
study searches go into the recipe's most specific layer, ``[tasks.T.methods.M]``, for that row only; the
bench's flags were fixed during the search and still beat everything.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from arcvit.bench.executors import InProcess
from arcvit.bench.variants import split_variant
from arcvit.training.config import DataSpec
from arcvit.training.recipes import Recipe, shared_settings, train_config
from arcvit.training.search_space import at_edges

TUNE_DIR = "tune"


def tune_row(recipe: Recipe, task: str, name: str, overrides: Mapping[str, Any], trials: int, out: Path,
             data: DataSpec, backbone: str, **options: Any) -> dict[str, Any]:
    """Tune one (task, method or variant) and return its record: the searched settings of the best trial,
    those at an edge of their range (``at_edge``), its validation top-1 and the budget. ``options``: checkpoint,
    pretrained, space_file, progress, max_steps_per_epoch."""
    from arcvit.training.tune import make_job
    method, rank = split_variant(name)
    fixed = {k: v for k, v in shared_settings(overrides, method).items() if k != "protocol"} \
        | ({"rank": rank} if rank else {})
    base = asdict(train_config(recipe, task, method, fixed))
    study_dir = out / TUNE_DIR / task / name
    run_options = {k: options.pop(k) for k in ("progress", "max_steps_per_epoch") if k in options}
    executor = options.pop("executor", None) or InProcess()  # --ray: the study's trials on the cluster
    job = make_job(backbone, data, method, trials, study_dir, base=base, fixed=fixed, study_name=f"{task}.{name}",
                   space_file=options.pop("space_file", None), **options)
    summary = executor.tune(job, resume=(study_dir / "study.db").is_file(), **run_options)
    searched = {k: summary["best_settings"][k] for k in job.space.ranges}
    return {"trials": trials, "best_trial": summary["best_trial"], "val_top1": summary["best_val_top1"],
            "settings": searched, "at_edge": at_edges(job.space.ranges, searched),
            "study": str(study_dir.relative_to(out))}


def tuned_recipe(recipe: Recipe, task: str, method: str, searched: Mapping[str, Any]) -> Recipe:
    """``recipe`` with ``searched`` in its ``[tasks.T.methods.M]`` layer, for one row's runs."""
    layer = {**recipe.task_methods.get((task, method), {}), **searched}
    return replace(recipe, task_methods={**recipe.task_methods, (task, method): layer})
