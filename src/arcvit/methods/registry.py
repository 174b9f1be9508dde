"""The fine-tuning methods ARC is benchmarked against, each selectable by name on the same backbone.

A fair comparison changes only what a method trains: every method starts from the same frozen backbone and
the same classifier head, zeroed and trainable (the ARC paper's protocol). Each ``MethodSpec`` carries its
own behaviour: how it prepares a model for training, how a run folder keeps its trained state (save, load:
``methods/runstate.py``) and how the trained model merges into a plain one.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from arcvit.core.arc import apply_arc, classifier, is_adapted
from arcvit.core.arc import merge as merge_arc
from arcvit.core.config import EXTENSION_DEFAULTS, ARCConfig
from arcvit.core.sites import find_blocks
from arcvit.errors import ConfigError, ModelError
from arcvit.methods.adaptformer import add_adaptformer, has_adaptformer
from arcvit.methods.fact import SHARED_ATTR as FACT_ATTR
from arcvit.methods.fact import add_fact
from arcvit.methods.peft import is_peft_model, merge_peft, wrap_peft
from arcvit.methods.repadapter import add_repadapter
from arcvit.methods.reparam import has_reparams, merger, refuse_bypassed_qkv
from arcvit.methods.rlrr import add_rlrr
from arcvit.methods.runstate import ADAPTER_FOLDER, TRAINABLE_TENSORS, RunState
from arcvit.methods.ssf import add_ssf
from arcvit.methods.targets import DEFAULT_TARGETS, parse_targets, resolve_targets

Prepare = Callable[[nn.Module, "Options"], nn.Module]


@dataclass(frozen=True)
class Options:
    """What ``prepare_model`` hands a method: its rank, dropout, PEFT targets (``methods/targets.py``) and the
    head's module name."""

    method: str
    rank: int | None
    dropout: float | None
    targets: tuple[str, ...]
    head: str
    impl: str | None = None  # ARC's impl (None: ARCConfig's default)
    arc_options: dict | None = None  # ARC's extensions (ARCConfig fields beyond the paper's; arc and arc_plus)


@dataclass(frozen=True)
class MethodSpec:
    """One method: how help text and reports show it, how it prepares a model, how a run keeps its trained
    state, how the result merges.

    mergeable: the trained model folds into the plain model, so inference costs nothing extra.
    state: how a run folder keeps what the method trained (None: the ARC family's adapter folder for a method
    prepared as ARC, the trained tensors for any other).
    default_rank / default_dropout: what ``prepare_model`` uses when given None; both None for methods
    that have neither (linear, full, bitfit, ssf, rlrr). "Rank" is ARC's and LoRA's r, VeRA's r, AdaptFormer's
    and RepAdapter's bottleneck, FacT's r.
    """

    name: str
    mergeable: bool
    description: str
    prepare: Prepare
    merge: Callable[[nn.Module], nn.Module] | None = None
    default_rank: int | None = None
    default_dropout: float | None = None
    state: RunState | None = None

    def __post_init__(self) -> None:
        if self.state is None:
            object.__setattr__(self, "state", ADAPTER_FOLDER if self.prepare is _prepare_arc else TRAINABLE_TENSORS)


def _zero_head(model: nn.Module, head: str) -> nn.Module:
    module = model.get_submodule(head)
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


# ARC+ (``arc_plus``): the paper's ARC with the extensions the validation ablations chose (docs/ablations.md).
ARC_PLUS = {"extra_positions": ("proj", "fc2"), "channel_scale": True}


