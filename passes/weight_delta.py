"""Methods whose change to a site is computed from the site's own weight (GLoRA, PEANuT, DeFT): the
additive form (fxpeft/forms.py) with their own fold. Each adapter adds ``Δ(x)``, a function of x and of
the site's weight W, bias b and output y, as PEFT adds every active adapter's output computed against
the unmerged W:

    y' = y + Σ_a g_a Δ_a(x; W, b, y)            merged: W ← W + ΔW_a(W0), b ← b + Δb_a(W0, b0)

A method supplies ``delta(site_module, adapter, x, W, b, y)`` (a graph function; x in the adapter's
dtype, W a quantized linear's dequantized weight, or None when the method does not read it) and
``change(site_module, adapter, W0, b0) -> (ΔW, Δb or None)``, the scaled change merging writes. Its
fold is not the form's plain ``W + ΔW``, because ΔW depends on the weight, which merging changes: PEFT
merges every adapter of a site against the weight W0 it had before its first merge, and so does the
fold here (W0 is kept on the first merged adapter's gate stash and read by later ones); unmerging
subtracts the stashed change, giving back W0 up to rounding.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import nn

from fxpeft.canonical import Site, float_weight, is_quantized
from fxpeft.forms import additive
from fxpeft.kept import SiteParts
from fxpeft.registry import Method


def method(*, gates: str, delta: Callable, change: Callable, reads_weight: bool = True,
           factors: Optional[Callable] = None, **fields) -> Method:
    """The additive form's method for ``delta`` (``fields``: the form's other arguments), folding
    ``change`` against the weight before the site's first merge (see the module docstring). Generation
    graphs read each adapter's change against the weight as it is, kept once per ``generate`` call: a
    dense ΔW and Δb, or, with ``factors(site_module, adapter, W) -> (A (r, in), B (out, r))``, the
    low-rank ``ΔW = B A`` of a method changing no bias."""

    def parts(model, site: Site, module: nn.Module, adapter: str, dtype, alone: bool) -> SiteParts:
        weight = float_weight(module).detach()
        if factors is not None:
            down, up = factors(module, adapter, weight)
            return SiteParts(down=down.to(dtype), up=up.to(dtype).t())
        bias = model.get_parameter(site.bias).detach() if site.bias is not None else None
        delta_w, delta_b = change(module, adapter, weight, bias)
        return SiteParts(dense=(delta_w.t() if site.fan_in_fan_out else delta_w).to(dtype),
                         bias=None if delta_b is None else delta_b.to(dtype))

    def insert(lw, site: Site, module: nn.Module, adapter: str, x):
        owner = lw.attr(site.path)
        weight = None
        if reads_weight:
            weight = lw.call(float_weight, owner) if is_quantized(module) else lw.attr(site.weight)
        bias = lw.attr(site.bias) if site.bias is not None else None
        return lw.call(delta, owner, adapter, x, weight, bias, site.output)

    # the form's own fold (``W + delta_weight``) is replaced below, so it needs no delta_weight
    form = additive(gates=gates, delta=insert, delta_weight=None, site_parts=parts, **fields)
    return dataclasses.replace(form, fold=folding(gates=gates, change=change))


def folding(*, gates: str, change: Callable) -> Callable:
    """The method's ``fold``: adds ``change(module, adapter, W0, b0)`` with (W0, b0) the site's weight and
    bias before its first merged adapter of this method; unfolding subtracts the stashed change."""

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
