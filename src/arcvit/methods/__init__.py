"""ARC and the methods it is compared with, selectable by name: ``prepare_model`` and ``merge_for_inference``."""
from arcvit.methods.registry import (METHODS, SPECS, MethodSpec, merge_for_inference, method_spec,  # noqa: F401
                                     prepare_model, trainable_state_dict)
