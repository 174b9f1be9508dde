"""timm's transformer block families, as the core's block specs: ViT-family, BEiT, EVA and Swin.

Families differ in how the Linears that read a site are laid out: one fused qkv (ViT, Swin), a fused qkv
with separate q/v biases and no key bias (BEiT, EVA), separate q/k/v projections (EVA), SwiGLU MLPs with two
input Linears (EVA-02), and optional gates.
"""
from __future__ import annotations

import torch.nn as nn
from timm.layers import Attention as VitAttention
from timm.models.beit import Block as BeitBlock
from timm.models.eva import EvaBlock
from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention
from timm.models.vision_transformer import Block as VitBlock

from arcvit.core.specs import EXTRA_PLACES, BiasSlot, BlockSpec, Place, Reader, own_bias, register_block_spec


def _fused_qkv_slots(qkv: nn.Linear, owner: nn.Module | None, q_name: str = "", v_name: str = "") -> list[BiasSlot]:
    third = qkv.out_features // 3
    return [BiasSlot(0, third, owner, q_name), BiasSlot(third, 2 * third, None, is_key=True),
            BiasSlot(2 * third, 3 * third, owner, v_name)]


def _attention_readers(attn: nn.Module) -> list[Reader]:
    if isinstance(attn, (VitAttention, WindowAttention)):
        qkv = attn.qkv
        return [Reader(qkv, own_bias(qkv) if qkv.bias is not None else _fused_qkv_slots(qkv, None))]
    if getattr(attn, "qkv", None) is not None:  # BEiT, EVA: fused qkv, optional separate q/v biases
        owner = attn if attn.q_bias is not None else None
        return [Reader(attn.qkv, _fused_qkv_slots(attn.qkv, owner, "q_bias", "v_bias"))]
    return [Reader(attn.q_proj, own_bias(attn.q_proj)), Reader(attn.k_proj, own_bias(attn.k_proj, is_key=True)),
            Reader(attn.v_proj, own_bias(attn.v_proj))]


def _mlp_readers(mlp: nn.Module) -> list[Reader]:
    if isinstance(getattr(mlp, "fc1_g", None), nn.Linear):  # SwiGLU: two Linears read the input
        return [Reader(mlp.fc1_g, own_bias(mlp.fc1_g)), Reader(mlp.fc1_x, own_bias(mlp.fc1_x))]
    return [Reader(mlp.fc1, own_bias(mlp.fc1))]  # Mlp, GluMlp


OUTPUT_LINEARS = {"proj": "proj", "fc2": "fc2"}  # ARC+'s added positions: the Linear that reads each


def readers(host: nn.Module, position: str) -> list[Reader]:
    if position in OUTPUT_LINEARS:
        linear = getattr(host, OUTPUT_LINEARS[position])
        return [Reader(linear, own_bias(linear))]
    found = _attention_readers(host) if position == "att" else _mlp_readers(host)
    gate = getattr(host, "gate", None)
    return found + [Reader(gate, own_bias(gate))] if isinstance(gate, nn.Linear) else found


def single_linear(host: nn.Module, position: str) -> str | None:
    """``qkv`` of a plain ViT/Swin attention, ``fc1`` of a plain MLP: the only reader, called as a module;
    ``proj`` and ``fc2`` for the added positions."""
    if position in OUTPUT_LINEARS:
        return OUTPUT_LINEARS[position] if isinstance(getattr(host, OUTPUT_LINEARS[position], None), nn.Linear) \
            else None
    if position == "att":
        plain = isinstance(host, (VitAttention, WindowAttention)) and getattr(host, "gate", None) is None
        return "qkv" if plain else None
    plain = not hasattr(host, "fc1_g") and getattr(host, "gate", None) is None
    return "fc1" if plain and isinstance(getattr(host, "fc1", None), nn.Linear) else None


def key_bias_is_invariant(model: nn.Module, attention: nn.Module) -> bool:
    """A key bias is softmax-invariant unless rotary embeddings or a key norm act on the keys."""
    k_norm = getattr(attention, "k_norm", None)
    return getattr(model, "rope", None) is None and (k_norm is None or isinstance(k_norm, nn.Identity))


def swin_norm_feeds_site(block: nn.Module, position: str) -> bool:
    """Swin pads its attention input up to whole windows after norm1: an adapter on norm1 would leave the padded
    tokens 0 where the adapter on the attention (and the merged model) gives them b."""
    if position != "att":
        return True
    (height, width), window = block.input_resolution, block.window_size
    return not getattr(block, "dynamic_mask", False) and height % window[0] == 0 and width % window[1] == 0


PLACES = {"att": Place("norm1", "attn"), "mlp": Place("norm2", "mlp"), **EXTRA_PLACES}
SPECS = tuple(register_block_spec(BlockSpec(name, types, readers, single_linear, key_bias_is_invariant,
                                            places=PLACES, **extra))
              for name, types, extra in (("timm.vit", (VitBlock,), {}), ("timm.beit", (BeitBlock,), {}),
                                         ("timm.eva", (EvaBlock,), {}),
                                         ("timm.swin", (SwinTransformerBlock,),
                                          {"norm_feeds_site": swin_norm_feeds_site})))
