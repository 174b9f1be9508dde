"""Training and evaluation with Lightning Fabric: one loop for every method, every device and strategy.

A run folder holds ``settings.json`` (every setting, seed, protocol, data fingerprints, versions),
``metrics.csv`` (one row per epoch), ``checkpoints/`` (atomic, checksummed; ``resume=True`` continues from the
newest good one), ``results.json`` (written last: its presence means the run finished), and the trained
weights (``adapter/`` for ARC, ``trainable.safetensors`` for the other methods).

Protocols, so that no number is ever chosen by test accuracy:
- ``final`` (VTAB-1k's): train on train800val200 (FGVC: train+val), report test after the last epoch.
- ``select``: train on train800 (FGVC: train), score val200 (val) every epoch, keep the best epoch by
  validation accuracy, and report test once, with that epoch's weights.
"""
from __future__ import annotations

import csv
import io
import json
import math
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning_fabric import Fabric
from lightning_fabric.utilities.seed import seed_everything
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from arcvit import __version__
from arcvit.backends.timm.create import create_backbone
from arcvit.core.adapter_file import save_adapter
from arcvit.core.arc import is_adapted
from arcvit.core.params import parameter_breakdown
from arcvit.core.sites import find_blocks
from arcvit.data.layouts import detect_layout, load_split
from arcvit.data.transforms import build_transform
from arcvit.errors import ConfigError
from arcvit.fileio import write_json, write_safetensors, write_text
from arcvit.methods import SPECS, prepare_model, trainable_state_dict
from arcvit.training.checkpoint import (load_latest_checkpoint, optimizer_from_tensors, optimizer_to_tensors,
                                       save_checkpoint)
from arcvit.training.config import PROTOCOL_SPLITS, RUNTIME_FIELDS, DataSpec, TrainConfig
from arcvit.training.progress import EpochProgress

