"""ARC's memory-lean training path (impl "fused"): LayerNorm and adapter as one autograd Function.

Composed from autograd ops, an adapter keeps its full-width input x = LayerNorm(y) alive for the backward pass
(the gradient of D * c is x^T g), while the LayerNorm in front of it already keeps y and its statistics. Computing
both in one Function lets backward rebuild x from y instead, so a training step keeps only what a frozen-backbone
method (BitFit) keeps plus the r-wide codes and the dropout mask. Outputs are the composed path's, dropout
included: the mask is drawn by the same call on the same shape, so it consumes the same random numbers.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def lean_norm_supported(norm: nn.Module) -> bool:
    """Whether ``norm`` is a plain LayerNorm over the last dimension (torch's, or timm's without fast_norm).

    Other norms (RMSNorm, channels-first LayerNorm2d, fast/apex kernels) keep the composed path.
    """
    return (isinstance(norm, nn.LayerNorm) and type(norm).__name__ == "LayerNorm"
            and len(norm.normalized_shape) == 1 and not getattr(norm, "_fast_norm", False))


def _dropout_noise(code: torch.Tensor, p: float) -> torch.Tensor:
    """The factors dropout multiplies ``code`` by (0 or 1/(1-p)), drawn exactly as ``F.dropout(code)`` draws them."""
    return F.dropout(torch.ones_like(code), p, True)


class _LeanNormAdapter(torch.autograd.Function):
    """h = LN(y) + drop(LN(y) (D*c)) D^T + b, saving y, LN's statistics, the dropped codes and a boolean mask."""

    @staticmethod
    def forward(ctx, y, norm_weight, norm_bias, eps, down, scale, bias, p):
        dim = y.shape[-1]
        x, mean, rstd = torch.native_layer_norm(y, (dim,), norm_weight, norm_bias, eps)
        dc = down * scale
        code = x @ dc
        mask = None
        if p > 0:
            noise = _dropout_noise(code, p)
            code = code * noise
            mask = noise != 0
        h = x + code @ down.t()
        if bias is not None:
            h = h + bias
        ctx.eps, ctx.p, ctx.has_mask = eps, p, mask is not None
        ctx.save_for_backward(y, mean, rstd, norm_weight, norm_bias, down, scale, code,
                              *([mask] if mask is not None else []))
        return h

    @staticmethod
    def backward(ctx, grad_h):
        y, mean, rstd, norm_weight, norm_bias, down, scale, code, *rest = ctx.saved_tensors
        dim = y.shape[-1]
        g = grad_h.reshape(-1, dim)
        code2 = code.reshape(-1, code.shape[-1])
        dc = down * scale
        g_code = g @ down
        g_down = g.t() @ code2 if ctx.needs_input_grad[4] else None
        if ctx.has_mask:
            g_code = g_code * rest[0].reshape_as(g_code).to(g_code.dtype).div_(1 - ctx.p)
        g_scale = None
        if ctx.needs_input_grad[4] or ctx.needs_input_grad[5]:
            x, _, _ = torch.native_layer_norm(y, (dim,), norm_weight, norm_bias, ctx.eps)  # rebuilt, not saved
            g_dc = x.reshape(-1, dim).t() @ g_code
            g_down = g_down + g_dc * scale if g_down is not None else None
            g_scale = (g_dc * down).sum(0) if ctx.needs_input_grad[5] else None
        g_bias = g.sum(0) if ctx.needs_input_grad[6] else None
        g_x = torch.addmm(g, g_code, dc.t()).view_as(y)
        want = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        g_y, g_w, g_b = torch.ops.aten.native_layer_norm_backward(
            g_x, y, (dim,), mean, rstd, norm_weight, norm_bias, want)
        return g_y, g_w, g_b, None, g_down, g_scale, g_bias, None


def lean_norm_adapter(norm: nn.LayerNorm, adapter: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """``adapter(norm(y))`` for an ARCAdapter ``adapter``, keeping only y, the codes and the mask for backward."""
    p = adapter.dropout.p if adapter.dropout.training else 0.0
    return _LeanNormAdapter.apply(y, norm.weight, norm.bias, norm.eps, adapter.down_proj, adapter.scale,
                                  adapter.bias, p)
