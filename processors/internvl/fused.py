"""One matrix product for a decoder layer's query/key/value, one for its gate/up.

A Qwen2 layer projects its input three times (query, key, value) and its MLP input twice
(gate, up), each a separate matrix product. `fuse_layer` concatenates each set's weights
(and biases) into one matrix, so a layer runs two products where it ran five: a decode
step at small batch is bound by its count of kernels, not by their arithmetic
(`bench/profile_slot.py`). Each output column is the same dot product as before; only the
kernel that computes it may differ.

The checkpoint's own `q_proj`/`k_proj`/`v_proj`/`gate_proj`/`up_proj` weights become views
of the concatenated tensors, so memory stays the same and the modules keep working for
any other caller (`generate`, the static path). The fused weights hang off the modules
as a plain attribute (`FUSED`), not a parameter or buffer: the model's state dict is
unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FUSED = "visionstream_fused"
"""Attribute of `self_attn` and `mlp` holding their `FusedProjections`."""


@dataclass(frozen=True)
class FusedProjections:
    """Concatenated weights of one set of projections and the width of each part."""

    weight: Any  # (sum of widths, in features)
    bias: Any  # (sum of widths,) or None
    widths: tuple[int, ...]


def _fuse(linears: list[Any]) -> FusedProjections:
    import torch

    weight = torch.cat([linear.weight.detach() for linear in linears])
    biases = [linear.bias for linear in linears]
    bias = None
    if all(b is not None for b in biases):
        bias = torch.cat([b.detach() for b in biases])
    elif any(b is not None for b in biases):
        raise ValueError("projections to fuse must all have a bias or none")
    widths = tuple(int(linear.out_features) for linear in linears)
    start = 0
    for linear, width in zip(linears, widths, strict=True):
        # The module's weight becomes a view of the fused one: no second copy in memory.
        linear.weight = torch.nn.Parameter(weight[start : start + width], requires_grad=False)
        if bias is not None:
            linear.bias = torch.nn.Parameter(bias[start : start + width], requires_grad=False)
        start += width
    return FusedProjections(weight=weight, bias=bias, widths=widths)


def fuse_layer(layer: Any) -> None:
    """Attach fused query/key/value and gate/up weights to a Qwen2 decoder layer (once)."""
    attention, mlp = layer.self_attn, layer.mlp
    if getattr(attention, FUSED, None) is None:
        fused = _fuse([attention.q_proj, attention.k_proj, attention.v_proj])
        object.__setattr__(attention, FUSED, fused)
    if getattr(mlp, FUSED, None) is None:
        object.__setattr__(mlp, FUSED, _fuse([mlp.gate_proj, mlp.up_proj]))


def unfuse_layer(layer: Any) -> None:
    """Stop using the fused products of `layer` (its modules keep views: same values)."""
    for module in (layer.self_attn, layer.mlp):
        vars(module).pop(FUSED, None)


def fused_of(module: Any) -> FusedProjections | None:
    """The module's fused projections, or None when `fuse_layer` was not applied."""
    found: FusedProjections | None = getattr(module, FUSED, None)
    return found


def project_fused(fused: FusedProjections, hidden: Any) -> tuple[Any, ...]:
    """The projections of `hidden` in one matrix product, split along the last dimension."""
    import torch.nn.functional as functional

    product: Any = functional.linear(hidden, fused.weight, fused.bias)
    parts: tuple[Any, ...] = product.split(fused.widths, dim=-1)
    return parts


def mlp_output(mlp: Any, hidden: Any) -> Any:
    """`Qwen2MLP` over `hidden`: down(act(gate(x)) * up(x)), gate and up in one product."""
    fused = fused_of(mlp)
    if fused is None:
        return mlp(hidden)
    gate, up = project_fused(fused, hidden)
    return mlp.down_proj(mlp.act_fn(gate) * up)
