"""What ``arcvit tune`` writes beside its study: trials.csv, best.toml (a recipe that train and bench read) and
the plots of the optimisation history and the parameter importances."""
from __future__ import annotations

import csv
import io
import json
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from arcvit.extras import optional
from arcvit.fileio import atomic_path, write_text
from arcvit.training.search_space import Range, at_edges, edges_text

TRIAL_FIELDS = ("number", "state", "val_top1", "selected_epoch", "trainable_params", "duration_s", "run_dir",
                "note", "at_edge")


def _duration(trial: Any) -> float | None:
    if trial.datetime_start is None or trial.datetime_complete is None:
        return None
    return round((trial.datetime_complete - trial.datetime_start).total_seconds(), 1)


def write_trials_csv(trials: list[Any], path: Path, ranges: Mapping[str, Range] | None = None) -> Path:
    """One row per trial (``trials``: optuna FrozenTrials): its state, validation top-1 and settings;
    ``at_edge`` names the settings drawn at an edge of their ``ranges`` (``Range.edge``)."""
    params = list(dict.fromkeys(name for t in trials for name in t.params))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*TRIAL_FIELDS, *params])
    writer.writeheader()
    for t in trials:
        writer.writerow({"number": t.number, "state": t.state.name, "val_top1": t.value,
                         "selected_epoch": t.user_attrs.get("selected_epoch"),
                         "trainable_params": t.user_attrs.get("trainable_params"), "duration_s": _duration(t),
                         "run_dir": t.user_attrs.get("run_dir"), "note": t.user_attrs.get("note"),
                         "at_edge": edges_text(at_edges(ranges or {}, t.params)), **t.params})
    write_text(path, buf.getvalue())
    return path


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def recipe_toml(task: str, method: str, settings: Mapping[str, Any], searched: Mapping[str, Any],
                header: str) -> str:
    """A one-table recipe, ``[tasks.T.methods.M]``: the searched settings, then those fixed during the search.
    None (the method's own default) is left out: TOML has no null."""
    lines = [f"# {line}" for line in header.splitlines()]
    lines += ["", f"[tasks.{_toml_key(task)}.methods.{_toml_key(method)}]", "# searched"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in searched.items() if v is not None]
    lines.append("# fixed during the search")
    lines += [f"{k} = {_toml_value(v)}" for k, v in settings.items() if k not in searched and v is not None]
    return "\n".join(lines) + "\n"


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return path


def write_plots(study: Any, out: Path) -> list[Path]:
    """optimization_history.png, and param_importances.png when two finished trials differ in a setting; none
    without matplotlib (the ``plots`` extra)."""
    matplotlib = optional("matplotlib", "plots", "the search's plots")
    if matplotlib is None:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as views
    written = []
    with warnings.catch_warnings(), plt.rc_context():  # optuna's plots switch the global style: put it back
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)  # "importances will be equal" on a handful of trials
        ax = views.plot_optimization_history(study, target_name="val top-1")
        ax.figure.set_size_inches(7, 4.5)
        ax.figure.tight_layout()
        written.append(_save(ax.figure, out / "optimization_history.png"))
        plt.close(ax.figure)
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        varied = [n for n in (complete[0].params if complete else {})
                  if len({t.params.get(n) for t in complete}) > 1]
        if len(complete) >= 2 and varied:
            ax = views.plot_param_importances(study, target_name="val top-1")
            ax.figure.set_size_inches(7, 4.5)
            ax.figure.tight_layout()
            written.append(_save(ax.figure, out / "param_importances.png"))
            plt.close(ax.figure)
    return written
