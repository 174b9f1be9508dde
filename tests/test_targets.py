"""LoRA, DoRA and VeRA adapt the same layers on timm and transformers ViTs: the Linears that read the attention's
and the MLP's input, found through the block specs; ``targets`` overrides them, and a partial choice is refused."""
from __future__ import annotations

import pytest
import timm
import torch

from arcvit.errors import ConfigError, ModelError
from arcvit.methods import merge_for_inference, prepare_model
from arcvit.training.config import TrainConfig
from arcvit.training.recipes import Recipe, shared_settings, train_config

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

D, C = 32, 3


def timm_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=2, embed_dim=D, num_heads=2,
                             num_classes=C)


def hf_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=D, num_hidden_layers=2, num_attention_heads=2, intermediate_size=4 * D, image_size=16,
        patch_size=8, num_labels=C))


def changed_by_merge(make, method: str, **options) -> set[str]:
    """The layers whose weights the merged model changes, once every trained tensor is made non-zero."""
    base = make().state_dict()
    model = prepare_model(make(), method, rank=2, **options)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    merged = merge_for_inference(model, method).state_dict()
    return {k.rsplit(".", 1)[0] for k in base if k.endswith("weight") and not torch.equal(base[k], merged[k])}


TIMM_DEFAULT = {f"blocks.{i}.{name}" for i in range(2) for name in ("attn.qkv", "mlp.fc1")} | {"head"}
HF_DEFAULT = {f"vit.layers.{i}.{name}" for i in range(2)
              for name in ("attention.q_proj", "attention.k_proj", "attention.v_proj", "mlp.fc1")} | {"classifier"}


@pytest.mark.parametrize("method", ["lora", "dora", "vera"])
def test_the_default_targets_are_the_attention_and_mlp_inputs_on_both_libraries(method):
    """The half-LoRA of issue 29: on a transformers ViT the default used to match only mlp.fc1."""
    assert changed_by_merge(timm_vit, method) == TIMM_DEFAULT
    assert changed_by_merge(hf_vit, method) == HF_DEFAULT


def test_targets_name_positions_or_linears():
    every = {n.replace("qkv", "proj") for n in TIMM_DEFAULT} | {n.replace("fc1", "fc2") for n in TIMM_DEFAULT}
    assert changed_by_merge(timm_vit, "lora", targets="att,mlp,proj,fc2") == TIMM_DEFAULT | every
    hf_every = {f"vit.layers.{i}.{name}" for i in range(2) for name in ("attention.o_proj", "mlp.fc2")}
    assert changed_by_merge(hf_vit, "lora", targets=("att", "mlp", "o_proj", "fc2")) == HF_DEFAULT | hf_every
    assert changed_by_merge(hf_vit, "lora", targets="q_proj,k_proj,v_proj") == {
        n for n in HF_DEFAULT if "fc1" not in n}


@pytest.mark.parametrize("make,targets,message", [
    (hf_vit, "q_proj,v_proj", r"^lora targets would adapt attention\.q_proj, attention\.v_proj but not "
                              r"attention\.k_proj, which read the same attention input \(in vit\.layers\.0\)"),
    (hf_vit, "proj", r"^lora targets proj: no such position or Linear in ViTForImageClassification's"),
    (timm_vit, "att,nothing", r"^lora targets nothing: no such position or Linear"),
    (timm_vit, "att,,mlp", r"^targets must be a comma-separated list"),
])
def test_bad_targets_are_refused_in_one_line(make, targets, message):
    with pytest.raises(ConfigError, match=message):
        prepare_model(make(), "lora", targets=targets)


def test_targets_belong_to_the_methods_that_adapt_chosen_linears():
    with pytest.raises(ConfigError, match="^arc has no targets to set"):
        prepare_model(timm_vit(), "arc", targets="att")
    with pytest.raises(ConfigError, match="^targets apply to lora, dora and vera, not to ssf"):
        TrainConfig(method="ssf", targets="att")
    assert TrainConfig(method="vera", targets=[" att", "mlp", "att"]).targets == "att,mlp"


def test_shared_targets_reach_only_the_methods_that_take_them():
    recipe = Recipe(defaults={"targets": "att,mlp,proj,fc2", "lr": 0.1})
    assert train_config(recipe, "t", "lora").targets == "att,mlp,proj,fc2"
    assert train_config(recipe, "t", "arc").targets is None
    assert shared_settings({"targets": "att", "epochs": 2}, "rlrr") == {"epochs": 2}
    with pytest.raises(ConfigError, match="targets apply to lora, dora and vera, not to arc"):
        train_config(Recipe(methods={"arc": {"targets": "att"}}), "t", "arc")


def test_adaptformer_wraps_the_mlp_its_block_spec_names():
    model = prepare_model(hf_vit(), "adaptformer", rank=2)
    assert type(model.vit.layers[0].mlp).__name__ == "AdaptFormerMLP"
    swinv2 = transformers.Swinv2ForImageClassification(transformers.Swinv2Config(
        image_size=16, patch_size=4, embed_dim=8, depths=[1], num_heads=[1], window_size=2, num_labels=C))
    with pytest.raises(ModelError, match=r"^adaptformer: .*intermediate \(Swinv2Intermediate\) is not a whole MLP"):
        prepare_model(swinv2, "adaptformer", rank=2)
