"""The memory-lean ("fused") ARC path: same outputs and gradients as the composed path, fewer saved activations.

Gradients are compared on tiny random ViT, Swin and EVA models (arc and arc_att, dropout off and on with a fixed
seed); the saved-activation check counts, with saved_tensors_hooks, the bytes autograd keeps for one forward.
"""
from __future__ import annotations

import copy
import re

import pytest
import timm
import torch
import torch.nn as nn
from timm.models.eva import Eva

import arcvit
from arcvit.core.fused import ARCNorm
from arcvit.layers import ARCAdapter, ARCInput, ARCLinear
from arcvit.methods import prepare_model
from arcvit.sites import find_blocks

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
PLACES = {"att": ("norm1", "attn", "qkv"), "mlp": ("norm2", "mlp", "fc1")}


def fuse(model: nn.Module) -> nn.Module:
    """Prototype: move every adapter from in front of its reader to the block's norm (ARCNorm)."""
    for _, block, _ in find_blocks(model):
        for norm_attr, host_attr, linear_attr in PLACES.values():
            host = getattr(block, host_attr)
            if isinstance(host, ARCInput):
                adapter = host.adapter
                setattr(block, host_attr, host.inner)
            elif isinstance(getattr(host, linear_attr, None), ARCLinear):
                adapter = getattr(host, linear_attr).adapter
                setattr(host, linear_attr, getattr(host, linear_attr).base)
            else:
                continue
            setattr(block, norm_attr, ARCNorm(getattr(block, norm_attr), adapter))
    return model


def build(family: str) -> nn.Module:
    torch.manual_seed(0)
    model = FAMILIES[family]()
    with torch.no_grad():  # unit-gain weights, like a trained network, so that every block matters
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, m.in_features ** -0.5)
    return model


def pair(family: str, mode: str, dropout: float) -> tuple[nn.Module, nn.Module]:
    """The composed ("sequential") model and its lean twin, with the same perturbed adapters and head."""
    config = arcvit.ARCConfig(rank=8, mode=mode, dropout=dropout, impl="sequential")
    composed = arcvit.apply_arc(build(family), config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in composed.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    return composed, fuse(copy.deepcopy(composed))


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
    for module in (ARCNorm(norm, adapter), nn.Sequential(norm, adapter)):
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
    make = lambda: timm.create_model("vit_pico_patch7_28", num_classes=10, drop_rate=0.0)  # noqa: E731
    torch.manual_seed(0)
    bitfit = saved_activation_bytes(prepare_model(make(), "bitfit"), x)
    config = arcvit.ARCConfig(rank=rank, mode=mode, dropout=0.1, impl="sequential")
    composed = arcvit.apply_arc(make(), config)
    lean = fuse(copy.deepcopy(composed))
    sites = sum(isinstance(m, ARCNorm) for m in lean.modules())
    tokens = batch * (16 + 1)  # 28/7 = 4x4 patches + class token
    codes = sites * tokens * rank * (4 + 1)  # the dropped codes (fp32) and the dropout mask (bool)
    assert saved_activation_bytes(lean, x) <= bitfit + codes
    assert saved_activation_bytes(composed, x) > bitfit + codes  # the check can tell the paths apart
