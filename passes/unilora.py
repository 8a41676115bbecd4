"""Uni-LoRA (one vector is all you need), PEFT's tuners/unilora, on the additive form:

    A = θ[I_A] ⊙ S_A  (r, in)      B = θ[I_B] ⊙ S_B  (out, r)      Δ(x) = B (A dropout(x))      ΔW = B A

on linear sites (nn.Linear, GPT-2's Conv1D, quantized linears), as PEFT. Every entry of every site's LoRA
factors is read from one trained vector θ (``theta_d_length`` long) kept once on the transformed module
(``unilora_theta_d.<adapter>``, PEFT's tuner-level ``base_model.unilora_theta_d``). The fixed index maps
``<path>.unilora_indices_A/B.<adapter>`` are PEFT's ``generate_index``: the adapter's LoRA entries, sites in
module order (A then B each), take each θ index ⌊D/d⌋ times plus ``D mod d`` extras, shuffled by numpy's
generator seeded with ``proj_seed``; ``<path>.unilora_scales_A/B.<adapter>`` are 1/√(uses of that index), rounded
to the base weight's dtype as PEFT and held in the adapter's. These four are buffers, saved (PEFT's keys) only with ``save_indices``, and
otherwise rebuilt from the seed when loading. ``<path>.unilora_gate.<adapter>`` is the form's gate (scale 1).

Init as PEFT: θ uniform in ±``init_theta_d_bound`` (``init_weights``, the default) or standard normal. Uni-LoRA
has no identity start: A and B both read θ.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
from torch import nn

from fxpeft.canonical import Site
from fxpeft.configs import DEFAULT_LORA_TARGETS, PeftConfigBase, check_layer_fields
from fxpeft.forms import AdapterGate, SharedTensors, adapter_dtype, additive, child_dict
from fxpeft.registry import register_method
from fxpeft.targets import output_heads

from .vera import out_in

aten = torch.ops.aten

MAPS = ("unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B")
CONTAINERS = ("unilora_theta_d", "unilora_dropout", *MAPS)
SHARED = ("unilora_theta_d",)


@dataclass
class UniLoraConfig(PeftConfigBase):
    """PEFT's UniLoraConfig, its fields, defaults and checks: ``r`` (4), ``proj_seed`` (42), ``theta_d_length``
    (256), ``unilora_dropout``, ``fan_in_fan_out``, ``bias`` ("none", "all", "unilora_only"),
    ``init_theta_d_bound`` (0.02), ``init_weights``, ``save_indices`` and the targeting fields (PEFT's
    UniLoraConfig has no ``exclude_modules``)."""

    r: int = 4
    proj_seed: int = 42
    theta_d_length: int = 256
    target_modules: Optional[Union[list[str], str]] = None
    unilora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: Optional[list[str]] = None
    init_theta_d_bound: float = 0.02
    init_weights: bool = True
    save_indices: bool = False
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None

    peft_type = "UNILORA"

    def __post_init__(self):
        super().__post_init__()
        # PEFT's checks, PEFT's words
        if self.r <= 0:
            raise ValueError(f"`r` should be a positive integer, got {self.r}.")
        if self.theta_d_length <= 0:
            raise ValueError(f"`theta_d_length` should be a positive integer, got {self.theta_d_length}.")
        if not 0.0 <= self.unilora_dropout <= 1.0:
            raise ValueError(f"`unilora_dropout` should be between 0.0 and 1.0, got {self.unilora_dropout}.")
        if self.init_theta_d_bound <= 0:
            raise ValueError(f"`init_theta_d_bound` should be a positive float, got {self.init_theta_d_bound}.")
        if self.bias not in {"none", "all", "unilora_only"}:
            raise ValueError(f"`bias` should be 'none', 'all', or 'unilora_only', got {self.bias}.")
        check_layer_fields(self, pattern=False)


def generate_index(count: int, length: int, seed: int) -> torch.Tensor:
    """PEFT's ``generate_index``: every index ⌊count/length⌋ times, ``count mod length`` distinct extras, then
    shuffled, all by ``np.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    data = np.repeat(np.arange(length), count // length)
    if count % length:
        data = np.concatenate([data, rng.choice(length, size=count % length, replace=False)])
    rng.shuffle(data)
    return torch.as_tensor(data, dtype=torch.long)


def prepare(gm, targets, config: UniLoraConfig, adapter: str) -> None:
    """θ, then every site's index maps and scales, in PEFT's order: θ is drawn first (uniform or normal); each
    layer then draws placeholder indices from the global generator (PEFT's ``reset_unilora_parameters``, drawn
    so a seed leaves the generator where PEFT leaves it) before the seeded map replaces them."""
    theta = torch.empty(config.theta_d_length).uniform_(-config.init_theta_d_bound, config.init_theta_d_bound) \
        if config.init_weights else torch.randn(config.theta_d_length)
    shapes = []
    for _, site, weight in targets:
        out_f, in_f = out_in(site, weight)
        shapes.append(((config.r, in_f), (out_f, config.r)))
        for shape in shapes[-1]:
            torch.randint(0, config.theta_d_length, shape, dtype=torch.long)
    indices = generate_index(sum(a[0] * a[1] + b[0] * b[1] for a, b in shapes), config.theta_d_length,
                             config.proj_seed)
    counts = torch.bincount(indices, minlength=config.theta_d_length)
    inverse_root = torch.zeros(config.theta_d_length)
    inverse_root[counts > 0] = counts[counts > 0].float().rsqrt()
    start = 0
    for (module, _, weight), site_shapes in zip(targets, shapes):
        for side, shape in zip("AB", site_shapes):
            chunk = indices[start:start + shape[0] * shape[1]].view(shape).clone()
            start += chunk.numel()
            holder = {name: child_dict(module, name, SharedTensors) for name in MAPS}  # buffer dicts, per site
            for name in holder.values():
                name.persistent = bool(config.save_indices)  # PEFT sets it per layer, for all its adapters
            holder[f"unilora_indices_{side}"][adapter] = chunk.to(weight.device)
            # PEFT rounds the scales to the base weight's dtype (a float one: a quantized weight's is its
            # storage); held in the adapter's dtype, which the site computes in (θ's, as PEFT's)
            scales = inverse_root[chunk].to(weight.dtype if weight.dtype.is_floating_point else torch.float32)
            holder[f"unilora_scales_{side}"][adapter] = scales.to(weight.device, adapter_dtype(weight))
    first_weight = targets[0][2]
    child_dict(gm, "unilora_theta_d", nn.ParameterDict)[adapter] = nn.Parameter(
        theta.to(first_weight.device, adapter_dtype(first_weight)))


def add_unilora(module: nn.Module, site: Site, weight, config: UniLoraConfig, adapter: str) -> None:
    child_dict(module, "unilora_dropout")[adapter] = nn.Dropout(config.unilora_dropout) \
        if config.unilora_dropout > 0 else nn.Identity()
    child_dict(module, "unilora_gate")[adapter] = AdapterGate(1.0, config.unilora_dropout).to(weight.device)


def factor(theta: torch.Tensor, indices: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """PEFT's ``_get_lora_matrices``: a factor's entries read from θ and scaled."""
    return theta[indices] * scales


def delta(lw, site: Site, module: nn.Module, adapter: str, x):
    theta = lw.attr(f"unilora_theta_d.{adapter}")
    a, b = (lw.call(factor, theta, lw.attr(f"{site.path}.unilora_indices_{side}.{adapter}"),
                    lw.attr(f"{site.path}.unilora_scales_{side}.{adapter}")) for side in "AB")
    return lw.call(aten.linear.default, lw.call(aten.linear.default, x, a), b)


def delta_weight(gm, site: Site, module: nn.Module, adapter: str) -> torch.Tensor:
    """PEFT's ``get_delta_weight``: B A (in float32 for a half-precision θ on the CPU, as PEFT), transposed
    for Conv1D."""
    a, b = delta_factors(gm, site, module, adapter)
    weight = b @ a
    return weight.T if site.fan_in_fan_out else weight


def delta_factors(gm, site: Site, module: nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW as (out, in) = B A, B times the scale."""
    theta = gm._modules["unilora_theta_d"][adapter]
    a_scales, b_scales = module.unilora_scales_A[adapter], module.unilora_scales_B[adapter]
    if theta.device.type == "cpu" and theta.dtype in (torch.float16, torch.bfloat16):
        theta, a_scales, b_scales = theta.float(), a_scales.float(), b_scales.float()
    a = factor(theta, module.unilora_indices_A[adapter], a_scales)
    return a, factor(theta, module.unilora_indices_B[adapter], b_scales) * module.unilora_gate[adapter].scale


METHOD = register_method(additive(
    name="unilora", config_type=UniLoraConfig, create=add_unilora, delta=delta, delta_weight=delta_weight,
    delta_factors=delta_factors,
    containers=CONTAINERS, shared=SHARED, gates="unilora_gate", dropouts="unilora_dropout", kinds=("linear",),
    dtype_of=lambda module, adapter: module.unilora_scales_A[adapter].dtype, prepare=prepare,
    default_targets=DEFAULT_LORA_TARGETS, heads=output_heads,
    describe=lambda module, adapter: f"r={module.unilora_indices_A[adapter].shape[0]}"))
