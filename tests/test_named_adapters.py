"""Named adapters in the core: several ARC adapters on one model, switching, per-item routing of a mixed batch,
merging the active one, and adapter files that load under any name (arcvit 0.1's files included)."""
from __future__ import annotations

import json

import pytest
import timm
import torch

import arcvit
from arcvit.core.adapter_file import CONFIG_NAME, WEIGHTS_NAME, read_adapter
from arcvit.core.arc import active_adapter, adapter_names, delete_adapter, routed, set_active_adapter, shared_sets
from arcvit.errors import AdapterFileError, ModelError
from arcvit.fileio import sha256_file, write_json, write_safetensors


def _model(name: str = "vit_pico_patch7_28", classes: int = 5) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=classes).eval()


def _perturb(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _two_adapters(family: str = "vit_pico_patch7_28") -> torch.nn.Module:
    model = _model(family)
    arcvit.apply_arc(model, arcvit.ARCConfig(rank=4, dropout=0.0, zero_head=False), name="a")
    _perturb(model, 1)
    arcvit.apply_arc(model, arcvit.ARCConfig(rank=6, mode="arc_att", dropout=0.0, zero_head=False), name="b")
    _perturb(model, 2)
    return model.eval()


def test_default_name_keeps_the_01_parameter_names():
    """0.1's impls keep 0.1's names; impl "fused" (the default since) puts the site parameters on the norm."""
    model = arcvit.apply_arc(_model(), arcvit.ARCConfig(rank=4, impl="sequential"))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "arc.att.0" in names and "blocks.0.attn.qkv.adapter.scale" in names and "head.weight" in names
    names = {n for n, p in arcvit.apply_arc(_model(), arcvit.ARCConfig(rank=4)).named_parameters() if p.requires_grad}
    assert "arc.att.0" in names and "blocks.0.norm1.adapter.scale" in names and "head.weight" in names


def test_each_name_is_its_own_adapter_and_only_the_new_one_trains():
    model = _two_adapters()
    assert adapter_names(model) == ["a", "b"] and active_adapter(model) == "b"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")}
    assert trainable and all(n.startswith("arc_b.") or ".adapter_b." in n for n in trainable)
    x = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        out_b = model(x)
        set_active_adapter(model, "a")
        out_a = model(x)
    assert not torch.allclose(out_a, out_b)
    with pytest.raises(ModelError, match="no ARC adapter named 'c'"):
        set_active_adapter(model, "c")


@pytest.mark.parametrize("family", ["vit_pico_patch7_28", "swin_tiny_patch4_window7_224"])
def test_routed_mixed_batch_equals_each_adapter_alone(family):
    if family.startswith("swin"):
        model = timm.create_model(family, num_classes=4, img_size=56, embed_dim=32, depths=(1, 1), num_heads=(2, 2),
                                  window_size=7).eval()
        arcvit.apply_arc(model, arcvit.ARCConfig(rank=4, dropout=0.0, zero_head=False), name="a")
        _perturb(model, 1)
        arcvit.apply_arc(model, arcvit.ARCConfig(rank=3, dropout=0.0, zero_head=False), name="b")
        _perturb(model, 2)
        x = torch.randn(5, 3, 56, 56)
    else:
        model = _two_adapters()
        x = torch.randn(5, 3, 28, 28)
    names = ["a", "b", "b", "a", "b"]
    with torch.no_grad():
        with routed(model, names):
            mixed = model(x)
        alone = {}
        for name in ("a", "b"):
            set_active_adapter(model, name)
            alone[name] = model(x)
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], alone[name][i], rtol=1e-5, atol=1e-5)


def _three_adapters() -> torch.nn.Module:
    """a: arc rank 4; b: arc_att rank 6 (no MLP sites); c: arc rank 5 on blocks 0 and 2 only."""
    model = _two_adapters()
    arcvit.apply_arc(model, arcvit.ARCConfig(rank=5, blocks=(0, 2), dropout=0.0, zero_head=False), name="c")
    _perturb(model, 3)
    return model.eval()


