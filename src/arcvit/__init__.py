"""arcvit: ARC (Adapter Re-Composing) for Vision Transformers.

Train ~0.1% of a pretrained ViT's parameters, then fold the adapters into the backbone and serve the
plain model at exactly its original cost.
"""
# first: core/adapter_file.py reads it from here while this package loads
from arcvit.version import __version__

# isort: split
from arcvit.backends import timm as _timm  # noqa: E402,F401  (registers timm's block specs and the shipped ViT)
from arcvit.core.adapter_file import load_adapter, save_adapter  # noqa: E402
from arcvit.core.arc import apply_arc, merge, trainable_parameters  # noqa: E402
from arcvit.core.config import ARCConfig  # noqa: E402
from arcvit.core.params import arc_parameter_count  # noqa: E402
from arcvit.core.specs import register_lazy_backend as _register_lazy_backend  # noqa: E402
from arcvit.errors import ArcvitError  # noqa: E402

_register_lazy_backend("transformers.", "arcvit.backends.transformers")

__all__ = ["ARCConfig", "ArcvitError", "MultiTask", "apply_arc", "merge", "trainable_parameters", "save_adapter",
           "load_adapter", "arc_parameter_count", "__version__"]


def __getattr__(name: str):
    if name == "MultiTask":  # imported on first use: `arcvit --help` does not load the serving package
        from arcvit.serving.multitask import MultiTask
        return MultiTask
    raise AttributeError(f"module 'arcvit' has no attribute {name!r}")
