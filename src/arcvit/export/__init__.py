"""ONNX export: the merged model and the many-task model as checked ONNX files that serving can run.

Serving's neighbour, not the core's: the graphs are built from the core's merge (``arcvit.merge``) and routing
(``arcvit.core.arc.routed`` with per-item task ids) math, traced by ``torch.onnx``; onnx, onnxscript and
onnxruntime are imported only at the edge (``arcvit.export.runtime``), on first use.

- ``graphs``: the torch modules that are traced (one task; many tasks with a ``task_ids`` input).
- ``metadata``: what a file says about itself (preprocessing, tasks, backbone, fingerprints, its check).
- ``check``: ONNX Runtime against PyTorch before a file is kept.
- ``writer``: export, check, atomic write; ``quantize``: int8 beside the fp32 file, with its top-1 change.
- ``session``: an exported file opened for inference (what ``predict --onnx`` and ``serve --onnx`` run).
"""
