"""Check a prepared VTAB-1k or FGVC task folder completely, and describe its content for the manifest.

`verify_task` reads every list file and every image once: list files parse, labels lie in the task's
class range, every listed image exists under the task folder and decodes, the split sizes are those of the
public release (`SPLIT_SIZES`), ``train800val200`` is exactly ``train800`` + ``val200``, and no image's bytes
appear in both a training split and the test split. Each problem is one line naming the task, file and line.

Memory: one (path, sha256, format, size) record per distinct image of the task being checked (about 200
bytes each; the largest VTAB-1k task, dSprites, has about 75,000 images), and one image decoded at a time.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from PIL import Image

from arcvit.data.layouts import FGVC_FILES, VTAB_SPLITS, Task, _list_entries, _read_json, resolve_task
from arcvit.errors import DataError
from arcvit.fileio import sha256_file

SUITE_LAYOUTS = {"vtab1k": "vtab", "fgvc": "fgvc"}

# Split sizes of the public releases. VTAB-1k: 800 / 200 / 1,000 for every task, and the full test split of
# each task as VTAB defines it (Zhai et al. 2019; the test.txt of NOAH's release). FGVC: the json splits
# released with VPT (Jia et al. 2022, Table 7).
VTAB_TEST_SIZES = {
    "cifar": 10000, "caltech101": 6084, "dtd": 1880, "oxford_flowers102": 6149, "oxford_iiit_pet": 3669,
    "svhn": 26032, "sun397": 21750, "patch_camelyon": 32768, "eurosat": 5400, "resisc45": 6300,
    "diabetic_retinopathy": 42670, "clevr_count": 15000, "clevr_dist": 15000, "dmlab": 22735, "kitti": 711,
    "dsprites_loc": 73728, "dsprites_ori": 73728, "smallnorb_azi": 12150, "smallnorb_ele": 12150,
}
FGVC_SIZES = {
    "CUB_200_2011": (5394, 600, 5794), "nabirds": (21536, 2393, 24633), "OxfordFlower": (1020, 1020, 6149),
    "Stanford-dogs": (10800, 1200, 8580), "Stanford-cars": (7329, 815, 8041),
}
TRAINING = {"vtab": ("train800", "val200", "train800val200"), "fgvc": ("train", "val")}
LEAKS_SHOWN = 3  # images found in both training and test, named in the problem line


def split_sizes(layout: str, task: str) -> dict[str, int]:
    """The public release's image count per split of ``task``."""
    if layout == "vtab":
        return {"train800": 800, "val200": 200, "train800val200": 1000, "test": VTAB_TEST_SIZES[task]}
    return dict(zip(FGVC_FILES, FGVC_SIZES[task]))


@dataclass
class _Image:
    sha256: str
    format: str
    size: tuple[int, int]


@dataclass
class TaskReport:
    """What `verify_task` found: ``problems`` (one line each) and, when there are none, the manifest ``entry``."""

    task: str
    problems: list[str] = field(default_factory=list)
    entry: dict = field(default_factory=dict)


def _decode(path: Path) -> _Image:
    """sha256, format and size of an image file that decodes completely; DataError otherwise."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                found = _Image("", image.format or "unknown", image.size)
    except Exception as e:  # PIL's parsers raise many types on bad bytes; any of them means unreadable
        raise DataError(f"does not decode ({type(e).__name__}: {e})") from None
    found.sha256 = sha256_file(path)
    return found


def _entries(layout: str, folder: Path, info: Task, name: str) -> Iterator[tuple[str, str, int]]:
    """(where, relative image path, label) of one split's list; DataError for an unparsable file."""
    if layout == "vtab":
        for n, rel, label in _list_entries(folder / f"{name}.txt"):
            yield f"{info.folder}/{name}.txt:{n}", rel, label
        return
    for rel, label in _read_json(folder / f"{name}.json").items():
        yield f"{info.folder}/{name}.json entry {rel!r}", str(Path(info.image_subdir) / rel), label


def _fgvc_ids(folder: Path) -> dict[int, int]:
    """VPT class ids mapped to 0..C-1 in sorted order over every split (as `arcvit.data.layouts` reads them)."""
    ids = sorted({i for name in FGVC_FILES if (folder / f"{name}.json").is_file()
                  for i in _read_json(folder / f"{name}.json").values()})
    return {i: n for n, i in enumerate(ids)}


