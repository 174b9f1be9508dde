"""ARC+ (``arc_plus`` and ARCConfig's extensions): each extension folds exactly into the plain model, routes in a
mixed-task batch, round-trips through an adapter file of its own format version, and is refused in one line where
it is wrong; the paper's ARC is unchanged by them (its files, its parameters, its outputs)."""
from __future__ import annotations

import json

import pytest
import timm
import torch

import arcvit
from arcvit.core.adapter_file import CONFIG_NAME, load_adapter, read_adapter_config
from arcvit.core.arc import arc_config, routed, set_active_adapter, shared_sets
from arcvit.core.basis import init_basis_from_data
from arcvit.core.config import EXTENSION_DEFAULTS, ARCConfig
from arcvit.errors import AdapterFileError, ConfigError, ModelError
from arcvit.methods import merge_for_inference, prepare_model
from arcvit.methods.registry import ARC_PLUS
from arcvit.training.config import TrainConfig
from arcvit.training.loop import _parameter_groups

EXTENSIONS = {
    "proj": {"extra_positions": ("proj",)},
    "fc2": {"extra_positions": ("fc2",)},
    "channel_scale": {"channel_scale": True},
    "private_rank": {"private_rank": 2},
    "att_scale_init": {"att_scale_init": "random"},
    "all": {"extra_positions": ("proj", "fc2"), "channel_scale": True, "private_rank": 1},
}


def _model(classes: int = 5) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_pico_patch7_28", num_classes=classes).eval()


def _perturb(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _adapted(impl: str = "fused", **options) -> torch.nn.Module:
    model = arcvit.apply_arc(_model(), ARCConfig(rank=6, dropout=0.0, zero_head=False, impl=impl, **options))
    _perturb(model, 1)
    return model.eval()


@pytest.mark.parametrize("impl", ["fused", "sequential", "lowrank"])
@pytest.mark.parametrize("extension", list(EXTENSIONS))
def test_each_extension_merges_into_the_plain_model(extension, impl):
    model, x = _adapted(impl, **EXTENSIONS[extension]), torch.randn(4, 3, 28, 28)
    with torch.no_grad():
        adapted = model(x)
    trained = model(x)  # the training path (autograd on) computes the same outputs
    merged = arcvit.merge(model)
    plain = _model()
    assert type(merged) is type(plain) and merged.state_dict().keys() == plain.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), adapted, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trained, adapted, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain(x), adapted, atol=1e-3)  # the extension changed something


def test_extensions_add_exactly_their_parameters():
    base = arcvit.trainable_parameters(_adapted())
    width, hidden, depth, rank = 128, 512, 6, 6
    assert arcvit.trainable_parameters(_adapted(extra_positions=("proj",))) - base == width * rank + depth * (
        rank + width)
    assert arcvit.trainable_parameters(_adapted(extra_positions=("fc2",))) - base == hidden * rank + depth * (
        rank + hidden)
    assert arcvit.trainable_parameters(_adapted(channel_scale=True)) - base == 2 * depth * width
    assert arcvit.trainable_parameters(_adapted(private_rank=2)) - base == 2 * depth * 2 * width * 2


def test_a_mixed_batch_routes_arc_plus_beside_plain_arc():
    model = _model()
    arcvit.apply_arc(model, ARCConfig(rank=4, dropout=0.0, zero_head=False), name="plain")
    _perturb(model, 1)
    arcvit.apply_arc(model, ARCConfig(rank=6, dropout=0.0, zero_head=False, **EXTENSIONS["all"]), name="plus")
    _perturb(model, 2)
    model.eval()
    x, names = torch.randn(6, 3, 28, 28), ["plus", "plain", "plus", "plus", "plain", "plain"]
    with torch.no_grad():
        with routed(model, names):
            mixed = model(x)
        alone = {}
        for name in ("plain", "plus"):
            set_active_adapter(model, name)
            alone[name] = model(x)
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], alone[name][i], rtol=1e-5, atol=1e-5)


def test_an_arc_plus_file_has_its_own_version_and_loads_back(tmp_path):
    model, x = _adapted(**EXTENSIONS["all"]), torch.randn(3, 3, 28, 28)
    arcvit.save_adapter(model, tmp_path / "plus")
    meta = read_adapter_config(tmp_path / "plus")
    assert meta["format_version"] == 3 and meta["arc_config"]["extra_positions"] == ["proj", "fc2"]
    loaded = load_adapter(_model(), tmp_path / "plus").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_paper_arc_files_keep_version_2_without_extension_fields(tmp_path):
    arcvit.save_adapter(_adapted(), tmp_path / "arc")
    meta = json.loads((tmp_path / "arc" / CONFIG_NAME).read_text())
    assert meta["format_version"] == 2
    assert not set(EXTENSION_DEFAULTS) & set(meta["arc_config"])
    assert ARCConfig.from_dict(meta["arc_config"]) == ARCConfig(rank=6, dropout=0.0, zero_head=False)


