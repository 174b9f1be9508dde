"""``arcvit export``: an adapter (merged) or a folder of adapters (one many-task graph) as a checked ONNX file."""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from arcvit.cli import _add_backbone, _add_data, add_run_option, command_help
from arcvit.cli.bounds import CHECK_BATCH_SIZE
from arcvit.cli.hubrefs import pulled
from arcvit.errors import ConfigError
from arcvit.export.runtime import OPSETS

CHECK_BATCH = 8
EVAL_BATCH = 32


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help=command_help("export"),
                       description="Export, then check ONNX Runtime against PyTorch (batch 1 and a larger batch: "
                                   "max |dlogit| <= 1e-4 x max |logit|, identical argmax) before the file is kept. "
                                   "Images for the check: the first of --data's --split, else generated ones.")
    _add_backbone(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--adapter", help="adapter folder written by `arcvit train`: exported merged")
    source.add_argument("--merged", help="merged checkpoint written by `arcvit merge`")
    add_run_option(source)
    source.add_argument("--adapters", help="folder of adapter folders (one per task, its name = the task) on "
                                           "--backbone: one graph with inputs pixel_values and task_ids")
    p.add_argument("--allow-unverified", action="store_true",
                   help="accept a --merged file whose header has no checksum (older arcvit); its fields are still "
                        "checked")
    p.add_argument("--format", default="onnx", choices=["onnx"])
    p.add_argument("--opset", default=str(OPSETS[0]), choices=[str(o) for o in OPSETS],
                   help=f"ONNX opset (default {OPSETS[0]}, read by most runtimes; {OPSETS[-1]}: ONNX's Attention "
                        "op, faster in ONNX Runtime >= 1.22, read by fewer runtimes)")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--force", action="store_true", help="overwrite --out (and its .int8 sibling) if it exists")
    p.add_argument("--quantize", choices=["int8"], help="also write OUT.int8.onnx (ONNX Runtime dynamic "
                                                        "quantisation) and report its top-1 change on --data's --split")
    p.add_argument("--check-batch", type=CHECK_BATCH_SIZE, default=CHECK_BATCH,
                   help=f"the larger batch of the check (default {CHECK_BATCH}; a many-task graph's is at least "
                        "its task count)")
    _add_data(p, split=True)
    data = next(a for a in p._actions if a.dest == "data")
    data.required, data.help = False, ("data root: the check's images and, with --quantize, the evaluation split "
                                       "(--adapters: each task's own task under it, by its trained task or name)")
    p.set_defaults(func=cmd_export)


def _inputs(args: argparse.Namespace) -> list[Path]:
    """Every file the export reads (never overwritten, even with --force)."""
    folders = [Path(args.adapter)] if args.adapter else []
    if args.adapters and Path(args.adapters).is_dir():
        folders += [p for p in Path(args.adapters).iterdir() if p.is_dir()]
    files = [p for folder in folders if folder.is_dir() for p in folder.iterdir()]
    if args.run:
        from arcvit.training.runmodel import run_inputs
        files += run_inputs(args.run)
    return files + [Path(p) for p in (args.merged, args.checkpoint) if p]


def _writable(folder: Path) -> None:
    """The nearest existing folder of ``folder`` takes a new file (probed: permissions alone miss read-only mounts)."""
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{existing}: not a folder, so --out cannot be written under it")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ConfigError(f"{existing}: folder is not writable ({e.strerror or e}); choose another --out") from None


def check_targets(args: argparse.Namespace) -> list[Path]:
    """--out and its int8 sibling: new files, or existing ones with --force; never a file the export reads."""
    from arcvit.export.quantize import int8_path
    out = Path(args.out)
    targets = [out] + ([int8_path(out)] if args.quantize else [])
    reads = [p for p in _inputs(args) if p.exists()]
    for target in targets:
        if target.is_dir():
            raise ConfigError(f"{target}: is a folder; --out names the .onnx file to write")
        if not target.exists():
            continue
        if any(os.path.samefile(target, p) for p in reads):
            raise ConfigError(f"{target}: is a file export reads; it is never overwritten, even with --force")
        if not args.force:
            raise ConfigError(f"{target}: exists; pass --force to overwrite it")
    _writable(out.parent)
    return targets


def _task_images(args: argparse.Namespace, task: str, transform, split: str):
    from arcvit.data.layouts import load_split
    return load_split(args.data, task, split, transform, layout=args.layout, skip_corrupt=args.skip_corrupt,
                      allow_outside_root=args.allow_outside_root)


def _first(dataset, count: int):
    import torch
    return torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))])


def _check_batches(args: argparse.Namespace, model, tasks: list[dict[str, Any]], many: bool, datasets):
    """Batch 1 and a larger batch (every task in it): the first images of each task's split, else generated."""
    import torch

    from arcvit.data.transforms import data_config
    count = max(args.check_batch, len(tasks)) if many else args.check_batch
    if datasets is None:
        size = tuple(data_config(model)["input_size"])
        images = torch.randn(count, *size, generator=torch.Generator().manual_seed(0))
        where = "generated (normal noise, seed 0)"
    else:
        per_task = [_first(d, math.ceil(count / len(datasets))) for d in datasets]
        images = torch.cat([t[i:i + 1] for i in range(max(map(len, per_task))) for t in per_task if i < len(t)])
        count = len(images)
        where = f"the first images of split {args.split!r} under {args.data}"
    ids = torch.arange(count) % len(tasks)
    batch = (lambda x, i: {"pixel_values": x, "task_ids": i}) if many else (lambda x, i: {"pixel_values": x})
    return [batch(images[:1], ids[:1]), batch(images, ids)], where


