"""Training and evaluation with Lightning Fabric: one loop for every method, every device and strategy.

A run folder holds ``settings.json`` (every setting, seed, protocol, data fingerprints, versions),
``metrics.csv`` (one row per epoch), ``checkpoints/`` (atomic, checksummed; ``resume=True`` continues from the
newest good one), ``results.json`` (written last: its presence means the run finished), and the trained
weights, in the method's own format (``MethodSpec.state``: ``adapter/`` for the ARC family,
``trainable.safetensors`` for the other methods). While a run trains, its folder
is locked: a second ``train`` into it stops at once (``arcvit.training.runfolder``). A loss or gradient norm that stops
being finite ends the run with :class:`~arcvit.errors.TrainingDiverged`, and so do validation or test logits that are
not finite (no accuracy is reported from them); earlier checkpoints stay. settings.json
records the precision Fabric actually runs (on CPU it runs ``16-mixed`` as ``bf16-mixed``, and says so).

The loop follows Lightning Fabric's own trainer example: :func:`train` orchestrates set-up, one function per
epoch, evaluation, checkpoints and results, over one :class:`LoopState` that saves and restores itself.

Protocols, so that no number is ever chosen by test accuracy:
- ``final`` (VTAB-1k's): train on train800val200 (FGVC: train+val), report test after the last epoch.
- ``select``: train on train800 (FGVC: train), score val200 (val) every epoch, keep the best epoch by
  validation accuracy, and report test once, with that epoch's weights.
"""
from __future__ import annotations

import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning_fabric import Fabric
from lightning_fabric.utilities.seed import seed_everything
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from arcvit.backends import create_backbone
from arcvit.core.arc import arc_config, is_adapted, shared_sets
from arcvit.core.basis import init_basis_from_data
from arcvit.core.params import parameter_breakdown
from arcvit.core.sites import find_blocks
from arcvit.data.layouts import detect_layout, load_split, warn_unseen_classes
from arcvit.data.manifest import data_provenance
from arcvit.data.transforms import build_transform
from arcvit.errors import ConfigError, NonFiniteOutput, TrainingDiverged, first_line
from arcvit.fileio import sha256_file, write_json
from arcvit.methods import SPECS, prepare_model, save_trained
from arcvit.training.checkpoint import (
    LOOP,
    MODEL,
    OPTIMIZER,
    SCHEDULER,
    SafeCheckpointIO,
    fabric_load,
    fabric_save,
    load_latest_checkpoint,
)
from arcvit.training.config import PROTOCOL_SPLITS, DataSpec, TrainConfig
from arcvit.training.devices import require_devices
from arcvit.training.finite import nonfinite_error, nonfinite_items
from arcvit.training.progress import EpochProgress
from arcvit.training.runfolder import check_resumable, refuse_to_overwrite, run_lock, started_settings, write_metrics
from arcvit.training.runmodel import method_options
from arcvit.version import __version__

