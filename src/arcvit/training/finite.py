"""Logits that are not finite numbers end an evaluation: every path that scores, labels or compares a model's
output (the loop's val/test evaluation, ``eval``, ``predict``, ``merge``, the demo's merge check) asks here."""
from __future__ import annotations

import torch

from arcvit.errors import NonFiniteOutput


def nonfinite_items(logits: torch.Tensor) -> torch.Tensor:
    """How many items of the batch have a NaN or infinite logit (a 0-d tensor on the logits' device: no sync)."""
    return (~torch.isfinite(logits.detach())).reshape(len(logits), -1).any(-1).sum()


def nonfinite_error(what: str, bad: int, total: int) -> NonFiniteOutput:
    return NonFiniteOutput(f"{what}: the model's logits are not finite (NaN/inf) for {bad} of {total} image(s); "
                           "nothing is reported from them: the weights (adapter, head or checkpoint) hold "
                           "non-finite values or overflow")


def require_finite(logits: torch.Tensor, what: str) -> None:
    """Raise :class:`NonFiniteOutput` naming ``what`` (the image, split or file) if any logit is NaN or inf."""
    bad = int(nonfinite_items(logits))
    if bad:
        raise nonfinite_error(what, bad, len(logits))
