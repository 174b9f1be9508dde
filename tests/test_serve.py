"""MultiTask: many tasks on one frozen backbone, one backbone pass per mixed batch, exactly each task's own model.

For ViT and Swin: tasks with different class counts, both ARC modes and different ranks, mixed in one batch,
give each image its own task's logits as that task's adapted model and its merged model do (1e-5 relative);
tasks load, reload and unload; a corrupt or foreign adapter is refused while the loaded tasks keep serving.
"""
from __future__ import annotations

import functools
import re
import shutil

import pytest
import timm
import torch

import arcvit
from arcvit.errors import AdapterFileError, ArcvitError
from arcvit.serving import MultiTask

torch.set_num_threads(1)

VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2)
SWIN = dict(img_size=56, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=7, drop_path_rate=0.0)
FAMILIES = {"vit": ("vit_tiny_patch16_224", VIT, 32), "swin": ("swin_tiny_patch4_window7_224", SWIN, 56)}
# name -> (classes, mode, rank)
TASKS = {"a": (3, "arc", 4), "b": (7, "arc_att", 8), "c.v2": (5, "arc", 2), "d": (11, "arc", 8)}


@functools.cache
def _frozen_weights(family: str) -> dict[str, torch.Tensor]:
    name, kwargs, _ = FAMILIES[family]
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=0, **kwargs).state_dict()


def backbone(family: str, num_classes: int = 0) -> torch.nn.Module:
    """The same frozen weights every time (adapters check the backbone's fingerprint), a random head."""
    name, kwargs, _ = FAMILIES[family]
    model = timm.create_model(name, num_classes=num_classes, **kwargs).eval()
    missing, unexpected = model.load_state_dict(_frozen_weights(family), strict=False)
    assert not unexpected and all(k.startswith("head") for k in missing)
    return model


def write_task(family: str, folder, classes: int, mode: str, rank: int, seed: int) -> None:
    model = backbone(family, classes)
    arcvit.apply_arc(model, arcvit.ARCConfig(rank=rank, mode=mode, dropout=0.0))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # random adapters (not the identity they start as) and heads
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    arcvit.save_adapter(model, folder)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_tasks(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    for seed, (name, (classes, mode, rank)) in enumerate(TASKS.items()):
        write_task(request.param, root / name, classes, mode, rank, seed)
    return request.param, root


def own_models(family: str, folder) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The task's adapted model and its merged model, built the single-task way."""
    classes = arcvit.core.adapter_file.read_adapter_config(folder)["num_classes"]
    adapted = arcvit.load_adapter(backbone(family, classes), folder).eval()
    return adapted, arcvit.merge(adapted).eval()


def images(family: str, count: int) -> torch.Tensor:
    size = FAMILIES[family][2]
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(7))


def loaded(family: str, root) -> MultiTask:
    multi = MultiTask(backbone(family))
    for name in TASKS:
        multi.add(name, root / name)
    return multi


def assert_exact(family, root, multi, x, tasks):
    out = multi.predict(x, tasks)
    assert len(out) == len(tasks)
    for name in set(tasks):
        index = [i for i, t in enumerate(tasks) if t == name]
        adapted, merged = own_models(family, root / name)
        with torch.no_grad():
            for reference in (adapted(x[index]), merged(x[index])):
                torch.testing.assert_close(torch.stack([out[i] for i in index]), reference, rtol=1e-5, atol=1e-5)


def test_a_mixed_batch_is_each_tasks_own_model(family_tasks):
    family, root = family_tasks
    multi = loaded(family, root)
    tasks = ["a", "b", "c.v2", "d", "b", "a", "d", "d", "c.v2"]
    assert_exact(family, root, multi, images(family, len(tasks)), tasks)
    assert [len(o) for o in multi.predict(images(family, 4), ["d", "a", "b", "c.v2"])] == [11, 3, 7, 5]


def test_one_backbone_pass_per_mixed_batch(family_tasks):
    family, root = family_tasks
    multi = loaded(family, root)
    calls = []
    handle = multi.backbone.patch_embed.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[0]))
    multi.predict(images(family, 6), ["a", "b", "c.v2", "d", "a", "b"])
    handle.remove()
    assert calls == [6]


