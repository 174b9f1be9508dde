"""Acceptance tests for ARC (Adapter Re-Composing): forward, merge, parameter counts, init, gradients,
dropout, adapter files and their failure modes.

Every numerical check compares arcvit against an independent reference written here from the paper's
formula: a plain copy of the backbone with forward pre-hooks on each block's attention / MLP that compute

    h = x + dropout(x @ (D * c)) @ D^T + b

from the D / c / b tensors read out of the adapted model's parameters (``arc.<pos>.<stage>``,
``<block>.<attn|mlp>...adapter.scale|bias``). No arcvit internals are used to build the reference.

All models are tiny, randomly initialised timm models (no download); the whole file runs in seconds on CPU.
"""
from __future__ import annotations

import copy
import json
import pickle
import re
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.eva import Eva
from timm.models.resnet import BasicBlock, ResNet

import arcvit
import arcvit.fileio
from arcvit.errors import AdapterFileError, ArcvitError, ConfigError, ModelError

torch.set_num_threads(1)  # tiny models; avoid fighting other jobs for the two cores

NUM_CLASSES = 5
VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2, num_classes=NUM_CLASSES)
EVA = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2, num_classes=NUM_CLASSES)
SWIN = dict(img_size=56, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=7,
            num_classes=NUM_CLASSES, drop_path_rate=0.0)  # swin's default drop path would make train mode random

FAMILIES = {
    "vit": lambda: timm.create_model("vit_tiny_patch16_224", **VIT),
    # DeiT/CLIP-style variants: no class token + avg pool; CLIP's pre-norm; DINOv2-style layer scale
    # (init_values large enough that the blocks, and so the adapters, visibly move the logits).
    "vit_avgpool": lambda: timm.create_model("vit_tiny_patch16_224", class_token=False, global_pool="avg", **VIT),
    "vit_prenorm": lambda: timm.create_model("vit_tiny_patch16_224", pre_norm=True, **VIT),
    "vit_layerscale": lambda: timm.create_model("vit_tiny_patch16_224", init_values=0.5, **VIT),
    "swin": lambda: timm.create_model("swin_tiny_patch4_window7_224", **SWIN),
    "beit": lambda: timm.create_model("beit_base_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64,
                                      num_heads=2, num_classes=NUM_CLASSES),
    "eva": lambda: Eva(**EVA),
    "eva_glu": lambda: Eva(swiglu_mlp=True, **EVA),                   # GluMlp: one fused fc1
    "eva_swiglu": lambda: Eva(swiglu_mlp=True, scale_mlp=True, **EVA),  # SwiGLU: fc1_g and fc1_x read the input
    "eva_unfused": lambda: Eva(qkv_fused=False, **EVA),                 # q_proj / k_proj (no bias) / v_proj
}
IMG = {"swin": 56}

BLOCK_NAME = re.compile(r"^(?:layers\.(\d+)\.)?blocks\.(\d+)$")


def build(family: str, seed: int = 0) -> nn.Module:
    """A tiny random backbone. timm's init (std 0.02) makes the blocks nearly inert, so every Linear is
    re-drawn at unit gain, like a trained network: then the adapters visibly move the logits."""
    torch.manual_seed(seed)
    model = FAMILIES[family]().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, m.in_features ** -0.5)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.1)
    return model


def images(family: str, n: int = 2, seed: int = 123) -> torch.Tensor:
    size = IMG.get(family, 32)
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def perturb(model: nn.Module, std: float = 0.02, seed: int = 7) -> None:
    """Add noise to every trainable tensor (c is zero at attention after init, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g) * std)


def adapted(family: str, seed: int = 0, **cfg) -> tuple[nn.Module, nn.Module]:
    """(plain backbone, perturbed adapted copy of it)."""
    plain = build(family, seed)
    model = arcvit.apply_arc(copy.deepcopy(plain), arcvit.ARCConfig(**cfg))
    perturb(model)
    return plain, model


def block_list(model: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """(name, block, stage) in forward order, found by timm's naming (blocks.i / layers.s.blocks.j)."""
    out = []
    for name, module in model.named_modules():
        m = BLOCK_NAME.match(name)
        if m:
            out.append((name, module, int(m.group(1) or 0)))
    assert out, "no blocks found"
    return out


