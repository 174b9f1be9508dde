"""The benchmark report: a VTAB-style table over every (task, method, seed) run, rebuilt from run folders alone.

Everything the report states comes from files the runs wrote (``results.json``, ``settings.json``,
``error.txt``) and the bench's plan (``bench.json``), so ``arcvit report DIR`` rebuilds it after a crash, for
a partial bench, or for runs gathered from several machines.

A report never replaces results with fewer finished runs than it had: when ``DIR/results.json`` records a
finished run that the run folders no longer hold, the report refuses (``force`` rebuilds from the folders
alone), except when the run folders are all gone (a published results folder such as docs/bench/tuned/): then
the table, CSV and plot are rebuilt from ``results.json`` itself, which is left as it is.

Aggregates follow VTAB: a group's mean is the plain mean of its tasks' mean accuracies, "mean (all tasks)" the
plain mean over every task, "mean of group means" the mean of the group columns. A task without results is
left out of an aggregate, which is then marked incomplete rather than silently averaged over fewer tasks.
"""
from __future__ import annotations

import csv
import io
import json
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean, stdev
from typing import Any

from arcvit.bench.plots import plot_accuracy_vs_params
from arcvit.bench.provenance import check_one_dataset_per_task, data_by_task, render_data_section
from arcvit.bench.runfiles import check_plan, check_results, check_settings, run_seed
from arcvit.data.layouts import FGVC_TASKS, VTAB_TASKS
from arcvit.data.mini import MINI_TASKS
from arcvit.errors import ConfigError, DataWarning
from arcvit.fileio import write_json, write_text
from arcvit.methods import SPECS
from arcvit.training.recipes import ADAPTER_FIELDS
from arcvit.training.search_space import edges_text

PLAN_FILE = "bench.json"    # the bench's plan: suite, tasks, methods, seeds, backbone, config
RESULTS_FILE = "results.json"  # the report as data; its "runs" are the rows of results.csv
ERROR_FILE = "error.txt"    # in a run folder: the run failed with this error
RUNS_DIR = "runs"           # <out>/runs/<task>/<method>/seed<k>/


@dataclass(frozen=True)
class Suite:
    """A benchmark's tasks in table order, each with its group."""

    title: str
    tasks: Mapping[str, str]


SUITES: dict[str, Suite] = {
    "mini": Suite("mini-VTAB (offline, 28x28)", {name: t.group for name, t in MINI_TASKS.items()}),
    "vtab1k": Suite("VTAB-1k", {t.folder: t.group for t in VTAB_TASKS.values()}),
    "fgvc": Suite("FGVC", {t.folder: t.group for t in FGVC_TASKS.values()}),
}


def run_dir(out: str | Path, task: str, method: str, seed: int) -> Path:
    return Path(out) / RUNS_DIR / task / method / f"seed{seed}"


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file's content, None when it does not exist."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable ({e})") from None
    except RecursionError:
        raise ConfigError(f"{path}: unreadable (nested too deeply)") from None


def collect_runs(out: str | Path) -> list[dict[str, Any]]:
    """One record per run folder under ``out/runs``: task, method and seed (from the folder), ``status``
    ('done', 'failed' or 'unfinished'), the run's results.json fields, its settings and any error. Every field
    read is checked (`arcvit.bench.runfiles`); two folders that give one (task, method, seed), as ``seed0`` and
    ``seed00`` do, are refused rather than one silently replacing the other."""
    out, records, seen = Path(out), [], {}
    for folder in sorted(out.glob(f"{RUNS_DIR}/*/*/seed*")):
        seed = run_seed(folder)
        if not folder.is_dir() or seed is None:
            continue
        key = (folder.parent.parent.name, folder.parent.name, seed)
        if key in seen:
            raise ConfigError(f"{folder}: the same run as {seen[key]} (task {key[0]}, method {key[1]}, seed "
                              f"{seed}); keep one of the two folders")
        seen[key] = folder
        records.append(_record(out, folder, seed))
    return records


