"""RoAd (PEFT's tuners/road, https://huggingface.co/papers/2409.00119): each pair of a site's
output features is rotated and scaled, on the weight-map form (fxpeft/forms.py):

    y = R (W x + b)          R acts on pairs (y_i, y_j), j = i + group_size/2 inside each group:
    y_i' = c1_i y_i - c2_i y_j,      y_j' = c1_j y_j + c2_j y_i

computed elementwise: ``y ⊙ c1 + rotate_half(y) ⊙ c2`` with ``rotate_half(y) = (-y_j, y_i)`` per
group, ``c1 = α cos θ`` and ``c2 = α sin θ`` from PEFT's ``variant``:

    road_1: θ, α (out/2,): one angle and scale per pair, shared by its two elements
    road_2: θ, α (out,):   one per element
    road_4: θ, α (2·out,): per group, the first half of θ and α makes c1, the second c2

``<path>.road_theta.<adapter>`` and ``<path>.road_alpha.<adapter>`` are PEFT's names; the default
init (θ = 0, α = 1) is the identity. On nn.Linear and quantized linears, as PEFT (GPT-2's Conv1D,
convolutions and embeddings raise). Several adapters compose (the first active one rotates first);
each enters as ``c1 → g c1 + (1 - g)``, ``c2 → g c2`` with ``g`` its gate (per sample in mixed
batches), so activity and merging stay data. Merging: ``W ← R W``, ``b ← R b``; unmerging uses
R's inverse, as PEFT (R need not be orthogonal once α trains).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from fxpeft.canonical import Site, site_weight
from fxpeft.configs import DEFAULT_LORA_TARGETS, PeftConfigBase
from fxpeft.forms import AdapterGate, adapter_dtype, child_dict, weight_map
from fxpeft.kept import SiteParts
from fxpeft.registry import register_method
from fxpeft.rewrite import Lowering
from fxpeft.targets import output_heads

from . import orthogonal

aten = torch.ops.aten
VARIANTS = {"road_1": 0.5, "road_2": 1, "road_4": 2}  # parameters per output feature


@dataclass
class RoadConfig(PeftConfigBase):
    """PEFT's RoadConfig: ``variant`` ("road_1", "road_2", "road_4"), ``group_size`` (64: features
    are paired within groups of this many; it must divide every targeted layer's out_features),
    ``init_weights`` (True: the identity) and the targeting fields (PEFT's RoadConfig has no
    ``exclude_modules`` and no ``layers_to_transform``)."""

    variant: str = "road_1"
    group_size: int = 64
    init_weights: bool = True
    target_modules: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None

    peft_type = "ROAD"

    def __post_init__(self):
        super().__post_init__()
        # PEFT's checks, PEFT's words
        if self.variant not in VARIANTS:
            raise ValueError(f"Invalid variant {self.variant} specified. Please choose from road_1, road_2 or road_4")
        if self.group_size <= 0 or self.group_size % 2 != 0:
            raise ValueError(f"The group_size must be divisible by 2 when using RoadLayer, but got {self.group_size}.")


def columns(module: nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(c1, c2), each (out,), as PEFT's ``_prepare_cols``."""
    gate = module.road_gate[adapter]
    theta, alpha, half = module.road_theta[adapter], module.road_alpha[adapter], gate.group_size // 2
    if gate.variant == "road_1":  # each pair's angle and scale serve both its elements
        theta = theta.reshape(-1, half).repeat_interleave(2, dim=0).flatten()
        alpha = alpha.reshape(-1, half).repeat_interleave(2, dim=0).flatten()
        return alpha * theta.cos(), alpha * theta.sin()
    if gate.variant == "road_2":
        return alpha * theta.cos(), alpha * theta.sin()
    theta = theta.reshape(-1, 2, gate.group_size)
    alpha = alpha.reshape(-1, 2, gate.group_size)
    return alpha[:, 0].flatten() * theta[:, 0].cos().flatten(), alpha[:, 1].flatten() * theta[:, 1].sin().flatten()


