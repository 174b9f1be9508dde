"""The ARC modules: shared down-projections, per-site rescale/bias, and the wrappers that insert them.

An adapter site is the normalised token input of a block's attention or MLP. At a site,
``h = x + dropout(x @ (D * c)) @ D^T + b`` with D (d x r) shared by every block of a stage and position,
c (r) and b (d) per site. The up-projection is D^T, so it costs no parameters.

Adapters are named. The model holds one ``ARCShared`` per name and every site wrapper one ``ARCAdapter`` per
name, under ``arc`` / ``adapter`` for the default name (so that a single adapter keeps arcvit 0.1's parameter
names) and ``arc_<name>`` / ``adapter_<name>`` for the others. One ``ARCState``, shared by reference, says
which name is active or, for a batch whose items belong to different tasks, which adapter each item gets.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from arcvit.core.config import ARCConfig
from arcvit.core.fused import lean_norm_adapter

DEFAULT_NAME = "default"


def slot(prefix: str, name: str) -> str:
    """The attribute holding adapter ``name``: ``prefix`` itself for the default name."""
    return prefix if name == DEFAULT_NAME else f"{prefix}_{name}"


def slot_name(prefix: str, attr: str) -> str | None:
    """The adapter name an attribute holds, or None if it is not one of ``prefix``'s slots."""
    if attr == prefix:
        return DEFAULT_NAME
    return attr[len(prefix) + 1:] if attr.startswith(prefix + "_") else None


class ARCShared(nn.Module):
    """Shared down-projections, one per stage and position: ``att[stage]``, ``mlp[stage]`` (and ``proj``,
    ``fc2`` where ``config.extra_positions`` adds them), each (the position's input width) x r."""

    def __init__(self, widths: dict[str, list[int]], config: ARCConfig, state: "ARCState") -> None:
        super().__init__()
        self.config = config
        object.__setattr__(self, "state", state)  # shared with every site wrapper, outside the module tree
        for position in config.positions:
            self.add_module(position, nn.ParameterList(
                [nn.Parameter(torch.empty(d, config.rank)) for d in widths[position]]))
        for p in self.parameters():
            init_basis(p, config.basis_init)

    def down(self, position: str, stage: int) -> nn.Parameter:
        return getattr(self, position)[stage]


@torch.no_grad()
def init_basis(down: torch.Tensor, how: str) -> None:
    """xavier-uniform (the paper's), or orthonormal columns scaled to xavier's expected norm (``orthogonal``, and
    ``data`` until ``arcvit.core.basis`` sets the principal directions), so that only the directions differ."""
    if down.is_meta or down.numel() == 0:  # a shape check (meta), or a stage the position skips: nothing to draw
        return
    if how == "xavier":
        nn.init.xavier_uniform_(down)
        return
    width, rank = down.shape
    nn.init.orthogonal_(down)
    down.mul_((2 * width / (width + rank)) ** 0.5)