def reference(plain: nn.Module, model: nn.Module, positions=("att", "mlp"), blocks=None,
              dropout: float = 0.0) -> nn.Module:
    """A copy of ``plain`` computing ARC with hooks, from the tensors of the adapted ``model``."""
    ref = copy.deepcopy(plain)
    ref.get_classifier().load_state_dict(model.get_classifier().state_dict())
    params = dict(model.named_parameters())
    for index, (name, block, stage) in enumerate(block_list(ref)):
        if blocks is not None and index not in blocks:
            continue
        for pos in positions:
            host = "attn" if pos == "att" else "mlp"
            prefixes = (f"{name}.{host}.", f"{name}.norm{1 if pos == 'att' else 2}.")  # impl "fused": on the norm
            scales = [k for k in params if k.startswith(prefixes) and k.endswith("adapter.scale")]
            assert len(scales) == 1, (prefixes, scales)
            bias_key = scales[0][: -len("scale")] + "bias"
            d, c, b = params[f"arc.{pos}.{stage}"].detach(), params[scales[0]].detach(), params.get(bias_key)
            b = None if b is None else b.detach()

            def hook(module, args, kwargs, d=d, c=c, b=b):
                x = args[0]
                code = F.dropout(x @ (d * c), dropout, training=module.training and dropout > 0)
                h = x + code @ d.t()
                if b is not None:
                    h = h + b
                return (h, *args[1:]), kwargs

            getattr(block, host).register_forward_pre_hook(hook, with_kwargs=True)
    return ref


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel:g} x logit scale {scale:.3g}"


def assert_differs(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-3) -> None:
    """Guards the comparisons above against being vacuous: the adapters must visibly change the logits."""
    scale = b.abs().max().item()
    assert (a - b).abs().max().item() > rel * scale


def arcvit_modules(model: nn.Module) -> list[str]:
    return [f"{n}: {type(m).__name__}" for n, m in model.named_modules() if type(m).__module__.startswith("arcvit")]