def _alone(model: torch.nn.Module, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    """Each item through its own adapter, one adapter at a time (the reference for routing)."""
    rows = []
    for i, name in enumerate(names):
        set_active_adapter(model, name)
        rows.append(model(x[i:i + 1]))
    return torch.cat(rows)


def test_routing_mixes_adapters_of_different_ranks_positions_and_blocks():
    model, x = _three_adapters(), torch.randn(7, 3, 28, 28)
    names = ["c", "a", "b", "c", "a", "b", "b"]
    with torch.no_grad():
        expected = _alone(model, x, names)
        with routed(model, names):
            mixed = model(x)
        with routed(model, ["c"] * 7):  # one task: the plain active-adapter path
            single = model(x)
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(single, _alone(model, x, ["c"] * 7), rtol=1e-5, atol=1e-5)


def test_a_routed_batch_trains_each_adapter_on_its_own_items():
    model, x = _three_adapters(), torch.randn(6, 3, 28, 28)
    names = ["a", "b", "c", "c", "b", "a"]
    params = [p for n, p in model.named_parameters() if n.startswith("arc_") or ".adapter_" in n]
    for p in params:
        p.requires_grad_(True)
    with routed(model, names):
        routed_grads = torch.autograd.grad(model(x).square().sum(), params, allow_unused=True)
    reference = torch.autograd.grad(_alone(model, x, names).square().sum(), params, allow_unused=True)
    assert sum(g is not None for g in routed_grads) == len(params)
    for got, want in zip(routed_grads, reference):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_a_mixed_batch_in_training_mode_with_adapter_dropout_is_refused():
    model = _model()
    arcvit.apply_arc(model, arcvit.ARCConfig(rank=4), name="a")
    arcvit.apply_arc(model, arcvit.ARCConfig(rank=4), name="b")
    model.train()
    with pytest.raises(ModelError, match="call model.eval"):
        with routed(model, ["a", "b"]):
            pass


def test_a_route_naming_an_unknown_adapter_is_refused_and_leaves_no_route():
    model, x = _two_adapters(), torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        before = model(x)
        with pytest.raises(ModelError, match="no ARC adapter named 'nope'"):
            with routed(model, ["a", "nope", "b"]):
                pass
        torch.testing.assert_close(model(x), before)  # the active adapter's forward, no leftover route


def test_merge_folds_the_active_adapter_and_delete_leaves_the_plain_model():
    model = _two_adapters()
    x = torch.randn(2, 3, 28, 28)
    set_active_adapter(model, "a")
    with torch.no_grad():
        expected = model(x)
        merged = arcvit.merge(model)
        torch.testing.assert_close(merged(x), expected, rtol=1e-4, atol=1e-5)
    assert set(merged.state_dict()) == set(_model().state_dict())
    delete_adapter(model, "a")
    assert adapter_names(model) == ["b"] and active_adapter(model) == "b"
    delete_adapter(model, "b")
    assert set(model.state_dict()) == set(_model().state_dict())


def test_a_file_saved_under_one_name_loads_under_another(tmp_path):
    model = _two_adapters()
    arcvit.save_adapter(model, tmp_path / "a", name="a")
    contents = read_adapter(tmp_path / "a")
    assert all(k.startswith(("shared.", "site.")) for k in contents.tensors) and set(contents.head) == {
        "head.weight", "head.bias"}
    fresh = _model()
    arcvit.load_adapter(fresh, tmp_path / "a", name="task_x")
    set_active_adapter(model, "a")
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))
    delete_adapter(fresh, "task_x")
    arcvit.apply_arc(fresh, arcvit.ARCConfig(rank=2), name="task_x")  # same name, another rank: a reload refuses
    with pytest.raises(AdapterFileError, match="already has ARC"):
        arcvit.load_adapter(fresh, tmp_path / "a", name="task_x")


def test_version_1_adapter_files_still_load(tmp_path):
    """A file as arcvit 0.1 wrote it: tensors under the model's own module names, format_version 1."""
    model = arcvit.apply_arc(_model(), arcvit.ARCConfig(rank=4, dropout=0.0, impl="sequential"))
    _perturb(model, 3)
    arcvit.save_adapter(model, tmp_path / "v2")
    meta = json.loads((tmp_path / "v2" / CONFIG_NAME).read_text())
    v1 = {n: p for n, p in model.named_parameters() if p.requires_grad}
    folder = tmp_path / "v1"
    write_safetensors(folder / WEIGHTS_NAME, v1, metadata={"format": "arcvit-adapter"})
    meta.update(format_version=1, tensors={k: list(v.shape) for k, v in v1.items()},
                weights_sha256=sha256_file(folder / WEIGHTS_NAME))
    del meta["backbone"]["library"]
    write_json(folder / CONFIG_NAME, meta)
    fresh = arcvit.load_adapter(_model(), folder)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model.eval()(x))
    assert set(shared_sets(fresh)) == {"default"}