def _evaluation(datasets, names: list[str], split: str, many: bool):
    """Each task's split in batches of EVAL_BATCH, streamed (memory bounded by one batch)."""
    import torch

    from arcvit.export.writer import Evaluation

    def batches(index: int):
        dataset = datasets[index]

        def each():
            for start in range(0, len(dataset), EVAL_BATCH):
                items = [dataset[i] for i in range(start, min(start + EVAL_BATCH, len(dataset)))]
                inputs = {"pixel_values": torch.stack([x for x, _ in items])}
                if many:
                    inputs["task_ids"] = torch.full((len(items),), index, dtype=torch.int64)
                yield inputs, torch.tensor([y for _, y in items])
        return each
    return Evaluation(split, {name: batches(i) for i, name in enumerate(names)})


def _single(args: argparse.Namespace):
    """The merged model (from --adapter or --run, merged here, or --merged) and its metadata."""
    import arcvit
    from arcvit.cli import _adapted_model
    from arcvit.cli.hubrefs import hub_source
    from arcvit.core.adapter_file import backbone_identity
    from arcvit.core.arc import backbone_fingerprint
    from arcvit.core.sites import find_blocks
    from arcvit.export.graphs import SingleTask, task_entry
    from arcvit.export.metadata import describe
    model, meta = _adapted_model(args)
    model = (arcvit.merge(model) if args.adapter else model).eval()
    find_blocks(model)  # an unsupported family: one line naming what arcvit looks for
    identity = backbone_identity(model)
    if args.adapter:
        source = {"adapter": hub_source(args, "adapter"), "adapter_sha256": meta.get("weights_sha256"),
                  "backbone_fingerprint": meta["backbone"]["fingerprint"]}
    elif args.run:
        source = {"run": meta["source_adapter"], "method": meta["method"]}
    else:
        source = {"merged": hub_source(args, "merged"), "source_adapter": meta.get("source_adapter")}
    name = (meta.get("extra") or {}).get("task") or meta.get("task") or "default"
    backbone = {**identity, "weights_fingerprint": backbone_fingerprint(model)}
    return SingleTask(model).eval(), model, describe("merged", model, backbone, [task_entry(name, meta)], source)


def _many(args: argparse.Namespace):
    """One graph for every adapter folder under --adapters, on --backbone."""
    from arcvit.backends import create_backbone
    from arcvit.core.adapter_file import backbone_identity
    from arcvit.core.arc import backbone_fingerprint
    from arcvit.export.graphs import many_tasks
    from arcvit.export.metadata import describe
    from arcvit.serving.tasks import task_folder, task_folders
    root = Path(args.adapters)
    folders = {name: task_folder(root, name) for name in task_folders(root)}  # as `serve` reads them
    backbone = create_backbone(args.backbone, 0, checkpoint=args.checkpoint, pretrained=not args.random_init)
    identity = {**backbone_identity(backbone), "fingerprint": backbone_fingerprint(backbone)}
    graph, tasks = many_tasks(backbone, folders)
    return graph, backbone, describe("many-task", backbone, identity, tasks, {"adapters": str(args.adapters)})


def cmd_export(args: argparse.Namespace) -> None:
    from arcvit.data.transforms import build_transform
    from arcvit.export.runtime import EXPORT_MODULES, need
    from arcvit.export.writer import Job, export_onnx
    need(*EXPORT_MODULES)
    if args.quantize and not args.data:
        raise ConfigError("--quantize int8 needs an evaluation split to report its top-1 change: pass --data "
                          "(with --task and --split)")
    check_targets(args)
    many = bool(args.adapters)
    graph, model, document = _many(args) if many else _single(args)
    tasks = document["tasks"]
    datasets = None
    if args.data:
        transform = build_transform(model, recipe="timm", train=False)
        keys = [t["trained_on"] or t["name"] for t in tasks] if many else [args.task]
        datasets = [_task_images(args, key, transform, args.split) for key in keys]
        for dataset, task in zip(datasets, tasks):
            if dataset.num_classes != task["num_classes"]:
                raise ConfigError(f"{dataset.source}: {dataset.num_classes} classes, but task {task['name']!r} has "
                                  f"{task['num_classes']}: the data is another task's")
    batches, where = _check_batches(args, model, tasks, many, datasets)
    evaluation = _evaluation(datasets, [t["name"] for t in tasks], args.split, many) if args.quantize else None
    summary = export_onnx(Job(graph, document, batches, where, int(args.opset)), Path(args.out), evaluation)
    print(json.dumps({**summary, "kind": document["kind"], "tasks": [t["name"] for t in tasks], **pulled(args)}))


def predict_onnx(args: argparse.Namespace) -> None:
    """``arcvit predict --onnx FILE``: one line per image (per image and task for a many-task file), as
    ``predict --adapter`` prints it."""
    from arcvit.data.images import open_rgb
    from arcvit.export.session import OnnxModel
    from arcvit.training.finite import require_finite
    if args.recipe != "timm" or args.accelerator not in ("auto", "cpu") or args.merge:
        raise ConfigError("--onnx runs on the CPU with the preprocessing recorded in the file: --recipe paper, "
                          "--accelerator and --merge do not apply to it")
    model = OnnxModel(args.onnx)
    for path in args.images:
        x = model.transform(open_rgb(path)).unsqueeze(0)
        for index, task in enumerate(model.tasks):
            logits = model.logits(x, [index])[:, :task["num_classes"]]
            require_finite(logits, path)
            probs = logits[0].softmax(-1)
            label = int(probs.argmax())
            print(json.dumps({"image": path, **({"task": task["name"]} if model.many else {}), "label": label,
                              "class": task["class_names"][label], "prob": round(probs[label].item(), 4),
                              **pulled(args)}))
