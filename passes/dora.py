"""DoRA (``LoraConfig(use_dora=True)``): LoRA's update split into a direction and a learned magnitude,
the weight-map form (fxpeft/forms.py):

    W' = m ⊙ (W + s B A) / n,   n = ‖W + s B A‖ per output feature (detached, as PEFT)

computed without forming W', as PEFT does: with ``y = W x + b`` and ``c = m / n``,

    y' = y + (c - 1) ⊙ (W x) + c ⊙ s B A x

where ``W x`` is ``y - b`` (eval, or no dropout) or W applied to the dropped-out input (training
with LoRA dropout, as PEFT). Linear (and Conv1D), conv and embedding sites; the feature axis is
the output channel (an embedding's: its embedding dimension). State: LoRA's, plus
``<path>.lora_magnitude_vector.<adapter>.weight`` (m; saved as PEFT saves it, without
``.weight``). In eval mode the norm is computed once and reused until a weight changes (PEFT
recomputes it on every call unless ``DoraCaching`` is on); a zero-norm feature reads n = 1
instead of producing NaN. Merging folds ``W ← c ⊙ (W + s B A)`` and keeps n to unfold.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fxpeft.canonical import Site, float_weight, site_weight
from fxpeft.configs import DEFAULT_LORA_TARGETS, LoraConfig
from fxpeft.forms import adapter_dtype, child_dict, masked_samples, weight_map
from fxpeft.kept import SiteParts
from fxpeft.registry import register_method
from fxpeft.rewrite import Lowering
from fxpeft.targets import output_heads

from . import lora
from .layer_replication import with_replication
from .trainable_tokens import with_tokens
from .weight_tying import with_tying

aten = torch.ops.aten


def feature_axis(site: Site) -> int:
    """The axis of the stored weight that holds the output features the magnitude scales."""
    return 1 if site.kind == "embedding" or (site.kind == "linear" and site.fan_in_fan_out) else 0


def norm_of(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """‖weight‖ over every axis but ``axis``, shaped (features,); 0 reads as 1."""
    dims = tuple(d for d in range(weight.dim()) if d != axis)
    norm = torch.linalg.vector_norm(weight, dim=dims)
    return torch.where(norm == 0, torch.ones_like(norm), norm)


class Magnitude(nn.Module):
    """m (``weight``), and what computing with it needs: the eval-mode norm cache and, for sites
    with LoRA dropout, W applied to the dropped-out input in training (the base op re-run on the
    float weight, as PEFT computes it)."""

    def __init__(self, magnitude: torch.Tensor, site: Site, base: nn.Module):
        super().__init__()
        self.weight = nn.Parameter(magnitude)
        self.axis = feature_axis(site)
        self.kind, self.fan_in_fan_out = site.kind, site.fan_in_fan_out
        conv = site.kind == "conv"
        self.conv = dict(stride=base.stride, padding=base.padding, dilation=base.dilation, groups=base.groups) \
            if conv else None
        self._cached = None  # (key, norm)

    def norm(self, sources: tuple, combined) -> torch.Tensor:
        """n of ``combined()`` (W + s B A in the stored layout): in eval mode cached, keyed by the
        identity and version of the tensors it is made from (an optimizer step, a merge or a load
        bumps one), so neither it nor a quantized weight's dequantization is redone per call."""
        if self.training or torch.compiler.is_compiling():
            with torch.no_grad():
                return norm_of(combined(), self.axis)
        key = tuple((id(t), t.data_ptr(), lora._version(t)) for t in sources)
        if self._cached is None or self._cached[0] != key:
            with torch.no_grad():
                self._cached = (key, norm_of(combined(), self.axis))
        return self._cached[1]

    def dropped_base(self, dropped: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """W applied to the dropped-out input, without bias (training with dropout)."""
        if self.kind == "conv":
            op = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[weight.dim()]
            return op(dropped, weight, None, **self.conv)
        return F.linear(dropped, weight.t() if self.fan_in_fan_out else weight)

    def extra_repr(self) -> str:
        return f"features={self.weight.numel()}"


def _scaled_lora_weight(module: nn.Module, site: Site, adapter: str, scale) -> torch.Tensor:
    """s B A in the stored layout of the site's weight, as a graph computes it (grads flow)."""
    if site.kind == "embedding":
        return (module.lora_embedding_B[adapter] @ module.lora_embedding_A[adapter]).T * scale
    a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    if site.kind == "linear":
        delta = b @ a
        return (delta.T if site.fan_in_fan_out else delta) * scale
    r = a.shape[0]
    return (b.reshape(-1, r) @ a.reshape(r, -1)).reshape(b.shape[0], *a.shape[1:]) * scale


def dora_norm(site_module: nn.Module, adapter: str, weight_name: str, site_kind: str, fan_in_fan_out: bool,
              scale: float) -> torch.Tensor:
    """n for one adapter at one site, (features,) — read in the graph through the site module."""
    site = Site(node=None, kind=site_kind, path="", input=None, weight="", bias=None, fan_in_fan_out=fan_in_fan_out)
    if site_kind == "embedding":
        sources = (site_module.lora_embedding_A[adapter], site_module.lora_embedding_B[adapter])
    else:
        sources = (site_module.lora_A[adapter].weight, site_module.lora_B[adapter].weight)
    stored = getattr(site_module, weight_name)  # a quantized layer's packed weight: changes when it is requantized

    def combined():
        weight = float_weight(site_module, weight_name).detach()
        return weight + _scaled_lora_weight(site_module, site, adapter, scale).detach().to(weight.dtype)

    norm = site_module.lora_magnitude_vector[adapter].norm((stored, *sources), combined)
    return norm.to(stored.dtype if stored.is_floating_point() else sources[0].dtype)


def dora_dropped_base(site_module: nn.Module, adapter: str, weight_name: str, dropped: torch.Tensor,
                      base: torch.Tensor) -> torch.Tensor:
    """W x as DoRA uses it: the site's output less its bias (``base``) in eval, W on the dropped input in training."""
    magnitude = site_module.lora_magnitude_vector[adapter]
    if not magnitude.training:
        return base
    return magnitude.dropped_base(dropped, float_weight(site_module, weight_name).to(dropped.dtype))


def dora_embedding_delta(ids: torch.Tensor, a: torch.Tensor, b: torch.Tensor, padding_idx: int) -> torch.Tensor:
    return F.embedding(ids, a.T, padding_idx if padding_idx >= 0 else None) @ b.T


def lower_site(lw: Lowering, site: Site, module: nn.Module, adapters: list[str]):
    """Each adapter in turn on the output so far (PEFT's order: a later adapter's ``W x`` is the
    output of the earlier ones, less the bias). Dense graphs without dropout take the form

        y' = k ⊙ y + [v ⊙ B](A x) - (k - 1) ⊙ b,   k = 1 + (c - 1)·on,  v = c·s·on

    with ``on`` the adapter's gate: per-feature vectors folded into B and the bias, so the
    full-size output is touched once (``addcmul``) beyond LoRA's own work."""
    spec = site_weight(lw.root, site)
    dtype, base_dtype = adapter_dtype(spec), spec.dtype
    owner = lw.attr(site.path)
    weight_name = site.weight.rpartition(".")[2]
    bias = lw.attr(site.bias) if site.bias is not None else None
    out = site.output
    for adapter in adapters:
        gate = module.lora_scaling[adapter]
        x = lw.cast(site.input, dtype, base_dtype) if site.kind != "embedding" else site.input
        y = lw.cast(out, dtype, base_dtype)
        norm = lw.cast(lw.call(dora_norm, owner, adapter, weight_name, site.kind, site.fan_in_fan_out, gate.scale),
                       dtype, base_dtype)
        magnitude = lw.call(aten.reshape.default, lw.attr(f"{site.path}.lora_magnitude_vector.{adapter}.weight"), [-1])
        factor = lw.call(aten.div.Tensor, magnitude, norm)  # c, (features,)
        # 1 while unmerged (the scale gate reads s, or 0 once merged), times whether the adapter acts
        on = lw.call(aten.mul.Tensor, lw.attr(f"{site.path}.lora_scaling.{adapter}.value"),
                     1.0 / gate.scale if gate.scale else 1.0)
        dropout = module.lora_dropout[adapter] if site.kind != "embedding" else nn.Identity()
        if lw.mixed or not isinstance(dropout, nn.Identity):
            term = _general_term(lw, site, module, adapter, owner, weight_name, x, y, bias, factor, gate.scale)
            if lw.mixed:
                term = lw.call(masked_samples, lw.call(aten.mul.Tensor, term, on), lw.sample_index,
                               lw.adapter_order.index(adapter))
            else:
                term = lw.call(aten.mul.Tensor, term, lw.call(aten.mul.Tensor, on, lw.gate(adapter)))
            out = lw.call(aten.add.Tensor, out, lw.cast(term, base_dtype, dtype))
            continue
        on = lw.call(aten.mul.Tensor, on, lw.gate(adapter))
        keep = lw.call(aten.add.Tensor, lw.call(aten.mul.Tensor, lw.call(aten.sub.Tensor, factor, 1), on), 1)
        v = lw.call(aten.mul.Tensor, lw.call(aten.mul.Tensor, factor, gate.scale), on)
        if site.kind == "embedding":  # no bias there
            b_scaled = lw.call(aten.mul.Tensor, lw.attr(f"{site.path}.lora_embedding_B.{adapter}"),
                               lw.call(aten.unsqueeze.default, v, 1))
            padding_idx = site.node.args[2] if len(site.node.args) > 2 else -1
            delta = lw.call(dora_embedding_delta, x, lw.attr(f"{site.path}.lora_embedding_A.{adapter}"), b_scaled,
                            padding_idx)
        else:
            b_weight = lw.attr(f"{site.path}.lora_B.{adapter}.weight")
            v_shape = [-1] + [1] * (len(module.lora_B[adapter].weight.shape) - 1)
            b_scaled = lw.call(aten.mul.Tensor, b_weight, lw.call(aten.reshape.default, v, v_shape))
            shift = None  # -(k - 1) ⊙ b, as B's bias
            if bias is not None:
                shift = lw.call(aten.neg.default, lw.call(aten.mul.Tensor, lw.call(aten.sub.Tensor, keep, 1),
                                                           lw.cast(bias, dtype, base_dtype)))
            delta = lora.delta(lw, site, module, adapter, x, b_weight=b_scaled, b_bias=shift)
        keep = lw.call(aten.reshape.default, keep, _feature_shape(lw, site))
        out = lw.cast(lw.call(aten.addcmul.default, delta, keep, y), base_dtype, dtype)
    return out


def _feature_shape(lw: Lowering, site: Site) -> list[int]:
    """(features,) shaped to scale a site output: channels at dim 1 for conv, last otherwise."""
    return [-1] + ([1] * (_rank(lw, site) - 2) if site.kind == "conv" else [])


def _general_term(lw, site, module, adapter, owner, weight_name, x, y, bias, factor, scale):
    """``(c - 1) ⊙ W x + c ⊙ s B A x`` for one adapter, ungated: mixed graphs, and LoRA dropout
    (where ``W x`` is W on the dropped-out input in training, as PEFT computes it)."""
    without_bias = lw.call(aten.sub.Tensor, y, _bias_view(lw, bias, site)) if bias is not None else y
    dropout = module.lora_dropout[adapter] if site.kind != "embedding" else nn.Identity()
    if isinstance(dropout, nn.Identity):
        dropped, base = x, without_bias
    else:
        dropped = lw.call_module(f"{site.path}.lora_dropout.{adapter}", x)
        base = lw.call(dora_dropped_base, owner, adapter, weight_name, dropped, without_bias)
    if site.kind == "embedding":
        padding_idx = site.node.args[2] if len(site.node.args) > 2 else -1
        delta = lw.call(dora_embedding_delta, x, lw.attr(f"{site.path}.lora_embedding_A.{adapter}"),
                        lw.attr(f"{site.path}.lora_embedding_B.{adapter}"), padding_idx)
    else:
        delta = lora.delta(lw, site, module, adapter, dropped)
    factor = lw.call(aten.reshape.default, factor, _feature_shape(lw, site))
    return lw.call(aten.add.Tensor,
                   lw.call(aten.mul.Tensor, lw.call(aten.sub.Tensor, factor, 1), base),
                   lw.call(aten.mul.Tensor, lw.call(aten.mul.Tensor, factor, scale), delta))


def _rank(lw: Lowering, site: Site) -> int:
    """A conv output's rank: its weight's (batch, channels, spatial… like out, in, kernel…)."""
    return len(site_weight(lw.root, site).shape)


def _bias_view(lw: Lowering, bias, site: Site):
    if site.kind == "conv":
        return lw.call(aten.reshape.default, bias, [-1] + [1] * (_rank(lw, site) - 2))
    return bias


def add_dora(module: nn.Module, site: Site, weight, config: LoraConfig, adapter: str) -> None:
    lora.add_lora(module, site, weight, config, adapter)
    scale = module.lora_scaling[adapter].scale
    with torch.no_grad():
        base = float_weight(module, site.weight.rpartition(".")[2]).detach().to(adapter_dtype(weight))
        norm = norm_of(base + _scaled_lora_weight(module, site, adapter, scale), feature_axis(site))
    magnitude = norm if site.kind != "conv" else norm.view(1, -1, *([1] * (base.dim() - 2)))
    child_dict(module, "lora_magnitude_vector")[adapter] = Magnitude(magnitude.clone(), site, module)


def fold(gm, site: Site, module: nn.Module, adapter: str, weight, bias, sign):
    delta = lora.delta_weight(gm, site, module, adapter).to(weight.dtype)
    gate = module.lora_scaling[adapter]
    axis = feature_axis(site)
    shape = [1] * weight.dim()
    shape[axis] = -1
    m = module.lora_magnitude_vector[adapter].weight.detach().reshape(-1).to(weight.dtype)
    if sign > 0:
        gate.stash = norm_of(weight + delta, axis)
        return (m / gate.stash).view(shape) * (weight + delta), bias
    return weight / (m / gate.stash).view(shape) - delta, bias


def site_parts(gm, site: Site, module: nn.Module, adapter: str, dtype: torch.dtype, alone: bool) -> SiteParts:
    """One adapter at a linear site in eval, ungated: ``y ← c ⊙ y + (c s B) A x - (c - 1) ⊙ b`` (``lower_site``'s
    dense form with the adapter on)."""
    gate = module.lora_scaling[adapter]
    norm = dora_norm(module, adapter, site.weight.rpartition(".")[2], site.kind, site.fan_in_fan_out, gate.scale)
    c = module.lora_magnitude_vector[adapter].weight.reshape(-1).to(dtype) / norm.to(dtype)
    up = (module.lora_B[adapter].weight.to(dtype) * (c * gate.scale).unsqueeze(-1)).t()
    bias = None if site.bias is None else -(c - 1) * gm.get_parameter(site.bias).to(dtype)
    return SiteParts(c, module.lora_A[adapter].weight.to(dtype), up, None, bias)


def _dora_adapters(module: nn.Module) -> list[str]:
    holder = module._modules.get("lora_magnitude_vector")
    return list(holder.keys()) if holder is not None else []


METHOD = register_method(with_replication(with_tying(with_tokens(weight_map(
    name="dora", config_type=LoraConfig, applies=lambda config: config.use_dora, create=add_dora,
    lower_site=lower_site, fold=fold, site_parts=site_parts, containers=(*lora.CONTAINERS, "lora_magnitude_vector"),
    gates="lora_scaling",
    kinds=("linear", "conv", "embedding"), kept_kinds=("linear", "conv", "embedding"),
    default_targets=DEFAULT_LORA_TARGETS, heads=output_heads,
    adapters_at=_dora_adapters, phase=50, describe=lambda module, adapter: lora._rank(module, adapter) + " dora",
    check_site=lora.check_site, changes_base=lora.changes_base,
    checkpoint_renames=(("lora_magnitude_vector.weight", "lora_magnitude_vector"),))), add_dora)))
