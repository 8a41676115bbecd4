"""FourierFT, PEFT's tuners/fourierft, on the additive form:

    ΔW = s · Re(ifft2(S)),   S (out, in) zero but at n fixed entries, which hold the learned spectrum

added as ``F.linear(x, ΔW)`` on linear sites (nn.Linear, GPT-2's Conv1D, quantized linears), as PEFT
(ΔW rebuilt at every call, in float32 since ifft2 takes no half types). The n entries are PEFT's:
the first ``n_frequency`` of ``torch.randperm(out · in)`` drawn from a generator seeded with
``random_loc_seed``, as (row, column) = (i // in, i % in). State, PEFT's names:
``<path>.fourierft_spectrum.<adapter>`` (n) is what trains; ``<path>.fourierft_gate.<adapter>`` is
the form's gate (``value``: ``scaling``, 0 once merged) and holds the entry locations (not saved:
they follow from the seed). Init as PEFT: a standard normal spectrum (``init_weights=False``, the
default) or zeros (True: the identity start).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

from fxpeft.canonical import Site, site_weight
from fxpeft.configs import PeftConfigBase, check_bias, check_layer_fields
from fxpeft.forms import AdapterGate, adapter_dtype, additive, child_dict
from fxpeft.registry import register_method
from fxpeft.targets import output_heads, suffix_pattern_value

from .vera import DEFAULT_VERA_TARGETS, out_in

aten = torch.ops.aten

# PEFT's TRANSFORMERS_MODELS_TO_FOURIERFT_TARGET_MODULES_MAPPING: VeRA's table but for these entries
DEFAULT_FOURIERFT_TARGETS = {**DEFAULT_VERA_TARGETS, "gpt2": ["mlp.c_proj"], "gpt_bigcode": ["mlp.c_proj"],
                             "phi": ["q_proj", "v_proj", "fc1", "fc2"]}


@dataclass
class FourierFTConfig(PeftConfigBase):
    """PEFT's FourierFTConfig, its fields and defaults: ``n_frequency`` (1000), ``scaling`` (150),
    ``random_loc_seed`` (777), ``fan_in_fan_out``, ``bias`` ("none", "all", "fourier_only"),
    ``n_frequency_pattern``, ``init_weights`` (False: a random spectrum) and the targeting fields."""

    n_frequency: int = 1000
    scaling: float = 150.0
    random_loc_seed: Optional[int] = 777
    fan_in_fan_out: bool = False
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    bias: str = "none"
    modules_to_save: Optional[list[str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    n_frequency_pattern: Optional[dict] = field(default_factory=dict)
    init_weights: bool = False

    peft_type = "FOURIERFT"

    def __post_init__(self):
        super().__post_init__()
        self.n_frequency_pattern = self.n_frequency_pattern or {}
        # PEFT's checks, PEFT's words
        check_layer_fields(self)
        # what PEFT refuses only when it builds a layer (n_frequency, the seed) or marks biases trainable
        for key, n in [("n_frequency", self.n_frequency),
                       *((f"n_frequency_pattern[{k!r}]", v) for k, v in self.n_frequency_pattern.items())]:
            if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
                raise ValueError(f"FourierFTConfig.{key} must be a positive integer (PEFT: `n_frequency` should be a "
                                 f"positive integer value), got {n!r}.")
        if not isinstance(self.random_loc_seed, int) or isinstance(self.random_loc_seed, bool):
            raise ValueError(f"FourierFTConfig.random_loc_seed seeds the spectral entry locations and must be an "
                             f"integer, got {self.random_loc_seed!r}.")
        check_bias(self, "fourier_only")


def check_site(module: nn.Module, site: Site, weight, config: FourierFTConfig) -> None:
    """PEFT's check in ``update_layer``, PEFT's words, before any adapter is made."""
    out_f, in_f = out_in(site, weight)
    n = suffix_pattern_value(config.n_frequency_pattern, site.path, config.n_frequency)
    if n > in_f * out_f:
        raise ValueError(f"`n_frequency` should be less than or equal to the product of the input and output dimensions "
                         f"but the value passed is {n} and the product is {in_f * out_f} (at {site.path!r}).")


class FourierGate(AdapterGate):
    """The form's gate (``value``: ``scaling``) plus the spectral entry locations, (2, n) row and
    column indices, as a non-persistent buffer."""

    def __init__(self, scaling: float, indices: torch.Tensor):
        super().__init__(scaling)
        self.register_buffer("indices", indices, persistent=False)


def add_fourierft(module: nn.Module, site: Site, weight, config: FourierFTConfig, adapter: str) -> None:
    """PEFT's ``update_layer``: the locations from the seed, then the spectrum ~ N(0, 1) (zeros with
    ``init_weights``)."""
    out_f, in_f = out_in(site, weight)
    n = suffix_pattern_value(config.n_frequency_pattern, site.path, config.n_frequency)
    flat = torch.randperm(out_f * in_f, generator=torch.Generator().manual_seed(config.random_loc_seed))[:n]
    indices = torch.stack([flat // in_f, flat % in_f], dim=0)
    spectrum = torch.randn(n)
    if config.init_weights:
        spectrum.zero_()
    child_dict(module, "fourierft_spectrum", nn.ParameterDict)[adapter] = nn.Parameter(
        spectrum.to(weight.device, adapter_dtype(weight)))
    child_dict(module, "fourierft_gate")[adapter] = FourierGate(config.scaling, indices).to(weight.device)


def fourier_weight(spectrum: torch.Tensor, indices: torch.Tensor, out_f: int, in_f: int, scale) -> torch.Tensor:
    """PEFT's ``get_delta_weight``: the spectrum scattered into a dense (out, in) float32 matrix, its
    inverse 2-D FFT's real part times ``scale``, in the spectrum's dtype."""
    dense = torch.zeros(out_f, in_f, device=spectrum.device)
    dense = dense.index_put((indices[0], indices[1]), spectrum.float())
    return (torch.fft.ifft2(dense).real * scale).to(spectrum.dtype)


def delta(lw, site: Site, module: nn.Module, adapter: str, x, coefficient):
    out_f, in_f = out_in(site, site_weight(lw.root, site))
    weight = lw.call(fourier_weight, lw.attr(f"{site.path}.fourierft_spectrum.{adapter}"),
                     lw.attr(f"{site.path}.fourierft_gate.{adapter}.indices"), out_f, in_f, coefficient)
    return lw.call(aten.linear.default, x, weight)


def delta_weight(gm, site: Site, module: nn.Module, adapter: str) -> torch.Tensor:
    out_f, in_f = out_in(site, site_weight(gm, site))
    gate = module.fourierft_gate[adapter]
    weight = fourier_weight(module.fourierft_spectrum[adapter], gate.indices, out_f, in_f, gate.scale)
    return weight.T if site.fan_in_fan_out else weight


METHOD = register_method(additive(
    name="fourierft", config_type=FourierFTConfig, create=add_fourierft, delta=delta, delta_weight=delta_weight,
    containers=("fourierft_spectrum",), gates="fourierft_gate", kinds=("linear",), scales_itself=True,
    dtype_of=lambda module, adapter: module.fourierft_spectrum[adapter].dtype, check_site=check_site,
    default_targets=DEFAULT_FOURIERFT_TARGETS, heads=output_heads,
    describe=lambda module, adapter: f"n_frequency={module.fourierft_spectrum[adapter].numel()}"))