# ---------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("impl", ["lowrank", "sequential"])
@pytest.mark.parametrize("mode", ["arc", "arc_att"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_forward_matches_reference(family, mode, impl, train):
    plain, model = adapted(family, rank=6, mode=mode, impl=impl, dropout=0.0)
    positions = ("att", "mlp") if mode == "arc" else ("att",)
    ref = reference(plain, model, positions)
    model.train(train)
    ref.train(train)
    x = images(family)
    with torch.no_grad():
        out, expected = model(x), ref(x)
        backbone = reference(plain, model, positions=()).train(train)(x)
    assert out.shape == (2, NUM_CLASSES)
    assert_close_rel(out, expected, 2e-5)
    assert_differs(out, backbone)


@pytest.mark.parametrize("family,blocks", [("vit", (1,)), ("swin", (1, 2)), ("swin", (3,)), ("eva_swiglu", (0,))])
def test_forward_and_merge_with_block_subset(family, blocks):
    plain, model = adapted(family, rank=4, blocks=blocks, dropout=0.0)
    n_blocks = len(block_list(plain))
    adapted_blocks = {name for name, _, _ in block_list(model) if any(
        k.startswith(name + ".") and k.endswith("adapter.scale") for k, _ in model.named_parameters())}
    assert adapted_blocks == {block_list(plain)[i][0] for i in blocks} and len(blocks) < n_blocks
    x = images(family)
    with torch.no_grad():
        out = model(x)
        assert_close_rel(out, reference(plain, model, blocks=blocks)(x), 2e-5)
        assert_close_rel(arcvit.merge(model)(x), out, 1e-4)


def test_blocks_out_of_range_is_a_model_error():
    with pytest.raises(ModelError, match="blocks"):
        arcvit.apply_arc(build("vit"), arcvit.ARCConfig(blocks=(5,)))


def test_lowrank_and_sequential_draw_the_same_dropout_as_reference():
    """In train mode with dropout > 0, dropout acts on the r-wide code x (D * c) (same RNG draws as the formula)."""
    x = images("vit")
    outs = []
    for impl in ("lowrank", "sequential"):
        plain, model = adapted("vit", rank=6, impl=impl, dropout=0.3)
        ref = reference(plain, model, dropout=0.3)
        model.train()
        ref.train()
        with torch.no_grad():
            torch.manual_seed(11)
            out = model(x)
            torch.manual_seed(11)
            expected = ref(x)
        assert_close_rel(out, expected, 2e-5)
        outs.append(out)
    assert_close_rel(outs[0], outs[1], 2e-5)


# ---------------------------------------------------------------------------------------------- merge


@pytest.mark.parametrize("mode", ["arc", "arc_att"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_merge(family, mode):
    plain, model = adapted(family, rank=6, mode=mode)
    x = images(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable_before = [n for n, p in model.named_parameters() if p.requires_grad]
    with torch.no_grad():
        out = model(x)
        merged = arcvit.merge(model)
        merged.eval()
        merged_out = merged(x)
    assert type(merged) is type(plain)
    assert arcvit_modules(merged) == []
    assert_close_rel(merged_out, out, 1e-4)
    with torch.no_grad():
        assert_differs(merged_out, reference(plain, model, positions=())(x))  # the fold really changed weights

    fresh = build(family, seed=3)
    assert list(merged.state_dict()) == list(fresh.state_dict())
    fresh.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), merged_out)

    # the original is untouched and still an adapted, trainable model
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable_before
    with torch.no_grad():
        assert torch.equal(model(x), out)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in trainable_before)


@pytest.mark.parametrize("family", ["vit", "swin", "beit", "eva_swiglu"])
def test_merge_inplace(family):
    plain, model = adapted(family, rank=6)
    x = images(family)
    with torch.no_grad():
        out = model(x)
        merged = arcvit.merge(model, inplace=True)
        assert merged is model
        assert_close_rel(merged(x), out, 1e-4)
    assert arcvit_modules(merged) == []
    assert list(merged.state_dict()) == list(plain.state_dict())
    with pytest.raises(ModelError, match="has no ARC adapters"):  # nothing left to merge
        arcvit.merge(merged)


def test_merge_of_unadapted_model_is_a_model_error():
    with pytest.raises(ModelError, match="apply_arc"):
        arcvit.merge(build("vit"))


def test_rope_attention_without_key_bias_needs_bias_false():
    """EVA-02 style: rotary embeddings break the 'key bias is softmax-invariant' argument."""
    make = lambda: Eva(use_rot_pos_emb=True, **EVA)  # noqa: E731
    torch.manual_seed(0)
    with pytest.raises(ModelError, match="bias=False"):
        arcvit.apply_arc(make(), arcvit.ARCConfig(rank=4))
    torch.manual_seed(0)
    plain = make().eval()
    model = arcvit.apply_arc(copy.deepcopy(plain), arcvit.ARCConfig(rank=4, bias=False, dropout=0.0))
    assert not any(n.endswith("adapter.bias") for n, _ in model.named_parameters())
    perturb(model)
    x = images("eva")
    with torch.no_grad():
        out = model(x)
        assert_close_rel(out, reference(plain, model)(x), 2e-5)
        assert_close_rel(arcvit.merge(model)(x), out, 1e-4)


def test_qkv_without_bias_needs_bias_false():
    make = lambda: timm.create_model("vit_tiny_patch16_224", qkv_bias=False, **VIT)  # noqa: E731
    with pytest.raises(ModelError, match="bias=False"):
        arcvit.apply_arc(make(), arcvit.ARCConfig(rank=4))
    torch.manual_seed(0)
    plain = make().eval()
    model = arcvit.apply_arc(copy.deepcopy(plain), arcvit.ARCConfig(rank=4, bias=False))
    perturb(model)
    x = images("vit")
    with torch.no_grad():
        out = model(x)
        assert_close_rel(out, reference(plain, model)(x), 2e-5)
        assert_close_rel(arcvit.merge(model)(x), out, 1e-4)


# ---------------------------------------------------------------------------------------------- counts


@pytest.fixture(scope="module")
def vit_base():
    torch.manual_seed(0)
    return timm.create_model("vit_base_patch16_224", num_classes=10)


@pytest.mark.parametrize("mode,expected", [("arc", 96_432), ("arc_att", 48_216)])
def test_vit_base_parameter_count(vit_base, mode, expected):
    model = arcvit.apply_arc(copy.deepcopy(vit_base), arcvit.ARCConfig(rank=50, mode=mode))
    head = 768 * 10 + 10
    assert head == 7_690
    assert arcvit.trainable_parameters(model) == expected + head
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected + head
    assert arcvit.arc_parameter_count([768], [12], 50, mode) == expected


@pytest.mark.parametrize("mode", ["arc", "arc_att"])
def test_swin_parameter_count_is_per_stage(mode):
    rank, dims, depths = 5, (32, 64), (2, 2)
    positions = 2 if mode == "arc" else 1
    expected = sum(positions * (d * rank + L * (rank + d)) for d, L in zip(dims, depths))
    model = arcvit.apply_arc(build("swin"), arcvit.ARCConfig(rank=rank, mode=mode))
    head = 64 * NUM_CLASSES + NUM_CLASSES
    assert arcvit.trainable_parameters(model) == expected + head
    assert arcvit.arc_parameter_count(dims, depths, rank, mode) == expected
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n.startswith("arc.")}
    expected_shapes = {f"arc.att.{s}": (d, rank) for s, d in enumerate(dims)}
    if mode == "arc":
        expected_shapes.update({f"arc.mlp.{s}": (d, rank) for s, d in enumerate(dims)})
    assert shapes == expected_shapes


# ---------------------------------------------------------------------------------------------- init


def _sites(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    params = dict(model.named_parameters())
    return {k[: -len(".adapter.scale")]: (p, params[k[: -len("scale")] + "bias"])
            for k, p in params.items() if k.endswith("adapter.scale")}


@pytest.mark.parametrize("family", ["vit", "swin", "beit", "eva_swiglu"])
def test_init_and_trainable_set(family):
    rank = 6
    plain = build(family)
    model = arcvit.apply_arc(copy.deepcopy(plain), arcvit.ARCConfig(rank=rank))
    sites = _sites(model)
    n_blocks = len(block_list(plain))
    att = {k: v for k, v in sites.items() if ".attn" in k or ".norm1" in k}  # impl "fused" sits on the norm
    mlp = {k: v for k, v in sites.items() if ".mlp" in k or ".norm2" in k}
    assert len(att) == len(mlp) == n_blocks and len(sites) == 2 * n_blocks
    for c, b in att.values():
        assert c.shape == (rank,) and torch.count_nonzero(c) == 0
    for c, b in mlp.values():  # xavier-uniform on a 1 x r matrix
        bound = (6 / (1 + rank)) ** 0.5
        assert torch.count_nonzero(c) == rank and c.abs().max() <= bound
    for c, b in sites.values():
        assert torch.count_nonzero(b) == 0
    for name, d in ((n, p) for n, p in model.named_parameters() if n.startswith("arc.")):
        assert d.shape[1] == rank and 0 < d.abs().max() <= (6 / sum(d.shape)) ** 0.5, name

    head = model.get_classifier()
    assert all(torch.count_nonzero(p) == 0 for p in head.parameters())
    head_ids = {id(p) for p in head.parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = ({n for n, p in model.named_parameters() if id(p) in head_ids}
                | {n for n in dict(model.named_parameters()) if n.startswith("arc.") or ".adapter." in n})
    assert trainable == expected
    assert len([n for n in trainable if n.startswith("arc.")]) == 2 * (2 if family == "swin" else 1)


def test_zero_head_false_keeps_head_and_train_head_false_freezes_it():
    plain = build("vit")
    kept = arcvit.apply_arc(copy.deepcopy(plain), arcvit.ARCConfig(rank=4, zero_head=False))
    assert torch.equal(kept.head.weight, plain.head.weight) and torch.equal(kept.head.bias, plain.head.bias)
    assert kept.head.weight.requires_grad

    frozen = arcvit.apply_arc(copy.deepcopy(plain), arcvit.ARCConfig(rank=4, train_head=False, zero_head=False))
    assert not frozen.head.weight.requires_grad and not frozen.head.bias.requires_grad
    assert torch.equal(frozen.head.weight, plain.head.weight)
    assert arcvit.trainable_parameters(frozen) == arcvit.arc_parameter_count([64], [2], 4, "arc")


# ---------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("mode", ["arc", "arc_att"])
@pytest.mark.parametrize("family", ["vit", "swin", "beit", "eva_swiglu", "eva_unfused"])
def test_gradients_reach_exactly_the_trainable_tensors(family, mode):
    _, model = adapted(family, rank=4, mode=mode)
    model.train()
    out = model(images(family))
    F.cross_entropy(out, torch.tensor([0, 3])).backward()
    names = {n for n, _ in model.named_parameters()}
    expected = {n for n in names if n.startswith("arc.") or ".adapter." in n} | {
        n for n, p in model.named_parameters() if any(p is q for q in model.get_classifier().parameters())}
    assert len([n for n in expected if n.startswith("arc.")]) >= 1
    for name, p in model.named_parameters():
        if name in expected:
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
        else:
            assert p.grad is None, name


# ---------------------------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("impl", ["lowrank", "sequential"])
def test_dropout_is_stochastic_in_train_mode_only(impl):
    plain, model = adapted("vit", rank=6, dropout=0.5, impl=impl)
    x = images("vit")
    with torch.no_grad():
        model.train()
        torch.manual_seed(0)
        a, b = model(x), model(x)
        assert not torch.allclose(a, b)
        model.eval()
        e1, e2 = model(x), model(x)
        assert torch.equal(e1, e2)
        assert_close_rel(e1, reference(plain, model)(x), 2e-5)  # eval: no dropout at all


# ---------------------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("family", ["vit", "swin", "eva_swiglu"])
def test_save_load_roundtrip(tmp_path, family):
    _, model = adapted(family, rank=4, mode="arc_att", blocks=(1,), dropout=0.2, impl="sequential")
    folder = tmp_path / "nested" / "adapter"
    assert arcvit.save_adapter(model, folder) == folder
    assert sorted(p.name for p in folder.iterdir()) == ["adapter.safetensors", "adapter_config.json"]

    fresh = build(family)  # same weights, a new object
    loaded = arcvit.load_adapter(fresh, folder)
    assert loaded is fresh
    assert loaded.arc.config == model.arc.config
    x = images(family)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))
    src, dst = dict(model.named_parameters()), dict(loaded.named_parameters())
    trainable = [n for n, p in src.items() if p.requires_grad]
    assert trainable == [n for n, p in dst.items() if p.requires_grad]
    assert all(torch.equal(src[n], dst[n]) for n in trainable)

    # loading onto a model already adapted with the same config works too
    again = arcvit.apply_arc(build(family), model.arc.config)
    arcvit.load_adapter(again, folder)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), model(x))


