"""PVeRA (probabilistic VeRA), PEFT's tuners/pvera, on the additive form, built on passes/vera.py:

    [μ, log σ²] = λ_d ⊙ (A[:, :in] dropout(x))            (A has 2r rows: a mean half and a log-variance half)
    z = μ + ε ⊙ exp(log σ² / 2), ε ~ N(0, I)   in training (and in eval with ``sample_at_inference``)
    z = μ                                    in eval
    Δ(x) = λ_b ⊙ (B[:out] z)                               ΔW = (λ_b B[:out]) (λ_d[:r] A[:r, :in])  (the mean)

on linear sites (nn.Linear, GPT-2's Conv1D, quantized linears), as PEFT. ``A`` (2r, in_max) and ``B``
(out_max, r) are VeRA's shared frozen projections (drawn from ``projection_prng_key`` the same way, kept
once on the module as ``pvera_A.<adapter>`` / ``pvera_B.<adapter>``); the per-site vectors
``<path>.pvera_lambda_b.<adapter>`` (out) and ``<path>.pvera_lambda_d.<adapter>`` (2r) train.

The sampling follows ``.train()/.eval()`` as dropout does: it is the site's gate module
(``<path>.pvera_gate.<adapter>``, not saved) called on λ_d ⊙ (A x), so switching modes never changes
the graph. ε comes from torch's global generator, or, with ``generator_seed``, from one CPU generator
per site and adapter seeded with it, as PEFT: the same seed gives PEFT's draws. Merging folds the mean.
Dynamo cannot trace a draw from a torch.Generator: with ``generator_seed``, a model compiled with
``fullgraph=True`` fails in training (without it, the sampling is a graph break); eval never draws.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from fxpeft.canonical import Site, site_weight
from fxpeft.configs import PeftConfigBase
from fxpeft.forms import AdapterGate, adapter_dtype, additive, child_dict
from fxpeft.registry import register_method
from fxpeft.targets import output_heads

from . import vera

aten = torch.ops.aten

# PEFT's TRANSFORMERS_MODELS_TO_PVERA_TARGET_MODULES_MAPPING: VeRA's, plus dinov2
DEFAULT_PVERA_TARGETS = {**vera.DEFAULT_VERA_TARGETS, "dinov2": ["query", "value"]}
PROJECTIONS = vera.Projections(a="pvera_A", b="pvera_B", label="PVeRA", key_label="PVeRA", a_rows=2)
CONTAINERS = ("pvera_lambda_b", "pvera_lambda_d", "pvera_dropout", "pvera_A", "pvera_B")


@dataclass
class PveraConfig(PeftConfigBase):
    """PEFT's PveraConfig: VeRA's fields (``r`` 256, ``projection_prng_key``, ``save_projection``,
    ``pvera_dropout``, ``d_initial``, ``fan_in_fan_out``, ``bias`` "none"/"all"/"pvera_only",
    ``init_weights``, targeting) plus ``sample_at_inference`` and ``generator_seed``."""

    r: int = 256
    target_modules: Optional[Union[list[str], str]] = None
    projection_prng_key: int = 0
    save_projection: bool = True
    pvera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: Optional[list[str]] = None
    init_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    sample_at_inference: bool = False
    generator_seed: Optional[int] = None

    peft_type = "PVERA"

    def __post_init__(self):
        super().__post_init__()
        vera.check_config(self, "pvera")
        if self.generator_seed is not None and (not isinstance(self.generator_seed, int)
                                                or isinstance(self.generator_seed, bool)):
            raise ValueError(f"PveraConfig.generator_seed seeds a torch.Generator and must be an integer or None, "
                             f"got {self.generator_seed!r}.")


class PveraGate(AdapterGate):
    """The form's gate, and PEFT's ``_reparametrize``: called on λ_d ⊙ (A x) it returns the mean half,
    plus noise scaled by the log-variance half in training or with ``sample_at_inference``."""

    def __init__(self, config: PveraConfig):
        super().__init__(1.0, config.pvera_dropout)
        self.sample_at_inference = bool(config.sample_at_inference)
        # CPU-bound, as PEFT's: a torch.Generator does not move with .to(); the noise is moved instead
        self.generator = None
        if config.generator_seed is not None:
            self.generator = torch.Generator().manual_seed(config.generator_seed)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        mu, logvar = hidden.chunk(2, dim=-1)
        if not (self.training or self.sample_at_inference):
            return mu
        std = torch.exp(0.5 * logvar)
        if self.generator is None:
            eps = torch.randn_like(std)
        else:
            eps = torch.randn(std.shape, dtype=std.dtype, generator=self.generator).to(std.device)
        return mu + eps * std


def add_pvera(module: nn.Module, site: Site, weight, config: PveraConfig, adapter: str) -> None:
    """PEFT's ``update_layer``: λ_b = 1, λ_d ~ N(0, 1) (2r, one draw per layer in model order), then with
    ``init_weights`` λ_d = d_initial and λ_b = 0 (the adapter starts as the identity)."""
    out_f, _ = vera.out_in(site, weight)
    lambda_b, lambda_d = torch.ones(out_f), torch.randn(2 * config.r)
    if config.init_weights:
        lambda_d.fill_(config.d_initial)
        lambda_b.zero_()
    dtype = adapter_dtype(weight)
    child_dict(module, "pvera_lambda_b", nn.ParameterDict)[adapter] = nn.Parameter(lambda_b.to(weight.device, dtype))
    child_dict(module, "pvera_lambda_d", nn.ParameterDict)[adapter] = nn.Parameter(lambda_d.to(weight.device, dtype))
    child_dict(module, "pvera_dropout")[adapter] = nn.Dropout(config.pvera_dropout) if config.pvera_dropout > 0 \
        else nn.Identity()
    # in the site's mode, not a new module's (training): PEFT samples by its layer's own flag, so an adapter
    # added to a model in eval mode does not sample until the model trains
    child_dict(module, "pvera_gate")[adapter] = PveraGate(config).to(weight.device).train(module.training)


def delta(lw, site: Site, module: nn.Module, adapter: str, x):
    out_f, in_f = vera.out_in(site, site_weight(lw.root, site))
    pvera_a = lw.call(aten.slice.Tensor, lw.attr(f"pvera_A.{adapter}"), 1, 0, in_f)
    pvera_b = lw.call(aten.slice.Tensor, lw.attr(f"pvera_B.{adapter}"), 0, 0, out_f)
    hidden = lw.call(aten.mul.Tensor, lw.call(aten.linear.default, x, pvera_a),
                     lw.attr(f"{site.path}.pvera_lambda_d.{adapter}"))
    z = lw.call_module(f"{site.path}.pvera_gate.{adapter}", hidden)
    return lw.call(aten.mul.Tensor, lw.call(aten.linear.default, z, pvera_b),
                   lw.attr(f"{site.path}.pvera_lambda_b.{adapter}"))


def delta_weight(gm, site: Site, module: nn.Module, adapter: str) -> torch.Tensor:
    """PEFT's ``get_delta_weight``: the mean half only, (λ_b B[:out]) (λ_d[:r] A[:r, :in])."""
    down, up = delta_factors(gm, site, module, adapter)
    weight = up @ down
    return weight.T if site.fan_in_fan_out else weight


