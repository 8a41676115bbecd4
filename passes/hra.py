"""HRA (PEFT's tuners/hra): a chain of r Householder reflections turns a site's weight, on the
weight-map form through passes/orthogonal.py:

    H = (I - 2 u_0 u_0^T)(I - 2 u_1 u_1^T) ⋯ (I - 2 u_{r-1} u_{r-1}^T),   u_i = hra_u[:, i] / ‖·‖
    (``apply_GS``: the columns made orthonormal by Gram-Schmidt first, H = I - 2 U U^T)

    nn.Linear (and quantized linears):  y = (W H) x + b = W (x H^T) + b      merged: W ← W H
    nn.Conv2d:                          W ← W H over the flattened filter (C·k·k)

``hra_u.<adapter>`` (features, r), PEFT's name. The default init pairs equal columns (each pair
of reflections cancels: H = I), which needs an even r (an odd r warns and starts random, as PEFT).
Unmerged linear sites apply the reflections to x one by one (O(r) per feature vector) instead of
forming W H. PEFT's HRA computes with a bitsandbytes layer's packed weight and fails there;
fxpeft's quantized linears rotate the input and work.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from fxpeft.canonical import Site, float_weight
from fxpeft.configs import DEFAULT_LORA_TARGETS, PeftConfigBase, check_bias, check_layer_fields
from fxpeft.forms import AdapterGate, adapter_dtype, child_dict, weight_map
from fxpeft.kept import SiteParts
from fxpeft.registry import register_method
from fxpeft.targets import output_heads

from . import orthogonal


@dataclass
class HRAConfig(PeftConfigBase):
    """PEFT's HRAConfig: its field names, defaults and validation."""

    r: int = 8
    apply_GS: bool = False
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    init_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    bias: str = "none"
    modules_to_save: Optional[list[str]] = None

    peft_type = "HRA"

    def __post_init__(self):
        super().__post_init__()
        check_layer_fields(self)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {self.r!r}.")
        check_bias(self, "hra_only")


def householder(site_module: nn.Module, adapter: str) -> torch.Tensor:
    """H as PEFT's ``get_delta_weight`` builds it (gradients flowing to ``hra_u``)."""
    u = site_module.hra_u[adapter]
    n, rank = u.shape
    eye = torch.eye(n, device=u.device, dtype=u.dtype)
    if site_module.hra_gate[adapter].apply_gs:
        basis = gram_schmidt(u)
        return eye - 2 * basis @ basis.t()
    u = u / u.norm(dim=0)
    h = eye
    for i in range(rank):
        column = u[:, i].view(-1, 1)
        h = h - 2 * h @ column @ column.t()
    return h


def gram_schmidt(u: torch.Tensor) -> torch.Tensor:
    columns = [(u[:, 0] / u[:, 0].norm()).view(-1, 1)]
    for i in range(1, u.shape[1]):
        column = u[:, i].view(-1, 1)
        for done in columns:
            column = column - (done.t() @ column) * done
        columns.append((column / column.norm()).view(-1, 1))
    return torch.cat(columns, dim=1)


def hra_rotate(site_module: nn.Module, adapter: str, v: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``v + g (v H^T - v)``, v H^T = v H_{r-1} ⋯ H_0: the reflections applied to v, the last first."""
    u = site_module.hra_u[adapter]
    reflected = v.to(u.dtype)
    if site_module.hra_gate[adapter].apply_gs:
        basis = gram_schmidt(u)
        reflected = reflected - 2 * (reflected @ basis) @ basis.t()
    else:
        u = u / u.norm(dim=0)
        for i in reversed(range(u.shape[1])):
            reflected = reflected - 2 * (reflected @ u[:, i:i + 1]) * u[:, i]
    return orthogonal.blend(v, reflected.to(v.dtype), gate)


def hra_matrix(site_module: nn.Module, adapter: str) -> torch.Tensor:
    """Q = H^T, so that the form's ``W Q^T`` is PEFT's ``W H``."""
    return householder(site_module, adapter).t()


def site_parts(gm, site: Site, module: nn.Module, adapter: str, dtype: torch.dtype, alone: bool) -> SiteParts:
    """The adapter at a linear site in eval. Alone there, low rank: the reflections' product is
    ``P = H_{r-1} ⋯ H_0 = I + U C U^T`` (C r × r, built one reflection at a time: ``P H_k`` changes column k
    of C by ``-2 (e_k + C U^T u_k)``; Gram-Schmidt: C = -2 I), so ``W (x P)`` is ``y + (x U C) (W U)^T``,
    as cheap as the reflections; beside another acting HRA adapter (they chain), Q = H^T dense."""
    if not alone:
        return SiteParts(rotation=hra_matrix(module, adapter).to(dtype).unsqueeze(0))
    u = module.hra_u[adapter].to(dtype)
    eye = torch.eye(u.shape[1], device=u.device, dtype=dtype)
    if module.hra_gate[adapter].apply_gs:
        u, c = gram_schmidt(u), -2 * eye
    else:
        u = u / u.norm(dim=0)
        c, overlap = torch.zeros_like(eye), u.t() @ u
        for k in reversed(range(eye.shape[0])):  # x meets H_{r-1} first
            c[:, k] -= 2 * (eye[k] + c @ overlap[:, k])
    weight = float_weight(module).detach()
    weight = (weight.t() if site.fan_in_fan_out else weight).to(dtype)
    return SiteParts(down=(u @ c).t(), up=(weight @ u).t())


def check_site(module: nn.Module, site, weight_spec, config: HRAConfig) -> None:
    orthogonal.check_site_kinds("HRA", module, site, ("linear", "conv"))


def add_hra(module: nn.Module, site, weight_spec, config: HRAConfig, adapter: str) -> None:
    features = orthogonal.input_features(module, site, weight_spec)
    u = torch.empty(features, config.r)
    if not config.init_weights:
        nn.init.kaiming_uniform_(u, a=math.sqrt(5))
    elif config.r % 2:
        warnings.warn(f"The symmetric initialization can NOT be performed when r is odd ({site.path!r}: r={config.r})! "
                      "HRA starts from random reflections, not the identity.")
        nn.init.kaiming_uniform_(u, a=math.sqrt(5))
    else:  # pairs of equal columns: each pair of reflections cancels
        half = torch.zeros(features, config.r // 2)
        nn.init.kaiming_uniform_(half, a=math.sqrt(5))
        u = torch.repeat_interleave(half, 2, dim=1)
    child_dict(module, "hra_u", nn.ParameterDict)[adapter] = nn.Parameter(
        u.to(weight_spec.device, adapter_dtype(weight_spec)))
    gate = AdapterGate(1.0).to(weight_spec.device)
    gate.apply_gs = config.apply_GS
    child_dict(module, "hra_gate")[adapter] = gate


METHOD = register_method(weight_map(
    name="hra", config_type=HRAConfig, create=add_hra, check_site=check_site,
    lower_site=orthogonal.lowering(gates="hra_gate", rotate=hra_rotate, matrix=hra_matrix),
    fold=orthogonal.folding(gates="hra_gate", matrix=hra_matrix), maps=orthogonal.MAPS, site_parts=site_parts,
    containers=("hra_u",), gates="hra_gate", kinds=("linear", "conv"), kept_kinds=("linear", "conv"),
    default_targets=DEFAULT_LORA_TARGETS, heads=output_heads,
    describe=lambda module, adapter: f"r={module.hra_u[adapter].shape[1]}" + (
        " gram-schmidt" if module.hra_gate[adapter].apply_gs else "")))
