"""VeRA (vector-based random matrix adaptation), PEFT's tuners/vera, on the additive form:

    Δ(x) = λ_b ⊙ (B[:out] (λ_d ⊙ (A[:, :in] dropout(x))))          ΔW = (λ_b B[:out]) (λ_d A[:, :in])

on linear sites (nn.Linear, GPT-2's Conv1D, quantized linears), as PEFT. ``A`` (r, in_max) and ``B``
(out_max, r) are frozen random projections shared by every site: kept once on the transformed module
(``vera_A.<adapter>``, ``vera_B.<adapter>``, fxpeft.forms.SharedTensors), drawn as PEFT draws them from
``projection_prng_key`` (He-uniform from a CPU generator, A then B) and sized by the largest input and
output over the targeted layers; each site slices what it needs. The per-site vectors
``<path>.vera_lambda_b.<adapter>`` (out) and ``<path>.vera_lambda_d.<adapter>`` (r) are what trains;
``<path>.vera_gate.<adapter>`` is the form's gate (not saved).

Several adapters share the first one's projections, as in PEFT: a later adapter must have the same
``projection_prng_key``, ``save_projection`` and ``r``, and fit the projections' sizes. Checkpoints
hold the projections as ``base_model.vera_A`` / ``base_model.vera_B`` with ``save_projection=True``
and leave them out otherwise (they are drawn again from the key when loading).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from fxpeft.canonical import Site, site_weight
from fxpeft.configs import PeftConfigBase, check_bias, check_dropout, check_layer_fields
from fxpeft.forms import AdapterGate, adapter_dtype, additive, child_dict, shared_tensors
from fxpeft.registry import register_method
from fxpeft.targets import output_heads


aten = torch.ops.aten

# PEFT's TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING (the models fxpeft is tested on and their kin)
DEFAULT_VERA_TARGETS = {
    "t5": ["q", "v"], "mt5": ["q", "v"], "bart": ["q_proj", "v_proj"], "gpt2": ["c_attn"],
    "bloom": ["query_key_value"], "opt": ["q_proj", "v_proj"], "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"], "gpt_neo": ["q_proj", "v_proj"], "bert": ["query", "value"],
    "roberta": ["query", "value"], "xlm-roberta": ["query", "value"], "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"], "llama": ["q_proj", "v_proj"], "gpt_bigcode": ["c_attn"],
    "falcon": ["query_key_value"], "mistral": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"],
}
CONTAINERS = ("vera_lambda_b", "vera_lambda_d", "vera_dropout", "vera_A", "vera_B")
SHARED = ("vera_A", "vera_B")


@dataclass
class VeraConfig(PeftConfigBase):
    """PEFT's VeraConfig, its fields and defaults: ``r`` (256), ``projection_prng_key``,
    ``save_projection``, ``vera_dropout``, ``d_initial`` (λ_d's start; λ_b starts at 0),
    ``fan_in_fan_out``, ``bias`` ("none", "all", "vera_only"), ``init_weights`` and the targeting
    fields (PEFT's VeraConfig has no ``exclude_modules``)."""

    r: int = 256
    target_modules: Optional[Union[list[str], str]] = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: Optional[list[str]] = None
    init_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None

    peft_type = "VERA"

    def __post_init__(self):
        super().__post_init__()
        check_config(self, "vera")


def check_config(config, prefix: str) -> None:
    """The checks of VeRA's config and of configs built on it (PVeRA): ``prefix`` names the projections
    (``<prefix>_A``), the dropout field (``<prefix>_dropout``) and the bias option (``<prefix>_only``)."""
    kind = type(config).__name__
    # PEFT's check and warning, PEFT's words
    check_layer_fields(config, regex=())
    if not config.save_projection:
        warnings.warn(
            f"Specified to not save {prefix}_A and {prefix}_B within the state dictionary, instead they will be "
            "restored using the PRNG key store in `config.projection_prng_key`. Consider setting "
            "`config.save_projection` to `True` to guarantee restoring the checkpoint correctly on all system "
            "configurations.")
    # what PEFT refuses only when it builds a layer (r, dropout) or when it marks biases trainable
    if not isinstance(config.r, int) or isinstance(config.r, bool) or config.r <= 0:
        raise ValueError(f"{kind}.r must be a positive integer (PEFT: `r` should be a positive integer value), "
                         f"got {config.r!r}.")
    check_dropout(config, f"{prefix}_dropout")
    check_bias(config, f"{prefix}_only")
    if not isinstance(config.projection_prng_key, int) or isinstance(config.projection_prng_key, bool):
        raise ValueError(f"{kind}.projection_prng_key seeds a torch.Generator and must be an integer, "
                         f"got {config.projection_prng_key!r}.")


def out_in(site: Site, weight) -> tuple[int, int]:
    """The site's (out, in) features; Conv1D stores its weight as (in, out)."""
    out_f, in_f = weight.shape[-2:]
    return (in_f, out_f) if site.fan_in_fan_out else (out_f, in_f)


def kaiming(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's ``_kaiming_init``: He-uniform (gain √2, fan-in = the second dim) from ``generator``."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


@dataclass(frozen=True)
class Projections:
    """The shared frozen projections of a VeRA-like method (PVeRA reuses VeRA's): their root names,
    the method's names in PEFT's error messages, and how many rows ``A`` has per unit of ``r``
    (PVeRA's A holds a mean half and a log-variance half)."""

    a: str = "vera_A"
    b: str = "vera_B"
    label: str = "VeRA"  # PEFT's name for the method in its messages
    key_label: str = "Vera"  # ... and in its PRNG-key message
    a_rows: int = 1


VERA_PROJECTIONS = Projections()


def projections(config, out_max: int, in_max: int, spec: Projections = VERA_PROJECTIONS):
    """PEFT's ``_init_vera_A_vera_B``: A (a_rows·r, in_max) then B (out_max, r), from one generator."""
    generator = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
    vera_a = kaiming((spec.a_rows * config.r, in_max), generator)
    vera_b = kaiming((out_max, config.r), generator)
    return vera_a, vera_b


def shared_projections(spec: Projections):
    """The form's ``prepare`` for a method sharing frozen projections across sites (see :func:`prepare`)."""

    def prepare(gm, targets, config, adapter: str) -> None:
        """The first adapter draws the shared projections (PEFT's ``_find_dim``: the largest out and in
        over the targeted layers); a later one reuses them, with PEFT's checks, so ``<a>.<adapter>`` is
        the first adapter's tensor under this adapter's name."""
        for name, other in gm.peft_config.items():
            if not isinstance(other, type(config)):  # another method's adapter on the same model
                continue
            if other.projection_prng_key != config.projection_prng_key:
                raise ValueError(f"{spec.key_label} PRNG initialisation key must be the same for all adapters. Got "
                                 f"config.projection_prng_key={config.projection_prng_key} but previous config had "
                                 f"{other.projection_prng_key}.")
            if other.save_projection != config.save_projection:
                raise ValueError(f"{spec.label} projection weights must be saved for all adapters or none, but got "
                                 f"multiple different values: {sorted({other.save_projection, config.save_projection})}")
        holder_a = shared_tensors(gm, spec.a, config.save_projection)
        holder_b = shared_tensors(gm, spec.b, config.save_projection)
        if not len(holder_a):
            holder_a.persistent = holder_b.persistent = bool(config.save_projection)
            shapes = [out_in(site, weight) for _, site, weight in targets]
            vera_a, vera_b = projections(config, max(s[0] for s in shapes), max(s[1] for s in shapes), spec)
            first_weight = targets[0][2]
            holder_a[adapter] = vera_a.to(first_weight.device, adapter_dtype(first_weight))
            holder_b[adapter] = vera_b.to(first_weight.device, adapter_dtype(first_weight))
            return
        vera_a, vera_b = next(iter(holder_a.values())), next(iter(holder_b.values()))
        for _, site, weight in targets:  # PEFT's checks in update_layer, PEFT's words
            out_f, in_f = out_in(site, weight)
            shapes = f"this probably happened because an additional {spec.label} adapter was added after the first " \
                     "one with incompatible shapes."
            if vera_a.shape[1] < in_f:
                raise ValueError(f"{spec.a} has a size of {vera_a.shape[1]} but {in_f} or greater is required; {shapes}")
            if vera_b.shape[0] < out_f:
                raise ValueError(f"{spec.b} has a size of {vera_b.shape[0]} but {out_f} or greater is required; {shapes}")
        rank = vera_a.shape[0] // spec.a_rows
        if rank < config.r:
            raise ValueError(f"{spec.a} has a size of {vera_a.shape[0]} but {spec.a_rows * config.r} or greater is "
                             f"required; this probably happened because an additional {spec.label} adapter with a lower "
                             "rank was added after the first one; loading the adapters in reverse order may solve this.")
        if rank > config.r:  # PEFT accepts this and then fails in forward and merge on the shape mismatch
            raise ValueError(f"{spec.label} adapter {adapter!r} has r={config.r}, but the {spec.label} projections this "
                             f"model's adapters share have rank {rank}: every {spec.label} adapter on a model needs the "
                             "first one's r (PEFT accepts a lower r here, then fails when the adapter runs). Use the same r.")
        holder_a[adapter], holder_b[adapter] = vera_a, vera_b

    return prepare


prepare = shared_projections(VERA_PROJECTIONS)


def add_vera(module: nn.Module, site: Site, weight, config: VeraConfig, adapter: str) -> None:
    """PEFT's ``update_layer``: λ_b = 1, λ_d ~ N(0, 1) (one draw per layer, in model order), then with
    ``init_weights`` λ_d = d_initial and λ_b = 0 (the adapter starts as the identity)."""
    out_f, _ = out_in(site, weight)
    lambda_b, lambda_d = torch.ones(out_f), torch.randn(config.r)
    if config.init_weights:
        lambda_d.fill_(config.d_initial)
        lambda_b.zero_()
    dtype = adapter_dtype(weight)
    child_dict(module, "vera_lambda_b", nn.ParameterDict)[adapter] = nn.Parameter(lambda_b.to(weight.device, dtype))
    child_dict(module, "vera_lambda_d", nn.ParameterDict)[adapter] = nn.Parameter(lambda_d.to(weight.device, dtype))
    child_dict(module, "vera_dropout")[adapter] = nn.Dropout(config.vera_dropout) if config.vera_dropout > 0 \
        else nn.Identity()
    child_dict(module, "vera_gate")[adapter] = AdapterGate(1.0, config.vera_dropout).to(weight.device)


def delta(lw, site: Site, module: nn.Module, adapter: str, x):
    out_f, in_f = out_in(site, site_weight(lw.root, site))
    vera_a = lw.call(aten.slice.Tensor, lw.attr(f"vera_A.{adapter}"), 1, 0, in_f)
    vera_b = lw.call(aten.slice.Tensor, lw.attr(f"vera_B.{adapter}"), 0, 0, out_f)
    hidden = lw.call(aten.mul.Tensor, lw.call(aten.linear.default, x, vera_a),
                     lw.attr(f"{site.path}.vera_lambda_d.{adapter}"))
    return lw.call(aten.mul.Tensor, lw.call(aten.linear.default, hidden, vera_b),
                   lw.attr(f"{site.path}.vera_lambda_b.{adapter}"))


def delta_weight(gm, site: Site, module: nn.Module, adapter: str) -> torch.Tensor:
    """PEFT's ``get_delta_weight``: (λ_b B[:out]) (λ_d A[:, :in]), transposed for Conv1D."""
    down, up = delta_factors(gm, site, module, adapter)
    weight = up @ down
    return weight.T if site.fan_in_fan_out else weight


def delta_factors(gm, site: Site, module: nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW as (out, in) = B' A': A' = λ_d A[:, :in] (r, in), B' = λ_b B[:out] times the scale (out, r)."""
    out_f, in_f = out_in(site, site_weight(gm, site))
    vera_a, vera_b = gm._modules["vera_A"][adapter], gm._modules["vera_B"][adapter]
    down = module.vera_lambda_d[adapter].unsqueeze(-1) * vera_a[:, :in_f]
    up = module.vera_lambda_b[adapter].unsqueeze(-1) * vera_b[:out_f, :] * module.vera_gate[adapter].scale
    return down, up


def projection_checkpoint_keys(spec: Projections):
    """The method's ``checkpoint_keys``: PEFT's checks when loading (``_remap_adapter_state_dict_for_load``),
    PEFT's words: projections saved but not wanted are ignored (drawn from the key instead), wanted but
    missing raise."""
    key_a, key_b = f"base_model.{spec.a}", f"base_model.{spec.b}"

    def checkpoint_keys(config, keys: set) -> set:
        saved = {key_a, key_b} & keys
        if config.save_projection:
            if key_a not in saved:
                raise ValueError(f"Specified to load {spec.a} and {spec.b} from state dictionary however they were not "
                                 "present!")
            return set()
        if saved:
            warnings.warn(f"Specified to not load {spec.a} and {spec.b} from state dictionary however they are present "
                          "in state dictionary! Consider using them to ensure checkpoint loading is correct on all "
                          "platforms using `peft_config.save_projection = True`")
        else:
            warnings.warn(f"Specified to not load {spec.a} and {spec.b} from state dictionary. This means we will be "
                          "relying on PRNG initialisation to restore these projections using "
                          "`config.projection_prng_key`, which may not be accurate on all system configurations.")
        return saved

    return checkpoint_keys


checkpoint_keys = projection_checkpoint_keys(VERA_PROJECTIONS)


METHOD = register_method(additive(
    name="vera", config_type=VeraConfig, create=add_vera, delta=delta, delta_weight=delta_weight,
    delta_factors=delta_factors,
    containers=CONTAINERS, shared=SHARED, gates="vera_gate", dropouts="vera_dropout", kinds=("linear",),
    dtype_of=lambda module, adapter: module.vera_lambda_d[adapter].dtype, prepare=prepare,
    checkpoint_keys=checkpoint_keys,
    default_targets=DEFAULT_VERA_TARGETS, heads=output_heads,
    describe=lambda module, adapter: f"r={module.vera_lambda_d[adapter].numel()}"))
