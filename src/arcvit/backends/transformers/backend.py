"""The transformers ModelBackend: which models it owns, their classifier head, and their identity in adapter files."""
from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

from arcvit.backends.transformers.heads import TransformersClassifier, has_own_head


class TransformersBackend:
    name = "transformers"

    def owns(self, model: nn.Module) -> bool:
        return isinstance(model, (PreTrainedModel, TransformersClassifier))

    def classifier(self, model: nn.Module) -> nn.Module | None:
        if isinstance(model, TransformersClassifier):
            return model.get_classifier()
        return model.classifier if has_own_head(model) else None

    def identity(self, model: nn.Module) -> dict:
        """Library, model id and class; for a wrapped model also the head's pooling (arcvit's own head or not)."""
        inner = model.model if isinstance(model, TransformersClassifier) else model
        name = model.source if isinstance(model, TransformersClassifier) else inner.config.name_or_path
        identity = {"library": "transformers", "name": name or type(inner).__name__, "class": type(inner).__name__}
        if isinstance(model, TransformersClassifier):
            identity["head"] = model.pool
        return identity
