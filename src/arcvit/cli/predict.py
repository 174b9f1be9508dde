"""``arcvit predict``: label images with an adapter, a merged checkpoint, a run (merged) or an exported ONNX
file."""
from __future__ import annotations

import argparse
import json

from arcvit.cli import _adapted_model, _add_model_source, command_help
from arcvit.cli.hubrefs import pulled


def add_predict_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help=command_help("predict"))
    source = _add_model_source(p)
    p.add_argument("images", nargs="+", help="image files")
    source.add_argument("--onnx", help="ONNX file written by `arcvit export`, run by ONNX Runtime")
    p.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> None:
    if args.onnx:
        from arcvit.cli.export import predict_onnx
        return predict_onnx(args)
    import torch

    import arcvit
    from arcvit.data.images import open_rgb
    from arcvit.data.transforms import build_transform
    from arcvit.training.devices import torch_device
    from arcvit.training.finite import require_finite
    device = torch_device(args.accelerator)
    model, meta = _adapted_model(args)
    if args.merge and not args.merged:
        model = arcvit.merge(model)
    model.eval().to(device)
    transform = build_transform(model, recipe=args.recipe, train=False)
    names = meta.get("class_names") or meta.get("extra", {}).get("class_names")
    for path in args.images:
        x = transform(open_rgb(path)).unsqueeze(0).to(device)
        with torch.no_grad():
            logits = model(x).float()
        require_finite(logits, path)
        probs = logits[0].softmax(-1)
        label = int(probs.argmax())
        print(json.dumps({"image": path, "label": label, "class": names[label] if names else str(label),
                          "prob": round(probs[label].item(), 4), **pulled(args)}))
