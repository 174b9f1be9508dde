"""arcvit: ARC (Adapter Re-Composing) for Vision Transformers.

Train ~0.1% of a pretrained ViT's parameters, then fold the adapters into the backbone and serve the
plain model at exactly its original cost.
"""
from arcvit.backends.on_import import register_backends
from arcvit.version import __version__

register_backends()

_API = {  # public name -> module it comes from, imported on first use: `arcvit --help` loads no torch
    "ARCConfig": "arcvit.core.config", "ArcvitError": "arcvit.errors", "MultiTask": "arcvit.serving.multitask",
    "apply_arc": "arcvit.core.arc", "merge": "arcvit.core.arc", "trainable_parameters": "arcvit.core.arc",
    "save_adapter": "arcvit.core.adapter_file", "load_adapter": "arcvit.core.adapter_file",
    "arc_parameter_count": "arcvit.core.params",
}
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'arcvit' has no attribute {name!r}")
    from importlib import import_module
    value = getattr(import_module(_API[name]), name)
    globals()[name] = value  # found directly from now on
    return value
