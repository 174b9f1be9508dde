"""The memory-lean ARC path (impl "fused"): same outputs and gradients as the composed path ("sequential"),
fewer saved activations; merge, save and load work on it as on the other impls.

Gradients are compared on tiny random ViT, Swin and EVA models (arc and arc_att, dropout off and on with a fixed
seed); the saved-activation check counts, with saved_tensors_hooks, the bytes autograd keeps for one forward.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import re
from functools import partial

import pytest
import timm
import torch
import torch.nn as nn
from conftest import BACKBONE, RunOutcome, train_args
from timm.layers import RmsNorm
from timm.models.eva import Eva

import arcvit
from arcvit.core.adapter_file import adapter_tensors
from arcvit.core.fused import lean_norm_adapter
from arcvit.core.layers import ARCAdapter, ARCNorm
from arcvit.methods import prepare_model

torch.set_num_threads(1)

TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2, num_classes=5)
SWIN = dict(img_size=56, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=7, num_classes=5,
            drop_path_rate=0.0)
FAMILIES = {
    "vit": lambda: timm.create_model("vit_tiny_patch16_224", **TINY),
    "swin": lambda: timm.create_model("swin_tiny_patch4_window7_224", **SWIN),
    "eva": lambda: Eva(**TINY),
    "eva_swiglu": lambda: Eva(swiglu_mlp=True, scale_mlp=True, **TINY),
}
def build(family: str) -> nn.Module:
    torch.manual_seed(0)
    model = FAMILIES[family]()
    with torch.no_grad():  # unit-gain weights, like a trained network, so that every block matters
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, m.in_features ** -0.5)
    return model


def perturbed(model: nn.Module, impl: str, **config) -> nn.Module:
    """ARC with the given impl, its adapters and head moved off their initial values: the same values for every
    impl, drawn in the order of the adapter file's names, which do not depend on the impl."""
    model = arcvit.apply_arc(model, arcvit.ARCConfig(impl=impl, **config))
    tensors = adapter_tensors(model, "default") | {f"head.{n}": p for n, p in model.head.named_parameters()}
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key in sorted(tensors):
            tensors[key].add_(torch.randn(tensors[key].shape, generator=generator) * 0.1)
    return model


def pair(family: str, mode: str, dropout: float) -> tuple[nn.Module, nn.Module]:
    """The composed ("sequential") model and its lean ("fused") twin, with the same adapters and head."""
    config = dict(rank=8, mode=mode, dropout=dropout)
    return perturbed(build(family), "sequential", **config), perturbed(build(family), "fused", **config)


def step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and gradients of one training forward; adapter gradients keyed "<block>.<position>.<param>"."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same dropout masks, if the two paths draw them alike
    out = model(x)
    (out.square().sum() + out.sum()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and ".adapter." not in n}
    for name, module in model.named_modules():
        if isinstance(module, ARCAdapter):
            block = re.match(r"^(.*blocks\.\d+)\.", name).group(1)
            grads |= {f"{block}.{module.position}.{n}": p.grad for n, p in module.named_parameters()}
    return out.detach(), grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


# Swin's composed path adapts the attention input after the window partition, so its dropout masks are drawn in
# another token order: same distribution, different sample. test_lean_function_matches_composed covers that case.
CASES = [(f, m, d) for f in FAMILIES for m in ("arc", "arc_att") for d in (0.0, 0.3) if not (f == "swin" and d)]


@pytest.mark.parametrize("family,mode,dropout", CASES)
def test_lean_gradients_match_composed(family, mode, dropout):
    composed, lean = pair(family, mode, dropout)
    assert any(isinstance(m, ARCNorm) for m in lean.modules())
    x = torch.randn(3, 3, 56 if family == "swin" else 32, 56 if family == "swin" else 32,
                    generator=torch.Generator().manual_seed(3))
    out_c, grads_c = step(composed, x)
    out_l, grads_l = step(lean, x)
    assert _rel(out_l, out_c) < 1e-5
    assert grads_l.keys() == grads_c.keys() and any(".scale" in n for n in grads_c)
    for name, g in grads_c.items():
        assert g.abs().sum() > 0, name
        assert _rel(grads_l[name], g) < 1e-5, name


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lean_function_matches_composed(dropout):
    """One site on a 4-D (Swin-shaped) input: the Function against ``adapter(norm(y))``, same seed, same mask."""
    composed, _ = pair("swin", "arc", dropout)
    adapter = next(m for m in composed.modules() if isinstance(m, ARCAdapter)).train()
    norm = composed.layers[0].blocks[0].norm1
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2), norm.bias.normal_(0.0, 0.2)
    norm.requires_grad_(True)
    y0 = torch.randn(2, 7, 7, norm.weight.numel(), generator=torch.Generator().manual_seed(6))
    results = []
    for module in (partial(lean_norm_adapter, norm, adapter), nn.Sequential(norm, adapter)):
        y = y0.clone().requires_grad_(True)
        torch.manual_seed(8)
        out = module(y)
        tensors = [y, norm.weight, norm.bias, adapter.down_proj, adapter.scale, adapter.bias]
        results.append([out, *torch.autograd.grad((out * out.detach().cos()).sum(), tensors)])
    for lean, composed_ in zip(*results):
        assert _rel(lean, composed_) < 1e-5


