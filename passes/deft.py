"""DeFT (decompositional efficient fine-tuning), PEFT's tuners/deft: a residual projection of a linear
site's weight plus a low-rank injection,

    W' = (I - P_proj) W + s · Q_P R        ΔW = Q_P (s R - rightᵀ W)       (PaRa, ``para``: ΔW = -Q_P rightᵀ W)
    ``relu``: Q_P = P, right = relu(P)      ``qr``: Q_P = qr(P), right = Q_P      (P_proj = Q_P rightᵀ)

with P (out, r), R (r, in), s = ``alpha / r`` (1 without ``alpha``), r capped at the output features, all
in float32 as PEFT. Unmerged, PEFT computes it on the activations, and so does fxpeft:
``Δ(x) = (s · dropout(x) Rᵀ - (y - b) right) Q_Pᵀ`` with y the site's own output, so the weight is never
read (a 4-bit base is not dequantized). State under PEFT's names: ``<path>.deft_P.<adapter>``,
``<path>.deft_R.<adapter>`` (not with ``para``), ``<path>.deft_dropout.<adapter>``;
``<path>.deft_gate.<adapter>`` is the form's gate (not saved). The default init sets R = rightᵀ W / s,
so ΔW = 0 (the identity start; with ``para`` there is none).

On the additive form through passes/weight_delta.py: ΔW depends on W, so merging adds ΔW(W0), W0
the weight before the site's first DeFT merge (PEFT does so for adapters merged in one call; for one
merged after another it reads the merged weight, which its unmerged forward does not), and unmerging
subtracts it. Sites: nn.Linear and GPT-2's Conv1D, as PEFT, and fxpeft's quantized linears.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from fxpeft.canonical import Site, float_weight
from fxpeft.configs import DEFAULT_LORA_TARGETS, PeftConfigBase, check_bias, check_dropout, check_layer_fields
from fxpeft.forms import AdapterGate, adapter_dtype, child_dict
from fxpeft.registry import register_method
from fxpeft.targets import output_heads

from . import weight_delta


@dataclass
class DeftConfig(PeftConfigBase):
    """PEFT's DeftConfig: ``r`` (8), ``decomposition_method`` ("relu" or "qr"), ``init_scale`` (R's
    std factor with ``init_weights=False``), ``alpha`` (None: no injection scaling), ``para`` (PaRa:
    subspace removal only), ``fan_in_fan_out``, ``deft_dropout``, ``init_weights``, ``bias`` and the
    targeting fields."""

    r: int = 8
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    decomposition_method: str = "relu"
    init_scale: float = 1.0
    alpha: Optional[int] = None
    para: bool = False
    fan_in_fan_out: bool = False
    deft_dropout: float = 0.0
    init_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    bias: str = "none"
    modules_to_save: Optional[list[str]] = None

    peft_type = "DEFT"

    def __post_init__(self):
        super().__post_init__()
        # PEFT's checks, PEFT's words
        if self.decomposition_method not in ("qr", "relu"):
            raise ValueError(f"Unknown decomposition_method '{self.decomposition_method}', must be one of "
                             f"{sorted({'qr', 'relu'})}.")
        check_layer_fields(self)
        # what PEFT refuses only when it builds a layer (r) or a dropout module
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {self.r!r}")
        check_dropout(self, "deft_dropout")
        check_bias(self, "deft_only")


def project(p: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``_project``: (Q_P, right) in float32, the projector being Q_P rightᵀ."""
    p = p.to(torch.float32)
    if method == "qr":
        q, _ = torch.linalg.qr(p)
        return q, q
    return p, torch.relu(p)


def logical(weight: torch.Tensor, gate: AdapterGate) -> torch.Tensor:
    """The weight as (out, in) in float32 (Conv1D stores (in, out))."""
    weight = weight.to(torch.float32)
    return weight.t() if gate.fan_in_fan_out else weight


