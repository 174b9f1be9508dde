"""Which data each task's runs came from, and the refusal to compare runs of one task on different data.

Every run records its data root's manifest digest for its task (``settings.json`` ``data_manifest``, written
by the training loop from `arcvit.data.manifest.data_provenance`; "unverified" when the root had no manifest).
Two runs of one task with different digests were trained or tested on different bytes (a JPEG export and
lossless images, another copy, an edited list), so their numbers are not comparable in one table. Runs from
before arcvit recorded digests ("unrecorded") are shown but never counted as different.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from arcvit.data.manifest import data_provenance
from arcvit.errors import DataError

UNRECORDED = "unrecorded"  # a run from before arcvit recorded its data's digest


def data_by_task(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """task -> digest -> {"source", "runs"} over the finished runs."""
    found: dict[str, dict[str, dict[str, Any]]] = {}
    for r in records:
        if r.get("status") != "done":
            continue
        manifest = r.get("settings", {}).get("data_manifest") or {}
        digest = manifest.get("digest", UNRECORDED)
        entry = found.setdefault(r["task"], {}).setdefault(digest, {"source": manifest.get("source"), "runs": []})
        entry["runs"].append(r.get("run_dir", f"{r['task']}/{r.get('method')}/seed{r.get('seed')}"))
    return found


def mixed_tasks(data: Mapping[str, Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    return {task: digests for task, digests in data.items() if len(set(digests) - {UNRECORDED}) > 1}


def check_one_dataset_per_task(data: Mapping[str, Mapping[str, Any]], allow_mixed: bool) -> None:
    """DataError naming the first task whose runs used different data, unless ``allow_mixed``."""
    mixed = mixed_tasks(data)
    if mixed and not allow_mixed:
        task, digests = next(iter(mixed.items()))
        shown = "; ".join(f"{d[:12]} ({len(e['runs'])} run(s), e.g. {e['runs'][0]})" for d, e in digests.items())
        raise DataError(f"task {task}: runs on different data (manifest digests {shown}); one table compares "
                        f"runs on the same data only: rerun them, or pass --allow-mixed-data"
                        + (f" ({len(mixed) - 1} more task(s) mixed)" if len(mixed) > 1 else ""))


def check_bench_data(records: Sequence[Mapping[str, Any]], root: str, tasks: Sequence[str],
                     allow_mixed: bool) -> None:
    """Before a bench trains: the data under ``root`` must be what the folder's finished runs of each task
    used (same manifest digest), unless ``allow_mixed``."""
    data = data_by_task(records)
    for task in tasks:
        now = data_provenance(root, task)
        entry = data.setdefault(task, {}).setdefault(now["digest"], {"source": now["source"], "runs": []})
        entry["runs"].append(f"this bench's data {root}")
    check_one_dataset_per_task(data, allow_mixed)


def render_data_section(data: Mapping[str, Mapping[str, Any]], allow_mixed: bool) -> list[str]:
    """The report's "Data" section: per task its digest(s) and source(s)."""
    if not data:
        return []
    lines = ["## Data", "", "Per task, the manifest digest of the data its runs used (`arcvit data verify`; "
             "\"unverified\": the data root had no MANIFEST.json).", ""]
    if mixed_tasks(data) and allow_mixed:
        lines += [f"**Mixed data (allowed by --allow-mixed-data):** the runs of {', '.join(mixed_tasks(data))} "
                  "used different data; their numbers are averaged together all the same.", ""]
    lines += ["| task | data digest | source | runs |", "| --- | --- | --- | ---: |"]
    for task, digests in data.items():
        for digest, entry in digests.items():
            lines.append(f"| {task} | {digest[:12]} | {entry['source'] or '–'} | {len(entry['runs'])} |")
    return lines + [""]
