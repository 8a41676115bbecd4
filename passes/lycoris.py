"""What LoHa and LoKr share (PEFT's tuners/lycoris_utils.py): the config fields, the sites they
take, and the additive method built from a method's ``make_weight``.

Both add ``F.linear(x, ΔW)`` (or the site's convolution with ``ΔW``) where ``ΔW`` is rebuilt from the
adapter's factors on every call and scaled by ``alpha / r``, as PEFT does. In training, and only
when the adapter has ``rank_dropout`` or ``module_dropout``, ``ΔW`` passes through
:class:`LycorisDropout`, which follows ``.train()/.eval()``:

- ``module_dropout``: ``torch.rand(1) > module_dropout`` keeps the whole adapter for this call;
- ``rank_dropout``: ``torch.rand(out) > rank_dropout`` keeps rows of ``ΔW``, divided by the kept
  fraction (LoHa always; LoKr with ``rank_dropout_scale``). Where every row is dropped PEFT divides
  by 0 and trains on NaN; fxpeft adds nothing.

The draws are PEFT's: from the CPU generator, module draw first, then the rank draw, at the site in
model order, so a seeded call draws PEFT's masks. One difference: PEFT skips the rank draw of an
adapter whose module draw dropped it (a Python branch); fxpeft always makes it (the graph does not
branch on data), so with both dropouts on, draws after the first dropped module differ from PEFT's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from fxpeft.canonical import Site, site_weight
from fxpeft.configs import DEFAULT_LORA_TARGETS, PeftConfigBase, check_layer_fields
from fxpeft.forms import AdapterGate, adapter_dtype, additive, child_dict
from fxpeft.rewrite import Lowering
from fxpeft.targets import output_heads, pattern_value


aten = torch.ops.aten


@dataclass
class LycorisConfig(PeftConfigBase):
    """The fields PEFT's LoHaConfig and LoKrConfig share, at PEFT's defaults."""

    r: int = 8
    alpha: int = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    init_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)

    INIT_WEIGHTS = (True, False)  # the values init_weights may take

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        self.rank_pattern, self.alpha_pattern = self.rank_pattern or {}, self.alpha_pattern or {}
        # PEFT's check, PEFT's words
        check_layer_fields(self, regex=())
        # fxpeft's: values PEFT accepts here but fails on when it builds a layer (r), or that have no meaning
        for key, rank in [("r", self.r), *((f"rank_pattern[{k!r}]", v) for k, v in self.rank_pattern.items())]:
            if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
                raise ValueError(f"{name}.{key} must be a positive integer (PEFT: `r` should be a positive integer "
                                 f"value), got {rank!r}.")
        for key in ("rank_dropout", "module_dropout"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}.{key} is a probability and must be in [0, 1], got {value!r}.")
        if not any(self.init_weights is v or (isinstance(v, str) and self.init_weights == v) for v in self.INIT_WEIGHTS):
            raise ValueError(f"{name}.init_weights must be one of {list(self.INIT_WEIGHTS)}, got {self.init_weights!r}.")


def rank_and_alpha(site: Site, config: LycorisConfig) -> tuple[int, float]:
    return (pattern_value(config.rank_pattern, site.path, config.r),
            pattern_value(config.alpha_pattern, site.path, config.alpha))


def check_site(method_name: str):
    """PEFT's LyCORIS layers exist for nn.Linear, nn.Conv1d and nn.Conv2d only: transformers' Conv1D
    (GPT-2) and nn.Conv3d raise there (TypeError) and here (ValueError), before any adapter is made."""
    def check(module: nn.Module, site: Site, weight, config) -> None:
        if site.kind == "linear" and site.fan_in_fan_out:
            what = "transformers' Conv1D (fan_in_fan_out)"
        elif site.kind == "conv" and not isinstance(module, (nn.Conv1d, nn.Conv2d)):
            what = type(module).__name__
        else:
            return
        raise ValueError(f"{method_name} does not support {what} layers such as {site.path!r}: PEFT's {method_name} "
                         "adapts nn.Linear, nn.Conv1d and nn.Conv2d only. Leave it out of target_modules.")
    return check


def effective_conv(site: Site, weight, config: LycorisConfig) -> bool:
    """``use_effective_conv2d`` at this site: only convolutions with a kernel larger than 1 (PEFT
    turns it off for 1x1 kernels)."""
    return bool(config.use_effective_conv2d) and site.kind == "conv" and math.prod(weight.shape[2:]) > 1


class LycorisGate(AdapterGate):
    """The form's gate (``value``: alpha / r, 0 once merged) plus the dropouts as data: ``p`` the
    rank dropout, ``module_p`` the module dropout."""

    def __init__(self, scale: float, rank_dropout: float, module_dropout: float, rank_dropout_scale: bool):
        super().__init__(scale, rank_dropout)
        self.module_dropout = float(module_dropout)
        self.register_buffer("module_p", torch.tensor(self.module_dropout), persistent=False)
        self.rank_dropout_scale = bool(rank_dropout_scale)


DROPOUT_MODULE = "_fxpeft_lycoris_dropout"


class LycorisDropout(nn.Module):
    """Module and rank dropout of ``ΔW`` in training; nothing in eval. A (stateless) module so that it
    follows ``.train()/.eval()``; the probabilities are the gate's buffers."""

    def forward(self, weight, rank_p, module_p, rank: bool, rescale: bool):
        if not self.training:
            return weight
        keep = (torch.rand(1).to(weight.device) > module_p).to(weight.dtype)  # drawn even at p=0, as PEFT does
        if rank:
            drop = (torch.rand(weight.shape[0]).to(weight.device) > rank_p).to(weight.dtype)
            if rescale:  # every row dropped: PEFT divides 0 by 0 (NaN weights); here the adapter adds 0
                drop = drop / drop.mean().clamp(min=1.0 / drop.numel())
            weight = weight * drop.view(-1, *[1] * (weight.dim() - 1))
        return weight * keep


