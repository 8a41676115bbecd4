"""The orthogonal family (OFT, BOFT, HRA) on the weight-map form (fxpeft/forms.py): each adapter
is a matrix ``Q`` over a site's input features (a conv's flattened filter, C·kh·kw) that the
site's weight is turned by, and BOFT adds a per-output scale ``s``:

    linear, conv:  W' = s ⊙ (W Q^T)      (x Q fed to W: the input rotated)
    embedding:     W' = W Q              (each embedding row rotated: the output rotated)

A method supplies its math as graph functions of (site module, adapter): ``rotate(m, a, v, g)``
= ``v + g (v Q - v)`` over v's last dim, g the gate (0-dim in dense graphs, where a method may
fold it into Q with ``fxpeft.kept.toward_identity``; per sample in mixed ones: :func:`blend`), computed
cheaply where Q is structured (OFT's blocks, HRA's reflections),
``matrix(m, a)`` = Q (d, d) and, for BOFT, ``scale(m, a)`` = s (out,). This file lowers them:

- linear sites (nn.Linear and quantized linears): the input is rotated, adapters composed as
  ``W Q1^T Q2^T …`` (the last adapter's Q applied to x first), then BOFT's scale on ``y - b``;
- conv sites: the weight is mapped (``replace_op(weight=…)``); in mixed graphs each adapter's
  conv on its mapped weight replaces the output for its samples;
- embedding sites: the output rows rotated, adapters in order.

Generation graphs (``site_parts``: :func:`parts`, HRA's own) keep Q once per ``generate`` call and run the
site's op on ``x Q`` (``weight_map(maps=MAPS)``); at conv sites a node maps the weight (the dense
lowering's part before the op), and embeddings and mixed conv steps run the lowering from the op's output:
the graphs name no adapter, so loading one does not recompile them.

Each adapter enters as ``v + g (f(v) - v)``, ``g`` its gate times whether it acts (a 0-dim value,
or the per-sample mask in mixed graphs), so activity and merging stay data. Merging folds the map
into the weight and keeps (Q, s) on the gate's stash; unmerging applies their inverses (Q is only
approximately orthogonal under OFT's Cayley-Neumann series: inverted, as PEFT does).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from fxpeft.canonical import Site, site_weight
from fxpeft.configs import check_layer_fields
from fxpeft.forms import adapter_dtype
from fxpeft.kept import SiteParts
from fxpeft.rewrite import Lowering, samples_of

aten = torch.ops.aten
MAPS = {"linear": "input", "conv": "weight"}  # the operand the dense lowering maps, by site kind (weight_map)


def blend(v: torch.Tensor, mapped: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``v + g (mapped - v)``: the adapter's map where it acts (g = 1), v where it does not (g = 0)."""
    return v + g.to(v.dtype) * (mapped - v)


