"""Image-classification data sets on disk, in the layouts the ARC paper's benchmarks are released in.

- ``vtab``: VTAB-1k as released by NOAH: one folder per task holding list files ``<split>.txt``.
- ``fgvc``: the FGVC splits released with VPT: ``train/val/test.json`` mapping image paths to class ids.
- ``folder``: a plain ImageFolder (one sub-folder per class), optionally under a split folder.

`load_split` reads any of them. Every cheap check (lists parse, labels in range, listed images exist) runs
when the data set is built, so a typo fails in the first second rather than hours into a run; each failure
is a `DataError` naming the file (and line) at fault. List files may start with a UTF-8 byte-order mark. An image
listed twice with two labels is an error naming both places; twice with the same label, a `DataWarning` (the
entries are kept as listed).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from arcvit.data.images import image_problem, open_rgb
from arcvit.errors import ConfigError, DataError, DataWarning


@dataclass(frozen=True)
class Task:
    """A benchmark task: its folder name on disk, class count, group and (FGVC) image sub-folder."""

    folder: str
    num_classes: int
    group: str
    image_subdir: str = ""


def task_key(name: str) -> str:
    """Task names match case-insensitively, with '-' and '_' interchangeable."""
    return name.strip().lower().replace("-", "_")


VTAB_TASKS: dict[str, Task] = {t.folder: t for t in (
    Task("cifar", 100, "natural"), Task("caltech101", 102, "natural"), Task("dtd", 47, "natural"),
    Task("oxford_flowers102", 102, "natural"), Task("oxford_iiit_pet", 37, "natural"),
    Task("svhn", 10, "natural"), Task("sun397", 397, "natural"),
    Task("patch_camelyon", 2, "specialized"), Task("eurosat", 10, "specialized"),
    Task("resisc45", 45, "specialized"), Task("diabetic_retinopathy", 5, "specialized"),
    Task("clevr_count", 8, "structured"), Task("clevr_dist", 6, "structured"), Task("dmlab", 6, "structured"),
    Task("kitti", 4, "structured"), Task("dsprites_loc", 16, "structured"), Task("dsprites_ori", 16, "structured"),
    Task("smallnorb_azi", 18, "structured"), Task("smallnorb_ele", 9, "structured"),
)}
FGVC_TASKS: dict[str, Task] = {task_key(t.folder): t for t in (
    Task("CUB_200_2011", 200, "fgvc", "images"), Task("nabirds", 555, "fgvc", "images"),
    Task("OxfordFlower", 102, "fgvc"), Task("Stanford-dogs", 120, "fgvc", "Images"),
    Task("Stanford-cars", 196, "fgvc"),
)}
_REGISTRIES = {"vtab": VTAB_TASKS, "fgvc": FGVC_TASKS}
_ALIASES = {
    "vtab": {"cifar100": "cifar", "cifar_100": "cifar", "flowers102": "oxford_flowers102",
             "flowers": "oxford_flowers102", "pets": "oxford_iiit_pet", "pet": "oxford_iiit_pet",
             "sun": "sun397", "camelyon": "patch_camelyon", "pcam": "patch_camelyon", "resisc": "resisc45",
             "retinopathy": "diabetic_retinopathy"},
    "fgvc": {"cub": "cub_200_2011", "flowers": "oxfordflower", "dogs": "stanford_dogs", "cars": "stanford_cars"},
}
_TITLES = {"vtab": "VTAB-1k", "fgvc": "FGVC"}

VTAB_SPLITS = ("train800", "val200", "train800val200", "test")
FGVC_FILES = ("train", "val", "test")
FGVC_SPLITS = {"train": ("train",), "val": ("val",), "test": ("test",), "trainval": ("train", "val")}
LAYOUTS = ("auto", "vtab", "fgvc", "folder")
# A custom task takes its class count from its largest label; beyond this many classes (or 10 per listed
# image, if more) a label is taken for a typo rather than a head of that size.
CUSTOM_CLASS_BOUND = 1000
_DECIMAL = re.compile(r"-?[0-9]+")  # ASCII digits only: int() would also take '٣', '+1', ' 1', '1_0'

# Files whose presence in a task folder identifies its layout.
_MARKERS = {"vtab": tuple(f"{s}.txt" for s in VTAB_SPLITS), "fgvc": ("train.json",)}


def resolve_task(name: str, layout: str) -> Task:
    """The 'vtab' or 'fgvc' task called ``name`` (its folder name or a usual alias)."""
    if layout not in _REGISTRIES:
        raise ConfigError(f"layout {layout!r}: tasks are registered for {', '.join(_REGISTRIES)} only")
    tasks = _REGISTRIES[layout]
    key = _ALIASES[layout].get(task_key(name), task_key(name))
    if key not in tasks:
        raise DataError(f"unknown {_TITLES[layout]} task {name!r} (layout {layout!r}); known: "
                        f"{', '.join(t.folder for t in tasks.values())} (aliases: {', '.join(_ALIASES[layout])})")
    return tasks[key]


def _listing(folder: Path) -> str:
    """A short list of what a folder holds, for error messages."""
    names = sorted(p.name for p in folder.iterdir())
    return (", ".join(names[:20]) + (f", ... ({len(names)} entries)" if len(names) > 20 else "")) or "nothing"


def _task_folder(root: Path, info: Task) -> Path | None:
    """``root/<folder>``, or ``root`` itself when it is the task's folder; None when neither is."""
    if (root / info.folder).is_dir():
        return root / info.folder
    return root if task_key(root.name) == task_key(info.folder) else None