def arc_settings(method: str, arc_options: dict | None = None) -> dict:
    """The ARCConfig fields a method of the ARC family fixes (mode, ARC+'s extensions), with ``arc_options`` over
    them; refuses an option that is no ARC extension."""
    unknown = sorted(set(arc_options or {}) - set(EXTENSION_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown ARC option(s) {', '.join(unknown)}; choose from {', '.join(EXTENSION_DEFAULTS)}")
    fixed = {"mode": "arc", **ARC_PLUS} if method == "arc_plus" else {"mode": method}
    return fixed | dict(arc_options or {})


def _prepare_arc(model: nn.Module, o: Options) -> nn.Module:
    impl = {"impl": o.impl} if o.impl is not None else {}
    return apply_arc(model, ARCConfig(rank=o.rank, dropout=o.dropout, zero_head=True,
                                      **arc_settings(o.method, o.arc_options), **impl))


def is_arc_method(method: str) -> bool:
    """Whether ``method`` trains ARC adapters (saved as an adapter folder, served and exported as ARC)."""
    return method_spec(method).prepare is _prepare_arc


def takes_targets(method: str) -> bool:
    """Whether ``method`` adapts the Linear layers its targets name (LoRA, DoRA, VeRA)."""
    return method_spec(method).prepare is _prepare_peft


def _check_peft_rank(model: nn.Module, o: Options, linears: list[str]) -> None:
    """LoRA's (and DoRA's) r above its target layers' width adds nothing (the update's rank is at most
    min(in, out)) and an absurd one only fails in the allocator; VeRA's r sizes frozen random projections,
    which may exceed the width (its paper uses 1024 on a width of 768) up to the target layers' largest
    dimension."""
    shapes = [(m.in_features, m.out_features) for m in map(model.get_submodule, linears)]
    limit = max(max(s) for s in shapes) if o.method == "vera" else min(min(s) for s in shapes)
    if o.rank > limit:
        what = "the largest dimension of" if o.method == "vera" else "the width of"
        layers = ", ".join(dict.fromkeys(name.rsplit(".", 1)[-1] for name in linears))
        raise ConfigError(f"rank {o.rank} exceeds {what} {o.method}'s target layers ({layers}): "
                          f"{limit}; use --rank {limit} or less")


def _prepare_peft(model: nn.Module, o: Options) -> nn.Module:
    linears = resolve_targets(model, o.method, o.targets)
    _check_peft_rank(model, o, linears)
    if any(name.rsplit(".", 1)[-1] == "qkv" for name in linears):
        refuse_bypassed_qkv(model, o.method)
    _zero_head(model, o.head)
    return wrap_peft(model, o.method, o.rank, o.dropout, tuple(linears), o.head)


def _train_only(select: Callable[[str], bool], add: Callable[[nn.Module, Options], None] | None = None) -> Prepare:
    """A method that trains the parameters whose names ``select`` picks (and the head), after ``add``."""
    def prepare(model: nn.Module, o: Options) -> nn.Module:
        head = _zero_head(model, o.head)
        for name, p in model.named_parameters():
            p.requires_grad_(select(name))
        if add is not None:
            add(model, o)
        for p in head.parameters():
            p.requires_grad_(True)
        return model
    return prepare


def _copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def _reparam(add: Callable[[nn.Module, Options], None]) -> Prepare:
    """A re-parameterisable method (``methods/reparam.py``): its modules added to the frozen backbone, + head.
    A model without transformer blocks arcvit knows is refused in one line naming the method."""
    def add_to_blocks(model: nn.Module, o: Options) -> None:
        try:
            find_blocks(model)
        except ModelError as e:
            raise ModelError(f"{o.method}: {e}") from None
        if o.method != "repadapter":  # RepAdapter acts on the attention's input, not on its Linears
            refuse_bypassed_qkv(model, o.method)
        add(model, o)
    return _train_only(lambda n: False, add_to_blocks)


SPECS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("arc", True, "ARC: shared low-rank adapters on every attention and MLP input, + head",
               _prepare_arc, merge_arc, ARCConfig.rank, ARCConfig.dropout),
    MethodSpec("arc_att", True, "ARC on the attention inputs only, + head", _prepare_arc, merge_arc,
               ARCConfig.rank, ARCConfig.dropout),
    MethodSpec("arc_plus", True, "ARC+: ARC also before the attention's output projection and fc2, with a "
               "per-channel scale at every site; folds like ARC, + head", _prepare_arc, merge_arc,
               ARCConfig.rank, ARCConfig.dropout),
    MethodSpec("linear", True, "linear probing: the head only", _train_only(lambda n: False), _copy),
    MethodSpec("full", True, "full fine-tuning: every parameter", _train_only(lambda n: True), _copy),
    MethodSpec("bitfit", True, "BitFit: every bias term, + head",
               _train_only(lambda n: n.rsplit(".", 1)[-1].endswith("bias")), _copy),
    MethodSpec("lora", True, "LoRA (HF PEFT) on the target Linear layers, alpha = r, + head", _prepare_peft,
               lambda m: merge_peft(m, "lora"), 8, 0.0),
    MethodSpec("vera", True, "VeRA (HF PEFT): frozen shared random projections, trained scaling vectors, + head",
               _prepare_peft, lambda m: merge_peft(m, "vera"), 256, 0.0),
    MethodSpec("adaptformer", False, "AdaptFormer: parallel ReLU bottleneck adapter on every MLP, + head",
               _train_only(lambda n: False, lambda m, o: add_adaptformer(m, o.rank, o.dropout)), None, 8, 0.1),
    MethodSpec("ssf", True, "SSF: per-channel scale and shift after every Linear, norm and patch embedding, + head",
               _reparam(lambda m, o: add_ssf(m, o.head)), merger("ssf", "ssf")),
    MethodSpec("repadapter", True, "RepAdapter: group-wise linear adapter before every attention and MLP, "
               "folded into their Linears, + head",
               _reparam(lambda m, o: add_repadapter(m, o.rank, o.dropout)), merger("repadapter", "repadapter"),
               8, 0.1),
    MethodSpec("fact_tt", True, "FacT-TT: tensor-train factorised weight increments of every block Linear, + head",
               _reparam(lambda m, o: add_fact(m, o.method, o.rank, o.dropout)),
               merger("fact_tt", "fact_tt", (FACT_ATTR,)), 8, 0.1),
    MethodSpec("fact_tk", True, "FacT-TK: Tucker factorised weight increments of every block Linear, + head",
               _reparam(lambda m, o: add_fact(m, o.method, o.rank, o.dropout)),
               merger("fact_tk", "fact_tk", (FACT_ATTR,)), 32, 0.1),
    MethodSpec("rlrr", True, "RLRR: residual rank-one rescaling of every block Linear, SSF on norms, + head",
               _reparam(lambda m, o: add_rlrr(m, o.head)), merger("rlrr", "rlrr")),
    MethodSpec("dora", True, "DoRA (HF PEFT): LoRA with a trained magnitude per output, alpha = r, + head",
               _prepare_peft, lambda m: merge_peft(m, "dora"), 8, 0.0),
)}
METHODS: tuple[str, ...] = tuple(SPECS)