def delta_factors(gm, site: Site, module: nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean's ΔW as (out, in) = B' A': A' = λ_d[:r] A[:r, :in], B' = λ_b B[:out] times the scale."""
    out_f, in_f = vera.out_in(site, site_weight(gm, site))
    pvera_a, pvera_b = gm._modules["pvera_A"][adapter], gm._modules["pvera_B"][adapter]
    rank = pvera_b.shape[1]
    down = module.pvera_lambda_d[adapter][:rank].unsqueeze(-1) * pvera_a[:rank, :in_f]
    return down, module.pvera_lambda_b[adapter].unsqueeze(-1) * pvera_b[:out_f, :] * module.pvera_gate[adapter].scale


METHOD = register_method(additive(
    name="pvera", config_type=PveraConfig, create=add_pvera, delta=delta, delta_weight=delta_weight,
    delta_factors=delta_factors, sampled=lambda module, adapter: module.pvera_gate[adapter].sample_at_inference,
    containers=CONTAINERS, shared=(PROJECTIONS.a, PROJECTIONS.b), gates="pvera_gate", dropouts="pvera_dropout",
    kinds=("linear",), dtype_of=lambda module, adapter: module.pvera_lambda_d[adapter].dtype,
    prepare=vera.shared_projections(PROJECTIONS), checkpoint_keys=vera.projection_checkpoint_keys(PROJECTIONS),
    default_targets=DEFAULT_PVERA_TARGETS, heads=output_heads,
    describe=lambda module, adapter: f"r={module.pvera_lambda_d[adapter].numel() // 2}" + (
        " sampled at inference" if module.pvera_gate[adapter].sample_at_inference else "")))