def test_merged_fast_path_is_exact_too(family_tasks):
    family, root = family_tasks
    multi = loaded(family, root)
    multi.set_merged("b")
    tasks = ["b", "a", "b", "d", "b"]
    assert_exact(family, root, multi, images(family, len(tasks)), tasks)
    assert_exact(family, root, multi, images(family, 2), ["b", "b"])


def test_add_remove_reload(family_tasks, tmp_path):
    family, root = family_tasks
    multi = loaded(family, root)
    size = sum(p.numel() for p in multi.backbone.parameters())
    multi.remove("b")
    assert list(multi.tasks) == ["a", "c.v2", "d"]
    with pytest.raises(ArcvitError, match="not loaded"):
        multi.predict(images(family, 1), ["b"])
    with pytest.raises(ArcvitError, match="not loaded"):
        multi.remove("b")
    multi.add("b", root / "b")
    assert sum(p.numel() for p in multi.backbone.parameters()) == size  # nothing left behind by the removal
    # Reload "a" from another folder (another class count, mode and rank): the new version serves at once.
    write_task(family, tmp_path / "a2", 6, "arc_att", 3, seed=99)
    info = multi.add("a", tmp_path / "a2")
    assert (info.num_classes, info.method, info.rank) == (6, "ARC_att", 3)
    assert sum(p.numel() for p in multi.backbone.parameters()) != size
    tasks = ["a", "b", "a", "d"]
    out = multi.predict(images(family, 4), tasks)
    adapted, _ = own_models(family, tmp_path / "a2")
    with torch.no_grad():
        torch.testing.assert_close(torch.stack([out[0], out[2]]), adapted(images(family, 4)[[0, 2]]),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("damage,message", [
    ("truncate", r"adapter\.safetensors: checksum does not match adapter_config\.json \(truncated or corrupt file\)$"),
    ("flip", r"adapter\.safetensors: checksum does not match adapter_config\.json"),
    ("config", r"adapter_config\.json: not valid JSON"),
    ("other_backbone", "bad: the backbone weights differ from those the adapter was trained on"),
    ("missing", r"adapter\.safetensors: missing$"),
])
def test_a_bad_adapter_is_refused_and_the_others_keep_serving(family_tasks, tmp_path, damage, message):
    family, root = family_tasks
    multi = loaded(family, root)
    x, tasks = images(family, 4), ["a", "b", "c.v2", "d"]
    before = multi.predict(x, tasks)
    bad = tmp_path / "bad"
    shutil.copytree(root / "a", bad)
    weights, config = bad / "adapter.safetensors", bad / "adapter_config.json"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-64])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[-10] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "config":
        config.write_text("{not json")
    elif damage == "other_backbone":
        model = backbone(family, 3)
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
        arcvit.apply_arc(model, arcvit.ARCConfig(rank=4))
        arcvit.save_adapter(model, bad)
    else:
        weights.unlink()
    for name in ("a", "new"):  # neither a reload nor a new task gets through
        with pytest.raises(AdapterFileError, match=message):
            multi.add(name, bad)
    assert list(multi.tasks) == list(TASKS)
    for got, want in zip(multi.predict(x, tasks), before):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_memory_added_per_task_is_the_adapter_and_head(family_tasks):
    family, root = family_tasks
    multi = MultiTask(backbone(family))
    size = sum(t.numel() for m in multi.holdings() for t in m.parameters())
    multi.add("d", root / "d")
    added = sum(t.numel() for m in multi.holdings() for t in m.parameters()) - size
    source = arcvit.load_adapter(backbone(family, 11), root / "d")
    assert added == sum(p.numel() for p in source.parameters() if p.requires_grad)


def test_task_names_are_plain_folder_names(family_tasks):
    family, root = family_tasks
    multi = MultiTask(backbone(family))
    for name in ("../a", "all", "", ".hidden", "a/b"):
        with pytest.raises(ArcvitError, match=f"^task name {re.escape(repr(name))}: use letters, digits"):
            multi.add(name, root / "a")
    assert multi.tasks == {}
