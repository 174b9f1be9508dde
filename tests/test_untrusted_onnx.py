"""ONNX files are untrusted when they come back (issue 28): `predict --onnx` refuses, in one line naming the file,
edited metadata (checksum), metadata copied onto another graph, a graph that does not match its metadata and
every out-of-bounds preprocessing field; `export` refuses non-finite weights; a many-task file refuses task
indices outside its tasks. ``ARCVIT_BAD_INPUTS_LOG=log.jsonl`` appends what each case printed."""
from __future__ import annotations

import json

import pytest
import torch
from serving_support import png_bytes
from test_export import BACKBONE, adapters, exported  # noqa: F401  (fixtures)
from test_untrusted_files import call, one_line

from arcvit.errors import ConfigError

onnx = pytest.importorskip("onnx")


def _rewrite(source, target, edit, restamp: bool = False, graph_from=None) -> None:
    """``source``'s ONNX file with its metadata document edited by ``edit``; ``restamp``: its checksum recomputed
    (a forger's file), ``graph_from``: the document put on that file's graph instead."""
    from arcvit.export import metadata
    proto = onnx.load(str(source))
    props = {p.key: p.value for p in proto.metadata_props}
    document = json.loads(props[metadata.KEY])
    edit(document)
    if graph_from is not None:
        proto = onnx.load(str(graph_from))
    if restamp:
        metadata.stamp(proto, document)
    else:
        for p in proto.metadata_props:
            if p.key == metadata.KEY:
                p.value = json.dumps(document)
            if p.key == metadata.CHECKSUM_KEY and graph_from is not None:
                p.value = props[metadata.CHECKSUM_KEY]
    onnx.save(proto, str(target))


def _prep(**fields):
    return lambda d: d["preprocessing"].update(fields)


def _drop_checksum(source, target) -> None:
    from arcvit.export import metadata
    proto = onnx.load(str(source))
    keep = [(p.key, p.value) for p in proto.metadata_props if p.key != metadata.CHECKSUM_KEY]
    del proto.metadata_props[:]
    for key, value in keep:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(target))


CASES = {  # id: (write the bad file from the exported ones, words of the one line)
    "class_names_permuted": (lambda f, t: _rewrite(f["merged"], t, lambda d: d["tasks"][0]["class_names"].reverse()),
                             "checksum mismatch"),
    "num_classes_edited": (lambda f, t: _rewrite(f["merged"], t, lambda d: d["tasks"][0].update(
        num_classes=3, class_names=d["tasks"][0]["class_names"][:3])), "checksum mismatch"),
    "metadata_on_a_foreign_graph": (lambda f, t: _rewrite(f["merged"], t, lambda d: None, graph_from=f["many"]),
                                    "checksum mismatch"),
    "checksum_removed": (lambda f, t: _drop_checksum(f["merged"], t), "carries no checksum"),
    "restamped_fewer_logits": (lambda f, t: _rewrite(f["merged"], t, lambda d: d["tasks"][0].update(
        num_classes=3, class_names=d["tasks"][0]["class_names"][:3]), restamp=True),
                               "its graph does not match its metadata"),
    "restamped_input_size_huge": (lambda f, t: _rewrite(f["merged"], t, _prep(input_size=[3, 100000, 100000]),
                                                        restamp=True),
                                  "field preprocessing.input_size[1]: 100000 is outside 1..4096"),
    "restamped_input_size_other": (lambda f, t: _rewrite(f["merged"], t, _prep(input_size=[3, 56, 56]), restamp=True),
                                   "its graph does not match its metadata"),
    "restamped_std_zero": (lambda f, t: _rewrite(f["merged"], t, _prep(std=[0.5, 0, 0.5]), restamp=True),
                           "field preprocessing.std: every value must be above 0"),
    "restamped_interpolation": (lambda f, t: _rewrite(f["merged"], t, _prep(interpolation="magic"), restamp=True),
                                "field preprocessing.interpolation: 'magic' is not one of"),
    "restamped_crop_mode": (lambda f, t: _rewrite(f["merged"], t, _prep(crop_mode="diagonal"), restamp=True),
                            "field preprocessing.crop_mode: 'diagonal' is not one of"),
    "restamped_crop_pct": (lambda f, t: _rewrite(f["merged"], t, _prep(crop_pct=1.5), restamp=True),
                           "field preprocessing.crop_pct: 1.5 is outside (0, 1]"),
    "restamped_mean_text": (lambda f, t: _rewrite(f["merged"], t, _prep(mean="grey"), restamp=True),
                            "field preprocessing.mean: expected 3 finite numbers"),
}


@pytest.mark.parametrize("case", CASES)
def test_predict_onnx_refuses_a_tampered_file_in_one_line(case, exported, tmp_path, capsys):  # noqa: F811
    image = tmp_path / "a.png"
    image.write_bytes(png_bytes(0))
    path = tmp_path / "model.onnx"
    make, words = CASES[case]
    make(exported, path)
    code, out, err = call(["predict", "--onnx", path, image], capsys)
    one_line(code, err, "predict", str(path), words)
    assert out == ""


def test_many_task_file_refuses_task_indices_outside_its_tasks(exported):  # noqa: F811
    from arcvit.export.session import OnnxModel
    model = OnnxModel(exported["many"], threads=1)
    images = torch.zeros(1, 3, 28, 28)
    assert model.logits(images, [len(model.tasks) - 1]).shape[0] == 1
    for index in (-1, len(model.tasks)):
        with pytest.raises(ConfigError, match=f"task index {index} is outside 0..{len(model.tasks) - 1}"):
            model.logits(images, [index])


def test_export_refuses_an_adapter_with_non_finite_weights(adapters, tmp_path, capsys):  # noqa: F811
    from test_runs_reports import poisoned_adapter
    adapter = poisoned_adapter(tmp_path / "nan", float("nan"))
    out = tmp_path / "x.onnx"
    code, _, err = call(["export", "--adapter", adapter, "--out", out], capsys)
    one_line(code, err, "export", "holds non-finite values")
    assert not out.exists()
