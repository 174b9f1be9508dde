"""ARC's mergeable peers (SSF, RepAdapter, FacT-TT/TK, RLRR, DoRA) against their papers' formulas, written here
independently of arcvit's modules: forward, exact merge, parameter counts (the papers' ViT-B/16 figures
included), what trains, save/load, refusals; and the search-range edge flag of ``arcvit tune`` and the bench.
"""
from __future__ import annotations

import copy
import csv
import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import BACKBONE, TINY_TASK
from safetensors.torch import load_file

import arcvit
from arcvit.cli import main
from arcvit.errors import ModelError
from arcvit.fileio import write_safetensors
from arcvit.methods import SPECS, merge_for_inference, prepare_model, trainable_state_dict
from arcvit.methods.describe import describe_backbone
from arcvit.training.search_space import Range, at_edges, load_search_space

D, L, C = 32, 2, 5
HEAD = D * C + C
NEW = ("ssf", "repadapter", "fact_tt", "fact_tk", "rlrr", "dora")
RANKS = {"repadapter": 4, "fact_tt": 4, "fact_tk": 4, "dora": 2}
# Trainable parameters of the tiny ViT below, from the papers' definitions (r: the method's rank)
COUNTS = {
    "ssf": lambda r: (L * 22 + 4) * D + HEAD,           # per block 2 x (norm1, qkv 3D, proj, norm2, fc1 4D, fc2)
    "repadapter": lambda r: 2 * L * (D * r + r + D * r // 2 + D) + HEAD,  # down (D r + r), grouped up (D r/2 + D)
    "fact_tt": lambda r: 2 * D * r + 12 * L * r * r + HEAD,               # U, V; an r x r core per d x d slice
    "fact_tk": lambda r: 2 * D * r + 12 * L * r + r ** 3 + HEAD,          # U, V; P (r x slices), C (r x r x r)
    "rlrr": lambda r: (L * 31 + 4) * D + HEAD,  # per block: linears 27 D (s_out, s_in per chunk, shift), norms 4 D
    "dora": lambda r: L * (r * (D + 3 * D) + r * (D + 4 * D) + 3 * D + 4 * D) + HEAD,  # LoRA + magnitudes
}
VTAB_CLASSES = (100, 102, 47, 102, 37, 10, 397, 2, 10, 45, 5, 8, 6, 6, 4, 16, 16, 18, 9)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=L, embed_dim=D,
                              num_heads=2, num_classes=C)
    with torch.no_grad():  # non-trivial norms and biases
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def tiny_swin() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", img_size=32, patch_size=4, window_size=4,
                             embed_dim=16, depths=(1, 1), num_heads=(1, 2), num_classes=C).eval()


def prepared(method: str, backbone: torch.nn.Module | None = None, seed: int = 1) -> torch.nn.Module:
    """``method`` on a copy of the backbone, every trained tensor perturbed (so zero-initialised parts count)."""
    model = prepare_model(copy.deepcopy(backbone or tiny_vit()), method, rank=RANKS.get(method))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    return bool((a - b).abs().max() <= rel * b.abs().max())


# ---- the papers' formulas, applied by hooks on an untouched copy of the backbone ----

def _scale_shift(scale, shift):
    def hook(module, args, out):
        view = (-1, 1, 1) if isinstance(module, torch.nn.Conv2d) else (-1,)
        return out * scale.view(view) + (0 if shift is None else shift.view(view))
    return hook


def _replace_linear(weight, bias):
    return lambda module, args, out: F.linear(args[0], weight, bias)


def _ssf(base, p, attr="ssf"):
    for name, module in base.named_modules():
        if f"{name}.{attr}.scale" in p:
            module.register_forward_hook(_scale_shift(p[f"{name}.{attr}.scale"], p.get(f"{name}.{attr}.shift")))