def test_a_newer_format_version_is_refused_in_one_line(tmp_path):
    arcvit.save_adapter(_adapted(channel_scale=True), tmp_path / "a")
    meta = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    meta["format_version"] = 4
    (tmp_path / "a" / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(AdapterFileError, match="format_version 4 is not supported"):
        read_adapter_config(tmp_path / "a")


@pytest.mark.parametrize("field, value, message", [
    ("extra_positions", ("proj", "proj"), "extra_positions must be distinct names among proj, fc2"),
    ("extra_positions", ("fc3",), "extra_positions must be distinct names"),
    ("channel_scale", 1, "channel_scale must be true or false"),
    ("private_rank", -1, "private_rank must be a whole number >= 0"),
    ("private_rank", 1.5, "private_rank must be a whole number >= 0"),
    ("basis_init", "pca", "basis_init must be one of xavier, orthogonal, data"),
    ("att_scale_init", "ones", "att_scale_init must be one of zero, random"),
    ("shared_lr_scale", 0.0, r"shared_lr_scale must be a number in \[0.001, 1000\]"),
    ("shared_lr_scale", float("nan"), r"shared_lr_scale must be a number in \[0.001, 1000\]"),
])
def test_bad_extension_settings_are_refused(field, value, message):
    with pytest.raises(ConfigError, match=message):
        ARCConfig(**{field: value})


def test_a_private_rank_above_the_width_is_refused():
    with pytest.raises(ModelError, match="private_rank 200 exceeds the model's width 128"):
        arcvit.apply_arc(_model(), ARCConfig(rank=4, private_rank=200))


def test_added_positions_on_a_family_without_them_are_refused():
    swin = timm.create_model("swin_tiny_patch4_window7_224", num_classes=4, img_size=56, embed_dim=32,
                             depths=(1, 1), num_heads=(2, 2), window_size=7)
    arcvit.apply_arc(swin, ARCConfig(rank=4, extra_positions=("proj", "fc2")))  # timm's Swin has both
    transformers = pytest.importorskip("transformers")
    vit = transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=28, patch_size=7, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=3))
    with pytest.raises(ModelError, match="ARC\\+ position 'proj' is not defined for this block family"):
        arcvit.apply_arc(vit, ARCConfig(rank=4, extra_positions=("proj",)))


@pytest.mark.parametrize("how", ["orthogonal", "data"])
def test_orthogonal_and_data_bases_have_orthogonal_columns_at_xavier_scale(how):
    model = arcvit.apply_arc(_model(), ARCConfig(rank=6, basis_init=how)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if how == "data":
        init_basis_from_data(model, [torch.randn(16, 3, 28, 28)])
    scale = 2 * 128 / (128 + 6)
    for down in shared_sets(model)["default"].parameters():
        torch.testing.assert_close(down.t() @ down, scale * torch.eye(6), rtol=1e-4, atol=1e-4)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == ({"arc.att.0", "arc.mlp.0"} if how == "data" else set())
    assert model.training  # the mode the model came in


def test_data_bases_are_the_principal_directions_of_the_backbones_site_inputs():
    model = arcvit.apply_arc(_model(), ARCConfig(rank=3, basis_init="data"))
    images = torch.randn(8, 3, 28, 28)
    inputs = []
    plain = _model()
    hook = plain.blocks[0].norm1.register_forward_hook(lambda m, a, out: inputs.append(out))
    with torch.no_grad():
        plain(images)
    hook.remove()
    init_basis_from_data(model, [images])
    block0 = inputs[0].reshape(-1, 128).double()
    # D shares one basis over the 6 blocks; its directions carry more of block 0's input variance than random ones
    down = shared_sets(model)["default"].down("att", 0).double()
    captured = (block0 - block0.mean(0)) @ torch.linalg.qr(down)[0]
    random = (block0 - block0.mean(0)) @ torch.linalg.qr(torch.randn(128, 3, dtype=torch.float64))[0]
    assert captured.var(0).sum() > 3 * random.var(0).sum()


def test_the_shared_bases_get_their_own_learning_rate():
    model = prepare_model(_model(), "arc", rank=4, arc_options={"shared_lr_scale": 10.0})
    groups = _parameter_groups(model, TrainConfig(method="arc", lr=0.01, arc_options={"shared_lr_scale": 10.0}))
    shared = {id(p) for p in shared_sets(model)["default"].parameters()}
    assert [g.get("lr") for g in groups] == [None, pytest.approx(0.1)]
    assert {id(p) for p in groups[1]["params"]} == shared
    assert len(_parameter_groups(_adapted(), TrainConfig())) == 1


def test_arc_plus_is_a_method_that_merges():
    model = prepare_model(_model(), "arc_plus", rank=4, dropout=0.0)
    assert arc_config(model) == ARCConfig(rank=4, dropout=0.0, **ARC_PLUS)
    _perturb(model, 3)
    x = torch.randn(2, 3, 28, 28)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merge_for_inference(model, "arc_plus")(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("settings, message", [
    ({"method": "ssf", "arc_options": {"channel_scale": True}}, "arc_options apply to arc, arc_att and arc_plus"),
    ({"arc_options": {"rank": 3}}, "unknown ARC option"),
    ({"arc_options": {"channel_scale": "yes"}}, "channel_scale must be true or false"),
    ({"arc_options": [1]}, "arc_options must be a table of ARC settings"),
])
def test_bad_arc_options_in_a_training_config_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**settings)
