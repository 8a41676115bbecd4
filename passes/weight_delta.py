"""Methods whose change to a site is computed from the site's own weight (GLoRA, PEANuT, DeFT), on the
weight-map form (fxpeft/forms.py): each adapter adds ``Δ(x)``, a function of x and of the site's weight
W (and bias b), as PEFT adds every active adapter's output computed against the unmerged W:

    y = base(x) + Σ_a g_a Δ_a(x; W, b)            merged: W ← W + ΔW_a(W0), b ← b + Δb_a(W0, b0)

A method supplies ``delta(site_module, adapter, x, W, b, y)`` (a graph function: x in the adapter's dtype,
y the site's output)
and ``change(site_module, adapter, W0, b0) -> (ΔW, Δb or None)``. This file lowers them (gates as data,
mixed batches masked per sample, casts around half-precision bases, a quantized linear's dequantized
weight as W) and folds them: not as a plain additive ΔW, because ΔW depends on the weight, which merging
changes. PEFT merges every adapter of a site against the weight W0 it had before its first merge; so does
the fold here (W0 is kept on the first merged adapter's gate stash and read by later ones), and
unmerging subtracts the stashed change, giving back W0 up to rounding.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from fxpeft.canonical import Site, is_quantized, site_weight
from fxpeft.forms import adapter_dtype, masked_samples

aten = torch.ops.aten


def float_weight(site_module: nn.Module) -> torch.Tensor:
    """The weight the site computes with: a quantized linear's dequantized weight."""
    return site_module.dequantize() if is_quantized(site_module) else site_module.weight


def lowering(*, gates: str, delta: Callable, reads_weight: bool = True) -> Callable:
    """The weight-map form's ``lower_site``: the site's output plus each adapter's gated
    ``delta(site_module, adapter, x, W, b, y)``, y the site's own output (W None unless ``reads_weight``:
    a method that needs only ``y - b`` spares a quantized base its dequantization)."""

    def lower_site(lw, site: Site, module: nn.Module, adapters: list[str]):
        spec = site_weight(lw.root, site)
        dtype, base_dtype = adapter_dtype(spec), spec.dtype
        owner = lw.attr(site.path)
        weight = None
        if reads_weight:
            weight = lw.call(float_weight, owner) if is_quantized(module) else lw.attr(site.weight)
        bias = lw.attr(site.bias) if site.bias is not None else None
        x = lw.cast(site.input, dtype, base_dtype)
        output = site.output
        for adapter in adapters:
            coefficient = lw.attr(f"{site.path}.{gates}.{adapter}.value")
            if not lw.mixed:
                coefficient = lw.call(aten.mul.Tensor, coefficient, lw.gate(adapter))
            value = lw.call(aten.mul.Tensor, lw.call(delta, owner, adapter, x, weight, bias, site.output), coefficient)
            if lw.mixed:  # only the samples that chose this adapter
                value = lw.call(masked_samples, value, lw.sample_index, lw.adapter_order.index(adapter))
            output = lw.call(aten.add.Tensor, output, lw.cast(value, base_dtype, dtype))
        return output

    return lower_site


def folding(*, gates: str, change: Callable) -> Callable:
    """The weight-map form's ``fold``: adds ``change(module, adapter, W0, b0)`` with (W0, b0) the site's
    weight and bias before its first merged adapter of this method; unfolding subtracts the stashed change."""

    def fold(gm, site: Site, module: nn.Module, adapter: str, weight, bias, sign):
        holder = module._modules[gates]
        gate = holder[adapter]
        if sign < 0:
            delta_w, delta_b = gate.stash["delta"]
            gate.stash = None
            return weight - delta_w, (bias - delta_b if delta_b is not None else bias)
        w0, b0 = weight, (bias.detach().clone() if bias is not None else None)
        for name, other in holder.items():
            # merged earlier, or folded just before in this same merge (its result is this weight)
            if name != adapter and other.stash is not None and (other.merged or other.stash["result"] is weight):
                w0, b0 = other.stash["reference"]
                break
        with torch.no_grad():
            delta_w, delta_b = change(module, adapter, w0, b0)
            delta_w = delta_w.to(weight.dtype)
        new_weight = weight + delta_w
        new_bias = bias
        if delta_b is not None:
            delta_b = delta_b.to(bias.dtype)
            new_bias = bias + delta_b
        gate.stash = {"reference": (w0, b0), "delta": (delta_w, delta_b), "result": new_weight}
        return new_weight, new_bias

    return fold