def _rlrr(base, p):
    _ssf(base, p, "rlrr")
    for name, linear in base.named_modules():
        if f"{name}.rlrr.scale_out" in p:  # W + W * (s_line s_col) for each of q, k, v (or the one Linear)
            s_out, s_in = p[f"{name}.rlrr.scale_out"], p[f"{name}.rlrr.scale_in"]
            rows = linear.weight.shape[0] // s_in.shape[0]
            parts = [w + w * torch.outer(s_out[i * rows:(i + 1) * rows], s_in[i])
                     for i, w in enumerate(linear.weight.split(rows))]
            linear.register_forward_hook(_replace_linear(torch.cat(parts), linear.bias + p[f"{name}.rlrr.shift"]))


def _repadapter(base, p):
    def hook(prefix):  # the paper's form: 1x1 convolutions over the token axis, the second one grouped
        def adapt(module, args):
            x = args[0].transpose(1, 2)
            a = F.conv1d(x, p[f"{prefix}.down.weight"].unsqueeze(-1), p[f"{prefix}.down.bias"])
            b = F.conv1d(a, p[f"{prefix}.up_weight"].unsqueeze(-1), p[f"{prefix}.up_bias"], groups=2)
            return ((x + b).transpose(1, 2),)
        return adapt
    for i, block in enumerate(base.blocks):
        block.attn.register_forward_pre_hook(hook(f"blocks.{i}.attn.repadapter"))
        block.mlp.register_forward_pre_hook(hook(f"blocks.{i}.mlp.repadapter"))


def _fact(base, p, method):
    """Per block, the paper's slice order: q, k, v, proj, fc1's four output chunks, fc2's four input chunks."""
    u, v = p["fact.u"], p["fact.v"]
    for i, block in enumerate(base.blocks):
        grids = {"attn.qkv": (3, 1), "attn.proj": (1, 1), "mlp.fc1": (4, 1), "mlp.fc2": (1, 4)}
        index = 12 * i
        for name, (rows, cols) in grids.items():
            linear = block.get_submodule(name)
            delta = torch.zeros_like(linear.weight)
            for a in range(rows):
                for b in range(cols):
                    if method == "fact_tt":
                        core = p[f"blocks.{i}.{name}.fact_tt.cores"][a, b]
                    else:  # Tucker: C x_3 p_k
                        core = sum(p["fact.core"][:, :, j] * p["fact.p"][j, index] for j in range(u.shape[0]))
                    delta[a * D:(a + 1) * D, b * D:(b + 1) * D] = v @ core @ u
                    index += 1
            linear.register_forward_hook(_replace_linear(linear.weight + delta, linear.bias))


def _dora(base, p):
    """m * (W + B A) / ||W + B A|| (row norms), alpha = r."""
    for name, linear in base.named_modules():
        if f"{name}.lora_A.default.weight" in p:
            weight = linear.weight + p[f"{name}.lora_B.default.weight"] @ p[f"{name}.lora_A.default.weight"]
            weight = p[f"{name}.lora_magnitude_vector.default.weight"][:, None] * weight / weight.norm(dim=1,
                                                                                                    keepdim=True)
            linear.register_forward_hook(_replace_linear(weight, linear.bias))


REFERENCES = {"ssf": _ssf, "rlrr": _rlrr, "repadapter": _repadapter, "fact_tt": lambda b, p: _fact(b, p, "fact_tt"),
              "fact_tk": lambda b, p: _fact(b, p, "fact_tk"), "dora": _dora}


def reference_logits(method: str, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    base = tiny_vit()
    inner = model.get_base_model() if method == "dora" else model
    p = {n: t.detach() for n, t in inner.named_parameters()}
    head = "head.modules_to_save.default" if method == "dora" else "head"
    base.head.load_state_dict({"weight": p[f"{head}.weight"], "bias": p[f"{head}.bias"]})
    REFERENCES[method](base, p)
    with torch.no_grad():
        return base(x)


@pytest.mark.parametrize("method", NEW)
def test_forward_is_the_papers_formula_and_merges_exactly(method):
    model, x = prepared(method), images()
    with torch.no_grad():
        logits = model(x)
    assert close(logits, reference_logits(method, model, x))
    merged = merge_for_inference(model, method).eval()
    assert type(merged) is type(tiny_vit()) and list(merged.state_dict()) == list(tiny_vit().state_dict())
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in merged.modules())
    with torch.no_grad():
        assert close(merged(x), logits)
        assert torch.equal(model(x), logits)  # the trained model is left as it was


