"""Where ARC goes in each timm model family, and which weights an adapter folds into when merged.

A *site* is the normalised input of a block's attention or MLP. Its *readers* are the Linear layers that
consume that input; merging rewrites each reader as ``W' = W (I + D diag(c) D^T)`` and adds ``W b`` to the
reader's bias. Families differ in how the readers are laid out (fused qkv, split q/v biases, SwiGLU, gates).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
from timm.layers import Attention as VitAttention
from timm.models.beit import Attention as BeitAttention
from timm.models.beit import Block as BeitBlock
from timm.models.eva import EvaAttention, EvaBlock
from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention
from timm.models.vision_transformer import Block as VitBlock

from arcvit.errors import ModelError

SUPPORTED_BLOCKS = (VitBlock, BeitBlock, EvaBlock, SwinTransformerBlock)


@dataclass
class BiasSlot:
    """Rows ``start:stop`` of a reader's output and where their bias lives (``owner.name``, from row 0).

    ``owner`` is None where the model has no bias for those rows. That is exact only for attention keys:
    a constant added to every key shifts each query's logits by one constant, which softmax ignores.
    """

    start: int
    stop: int
    owner: nn.Module | None
    name: str | None = None
    is_key: bool = False

    def bias_view(self):
        """The bias rows for this slot (a view into the owner's parameter)."""
        bias = getattr(self.owner, self.name)
        return bias if bias.numel() == self.stop - self.start else bias[self.start:self.stop]


@dataclass
class Reader:
    linear: nn.Linear
    slots: list[BiasSlot]


@dataclass
class Site:
    block_index: int
    block_name: str
    stage: int
    position: str           # "att" or "mlp"
    parent: nn.Module       # the module whose attribute ``attr`` is wrapped
    attr: str
    dim: int
    single_linear: bool     # the wrapped module is the site's only reader (an nn.Linear)


def _own_bias(linear: nn.Linear, start: int = 0) -> list[BiasSlot]:
    return [BiasSlot(start, linear.out_features, linear if linear.bias is not None else None, "bias")]


def _fused_qkv_slots(qkv: nn.Linear, q_owner: nn.Module | None, v_owner: nn.Module | None,
                     q_name: str, v_name: str) -> list[BiasSlot]:
    third = qkv.out_features // 3
    return [BiasSlot(0, third, q_owner, q_name), BiasSlot(third, 2 * third, None, is_key=True),
            BiasSlot(2 * third, 3 * third, v_owner, v_name)]


def readers(module: nn.Module) -> list[Reader]:
    """The Linear layers that read the input of an attention or MLP module, with their bias slots."""
    if isinstance(module, nn.Linear):
        return [Reader(module, _own_bias(module))]
    found: list[Reader] = []
    if isinstance(module, (VitAttention, WindowAttention)):
        qkv = module.qkv
        slots = _own_bias(qkv) if qkv.bias is not None else _fused_qkv_slots(qkv, None, None, "", "")
        found.append(Reader(qkv, slots))
    elif isinstance(module, (BeitAttention, EvaAttention)):
        if getattr(module, "qkv", None) is not None:
            has = module.q_bias is not None
            found.append(Reader(module.qkv, _fused_qkv_slots(
                module.qkv, module if has else None, module if has else None, "q_bias", "v_bias")))
        else:
            found.append(Reader(module.q_proj, _own_bias(module.q_proj)))
            found.append(Reader(module.k_proj, [BiasSlot(0, module.k_proj.out_features, module.k_proj
                                                         if module.k_proj.bias is not None else None,
                                                         "bias", is_key=True)]))
            found.append(Reader(module.v_proj, _own_bias(module.v_proj)))
    elif isinstance(getattr(module, "fc1_g", None), nn.Linear):  # SwiGLU: two Linears read the input
        found += [Reader(module.fc1_g, _own_bias(module.fc1_g)), Reader(module.fc1_x, _own_bias(module.fc1_x))]
    elif isinstance(getattr(module, "fc1", None), nn.Linear):   # Mlp, GluMlp
        found.append(Reader(module.fc1, _own_bias(module.fc1)))
    else:
        raise ModelError(f"arcvit does not know where {type(module).__name__} reads its input: expected a "
                         "timm Attention/WindowAttention/EvaAttention/Beit Attention with qkv (or q/k/v_proj), "
                         "or an MLP with fc1 (or fc1_g/fc1_x)")
    gate = getattr(module, "gate", None)
    if isinstance(gate, nn.Linear):
        found.append(Reader(gate, _own_bias(gate)))
    return found


def _is_single_linear_site(module: nn.Module) -> bool:
    """True where one Linear, called as a module, is the only reader: the adapter can wrap that Linear."""
    if isinstance(module, (VitAttention, WindowAttention)):
        return getattr(module, "gate", None) is None
    return not hasattr(module, "fc1_g") and isinstance(getattr(module, "fc1", None), nn.Linear)


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """All pre-norm transformer blocks in forward order as (name, block, stage); a stage is one block list."""
    blocks, stages = [], {}
    for name, module in model.named_modules():
        if isinstance(module, SUPPORTED_BLOCKS):
            container = name.rpartition(".")[0]
            stages.setdefault(container, len(stages))
            blocks.append((name, module, stages[container]))
    if not blocks:
        seen = sorted({type(m).__name__ for m in model.modules() if "block" in type(m).__name__.lower()})
        raise ModelError(
            f"{type(model).__name__} is not supported by ARC: arcvit looks for pre-norm transformer blocks "
            f"({', '.join(c.__module__.rsplit('.', 1)[-1] + '.' + c.__name__ for c in SUPPORTED_BLOCKS)}) "
            f"with norm1 -> attn and norm2 -> mlp" + (f"; found only {', '.join(seen)}" if seen else ""))
    return blocks


def find_sites(model: nn.Module, positions: tuple[str, ...], block_indices: tuple[int, ...] | None) -> list[Site]:
    blocks = find_blocks(model)
    if block_indices is not None and block_indices[-1] >= len(blocks):
        raise ModelError(f"blocks={list(block_indices)} but {type(model).__name__} has {len(blocks)} blocks "
                         f"(indices 0..{len(blocks) - 1})")
    sites = []
    for index, (name, block, stage) in enumerate(blocks):
        if block_indices is not None and index not in block_indices:
            continue
        for position in positions:
            host = block.attn if position == "att" else block.mlp
            if _is_single_linear_site(host):
                attr = "qkv" if position == "att" else "fc1"
                parent, linear = host, getattr(host, attr)
                sites.append(Site(index, name, stage, position, parent, attr, linear.in_features, True))
            else:
                dim = readers(host)[0].linear.in_features
                sites.append(Site(index, name, stage, position, block, "attn" if position == "att" else "mlp",
                                  dim, False))
    return sites


def key_bias_is_invariant(model: nn.Module, attention: nn.Module) -> bool:
    """Whether a bias on the keys leaves the attention output unchanged (no rotary embedding, no key norm)."""
    k_norm = getattr(attention, "k_norm", None)
    return getattr(model, "rope", None) is None and (k_norm is None or isinstance(k_norm, nn.Identity))