DATA_INIT_IMAGES = 256  # training images whose site inputs set ARC's data-aware bases (basis_init="data")


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
    """Top-1 accuracy over ``dataset``, sharded across processes and summed. Logits that are not finite on any
    process raise :class:`~arcvit.errors.NonFiniteOutput` on every process (counted in the same all-reduce)."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                        sampler=_Shard(len(dataset), fabric.global_rank, fabric.world_size))
    model.eval()
    counts = torch.zeros(3, device=fabric.device)  # correct, seen, seen with a non-finite logit
    for images, labels in loader:
        images, labels = images.to(fabric.device), labels.to(fabric.device)
        logits = model(images)
        counts[0] += (logits.argmax(-1) == labels).sum()
        counts[1] += labels.numel()
        counts[2] += nonfinite_items(logits)
    counts = fabric.all_reduce(counts, reduce_op="sum")
    if counts[2].item():
        raise nonfinite_error(getattr(dataset, "source", "the evaluated split"), int(counts[2]), int(counts[1]))
    return (counts[0] / counts[1]).item()


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
    return FSDPStrategy(auto_wrap_policy=blocks, use_orig_params=True, state_dict_type="full",  # gathered checkpoints
                        activation_checkpointing_policy=blocks if cfg.grad_checkpointing else None)


def _loggers(out: Path) -> list:
    """TensorBoard event files under ``out/tensorboard`` when tensorboard is installed (metrics.csv always)."""
    try:
        from lightning_fabric.loggers import TensorBoardLogger
        return [TensorBoardLogger(root_dir=str(out), name="tensorboard", version="")]
    except ModuleNotFoundError:
        return []


@dataclass
class LoopState:
    """Everything the loop carries from one epoch to the next. It is the ``loop`` entry of every checkpoint:
    Fabric calls ``state_dict`` when saving and ``load_state_dict`` when resuming."""

    epoch: int = 0  # epochs finished
    metrics: list[dict[str, Any]] = field(default_factory=list)  # one row per finished epoch
    best_val: float = -1.0  # protocol "select": the best validation accuracy so far, its epoch and weights
    best_epoch: int = 0
    best_weights: dict[str, torch.Tensor] | None = None
    elapsed_s: float = 0.0  # training time over every process that worked on this run
    clock: float = field(default_factory=time.time, repr=False)

    def tick(self) -> None:
        now = time.time()
        self.elapsed_s, self.clock = self.elapsed_s + now - self.clock, now

    def state_dict(self) -> dict[str, Any]:
        best = {f"best/{n}": t for n, t in (self.best_weights or {}).items()}
        return {"epoch": self.epoch, "metrics": self.metrics, "elapsed_s": self.elapsed_s,
                "best": {"val_top1": self.best_val, "epoch": self.best_epoch},
                "rng/torch": torch.get_rng_state()} | best

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.epoch, self.metrics, self.elapsed_s = int(sd["epoch"]), sd["metrics"], sd["elapsed_s"]
        self.best_val, self.best_epoch = sd["best"]["val_top1"], sd["best"]["epoch"]
        self.best_weights = {k[len("best/"):]: v for k, v in sd.items() if k.startswith("best/")} or None
        torch.set_rng_state(sd["rng/torch"])
        self.clock = time.time()


@dataclass
class _Run:
    """What set-up builds and every later stage uses."""

    cfg: TrainConfig
    out: Path
    fabric: Fabric
    model: nn.Module  # as Fabric wrapped it
    raw: nn.Module  # the model itself
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: DistributedSampler
    loader: DataLoader
    splits: dict[str, Dataset]
    steps: int  # optimizer steps per epoch
    names: set[str]  # the trainable parameters

    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoints"

    def objects(self, state: LoopState) -> dict[str, Any]:
        """What a checkpoint holds, in the form ``fabric.save`` / ``fabric.load`` take."""
        return {MODEL: self.model, OPTIMIZER: self.optimizer, SCHEDULER: self.scheduler, LOOP: state}


def train(backbone: str, data: DataSpec, cfg: TrainConfig, out_dir: str | Path, *,
          checkpoint: str | Path | None = None, pretrained: bool = True, resume: bool = False,
          progress: bool = True, max_steps_per_epoch: int | None = None,
          on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
          evaluate_test: bool = True) -> dict[str, Any]:
    """Train ``cfg.method`` on one task and return the results (also written to ``out_dir``).

    ``on_epoch_end(epoch, row)`` is called on every process once the epoch's metrics row is final and its
    checkpoint saved; what it raises ends training and propagates (a tuner prunes trials this way). With
    ``evaluate_test=False`` the test split is never opened; ``test_top1`` and ``test_images`` are None.
    """
    out = Path(out_dir)
    require_devices(cfg.accelerator, cfg.devices)  # before the run folder, the data or the model
    with run_lock(out):
        finished = refuse_to_overwrite(out, resume)
        cfg = started_settings(out, cfg) if resume else cfg
        model, splits, settings = _load(backbone, data, cfg, checkpoint, pretrained, evaluate_test)
        if resume:
            check_resumable(out, settings)  # a finished run too: its results answer only the same question
        if finished is not None:
            return finished
        run = _set_up(model, splits, cfg, out, max_steps_per_epoch)
        state = _restore(run) if resume else LoopState()
        _write_settings(run, settings)
        bar = EpochProgress(enabled=progress and run.fabric.is_global_zero, total_epochs=cfg.epochs)
        for epoch in range(state.epoch + 1, cfg.epochs + 1):
            row = _train_epoch(run, epoch, bar)
            _end_epoch(run, state, row, bar)
            if on_epoch_end is not None:
                on_epoch_end(epoch, row)
        return _finish(run, state, settings)


def _load(backbone: str, data: DataSpec, cfg: TrainConfig, checkpoint: str | Path | None, pretrained: bool,
          evaluate_test: bool) -> tuple[nn.Module, dict[str, Dataset], dict[str, Any]]:
    """The model with its head and method in place, the splits, and the settings that identify the run."""
    layout = detect_layout(data.root, data.task) if data.layout == "auto" else data.layout
    roles = dict(zip(("train", "val", "test"), PROTOCOL_SPLITS[layout][cfg.protocol]))
    if not evaluate_test:
        roles["test"] = None
    seed_everything(cfg.seed, verbose=False)  # before any weight is initialised: adapters, heads
    model = create_backbone(backbone, num_classes=1, checkpoint=checkpoint, pretrained=pretrained,
                            drop_path_rate=cfg.drop_path)  # head resized below
    splits = {role: load_split(data.root, data.task, split, layout=layout, skip_corrupt=data.skip_corrupt,
                               allow_outside_root=data.allow_outside_root, open_test=evaluate_test,
                               transform=build_transform(model, recipe=cfg.recipe, train=role == "train",
                                                         layout=layout))
              for role, split in roles.items() if split is not None}
    for role in ("val", "test"):
        if role in splits:
            warn_unseen_classes(splits["train"], splits[role])
    model.reset_classifier(splits["train"].num_classes)
    model = prepare_model(model, cfg.method, **method_options(cfg))
    _init_bases_from_data(model, splits["train"])
    if cfg.grad_checkpointing and hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    weights = Path(checkpoint) if checkpoint else None
    settings = {
        "backbone": backbone, "checkpoint": str(checkpoint) if checkpoint else None,
        "checkpoint_sha256": sha256_file(weights) if weights and weights.is_file() else None,
        "pretrained": pretrained,
        "data": asdict(data) | {"layout": layout, "splits": {r: s for r, s in roles.items() if s}},
        "data_fingerprints": {role: ds.fingerprint() for role, ds in splits.items()},
        "data_manifest": data_provenance(data.root, data.task),  # the root's MANIFEST.json digest, or "unverified"
        "train": asdict(cfg), "num_classes": splits["train"].num_classes,
        "versions": {"arcvit": __version__, "torch": torch.__version__, "timm": timm.__version__,
                     "python": platform.python_version()},
        "skipped_images": {role: [str(p) for p, _ in getattr(ds, "skipped", [])] for role, ds in splits.items()},
    }
    return model, splits, settings


def _init_bases_from_data(model: nn.Module, train: Dataset) -> None:
    """ARC's ``basis_init="data"``: each shared D from the first training images' site inputs (no labels; on
    resume the checkpoint's D replaces it)."""
    if is_adapted(model) and arc_config(model).basis_init == "data":
        loader = DataLoader(Subset(train, range(min(DATA_INIT_IMAGES, len(train)))), batch_size=64)
        init_basis_from_data(model, (images for images, _ in loader))


def _parameter_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """The trained parameters, ARC's shared bases in a group of their own where ``shared_lr_scale`` sets their
    learning rate apart (the schedule scales every group's rate alike)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    scale = arc_config(model).shared_lr_scale if is_adapted(model) else 1.0
    if scale == 1.0:
        return [{"params": trained}]
    shared = {id(p) for s in shared_sets(model).values() for p in s.parameters()}
    return [{"params": [p for p in trained if id(p) not in shared]},
            {"params": [p for p in trained if id(p) in shared], "lr": cfg.lr * scale}]


def _make_fabric(cfg: TrainConfig, model: nn.Module, out: Path) -> Fabric:
    plugins = [] if cfg.strategy == "fsdp" else [SafeCheckpointIO()]  # FSDP takes no CheckpointIO plugin
    try:
        return Fabric(accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
                      strategy=_strategy(cfg, model), precision=cfg.precision, plugins=plugins,
                      loggers=_loggers(out))
    except (ValueError, TypeError) as e:  # Fabric validates accelerator, strategy, precision, devices
        raise ConfigError(f"accelerator/strategy/precision/devices: {first_line(e)}") from None


def _compiled(model: nn.Module) -> nn.Module:
    """``torch.compile(model)`` for the training forward; the uncompiled ``model`` stays what is saved, merged and
    evaluated (the compiled module shares its parameters)."""
    return torch.compile(model)


def _set_up(model: nn.Module, splits: dict[str, Dataset], cfg: TrainConfig, out: Path,
            max_steps_per_epoch: int | None) -> _Run:
    """Fabric (launching the other processes), optimizer, training loader and learning-rate schedule."""
    fabric = _make_fabric(cfg, model, out)
    fabric.launch()
    if cfg.batch_size % fabric.world_size:
        raise ConfigError(f"batch_size {cfg.batch_size} must divide evenly over {fabric.world_size} processes")
    if cfg.batch_size > len(splits["train"]):
        raise ConfigError(f"batch_size {cfg.batch_size} is larger than the training split "
                          f"({len(splits['train'])} images)")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(_parameter_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    wrapped, optimizer = fabric.setup(_compiled(model) if cfg.compile else model, optimizer)
    sampler = DistributedSampler(splits["train"], num_replicas=fabric.world_size, rank=fabric.global_rank,
                                 shuffle=True, seed=cfg.seed, drop_last=False)
    loader = DataLoader(splits["train"], batch_size=cfg.batch_size // fabric.world_size, sampler=sampler,
                        num_workers=cfg.num_workers, drop_last=False)
    steps = min(len(loader), max_steps_per_epoch or len(loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, steps))
    return _Run(cfg, out, fabric, wrapped, model, optimizer, scheduler, sampler, loader, splits, steps, names)


def _restore(run: _Run) -> LoopState:
    """The state of the newest checkpoint that verifies (reporting the ones skipped), loaded into the model,
    optimizer and scheduler; a fresh state if there is none."""
    objects = run.objects(LoopState())
    found = load_latest_checkpoint(run.checkpoint_dir)
    for note in (found.skipped if found else []):
        run.fabric.print(f"warning: skipped checkpoint {note}", file=sys.stderr)
    if found is not None and found.path is not None:
        saved = {k.removeprefix("param/") for k in found.tensors if k.startswith("param/")}
        if not run.names <= saved:
            raise ConfigError(f"{found.path}: does not hold the parameters this run trains "
                              f"(missing: {sorted(run.names - saved)[:3]}); it was written for another model")
        fabric_load(run.fabric, found.path, objects)  # Fabric restores a copy of a dataclass, handed back here
        run.fabric.print(f"resumed from {run.checkpoint_dir} at epoch {objects[LOOP].epoch}", file=sys.stderr)
    return objects[LOOP]


def _write_settings(run: _Run, settings: dict[str, Any]) -> None:
    """settings.json, with what Fabric actually runs: the process count and the precision (on CPU, Fabric
    runs ``16-mixed`` as ``bf16-mixed``: the run says so rather than record a precision it did not use)."""
    used = run.fabric.strategy.precision.precision
    if used != run.cfg.precision:
        run.fabric.print(f"warning: precision {run.cfg.precision} is not available on "
                         f"{run.fabric.device.type}; training runs {used} (recorded in settings.json)",
                         file=sys.stderr)
    settings |= {"world_size": run.fabric.world_size, "precision": used}
    if run.fabric.is_global_zero:
        write_json(run.out / "settings.json", settings)


def _train_epoch(run: _Run, epoch: int, bar: EpochProgress) -> dict[str, Any]:
    """One pass over the training split (at most ``run.steps`` batches); returns the epoch's metrics row."""
    fabric = run.fabric
    run.model.train()
    run.sampler.set_epoch(epoch - 1)
    started, seen, loss_sum, correct = time.time(), 0, 0.0, 0
    with bar.epoch(epoch, run.steps) as step_bar:
        for step, (images, labels) in enumerate(run.loader, start=1):
            if step > run.steps:
                break
            loss, hits = _step(run, images.to(fabric.device), labels.to(fabric.device), f"epoch {epoch}, step {step}")
            seen += labels.numel()
            loss_sum += loss * labels.numel()
            correct += hits
            step_bar.update(loss=loss_sum / seen, acc=correct / seen,
                            ips=seen * fabric.world_size / (time.time() - started))
    totals = fabric.all_reduce(torch.tensor([loss_sum, correct, seen], dtype=torch.float64, device=fabric.device),
                               reduce_op="sum")
    return {"epoch": epoch, "lr": run.scheduler.get_last_lr()[0],
            "train_loss": round(totals[0].item() / totals[2].item(), 6),
            "train_top1": round(totals[1].item() / totals[2].item(), 6),
            "images_per_s": round(totals[2].item() / (time.time() - started), 1)}


def _step(run: _Run, images: torch.Tensor, labels: torch.Tensor, where: str) -> tuple[float, int]:
    """One optimizer step; returns the batch's loss and correct count."""
    logits = run.model(images)
    loss = F.cross_entropy(logits, labels, label_smoothing=run.cfg.label_smoothing)
    _stop_unless_finite(run, loss, "the loss", where)
    run.optimizer.zero_grad(set_to_none=True)
    run.fabric.backward(loss)
    if run.cfg.grad_clip > 0:
        norm = run.fabric.clip_gradients(run.model, run.optimizer, max_norm=run.cfg.grad_clip,
                                         error_if_nonfinite=False)
        if getattr(run.fabric.strategy.precision, "scaler", None) is None:  # a scaler skips such steps itself
            _stop_unless_finite(run, norm, "the gradient norm", where)
    run.optimizer.step()
    run.scheduler.step()
    return loss.item(), (logits.argmax(-1) == labels).sum().item()


def _stop_unless_finite(run: _Run, value: torch.Tensor, what: str, where: str) -> None:
    """Raise TrainingDiverged on every process at once (so none waits for another) if ``value`` is not finite
    on any of them: nothing of this epoch is saved, earlier checkpoints stay for inspection."""
    bad = (~torch.isfinite(value.detach())).any().to(run.fabric.device, torch.float32)
    if run.fabric.world_size > 1:
        bad = run.fabric.all_reduce(bad, reduce_op="sum")
    if bad.item():
        raise _diverged(run, where, f"{what} is not a finite number")


def _diverged(run: _Run, where: str, what: str) -> TrainingDiverged:
    hint = "lower --lr" + ("" if run.cfg.grad_clip > 0 else " or set --grad-clip")
    return TrainingDiverged(f"{run.out}: training diverged at {where}: {what}; {hint} "
                            f"(checkpoints of finished epochs are kept in {run.checkpoint_dir})")


def _evaluate(run: _Run, role: str, where: str) -> float:
    """Top-1 on one split; logits that are not finite end the run as a loss that is not finite does (nothing of
    the epoch saved, no results): an argmax over NaN would report a chance-level accuracy as if it were one."""
    try:
        return evaluate(run.fabric, run.model, run.splits[role], run.cfg.eval_batch_size, run.cfg.num_workers)
    except NonFiniteOutput as e:
        raise _diverged(run, where, f"the {role} evaluation failed: {e}") from None


def _end_epoch(run: _Run, state: LoopState, row: dict[str, Any], bar: EpochProgress) -> None:
    """Validation (protocol ``select``) and the best epoch so far, then metrics.csv, loggers and checkpoint."""
    fabric = run.fabric
    if "val" in run.splits:
        row["val_top1"] = round(_evaluate(run, "val", f"epoch {row['epoch']}"), 6)
        if row["val_top1"] > state.best_val:
            state.best_val, state.best_epoch = row["val_top1"], row["epoch"]
            state.best_weights = {n: p.detach().clone() for n, p in run.raw.named_parameters() if n in run.names}
    state.epoch = row["epoch"]
    state.metrics.append(row)
    state.tick()
    bar.log(row)
    fabric.log_dict({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])
    if fabric.is_global_zero:
        write_metrics(run.out / "metrics.csv", state.metrics)
    fabric_save(fabric, run.checkpoint_dir / f"epoch-{state.epoch:04d}.safetensors", run.objects(state),
                keep=lambda name, _: name in run.names)


def _finish(run: _Run, state: LoopState, settings: dict[str, Any]) -> dict[str, Any]:
    """Test accuracy with the selected epoch's weights, then the trained weights and results.json (last)."""
    fabric, cfg, splits = run.fabric, run.cfg, run.splits
    if state.best_weights is not None:
        with torch.no_grad():
            for n, p in run.raw.named_parameters():
                if n in run.names:
                    p.copy_(state.best_weights[n])
    test_top1 = _evaluate(run, "test", f"the end (epoch {state.best_epoch or cfg.epochs}'s weights)") \
        if "test" in splits else None
    counts = parameter_breakdown(run.raw)
    state.tick()
    results = {
        "task": settings["data"]["task"] or Path(settings["data"]["root"]).name, "method": cfg.method,
        "backbone": settings["backbone"], "protocol": cfg.protocol,
        "test_top1": None if test_top1 is None else round(test_top1, 6),
        "selected_epoch": state.best_epoch or cfg.epochs,
        "val_top1": state.best_val if state.best_epoch else None,
        "trainable_params": counts["trainable"], "total_params": counts["total"],
        "mergeable": SPECS[cfg.method].mergeable, "seed": cfg.seed,
        "data_digest": settings["data_manifest"]["digest"], "data_source": settings["data_manifest"]["source"],
        "train_images": len(splits["train"]), "test_images": len(splits["test"]) if "test" in splits else None,
        "wall_time_s": round(state.elapsed_s, 1),
        "images_per_s": round(sum(r["images_per_s"] for r in state.metrics) / max(1, len(state.metrics)), 1),
    }
    if fabric.is_global_zero:
        save_trained(run.raw, cfg.method, run.out, {"task": results["task"], "test_top1": test_top1,
                                                    "class_names": splits["train"].class_names})
        write_json(run.out / "results.json", results)
    fabric.barrier()
    return results