@pytest.mark.parametrize("method", NEW)
def test_counts_match_the_formula_and_only_the_method_trains(method):
    model = prepare_model(tiny_vit(), method, rank=RANKS.get(method))
    assert arcvit.trainable_parameters(model) == COUNTS[method](RANKS.get(method))
    marks = {"ssf": ".ssf.", "rlrr": ".rlrr.", "repadapter": ".repadapter.", "fact_tt": "fact", "fact_tk": "fact",
             "dora": "lora_"}
    for name, p in model.named_parameters():
        assert p.requires_grad == (marks[method] in name or "head" in name and "original_module" not in name), name


def test_vit_b16_counts_are_the_papers():
    """Adapter parameters on ViT-B/16 (meta device, nothing downloaded); the papers' figures average the head
    over the 19 VTAB-1k tasks (SSF, RLRR) or leave it out (FacT, RepAdapter: weights only)."""
    def adapter(method, rank=None):
        return describe_backbone("vit_base_patch16_224", 100, method, rank)["adapter_params"]
    head = sum(768 * c + c for c in VTAB_CLASSES) / len(VTAB_CLASSES)
    ssf, rlrr, repadapter = adapter("ssf"), adapter("rlrr"), adapter("repadapter")
    assert (ssf, round((ssf + head) / 1e6, 2)) == (205_824, 0.24)    # SSF: 0.24M
    assert (rlrr, round((rlrr + head) / 1e6, 2)) == (288_768, 0.33)  # RLRR: 0.33M
    assert repadapter == 24 * (768 * 8 + 8 + 768 * 4 + 768) == 239_808
    assert round(24 * (768 * 8 + 768 * 4) / 1e6, 2) == 0.22          # RepAdapter: 0.22M, its two weights
    tk = {r: adapter("fact_tk", r) for r in (16, 32)}                 # FacT-TK: 0.069M over the paper's ranks
    tt = {r: adapter("fact_tt", r) for r in (4, 8, 16)}               # FacT-TT: 0.040M
    assert tk[32] == 2 * 768 * 32 + 144 * 32 + 32 ** 3 and tt[8] == 2 * 768 * 8 + 144 * 8 * 8
    assert round((13 * tk[32] + 6 * tk[16]) / 19 / 1e6, 3) == 0.069
    assert round((9 * tt[16] + 9 * tt[8] + tt[4]) / 19 / 1e6, 3) == 0.040
    lora, dora = adapter("lora"), adapter("dora")
    assert dora - lora == 12 * (3 * 768 + 4 * 768)


@pytest.mark.parametrize("method", NEW)
def test_saved_weights_restore_the_model(method, tmp_path):
    model, x = prepared(method), images()
    write_safetensors(tmp_path / "trainable.safetensors", trainable_state_dict(model))
    torch.manual_seed(7)  # another initialisation, all of it overwritten by the file
    restored = prepare_model(tiny_vit(), method, rank=RANKS.get(method)).eval()
    missing, unexpected = restored.load_state_dict(load_file(tmp_path / "trainable.safetensors"), strict=False)
    assert not unexpected and set(missing).isdisjoint(n for n, p in restored.named_parameters() if p.requires_grad)
    with torch.no_grad():
        assert torch.equal(restored(x), model(x))


@pytest.mark.parametrize("method", ["ssf", "repadapter", "rlrr", "dora"])
def test_swin_merges_exactly(method):
    model, x = prepared(method, tiny_swin()), torch.randn(2, 3, 32, 32)
    merged = merge_for_inference(model, method).eval()
    assert list(merged.state_dict()) == list(tiny_swin().state_dict())
    with torch.no_grad():
        assert close(merged(x), model(x))


@pytest.mark.parametrize("method", ["fact_tt", "fact_tk"])
def test_fact_refuses_a_model_of_several_widths_in_one_line(method, capsys):
    with pytest.raises(ModelError, match=f"{method} factorises one d x d weight tensor.*widths 16, 32"):
        prepare_model(tiny_swin(), method)
    assert main(["params", "--backbone", "swin_tiny_patch4_window7_224", "--method", method]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"arcvit params: error: {method} factorises")


