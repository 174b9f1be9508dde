"""A merged checkpoint as a ready model: its checked header names the backbone and class count, its tensors
fill it (head included), whichever library the backbone comes from."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from arcvit.backends import create_backbone
from arcvit.core.merged_file import check_head_loaded, read_merged_info
from arcvit.errors import ModelError


def load_merged(path: str | Path, allow_unverified: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """(model, info) from a file written by ``arcvit merge``; every check of ``read_merged_info`` applies, and
    the head must come from the file (never a fresh one)."""
    info = read_merged_info(path, allow_unverified=allow_unverified)
    try:
        model = create_backbone(info["backbone"], info["num_classes"], checkpoint=path)
    except ModelError as e:  # say which file named that backbone
        raise ModelError(f"{path}: field backbone {info['backbone']!r}: {e}") from None
    check_head_loaded(model, path)
    return model, info
