"""SHiRA (sparse high-rank adapter), PEFT's tuners/shira, on the additive form:

    ΔW = s · scatter(w at (rows, cols)) over an (out, in) zero matrix,   Δ(x) = F.linear(x, ΔW)

a fixed sparse support of r·(in + out) entries (as many parameters as LoRA of rank r, at any
rank) whose values train. Sites as PEFT: ``torch.nn.Linear`` (bitsandbytes' layers too); GPT-2's
Conv1D, convolutions and embeddings are refused. State, PEFT's names: ``<path>.shira_weight.<adapter>``
(the values, zero at the start with ``init_weights``, N(0, 1) without) and ``<path>.shira_indices.<adapter>``
(2, n) int32 (rows, columns), a persistent buffer: PEFT saves the support in the checkpoint under
``<path>.shira_indices``, and loading takes it from there.

The support is ``config.mask_fn(layer, r, **kwargs)``'s ones, in row-major order (PEFT's
``torch.where(mask == 1)``); ``mask_type="random"`` sets PEFT's ``random_mask``: the first r·(in + out)
of ``randperm(out · in)`` from a fresh CPU generator (seeded with ``random_seed`` when given, so
every layer of one shape gets the same support). A custom ``mask_fn`` is assigned after construction,
as in PEFT (``config.mask_fn = fn``); another ``mask_type`` without one warns (PEFT's words) and gets
an empty support that only a checkpoint fills.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional, Union

import torch
from torch import nn

from fxpeft.canonical import Site, site_weight
from fxpeft.configs import PeftConfigBase
from fxpeft.forms import AdapterGate, SharedTensors, adapter_dtype, additive, child_dict
from fxpeft.registry import register_method
from fxpeft.targets import output_heads

from .beft import nn_linear_only
from .hira import DEFAULT_HIRA_TARGETS
from .vera import out_in

aten = torch.ops.aten

# PEFT's TRANSFORMERS_MODELS_TO_SHIRA_TARGET_MODULES_MAPPING: HiRA's table but for phi
DEFAULT_SHIRA_TARGETS = {**DEFAULT_HIRA_TARGETS, "phi": ["q_proj", "v_proj"]}


def random_mask(base_layer: nn.Module, r: int, random_seed: Optional[int] = None, **kwargs) -> torch.Tensor:
    """PEFT's ``random_mask``: r·(in + out) ones at the first entries of a CPU ``randperm(out · in)``."""
    out_f, in_f = _out_in(base_layer)
    generator = torch.Generator()
    if random_seed is not None:
        generator.manual_seed(random_seed)
    chosen = torch.randperm(out_f * in_f, generator=generator)[: r * (out_f + in_f)]
    mask = torch.zeros(out_f * in_f, dtype=torch.bool)
    mask[chosen] = True
    return mask.view(out_f, in_f)


def _out_in(layer: nn.Module) -> tuple[int, int]:
    spec = getattr(layer, "weight_spec", None)  # a quantized layer's logical shape
    return tuple((spec.shape if spec is not None else layer.weight.shape)[:2])


@dataclass
class ShiraConfig(PeftConfigBase):
    """PEFT's ShiraConfig, its fields and defaults: ``r`` (32; the support has r·(in + out) entries),
    ``mask_type`` ("random"), ``random_seed``, ``fan_in_fan_out``, ``init_weights`` (True: zero values)
    and ``target_modules`` / ``modules_to_save``. ``mask_fn`` is PEFT's attribute (not saved)."""

    r: int = 32
    mask_type: Literal["random"] = "random"
    random_seed: Optional[int] = None
    target_modules: Optional[Union[list[str], str]] = None
    fan_in_fan_out: bool = False
    init_weights: bool = True
    modules_to_save: Optional[list[str]] = None
    # PEFT sets it in __post_init__ as an attribute; a field here so that copies of the config keep it
    mask_fn: Optional[Callable] = field(default=None, repr=False, compare=False)

    peft_type = "SHIRA"

    def __post_init__(self):
        super().__post_init__()
        if self.mask_fn is None:
            if self.mask_type == "random":
                self.mask_fn = random_mask
            elif not self.inference_mode:  # PEFT's warning, PEFT's words
                warnings.warn(f"Argument self.mask_type={self.mask_type!r} is not recognized, please supply your own "
                              "masking function by calling `config.mask_fn = my_mask_fn`.")
        # what PEFT refuses only when it builds a layer
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"ShiraConfig.r: `r` should be a positive integer value but the value passed is "
                             f"{self.r!r}.")
        seed = self.random_seed
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"ShiraConfig.random_seed seeds a torch.Generator and must be an integer or None, "
                             f"got {self.random_seed!r}.")

    def to_dict(self):
        out = super().to_dict()
        out.pop("mask_fn")  # a function: PEFT does not save it either
        return out