@pytest.mark.parametrize("argv, message", [
    (["--backbone", "resnet18", "--method", "ssf"], "ssf: ResNet is not supported"),
    (["--method", "repadapter", "--rank", "5"], "repadapter: rank (5) and width (768) must be multiples"),
    (["--method", "rlrr", "--rank", "4"], "rlrr has no rank or dropout to set"),
    (["--method", "fact_tt", "--rank", "769"], "rank 769 exceeds the model's width 768: fact_tt"),
    (["--method", "fact_tk", "--rank", "4096"], "rank 4096 exceeds the model's width 768: fact_tk"),
    (["--method", "repadapter", "--rank", "1024"], "rank 1024 exceeds the model's width 768: RepAdapter"),
])
def test_params_refuses_in_one_line(argv, message, capsys):
    assert main(["params", "--backbone", "vit_base_patch16_224", *argv]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"arcvit params: error: {message}")


@pytest.mark.parametrize("method", ["ssf", "rlrr", "repadapter", "fact_tk"])
def test_a_model_without_transformer_blocks_is_refused(method):
    model = timm.create_model("resnet10t", num_classes=C)
    with pytest.raises(ModelError, match=f"^{method}: ResNet is not supported") as e:
        prepare_model(model, method)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("method", ["ssf", "fact_tk", "rlrr", "dora", "lora"])
def test_an_attention_that_bypasses_its_qkv_linear_is_refused(method):
    """timm's BEiT computes F.linear(x, qkv.weight, ...): a hook or PEFT wrapper on qkv would never run in
    training, yet the merge would fold it in. RepAdapter, on the attention's input, is exact there."""
    beit = timm.create_model("beit_base_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=D, num_heads=2,
                             num_classes=C).eval()
    with pytest.raises(ModelError, match=f"^{method}: Beit's attention \\(blocks.0.attn\\) reads its qkv weight"):
        prepare_model(copy.deepcopy(beit), method)
    model, x = prepared("repadapter", beit), images()
    with torch.no_grad():
        assert close(merge_for_inference(model, "repadapter")(x), model(x))


def test_merging_with_another_method_is_refused():
    with pytest.raises(ModelError, match="rlrr: expected a model prepared with rlrr.*carrying ssf"):
        merge_for_inference(prepared("ssf"), "rlrr")
    with pytest.raises(ModelError, match="fact_tk: expected a model prepared with fact_tk"):
        merge_for_inference(prepared("fact_tt"), "fact_tk")
    with pytest.raises(ModelError, match="dora: expected the PEFT model"):
        merge_for_inference(prepare_model(tiny_vit(), "lora"), "dora")


def test_transformers_vit_merges_exactly():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                                    patch_size=8, intermediate_size=128, num_labels=C)
    torch.manual_seed(0)
    base = transformers.ViTForImageClassification(config).eval()
    x = images()
    for method in ("ssf", "repadapter", "fact_tk", "rlrr"):
        model = prepared(method, base)
        merged = merge_for_inference(model, method).eval()
        assert list(merged.state_dict()) == list(base.state_dict())
        with torch.no_grad():
            assert close(merged(x).logits, model(x).logits), method


# ---- one learning-rate range, and the flag for a value at the edge of its range ----

def test_every_parameter_efficient_method_searches_one_lr_range():
    lrs = {m: load_search_space(m).ranges["lr"] for m in SPECS if m != "full"}
    assert len(set(lrs.values())) == 1 and lrs["lora"].high == lrs["arc"].high == 0.1


