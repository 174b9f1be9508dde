"""ARC on Hugging Face transformers vision models: every family against an independent reference.

The reference is the paper's formula applied by forward pre-hooks on an untouched copy of the model, at the
inputs of the modules listed in HOSTS here (not taken from arcvit's specs): ``h = x + (x D diag(c)) D^T + b``.
Models are tiny random-init configs built in the test (no hub); weights are perturbed so that every bias,
norm and adapter tensor is non-trivial.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import TINY_TASK

transformers = pytest.importorskip("transformers")

import arcvit
from arcvit import ARCConfig
from arcvit.core.adapter_file import adapter_tensors, read_adapter
from arcvit.errors import AdapterFileError, MissingExtra, ModelError

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
SWIN = dict(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4,
            drop_path_rate=0.0)
T = transformers
FAMILIES = {  # id -> (model class, config)
    "vit": (T.ViTModel, T.ViTConfig(**SMALL, intermediate_size=64)),
    "vit-cls": (T.ViTForImageClassification, T.ViTConfig(**SMALL, intermediate_size=64, num_labels=5)),
    "deit": (T.DeiTForImageClassification, T.DeiTConfig(**SMALL, intermediate_size=64, num_labels=5)),
    "dinov2": (T.Dinov2Model, T.Dinov2Config(**SMALL, mlp_ratio=2)),
    "dinov2-swiglu": (T.Dinov2Model, T.Dinov2Config(**SMALL, mlp_ratio=2, use_swiglu_ffn=True)),
    "dinov2-registers": (T.Dinov2WithRegistersModel,
                         T.Dinov2WithRegistersConfig(**SMALL, mlp_ratio=2, num_register_tokens=2)),
    "clip": (T.CLIPVisionModel, T.CLIPVisionConfig(**SMALL, intermediate_size=64)),
    "clip-projection": (T.CLIPVisionModelWithProjection,
                        T.CLIPVisionConfig(**SMALL, intermediate_size=64, projection_dim=16)),
    "siglip": (T.SiglipVisionModel, T.SiglipVisionConfig(**SMALL, intermediate_size=64)),
    "swin": (T.SwinModel, T.SwinConfig(**SWIN)),
    "swinv2": (T.Swinv2ForImageClassification, T.Swinv2Config(**SWIN, num_labels=5)),
}
HOSTS = {  # block class -> the modules whose first input is the attention / MLP site
    "ViTLayer": ("attention", "mlp"), "DeiTLayer": ("attention", "mlp"), "Dinov2Layer": ("attention", "mlp"),
    "Dinov2WithRegistersLayer": ("attention", "mlp"), "CLIPEncoderLayer": ("self_attn", "mlp"),
    "SiglipEncoderLayer": ("self_attn", "mlp"), "SwinLayer": ("attention", "mlp"),
    "Swinv2Layer": ("attention", "intermediate"),
}
RANK = 4


def build(family: str, seed: int = 0) -> torch.nn.Module:
    cls, config = FAMILIES[family]
    torch.manual_seed(seed)
    model = cls(copy.deepcopy(config)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def arc_config(family: str, **kw) -> ARCConfig:
    # Swinv2's cosine attention normalises keys and its key Linear has no bias: ARC's b cannot merge there
    return ARCConfig(rank=RANK, bias=family != "swinv2", dropout=0.0, **kw)


def perturb_trainable(model: torch.nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def output(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(pixel_values=x)
    for name in ("logits", "image_embeds", "pooler_output"):
        if getattr(out, name, None) is not None:
            return torch.cat([getattr(out, name).flatten(1), out.last_hidden_state.flatten(1)], 1) \
                if name != "logits" else out.logits
    return out.last_hidden_state


def images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def reference_blocks(model: torch.nn.Module) -> list[tuple[torch.nn.Module, int]]:
    """Blocks in forward order with their stage (one stage per block list)."""
    found, stages = [], {}
    for name, module in model.named_modules():
        if type(module).__name__ in HOSTS:
            found.append((module, stages.setdefault(name.rpartition(".")[0], len(stages))))
    return found


def with_reference_hooks(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """The paper's ARC at each site of ``model``, from the canonical adapter tensors."""
    for index, (block, stage) in enumerate(reference_blocks(model)):
        for position, host in zip(("att", "mlp"), HOSTS[type(block).__name__]):
            down, scale = tensors[f"shared.{position}.{stage}"], tensors[f"site.{index}.{position}.scale"]
            bias = tensors.get(f"site.{index}.{position}.bias", torch.zeros(down.shape[0]))

            def adapt(x, down=down, scale=scale, bias=bias):
                return x + (x @ down @ torch.diag(scale)) @ down.T + bias

            def hook(module, args, kwargs, adapt=adapt):
                if args:
                    return (adapt(args[0]), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": adapt(kwargs["hidden_states"])}
            getattr(block, host).register_forward_pre_hook(hook, with_kwargs=True)


def adapted_and_reference(family: str, tmp_path, impl: str = "sequential"):
    model = build(family)
    reference = copy.deepcopy(model)
    arcvit.apply_arc(model, arc_config(family, impl=impl))
    perturb_trainable(model)
    arcvit.save_adapter(model, tmp_path / "adapter")
    contents = read_adapter(tmp_path / "adapter")
    with_reference_hooks(reference, contents.tensors)
    with torch.no_grad():  # the head trained (zeroed, then perturbed) alongside
        for key, tensor in contents.head.items():
            reference.get_parameter(key).copy_(tensor)
    return model, reference


@pytest.mark.parametrize("impl", ["sequential", "fused"])
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_equals_the_papers_formula(family, impl, tmp_path, one_thread):
    model, reference = adapted_and_reference(family, tmp_path, impl)
    x = images()
    with torch.no_grad():
        assert torch.allclose(output(model, x), output(reference, x), atol=1e-5, rtol=1e-4)
        model.train(), reference.train()  # dropout 0 everywhere: training mode computes the same
        assert torch.allclose(output(model, x), output(reference, x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_is_exact_and_plain(family, tmp_path, one_thread):
    model = build(family)
    arcvit.apply_arc(model, arc_config(family))
    perturb_trainable(model)
    merged = arcvit.merge(model)
    x = images()
    with torch.no_grad():
        a, b = output(model, x), output(merged, x)
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()
    fresh = FAMILIES[family][0](copy.deepcopy(FAMILIES[family][1]))
    assert type(merged) is type(fresh) and list(merged.state_dict()) == list(fresh.state_dict())
    merged.save_pretrained(tmp_path / "merged")
    loaded = type(fresh).from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.equal(output(loaded, x), b)


def _arc_count(model: torch.nn.Module, rank: int) -> int:
    """2·d·r + L·2·(r + d) for each stage of width d and L blocks."""
    widths: dict[int, list[int]] = {}
    for block, stage in reference_blocks(model):
        widths.setdefault(stage, []).append(next(m for m in block.modules()
                                                 if isinstance(m, torch.nn.LayerNorm)).normalized_shape[0])
    return sum(2 * d[0] * rank + len(d) * 2 * (rank + d[0]) for d in widths.values())


@pytest.mark.parametrize("family", ["vit", "vit-cls", "dinov2-registers", "clip", "swin"])
def test_parameter_count_follows_the_formula(family):
    model = build(family)
    expected = _arc_count(model, RANK)
    arcvit.apply_arc(model, arc_config(family, train_head=False, zero_head=False))
    assert arcvit.trainable_parameters(model) == expected


@pytest.mark.parametrize("family", ["vit", "dinov2", "dinov2-registers", "clip", "clip-projection", "siglip",
                                    "swin", "vit-cls"])
def test_head_follows_the_familys_classifier(family, one_thread):
    """A headless model gets the head its family's ...ForImageClassification has; a model with one keeps it."""
    from arcvit.backends.transformers import TransformersClassifier
    model = build(family)
    wrapped = TransformersClassifier(model, num_classes=7).eval()
    x = images()
    with torch.no_grad():
        logits = wrapped(x)
        out = model(pixel_values=x)
    assert logits.shape == (3, 7)
    if family == "vit-cls":
        assert wrapped.pool == "own" and wrapped.get_classifier() is model.classifier
        return
    tokens, head = out.last_hidden_state, wrapped.head
    feature = {"vit": lambda: tokens[:, 0], "clip": lambda: tokens[:, 1:].mean(1), "siglip": lambda: tokens.mean(1),
               "clip-projection": lambda: out.image_embeds, "swin": lambda: out.pooler_output.flatten(1),
               "dinov2": lambda: torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], -1),
               "dinov2-registers": lambda: torch.cat([tokens[:, 0], tokens[:, 3:].mean(1)], -1)}[family]()
    with torch.no_grad():
        assert torch.allclose(logits, head(feature), atol=1e-6)


def test_adapter_round_trip_records_library_and_head(tmp_path, one_thread):
    from arcvit.backends.transformers import TransformersClassifier
    model = TransformersClassifier(build("dinov2"), num_classes=4)
    arcvit.apply_arc(model, ARCConfig(rank=RANK))
    perturb_trainable(model)
    arcvit.save_adapter(model, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert meta["backbone"]["library"] == "transformers" and meta["backbone"]["class"] == "Dinov2Model"
    assert meta["backbone"]["head"] == "cls+patch_mean"
    fresh = TransformersClassifier(build("dinov2"), num_classes=4)
    arcvit.load_adapter(fresh, tmp_path / "a")
    x = images()
    with torch.no_grad():
        assert torch.equal(model.eval()(x), fresh.eval()(x))


# --- one conversion test: timm's ViT and transformers' ViT hold the same weights in different layouts ---

def timm_to_transformers(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """timm VisionTransformer (fused qkv) -> ViTForImageClassification (separate q/k/v)."""
    out = {"vit.embeddings.cls_token": state["cls_token"], "vit.embeddings.position_embeddings": state["pos_embed"],
           "vit.embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
           "vit.embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
           "vit.layernorm.weight": state["norm.weight"], "vit.layernorm.bias": state["norm.bias"],
           "classifier.weight": state["head.weight"], "classifier.bias": state["head.bias"]}
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"vit.layers.{i}."
        for kind in ("weight", "bias"):
            for q, name in zip(state[src + f"attn.qkv.{kind}"].chunk(3), ("q_proj", "k_proj", "v_proj")):
                out[dst + f"attention.{name}.{kind}"] = q
            pairs = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj",
                     "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
            for a, b in pairs.items():
                out[dst + f"{b}.{kind}"] = state[src + f"{a}.{kind}"]
    return out


def test_timm_and_transformers_vit_agree_before_and_after_arc(tmp_path, one_thread):
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2,
                            num_classes=5).eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf = T.ViTForImageClassification(T.ViTConfig(**SMALL, intermediate_size=64, num_labels=5,
                                                 layer_norm_eps=1e-6, hidden_act="gelu")).eval()
    missing, unexpected = hf.load_state_dict(timm_to_transformers(vit.state_dict(), 2), strict=False)
    assert not missing and not unexpected
    x = images()
    with torch.no_grad():
        assert torch.allclose(vit(x), hf(pixel_values=x).logits, atol=1e-5)

    arcvit.apply_arc(vit, ARCConfig(rank=RANK))
    arcvit.apply_arc(hf, ARCConfig(rank=RANK))
    perturb_trainable(vit)
    arcvit.save_adapter(vit, tmp_path / "timm")
    tensors = read_adapter(tmp_path / "timm").tensors
    with torch.no_grad():  # the same adapter tensors, under the library-independent file names
        for key, param in adapter_tensors(hf, "default").items():
            param.copy_(tensors[key])
        hf.classifier.weight.copy_(vit.head.weight), hf.classifier.bias.copy_(vit.head.bias)
    with torch.no_grad():
        assert torch.allclose(vit(x), hf(pixel_values=x).logits, atol=1e-5)
    with pytest.raises(AdapterFileError, match="timm"):  # the fingerprint rules hold across libraries
        arcvit.load_adapter(T.ViTForImageClassification(hf.config), tmp_path / "timm")


# --- the command line on a local save_pretrained folder ---

@pytest.mark.slow  # seven `arcvit` processes: ~1 min on two busy cores
def test_cli_trains_evaluates_merges_and_predicts(tiny_data, arcvit_cli, tmp_path):
    folder = tmp_path / "vit"
    T.ViTModel(T.ViTConfig(**SMALL, intermediate_size=64), add_pooling_layer=False).save_pretrained(folder)
    T.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    backbone = ["--backbone", f"transformers:{folder}"]
    data = ["--data", str(tiny_data), "--task", TINY_TASK]
    run = arcvit_cli("train", *backbone, *data, "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "16",
                     "--rank", "8", "--accelerator", "cpu", "--quiet", "--out", tmp_path / "run")
    assert run.returncode == 0, run.stderr[-2000:]
    adapter = tmp_path / "run" / "adapter"
    identity = json.loads((adapter / "adapter_config.json").read_text())["backbone"]
    assert (identity["library"], identity["class"], identity["head"]) == ("transformers", "ViTModel", "cls")

    evaluated = arcvit_cli("eval", *backbone, "--adapter", adapter, *data)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    merged = arcvit_cli("merge", *backbone, "--adapter", adapter, "--out", tmp_path / "merged.safetensors")
    assert merged.returncode == 0, merged.stderr[-2000:]
    assert json.loads(merged.stdout)["max_abs_logit_diff"] < 1e-4
    again = arcvit_cli("eval", "--merged", tmp_path / "merged.safetensors", *data)
    assert again.returncode == 0 and json.loads(again.stdout)["top1"] == json.loads(evaluated.stdout)["top1"]
    image = next((tiny_data / TINY_TASK).rglob("*.png"))
    predicted = [arcvit_cli("predict", *source, image) for source in
                 (["--merged", tmp_path / "merged.safetensors"], [*backbone, "--adapter", adapter])]
    assert all(p.returncode == 0 for p in predicted), predicted[0].stderr[-2000:]
    assert json.loads(predicted[0].stdout)["label"] == json.loads(predicted[1].stdout)["label"]

    refused = arcvit_cli("eval", "--adapter", adapter, *data)  # the default timm backbone
    assert refused.returncode == 1 and "transformers" in refused.stderr and "Traceback" not in refused.stderr


def test_missing_transformers_names_the_extra(monkeypatch):
    import sys

    from arcvit.backends import create_backbone
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    for name in [n for n in sys.modules if n.startswith("arcvit.backends.transformers")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(MissingExtra, match=r"^a transformers backbone needs the 'transformers' extra: pip install"):
        create_backbone("transformers:google/vit-base-patch16-224", 10)


def test_hub_id_offline_fails_fast_and_clearly(monkeypatch):
    from huggingface_hub import constants

    from arcvit.backends import create_backbone
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="Offline.*save_pretrained"):
        create_backbone("transformers:nobody/not-cached-here", 10)


def test_multitask_serves_transformers_tasks_in_one_mixed_batch(tmp_path, one_thread):
    """Two tasks with different class counts on one HF ViT: a mixed batch gives each image its own task's
    logits, as that task's own adapted model does."""
    from arcvit.backends.transformers import TransformersClassifier
    from arcvit.serving import MultiTask
    own = {}
    for task, classes, seed in (("a", 3, 1), ("b", 5, 2)):
        model = TransformersClassifier(build("vit"), num_classes=classes)
        arcvit.apply_arc(model, ARCConfig(rank=RANK, dropout=0.0, zero_head=False))
        perturb_trainable(model, seed)
        arcvit.save_adapter(model, tmp_path / task)
        own[task] = model.eval()
    served = MultiTask(TransformersClassifier(build("vit"), num_classes=0))
    for task in own:
        served.add(task, tmp_path / task)
    x, tasks = images(4), ["a", "b", "b", "a"]
    with torch.no_grad():
        logits = served.predict(x, tasks)
        for i, task in enumerate(tasks):
            torch.testing.assert_close(logits[i], own[task](x[i:i + 1])[0], rtol=1e-5, atol=1e-5)
    assert [len(t) for t in logits] == [3, 5, 5, 3]
