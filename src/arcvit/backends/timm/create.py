"""Create a timm backbone by name, with hub weights or a local checkpoint, loading only safe formats.

Local checkpoints: Google's ``.npz`` ViT releases (what the ARC paper used; timm converts them),
``.safetensors``, and ``.pth``/``.pt``/``.bin`` through ``torch.load(weights_only=True)``: a file that needs
anything beyond tensors and plain containers is refused, never unpickled.
"""
from __future__ import annotations

import contextlib
import difflib
import pickle
import re
import warnings
from pathlib import Path

import timm
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from arcvit.backends.timm.hub import hub_mode
from arcvit.errors import ModelError, first_line

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def _unknown_model(name: str) -> ModelError:
    close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else " (see timm.list_models())"
    return ModelError(f"unknown timm model {name!r}{hint}")


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors or a weights-only torch file; refuses pickled code."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise ModelError(f"{path}: not a readable safetensors file ({e})") from None
    if path.suffix not in TORCH_SUFFIXES:
        raise ModelError(f"{path}: unsupported checkpoint type {path.suffix!r} "
                         f"(use .npz, .safetensors or one of {', '.join(TORCH_SUFFIXES)})")
    try:
        with warnings.catch_warnings():  # e.g. torch's note on a plain pickle's protocol: the error says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message wraps the reason in advice on loading the file unsafely: keep only the reason
        found = re.search(r"WeightsUnpickler error: (.*?)(?: Please use| Check the documentation|$)",
                          " ".join(str(e).split()))
        reason = found.group(1).strip() if found and found.group(1).strip() else "not a plain tensor file"
        raise ModelError(f"{path}: refused: the file holds pickled objects other than tensors, and arcvit only "
                         f"loads weights safely ({reason})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ModelError(f"{path}: not a readable torch checkpoint ({e})") from None
    for key in ("state_dict", "model", "module"):  # common trainer wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: does not hold a state dict of tensors")
    return state


def _load_local(model: nn.Module, path: Path) -> None:
    if path.suffix == ".npz":
        if not hasattr(model, "load_pretrained"):
            raise ModelError(f"{path}: .npz checkpoints load into timm VisionTransformer models only, "
                             f"not {type(model).__name__}")
        try:
            model.load_pretrained(str(path))
        except (KeyError, ValueError, RuntimeError, OSError) as e:
            raise ModelError(f"{path}: cannot load this .npz into {type(model).__name__} ({e})") from None
        return
    state = read_checkpoint(path)
    own = model.state_dict()
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    head_ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    head_keys = {k for k, p in model.named_parameters() if id(p) in head_ids}
    # The task's head is new: drop a checkpoint head whose shape differs (a different number of classes).
    state = {k: v for k, v in state.items() if not (k in head_keys and k in own and v.shape != own[k].shape)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in head_keys]
    if missing or unexpected:
        raise ModelError(f"{path}: does not fit {type(model).__name__} (missing: {missing[:5]}, "
                         f"unexpected: {unexpected[:5]})")


def create_backbone(name: str, num_classes: int, checkpoint: str | Path | None = None,
                    pretrained: bool = True, **kwargs) -> nn.Module:
    """A timm model with a fresh ``num_classes`` head: hub weights by name, or weights from ``checkpoint``."""
    if not timm.is_model(name.split(".")[0]):
        raise _unknown_model(name)
    use_hub = pretrained and checkpoint is None
    offline = False
    try:
        with hub_mode(name) if use_hub else contextlib.nullcontext(False) as offline:
            model = timm.create_model(name, pretrained=use_hub, num_classes=num_classes, **kwargs)
    except (OSError, ConnectionError, ValueError) as e:
        if not use_hub:
            raise ModelError(f"cannot create {name!r}: {e}") from None
        if offline:
            raise ModelError(f"cannot fetch pretrained weights for {name!r}: the Hugging Face Hub is unreachable "
                             "(or HF_HUB_OFFLINE is set) and they are not in the local cache. Pass a local file "
                             "with --checkpoint (.npz/.safetensors/.pth), or use the shipped "
                             "vit_pico_patch7_28.fmnist_arcvit") from None
        detail = first_line(e, 200)
        raise ModelError(f"cannot fetch pretrained weights for {name!r} ({type(e).__name__}: "
                         f"{detail}). Offline? Pass a local file with --checkpoint "
                         "(.npz/.safetensors/.pth), or use the shipped vit_pico_patch7_28.fmnist_arcvit") from None
    except RuntimeError as e:
        if "Unknown" in str(e) or "pretrained" in str(e).lower():
            raise ModelError(f"cannot create {name!r}: {e}") from None
        raise
    if checkpoint is not None:
        _load_local(model, Path(checkpoint))
    return model