def _record(out: Path, folder: Path, seed: int) -> dict[str, Any]:
    """A run folder's record for collect_runs, its files checked field by field."""
    results = read_json(folder / "results.json")
    settings = read_json(folder / "settings.json")
    results = None if results is None else check_results(folder / "results.json", results)
    settings = {} if settings is None else check_settings(folder / "settings.json", settings)
    error = folder / ERROR_FILE
    status = "done" if results else "failed" if error.exists() else "unfinished"
    return {**(results or {}), "task": folder.parent.parent.name, "method": folder.parent.name, "seed": seed,
            "status": status, "run_dir": folder.relative_to(out).as_posix(), "settings": settings,
            "error": error.read_text(errors="replace").strip() if status == "failed" else None}


@dataclass(frozen=True)
class _Stat:
    """A mean accuracy, and the per-seed values its spread over seeds is measured on."""

    mean: float
    by_seed: dict[int, float]


def _combine(stats: Sequence[_Stat]) -> _Stat | None:
    """The mean of the ``stats``' means; per seed, their mean, for the seeds every one of them has."""
    if not stats:
        return None
    common = set.intersection(*(set(s.by_seed) for s in stats))
    return _Stat(fmean(s.mean for s in stats), {k: fmean(s.by_seed[k] for s in stats) for k in sorted(common)})


def _cell(stat: _Stat | None, complete: bool = True, failed: bool = False) -> dict[str, Any]:
    """std is the sample standard deviation over seeds, None with fewer than two."""
    return {"mean": None if stat is None else round(stat.mean, 4),
            "std": round(stdev(stat.by_seed.values()), 4) if stat and len(stat.by_seed) > 1 else None,
            "seeds": len(stat.by_seed) if stat else 0, "complete": complete, "failed": failed}


def build_table(records: Sequence[Mapping[str, Any]], tasks: Mapping[str, str],
                methods: Sequence[str] | None = None) -> dict[str, Any]:
    """The table as data: one row per method, with cells for every task, group, and the two overall means.

    ``records`` need task, method, seed, status and, when done, test_top1 (a fraction) and trainable_params;
    ``tasks`` maps each task of the table to its group, in column order. Accuracies come out in %.
    """
    groups: dict[str, list[str]] = {}
    for task, group in tasks.items():
        groups.setdefault(group, []).append(task)
    methods = list(methods) if methods else list(dict.fromkeys(r["method"] for r in records))
    rows = []
    for method in methods:
        mine = [r for r in records if r["method"] == method and r["task"] in tasks]
        done = [r for r in mine if r["status"] == "done"]
        failed = {r["task"] for r in mine if r["status"] == "failed"}
        scores = {t: {r["seed"]: 100 * r["test_top1"] for r in done if r["task"] == t} for t in tasks}
        stats = {t: _Stat(fmean(v.values()), v) for t, v in scores.items() if v}
        group_stats = {g: _combine([stats[t] for t in members if t in stats]) for g, members in groups.items()}
        group_complete = {g: all(t in stats for t in members) for g, members in groups.items()}
        params = [fmean(r["trainable_params"] for r in done if r["task"] == t) for t in stats]
        rows.append({
            "method": method,
            "tasks": {t: _cell(stats.get(t), failed=t in failed) for t in tasks},
            "groups": {g: _cell(s, group_complete[g]) for g, s in group_stats.items()},
            "all_tasks": _cell(_combine(list(stats.values())), len(stats) == len(tasks)),
            "mean_of_group_means": _cell(_combine([s for s in group_stats.values() if s]),
                                         all(group_complete.values())),
            "params_m": round(fmean(params) / 1e6, 6) if params else None,
        })
    return {"tasks": dict(tasks), "groups": groups, "rows": rows}


def format_cell(cell: Mapping[str, Any]) -> str:
    if cell["mean"] is None:
        return "failed" if cell["failed"] else "–"
    std = f" ± {cell['std']:.1f}" if cell["std"] is not None else ""
    return f"{cell['mean']:.1f}{std}{'' if cell['complete'] else '*'}"


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int = 1) -> list[str]:
    align = ["---"] * numeric_from + ["---:"] * (len(header) - numeric_from)
    return [f"| {' | '.join(line)} |" for line in (header, align, *rows)]


