"""RandLoRA (full-rank updates from random bases), PEFT's tuners/randlora, on the additive form, on linear
sites (nn.Linear, GPT-2's Conv1D, quantized linears), as PEFT. With m = min(in, out), M = max(in, out) and
n = ⌈m / r⌉ bases per site:

    Â = (λ[:, :, None] ⊙ A[:, :n, :m] ⊙ γ[None]).flatten(0, 1)      (r·n, m)    λ (r, n), γ (n, m) trained
    B̂ = B[:M, :n, :].flatten(1)                                     (M, n·r)
    Δ(x) = s · B̂ (Â x)   where in ≤ out,      s · Âᵀ (B̂ᵀ x)  otherwise         s = randlora_alpha / r

A (r, 1, m_max) and B (M_max, n_max, r) are frozen random bases shared by every site: kept once on the
transformed module (``randlora_A.<adapter>``, ``randlora_B.<adapter>``, fxpeft.forms.SharedTensors), drawn as
PEFT draws them from ``projection_prng_key`` and sized by the largest targeted layer (PEFT's ``_find_dim``):
He-uniform in bfloat16 (float16 where CUDA lacks bfloat16, as PEFT through accelerate), or with ``sparse`` /
``very_sparse`` ternary {-1, 0, 1} from uniform draws, each divided by its standard deviation; held in the
adapter's dtype. Later adapters share the first one's bases, as in PEFT (same key, ``save_projection`` and r).
The per-site ``<path>.randlora_lambda.<adapter>`` and ``<path>.randlora_gamma.<adapter>`` train;
``<path>.randlora_gate.<adapter>`` is the form's gate (``value``: s).

Checkpoints as PEFT's: with ``save_projection`` the bases under ``base_model.randlora_A/B`` and, since PEFT
saves every RandLoRA layer's reference to them too, again under ``base_model.model.<path>.randlora_A/B``
for every adapted layer (loading reads the tuner-level copy).
"""
from __future__ import annotations

import math
import operator
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from fxpeft.canonical import Site, site_weight
from fxpeft.configs import DEFAULT_LORA_TARGETS, PeftConfigBase, check_bias, check_dropout
from fxpeft.forms import AdapterGate, adapter_dtype, additive, child_dict, shared_tensors
from fxpeft.registry import register_method
from fxpeft.targets import output_heads

from .vera import out_in

aten = torch.ops.aten

SHARED = ("randlora_A", "randlora_B")
CONTAINERS = ("randlora_lambda", "randlora_gamma", "randlora_dropout", *SHARED)
TUNER_KEYS = tuple(f"base_model.{name}" for name in SHARED)


@dataclass
class RandLoraConfig(PeftConfigBase):
    """PEFT's RandLoraConfig, its fields and defaults: ``r`` (32: the bases' rank; fewer trainable numbers as
    it grows), ``projection_prng_key``, ``save_projection``, ``sparse``, ``very_sparse``, ``randlora_dropout``,
    ``randlora_alpha`` (640; scale alpha / r), ``fan_in_fan_out``, ``bias`` ("none", "all", "randlora_only"),
    ``init_weights`` (True: λ = 0, the identity start) and the targeting fields (PEFT's RandLoraConfig has no
    ``exclude_modules``)."""

    r: int = 32
    target_modules: Optional[Union[list[str], str]] = None
    projection_prng_key: int = 0
    save_projection: bool = True
    sparse: bool = False
    very_sparse: bool = False
    randlora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    randlora_alpha: int = 640
    bias: str = "none"
    modules_to_save: Optional[list[str]] = None
    init_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[str] = None

    peft_type = "RANDLORA"

    def __post_init__(self):
        super().__post_init__()
        if not self.save_projection:  # PEFT's warning, PEFT's words
            warnings.warn(
                "Specified to not save basis_A and basis_B within the state dictionary, instead they will be restored "
                "using the PRNG key store in `config.projection_prng_key`. Consider setting `config.save_projection` "
                "to `True` to guarantee restoring the checkpoint correctly on all system configurations.")
        # what PEFT refuses only when it builds a layer (r), or fails on later (dropout, bias, the key)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {self.r!r} "
                             "(RandLoraConfig.r).")
        check_dropout(self, "randlora_dropout")
        check_bias(self, "randlora_only")
        if not isinstance(self.projection_prng_key, int) or isinstance(self.projection_prng_key, bool):
            raise ValueError(f"RandLoraConfig.projection_prng_key seeds a torch.Generator and must be an integer, "
                             f"got {self.projection_prng_key!r}.")


