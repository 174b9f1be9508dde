"""Every benchmarked method on tiny timm models: what trains, how much, and that merging changes nothing."""
from __future__ import annotations

import copy

import pytest
import timm
import torch

import arcvit
from arcvit.errors import ConfigError, ModelError
from arcvit.methods import METHODS, SPECS, merge_for_inference, prepare_model, trainable_state_dict

D, L, C = 64, 2, 5          # tiny ViT: width, depth, classes
TOKENS = (32 // 8) ** 2 + 1  # 16 patches + class token
SWIN_DIMS = (16, 32)         # tiny Swin: one block per stage
HEAD = D * C + C


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=L, embed_dim=D, num_heads=2,
                             num_classes=C)


def tiny_swin() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", img_size=32, patch_size=4, window_size=4,
                             embed_dim=SWIN_DIMS[0], depths=(1, 1), num_heads=(1, 2), num_classes=C)


PER_BLOCK_BIASES = D + 3 * D + D + D + 4 * D + D               # norm1, qkv, proj, norm2, fc1, fc2
PER_BLOCK_WEIGHTS = D + 3 * D * D + D * D + D + 2 * 4 * D * D  # norm1, qkv, proj, norm2, fc1, fc2
# Trainable parameters of the tiny ViT from its dims; r is the method's rank (AdaptFormer: bottleneck).
VIT_COUNTS = {
    "arc": lambda r: 2 * (D * r + L * (r + D)) + HEAD,        # shared D per position + c, b per site
    "arc_att": lambda r: D * r + L * (r + D) + HEAD,
    # ARC+: four positions (fc2's at the MLP width 4D) and a channel scale per site
    "arc_plus": lambda r: 3 * (D * r + L * (r + D)) + 4 * D * r + L * (r + 4 * D) + L * 7 * D + HEAD,
    "linear": lambda r: HEAD,
    "full": lambda r: 3 * 8 * 8 * D + D + D + TOKENS * D      # patch conv, class token, positions
    + L * (PER_BLOCK_WEIGHTS + PER_BLOCK_BIASES) + 2 * D + HEAD,
    "bitfit": lambda r: D + L * PER_BLOCK_BIASES + D + HEAD,  # patch conv, blocks, final norm
    "lora": lambda r: L * (r * (D + 3 * D) + r * (D + 4 * D)) + HEAD,  # r (d_in + d_out) on qkv and fc1
    "vera": lambda r: L * ((r + 3 * D) + (r + 4 * D)) + HEAD,  # lambda_d (r) + lambda_b (d_out) on qkv and fc1
    "adaptformer": lambda r: L * (2 * D * r + r + D) + HEAD,   # down, up (weights + biases) per block
    # the mergeable peers (tests/test_peer_methods.py checks them against their papers' formulas)
    "ssf": lambda r: (22 * L + 4) * D + HEAD,
    "repadapter": lambda r: 2 * L * (D * r + r + D * r // 2 + D) + HEAD,
    "fact_tt": lambda r: 2 * D * r + 12 * L * r * r + HEAD,
    "fact_tk": lambda r: 2 * D * r + 12 * L * r + r ** 3 + HEAD,
    "rlrr": lambda r: (31 * L + 4) * D + HEAD,
    "dora": lambda r: L * (r * (D + 3 * D) + r * (D + 4 * D) + 3 * D + 4 * D) + HEAD,
}
DEFAULT_RANKS = {"arc": 50, "arc_att": 50, "arc_plus": 50, "lora": 8, "vera": 256, "adaptformer": 8, "repadapter": 8, "fact_tt": 8,
                 "fact_tk": 32, "dora": 8}


def swin_count(method: str, r: int) -> int:
    head = SWIN_DIMS[-1] * C + C
    return head + sum({"arc": 2 * (d * r + (r + d)), "lora": r * (d + 3 * d) + r * (d + 4 * d)}[method]
                      for d in SWIN_DIMS)


@pytest.mark.parametrize("method,rank", [(m, None) for m in METHODS] + [(m, 4) for m in DEFAULT_RANKS])
def test_trainable_count_and_zero_head(method, rank):
    model = prepare_model(tiny_vit(), method, rank=rank)
    assert arcvit.trainable_parameters(model) == VIT_COUNTS[method](rank or DEFAULT_RANKS.get(method))
    head = model.get_classifier()
    assert all(p.eq(0).all() for p in head.parameters())
    assert any(p.requires_grad for p in head.parameters())


@pytest.mark.parametrize("method", ["arc", "lora"])
def test_swin_trainable_count(method):
    model = prepare_model(tiny_swin(), method, rank=4)
    assert arcvit.trainable_parameters(model) == swin_count(method, 4)


def _train(model: torch.nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    torch.manual_seed(1)
    y = torch.randint(0, C, (x.shape[0],))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


CASES = [(tiny_vit, m) for m in METHODS] + [(tiny_swin, "arc"), (tiny_swin, "lora")]


@pytest.mark.parametrize("factory,method", CASES, ids=[f"{f.__name__}-{m}" for f, m in CASES])
def test_train_merge_and_restore(factory, method):
    backbone = factory()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    rank = 4 if factory is tiny_swin and method == "arc" else None  # ARC's rank may not exceed the width (16)
    model = prepare_model(copy.deepcopy(backbone), method, rank=rank)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, x)

    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[name]), f"{name} trains but did not change"
        else:
            assert torch.equal(p, before[name]), f"{name} is frozen but changed"

    model.eval()
    with torch.no_grad():
        logits = model(x)

    restored = prepare_model(copy.deepcopy(backbone), method, rank=rank)
    missing, unexpected = restored.load_state_dict(trainable_state_dict(model), strict=False)
    assert not unexpected
    assert set(missing).isdisjoint(n for n, p in restored.named_parameters() if p.requires_grad)
    with torch.no_grad():
        torch.testing.assert_close(restored.eval()(x), logits, rtol=0, atol=0)

    if not SPECS[method].mergeable:
        with pytest.raises(ConfigError, match="not mergeable"):
            merge_for_inference(model, method)
        return
    merged = merge_for_inference(model, method).eval()
    assert type(merged) is type(backbone)
    assert list(merged.state_dict()) == list(backbone.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(x), logits, rtol=0, atol=1e-4)
        torch.testing.assert_close(model(x), logits, rtol=0, atol=0)  # the trained model is left as it was