class _Shard(torch.utils.data.Sampler):
    """Every ``world``-th index from ``rank``, with no padding, so that distributed evaluation counts each
    example exactly once."""

    def __init__(self, size: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, size, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@torch.no_grad()
def evaluate(fabric: Fabric, model: nn.Module, dataset: Dataset, batch_size: int, num_workers: int = 0) -> float:
    """Top-1 accuracy over ``dataset``, sharded across processes and summed."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                        sampler=_Shard(len(dataset), fabric.global_rank, fabric.world_size))
    model.eval()
    correct = torch.zeros(2, device=fabric.device)
    for images, labels in loader:
        images, labels = images.to(fabric.device), labels.to(fabric.device)
        correct[0] += (model(images).argmax(-1) == labels).sum()
        correct[1] += labels.numel()
    correct = fabric.all_reduce(correct, reduce_op="sum")
    return (correct[0] / correct[1]).item()


def _schedule(cfg: TrainConfig, steps_per_epoch: int):
    """Linear warm-up for ``warmup_epochs``, then cosine decay to zero, stepped every batch."""
    warmup, total = cfg.warmup_epochs * steps_per_epoch, cfg.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return factor


def _strategy(cfg: TrainConfig, model: nn.Module):
    if cfg.strategy != "fsdp":
        return cfg.strategy
    from lightning_fabric.strategies import FSDPStrategy

    blocks = {type(m) for _, m, _ in find_blocks(model)}
    return FSDPStrategy(auto_wrap_policy=blocks, use_orig_params=True,
                        activation_checkpointing_policy=blocks if cfg.grad_checkpointing else None)


def _loggers(out: Path) -> list:
    """TensorBoard event files under ``out/tensorboard`` when tensorboard is installed (metrics.csv always)."""
    try:
        from lightning_fabric.loggers import TensorBoardLogger
        return [TensorBoardLogger(root_dir=str(out), name="tensorboard", version="")]
    except ModuleNotFoundError:
        return []


def _write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_text(path, buf.getvalue())


def _prepare_output(out: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder; --out names the run folder")
    if (out / "results.json").exists() and not resume:
        raise ConfigError(f"{out}: this run has finished already (results.json); choose another --out")
    if (out / "checkpoints").exists() and not resume:
        raise ConfigError(f"{out}: holds checkpoints of an earlier run; pass --resume to continue it, "
                          "or choose another --out")




def _check_resumable(out: Path, cfg: TrainConfig) -> None:
    """A resumed run must continue with the settings it started with (devices and workers may change)."""
    try:
        before = json.loads((out / "settings.json").read_text())["train"]
    except (OSError, ValueError, KeyError):
        return
    now = asdict(cfg)
    changed = [f"{k}: {before.get(k)!r} -> {now[k]!r}" for k in now
               if k not in RUNTIME_FIELDS and k in before and before[k] != now[k]]
    if changed:
        raise ConfigError(f"{out}: --resume with other settings than the run started with ({'; '.join(changed)})")


def train(backbone: str, data: DataSpec, cfg: TrainConfig, out_dir: str | Path, *,
          checkpoint: str | Path | None = None, pretrained: bool = True, resume: bool = False,
          progress: bool = True,
          max_steps_per_epoch: int | None = None) -> dict[str, Any]:
    """Train ``cfg.method`` on one task and return the results (also written to ``out_dir``)."""
    out = Path(out_dir)
    _prepare_output(out, resume)
    if resume:
        _check_resumable(out, cfg)
    if resume and (out / "results.json").exists():
        return json.loads((out / "results.json").read_text())

    layout = detect_layout(data.root, data.task) if data.layout == "auto" else data.layout
    train_split, val_split, test_split = PROTOCOL_SPLITS[layout][cfg.protocol]

    seed_everything(cfg.seed, verbose=False)  # before any weight is initialised: adapters, heads
    model = create_backbone(backbone, num_classes=1, checkpoint=checkpoint, pretrained=pretrained,
                            drop_path_rate=cfg.drop_path)  # head resized below
    splits = {}
    for role, split in (("train", train_split), ("val", val_split), ("test", test_split)):
        if split is not None:
            transform = build_transform(model, recipe=cfg.recipe, train=role == "train", layout=layout)
            splits[role] = load_split(data.root, data.task, split, transform, layout=layout,
                                      skip_corrupt=data.skip_corrupt)
    num_classes = splits["train"].num_classes
    model.reset_classifier(num_classes)
    model = prepare_model(model, cfg.method, rank=cfg.rank, dropout=cfg.adapter_dropout)
    if cfg.grad_checkpointing and hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)

    try:
        fabric = Fabric(accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
                        strategy=_strategy(cfg, model), precision=cfg.precision, loggers=_loggers(out))
    except (ValueError, TypeError) as e:  # Fabric validates accelerator, strategy, precision, devices
        raise ConfigError(f"accelerator/strategy/precision/devices: {str(e).splitlines()[0]}") from None
    fabric.launch()
    if cfg.batch_size % fabric.world_size:
        raise ConfigError(f"batch_size {cfg.batch_size} must divide evenly over {fabric.world_size} processes")
    if cfg.batch_size > len(splits["train"]):
        raise ConfigError(f"batch_size {cfg.batch_size} is larger than the training split "
                          f"({len(splits['train'])} images)")

    raw_model = model
    trainable = [p for p in raw_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, optimizer = fabric.setup(model, optimizer)
    sampler = DistributedSampler(splits["train"], num_replicas=fabric.world_size, rank=fabric.global_rank,
                                 shuffle=True, seed=cfg.seed, drop_last=False)
    loader = DataLoader(splits["train"], batch_size=cfg.batch_size // fabric.world_size, sampler=sampler,
                        num_workers=cfg.num_workers, drop_last=False)
    steps_per_epoch = min(len(loader), max_steps_per_epoch or len(loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, steps_per_epoch))

    names = [n for n, p in raw_model.named_parameters() if p.requires_grad]
    params = dict(raw_model.named_parameters())
    metrics: list[dict[str, Any]] = []
    best = {"val_top1": -1.0, "epoch": 0, "state": None}
    start_epoch, elapsed_before = 0, 0.0
    ckpt_dir = out / "checkpoints"
    if resume:
        ckpt = load_latest_checkpoint(ckpt_dir)
        for note in (ckpt.skipped if ckpt else []):
            fabric.print(f"warning: skipped checkpoint {note}", file=sys.stderr)
        if ckpt is not None and ckpt.tensors:
            with torch.no_grad():
                for n in names:
                    params[n].copy_(ckpt.tensors[f"param/{n}"])
            optimizer_from_tensors(optimizer, ckpt.tensors, ckpt.state["optimizer"])
            scheduler.load_state_dict(ckpt.state["scheduler"])
            torch.set_rng_state(ckpt.tensors["rng/torch"])
            metrics, start_epoch = ckpt.state["metrics"], ckpt.epoch
            elapsed_before = ckpt.state["elapsed_s"]
            best.update(ckpt.state["best"])
            if best["epoch"]:
                best["state"] = {n: ckpt.tensors[f"best/{n}"] for n in names}
            fabric.print(f"resumed from {ckpt_dir} at epoch {start_epoch}", file=sys.stderr)

    settings = {
        "backbone": backbone, "checkpoint": str(checkpoint) if checkpoint else None, "pretrained": pretrained,
        "data": asdict(data) | {"layout": layout, "splits": {r: s for r, s in zip(
            ("train", "val", "test"), (train_split, val_split, test_split)) if s}},
        "data_fingerprints": {role: ds.fingerprint() for role, ds in splits.items()},
        "train": asdict(cfg), "num_classes": num_classes, "world_size": fabric.world_size,
        "versions": {"arcvit": __version__, "torch": torch.__version__, "timm": timm.__version__,
                     "python": platform.python_version()},
        "skipped_images": {role: [str(p) for p, _ in getattr(ds, "skipped", [])] for role, ds in splits.items()},
    }
    if fabric.is_global_zero:
        write_json(out / "settings.json", settings)

    started = time.time()
    bar = EpochProgress(enabled=progress and fabric.is_global_zero, total_epochs=cfg.epochs)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        sampler.set_epoch(epoch)
        epoch_start, seen, loss_sum, correct = time.time(), 0, 0.0, 0
        with bar.epoch(epoch + 1, steps_per_epoch) as step_bar:
            for step, (images, labels) in enumerate(loader):
                if step >= steps_per_epoch:
                    break
                images, labels = images.to(fabric.device), labels.to(fabric.device)
                logits = model(images)
                loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                fabric.backward(loss)
                if cfg.grad_clip > 0:
                    fabric.clip_gradients(model, optimizer, max_norm=cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                seen += labels.numel()
                loss_sum += loss.item() * labels.numel()
                correct += (logits.argmax(-1) == labels).sum().item()
                step_bar.update(loss=loss_sum / seen, acc=correct / seen,
                                ips=seen * fabric.world_size / (time.time() - epoch_start))
        totals = fabric.all_reduce(torch.tensor([loss_sum, correct, seen], dtype=torch.float64,
                                                device=fabric.device), reduce_op="sum")
        row = {"epoch": epoch + 1, "lr": scheduler.get_last_lr()[0],
               "train_loss": round(totals[0].item() / totals[2].item(), 6),
               "train_top1": round(totals[1].item() / totals[2].item(), 6),
               "images_per_s": round(totals[2].item() / (time.time() - epoch_start), 1)}
        if "val" in splits:
            row["val_top1"] = round(evaluate(fabric, model, splits["val"], cfg.eval_batch_size, cfg.num_workers), 6)
            if row["val_top1"] > best["val_top1"]:
                best.update(val_top1=row["val_top1"], epoch=epoch + 1,
                            state={n: params[n].detach().clone() for n in names})
        metrics.append(row)
        bar.log(row)
        fabric.log_dict({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
        if fabric.is_global_zero:
            _write_metrics(out / "metrics.csv", metrics)
            opt_tensors, opt_settings = optimizer_to_tensors(optimizer)
            tensors = {f"param/{n}": params[n] for n in names} | opt_tensors | {"rng/torch": torch.get_rng_state()}
            if best["state"] is not None:
                tensors |= {f"best/{n}": t for n, t in best["state"].items()}
            save_checkpoint(ckpt_dir, epoch + 1, tensors, {
                "epoch": epoch + 1, "metrics": metrics, "optimizer": opt_settings,
                "scheduler": scheduler.state_dict(), "elapsed_s": elapsed_before + time.time() - started,
                "best": {"val_top1": best["val_top1"], "epoch": best["epoch"]}})
        fabric.barrier()

    if best["state"] is not None:
        with torch.no_grad():
            for n in names:
                params[n].copy_(best["state"][n])
    test_top1 = evaluate(fabric, model, splits["test"], cfg.eval_batch_size, cfg.num_workers)
    counts = parameter_breakdown(raw_model)
    results = {
        "task": data.task or Path(data.root).name, "method": cfg.method, "backbone": backbone,
        "protocol": cfg.protocol, "test_top1": round(test_top1, 6),
        "selected_epoch": best["epoch"] or cfg.epochs,
        "val_top1": best["val_top1"] if best["epoch"] else None,
        "trainable_params": counts["trainable"], "total_params": counts["total"],
        "mergeable": SPECS[cfg.method].mergeable, "seed": cfg.seed,
        "train_images": len(splits["train"]), "test_images": len(splits["test"]),
        "wall_time_s": round(elapsed_before + time.time() - started, 1),
        "images_per_s": round(sum(r["images_per_s"] for r in metrics) / max(1, len(metrics)), 1),
    }
    if fabric.is_global_zero:
        if is_adapted(raw_model):
            save_adapter(raw_model, out / "adapter", extra={"task": results["task"], "test_top1": test_top1,
                                                            "class_names": splits["train"].class_names})
        else:
            write_safetensors(out / "trainable.safetensors", trainable_state_dict(raw_model))
        write_json(out / "results.json", results)
    fabric.barrier()
    return results
