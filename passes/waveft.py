"""WaveFT (wavelet fine-tuning), PEFT's tuners/waveft, on the additive form:

    ΔW = s · crop(IDWT₂(C)),   C zero but at n fixed entries, which hold the learned coefficients

added as ``F.linear(x, ΔW)`` on linear sites (nn.Linear, GPT-2's Conv1D, quantized linears), as PEFT
(ΔW rebuilt at every call). C is (out, in) padded by the family's filter length − 2 and to even sizes,
the entries placed at its centre; the one-level inverse 2-D wavelet transform of its four quadrants
(approximation, horizontal, vertical, diagonal) with the family's reconstruction filters
(passes/wavelets.py) is cropped back to (out, in) at its centre. With ``use_idwt=False`` ΔW is C
itself, unpadded. The n entries are PEFT's: the first n of ``torch.randperm(out · in)`` from a
generator seeded with ``random_loc_seed``, as (i // in, i % in); n is ``n_frequency`` (or
``n_frequency_pattern``'s), or with ``proportional_parameters`` each layer's share of
``n_frequency`` × the number of targeted layers by its out · in. State, PEFT's names:
``<path>.waveft_spectrum.<adapter>`` (n) trains; ``<path>.waveft_gate.<adapter>`` is the form's gate
(``value``: ``scaling``) holding the entry locations (not saved: they follow from the seed). Init
as PEFT: zeros (``init_weights``, the identity start) or N(0, 0.01²).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from fxpeft.canonical import Site, site_weight
from fxpeft.configs import PeftConfigBase, check_bias, check_layer_fields
from fxpeft.forms import adapter_dtype, additive, child_dict
from fxpeft.registry import register_method
from fxpeft.targets import output_heads, pattern_value

from .fourierft import DEFAULT_FOURIERFT_TARGETS, FourierGate

# PEFT's TRANSFORMERS_MODELS_TO_WAVEFT_TARGET_MODULES_MAPPING: FourierFT's, for the models fxpeft knows
DEFAULT_WAVEFT_TARGETS = {**DEFAULT_FOURIERFT_TARGETS, "llama4": ["q_proj", "v_proj"],
                          "gemma3_text": ["q_proj", "v_proj"]}
from .vera import out_in
from .wavelets import ROWS, reconstruction_filters

aten = torch.ops.aten

# PEFT's WAVELET_REDUCTIONS: the families its config accepts, each padding C by its filter length − 2
# (PEFT 0.21.2 has filters for db1-10, sym2-10 and coif1-5 only; the others fail when ΔW is computed)
FAMILIES = [*(f"db{n}" for n in range(1, 39)), *(f"sym{n}" for n in range(2, 21)),
            *(f"coif{n}" for n in range(1, 18))]


def reduction(family: str) -> int:
    number = int(re.sub(r"\D", "", family))
    return 6 * number - 2 if family.startswith("coif") else 2 * number - 2


@dataclass
class WaveFTConfig(PeftConfigBase):
    """PEFT's WaveFTConfig, its fields and defaults: ``n_frequency`` (2592), ``scaling`` (25),
    ``wavelet_family`` ("db1"), ``use_idwt``, ``random_loc_seed`` (777), ``fan_in_fan_out``, ``bias``
    ("none", "all", "waveft_only"), ``n_frequency_pattern``, ``proportional_parameters``,
    ``init_weights`` (True: zeros) and the targeting fields."""

    n_frequency: int = 2592
    scaling: float = 25.0
    wavelet_family: str = "db1"
    use_idwt: bool = True
    random_loc_seed: int = 777
    fan_in_fan_out: bool = False
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    bias: str = "none"
    modules_to_save: Optional[list[str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    n_frequency_pattern: Optional[dict] = field(default_factory=dict)
    proportional_parameters: bool = False
    init_weights: bool = True

    peft_type = "WAVEFT"

    def __post_init__(self):
        super().__post_init__()
        self.n_frequency_pattern = self.n_frequency_pattern or {}
        # PEFT's checks, PEFT's words
        check_layer_fields(self)
        if self.wavelet_family not in FAMILIES:
            raise ValueError(f"Wavelet family {self.wavelet_family} not supported. Supported wavelet families are: "
                             f"{FAMILIES}")
        # what PEFT refuses only when it builds a layer or computes ΔW, or marks biases trainable
        if self.use_idwt and self.wavelet_family not in ROWS:
            raise ValueError(f"WaveFTConfig.wavelet_family={self.wavelet_family!r}: PEFT 0.21.2 has no filters for it "
                             f"(it fails when computing ΔW); use one of {list(ROWS)}, or use_idwt=False.")
        for key, n in [("n_frequency", self.n_frequency),
                       *((f"n_frequency_pattern[{k!r}]", v) for k, v in self.n_frequency_pattern.items())]:
            if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
                raise ValueError(f"WaveFTConfig.{key}: `n_frequency` should be a positive integer value but the value "
                                 f"passed is {n!r}")
        if not isinstance(self.random_loc_seed, int) or isinstance(self.random_loc_seed, bool):
            raise ValueError(f"WaveFTConfig.random_loc_seed seeds the coefficient locations and must be an integer, "
                             f"got {self.random_loc_seed!r}.")
        check_bias(self, "waveft_only")


def n_frequencies(targets, config: WaveFTConfig) -> dict[str, int]:
    """Each targeted layer's n: PEFT's ``_calculate_proportional_parameters`` with ``proportional_parameters``
    (a share of n_frequency × layers by out · in, at least 1), else the pattern's or ``n_frequency``."""
    sizes = {site.path: out_in(site, spec) for _, site, spec in targets}
    if not config.proportional_parameters:
        return {path: pattern_value(config.n_frequency_pattern, path, config.n_frequency) for path in sizes}
    total = sum(o * i for o, i in sizes.values())
    budget = config.n_frequency * len(sizes)
    return {path: max(1, round(o * i / total * budget)) for path, (o, i) in sizes.items()}