def add_deft(module: nn.Module, site: Site, weight_spec, config: DeftConfig, adapter: str) -> None:
    """PEFT's ``update_layer`` and ``reset_deft_parameters``: P ~ N(0, 0.02²); R = rightᵀ W / s (the
    identity start), or N(0, (0.02 · init_scale)²) without ``init_weights``; no R with ``para``."""
    out_f, in_f = weight_spec.shape[::-1] if site.fan_in_fan_out else weight_spec.shape
    r = min(config.r, out_f)  # PEFT: P_proj has rank at most out_features
    gate = AdapterGate(1.0, config.deft_dropout).to(weight_spec.device)
    gate.decomposition, gate.para, gate.fan_in_fan_out = config.decomposition_method, config.para, site.fan_in_fan_out
    gate.injection = config.alpha / r if config.alpha else 1.0
    p = nn.init.normal_(torch.empty(out_f, r), mean=0.0, std=0.02)
    dtype = adapter_dtype(weight_spec)
    if not config.para:
        if config.init_weights:
            _, right = project(p, config.decomposition_method)
            weight = logical(float_weight(module).detach().to(p.device), gate)
            rows = right.t() @ weight / gate.injection
        else:
            rows = nn.init.normal_(torch.empty(r, in_f), mean=0.0, std=0.02 * config.init_scale)
        child_dict(module, "deft_R", nn.ParameterDict)[adapter] = nn.Parameter(rows.to(weight_spec.device, dtype))
    child_dict(module, "deft_P", nn.ParameterDict)[adapter] = nn.Parameter(p.to(weight_spec.device, dtype))
    child_dict(module, "deft_dropout")[adapter] = nn.Dropout(config.deft_dropout) if config.deft_dropout > 0 \
        else nn.Identity()
    child_dict(module, "deft_gate")[adapter] = gate


def deft_delta(site_module: nn.Module, adapter: str, x: torch.Tensor, weight, bias, output) -> torch.Tensor:
    """``(s · dropout(x) Rᵀ - (y - b) right) Q_Pᵀ`` in float32, PEFT's unmerged forward."""
    gate = site_module.deft_gate[adapter]
    q, right = project(site_module.deft_P[adapter], gate.decomposition)
    product = output.to(torch.float32)
    if bias is not None:  # the bias-free base product x Wᵀ
        product = product - bias.to(torch.float32)
    inner = -(product @ right)
    if not gate.para:
        rows = site_module.deft_R[adapter].to(torch.float32) * gate.injection
        inner = inner + torch.nn.functional.linear(site_module.deft_dropout[adapter](x.to(torch.float32)), rows)
    return (inner @ q.t()).to(x.dtype)


def deft_factors(site_module: nn.Module, adapter: str, w0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW as (out, in) = Q_P M: M = s R - rightᵀ W0 (r, in), or -rightᵀ W0 with ``para``; Q_P (out, r)."""
    gate = site_module.deft_gate[adapter]
    q, right = project(site_module.deft_P[adapter], gate.decomposition)
    factor = right.t() @ logical(w0, gate)
    if gate.para:
        return -factor, q
    return site_module.deft_R[adapter].to(torch.float32) * gate.injection - factor, q


def deft_change(site_module: nn.Module, adapter: str, w0: torch.Tensor, b0):
    """PEFT's ``get_delta_weight``: Q_P (s R - rightᵀ W0), or -Q_P rightᵀ W0 with ``para``."""
    down, up = deft_factors(site_module, adapter, w0)
    delta = up @ down
    return (delta.t() if site_module.deft_gate[adapter].fan_in_fan_out else delta), None


METHOD = register_method(weight_delta.method(
    name="deft", config_type=DeftConfig, create=add_deft, gates="deft_gate", delta=deft_delta, change=deft_change,
    factors=deft_factors,
    reads_weight=False, containers=("deft_P", "deft_R", "deft_dropout"), kinds=("linear",),
    dtype_of=lambda module, adapter: module.deft_P[adapter].dtype,
    default_targets=DEFAULT_LORA_TARGETS, heads=output_heads,
    describe=lambda module, adapter: (f"r={module.deft_P[adapter].shape[1]} {module.deft_gate[adapter].decomposition}"
                                      + (" para" if module.deft_gate[adapter].para else ""))))
