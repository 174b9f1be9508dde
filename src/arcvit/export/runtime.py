"""The export package's edge: onnx, onnxscript and onnxruntime are imported here only, when first needed, so
that every other command (and ``arcvit --help``) runs without the ``export`` extra."""
from __future__ import annotations

from types import ModuleType

from arcvit.extras import require

EXPORT_MODULES = ("onnx", "onnxscript", "onnxruntime")  # torch.onnx's exporter needs onnxscript
# 18: read by most runtimes; 23: ONNX's own Attention op (one node instead of ~8 per block: faster in ONNX
# Runtime, which reads it from 1.22 on; fewer other runtimes do yet)
OPSETS = (18, 23)


def need(*modules: str) -> list[ModuleType]:
    """The named modules, or one line naming the missing one and the extra that installs it."""
    return [require(name, "export", f"ONNX support ({name})") for name in modules]


def onnxruntime() -> ModuleType:
    return need("onnxruntime")[0]


def inference_session(model: bytes | str, threads: int = 0):
    """An ONNX Runtime CPU session on a serialized model or a file; ``threads`` 0: ONNX Runtime's default."""
    ort = onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1 if threads else 0
    options.log_severity_level = 3  # warnings about unused initializers etc. are not the user's concern
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