@pytest.mark.parametrize("r, value, edge", [
    (Range("lr", 1e-4, 1e-1, log=True), 0.1, "high"),
    (Range("lr", 1e-4, 1e-1, log=True), 0.071, "high"),   # 95.1 % of the log width
    (Range("lr", 1e-4, 1e-1, log=True), 0.06, None),      # 92.6 %: a linear scale would call it an edge
    (Range("lr", 1e-4, 1e-1, log=True), 1.4e-4, "low"),
    (Range("drop_path", 0.0, 0.2), 0.195, "high"),
    (Range("drop_path", 0.0, 0.2), 0.1, None),
    (Range("rank", 4, 64, log=True), 4, "low"),
    (Range("rank", choices=(4, 8, 16)), 16, "high"),
    (Range("rank", choices=(4, 8, 16)), 8, None),
    (Range("rank", choices=(4, 8)), 8, None),             # two choices: every draw is an end
])
def test_range_edges(r, value, edge):
    assert r.edge(value) == edge


def test_a_study_whose_best_lr_is_at_the_edge_is_flagged(tiny_data, tmp_path, monkeypatch):
    """A search (train faked: a higher lr scores higher) with one trial queued at the top of the lr range: its
    row in trials.csv, best.toml, the summary and the bench report's tuned-settings table say so."""
    from arcvit.bench.report import PLAN_FILE, build_report
    from arcvit.training import tune as tuning
    from arcvit.training.config import DataSpec

    def fake_train(backbone, data, cfg, out, *, on_epoch_end, evaluate_test, **kw):
        return {"val_top1": cfg.lr, "selected_epoch": 1, "trainable_params": 1}
    monkeypatch.setattr(tuning, "train", fake_train)
    study_dir = tmp_path / "study"
    job = tuning.make_job(BACKBONE, DataSpec(str(tiny_data), TINY_TASK), "lora", 2, study_dir,
                          fixed={"epochs": 1, "warmup_epochs": 0, "weight_decay": 0.0, "label_smoothing": 0.0,
                                 "drop_path": 0.0, "adapter_dropout": 0.0, "rank": 4}, pretrained=False)
    top = job.space.ranges["lr"].high
    tuning.open_study(job).enqueue_trial({"lr": top})
    summary = tuning.tune(job, resume=True, progress=False)
    assert summary["best_settings"]["lr"] == top and summary["at_edge"] == {"lr": "high"}
    with open(study_dir / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["at_edge"] == "lr (high)" and float(rows[0]["lr"]) == top
    assert "AT THE EDGE of its search range (within 5 %): lr (high)" in (study_dir / "best.toml").read_text()

    bench = tmp_path / "bench"
    bench.mkdir()
    record = {"trials": 2, "best_trial": 0, "val_top1": top, "settings": {"lr": top}, "at_edge": summary["at_edge"],
              "study": "tune/shapes_count/lora"}
    plan = {"suite": "mini", "tasks": ["shapes_count"], "methods": ["lora"], "seeds": [0],
            "tuning": {"trials": 2, "search_space": "packaged", "tuned": {"shapes_count": {"lora": record}}}}
    (bench / PLAN_FILE).write_text(json.dumps(plan))
    build_report(bench)
    assert "| shapes_count | lora | lr=0.1 | **lr (high)** |" in (bench / "report.md").read_text()
    del record["at_edge"]  # a study tuned before arcvit recorded edges: not shown as "none at an edge"
    (bench / PLAN_FILE).write_text(json.dumps(plan))
    build_report(bench, force=True)
    assert "| shapes_count | lora | lr=0.1 | not recorded |" in (bench / "report.md").read_text()


def test_every_new_method_can_be_tuned(tiny_data, tmp_path):
    """Its packaged search space is valid and the method builds at every corner of it (make_job's checks)."""
    from arcvit.training.config import DataSpec
    from arcvit.training.tune import make_job
    for method in NEW:
        job = make_job(BACKBONE, DataSpec(str(tiny_data), TINY_TASK), method, 2, tmp_path / method, pretrained=False)
        assert job.space.ranges["lr"] == load_search_space("arc").ranges["lr"]
        assert ("rank" in job.space.ranges) == (SPECS[method].default_rank is not None)


def test_log_edge_is_measured_on_the_log_width():
    r = Range("lr", 1e-4, 1e-1, log=True)
    inside = math.exp(math.log(1e-4) + 0.06 * math.log(1e3))
    assert at_edges({"lr": r}, {"lr": inside}) == {} and at_edges({"lr": r}, {"lr": 1e-4}) == {"lr": "low"}
