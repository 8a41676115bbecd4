"""GraLoRA (PEFT's tuners/gralora), on the additive form: LoRA cut into a k × k grid of blocks that
exchange rank.

The input is cut into k chunks x_n (in/k) and the output into k blocks y_j (out/k); the rank r into
k slices of r/k. With A (k, in/k, r) and B (k, r, out/k), PEFT's ``gralora_A`` / ``gralora_B``:

    h_n = x_n A_n  (r),   h_n = [h_n^0 … h_n^{k-1}]  (slices of r/k)
    y_j = s · [h_0^j … h_{k-1}^j] B_j                  ΔW[j, n] = s · (A_n[:, slice j] B_j[slice n, :])^T

plus, with ``hybrid_r`` > 0, a plain LoRA part s · B_g A_g x (``gralora_A_general`` /
``gralora_B_general``, nn.Linear as PEFT). s = alpha / (r + hybrid_r). Linear sites (nn.Linear,
GPT-2's Conv1D — its layout from the site, as PEFT sets ``fan_in_fan_out`` for it —, quantized
linears). ``gralora_dropout`` is drawn separately for the grid and the hybrid part, as PEFT.
The form's gate ``gralora_gate.<adapter>`` holds s (0 once merged; not saved). Init as PEFT: per block
A Kaiming-uniform, B zeros (``init_weights=False``: both Kaiming-uniform), drawn block by block.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from fxpeft.canonical import Site
from fxpeft.configs import DEFAULT_LORA_TARGETS, PeftConfigBase, check_bias, check_dropout, check_layer_fields
from fxpeft.forms import AdapterGate, adapter_dtype, additive, child_dict
from fxpeft.registry import register_method
from fxpeft.targets import output_heads

from .lora import linear_pair
from .vera import out_in

aten = torch.ops.aten


@dataclass
class GraloraConfig(PeftConfigBase):
    """PEFT's GraloraConfig: ``r`` (32), ``hybrid_r`` (0), ``alpha`` (64), ``gralora_dropout``,
    ``gralora_k`` (2, the grid's side), ``fan_in_fan_out``, ``bias`` ("none", "all", "gralora_only"),
    ``init_weights`` and the targeting fields (PEFT's GraloraConfig has no ``exclude_modules``)."""

    r: int = 32
    hybrid_r: int = 0
    target_modules: Optional[Union[list[str], str]] = None
    alpha: int = 64
    gralora_dropout: float = 0.0
    gralora_k: int = 2
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: Optional[list[str]] = None
    init_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None

    peft_type = "GRALORA"

    def __post_init__(self):
        super().__post_init__()
        # PEFT's checks, PEFT's words
        if not isinstance(self.gralora_k, int) or isinstance(self.gralora_k, bool) or self.gralora_k <= 0:
            raise ValueError(f"`gralora_k` should be a positive integer value but the value passed is {self.gralora_k}")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r % self.gralora_k != 0:
            raise ValueError(f"r should be divisible by gralora_k, but got {self.r} and {self.gralora_k}")
        # what PEFT refuses only when it builds a layer, or marks biases trainable
        if self.r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {self.r}")
        if not isinstance(self.hybrid_r, int) or isinstance(self.hybrid_r, bool) or self.hybrid_r < 0:
            raise ValueError(f"`hybrid_r` should be a non-negative integer value but the value passed is {self.hybrid_r}")
        check_dropout(self, "gralora_dropout")
        check_bias(self, "gralora_only")
        check_layer_fields(self, regex=())


def check_site(module: nn.Module, site: Site, weight, config: GraloraConfig) -> None:
    """PEFT's checks in ``update_layer``, PEFT's words, before any adapter is made."""
    out_f, in_f = out_in(site, weight)
    if in_f % config.gralora_k:
        raise ValueError(f"in_features should be divisible by gralora_k, but got {in_f} and {config.gralora_k} "
                         f"(at {site.path!r})")
    if out_f % config.gralora_k:
        raise ValueError(f"out_features should be divisible by gralora_k, but got {out_f} and {config.gralora_k} "
                         f"(at {site.path!r})")


def add_gralora(module: nn.Module, site: Site, weight, config: GraloraConfig, adapter: str) -> None:
    """PEFT's ``update_layer``: per block A_n then B_n, then the hybrid LoRA's A and B (in that order of draws)."""
    out_f, in_f = out_in(site, weight)
    k, r = config.gralora_k, config.r
    blocks_a, blocks_b = [], []
    for _ in range(k):
        a, b = torch.empty(r, in_f // k), torch.empty(out_f // k, r)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if config.init_weights:
            nn.init.zeros_(b)
        else:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        blocks_a.append(a)
        blocks_b.append(b)
    dtype = adapter_dtype(weight)
    a = torch.stack(blocks_a).transpose(1, 2).contiguous()  # (k, in/k, r)
    b = torch.stack(blocks_b).transpose(1, 2).contiguous()  # (k, r, out/k)
    child_dict(module, "gralora_A", nn.ParameterDict)[adapter] = nn.Parameter(a.to(weight.device, dtype))
    child_dict(module, "gralora_B", nn.ParameterDict)[adapter] = nn.Parameter(b.to(weight.device, dtype))
    general_a, general_b = nn.Identity(), nn.Identity()
    if config.hybrid_r > 0:
        general_a, general_b = linear_pair(in_f, out_f, config.hybrid_r, bool(config.init_weights))
    child_dict(module, "gralora_A_general")[adapter] = general_a.to(weight.device, dtype)
    child_dict(module, "gralora_B_general")[adapter] = general_b.to(weight.device, dtype)
    child_dict(module, "gralora_dropout")[adapter] = (nn.Dropout(config.gralora_dropout) if config.gralora_dropout > 0
                                                      else nn.Identity())
    scale = config.alpha / (config.r + config.hybrid_r)
    child_dict(module, "gralora_gate")[adapter] = AdapterGate(scale, config.gralora_dropout).to(weight.device)


def grid_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PEFT's forward: y_j = [h_0^j … h_{k-1}^j] B_j with h_n = x_n A_n, for any leading dims."""
    k, chunk, r = a.shape
    rows = x.reshape(-1, k, chunk)
    h = torch.einsum("bni,nir->bnr", rows, a)
    h = h.reshape(-1, k, k, r // k).transpose(1, 2).reshape(-1, k, r)  # block j gathers slice j of every h_n
    return torch.einsum("bjr,jro->bjo", h, b).reshape(*x.shape[:-1], -1)


def grid_weight(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ΔW (out, in) of the grid: block (j, n) = (A_n[:, slice j] B_j[slice n, :])^T."""
    k, chunk, r = a.shape
    out_chunk = b.shape[-1]
    a4 = a.reshape(k, chunk, k, r // k)  # [n, i, j, s]
    b4 = b.reshape(k, k, r // k, out_chunk)  # [j, n, s, o]
    return torch.einsum("nijs,jnso->joni", a4, b4).reshape(k * out_chunk, k * chunk)


def delta(lw, site: Site, module: nn.Module, adapter: str, x):
    def dropped():  # one draw per use, as PEFT calls its dropout for the grid and again for the hybrid part
        if isinstance(module.gralora_dropout[adapter], nn.Identity):
            return x
        return lw.call_module(f"{site.path}.gralora_dropout.{adapter}", x)

    value = lw.call(grid_delta, dropped(), lw.attr(f"{site.path}.gralora_A.{adapter}"),
                    lw.attr(f"{site.path}.gralora_B.{adapter}"))
    if not isinstance(module.gralora_A_general[adapter], nn.Identity):
        hidden = lw.call(aten.linear.default, dropped(), lw.attr(f"{site.path}.gralora_A_general.{adapter}.weight"))
        hybrid = lw.call(aten.linear.default, hidden, lw.attr(f"{site.path}.gralora_B_general.{adapter}.weight"))
        value = lw.call(aten.add.Tensor, value, hybrid)
    return value


def delta_weight(gm, site: Site, module: nn.Module, adapter: str) -> torch.Tensor:
    """PEFT's ``get_delta_weight``: the grid's ΔW plus B_g A_g, times s, in the site's weight layout."""
    weight = grid_weight(module.gralora_A[adapter], module.gralora_B[adapter])
    general_a = module.gralora_A_general[adapter]
    if not isinstance(general_a, nn.Identity):
        weight = weight + module.gralora_B_general[adapter].weight @ general_a.weight
    weight = weight * module.gralora_gate[adapter].scale
    return weight.T if site.fan_in_fan_out else weight


def describe(module: nn.Module, adapter: str) -> str:
    k, _, r = module.gralora_A[adapter].shape
    general = module.gralora_A_general[adapter]
    return f"r={r} k={k}" + ("" if isinstance(general, nn.Identity) else f" hybrid_r={general.weight.shape[0]}")


METHOD = register_method(additive(
    name="gralora", config_type=GraloraConfig, create=add_gralora, delta=delta, delta_weight=delta_weight,
    containers=("gralora_A", "gralora_B", "gralora_A_general", "gralora_B_general", "gralora_dropout"),
    gates="gralora_gate", kinds=("linear",), check_site=check_site,
    dtype_of=lambda module, adapter: module.gralora_A[adapter].dtype,
    default_targets=DEFAULT_LORA_TARGETS, heads=output_heads, describe=describe))