def _list_entries(path: Path, strict: bool = True) -> list[tuple[int, str, int]]:
    """(line number, relative path, label) of each line of a VTAB-1k list file; the label follows the last
    whitespace, so paths may contain spaces. Labels must be plain decimal integers; a malformed line is an
    error, or (not ``strict``) left out."""
    entries = []
    for n, line in enumerate(_read_text(path, "list file").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.strip().rsplit(maxsplit=1)
        if not strict and (len(parts) < 2 or not _DECIMAL.fullmatch(parts[1])):
            continue
        if len(parts) < 2:
            raise DataError(f"{path}:{n}: expected '<relative/path> <integer label>', got {line!r}")
        if not _DECIMAL.fullmatch(parts[1]):
            raise DataError(f"{path}:{n}: label {parts[1]!r} is not a decimal integer (ASCII digits 0-9 only); "
                            f"expected '<relative/path> <integer label>', got {line!r}")
        entries.append((n, parts[0], int(parts[1])))
    return entries


def _custom_vtab_task(folder: Path, open_test: bool = True) -> Task | None:
    """A task folder in the VTAB-1k list layout that is not one of the 19 (e.g. arcvit's mini suite).

    Its class count is the largest label in its list files plus one (so every split agrees on it; a
    malformed line is reported when its own split is loaded, not here), test.txt left out unless ``open_test``;
    ``classes.txt`` (one name a line), when present, names the classes. A label beyond
    max(CUSTOM_CLASS_BOUND, 10 x the listed images, the names in classes.txt) is refused as a typo.
    """
    lists = [folder / m for m in _MARKERS["vtab"] if (folder / m).is_file() and (open_test or m != "test.txt")]
    if not lists:
        return None
    entries = [(f, n, label) for f in lists for n, _, label in _list_entries(f, strict=False)]
    if not entries:
        return Task(folder.name, 1, "custom")
    file, line, top = max(entries, key=lambda e: e[2])
    bound = max(CUSTOM_CLASS_BOUND, 10 * len(entries), len(_class_names_file(folder) or []))
    if top >= bound:
        raise DataError(f"label {top} on {file}:{line} is larger than this task's {len(entries)} list entries "
                        f"allow (a custom task's class count comes from its largest label, up to "
                        f"max({CUSTOM_CLASS_BOUND}, 10 x entries) = {bound}); a typo? "
                        f"More classes need their names in {folder / 'classes.txt'}")
    return Task(folder.name, top + 1, "custom")


def _class_names_file(folder: Path) -> list[str] | None:
    names_file = folder / "classes.txt"
    if not names_file.is_file():
        return None
    return [n.strip() for n in _read_text(names_file, "class names").splitlines() if n.strip()]


def class_names_for(folder: Path, num_classes: int) -> list[str]:
    names = _class_names_file(folder)
    if names is None:
        return [str(c) for c in range(num_classes)]
    if len(names) != num_classes:
        raise DataError(f"{folder / 'classes.txt'}: {len(names)} names for {num_classes} classes")
    return names


def _locate(root: Path, task: str, layout: str, open_test: bool = True) -> tuple[Task, Path]:
    """The task (``task``, or the folder name of ``root`` when empty) and its folder."""
    try:
        info = resolve_task(task or root.name, layout)
    except DataError:
        folder = root / task if task else root
        custom = _custom_vtab_task(folder, open_test) if layout == "vtab" and folder.is_dir() else None
        if custom is None:
            raise
        return custom, folder
    folder = _task_folder(root, info)
    if folder is None:
        raise DataError(f"{root / info.folder}: {_TITLES[layout]} task folder not found; "
                        f"{root} holds: {_listing(root)}")
    return info, folder


def _detect(root: Path, task: str) -> tuple[str, list[str]]:
    """The layout, and where a VTAB-1k/FGVC task of that name was looked for in vain (for error messages)."""
    looked = []
    candidate = root / task if task else root
    if candidate.is_dir() and any((candidate / m).is_file() for m in _MARKERS["vtab"]):
        return "vtab", []
    for layout, markers in _MARKERS.items():
        try:
            info = resolve_task(task or root.name, layout)
        except DataError:
            continue
        folder = _task_folder(root, info)
        if folder and any((folder / m).is_file() for m in markers):
            return layout, []
        looked.append(f"{_TITLES[layout]} files ({', '.join(markers)}) in {folder or root / info.folder}")
    if task and not (root / task).is_dir():
        known = "; ".join(f"{_TITLES[lay]}: {', '.join(t.folder for t in reg.values())}"
                          for lay, reg in _REGISTRIES.items())
        looked.append(f"an image folder {root / task}")
        raise DataError(f"{root}: no data for task {task!r}; looked for {'; '.join(looked)}. Known tasks: {known}")
    return "folder", looked


def detect_layout(root: str | Path, task: str = "") -> str:
    """'vtab' if the task folder holds a list file, 'fgvc' if it holds train.json, else 'folder'.

    A name both benchmarks use ('flowers') picks whichever task folder holds its files, VTAB-1k first.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data root not found")
    return _detect(root, task)[0]


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise DataError(f"{path}: {what} not found; {path.parent} holds: {_listing(path.parent)}")
    try:  # utf-8-sig: a byte-order mark (Windows editors write one) is dropped, not read as part of line 1
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read {what} ({e})") from None


def _check_label(label: int, num_classes: int, where: str) -> None:
    if not 0 <= label < num_classes:
        raise DataError(f"{where}: label {label} outside 0..{num_classes - 1}")


def _read_list(path: Path, num_classes: int, inside: Callable[[Path, str, str], None]) -> list[tuple[Path, int]]:
    """Parse a VTAB-1k list file: labels in range, images present and (``inside``) under the data root."""
    samples = []
    entries = _list_entries(path)
    check_repeats([(f"{path}:{n}", rel, label) for n, rel, label in entries])
    for n, rel, label in entries:
        _check_label(label, num_classes, f"{path}:{n}")
        image = path.parent / rel
        inside(image, rel, f"{path}:{n}")
        if not image.is_file():
            raise DataError(f"{path}:{n}: listed image {image} not found")
        samples.append((image, label))
    return samples


def _root_guard(root: Path, allow_outside: bool) -> Callable[[Path, str, str], None]:
    """``check(path, as_written, where)``: refuses an absolute path, or one that resolves (``..``,
    symlinks) outside ``root``, unless ``allow_outside``. Keeps a list file from reading arbitrary files."""
    base = root.resolve()

    def check(path: Path, as_written: str, where: str) -> None:
        if allow_outside:
            return
        if Path(as_written).is_absolute():
            raise DataError(f"{where}: {as_written!r} is an absolute path; paths must be relative and stay "
                            f"under the data root {base} (--allow-outside-root permits others)")
        resolved = path.resolve()
        if not resolved.is_relative_to(base):
            raise DataError(f"{where}: {as_written!r} resolves to {resolved}, outside the data root {base} "
                            "(via '..' or a symlink; --allow-outside-root permits it)")
    return check


def check_repeats(entries: list[tuple[str, str, int]]) -> None:
    """``(where, image path as listed, label)`` entries naming one image (after normalising ``./``, ``a//b``)
    more than once: with two labels a `DataError` naming both places, with the same label a `DataWarning`
    (each copy counts again in training and accuracy; the entries are kept as listed)."""
    first: dict[str, tuple[str, int]] = {}
    repeats = []
    for where, rel, label in entries:
        key = os.path.normpath(rel)
        if key not in first:
            first[key] = (where, label)
            continue
        where0, label0 = first[key]
        if label != label0:
            raise DataError(f"{where}: image {rel!r} is listed again with label {label}; {where0} gives it "
                            f"label {label0}: one image, two labels")
        repeats.append((where0, where, rel))
    if repeats:
        where0, where, rel = repeats[0]
        warnings.warn(f"{where}: image {rel!r} is listed again with the same label (first at {where0}); "
                      f"{len(repeats)} repeated entr{'y' if len(repeats) == 1 else 'ies'} in all, each counted "
                      "again in training and in accuracy", DataWarning, stacklevel=3)


def _read_json(path: Path) -> dict[str, int]:
    """Parse a VPT split file: a JSON object mapping image paths to integer class ids (a path given twice,
    which ``json`` would silently reduce to its last value, goes through `check_repeats`)."""
    pairs: list[tuple[str, Any]] = []

    def keep_pairs(items: list[tuple[str, Any]]) -> dict:
        pairs[:] = items
        return dict(items)
    try:
        data = json.loads(_read_text(path, "split file"), object_pairs_hook=keep_pairs)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    except RecursionError:
        raise DataError(f"{path}: invalid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object mapping image paths to class ids, "
                        f"got a {type(data).__name__}")
    for rel, class_id in data.items():
        if type(class_id) is not int:
            raise DataError(f"{path}: entry {rel!r}: class id must be an integer, got {class_id!r}")
    check_repeats([(str(path), rel, class_id) for rel, class_id in pairs])
    return data


def _load_vtab(root: Path, task: str, split: str, inside: Callable, open_test: bool, **opts: Any) -> LabeledImages:
    info, folder = _locate(root, task, "vtab", open_test)
    if split not in VTAB_SPLITS:
        raise ConfigError(f"VTAB-1k split {split!r}: choose one of {', '.join(VTAB_SPLITS)}")
    list_file = folder / f"{split}.txt"
    return LabeledImages(_read_list(list_file, info.num_classes, inside), num_classes=info.num_classes,
                         class_names=class_names_for(folder, info.num_classes), base=folder,
                         source=f"VTAB-1k {info.folder}/{split} ({list_file})", **opts)


def _load_fgvc(root: Path, task: str, split: str, inside: Callable, open_test: bool, **opts: Any) -> LabeledImages:
    """Class ids are remapped in sorted order of the ids in all the json files (test.json left out unless
    ``open_test``), so every split agrees."""
    info, folder = _locate(root, task, "fgvc")
    if split not in FGVC_SPLITS:
        raise ConfigError(f"FGVC split {split!r}: choose one of {', '.join(FGVC_SPLITS)}")
    files = {name: folder / f"{name}.json" for name in FGVC_FILES}
    annotations = {name: _read_json(files[name]) for name in FGVC_FILES
                   if name in FGVC_SPLITS[split] or (files[name].is_file() and (open_test or name != "test"))}
    ids = sorted({i for anno in annotations.values() for i in anno.values()})
    if len(ids) > info.num_classes:
        extra = ids[info.num_classes]
        name, rel = next((n, r) for n, anno in annotations.items() for r, i in anno.items() if i == extra)
        raise DataError(f"{files[name]}: entry {rel!r}: class id {extra} is distinct id number "
                        f"{info.num_classes + 1}, but {info.folder} has {info.num_classes} classes")
    remap = {class_id: label for label, class_id in enumerate(ids)}
    image_dir = folder / info.image_subdir
    if len(FGVC_SPLITS[split]) > 1:  # trainval: an image in both files
        check_repeats([(str(files[n]), rel, i) for n in FGVC_SPLITS[split] for rel, i in annotations[n].items()])
    samples = []
    for name in FGVC_SPLITS[split]:
        for rel, class_id in annotations[name].items():
            inside(image_dir / rel, rel, f"{files[name]}: entry {rel!r}")
            if not (image_dir / rel).is_file():
                raise DataError(f"{files[name]}: entry {rel!r}: image {image_dir / rel} not found")
            samples.append((image_dir / rel, remap[class_id]))
    return LabeledImages(samples, num_classes=info.num_classes,
                         class_names=[str(c) for c in range(info.num_classes)], base=image_dir,
                         source=f"FGVC {info.folder}/{split} ({', '.join(str(files[n]) for n in FGVC_SPLITS[split])})",
                         **opts)


def _load_folder(root: Path, task: str, split: str, inside: Callable, open_test: bool, **opts: Any) -> LabeledImages:
    """Classes are the sorted sub-folder names (as in torchvision's ImageFolder); a folder named after a
    VTAB-1k/FGVC task may not hold more classes than that task has."""
    folder = root
    for part in (task, split):
        if part:
            if not (folder / part).is_dir():
                raise DataError(f"{folder / part}: folder not found; {folder} holds: {_listing(folder)}")
            folder = folder / part
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{folder}: no class sub-folders (expected {folder}/<class>/<image>)")
    _check_known_class_count(task or folder.name, classes, folder)
    samples = [(path, label) for label, name in enumerate(classes) for path in sorted((folder / name).rglob("*"))
               if path.suffix.lower() in IMG_EXTENSIONS and path.is_file()]
    for path, _ in samples:
        inside(path, str(path.relative_to(folder)), f"{folder}")
    return LabeledImages(samples, num_classes=len(classes), class_names=classes, base=folder,
                         source=f"image folder {folder}", **opts)


def _check_known_class_count(name: str, classes: list[str], folder: Path) -> None:
    counts = []
    for layout in _REGISTRIES:
        try:
            counts.append(resolve_task(name, layout).num_classes)
        except DataError:
            pass
    if counts and len(classes) > max(counts):
        raise DataError(f"{folder}: {len(classes)} class folders, but task {name!r} has {max(counts)} classes "
                        f"(a stray folder, or another task's data?)")


_LOADERS = {"vtab": _load_vtab, "fgvc": _load_fgvc, "folder": _load_folder}


SKIPPED_SHOWN = 3  # unreadable images named in the --skip-corrupt warning


class LabeledImages(Dataset):
    """``(transform(RGB image), label)`` pairs from image files; images are decoded only when indexed.

    With ``skip_corrupt`` every image gets PIL's cheap ``verify()`` up front and failures are dropped, listed
    in ``skipped`` and reported in a `DataWarning`; a file that passes it but fails to decode later still
    raises `DataError`. A split whose images all have one label also gets a `DataWarning`.
    """

    def __init__(self, samples: list[tuple[Path, int]], *, num_classes: int, class_names: list[str],
                 base: Path, source: str, transform: Callable | None, skip_corrupt: bool = False) -> None:
        self.num_classes = num_classes
        self.class_names = class_names
        self.base = base
        self.source = source
        self.transform = transform
        self.skipped: list[tuple[Path, str]] = []
        if skip_corrupt:
            checked = [(sample, image_problem(sample[0])) for sample in samples]
            self.skipped = [(path, problem) for (path, _), problem in checked if problem]
            samples = [sample for sample, problem in checked if not problem]
        if not samples:
            raise DataError(f"{source}: the split holds no images"
                            + (f" ({len(self.skipped)} skipped as unreadable)" if self.skipped else ""))
        self.samples = samples
        self._warn()

    def _warn(self) -> None:
        if self.skipped:
            shown = ", ".join(f"{p} ({why})" for p, why in self.skipped[:SKIPPED_SHOWN])
            more = f" and {len(self.skipped) - SKIPPED_SHOWN} more" if len(self.skipped) > SKIPPED_SHOWN else ""
            warnings.warn(f"{self.source}: skipped {len(self.skipped)} unreadable image(s): {shown}{more}",
                          DataWarning, stacklevel=3)
        labels = {label for _, label in self.samples}
        if len(labels) == 1 and self.num_classes > 1:
            label = labels.pop()
            warnings.warn(f"{self.source}: every image has label {label} ({self.class_names[label]}); "
                          f"the task has {self.num_classes} classes", DataWarning, stacklevel=3)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        try:
            image = open_rgb(path)
        except DataError as e:
            raise DataError(f"{e}; skip_corrupt drops unreadable images") from None
        return (self.transform(image) if self.transform else image), label

    def __repr__(self) -> str:
        return f"LabeledImages({self.source}: {len(self)} images, {self.num_classes} classes)"

    def fingerprint(self) -> str:
        """sha256 over the sorted (relative path, label, file size) entries: identifies the split's content
        well enough to record with a run, without decoding an image."""
        entries = []
        for path, label in self.samples:
            try:
                size = path.stat().st_size
            except OSError as e:
                raise DataError(f"{path}: cannot stat image ({e})") from None
            entries.append(f"{Path(os.path.relpath(path, self.base)).as_posix()}\t{label}\t{size}\n")
        return hashlib.sha256("".join(sorted(entries)).encode()).hexdigest()


def load_split(root: str | Path, task: str, split: str, transform: Callable | None, *, layout: str = "auto",
               skip_corrupt: bool = False, allow_outside_root: bool = False, open_test: bool = True) -> LabeledImages:
    """One split of a data set under ``root`` in layout 'vtab', 'fgvc', 'folder' or 'auto' (detected).

    ``task`` names the task folder under ``root`` (a VTAB-1k/FGVC name or alias, or an image folder's name);
    empty means ``root`` is the task folder. For 'folder', ``split`` is a sub-folder, or empty for none.
    Every image must lie under ``root`` (after resolving '..' and symlinks) unless ``allow_outside_root``.
    ``open_test=False`` never opens the test split's list or split file (a tuner's promise): a custom task's
    class count and FGVC's class ids then come from the other files, and ``split`` may not be the test split.
    """
    root = Path(root)
    if layout not in LAYOUTS:
        raise ConfigError(f"layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    if not root.is_dir():
        raise DataError(f"{root}: data root folder not found")
    inside = _root_guard(root, allow_outside_root)
    if task:
        inside(root / task, task, "--task")
    looked: list[str] = []
    if layout == "auto":
        layout, looked = _detect(root, task)
    if not open_test and split == "test":
        raise ConfigError("the test split may not be opened here (open_test=False)")
    try:
        return _LOADERS[layout](root, task, split, inside, open_test, transform=transform, skip_corrupt=skip_corrupt)
    except DataError as e:
        if looked:  # a benchmark task's name that fell back to an image folder: say what else was tried
            raise DataError(f"{e}; also looked for {'; '.join(looked)}") from None
        raise


def warn_unseen_classes(train: LabeledImages, other: LabeledImages) -> list[int]:
    """The labels ``other`` (a val or test split) holds that ``train`` never shows, with a `DataWarning`
    naming them: a model cannot learn a class it never sees, so its accuracy on them is chance at best."""
    unseen = sorted({label for _, label in other.samples} - {label for _, label in train.samples})
    if unseen:
        named = ", ".join(f"{label} ({other.class_names[label]})" for label in unseen[:10])
        warnings.warn(f"{other.source}: {len(unseen)} class(es) never appear in the training split "
                      f"{train.source}: {named}{' ...' if len(unseen) > 10 else ''}", DataWarning, stacklevel=2)
    return unseen
