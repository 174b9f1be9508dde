"""ARC for Hugging Face transformers vision models: block specs and a model backend, registered with the core.

Importing this package needs transformers (``pip install 'arcvit[transformers]'``); the core imports it
lazily, the first time it meets a model whose class lives in ``transformers``.
"""
from __future__ import annotations

from arcvit.extras import require

require("transformers", "transformers", "a transformers backbone")

from arcvit.backends.transformers import specs as _specs
from arcvit.backends.transformers.backend import TransformersBackend
from arcvit.backends.transformers.create import PREFIX, create_backbone
from arcvit.backends.transformers.heads import TransformersClassifier
from arcvit.core.specs import register_backend

_specs.register()
register_backend(TransformersBackend())

__all__ = ["PREFIX", "TransformersClassifier", "create_backbone"]