def check_site(module: nn.Module, site: Site, weight, config: ShiraConfig) -> None:
    """PEFT's checks in ``_create_new_module`` / ``update_layer``, PEFT's words, before any adapter is made."""
    nn_linear_only("SHiRA")(module, site, weight, config)
    out_f, in_f = out_in(site, weight)
    if config.r * (in_f + out_f) > in_f * out_f:
        raise ValueError(f"The set rank {config.r} results in more shira params than the total number of params in the "
                         f"base layer {in_f * out_f} and this is not allowed ({site.path!r}: {out_f}x{in_f}).")


def add_shira(module: nn.Module, site: Site, weight, config: ShiraConfig, adapter: str) -> None:
    out_f, in_f = out_in(site, weight)
    count = config.r * (in_f + out_f)
    values = torch.zeros(count) if config.init_weights else torch.randn(count)
    if config.mask_fn is None:  # filled by the checkpoint being loaded
        indices = torch.zeros(2, count, dtype=torch.int)
    else:
        kwargs = {"bias": getattr(module, "bias", None) is not None}
        if config.mask_type == "random":
            kwargs["random_seed"] = config.random_seed
        mask = config.mask_fn(module, config.r, **kwargs)
        rows, cols = torch.where(mask == 1.0)
        indices = torch.stack([rows, cols]).to(torch.int)
        if indices.shape[1] != count:
            raise ValueError(f"The SHiRA indices and weights are not the same dimensions for adapter {adapter!r} in "
                             f"layer {site.path!r}: the mask has {indices.shape[1]} ones, SHiRA needs r·(in + out) = "
                             f"{count}.")
    child_dict(module, "shira_weight", nn.ParameterDict)[adapter] = nn.Parameter(
        values.to(weight.device, adapter_dtype(weight)))
    child_dict(module, "shira_indices", SharedTensors)[adapter] = indices.to(weight.device)
    child_dict(module, "shira_gate")[adapter] = AdapterGate(1.0).to(weight.device)


def sparse_weight(values: torch.Tensor, indices: torch.Tensor, out_f: int, in_f: int, scale) -> torch.Tensor:
    """The dense (out, in) ΔW: ``values · scale`` at (rows, cols), zero elsewhere."""
    dense = torch.zeros(out_f, in_f, device=values.device, dtype=values.dtype)
    return dense.index_put((indices[0].long(), indices[1].long()), values * scale)


def delta(lw, site: Site, module: nn.Module, adapter: str, x, coefficient):
    out_f, in_f = out_in(site, site_weight(lw.root, site))
    weight = lw.call(sparse_weight, lw.attr(f"{site.path}.shira_weight.{adapter}"),
                     lw.attr(f"{site.path}.shira_indices.{adapter}"), out_f, in_f, coefficient)
    return lw.call(aten.linear.default, x, weight)


def delta_weight(gm, site: Site, module: nn.Module, adapter: str) -> torch.Tensor:
    out_f, in_f = out_in(site, site_weight(gm, site))
    return sparse_weight(module.shira_weight[adapter], module.shira_indices[adapter], out_f, in_f,
                         module.shira_gate[adapter].scale)


METHOD = register_method(additive(
    name="shira", config_type=ShiraConfig, create=add_shira, delta=delta, delta_weight=delta_weight,
    containers=("shira_weight", "shira_indices"), gates="shira_gate", kinds=("linear",), scales_itself=True,
    dtype_of=lambda module, adapter: module.shira_weight[adapter].dtype, check_site=check_site,
    default_targets=DEFAULT_SHIRA_TARGETS, heads=output_heads, mixable="adds",
    describe=lambda module, adapter: f"{module.shira_weight[adapter].numel()} entries"))