@pytest.fixture
def saved(tmp_path):
    """A perturbed ViT adapter saved to tmp_path/a; returns (model, folder)."""
    _, model = adapted("vit", rank=4)
    folder = tmp_path / "a"
    arcvit.save_adapter(model, folder)
    return model, folder


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        target = meta
        *parents, leaf = key.split("__")
        for p in parents:
            target = target[p]
        target[leaf] = value
    path.write_text(json.dumps(meta))


def test_load_onto_other_backbone_weights_fails_and_leaves_model_untouched(saved):
    _, folder = saved
    other = build("vit", seed=1)
    snapshot = copy.deepcopy(other.state_dict())
    with pytest.raises(AdapterFileError, match="backbone weights differ"):
        arcvit.load_adapter(other, folder)
    assert arcvit_modules(other) == []
    assert all(torch.equal(v, snapshot[k]) for k, v in other.state_dict().items())
    # with the check off, the same adapter loads (the user takes responsibility)
    arcvit.load_adapter(other, folder, check_backbone=False)
    assert torch.equal(other.head.weight, saved[0].head.weight)


@pytest.mark.parametrize("other", [
    lambda: Eva(**EVA),
    lambda: timm.create_model("beit_base_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64,
                              num_heads=2, num_classes=NUM_CLASSES),
    lambda: timm.create_model("vit_tiny_patch16_224", **{**VIT, "depth": 3}),
    lambda: timm.create_model("vit_tiny_patch16_224", **{**VIT, "embed_dim": 32}),
], ids=["eva", "beit", "vit_depth3", "vit_width32"])
def test_load_onto_other_architecture_fails(saved, other):
    _, folder = saved
    with pytest.raises(AdapterFileError, match=r"trained on|backbone weights differ"):
        arcvit.load_adapter(other(), folder)