class _TaskCheck:
    """The state of one task's check: images seen so far (decoded once) and the problems found."""

    def __init__(self, layout: str, folder: Path, info: Task) -> None:
        self.layout, self.folder, self.info = layout, folder, info
        self.base = folder.resolve()
        self.images: dict[str, _Image | None] = {}
        self.report = TaskReport(info.folder)

    def problem(self, line: str) -> None:
        self.report.problems.append(line)

    def image(self, where: str, rel: str) -> _Image | None:
        if rel in self.images:
            return self.images[rel]
        self.images[rel] = None
        path = self.folder / rel
        if Path(rel).is_absolute() or not path.resolve().is_relative_to(self.base):
            self.problem(f"{where}: {rel!r} lies outside the task folder (absolute, '..' or a symlink)")
        elif not path.is_file():
            self.problem(f"{where}: listed image {rel!r} not found")
        else:
            try:
                self.images[rel] = _decode(path)
            except DataError as e:
                self.problem(f"{where}: image {rel!r} {e}")
        return self.images[rel]

    def split(self, name: str, relabel: dict[int, int] | None) -> dict | None:
        """The split's manifest record, checking each entry; None when its list cannot be read."""
        try:
            entries = list(_entries(self.layout, self.folder, self.info, name))
        except DataError as e:  # named by task, not by where the task folder happens to lie (a staging folder)
            self.problem(str(e).replace(str(self.folder), self.info.folder))
            return None
        digest, labels, pairs = hashlib.sha256(), set(), []
        for where, rel, label in entries:
            label = relabel.get(label, label) if relabel is not None else label
            if not 0 <= label < self.info.num_classes:
                self.problem(f"{where}: label {label} outside 0..{self.info.num_classes - 1}")
            found = self.image(where, rel)
            digest.update(f"{rel}\t{label}\t{found.sha256 if found else '-'}\n".encode())
            labels.add(label)
            pairs.append((rel, label))
        return {"images": len(entries), "classes_seen": len(labels), "digest": digest.hexdigest(), "pairs": pairs}


def _check_sizes(check: _TaskCheck, splits: dict[str, dict]) -> None:
    expected = split_sizes(check.layout, check.info.folder)
    for name, record in splits.items():
        if name in expected and record["images"] != expected[name]:
            kind = "list file" if check.layout == "vtab" else "split file"
            check.problem(f"{check.info.folder}/{name}: {record['images']} images, the public release's "
                          f"{kind} has {expected[name]} (--any-size accepts other sizes)")


def _check_union(check: _TaskCheck, splits: dict[str, dict]) -> None:
    """VTAB-1k's train800val200 must hold exactly train800's and val200's entries."""
    if {"train800", "val200", "train800val200"} <= set(splits):
        union = sorted(splits["train800"]["pairs"] + splits["val200"]["pairs"])
        if sorted(splits["train800val200"]["pairs"]) != union:
            check.problem(f"{check.info.folder}/train800val200.txt: not the union of train800.txt and val200.txt")


def _check_leaks(check: _TaskCheck, splits: dict[str, dict]) -> None:
    """No image's bytes may appear in both a training split and the test split."""
    def hashes(names: tuple[str, ...]) -> dict[str, str]:
        return {found.sha256: rel for name in names if name in splits for rel, _ in splits[name]["pairs"]
                if (found := check.images.get(rel)) is not None}
    train, test = hashes(TRAINING[check.layout]), hashes(("test",))
    leaked = sorted(set(train) & set(test))
    if leaked:
        shown = ", ".join(f"{train[h]} = {test[h]}" for h in leaked[:LEAKS_SHOWN])
        check.problem(f"{check.info.folder}: {len(leaked)} image(s) in both training and test (same bytes): {shown}"
                      + (" ..." if len(leaked) > LEAKS_SHOWN else ""))


def _entry(check: _TaskCheck, splits: dict[str, dict], sizes_checked: bool) -> dict:
    files = [f"{name}.{'txt' if check.layout == 'vtab' else 'json'}" for name in splits]
    lists = {f: sha256_file(check.folder / f) for f in files}
    records = {name: {k: v for k, v in r.items() if k != "pairs"} for name, r in splits.items()}
    seen = [i for i in check.images.values() if i is not None]
    formats: dict[str, int] = {}
    for i in seen:
        formats[i.format] = formats.get(i.format, 0) + 1
    content = {"lists": lists, "splits": {n: r["digest"] for n, r in records.items()}}
    return {"digest": hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest(),
            "num_classes": check.info.num_classes, "lists": lists, "splits": records, "formats": formats,
            "image_sizes": {"min": list(min(i.size for i in seen)), "max": list(max(i.size for i in seen))},
            "sizes_checked": sizes_checked}


def verify_task(folder: str | Path, suite: str, task: str, check_sizes: bool = True) -> TaskReport:
    """Check ``folder`` as ``suite``'s task ``task`` (see the module docstring); ``entry`` when it passes."""
    layout = SUITE_LAYOUTS[suite]
    info = resolve_task(task, layout)
    check = _TaskCheck(layout, Path(folder), info)
    names = VTAB_SPLITS if layout == "vtab" else FGVC_FILES
    relabel = None
    if layout == "fgvc":
        try:
            relabel = _fgvc_ids(check.folder)
        except DataError as e:
            check.problem(str(e).replace(str(check.folder), info.folder))
            return check.report
    splits = {name: record for name in names if (record := check.split(name, relabel)) is not None}
    if check_sizes:
        _check_sizes(check, splits)
    _check_union(check, splits)
    _check_leaks(check, splits)
    if not check.report.problems:
        check.report.entry = _entry(check, splits, check_sizes)
    return check.report