class ARCAdapter(nn.Module):
    """Per-site rescale vector c and bias b; reads its D from the model's ``ARCShared``.

    The reference to ``ARCShared`` is kept outside the module tree so that D is registered (and saved,
    counted, synchronised) exactly once, under the model's ``arc`` (or ``arc_<name>``).
    """

    def __init__(self, shared: ARCShared, position: str, stage: int, dim: int) -> None:
        super().__init__()
        object.__setattr__(self, "_shared", shared)
        config = shared.config
        rank = config.rank
        self.position, self.stage = position, stage
        # used where the adapter sits in front of a single Linear (the extensions take the composed path)
        self.lowrank = config.impl == "lowrank" and not (config.channel_scale or config.private_rank)
        self.scale = nn.Parameter(torch.zeros(rank))
        # the paper: xavier-uniform on a 1 x r matrix at the MLP, zeros at attention; the added positions start
        # at zero (the model starts as the backbone there)
        if position == "mlp" or (position == "att" and config.att_scale_init == "random"):
            nn.init.xavier_uniform_(self.scale.view(1, rank))
        self.bias = nn.Parameter(torch.zeros(dim)) if config.bias else None
        self.dropout = nn.Dropout(config.dropout)
        self.channel = nn.Parameter(torch.zeros(dim)) if config.channel_scale else None
        self.private_down = self.private_up = None
        if config.private_rank:
            self.private_down = nn.Parameter(torch.empty(dim, config.private_rank))
            nn.init.xavier_uniform_(self.private_down)
            self.private_up = nn.Parameter(torch.zeros(dim, config.private_rank))
        self.extended = config.channel_scale or config.private_rank > 0

    @property
    def down_proj(self) -> nn.Parameter:
        return self._shared.down(self.position, self.stage)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """dropout(x @ (D * c)): the r-wide code of each token."""
        return self.dropout(x @ (self.down_proj * self.scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and not (self.dropout.training and self.dropout.p > 0):
            return self._infer(x)
        h = x + self.project(x) @ self.down_proj.t()
        if self.extended:
            h = h + self._extensions(x)
        return h + self.bias if self.bias is not None else h

    def _extensions(self, x: torch.Tensor) -> torch.Tensor:
        """ARC+'s terms beside the shared basis: x * s and dropout(x P) Q^T (``ARCConfig`` extensions)."""
        out = x * self.channel if self.channel is not None else torch.zeros_like(x)
        if self.private_down is not None:
            out = out + self.dropout(x @ self.private_down) @ self.private_up.t()
        return out

    def _infer(self, x: torch.Tensor) -> torch.Tensor:
        """The forward without autograd or dropout: one fused multiply-add and the bias added in place."""
        down, flat = self.down_proj, x.reshape(-1, x.shape[-1])
        h = torch.addmm(flat, flat @ (down * self.scale), down.t())
        if self.extended:
            h.add_(self._extensions(flat))
        return (h.add_(self.bias) if self.bias is not None else h).view(x.shape)

    @torch.no_grad()
    def fold(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """For a Linear ``W`` reading the adapted input ``x A + b``: ``W A^T`` and ``W b``, where
        ``A = I + D diag(c) D^T (+ diag(s) + P Q^T)``."""
        d = self.down_proj.to(weight.dtype)
        folded = weight + (weight @ d) * self.scale.to(weight.dtype) @ d.t()
        if self.channel is not None:
            folded += weight * self.channel.to(weight.dtype)
        if self.private_down is not None:
            folded += (weight @ self.private_up.to(weight.dtype)) @ self.private_down.to(weight.dtype).t()
        shift = weight @ self.bias.to(weight.dtype) if self.bias is not None else None
        return folded, shift

    def extra_repr(self) -> str:
        return f"position={self.position}, stage={self.stage}, rank={self.scale.numel()}"


class Route:
    """Which adapter each item of a mixed batch gets: item i gets ``names[ids[i]]`` (``names``: the batch's
    adapters in order of first appearance). The down-projections gathered per item are kept here, so that every
    site of a stage and position shares them within the one forward pass the route lives for."""

    def __init__(self, item_names: list[str], device: torch.device) -> None:
        self.size = len(item_names)
        self.names = list(dict.fromkeys(item_names))
        self.slots = [slot("adapter", name) for name in self.names]  # each name's attribute at a site
        position = {name: i for i, name in enumerate(self.names)}
        self.ids = torch.tensor([position[name] for name in item_names], device=device)
        self.down: dict[tuple, torch.Tensor] = {}

    @classmethod
    def by_ids(cls, names: list[str], ids: torch.Tensor) -> "Route":
        """Item i gets ``names[ids[i]]``, ``ids`` a tensor (a traced graph's input: the batch size stays symbolic)."""
        route = cls(names, ids.device)
        route.size, route.ids = ids.shape[0], ids
        return route

    @property
    def single(self) -> str | None:
        """The one adapter of a batch whose items all belong to one task, else None."""
        return self.names[0] if len(self.names) == 1 else None


def _stack(tensors: list[torch.Tensor | None], shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """``tensors`` stacked, each zero-padded to ``shape`` (None: all zeros). Zeros are exact: they add nothing."""
    zeros = like.new_zeros(shape) if any(t is None for t in tensors) else None
    return torch.stack([zeros if t is None else t if t.shape == shape else
                        F.pad(t, [p for have, want in zip(reversed(t.shape), reversed(shape)) for p in (0, want - have)])
                        for t in tensors])


def _each(adapters: list["ARCAdapter | None"], attr: str) -> list[torch.Tensor | None]:
    """One tensor of every adapter (None where a site has no adapter of that name)."""
    return [getattr(a, attr) if a is not None else None for a in adapters]


class ARCState:
    """Which named adapter the sites apply: the active one, or per item of the batch while a route is set."""

    def __init__(self) -> None:
        self.active: str | None = None
        self.route: Route | None = None
        self.capture: Callable[["ARCSite", torch.Tensor], None] | None = None  # sees every site input (basis.py)


class ARCSite(nn.Module):
    """A model's own module with the named adapters of one site in front of its input (``inner``)."""

    is_arc_site = True

    def __init__(self, inner: nn.Module, state: ARCState, position: str) -> None:
        super().__init__()
        self.inner, self.position = inner, position
        object.__setattr__(self, "state", state)

    @property
    def adapters(self) -> dict[str, ARCAdapter]:
        """This site's adapters by name."""
        return {slot_name("adapter", attr): m for attr, m in self._modules.items() if isinstance(m, ARCAdapter)}

    def get(self, name: str) -> ARCAdapter | None:
        return self._modules.get(slot("adapter", name))

    def current(self) -> ARCAdapter | None:
        """The active adapter at this site (None where the active one does not adapt it, or during a route)."""
        return None if self.state.route is not None else self.get(self.state.active)

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        if self.state.capture is not None:
            self.state.capture(self, x)
        route = self.state.route
        name = self.state.active if route is None else route.single
        if route is None or name is not None:
            adapter = self.get(name)
            return adapter(x) if adapter is not None else x
        return self._adapt_mixed(x, route)

    def _adapt_mixed(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        """Each item through its own adapter, for the whole batch at once: its D, c and b are gathered per item
        and applied with two batched matmuls over the item's rows (a Swin item's windows are contiguous)."""
        adapters = [self._modules.get(attr) for attr in route.slots]
        scales = _each(adapters, "scale")
        present = [a for a in adapters if a is not None]
        if not present:
            return x
        width, rank = x.shape[-1], max(s.shape[0] for s in scales if s is not None)
        key = (present[0].stage, self.position, rank, tuple(a is not None for a in adapters))
        if key not in route.down:
            route.down[key] = _stack(_each(adapters, "down_proj"), (width, rank), x).index_select(0, route.ids)
        down = route.down[key]
        scale = _stack(scales, (rank,), x).index_select(0, route.ids)
        rows = x.reshape(route.size, -1, width)
        codes = torch.bmm(rows, down) * scale[:, None, :]
        out = torch.baddbmm(rows, codes, down.transpose(1, 2))
        self._add_mixed_extensions(out, rows, adapters, route)
        biases = _each(adapters, "bias")
        if any(b is not None for b in biases):
            out.add_(_stack(biases, (width,), x).index_select(0, route.ids)[:, None, :])
        return out.view(x.shape)

    @staticmethod
    def _add_mixed_extensions(out: torch.Tensor, rows: torch.Tensor, adapters: list["ARCAdapter | None"],
                              route: Route) -> None:
        """ARC+'s per-channel scales and private terms, gathered per item like D and c (zeros where absent)."""
        width = rows.shape[-1]
        channels = _each(adapters, "channel")
        if any(s is not None for s in channels):
            out.addcmul_(rows, _stack(channels, (width,), rows).index_select(0, route.ids)[:, None, :])
        downs, ups = _each(adapters, "private_down"), _each(adapters, "private_up")
        if any(p is not None for p in downs):
            rank = max(p.shape[1] for p in downs if p is not None)
            down = _stack(downs, (width, rank), rows).index_select(0, route.ids)
            up = _stack(ups, (width, rank), rows).index_select(0, route.ids)
            out.baddbmm_(torch.bmm(rows, down), up.transpose(1, 2))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # code around the model reads the wrapped module's attributes (qkv.bias, attn.fused_attn)
            return getattr(super().__getattr__("inner"), name)

    def extra_repr(self) -> str:
        return f"position={self.position}"


class ARCLinear(ARCSite):
    """A frozen Linear preceded by its site's adapters, where that Linear is the only reader of x."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adapter = self.current()
        if adapter is None or not adapter.lowrank:
            return self.inner(self.adapt(x))
        w, bias = self.inner.weight, self.inner.bias
        if adapter.bias is not None:
            shift = w @ adapter.bias
            bias = shift if bias is None else bias + shift
        return F.linear(x, w, bias) + adapter.project(x) @ (w @ adapter.down_proj).t()


class ARCInput(ARCSite):
    """Any module (attention, MLP) whose first input is adapted first, for sites with several readers of x.

    The input is the first positional argument, or ``hidden_states=`` where the block passes it by keyword
    (transformers' CLIP and SigLIP layers call their attention that way).
    """

    def forward(self, *args, **kwargs):
        if args:
            return self.inner(self.adapt(args[0]), *args[1:], **kwargs)
        return self.inner(**{**kwargs, "hidden_states": self.adapt(kwargs["hidden_states"])})


class ARCNorm(ARCSite):
    """A block's LayerNorm followed by its site's adapters (impl "fused"): the adapter is computed with the norm,
    so that training keeps the norm's input instead of the adapter's (``arcvit.core.fused``). A merge folds the
    adapter into the readers of the norm's output, as for the other wrappers, and puts the plain norm back.
    Only a plain LayerNorm is wrapped (``arcvit.core.fused.lean_norm_supported``)."""

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        adapter = self.current()
        if adapter is None:  # a routed (mixed-task) batch, or no active adapter here: the composed path
            return self.adapt(self.inner(y))
        if torch.is_grad_enabled() and not torch.is_autocast_enabled(y.device.type) and not adapter.extended:
            return lean_norm_adapter(self.inner, adapter, y)  # the Function is fp32-exact without autocast only
        return adapter(self.inner(y))