def rotate_half(y: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per group of the last dim, (y_i, y_j) → (-y_j, y_i): the pairs' partners, one negated."""
    grouped = y.reshape(-1, 2, group_size // 2)
    return torch.stack((-grouped[:, 1], grouped[:, 0]), dim=1).reshape(y.shape)


def road_rotate(module: nn.Module, adapter: str, y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``R y`` where the adapter acts (g = 1), ``y`` where it does not (g = 0); g is 0-dim, or per row
    (broadcast over the features) in mixed batches."""
    c1, c2 = columns(module, adapter)
    g = g.to(c1.dtype)
    return y * (g * c1 + (1 - g)) + rotate_half(y, module.road_gate[adapter].group_size) * (g * c2)


def site_parts(gm, site: Site, module: nn.Module, adapter: str, dtype: torch.dtype, alone: bool):
    """The adapter at a site in eval: ``y ← c1 ⊙ y + (±c2) ⊙ y[partner]``, each feature's pair partner
    (j = i ± group_size/2 in its group; rotate_half's sign folded into the turn); None beside another
    acting RoAd adapter (rotations of pairs chain)."""
    if not alone:
        return None
    c1, c2 = columns(module, adapter)
    # rotate_half of 1, 2, …: each feature's partner (|value| - 1) and sign, paired as the lowering pairs them
    counting = torch.arange(1, c1.shape[0] + 1, device=c1.device, dtype=torch.float64)
    turned = rotate_half(counting, module.road_gate[adapter].group_size)
    partner, sign = turned.abs().long() - 1, turned.sign().to(c2.dtype)
    return SiteParts(k=c1.detach().to(dtype), turn=(c2.detach() * sign).to(dtype), partner=partner)


def matrix(module: nn.Module, adapter: str) -> torch.Tensor:
    """R (out, out) as a dense matrix, for merging: ``R e_k`` column by column."""
    c1, _ = columns(module, adapter)
    eye = torch.eye(c1.shape[0], device=c1.device, dtype=c1.dtype)
    one = torch.ones((), device=c1.device, dtype=c1.dtype)
    return road_rotate(module, adapter, eye, one).t()  # row k of the result is R e_k


def check_site(module: nn.Module, site: Site, weight_spec, config: RoadConfig) -> None:
    name = f"{site.path!r} ({type(module).__name__})"
    if site.kind != "linear" or site.fan_in_fan_out:
        raise ValueError(f"Target module {name} is not supported. Currently, only the following modules are "
                         "supported: `torch.nn.Linear` (PEFT's RoAd). Leave it out of target_modules.")
    out_features = weight_spec.shape[0]
    if out_features % config.group_size:
        raise ValueError(f"The out_features of the base layer must be divisible by group_size ({config.group_size}) "
                         f"when using RoadLayer: {name} has {out_features}. Choose a group_size dividing it.")


def add_road(module: nn.Module, site: Site, weight_spec, config: RoadConfig, adapter: str) -> None:
    size = int(weight_spec.shape[0] * VARIANTS[config.variant])
    theta, alpha = torch.empty(size), torch.empty(size)
    if config.init_weights:
        nn.init.zeros_(theta)
        nn.init.ones_(alpha)
    else:  # PEFT's random start: θ, then α
        nn.init.normal_(theta, mean=0.0, std=0.5)
        nn.init.normal_(alpha, mean=1.0, std=0.5)
    dtype = adapter_dtype(weight_spec)
    child_dict(module, "road_theta", nn.ParameterDict)[adapter] = nn.Parameter(theta.to(weight_spec.device, dtype))
    child_dict(module, "road_alpha", nn.ParameterDict)[adapter] = nn.Parameter(alpha.to(weight_spec.device, dtype))
    gate = AdapterGate(1.0).to(weight_spec.device)
    gate.variant, gate.group_size = config.variant, config.group_size
    child_dict(module, "road_gate")[adapter] = gate


def lower_site(lw: Lowering, site: Site, module: nn.Module, adapters: list[str]):
    spec = site_weight(lw.root, site)
    dtype, base_dtype = adapter_dtype(spec), spec.dtype
    owner = lw.attr(site.path)
    y = lw.cast(site.output, dtype, base_dtype)
    for adapter in adapters:  # R2 (R1 y): PEFT's order
        value = lw.attr(f"{site.path}.road_gate.{adapter}.value")
        if lw.mixed:
            g = lw.call(orthogonal.sample_gate, value, lw.sample_index, lw.adapter_order.index(adapter), y)
        else:
            g = lw.call(aten.mul.Tensor, value, lw.gate(adapter))
        y = lw.call(road_rotate, owner, adapter, y, g)
    return lw.cast(y, base_dtype, dtype)


def fold(gm, site: Site, module: nn.Module, adapter: str, weight, bias, sign):
    """``W ← R W``, ``b ← R b`` (sign 1); R's inverse for unmerging (-1), in float64 (PEFT's float32
    inverse loses digits where a trained α makes a pair's 2×2 block nearly singular)."""
    with torch.no_grad():
        r = matrix(module, adapter).detach().double()
    if sign < 0:
        r = torch.linalg.inv(r)
    weight = (r @ weight.double()).to(weight.dtype)
    if bias is not None:
        bias = (r @ bias.double()).to(bias.dtype)
    return weight, bias


METHOD = register_method(weight_map(
    name="road", config_type=RoadConfig, create=add_road, check_site=check_site, lower_site=lower_site, fold=fold,
    containers=("road_theta", "road_alpha"), gates="road_gate", kinds=("linear",),
    default_targets=DEFAULT_LORA_TARGETS, heads=output_heads, phase=60, site_parts=site_parts,
    describe=lambda module, adapter: "{0.variant} group_size={0.group_size}".format(module.road_gate[adapter])))