def render_table(table: Mapping[str, Any]) -> list[str]:
    """Markdown lines: rows = methods; tasks grouped, each group followed by its mean (when there are groups
    to tell apart), then the overall means and the trainable parameters."""
    by_group = len(table["groups"]) > 1
    header = ["method"]
    for group, members in table["groups"].items():
        header += members + ([f"**{group}**"] if by_group else [])
    header += ["**mean (all tasks)**"] + (["**mean of group means**"] if by_group else []) + ["params (M)", "merges"]
    lines = []
    for row in table["rows"]:
        cells = [row["method"]]
        for group, members in table["groups"].items():
            cells += [format_cell(row["tasks"][t]) for t in members]
            cells += [format_cell(row["groups"][group])] if by_group else []
        cells.append(format_cell(row["all_tasks"]))
        cells += [format_cell(row["mean_of_group_means"])] if by_group else []
        cells.append("–" if row["params_m"] is None else f"{row['params_m']:.3g}")
        cells.append(_merges_text(row["method"]))
        lines.append(cells)
    return _markdown_table(header, lines)


def _merges_text(method: str) -> str:
    """Whether a row's method folds into the plain model (``lora@2``: as ``lora``)."""
    spec = SPECS.get(method.partition("@")[0])
    return "–" if spec is None else "yes" if spec.mergeable else "no"


def _protocol_text(settings: Mapping[str, Any]) -> str:
    splits, protocol = settings["data"]["splits"], settings["train"]["protocol"]
    if protocol == "select":
        return (f"train on {splits['train']}, keep the epoch with the best top-1 on {splits['val']}, report top-1 "
                f"on {splits['test']} with that epoch's weights; no selection on test")
    return f"train on {splits['train']}, top-1 on {splits['test']} after the last epoch; no selection on test"


def _backbone_text(settings: Mapping[str, Any]) -> str:
    source = f"weights from {settings['checkpoint']}" if settings.get("checkpoint") else \
        "pretrained" if settings.get("pretrained", True) else "random init"
    return f"{settings['backbone']} ({source})"




def _with_method_defaults(train: Mapping[str, Any]) -> dict[str, Any]:
    """A run's settings with rank and adapter dropout as its method used them (None: the method's default)."""
    spec = SPECS.get(train.get("method"))
    defaults = {"rank": spec.default_rank, "adapter_dropout": spec.default_dropout} if spec else {}
    return {**train, **{k: defaults.get(k) for k in ADAPTER_FIELDS if train.get(k) is None}}