def test_lean_inference_matches_composed_and_merge():
    composed, lean = pair("vit", "arc", 0.1)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    composed.eval(), lean.eval()
    with torch.no_grad():
        expected = composed(x)
        assert _rel(lean(x), expected) < 1e-6
    assert _rel(lean(x).detach(), expected) < 1e-6  # grad mode on, eval: the Function, no dropout


def saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves for backward in one training forward."""
    params = {p.data_ptr() for p in model.parameters()}
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in params:
            seen[(t.data_ptr(), t.nbytes)] = t.nbytes
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(seen.values())


@pytest.mark.parametrize("mode", ["arc", "arc_att"])
def test_lean_saves_no_more_than_bitfit_plus_codes(mode):
    rank, batch = 16, 4
    x = torch.randn(batch, 3, 28, 28, generator=torch.Generator().manual_seed(5))
    make = lambda: timm.create_model("vit_pico_patch7_28", num_classes=10, drop_rate=0.0)
    torch.manual_seed(0)
    bitfit = saved_activation_bytes(prepare_model(make(), "bitfit"), x)
    config = arcvit.ARCConfig(rank=rank, mode=mode, dropout=0.1, impl="sequential")
    composed = arcvit.apply_arc(make(), config)
    torch.manual_seed(0)
    lean = arcvit.apply_arc(make(), dataclasses.replace(config, impl="fused"))
    sites = sum(isinstance(m, ARCNorm) for m in lean.modules())
    tokens = batch * (16 + 1)  # 28/7 = 4x4 patches + class token
    codes = sites * tokens * rank * (4 + 1)  # the dropped codes (fp32) and the dropout mask (bool)
    assert saved_activation_bytes(lean, x) <= bitfit + codes
    assert saved_activation_bytes(composed, x) > bitfit + codes  # the check can tell the paths apart


def test_fused_merge_save_and_load(tmp_path):
    """Merging puts the plain norms back; the adapter file loads into either impl with the same outputs."""
    plain = build("vit").eval()
    model = perturbed(copy.deepcopy(plain), "fused", rank=8)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    merged = arcvit.merge(model)
    assert not any(isinstance(m, ARCNorm) for m in merged.modules())
    assert merged.state_dict().keys() == plain.state_dict().keys()
    arcvit.save_adapter(model, tmp_path / "a")
    sequential = arcvit.apply_arc(copy.deepcopy(plain), arcvit.ARCConfig(rank=8, impl="sequential"))
    with torch.no_grad():
        expected = model.eval()(x)
        torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(arcvit.load_adapter(copy.deepcopy(plain), tmp_path / "a").eval()(x), expected)
        for name, p in adapter_tensors(model, "default").items():  # the same tensors, placed as "sequential" does
            adapter_tensors(sequential, "default")[name].copy_(p)
        sequential.head.load_state_dict(model.head.state_dict())
        torch.testing.assert_close(sequential.eval()(x), expected, rtol=1e-5, atol=1e-5)


def test_fused_falls_back_where_the_norm_cannot_carry_the_adapter():
    """An RMSNorm, or a Swin attention that pads its input to whole windows, keeps the composed wrappers."""
    rms = arcvit.apply_arc(Eva(norm_layer=partial(RmsNorm, eps=1e-6), **TINY), arcvit.ARCConfig(rank=8))
    assert not any(isinstance(m, ARCNorm) for m in rms.modules())
    swin = arcvit.apply_arc(timm.create_model("swin_tiny_patch4_window7_224", **(SWIN | {"window_size": 5})),
                            arcvit.ARCConfig(rank=8))
    wrapped = [type(m).__name__ for m in swin.modules() if getattr(type(m), "is_arc_site", False)]
    assert wrapped.count("ARCNorm") == wrapped.count("ARCLinear") == 4  # mlp on the norm, attention on qkv
    x = torch.randn(2, 3, 56, 56)
    perturbed_swin = perturbed(timm.create_model("swin_tiny_patch4_window7_224", **(SWIN | {"window_size": 5})),
                               "fused", rank=8).eval()
    with torch.no_grad():
        torch.testing.assert_close(arcvit.merge(perturbed_swin)(x), perturbed_swin(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # compiling the pico ViT on CPU takes tens of seconds
def test_train_compile_matches_the_eager_run_and_merges(reference_run, tiny_data, arcvit_cli, tmp_path):
    """`arcvit train --compile` trains the same adapter as the eager reference run (to compiler rounding), and
    its adapter file loads, merges and evaluates like any other."""
    done = arcvit_cli(*train_args(tiny_data, tmp_path / "run", "--compile"), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    compiled = RunOutcome.read(tmp_path / "run")
    assert compiled.max_adapter_diff(reference_run) < 1e-3
    assert abs(float(compiled.metrics[-1]["train_loss"]) - float(reference_run.metrics[-1]["train_loss"])) < 1e-3
    classes = json.loads((tmp_path / "run" / "settings.json").read_text())["num_classes"]
    model = arcvit.load_adapter(timm.create_model(BACKBONE, num_classes=classes),
                                tmp_path / "run" / "adapter", check_backbone=False).eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(arcvit.merge(model)(x), model(x), rtol=1e-4, atol=1e-5)
