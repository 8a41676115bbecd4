"""PEANuT (PEFT's tuners/peanut): a small network computes a linear site's weight change from its weight,

    h_0 = σ(Wᵀ A),  h_i = σ(h_{i-1} E_i) (i = 1 … depth)            (Wᵀ: (in, out), A: (out, r))
    g_depth = h_depth,  g_{i-1} = σ(g_i D_i) + h_{i-1} (decoders, each adding its encoder's input back)
    ΔW = scaling · (g_0 B)ᵀ    (B: (r, out))                        Δ(x) = x ΔWᵀ

σ = ``act_fn`` (transformers' ACT2FN names, as PEFT). State under PEFT's names: ``<path>.peanut_A.<adapter>``
and ``peanut_B`` (bias-free nn.Linear), ``peanut_encoders`` / ``peanut_decoders`` (ModuleLists of ``depth``
bias-free r×r linears; in files ``…peanut_encoders.0.weight``); ``<path>.peanut_gate.<adapter>`` is the
form's gate (its scale is ``scaling``; not saved). The default init zeroes B (the identity start).

On the additive form through passes/weight_delta.py: ΔW depends on W, so merging adds ΔW(W0) with W0
the weight before the site's first PEANuT merge, as PEFT, and unmerging subtracts it. Sites: nn.Linear,
as PEFT (which raises NotImplementedError for other layer types, GPT-2's Conv1D included); beyond PEFT,
fxpeft's quantized linears (W is their dequantized weight; PEFT computes with the packed weight and fails).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from fxpeft.canonical import Site
from fxpeft.configs import DEFAULT_LORA_TARGETS, PeftConfigBase, check_layer_fields
from fxpeft.forms import AdapterGate, adapter_dtype, child_dict
from fxpeft.registry import register_method
from fxpeft.targets import output_heads

from . import weight_delta

CONTAINERS = ("peanut_A", "peanut_B", "peanut_encoders", "peanut_decoders")


def activations() -> dict:
    from transformers.activations import ACT2FN  # PEFT's table of act_fn names
    return ACT2FN


@dataclass
class PeanutConfig(PeftConfigBase):
    """PEFT's PeanutConfig: ``r`` (32), ``depth`` (0: A and B only), ``act_fn`` ("relu"), ``scaling``
    (1.0), ``init_weights`` (True: B starts at zero) and the targeting fields."""

    r: int = 32
    depth: int = 0
    act_fn: str = "relu"
    scaling: float = 1.0
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    init_weights: bool = True

    peft_type = "PEANUT"

    def __post_init__(self):
        super().__post_init__()
        # PEFT's checks, PEFT's words
        check_layer_fields(self, regex=())
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError("`r` must be a positive integer.")
        if not isinstance(self.depth, int) or isinstance(self.depth, bool) or self.depth < 0:
            raise ValueError("`depth` can only be a non-negative integer.")
        if self.act_fn not in activations():
            raise ValueError(f"Unsupported `act_fn`: {self.act_fn}. Must be one of {sorted(activations().keys())}.")


def check_site(module: nn.Module, site: Site, weight_spec, config: PeanutConfig) -> None:
    if site.fan_in_fan_out:
        raise NotImplementedError(f"PEANuT does not support target modules of type {type(module).__name__} yet "
                                  f"({site.path!r}; PEFT raises too): it adapts nn.Linear layers. Leave it out of "
                                  "target_modules.")


def add_peanut(module: nn.Module, site: Site, weight_spec, config: PeanutConfig, adapter: str) -> None:
    """PEFT's ``update_layer`` and ``reset_peanut_parameters``: He-uniform (a=√5) A, encoders, decoders,
    then B zero (``init_weights``) or He-uniform."""
    out_f, _ = weight_spec.shape
    r = config.r
    a = nn.Linear(out_f, r, bias=False)  # built in PEFT's order: each constructor draws too
    encoders = nn.ModuleList([nn.Linear(r, r, bias=False) for _ in range(config.depth)])
    decoders = nn.ModuleList([nn.Linear(r, r, bias=False) for _ in range(config.depth)])
    b = nn.Linear(r, out_f, bias=False)
    for layer in (a, *encoders, *decoders):
        nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5))
    if config.init_weights:
        nn.init.zeros_(b.weight)
    else:
        nn.init.kaiming_uniform_(b.weight, a=math.sqrt(5))
    dtype = adapter_dtype(weight_spec)
    for name, part in zip(CONTAINERS, (a, b, encoders, decoders)):
        child_dict(module, name)[adapter] = part.to(weight_spec.device, dtype)
    gate = AdapterGate(config.scaling).to(weight_spec.device)
    gate.act_fn = config.act_fn
    gate.activation = activations()[config.act_fn]
    child_dict(module, "peanut_gate")[adapter] = gate


def unscaled_delta_weight(site_module: nn.Module, adapter: str, weight: torch.Tensor) -> torch.Tensor:
    """(g_0 B)ᵀ, (out, in), before ``scaling`` (the gate's scale)."""
    a, b = site_module.peanut_A[adapter], site_module.peanut_B[adapter]
    encoders, decoders = site_module.peanut_encoders[adapter], site_module.peanut_decoders[adapter]
    act = site_module.peanut_gate[adapter].activation
    h = act(weight.t().to(a.weight.dtype) @ a.weight.t())
    residuals = []
    for encoder in encoders:
        residuals.append(h)
        h = act(encoder(h))
    for decoder, residual in zip(decoders, reversed(residuals)):
        h = act(decoder(h)) + residual
    return b(h).t()


def peanut_delta(site_module: nn.Module, adapter: str, x: torch.Tensor, weight: torch.Tensor, bias,
                 output) -> torch.Tensor:
    return torch.nn.functional.linear(x, unscaled_delta_weight(site_module, adapter, weight).to(x.dtype))


def peanut_change(site_module: nn.Module, adapter: str, w0: torch.Tensor, b0):
    scale = site_module.peanut_gate[adapter].scale
    return unscaled_delta_weight(site_module, adapter, w0) * scale, None


METHOD = register_method(weight_delta.method(
    name="peanut", config_type=PeanutConfig, create=add_peanut, check_site=check_site, gates="peanut_gate",
    delta=peanut_delta, change=peanut_change, containers=CONTAINERS, kinds=("linear",),
    dtype_of=lambda module, adapter: module.peanut_A[adapter].weight.dtype,
    default_targets=DEFAULT_LORA_TARGETS, heads=output_heads,
    describe=lambda module, adapter: (f"r={module.peanut_A[adapter].out_features} "
                                      f"depth={len(module.peanut_encoders[adapter])} "
                                      f"act={module.peanut_gate[adapter].act_fn}")))