def prepare(gm, targets, config: WaveFTConfig, adapter: str) -> None:
    """Every site's n is known only from all targets (``proportional_parameters``), so the sites' state is
    made here, in module order, after PEFT's check of every n."""
    counts = n_frequencies(targets, config)
    for _, site, spec in targets:
        out_f, in_f = out_in(site, spec)
        if counts[site.path] > in_f * out_f:
            raise ValueError(f"`n_frequency` should be less than or equal to the product of the input and output "
                             f"dimensions but the value passed is {counts[site.path]} and the product is "
                             f"{in_f * out_f} (at {site.path!r}).")
    for module, site, spec in targets:
        add_site(module, site, spec, config, adapter, counts[site.path])


def add_site(module: nn.Module, site: Site, spec, config: WaveFTConfig, adapter: str, n: int) -> None:
    """PEFT's ``update_layer``: the locations from the seed, then the coefficients (zeros, or N(0, 1)·0.01)."""
    out_f, in_f = out_in(site, spec)
    flat = torch.randperm(out_f * in_f, generator=torch.Generator().manual_seed(config.random_loc_seed))[:n]
    indices = torch.stack([flat // in_f, flat % in_f], dim=0)
    spectrum = torch.zeros(n) if config.init_weights else torch.randn(n) * 0.01
    # through the base weight's dtype to the adapter's, as PEFT moves it to the layer and then autocasts
    child_dict(module, "waveft_spectrum", nn.ParameterDict)[adapter] = nn.Parameter(
        spectrum.to(spec.device, spec.dtype).to(adapter_dtype(spec)))
    gate = FourierGate(config.scaling, indices).to(spec.device)
    gate.family = config.wavelet_family if config.use_idwt else None
    child_dict(module, "waveft_gate")[adapter] = gate


def wavelet_weight(spectrum: torch.Tensor, indices: torch.Tensor, out_f: int, in_f: int, family: Optional[str],
                   scale) -> torch.Tensor:
    """PEFT's ``get_delta_weight``: (out, in) ΔW from the coefficients at ``indices``."""
    if family is None:  # use_idwt=False: the coefficients themselves
        dense = torch.zeros(out_f, in_f, device=spectrum.device, dtype=spectrum.dtype)
        return dense.index_put((indices[0], indices[1]), spectrum) * scale
    pad = reduction(family)
    rows, cols = out_f + pad + (out_f + pad) % 2, in_f + pad + (in_f + pad) % 2
    dense = torch.zeros(rows, cols, device=spectrum.device, dtype=spectrum.dtype)
    dense = dense.index_put((indices[0] + (rows - out_f) // 2, indices[1] + (cols - in_f) // 2), spectrum)
    half_r, half_c = rows // 2, cols // 2
    bands = torch.stack([dense[:half_r, :half_c], dense[:half_r, half_c:], dense[half_r:, :half_c],
                         dense[half_r:, half_c:]]).unsqueeze(0)  # approximation, horizontal, vertical, diagonal
    low, high = reconstruction_filters(family, spectrum.dtype, spectrum.device)
    filters = torch.stack([torch.outer(low, low), torch.outer(high, low), torch.outer(low, high),
                           torch.outer(high, high)]).unsqueeze(1)
    weight = F.conv_transpose2d(bands, filters, stride=2)[0, 0]
    trim = (2 * len(low) - 3) // 2
    if trim > 0:
        weight = weight[trim:-trim, trim:-trim]
    weight = weight * scale
    top, left = (weight.shape[0] - out_f) // 2, (weight.shape[1] - in_f) // 2
    return weight[top: top + out_f, left: left + in_f]


def delta(lw, site: Site, module: nn.Module, adapter: str, x, coefficient):
    out_f, in_f = out_in(site, site_weight(lw.root, site))
    weight = lw.call(wavelet_weight, lw.attr(f"{site.path}.waveft_spectrum.{adapter}"),
                     lw.attr(f"{site.path}.waveft_gate.{adapter}.indices"), out_f, in_f,
                     module.waveft_gate[adapter].family, coefficient)
    return lw.call(aten.linear.default, x, weight)


def delta_weight(gm, site: Site, module: nn.Module, adapter: str) -> torch.Tensor:
    out_f, in_f = out_in(site, site_weight(gm, site))
    gate = module.waveft_gate[adapter]
    weight = wavelet_weight(module.waveft_spectrum[adapter], gate.indices, out_f, in_f, gate.family, gate.scale)
    return weight.T if site.fan_in_fan_out else weight


METHOD = register_method(additive(
    name="waveft", config_type=WaveFTConfig, create=lambda *args: None, delta=delta, delta_weight=delta_weight,
    containers=("waveft_spectrum",), gates="waveft_gate", kinds=("linear",), scales_itself=True,
    dtype_of=lambda module, adapter: module.waveft_spectrum[adapter].dtype, prepare=prepare,
    default_targets=DEFAULT_WAVEFT_TARGETS, heads=output_heads,
    describe=lambda module, adapter: f"n_frequency={module.waveft_spectrum[adapter].numel()}"))
