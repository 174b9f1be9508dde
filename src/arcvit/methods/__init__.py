"""ARC and the methods it is compared with, selectable by name: ``prepare_model`` and ``merge_for_inference``."""
from arcvit.methods.registry import (METHODS, SPECS, MethodSpec, arc_settings, is_arc_method,  # noqa: F401
                                     merge_for_inference, method_spec, prepare_model, trainable_state_dict)
