"""Data-aware initialisation of ARC's shared bases (``ARCConfig(basis_init="data")``).

The paper draws each shared D at random (xavier). Here each D starts as the top-r principal directions of its
position's inputs instead: the normalised tokens the backbone itself feeds that position (every adapter off),
pooled over the blocks of the stage that share the D, from a few unlabelled training batches. The columns are
scaled to xavier's expected norm, so that only their directions differ from the random start.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from arcvit.core.arc import active_adapter, arc_config, shared_sets
from arcvit.core.layers import ARCSite
from arcvit.errors import ModelError

_Moments = dict[tuple[str, int], list]  # (position, stage) -> [sum of x x^T, sum of x, token count]


def _accumulate(moments: _Moments, name: str):
    """The capture hook: adds each site input's second moments to its (position, stage) sums, in float64."""
    def capture(site: ARCSite, x: torch.Tensor) -> None:
        adapter = site.get(name)
        if adapter is None:
            return
        flat = x.detach().reshape(-1, x.shape[-1]).double()
        entry = moments.setdefault((adapter.position, adapter.stage), [0.0, 0.0, 0])
        entry[0] = entry[0] + flat.t() @ flat
        entry[1] = entry[1] + flat.sum(0)
        entry[2] += flat.shape[0]
    return capture


@torch.no_grad()
def init_basis_from_data(model: nn.Module, batches: Iterable[torch.Tensor], name: str | None = None) -> int:
    """Set adapter ``name``'s shared bases to the principal directions of their inputs over ``batches`` (images,
    no labels); returns the number of images seen. The model's mode and active adapter are restored."""
    name = active_adapter(model) if name is None else name
    rank, moments, seen = arc_config(model, name).rank, {}, 0  # arc_config refuses an unknown name
    shared = shared_sets(model)[name]
    state = shared.state
    was_training, active = model.training, state.active
    state.active, state.capture = None, _accumulate(moments, name)  # every adapter off: the backbone's inputs
    model.eval()
    try:
        for images in batches:
            model(images)
            seen += images.shape[0]
    finally:
        state.active, state.capture = active, None
        model.train(was_training)
    if not moments:
        raise ModelError("init_basis_from_data: no site input was seen (no batch, or no site of this adapter ran)")
    for (position, stage), (second, first, count) in moments.items():
        down = shared.down(position, stage)
        mean = first / count
        covariance = second / count - torch.outer(mean, mean)
        _, vectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
        width = down.shape[0]
        top = vectors[:, -rank:].flip(1) * (2 * width / (width + rank)) ** 0.5
        down.copy_(top.to(down.dtype))
    return seen
