"""DeLoRA (PEFT's tuners/delora), on the additive form: a low-rank update whose norm is bounded by a
learned λ, decoupled from its direction:

    ΔW = B diag(λ / r / (‖A_i‖ ‖B^i‖)) A · diag(‖W_{:,j}‖)      (row norms of A, column norms of B, ≥ 1e-4)
    Δ(x) = B (s ⊙ A (dropout(x) ⊙ w_norm))

on linear sites (nn.Linear, as PEFT, and quantized linears). ``w_norm`` (in) is the base weight's
column norms when the adapter is created, kept fixed (saved, as PEFT's persistent buffer: a
quantized layer's dequantized weight, where PEFT reads the packed bytes and fails). State, PEFT's
names: ``<path>.delora_A.<adapter>`` (r, in), ``delora_B.<adapter>`` (out, r),
``delora_lambda.<adapter>`` (1,), ``delora_w_norm.<adapter>`` (a buffer), ``delora_dropout.<adapter>``
(PEFT's ``module_dropout``: a dropout of the input, despite its name) and the form's gate
``delora_gate.<adapter>`` (value 1, 0 once merged; not saved). Init as PEFT: A Kaiming-uniform,
B zeros (``init_weights=False``: Kaiming-uniform too), λ = ``delora_lambda`` (``lambda_pattern``),
r from ``rank_pattern``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

from fxpeft.canonical import Site, is_quantized
from fxpeft.configs import DEFAULT_LORA_TARGETS, PeftConfigBase, check_bias, check_dropout, check_layer_fields
from fxpeft.forms import AdapterGate, SharedTensors, adapter_dtype, additive, child_dict
from fxpeft.registry import register_method
from fxpeft.targets import output_heads, pattern_value

aten = torch.ops.aten


@dataclass
class DeloraConfig(PeftConfigBase):
    """PEFT's DeloraConfig: ``r`` (8), ``delora_lambda`` (15, λ's start), ``module_dropout`` (input
    dropout), ``bias`` ("none", "all", "delora_only"), ``init_weights``, ``rank_pattern``,
    ``lambda_pattern`` and the targeting fields."""

    r: int = 8
    delora_lambda: int = 15
    module_dropout: float = 0.0
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    bias: str = "none"
    init_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: Optional[dict] = field(default_factory=dict)
    lambda_pattern: Optional[dict] = field(default_factory=dict)
    modules_to_save: Optional[list[str]] = None

    peft_type = "DELORA"

    def __post_init__(self):
        super().__post_init__()
        self.rank_pattern, self.lambda_pattern = self.rank_pattern or {}, self.lambda_pattern or {}
        # PEFT's checks, PEFT's words
        check_layer_fields(self, regex=("layers_to_transform",))
        for key, rank in [("r", self.r), *((f"rank_pattern[{k!r}]", v) for k, v in self.rank_pattern.items())]:
            if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
                raise ValueError(f"`r` must be a positive integer; got {rank!r} ({key}).")
        # what PEFT accepts and then computes nonsense with, or fails on later
        check_dropout(self, "module_dropout")
        check_bias(self, "delora_only")
        if self.init_weights not in (True, False):
            raise ValueError(f"DeloraConfig.init_weights must be True or False, got {self.init_weights!r}.")


def check_site(module: nn.Module, site: Site, weight, config: DeloraConfig) -> None:
    if site.fan_in_fan_out:
        raise ValueError(f"Target module {site.path!r} ({type(module).__name__}) is not supported. Currently, only "
                         "`torch.nn.Linear` is supported (PEFT's DeLoRA). Leave it out of target_modules.")


def add_delora(module: nn.Module, site: Site, weight, config: DeloraConfig, adapter: str) -> None:
    """PEFT's ``update_layer`` and ``reset_delora_parameters``: A, B, λ, then the base weight's column norms."""
    out_f, in_f = weight.shape
    r = pattern_value(config.rank_pattern, site.path, config.r)
    a, b = torch.empty(r, in_f), torch.empty(out_f, r)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    if config.init_weights:
        nn.init.zeros_(b)
    else:
        nn.init.kaiming_uniform_(b, a=math.sqrt(5))
    lam = torch.full((1,), float(pattern_value(config.lambda_pattern, site.path, config.delora_lambda)))
    with torch.no_grad():
        base = module.dequantize() if is_quantized(module) else site_weight_tensor(module, site)
        w_norm = torch.linalg.vector_norm(base.float(), dim=0)
    dtype = adapter_dtype(weight)
    for name, value in (("delora_A", a), ("delora_B", b), ("delora_lambda", lam)):
        child_dict(module, name, nn.ParameterDict)[adapter] = nn.Parameter(value.to(weight.device, dtype))
    child_dict(module, "delora_w_norm", SharedTensors)[adapter] = w_norm.to(weight.device, dtype)
    child_dict(module, "delora_dropout")[adapter] = (nn.Dropout(config.module_dropout) if config.module_dropout > 0
                                                     else nn.Identity())
    child_dict(module, "delora_gate")[adapter] = AdapterGate(1.0, config.module_dropout).to(weight.device)


def site_weight_tensor(module: nn.Module, site: Site) -> torch.Tensor:
    return getattr(module, site.weight[len(site.path) + 1:])


def row_scale(a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """s = λ / r / (‖A_i‖ ‖B^i‖), each norm at least 1e-4 (PEFT's clamp)."""
    return lam / a.shape[0] / (a.norm(dim=1).clamp(min=1e-4) * b.norm(dim=0).clamp(min=1e-4))


def delora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor,
                 w_norm: torch.Tensor) -> torch.Tensor:
    """PEFT's decomposed forward: B (s ⊙ A (x ⊙ w_norm))."""
    return torch.nn.functional.linear(torch.nn.functional.linear(x * w_norm, a) * row_scale(a, b, lam), b)


def delta(lw, site: Site, module: nn.Module, adapter: str, x):
    return lw.call(delora_delta, x, *(lw.attr(f"{site.path}.{name}.{adapter}")
                                      for name in ("delora_A", "delora_B", "delora_lambda", "delora_w_norm")))


def delta_factors(gm, site: Site, module: nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW as (out, in) = B' A': A' = A with its columns times w_norm, B' = B diag(s) times the scale."""
    a, b = module.delora_A[adapter], module.delora_B[adapter]
    up = b * row_scale(a, b, module.delora_lambda[adapter]) * module.delora_gate[adapter].scale
    return a * module.delora_w_norm[adapter], up


def delta_weight(gm, site: Site, module: nn.Module, adapter: str) -> torch.Tensor:
    """PEFT's ``get_delta_weight``: B diag(s) A, its columns times w_norm."""
    a, b = module.delora_A[adapter], module.delora_B[adapter]
    weight = (b * row_scale(a, b, module.delora_lambda[adapter])) @ a
    return weight * module.delora_w_norm[adapter] * module.delora_gate[adapter].scale


METHOD = register_method(additive(
    name="delora", config_type=DeloraConfig, create=add_delora, delta=delta, delta_weight=delta_weight,
    delta_factors=delta_factors,
    containers=("delora_A", "delora_B", "delora_lambda", "delora_w_norm", "delora_dropout"), gates="delora_gate",
    dropouts="delora_dropout", kinds=("linear",), check_site=check_site,
    dtype_of=lambda module, adapter: module.delora_A[adapter].dtype,
    default_targets=DEFAULT_LORA_TARGETS, heads=output_heads,
    describe=lambda module, adapter: f"r={module.delora_A[adapter].shape[0]}"))