def method_spec(method: str) -> MethodSpec:
    if method not in SPECS:
        raise ConfigError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    return SPECS[method]


def _has_adapters(model: nn.Module) -> bool:
    return is_peft_model(model) or is_adapted(model) or has_adaptformer(model) or has_reparams(model)


def _head_name(model: nn.Module) -> str:
    head = classifier(model)
    if head is None:
        raise ModelError(f"{type(model).__name__} has no classifier head to train; create it with num_classes > 0")
    return next(name for name, module in model.named_modules() if module is head)


def _check_options(spec: MethodSpec, rank: int | None, dropout: float | None) -> None:
    if spec.default_rank is None:
        if rank is not None or dropout is not None:
            raise ConfigError(f"{spec.name} has no rank or dropout to set")
        return
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    if dropout is not None and not 0.0 <= float(dropout) < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout!r}")


def prepare_model(model: nn.Module, method: str, *, rank: int | None = None, dropout: float | None = None,
                  targets: tuple[str, ...] | None = None, impl: str | None = None,
                  arc_options: dict | None = None) -> nn.Module:
    """Set a model up to be fine-tuned with ``method`` and return the module to train.

    ``model`` is changed in place; for LoRA and VeRA the module returned is PEFT's wrapper around it. Every
    method zeroes the classifier head and trains it. ``rank`` and ``dropout`` default to the method's own
    (``SPECS[method]``); ``targets`` names the Linear layers LoRA, DoRA and VeRA adapt (block positions or
    Linear names, ``methods/targets.py``; None: the attention's and the MLP's input Linears);
    ``impl`` is how ARC computes its adapter (``ARCConfig.impl``); ``arc_options`` sets ARC's extensions
    (``ARCConfig`` fields beyond the paper's, over arc_plus's own).
    """
    spec = method_spec(method)
    _check_options(spec, rank, dropout)
    for name, value in (("impl", impl), ("arc_options", arc_options)):
        if value and spec.prepare is not _prepare_arc:
            raise ConfigError(f"{method} has no ARC {name} to set")
    if targets is not None and not takes_targets(method):
        raise ConfigError(f"{method} has no targets to set; only lora, dora and vera adapt chosen Linears")
    if _has_adapters(model):
        raise ModelError(f"{type(model).__name__} already carries adapters; prepare a fresh backbone")
    chosen = DEFAULT_TARGETS if targets is None else parse_targets(targets)
    options = Options(method, spec.default_rank if rank is None else rank,
                      spec.default_dropout if dropout is None else dropout, chosen, _head_name(model), impl,
                      arc_options)
    return spec.prepare(model, options)


def merge_for_inference(model: nn.Module, method: str) -> nn.Module:
    """A plain model, with no extra module or cost, that computes what the trained ``model`` computes.

    ``model`` is what ``prepare_model(..., method)`` returned; it is left untouched and usable. The result has
    the backbone's class and state-dict keys, every parameter trainable, as a freshly created model.
    """
    spec = method_spec(method)
    if not spec.mergeable:
        raise ConfigError(f"{method} is not mergeable: its adapter stays in the model at inference")
    if spec.merge is _copy and _has_adapters(model):
        raise ModelError(f"{type(model).__name__} carries adapters that {method} does not add; "
                         "pass the method the model was prepared with")
    merged = spec.merge(model)
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged


def save_trained(model: nn.Module, method: str, run: str | Path, extra: dict) -> None:
    """Write what ``model`` (``prepare_model(..., method)``, trained) trained into the run folder ``run``, in the
    method's own format; ``extra`` holds ``task``, ``test_top1`` and ``class_names``."""
    method_spec(method).state.save(model, Path(run), extra)


def load_trained(backbone: nn.Module, method: str, run: str | Path, *, rank: int | None = None,
                 dropout: float | None = None, targets: tuple[str, ...] | None = None, impl: str | None = None,
                 arc_options: dict | None = None) -> tuple[nn.Module, list[str] | None]:
    """The model ``save_trained`` saved in ``run``, rebuilt on ``backbone`` (fresh, its head sized to the run's
    classes, the keywords as the run passed them to ``prepare_model``), and the run's class names."""
    def rebuild(model: nn.Module) -> nn.Module:
        return prepare_model(model, method, rank=rank, dropout=dropout, targets=targets, impl=impl,
                             arc_options=arc_options)
    return method_spec(method).state.load(backbone, Path(run), rebuild)


def run_state_files() -> tuple[str, ...]:
    """Every name a method's trained state may take in a run folder."""
    return tuple(dict.fromkeys(name for spec in SPECS.values() for name in spec.state.files))