def conv_delta(x, weight, stride, padding, dilation, groups):
    """The site's convolution (PEFT: the base layer's stride, padding, dilation, groups) with ``ΔW``."""
    conv = F.conv1d if weight.dim() == 3 else F.conv2d
    return conv(x, weight, None, stride, padding, dilation, groups)


def lycoris(*, name: str, title: str, config_type: type, containers: tuple[str, ...], gates: str,
            factors: Callable, make_weight: Callable, rank_dropout_scale: Callable, **fields):
    """The additive method of a LyCORIS adapter (``title``: its name in errors).

    ``factors(site, weight_spec, config, r) -> {container: tensor}`` draws the adapter's factors as
    PEFT does (float32 on the CPU, in PEFT's order); they are stored in ``containers`` order in the
    adapter dtype on the weight's device. ``make_weight(*tensors, scale, shape)`` is ``ΔW``:
    ``tensors`` the adapter's entry in each container (None where it has none), ``scale`` alpha / r
    (a number, or the 0-dim coefficient the graph reads) and ``shape`` the site's weight shape.
    ``rank_dropout_scale(config)``: whether rank dropout rescales the kept rows."""

    def tensors(module: nn.Module, adapter: str, read: Callable):
        return [read(c) if adapter in module._modules.get(c, ()) else None for c in containers]

    def add(module: nn.Module, site: Site, weight, config, adapter: str) -> None:
        r, alpha = rank_and_alpha(site, config)
        made = factors(site, weight, config, r)
        for container in containers:
            if container in made:
                child_dict(module, container, nn.ParameterDict)[adapter] = nn.Parameter(
                    made[container].to(weight.device, adapter_dtype(weight)))
        gate = LycorisGate(alpha / r, config.rank_dropout, config.module_dropout, rank_dropout_scale(config))
        child_dict(module, gates)[adapter] = gate.to(weight.device)

    def delta(lw: Lowering, site: Site, module: nn.Module, adapter: str, x, coefficient):
        path = site.path
        weight = lw.call(make_weight, *tensors(module, adapter, lambda c: lw.attr(f"{path}.{c}.{adapter}")),
                         coefficient, list(site_weight(lw.root, site).shape))
        gate = module._modules[gates][adapter]
        if gate.dropout > 0 or gate.module_dropout > 0:
            if DROPOUT_MODULE not in lw.root._modules:
                lw.root.add_module(DROPOUT_MODULE, LycorisDropout().train(lw.root.training))
            weight = lw.call_module(DROPOUT_MODULE, weight, lw.attr(f"{path}.{gates}.{adapter}.p"),
                                    lw.attr(f"{path}.{gates}.{adapter}.module_p"), gate.dropout > 0,
                                    gate.rank_dropout_scale)
        if site.kind == "linear":
            return lw.call(aten.linear.default, x, weight)
        return lw.call(conv_delta, x, weight, module.stride, module.padding, module.dilation, module.groups)

    def delta_weight(gm, site: Site, module: nn.Module, adapter: str) -> torch.Tensor:
        return make_weight(*tensors(module, adapter, lambda c: module._modules[c][adapter]),
                           module._modules[gates][adapter].scale, list(site_weight(gm, site).shape))

    def describe(module: nn.Module, adapter: str) -> str:
        shapes = [f"{c}={tuple(t.shape)}" for c, t in zip(containers, tensors(
            module, adapter, lambda c: module._modules[c][adapter])) if t is not None]
        return f"scale={module._modules[gates][adapter].scale:g}, " + ", ".join(shapes)

    def dtype_of(module: nn.Module, adapter: str) -> torch.dtype:
        return next(t for t in tensors(module, adapter, lambda c: module._modules[c][adapter]) if t is not None).dtype

    return additive(name=name, config_type=config_type, create=add, delta=delta, delta_weight=delta_weight,
                    containers=containers, gates=gates, scales_itself=True, kinds=("linear", "conv"),
                    dtype_of=dtype_of, default_targets=DEFAULT_LORA_TARGETS, heads=output_heads,
                    check_site=check_site(title), describe=describe, **fields)


def kaiming(tensor: torch.Tensor) -> torch.Tensor:
    """PEFT's init of LyCORIS factors (He uniform, as nn.Linear's weights)."""
    return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
