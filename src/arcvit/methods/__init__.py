"""ARC and the methods it is compared with, selectable by name: ``prepare_model``, ``merge_for_inference``, and a
run folder's trained state (``save_trained``, ``load_trained``)."""
from arcvit.methods.registry import (  # noqa: F401
                                     METHODS,
                                     SPECS,
                                     MethodSpec,
                                     arc_settings,
                                     is_arc_method,
                                     load_trained,
                                     merge_for_inference,
                                     method_spec,
                                     prepare_model,
                                     run_state_files,
                                     save_trained,
)
from arcvit.methods.runstate import trainable_state_dict  # noqa: F401