def gated_scale(s: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``1 + g (s - 1)``: a per-output scale where the adapter acts, 1 where it does not."""
    return 1 + g.to(s.dtype) * (s - 1)


def rescaled(y: torch.Tensor, factor: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``(y - b) f + b`` in one pass over y: ``y f + b (1 - f)``."""
    if bias is None:
        return y * factor
    return torch.addcmul(bias.to(y.dtype) * (1 - factor), y, factor)


def sample_gate(value: torch.Tensor, index: torch.Tensor, slot: int, like: torch.Tensor) -> torch.Tensor:
    """Mixed graphs: the gate's value for the rows of ``like`` whose sample chose ``slot``, else 0."""
    return value * samples_of(index, slot, like).to(value.dtype)


def shuffled_mask(count: int, p: float, device) -> torch.Tensor:
    """The blocks a multiplicative dropout replaces by I: ``int(p·count)`` ones among zeros, shuffled
    by ``torch.randperm`` (PEFT's draw, so the same seed drops the same blocks)."""
    replaced = int(p * count)
    mask = torch.cat([torch.ones(replaced, device=device), torch.zeros(count - replaced, device=device)])
    return mask[torch.randperm(count)]


def flat_map(weight: torch.Tensor, q: torch.Tensor, s: Optional[torch.Tensor]) -> torch.Tensor:
    """``s ⊙ (W Q^T)`` on a linear or conv weight (out, …), flattened over the input features."""
    mapped = weight.reshape(weight.shape[0], -1) @ q.t().to(weight.dtype)
    if s is not None:
        mapped = mapped * s.reshape(-1, 1).to(weight.dtype)
    return mapped.reshape(weight.shape)


def _gate(lw: Lowering, site: Site, gates: str, adapter: str, like):
    value = lw.attr(f"{site.path}.{gates}.{adapter}.value")
    if lw.mixed:
        return lw.call(sample_gate, value, lw.sample_index, lw.adapter_order.index(adapter), like)
    return lw.call(aten.mul.Tensor, value, lw.gate(adapter))


def lowering(*, gates: str, rotate: Callable, matrix: Callable, scale: Optional[Callable] = None) -> Callable:
    """The weight-map form's ``lower_site`` for a method of this family (see the module docstring)."""

    def mapped_weight(lw: Lowering, owner, adapter: str, weight):
        s = lw.call(scale, owner, adapter) if scale else None
        return lw.call(flat_map, weight, lw.call(matrix, owner, adapter), s)

    def lower_site(lw: Lowering, site: Site, module: nn.Module, adapters: list[str]):
        spec = site_weight(lw.root, site)
        dtype, base_dtype = adapter_dtype(spec), spec.dtype
        owner = lw.attr(site.path)
        if site.kind == "embedding":
            y = lw.cast(site.output, dtype, base_dtype)
            for adapter in adapters:
                y = lw.call(rotate, owner, adapter, y, _gate(lw, site, gates, adapter, y))
            return lw.cast(y, base_dtype, dtype)
        if site.kind == "conv":
            return _conv(lw, site, owner, adapters, dtype, base_dtype)
        x = lw.cast(site.input, dtype, base_dtype)
        for adapter in reversed(adapters):  # W Q1^T Q2^T: x meets the last adapter's Q first
            x = lw.call(rotate, owner, adapter, x, _gate(lw, site, gates, adapter, x))
        out = lw.replace_op(site, input=lw.cast(x, base_dtype, dtype))
        if scale is None:
            return out
        y = lw.cast(out, dtype, base_dtype)
        factor = None  # (y - b) s + b, as PEFT's BOFT; several adapters' scales multiply
        for adapter in adapters:
            gated = lw.call(gated_scale, lw.call(scale, owner, adapter), _gate(lw, site, gates, adapter, y))
            factor = gated if factor is None else lw.call(aten.mul.Tensor, factor, gated)
        bias = lw.attr(site.bias) if site.bias is not None else None
        return lw.cast(lw.call(rescaled, y, factor, bias), base_dtype, dtype)

    def _conv(lw: Lowering, site: Site, owner, adapters: list[str], dtype, base_dtype):
        weight = lw.cast(lw.attr(site.weight), dtype, base_dtype)
        if not lw.mixed:  # one conv on W Q1^T Q2^T …
            for adapter in adapters:
                mapped = mapped_weight(lw, owner, adapter, weight)
                weight = lw.call(blend, weight, mapped, _gate(lw, site, gates, adapter, weight))
            return lw.replace_op(site, weight=lw.cast(weight, base_dtype, dtype))
        out = base = site.output  # per sample: its adapter's conv, or the base one
        for adapter in adapters:
            mapped = lw.cast(mapped_weight(lw, owner, adapter, weight), base_dtype, dtype)
            adapted = lw.copy(site.node, {site.weight_node: mapped})
            out = lw.call(blend, out, adapted, _gate(lw, site, gates, adapter, base))
        return out

    return lower_site


def parts(*, rotation: Callable, scale: Optional[Callable] = None) -> Callable:
    """The weight-map form's ``site_parts`` at a linear site in eval (no dropout): the input turned by Q,
    given as its blocks by ``rotation(m, a)`` (n, b, b; a dense Q is one block), and BOFT's scale s on
    ``y - b`` as ``k = s`` and the bias shift ``(1 - s) b``."""

    def site_parts(gm, site: Site, module: nn.Module, adapter: str, dtype: torch.dtype, alone: bool) -> SiteParts:
        k = bias = None
        if scale is not None:
            k = scale(module, adapter).to(dtype)
            bias = None if site.bias is None else (1 - k) * gm.get_parameter(site.bias).to(dtype)
        return SiteParts(k=k, bias=bias, rotation=rotation(module, adapter).to(dtype))

    return site_parts


def folding(*, gates: str, matrix: Callable, scale: Optional[Callable] = None) -> Callable:
    """The weight-map form's ``fold``: ``W ← s ⊙ (W Q^T)`` (embeddings: ``W Q``), and back."""

    def fold(gm, site: Site, module: nn.Module, adapter: str, weight, bias, sign):
        gate = module._modules[gates][adapter]
        if sign > 0:
            with torch.no_grad():
                q = matrix(module, adapter).detach().float()
                s = scale(module, adapter).detach().float() if scale else None
            gate.stash = (q, s)
        else:
            q, s = gate.stash
        w = weight.float()
        if site.kind == "embedding":
            new = w @ (q if sign > 0 else torch.linalg.inv(q))
        elif sign > 0:
            new = flat_map(w, q, s)
        else:
            flat = w.reshape(w.shape[0], -1)
            if s is not None:
                flat = flat / s.reshape(-1, 1)
            new = (flat @ torch.linalg.inv(q.t())).reshape(w.shape)
        return new.to(weight.dtype), bias

    return fold


def check_site_kinds(method: str, module: nn.Module, site: Site, kinds: tuple) -> None:
    """PEFT's layer types for this family: nn.Linear (and quantized linears), nn.Conv2d without
    groups (BOFT and HRA raise on groups; OFT's rotation does not fit them either), nn.Embedding
    where the method takes it. GPT-2's Conv1D and other convolutions raise, as in PEFT."""
    name = f"{site.path!r} ({type(module).__name__})"
    if site.kind == "linear" and site.fan_in_fan_out:
        raise ValueError(f"{method} does not support transformers' Conv1D layers such as {name} (PEFT raises "
                         f"TypeError too: its {method} adapts nn.Linear and nn.Conv2d). Leave it out of target_modules.")
    if site.kind == "conv" and not isinstance(module, nn.Conv2d):
        raise ValueError(f"{method} supports nn.Conv2d but not {name}, as in PEFT. Leave it out of target_modules.")
    if site.kind == "conv" and module.groups > 1:
        raise NotImplementedError(f"{method} does not support {type(module).__name__} layers with groups > 1 "
                                  f"({name} has groups={module.groups}), as in PEFT.")
    if site.kind not in kinds:
        raise ValueError(f"{method} does not support {name}; leave it out of target_modules.")


def check_one_of(config, first: str, second: str) -> None:
    """PEFT's rule for (r, oft_block_size) and (boft_block_size, boft_block_num): exactly one is set
    (non-zero), the other follows from the layer's features; neither may be negative."""
    a, b = getattr(config, first), getattr(config, second)
    check_layer_fields(config, regex=())
    if a < 0 or b < 0:
        raise ValueError(f"{type(config).__name__}.{first} and {second} must be >= 0, got {a} and {b}.")
    if a == 0 and b == 0:
        raise ValueError(f"Either `{first}` or `{second}` must be non-zero. Currently, {first} = {a} and {second} = {b}.")
    if a != 0 and b != 0:
        raise ValueError(f"You can only specify either {first} ({a}) or {second} ({b}), but not both simultaneously, "
                         f"because {first} x {second} == in_features (PEFT's rule): set the other to 0.")


def input_features(module: nn.Module, site: Site, weight_spec) -> int:
    """The features Q acts on: a linear's in_features, a conv's in_channels·k·k, an embedding's dim."""
    shape = tuple(weight_spec.shape)
    if site.kind == "embedding":
        return shape[1]
    if site.kind == "conv":
        return int(torch.Size(shape[1:]).numel())
    return shape[1]
