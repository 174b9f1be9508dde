"""arcvit: ARC (Adapter Re-Composing) for timm Vision Transformers.

Train ~0.1% of a pretrained ViT's parameters, then fold the adapters into the backbone and serve the
plain timm model at exactly its original cost.
"""
__version__ = "0.1.0"

from arcvit import zoo as _zoo  # noqa: E402,F401  (registers arcvit's shipped backbone with timm)
from arcvit.adapter_file import load_adapter, save_adapter  # noqa: E402
from arcvit.arc import apply_arc, merge, trainable_parameters  # noqa: E402
from arcvit.config import ARCConfig  # noqa: E402
from arcvit.errors import ArcvitError  # noqa: E402
from arcvit.params import arc_parameter_count  # noqa: E402

__all__ = ["ARCConfig", "ArcvitError", "apply_arc", "merge", "trainable_parameters", "save_adapter",
           "load_adapter", "arc_parameter_count", "__version__"]