def test_load_with_other_num_classes_fails(saved):
    _, folder = saved
    other = timm.create_model("vit_tiny_patch16_224", **{**VIT, "num_classes": 7})
    backbone = {k: v for k, v in build("vit").state_dict().items() if not k.startswith("head.")}
    assert other.load_state_dict(backbone, strict=False).missing_keys == ["head.weight", "head.bias"]
    with pytest.raises(AdapterFileError, match="shape"):
        arcvit.load_adapter(other, folder)


def test_missing_folder_config_or_weights(saved, tmp_path):
    _, folder = saved
    with pytest.raises(AdapterFileError, match="no such adapter folder"):
        arcvit.load_adapter(build("vit"), tmp_path / "nope")
    (folder / "adapter.safetensors").rename(tmp_path / "w")
    with pytest.raises(AdapterFileError, match=r"adapter\.safetensors: missing"):
        arcvit.load_adapter(build("vit"), folder)
    (tmp_path / "w").rename(folder / "adapter.safetensors")
    (folder / "adapter_config.json").unlink()
    with pytest.raises(AdapterFileError, match=r"adapter_config\.json: missing"):
        arcvit.load_adapter(build("vit"), folder)


def test_truncated_weights_fail_the_checksum(saved):
    _, folder = saved
    path = folder / "adapter.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFileError, match="checksum"):
        arcvit.load_adapter(build("vit"), folder)


