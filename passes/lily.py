"""Lily (PEFT's tuners/lily: low-rank interconnected adaptation across layers), on the additive form:

    h = A x          p = mean over the batch's rows of softmax(router h)   (num_B,)
    Δ(x) = scaling · h (Σ_e p_e B_e)                                       B_e: (r, out)

on nn.Linear sites (and quantized linears), as PEFT. Per site, PEFT's names:
``<path>.lily_A.<adapter>`` (nn.Linear in → r), ``<path>.lily_B.<adapter>`` (nn.Linear out → num_B·r,
its weight read as num_B experts of (r, out)) and ``<path>.lily_router.<adapter>`` (r → num_B).
Sites are grouped by (the target name their path ends with, their weight's shape), in module
order: every site of a group shares the group's first B, and each run of ``stride_A`` sites shares
its first site's A. Shared means the same nn.Linear registered beside each site, as PEFT's
``_post_injection_hook`` does: it trains once, and checkpoints hold a copy per site as PEFT's do.
Every site draws its own A, B and router first (PEFT's draws, in PEFT's order, so one seed gives
PEFT's start); the later members of a group then drop theirs for the leader's.

The router averages over every row of the batch, so a sample's Δ depends on the other samples (as
in PEFT). Mixed batches average over the samples that chose the adapter: each adapter's samples
get what calling that sub-batch alone gives (PEFT ignores ``adapter_names`` for Lily and applies
the active adapter to every sample). Lily cannot be merged (ΔW depends on the input; PEFT raises too).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from fxpeft.canonical import Site
from fxpeft.configs import DEFAULT_LORA_TARGETS, PeftConfigBase, check_layer_fields
from fxpeft.forms import AdapterGate, adapter_dtype, additive, child_dict
from fxpeft.kept import SiteParts
from fxpeft.registry import register_method
from fxpeft.rewrite import samples_of
from fxpeft.targets import output_heads


@dataclass
class LilyConfig(PeftConfigBase):
    """PEFT's LilyConfig: ``r`` (32), ``stride_A`` (1: consecutive sites of a target sharing an A),
    ``num_B`` (2: B experts shared by a target's sites), ``scaling`` (1.0, a plain multiplier),
    ``init_weights`` (True: B zero, the identity start) and the targeting fields."""

    r: int = 32
    stride_A: int = 1
    num_B: int = 2
    scaling: float = 1.0
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    init_weights: bool = True

    peft_type = "LILY"

    def __post_init__(self):
        super().__post_init__()
        # PEFT's checks, PEFT's words
        check_layer_fields(self, regex=())
        if self.stride_A < 1:
            raise ValueError("`stride_A` must be at least 1.")
        if self.num_B < 2:
            raise ValueError("`num_B` must be at least 2 for the router to be trained.")
        if self.r <= 0:  # PEFT raises this when it builds the first layer
            raise ValueError(f"`r` should be a positive integer value but the value passed is {self.r}")


def check_site(module: nn.Module, site: Site, weight_spec, config: LilyConfig) -> None:
    if site.kind != "linear" or site.fan_in_fan_out:
        raise NotImplementedError(f"Lily does not support target modules of type {type(module).__name__} yet "
                                  f"({site.path!r}; PEFT adapts torch.nn.Linear only). Leave it out of target_modules.")


def group_of(config: LilyConfig, path: str, shape) -> tuple:
    """PEFT's sharing group: (the target name the path ends with — the longest, should several —, or
    the regex itself; the weight's shape)."""
    targets = config.target_modules
    if isinstance(targets, str):
        return targets, tuple(shape)
    return max((t for t in targets if path.endswith(t)), key=len), tuple(shape)


def add_lily_everywhere(gm, targets, config: LilyConfig, adapter: str) -> None:
    """Every site's A, B and router, drawn in module order as PEFT's layers draw them (nn.Linear's
    own init, then PEFT's reset), then the sharing of PEFT's ``_post_injection_hook``."""
    groups: dict[tuple, list[nn.Module]] = {}
    for module, site, weight_spec in targets:
        out_features, in_features = weight_spec.shape
        lily_a = nn.Linear(in_features, config.r, bias=False)
        lily_b = nn.Linear(out_features, config.num_B * config.r, bias=False)
        router = nn.Linear(config.r, config.num_B, bias=False)
        nn.init.kaiming_uniform_(lily_a.weight, a=5 ** 0.5)
        nn.init.kaiming_uniform_(router.weight, a=5 ** 0.5)
        if config.init_weights:
            nn.init.zeros_(lily_b.weight)
        else:
            nn.init.kaiming_uniform_(lily_b.weight, a=5 ** 0.5)
        dtype, device = adapter_dtype(weight_spec), weight_spec.device
        for container, layer in (("lily_A", lily_a), ("lily_B", lily_b), ("lily_router", router)):
            child_dict(module, container)[adapter] = layer.to(device, dtype)
        gate = AdapterGate(config.scaling).to(device)
        gate.num_b = config.num_B
        child_dict(module, "lily_gate")[adapter] = gate
        groups.setdefault(group_of(config, site.path, weight_spec.shape), []).append(module)
    for members in groups.values():
        for i, module in enumerate(members):
            module.lily_B[adapter] = members[0].lily_B[adapter]
            module.lily_A[adapter] = members[i - i % config.stride_A].lily_A[adapter]


def lily_delta(x: torch.Tensor, a: torch.Tensor, router: torch.Tensor, b: torch.Tensor, num_b: int,
               index: Optional[torch.Tensor] = None, slot: int = 0) -> torch.Tensor:
    """PEFT's forward (before scaling); in mixed graphs the routing mean runs over the rows of the
    samples whose adapter is ``slot`` only."""
    hidden = F.linear(x.to(a.dtype), a)
    probabilities = F.softmax(F.linear(hidden, router), dim=-1)
    if index is None:
        expert = probabilities.reshape(-1, num_b).mean(dim=0)
    else:
        rows = samples_of(index, slot, probabilities).to(probabilities.dtype)
        rows = rows.expand(*probabilities.shape[:-1], 1).reshape(-1, 1)
        expert = (probabilities.reshape(-1, num_b) * rows).sum(dim=0) / rows.sum().clamp_min(1)
    combined = torch.einsum("e,eio->io", expert, b.reshape(num_b, -1, b.shape[1]))
    return torch.matmul(hidden, combined)


def kept_delta(x: torch.Tensor, a: torch.Tensor, router: torch.Tensor, b: torch.Tensor,
               scale: torch.Tensor) -> torch.Tensor:
    """The scaled delta from kept tensors (the expert count from the router's rows), for generation graphs."""
    return lily_delta(x, a, router, b, router.shape[0]) * scale


def site_parts(gm, site: Site, module: nn.Module, adapter: str, dtype: torch.dtype, alone: bool) -> SiteParts:
    """The adapter in eval as a traced call on its tensors: its router is not linear in x (the routing mean
    runs over the batch's tokens at every step)."""
    weights = [module._modules[c][adapter].weight.detach() for c in ("lily_A", "lily_router", "lily_B")]
    scale = torch.tensor(module.lily_gate[adapter].scale, dtype=weights[0].dtype, device=weights[0].device)
    return SiteParts(call=(kept_delta, (*weights, scale)))


def delta(lw, site: Site, module: nn.Module, adapter: str, x):
    weights = [lw.attr(f"{site.path}.{c}.{adapter}.weight") for c in ("lily_A", "lily_router", "lily_B")]
    num_b = module.lily_gate[adapter].num_b
    if lw.mixed:
        return lw.call(lily_delta, x, *weights, num_b, lw.sample_index, lw.adapter_order.index(adapter))
    return lw.call(lily_delta, x, *weights, num_b)


def refuse_merge(gm, site, module, adapter, weight, bias, sign):
    raise NotImplementedError(f"Lily adapter {adapter!r} cannot be merged: its router mixes the B experts by the "
                              "batch's mean routing probabilities, so its ΔW depends on the input (PEFT raises too). "
                              "Keep it unmerged, or fxpeft.unload the base model.")


# Every site's state is made in ``prepare`` (the sharing needs all sites at once), so ``create`` has
# nothing left to do; merging would fold ΔW, which Lily has none of (``refuse_merge``).
METHOD = register_method(dataclasses.replace(additive(
    name="lily", config_type=LilyConfig, create=lambda *args: None, prepare=add_lily_everywhere, delta=delta,
    delta_weight=None, site_parts=site_parts, containers=("lily_A", "lily_B", "lily_router"), gates="lily_gate",
    kinds=("linear",),
    dtype_of=lambda module, adapter: module.lily_A[adapter].weight.dtype, check_site=check_site,
    default_targets=DEFAULT_LORA_TARGETS, heads=output_heads,
    describe=lambda module, adapter: "r={} num_B={}".format(module.lily_A[adapter].out_features,
                                                             module.lily_gate[adapter].num_b)),
    fold=refuse_merge))
