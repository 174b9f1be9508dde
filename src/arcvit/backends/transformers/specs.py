"""Where ARC goes in each Hugging Face transformers vision family (transformers >= 5 module layout).

A site is the input of a block's attention or MLP; its readers are the Linears that consume it, each with its
own bias. Pre-norm families (ViT, DeiT, DINOv2, CLIP, SigLIP, Swin) read a LayerNorm output there. Swinv2 is
res-post-norm: its attention reads the raw (windowed) residual stream and its MLP the residual stream after the
attention's residual add, and its norms come after each branch. ARC's adapter is a linear map applied right
before the readers, so it folds into them exactly in both cases; only the name "normalised input" differs.

Key biases: a constant added to every key shifts each query's logits by one constant, which softmax ignores,
so a model without a key bias still merges ARC's bias exactly: ViT/DeiT/DINOv2 with qkv_bias=False have no
q/v bias either (ARCConfig(bias=False) is then needed), and Swin's relative position bias is added after
the dot product, which keeps the invariance. Swinv2 is the exception: its cosine attention normalises every
key, so a shift of the keys changes the logits, and its key Linear has no bias to fold into: ARC on Swinv2
needs ARCConfig(bias=False).
"""
from __future__ import annotations

from torch import nn
from transformers.models.clip.modeling_clip import CLIPEncoderLayer
from transformers.models.deit.modeling_deit import DeiTLayer
from transformers.models.dinov2.modeling_dinov2 import Dinov2Layer
from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import Dinov2WithRegistersLayer
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer
from transformers.models.swin.modeling_swin import SwinLayer
from transformers.models.swinv2.modeling_swinv2 import Swinv2Layer
from transformers.models.vit.modeling_vit import ViTLayer

from arcvit.core.specs import BlockSpec, Place, Reader, own_bias, register_block_spec
from arcvit.errors import ModelError


def _reader(linear: nn.Linear, is_key: bool = False) -> Reader:
    return Reader(linear, own_bias(linear, is_key))


def _attention_linears(host: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    """The separate query, key and value Linears of an attention module (Swinv2 keeps them in ``.self``)."""
    layouts = ((host, ("q_proj", "k_proj", "v_proj")), (getattr(host, "self", None), ("query", "key", "value")))
    for owner, names in layouts:
        found = [getattr(owner, n, None) for n in names] if owner is not None else []
        if found and all(isinstance(m, nn.Linear) for m in found):
            return found[0], found[1], found[2]
    raise ModelError(f"arcvit does not know where {type(host).__name__} reads its input: expected "
                     "q_proj/k_proj/v_proj (or self.query/key/value) Linears")


_MLP_READERS = ("fc1", "dense", "gate_proj", "up_proj")  # plain MLPs, Swinv2's intermediate, DINOv2's SwiGLU


def readers(host: nn.Module, position: str) -> list[Reader]:
    """The Linears that read a site's input, with their bias slots."""
    if position == "att":
        q, k, v = _attention_linears(host)
        return [_reader(q), _reader(k, is_key=True), _reader(v)]
    found = [getattr(host, n) for n in _MLP_READERS if isinstance(getattr(host, n, None), nn.Linear)]
    if not found:
        raise ModelError(f"arcvit does not know where {type(host).__name__} reads its input: expected "
                         f"one of {', '.join(_MLP_READERS)}")
    return [_reader(linear) for linear in found]


def single_linear(host: nn.Module, position: str) -> str | None:
    """The MLP's first Linear where it alone reads the site input (it is then wrapped, not the whole MLP)."""
    if position != "mlp" or hasattr(host, "gate_proj"):
        return None
    return next((n for n in ("fc1", "dense") if isinstance(getattr(host, n, None), nn.Linear)), None)


def _softmax_attention(model: nn.Module, host: nn.Module) -> bool:
    return True


def _cosine_attention(model: nn.Module, host: nn.Module) -> bool:
    return False


def _mlp_only(block: nn.Module, position: str) -> bool:
    """Swin pads its windows after the attention's norm: only the MLP's norm feeds its readers token for token."""
    return position == "mlp"


def _never(block: nn.Module, position: str) -> bool:
    """Swinv2's norms follow each branch: none produces a site input."""
    return False


def _pre_norm(name: str, block: type, norms: tuple[str, str], hosts: tuple[str, str],
              norm_feeds_site=lambda block, position: True) -> BlockSpec:
    places = {"att": Place(norms[0], hosts[0]), "mlp": Place(norms[1], hosts[1])}
    return BlockSpec(name, (block,), readers, single_linear, _softmax_attention, places, norm_feeds_site)


SPECS = (
    _pre_norm("transformers.vit", ViTLayer, ("layernorm_before", "layernorm_after"), ("attention", "mlp")),
    _pre_norm("transformers.deit", DeiTLayer, ("layernorm_before", "layernorm_after"), ("attention", "mlp")),
    _pre_norm("transformers.dinov2", Dinov2Layer, ("norm1", "norm2"), ("attention", "mlp")),
    _pre_norm("transformers.dinov2_with_registers", Dinov2WithRegistersLayer, ("norm1", "norm2"),
              ("attention", "mlp")),
    _pre_norm("transformers.clip", CLIPEncoderLayer, ("layer_norm1", "layer_norm2"), ("self_attn", "mlp")),
    _pre_norm("transformers.siglip", SiglipEncoderLayer, ("layer_norm1", "layer_norm2"), ("self_attn", "mlp")),
    _pre_norm("transformers.swin", SwinLayer, ("layernorm_before", "layernorm_after"), ("attention", "mlp"),
              _mlp_only),
    # res-post-norm: no norm feeds the site; ``layernorm_before``/``layernorm_after`` follow each branch
    BlockSpec("transformers.swinv2", (Swinv2Layer,), readers, single_linear, _cosine_attention,
              {"att": Place("layernorm_before", "attention"), "mlp": Place("layernorm_after", "intermediate")},
              _never),
)


def register() -> None:
    for spec in SPECS:
        register_block_spec(spec)