def test_invalid_json(saved):
    _, folder = saved
    (folder / "adapter_config.json").write_text('{"format": "arcvit-adapter", ')
    with pytest.raises(AdapterFileError, match="not valid JSON"):
        arcvit.load_adapter(build("vit"), folder)


def test_bad_arc_config_in_json(saved):
    _, folder = saved
    _edit_config(folder, arc_config__mode="x")
    with pytest.raises(AdapterFileError, match="arc_config"):
        arcvit.load_adapter(build("vit"), folder)


def test_wrong_rank_in_json(saved):
    _, folder = saved
    _edit_config(folder, arc_config__rank=5)
    with pytest.raises(AdapterFileError, match=r"shape .*rank"):
        arcvit.load_adapter(build("vit"), folder)


def test_model_already_adapted_with_another_config(saved):
    _, folder = saved
    model = arcvit.apply_arc(build("vit"), arcvit.ARCConfig(rank=8))
    with pytest.raises(AdapterFileError, match="already has ARC"):
        arcvit.load_adapter(model, folder)


class _Marker:
    """Unpickling this creates a file: proof that a loader ran pickle."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_in_place_of_safetensors_is_rejected_without_unpickling(saved, tmp_path):
    _, folder = saved
    marker = tmp_path / "UNPICKLED"
    weights = folder / "adapter.safetensors"
    torch.save({"arc.att.0": _Marker(str(marker))}, weights)
    # make the checksum agree, so the loader reaches the file's contents
    import hashlib
    _edit_config(folder, weights_sha256=hashlib.sha256(weights.read_bytes()).hexdigest())
    with pytest.raises(AdapterFileError, match="safetensors"):
        arcvit.load_adapter(build("vit"), folder)
    assert not marker.exists()
    # the payload is live: a pickle loader does create the marker (copied to a .pt name, since torch.load
    # itself hands *.safetensors paths to safetensors)
    live = tmp_path / "payload.pt"
    live.write_bytes(weights.read_bytes())
    torch.load(live, weights_only=False)
    assert marker.exists()

    with open(weights, "wb") as f:  # a bare pickle stream too
        pickle.dump({"x": 1}, f)
    _edit_config(folder, weights_sha256=hashlib.sha256(weights.read_bytes()).hexdigest())
    with pytest.raises(AdapterFileError, match="safetensors"):
        arcvit.load_adapter(build("vit"), folder)


def test_save_unadapted_model_fails(tmp_path):
    with pytest.raises(ModelError, match="^VisionTransformer has no ARC adapters"):
        arcvit.save_adapter(build("vit"), tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------- atomicity


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_failed_safetensors_write_keeps_the_old_adapter(saved, monkeypatch):
    model, folder = saved
    old = _snapshot(folder)
    perturb(model, seed=99)

    def broken_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:  # a partial write, then the failure
            f.write(b"\x00" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(arcvit.fileio, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        arcvit.save_adapter(model, folder)
    assert _snapshot(folder) == old  # same files, same bytes, no temp files left
    arcvit.load_adapter(build("vit"), folder)


def test_failed_config_write_keeps_the_old_adapter(saved, monkeypatch):
    model, folder = saved
    old = _snapshot(folder)
    perturb(model, seed=99)
    real = json.dumps

    def broken_dumps(obj, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("format") == "arcvit-adapter":
            raise OSError("disk full")
        return real(obj, *args, **kwargs)

    monkeypatch.setattr(arcvit.fileio.json, "dumps", broken_dumps)
    with pytest.raises(OSError, match="disk full"):
        arcvit.save_adapter(model, folder)
    monkeypatch.undo()
    assert _snapshot(folder) == old
    loaded = arcvit.load_adapter(build("vit"), folder)
    assert not torch.equal(loaded.head.weight, model.head.weight)  # the old adapter, not the new one


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("make,cls_name", [
    (lambda: ResNet(block=BasicBlock, layers=[1, 1, 1, 1], num_classes=NUM_CLASSES), "ResNet"),
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.ReLU()), "Sequential"),
])
def test_unsupported_model(make, cls_name):
    model = make()
    with pytest.raises(ModelError, match=cls_name):
        arcvit.apply_arc(model)
    assert all(p.requires_grad for p in model.parameters())  # nothing was frozen or changed


def test_apply_twice_is_a_model_error():
    model = arcvit.apply_arc(build("vit"), arcvit.ARCConfig(rank=4))
    with pytest.raises(ModelError, match="already"):
        arcvit.apply_arc(model, arcvit.ARCConfig(rank=4))


@pytest.mark.parametrize("kwargs,message", [
    (dict(rank=0), "^rank must be a positive integer, got 0$"), (dict(rank=-3), "^rank must be a positive integer"),
    (dict(rank=2.5), "^rank must be a positive integer, got 2.5"), (dict(mode="x"), "^mode must be 'arc' or"),
    (dict(dropout=1.5), r"^dropout must be in \[0, 1\), got 1.5"), (dict(dropout=-0.1), r"^dropout must be in \[0, 1\)"),
    (dict(impl="fast"), "^impl must be 'fused', 'lowrank' or 'sequential', got 'fast'"),
    (dict(blocks=()), r"^blocks must be non-negative block indices, got \(\)"),
    (dict(blocks=(-1,)), r"^blocks must be non-negative block indices, got \(-1,\)"),
], ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) if isinstance(k, dict) else "")
def test_invalid_config(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        arcvit.ARCConfig(**kwargs)


def test_errors_share_a_base_class():
    assert all(issubclass(e, ArcvitError) for e in (AdapterFileError, ConfigError, ModelError))


def test_config_roundtrips_through_dict():
    cfg = arcvit.ARCConfig(rank=7, mode="arc_att", dropout=0.0, blocks=(3, 1, 1), bias=False, train_head=False,
                           zero_head=False, impl="sequential")
    assert cfg.blocks == (1, 3)
    assert arcvit.ARCConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match="unknown"):
        arcvit.ARCConfig.from_dict({**cfg.to_dict(), "alpha": 1})