def num_bases(smallest: int, r: int) -> int:
    """PEFT's ⌈min(in, out) / r⌉: enough rank-r bases for a full-rank update."""
    return math.ceil(smallest / r)


def draw_dtype() -> torch.dtype:
    """What PEFT draws dense bases in (accelerate's ``is_bf16_available``): bfloat16, unless CUDA lacks it."""
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def dense_bases(config: RandLoraConfig, largest: int, smallest: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``_init_randlora_A_randlora_B``: He-uniform (a=√5) A (r, 1, m), then n B slices (M, 1, r), from
    one generator, in ``draw_dtype()``; each divided by its standard deviation."""
    generator = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)

    def kaiming(shape):
        return nn.init.kaiming_uniform_(torch.empty(shape, dtype=draw_dtype()), a=math.sqrt(5), generator=generator)

    basis_a = kaiming((config.r, 1, smallest))
    basis_b = torch.cat([kaiming((largest, 1, config.r)) for _ in range(num_bases(smallest, config.r))], dim=1)
    return basis_a / basis_a.std(), basis_b / basis_b.std()


def sparse_bases(config: RandLoraConfig, largest: int, smallest: int, sparsity: float):
    """PEFT's ``_init_randlora_A_randlora_B_sparse``: uniform draws (A, then B) made -1 below 1/(2·sparsity),
    1 above 1 − 1/(2·sparsity), 0 between; each divided by its standard deviation."""
    generator = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
    uniform_a = torch.rand((config.r, 1, smallest), generator=generator)
    uniform_b = torch.rand((largest, num_bases(smallest, config.r), config.r), generator=generator)
    bases = []
    for uniform in (uniform_a, uniform_b):
        ternary = torch.zeros(uniform.shape)
        ternary[uniform < 1 / (2 * sparsity)] = -1
        ternary[uniform > 1 - 1 / (2 * sparsity)] = 1
        bases.append(ternary / ternary.std())
    return tuple(bases)


def prepare(gm, targets, config: RandLoraConfig, adapter: str) -> None:
    """The first RandLoRA adapter draws the shared bases, sized by the largest (out, in) over the targeted
    layers; a later one reuses them, with PEFT's checks (and the same r, which PEFT's forward needs)."""
    for other in gm.peft_config.values():  # PEFT's checks, PEFT's words
        if other.projection_prng_key != config.projection_prng_key:
            raise ValueError(f"RandLora PRNG initialisation key must be the same for all adapters. Got "
                             f"config.projection_prng_key={config.projection_prng_key} but previous config had "
                             f"{other.projection_prng_key}.")
        if other.save_projection != config.save_projection:
            raise ValueError("RandLora projection weights must be saved for all adapters or none, but got multiple "
                             f"different values: {sorted({other.save_projection, config.save_projection})}")
    holder_a = shared_tensors(gm, "randlora_A", config.save_projection)
    holder_b = shared_tensors(gm, "randlora_B", config.save_projection)
    if not len(holder_a):
        holder_a.persistent = holder_b.persistent = bool(config.save_projection)
        shapes = [out_in(site, weight) for _, site, weight in targets]
        out_max, in_max = max(s[0] for s in shapes), max(s[1] for s in shapes)
        largest, smallest = max(out_max, in_max), min(out_max, in_max)
        if config.very_sparse:
            basis_a, basis_b = sparse_bases(config, largest, smallest, math.sqrt(smallest))
        elif config.sparse:
            basis_a, basis_b = sparse_bases(config, largest, smallest, 3)
        else:
            basis_a, basis_b = dense_bases(config, largest, smallest)
        first_weight = targets[0][2]
        holder_a[adapter] = basis_a.to(first_weight.device, adapter_dtype(first_weight))
        holder_b[adapter] = basis_b.to(first_weight.device, adapter_dtype(first_weight))
        return
    basis_a, basis_b = next(iter(holder_a.values())), next(iter(holder_b.values()))
    for _, site, weight in targets:  # PEFT's checks in RandLoraLayer.update_layer, PEFT's words
        largest, smallest = max(out_in(site, weight)), min(out_in(site, weight))
        shapes = "this probably happened because an additional RandLora adapter was added after the first one " \
                 "with incompatible shapes."
        if basis_b.shape[0] < largest:
            raise ValueError(f"randlora_B has a size of {basis_b.shape[0]} but {largest} or greater is required; {shapes}")
        if basis_a.shape[-1] < smallest:
            raise ValueError(f"randlora_A has a size of {basis_a.shape[1]} but {smallest} or greater is required; "
                             f"{shapes}")
    if basis_a.shape[0] < config.r:
        raise ValueError(f"randlora_A has a size of {basis_a.shape[0]} but {config.r} or greater is required; this "
                         "probably happened because an additional RandLora adapter with a lower rank was added after "
                         "the first one; loading the adapters in reverse order may solve this.")
    if basis_a.shape[0] > config.r:  # PEFT accepts this and then fails in forward and merge on the shape mismatch
        raise ValueError(f"RandLoRA adapter {adapter!r} has r={config.r}, but the bases this model's RandLoRA adapters "
                         f"share have rank {basis_a.shape[0]}: every RandLoRA adapter on a model needs the first one's r "
                         "(PEFT accepts a lower r here, then fails when the adapter runs). Use the same r.")
    holder_a[adapter], holder_b[adapter] = basis_a, basis_b


def add_randlora(module: nn.Module, site: Site, weight, config: RandLoraConfig, adapter: str) -> None:
    """PEFT's ``update_layer``: λ ~ N(0, 1), γ = 1 / max(in, out); with ``init_weights`` λ = 0 and
    γ = 1 / max(γ's shape)."""
    largest, smallest = max(out_in(site, weight)), min(out_in(site, weight))
    bases = num_bases(smallest, config.r)
    scales = torch.randn(config.r, bases)
    gamma = torch.ones(bases, smallest) / largest
    if config.init_weights:
        scales.zero_()
        gamma.fill_(1 / max(gamma.shape))
    dtype = adapter_dtype(weight)
    child_dict(module, "randlora_lambda", nn.ParameterDict)[adapter] = nn.Parameter(scales.to(weight.device, dtype))
    child_dict(module, "randlora_gamma", nn.ParameterDict)[adapter] = nn.Parameter(gamma.to(weight.device, dtype))
    child_dict(module, "randlora_dropout")[adapter] = nn.Dropout(config.randlora_dropout) \
        if config.randlora_dropout > 0 else nn.Identity()
    child_dict(module, "randlora_gate")[adapter] = AdapterGate(config.randlora_alpha / config.r,
                                                               config.randlora_dropout).to(weight.device)


def scaled_bases(basis_a, basis_b, scales, gamma, out_f: int, in_f: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``get_scaled_bases``: (first, second) with Δ(x) = second (first x): Â then B̂ where the input is
    the smaller side, B̂ᵀ then Âᵀ otherwise."""
    largest, smallest = max(out_f, in_f), min(out_f, in_f)
    bases = scales.shape[1]
    dtype = scales.dtype
    scaled = (scales[:, :, None] * basis_a[:, :bases, :smallest].to(dtype) * gamma[None]).flatten(end_dim=1)
    flat_b = basis_b[:largest, :bases, :].to(dtype).flatten(start_dim=1)
    return (scaled, flat_b) if smallest == in_f else (flat_b.T, scaled.T)


def delta(lw, site: Site, module: nn.Module, adapter: str, x):
    out_f, in_f = out_in(site, site_weight(lw.root, site))
    bases = lw.call(scaled_bases, lw.attr(f"randlora_A.{adapter}"), lw.attr(f"randlora_B.{adapter}"),
                    lw.attr(f"{site.path}.randlora_lambda.{adapter}"), lw.attr(f"{site.path}.randlora_gamma.{adapter}"),
                    out_f, in_f)
    hidden = lw.call(aten.linear.default, x, lw.call(operator.getitem, bases, 0))
    return lw.call(aten.linear.default, hidden, lw.call(operator.getitem, bases, 1))


def delta_factors(gm, site: Site, module: nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW as (out, in) = second · first, the second times s (as ``delta_weight``, in float32 for half bases
    on the CPU)."""
    out_f, in_f = out_in(site, site_weight(gm, site))
    tensors = [gm._modules["randlora_A"][adapter], gm._modules["randlora_B"][adapter],
               module.randlora_lambda[adapter], module.randlora_gamma[adapter]]
    if tensors[0].device.type == "cpu" and tensors[0].dtype in (torch.float16, torch.bfloat16):
        tensors = [t.float() for t in tensors]
    first, second = scaled_bases(*tensors, out_f, in_f)
    return first, second * module.randlora_gate[adapter].scale


def delta_weight(gm, site: Site, module: nn.Module, adapter: str) -> torch.Tensor:
    """PEFT's ``get_delta_weight``: second · first (out, in) times s (in float32 for half-precision bases on
    the CPU, as PEFT), transposed for Conv1D."""
    first, second = delta_factors(gm, site, module, adapter)
    weight = second @ first
    return weight.T if site.fan_in_fan_out else weight


def saved_state(gm, adapter: str, tensors: dict) -> dict:
    """PEFT also saves each RandLoRA layer's reference to the bases (every layer any RandLoRA adapter holds)."""
    if not all(key in tensors for key in TUNER_KEYS):
        return tensors
    tensors = dict(tensors)
    for path, module in gm.named_modules():
        if "randlora_gate" in module._modules:
            for name, key in zip(SHARED, TUNER_KEYS):
                tensors[f"base_model.model.{path}.{name}"] = tensors[key]
    return tensors


def loaded_state(gm, adapter: str, tensors: dict) -> dict:
    """The tuner-level bases are what loads: the layers' copies of them are dropped. A file without bases
    for a config that saves them keeps the bases drawn from the key, and one with bases for a config that
    does not save them loads none (PEFT loads what its buffers hold: none when they are not persistent)."""
    tensors = {key: value for key, value in tensors.items()
               if key in TUNER_KEYS or not key.endswith(tuple(f".{name}" for name in SHARED))}
    saved = [key for key in TUNER_KEYS if key in tensors]
    if gm.peft_config[adapter].save_projection and len(saved) < len(TUNER_KEYS):
        warnings.warn("The checkpoint holds no RandLoRA bases (randlora_A, randlora_B) though the config says "
                      "save_projection=True: using the bases drawn from `projection_prng_key`, which may not be "
                      "accurate on all system configurations.")
        tensors.update({key: gm._modules[name][adapter] for key, name in zip(TUNER_KEYS, SHARED)})
    elif not gm.peft_config[adapter].save_projection and saved:
        warnings.warn("The checkpoint holds RandLoRA bases (randlora_A, randlora_B) but the config says "
                      "save_projection=False: they are not loaded; the bases are drawn from `projection_prng_key`.")
        tensors = {key: value for key, value in tensors.items() if key not in TUNER_KEYS}
    return tensors


METHOD = register_method(additive(
    name="randlora", config_type=RandLoraConfig, create=add_randlora, delta=delta, delta_weight=delta_weight,
    delta_factors=delta_factors,
    containers=CONTAINERS, shared=SHARED, gates="randlora_gate", dropouts="randlora_dropout", kinds=("linear",),
    dtype_of=lambda module, adapter: module.randlora_lambda[adapter].dtype, prepare=prepare,
    saved_state=saved_state, loaded_state=loaded_state,
    default_targets=DEFAULT_LORA_TARGETS, heads=output_heads,
    describe=lambda module, adapter: f"r={module.randlora_lambda[adapter].shape[0]}, "
                                     f"bases={module.randlora_lambda[adapter].shape[1]}"))