def test_unknown_method_lists_the_choices():
    with pytest.raises(ConfigError, match="adaptformer"):
        prepare_model(tiny_vit(), "prefix_tuning")
    with pytest.raises(ConfigError, match="unknown method"):
        merge_for_inference(tiny_vit(), "prefix_tuning")


@pytest.mark.parametrize("method,options,message", [
    ("linear", {"rank": 4}, "^linear has no rank or dropout to set"),
    ("bitfit", {"dropout": 0.1}, "^bitfit has no rank or dropout to set"),
    ("lora", {"rank": 0}, "^rank must be a positive integer, got 0"),
    ("adaptformer", {"dropout": 1.0}, r"^dropout must be in \[0, 1\), got 1.0"),
    ("lora", {"targets": ("no_such_layer",)}, "^lora targets no_such_layer: no such position or Linear"),
    ("vera", {"targets": ("attn",)}, "^vera targets attn: no such position or Linear"),  # attn is not a Linear
])
def test_bad_options_raise_config_error(method, options, message):
    with pytest.raises(ConfigError, match=message):
        prepare_model(tiny_vit(), method, **options)


def test_a_model_is_prepared_once_and_merged_by_its_own_method():
    model = prepare_model(tiny_vit(), "lora")
    with pytest.raises(ModelError, match="already carries adapters"):
        prepare_model(model, "bitfit")
    with pytest.raises(ModelError, match="^vera: expected the PEFT model prepare_model returned, got PeftModel"):
        merge_for_inference(model, "vera")
    with pytest.raises(ModelError, match="^VisionTransformer carries adapters that linear does not add"):
        merge_for_inference(prepare_model(tiny_vit(), "adaptformer"), "linear")