def _merge_values(dicts: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Every value each key takes across ``dicts``, first seen first."""
    merged: dict[str, dict[Any, None]] = {}
    for d in dicts:
        for key, value in d.items():
            merged.setdefault(key, {})[value] = None
    return {key: list(values) for key, values in merged.items()}


def _values_text(values: Sequence[Any]) -> str:
    """A setting's values across one method's runs: each (3 significant digits), or their range when tuning
    chose one per task."""
    shown = ["–" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v) for v in values]
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(values) > 3 and len(numbers) == len(values):
        return f"{min(numbers):.3g} to {max(numbers):.3g} ({len(values)} values, per task)"
    return " / ".join(shown)


def describe_runs(records: Sequence[Mapping[str, Any]], methods: Sequence[str] = ()) -> dict[str, Any]:
    """What the finished runs were: protocol, backbone, shared and per-method settings (methods in the order
    of ``methods``, then as found), versions, data fingerprints."""
    done = [r for r in records if r["status"] == "done" and r.get("settings")]
    values = _merge_values([{k: v for k, v in r["settings"]["train"].items() if k not in ("method", "seed")}
                            for r in done])
    shared = {k: v[0] for k, v in values.items() if len(v) == 1 and k not in ADAPTER_FIELDS}
    per_method = {}
    for method in dict.fromkeys([*methods, *(r["method"] for r in done)]):
        mine = _merge_values([_with_method_defaults(r["settings"]["train"]) for r in done if r["method"] == method])
        if not mine:
            continue
        per_method[method] = {k: _values_text(mine.get(k, [])) for k in values if k not in shared}
    return {"protocol": sorted({_protocol_text(r["settings"]) for r in done}),
            "backbone": sorted({_backbone_text(r["settings"]) for r in done}),
            "seeds": sorted({r["seed"] for r in done}), "shared_settings": shared, "method_settings": per_method,
            "versions": _merge_values([r["settings"].get("versions", {}) for r in done]),
            "data_fingerprints": {t: _merge_values([r["settings"].get("data_fingerprints", {})
                                                    for r in done if r["task"] == t])
                                  for t in dict.fromkeys(r["task"] for r in done)}}


_CSV_FIELDS = ("task", "group", "method", "seed", "status", "test_top1", "val_top1", "selected_epoch",
               "trainable_params", "total_params", "protocol", "lr", "weight_decay", "rank", "adapter_dropout",
               "epochs", "warmup_epochs", "batch_size", "wall_time_s", "images_per_s", "train_fingerprint",
               "test_fingerprint", "data_digest", "data_source", "run_dir", "error")


def _flat_row(record: Mapping[str, Any], tasks: Mapping[str, str]) -> dict[str, Any]:
    settings = record.get("settings") or {}
    fingerprints = settings.get("data_fingerprints", {})
    row = {**settings.get("train", {}), **record, "group": tasks.get(record["task"], ""),
           "train_fingerprint": fingerprints.get("train"), "test_fingerprint": fingerprints.get("test")}
    return {k: row.get(k) for k in _CSV_FIELDS}


def _csv(rows: Sequence[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _outstanding(records: Sequence[Mapping[str, Any]], plan: Mapping[str, Any]) -> list[str]:
    """Planned runs without results or an error, and run folders a stopped run left unfinished."""
    ended = {(r["task"], r["method"], r["seed"]) for r in records if r["status"] != "unfinished"}
    planned = [(t, m, s) for t in plan.get("tasks", []) for m in plan.get("methods", [])
               for s in plan.get("seeds", [])]
    planned += [(r["task"], r["method"], r["seed"]) for r in records if r["status"] == "unfinished"]
    return [f"{t} / {m} / seed {s}" for t, m, s in dict.fromkeys(planned) if (t, m, s) not in ended]


def _budget_line(plan: Mapping[str, Any]) -> list[str]:
    tuning = plan.get("tuning")
    if not tuning:
        return []
    return [f"- tuning: the same budget for every (task, method): {tuning['trials']} trials of `arcvit tune` "
            "(Optuna TPE, median pruning), scored on validation under the select protocol; the test split is "
            f"never opened while tuning (search space: {tuning['search_space']})"]


def _edges_cell(edges: Mapping[str, str] | None) -> str:
    """The settings at an edge of their range, in bold; studies from before arcvit recorded it say so."""
    if edges is None:
        return "not recorded"
    return f"**{edges_text(edges)}**" if edges else "–"


def _tuned_settings(plan: Mapping[str, Any]) -> list[str]:
    """The settings tuning chose, per task and method, with the validation top-1 they were chosen on."""
    tuned = (plan.get("tuning") or {}).get("tuned") or {}
    rows = []
    for task, methods in tuned.items():
        for method, record in methods.items():
            shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in record["settings"].items())
            rows.append([task, method, shown or "–", _edges_cell(record.get("at_edge")),
                         f"{100 * record['val_top1']:.1f}", str(record["trials"])])
    if not rows:
        return []
    return ["## Tuned settings", "", "Chosen on validation (best trial of each study under `tune/<task>/<method>/`); "
            "the runs above retrain them under the table's protocol. At a range edge: a tuned value within 5 % "
            "of an end of its search range (of its log width on a log scale): that range may bind.", "",
            *_markdown_table(["task", "method", "settings", "at a range edge", "val top-1 (%)", "trials"], rows, 4),
            "", *_edge_counts(tuned)]


def _edge_counts(tuned: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Per method, how many of its tasks' tuned values sit at each end of each range: one task at an edge is
    what chance gives; the same end on most of a method's tasks is a range that binds."""
    studies: Counter[str] = Counter()
    counts: dict[str, Counter[str]] = {}
    for methods in tuned.values():
        for method, record in methods.items():
            studies[method] += 1
            if record.get("at_edge") is not None:
                counts.setdefault(method, Counter()).update(f"{k} ({end})" for k, end in record["at_edge"].items())
    if not counts:
        return []  # every study predates the edge record
    rows = [[m, ", ".join(f"{edge} {n} of {studies[m]}" for edge, n in found.most_common()) or "none"]
            for m, found in counts.items()]
    return ["How often each range's end was reached, per method (tasks whose tuned value sits there, of the tasks "
            "tuned). A uniform draw lands within 5 % of a given end 1 time in 20, and a best trial has several "
            "settings, so one task at an edge is what chance gives; the same end on most of a method's tasks is "
            "a range that binds.", "", *_markdown_table(["method", "at a range edge"], rows, 2), ""]


def render_report(title: str, table: Mapping[str, Any], about: Mapping[str, Any],
                  records: Sequence[Mapping[str, Any]], plan: Mapping[str, Any]) -> str:
    """report.md: what was run and how, the table, then per-method settings, data, failures and gaps."""
    groups = table["groups"]
    failed = [r for r in records if r["status"] == "failed"]
    outstanding = _outstanding(records, plan)
    done = sum(r["status"] == "done" for r in records)
    shared = ", ".join(f"{k}={v}" for k, v in about["shared_settings"].items())
    lines = [f"# arcvit bench: {title}", "",
             f"- protocol: {'; '.join(about['protocol']) or 'no finished run yet'}",
             f"- backbone: {', '.join(about['backbone']) or '–'}",
             f"- tasks: {len(table['tasks'])} ({', '.join(f'{g} {len(m)}' for g, m in groups.items())})",
             f"- seeds: {', '.join(map(str, plan.get('seeds') or about['seeds'])) or '–'}",
             f"- runs: {done} finished, {len(failed)} failed, {len(outstanding)} outstanding",
             f"- settings shared by every run: {shared or '–'}",
             "- versions: " + (", ".join(f"{p} {' / '.join(v)}" for p, v in about["versions"].items()) or "–"),
             *_budget_line(plan),
             "", "## Top-1 accuracy (%) on test", "", *render_table(table), "",
             "Cells: mean over seeds, ± the sample standard deviation over seeds when there are several "
             "(for a mean over tasks: of the per-seed means over the seeds every task has). "
             "–: no finished run. *: averaged over the tasks that have results; some are missing. "
             "mean (all tasks): the plain mean over the tasks"
             + (", mean of group means: the mean of the group columns" if len(groups) > 1 else "")
             + ". params (M): trainable parameters in millions, mean over tasks (the head depends on the classes). "
             "merges: the trained model folds into the plain backbone (`arcvit merge --run`), at no inference cost.",
             ""]
    if any(about["method_settings"].values()):
        names = list(next(iter(about["method_settings"].values())))
        rows = [[m, *(s[k] for k in names)] for m, s in about["method_settings"].items()]
        lines += ["## Per-method settings", "", *_markdown_table(["method", *names], rows, len(names) + 1), ""]
    lines += _tuned_settings(plan)
    if about["data_fingerprints"]:
        roles = [role for role in ("train", "val", "test")
                 if any(role in fp for fp in about["data_fingerprints"].values())]
        rows = [[task, *(" ≠ ".join(f[:12] for f in fps.get(role, [])) or "–" for role in roles)]
                for task, fps in about["data_fingerprints"].items()]
        lines += ["## Data fingerprints", "",
                  "sha256 of each split's (path, label, size) list, first 12 hex digits; "
                  "≠ marks runs of one task that saw different data.", "",
                  *_markdown_table(["task", *roles], rows, len(roles) + 1), ""]
    lines += render_data_section(about.get("data", {}), about.get("allow_mixed_data", False))
    if failed:
        lines += ["## Failed runs", ""]
        for r in failed:
            lines.append(f"- {r['task']} / {r['method']} / seed {r['seed']}: " + r["error"].partition("\n")[0])
        lines.append("")
    if outstanding:
        lines += ["## Outstanding runs", "", *(f"- {name}" for name in outstanding), ""]
    return "\n".join(lines)


def _infer_suite(out: Path, records: Sequence[Mapping[str, Any]]) -> str:
    if not records:
        raise ConfigError(f"{out}: no bench.json and no run folders under {out / RUNS_DIR}")
    tasks = {r["task"] for r in records}
    for name, suite in SUITES.items():
        if tasks <= set(suite.tasks):
            return name
    raise ConfigError(f"{out}: cannot tell which suite tasks {sorted(tasks)} belong to; pass --suite")


def _run_key(row: Mapping[str, Any]) -> tuple[str, str, int]:
    return row["task"], row["method"], row["seed"]


def _previous(out: Path) -> dict[str, Any] | None:
    """The results.json a previous report wrote (None if there is none), checked enough to compare with."""
    try:
        summary = read_json(out / RESULTS_FILE)
    except ConfigError as e:
        raise ConfigError(f"{e}; pass --force to rebuild it from the run folders") from None
    if summary is None:
        return None
    runs = summary.get("runs") if isinstance(summary, dict) else None
    if not isinstance(runs, list) or not all(
            isinstance(r, dict) and isinstance(r.get("task"), str) and isinstance(r.get("method"), str)
            and isinstance(r.get("seed"), int) and isinstance(r.get("status"), str) for r in runs):
        raise ConfigError(f"{out / RESULTS_FILE}: not a results file `arcvit report` wrote (no list of runs with "
                          "task, method, seed and status); pass --force to rebuild it from the run folders")
    return summary


def _lost(previous: Mapping[str, Any] | None, records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The runs ``previous`` (results.json) records as finished that ``records`` (the run folders) do not."""
    done = {_run_key(r) for r in records if r["status"] == "done"}
    return [r for r in (previous or {}).get("runs", []) if r["status"] == "done" and _run_key(r) not in done]


def _named(rows: Sequence[Mapping[str, Any]]) -> str:
    names = [f"{r['task']} / {r['method']} / seed {r['seed']}" for r in rows[:3]]
    return ", ".join(names) + (f" and {len(rows) - 3} more" if len(rows) > 3 else "")


def check_runs_kept(out: str | Path) -> None:
    """For a bench into ``out``: refuse, before anything runs, when results.json records finished runs whose
    folders are gone (a bench would replace the report with fewer finished runs)."""
    out = Path(out)
    gone = [r for r in _lost(_previous(out), collect_runs(out)) if not run_dir(out, *_run_key(r)).exists()]
    if gone:
        raise ConfigError(f"{out}: {RESULTS_FILE} records {len(gone)} finished run(s) whose run folders are gone "
                          f"({_named(gone)}); a bench here would replace them: restore those folders, use another "
                          f"--out, or run `arcvit report {out} --force` first to drop them")


def _render(out: Path, summary: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """The text files of a report (name -> content) and the plot, drawn from ``summary`` (what results.json holds)
    and ``records`` (runs with task, method, seed, status, error)."""
    table, about = summary["table"], summary["about"]
    texts = {"results.csv": _csv([{k: row.get(k) for k in _CSV_FIELDS} for row in summary["runs"]]),
             "report.md": render_report(summary["title"], table, about, records, summary["plan"])}
    points = [(row["method"] + ("" if row["all_tasks"]["complete"] else "*"), row["params_m"] * 1e6,
               row["all_tasks"]["mean"], row["all_tasks"]["std"] or 0.0)
              for row in table["rows"] if row["all_tasks"]["mean"] is not None]
    if points:
        missing = "; *: some tasks missing" if any(p[0].endswith("*") for p in points) else ""
        plot_accuracy_vs_params(points, out / "accuracy_vs_params.png",
                                f"{summary['title']}: {', '.join(about['backbone'])}\n"
                                f"mean top-1 over {len(table['tasks'])} tasks (bars: std over seeds{missing})")
    return texts


def _rebuild_from_results(out: Path, summary: dict[str, Any], suite: str | None) -> dict[str, Any]:
    """report.md, results.csv and the plot again from results.json alone (left as it is): its run folders are
    gone, and rebuilding from them would empty the report."""
    if suite is not None and suite != summary.get("suite"):
        raise ConfigError(f"--suite {suite}: {out / RESULTS_FILE} holds a {summary.get('suite')!r} report and its "
                          "run folders are gone, so it cannot be rebuilt as another suite")
    try:
        texts = _render(out, summary, summary["runs"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"{out / RESULTS_FILE}: cannot be rebuilt, its run folders are gone and it is not a "
                          f"complete report ({type(e).__name__}: {e})") from None
    for name, text in texts.items():
        write_text(out / name, text)
    warnings.warn(f"{out}: no run folders under {out / RUNS_DIR}; report.md, results.csv and the plot were rebuilt "
                  f"from {RESULTS_FILE} ({sum(r['status'] == 'done' for r in summary['runs'])} finished runs), which is "
                  "kept as it is",
                  DataWarning, stacklevel=2)
    return summary


def build_report(out: str | Path, suite: str | None = None, force: bool = False,
                 allow_mixed_data: bool = False) -> dict[str, Any]:
    """Rebuild ``results.csv``, ``results.json``, ``report.md`` and ``accuracy_vs_params.png`` in ``out``.

    The suite defaults to the bench's own (from its plan), else to the one whose tasks the runs are.
    Returns what results.json holds. Finished runs that results.json records and the run folders no longer
    hold are never dropped unless ``force``: with no run folders at all the report is rebuilt from
    results.json, otherwise this raises ConfigError. Runs of one task on data with different manifest digests
    raise DataError unless ``allow_mixed_data`` (the report then says so).
    """
    out = Path(out)
    records = collect_runs(out)
    if not force:
        previous = _previous(out)
        lost = _lost(previous, records)
        if lost and not records:
            return _rebuild_from_results(out, previous, suite)
        if lost:
            raise ConfigError(f"{out}: {RESULTS_FILE} records {len(lost)} finished run(s) that the run folders no "
                              f"longer hold ({_named(lost)}); rebuilding would drop them: restore those folders, "
                              "or pass --force to rebuild from the folders alone")
    plan = read_json(out / PLAN_FILE)
    plan = {} if plan is None else check_plan(out / PLAN_FILE, plan)
    suite = suite or plan.get("suite") or _infer_suite(out, records)
    if suite not in SUITES:
        raise ConfigError(f"unknown suite {suite!r}; choose from {', '.join(SUITES)}")
    info = SUITES[suite]
    planned = set(plan.get("tasks", [])) | {r["task"] for r in records}
    tasks = {t: g for t, g in info.tasks.items() if t in planned}
    methods = list(dict.fromkeys([*plan.get("methods", []), *(r["method"] for r in records)]))
    table = build_table(records, tasks, methods)
    about = describe_runs(records, methods)
    allow_mixed_data = allow_mixed_data or bool(plan.get("allow_mixed_data"))  # a bench's own choice
    about["data"], about["allow_mixed_data"] = data_by_task(records), allow_mixed_data
    check_one_dataset_per_task(about["data"], allow_mixed_data)  # before anything is written
    rows = [_flat_row(r, tasks) for r in records]
    summary = {"suite": suite, "title": info.title, "plan": plan, "about": about, "table": table, "runs": rows}
    texts = _render(out, summary, records)
    write_text(out / "results.csv", texts["results.csv"])
    write_json(out / RESULTS_FILE, summary)
    write_text(out / "report.md", texts["report.md"])
    return summary
