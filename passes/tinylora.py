"""TinyLoRA (learning to reason in 13 parameters), PEFT's tuners/tinylora, on the additive form. With the
site's weight as a matrix M (nn.Linear's (out, in), GPT-2's Conv1D's transposed, nn.Embedding's (num, dim))
and M's truncated SVD U S Vᵀ at rank r:

    A = √S Vᵀ (r, cols)     B = U √S (rows, r)     R = Σ_i v_i P_i (r, r)     ΔM = B R A

    linear sites:    Δ(x) = B (R (A dropout(x)))          embedding sites:  Δ(ids) = dropout(B[ids]) R A

as PEFT, on nn.Linear, Conv1D and nn.Embedding sites (quantized linears too: the SVD of the dequantized
weight). A, B and the projections P (u, r, r; N(0, 1/r) from a generator seeded ``projection_seed`` + the
site's index among the adapter's targets) are frozen buffers beside each site (``<path>.tinylora_A/B/P
.<adapter>``, PEFT's names; A and B always saved, P only with ``save_projection``). What trains is v (u long),
kept once on the transformed module and shared by groups of sites (``tinylora_v.<adapter>.<group>``, PEFT's
``base_model.tinylora_v.<group>``): ``weight_tying`` 0 gives every site its own v, 1 one v for all.
``<path>.tinylora_gate.<adapter>`` is the form's gate (scale 1) and names the site's group. Init as PEFT: v = 0
(``init_weights=True``, the identity start), uniform in ±``init_v_bound`` ("uniform"), or left as allocated
(False).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from fxpeft.canonical import Site, float_weight
from fxpeft.configs import DEFAULT_LORA_TARGETS, PeftConfigBase, check_bias, check_dropout, check_layer_fields
from fxpeft.forms import AdapterGate, SharedTensors, adapter_dtype, additive, child_dict
from fxpeft.registry import register_method
from fxpeft.targets import output_heads

aten = torch.ops.aten

FROZEN = ("tinylora_A", "tinylora_B", "tinylora_P")
CONTAINERS = ("tinylora_v", "tinylora_dropout", *FROZEN)
SHARED = ("tinylora_v",)


@dataclass
class TinyLoraConfig(PeftConfigBase):
    """PEFT's TinyLoraConfig, its fields, defaults and checks: ``r`` (2: the SVD rank), ``u`` (64: v's length),
    ``weight_tying`` (0.0 .. 1.0), ``projection_seed`` (42), ``save_projection``, ``init_v_bound`` (0.02),
    ``tinylora_dropout``, ``fan_in_fan_out``, ``bias`` ("none", "all", "tinylora_only"), ``init_weights``
    (True, "uniform" or False) and the targeting fields (PEFT's TinyLoraConfig has no ``exclude_modules``)."""

    r: int = 2
    u: int = 64
    weight_tying: float = 0.0
    projection_seed: int = 42
    save_projection: bool = True
    init_v_bound: float = 0.02
    target_modules: Optional[Union[list[str], str]] = None
    tinylora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: Optional[list[str]] = None
    init_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None

    peft_type = "TINYLORA"

    def __post_init__(self):
        super().__post_init__()
        # PEFT's checks and warning, PEFT's words
        check_layer_fields(self, regex=())
        if not self.save_projection:
            warnings.warn(
                "Specified to not save projection tensors P within the state dictionary. They will be restored "
                "using the PRNG key stored in `config.projection_seed`. Consider setting `config.save_projection` "
                "to `True` to guarantee restoring the checkpoint correctly on all system configurations.")
        if self.r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {self.r}")
        if self.u <= 0:
            raise ValueError(f"`u` should be a positive integer value but the value passed is {self.u}")
        if not (0.0 <= self.weight_tying <= 1.0):
            raise ValueError(
                f"`weight_tying` should be a float between 0.0 and 1.0 but the value passed is {self.weight_tying}")
        # what PEFT takes silently (another init_weights leaves v unset) or refuses later (dropout, bias)
        if self.init_weights not in (True, False, "uniform"):
            raise ValueError(f"TinyLoraConfig.init_weights must be True (v = 0), 'uniform' or False (v left unset), "
                             f"got {self.init_weights!r} (PEFT would leave v unset).")
        check_dropout(self, "tinylora_dropout")
        check_bias(self, "tinylora_only")


def weight_matrix(module: nn.Module, site: Site) -> torch.Tensor:
    """M, the float matrix the SVD is of: (out, in) for linear sites, the embedding table as stored."""
    weight = float_weight(module, site.weight.rsplit(".", 1)[-1])
    return weight.detach().T if site.fan_in_fan_out else weight.detach()


def svd_factors(matrix: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``_init_svd``: A = √S Vᵀ, B = U √S at rank min(r, M's dims), the SVD in float32 and the factors
    rounded to M's dtype."""
    u, s, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    rank = min(r, *matrix.shape)
    root_s = torch.sqrt(s[:rank].to(matrix.dtype))
    a = (root_s.unsqueeze(1) * vh[:rank].to(matrix.dtype)).contiguous()
    b = (u[:, :rank].to(matrix.dtype) * root_s.unsqueeze(0)).contiguous()
    return a, b


def groups(count: int, weight_tying: float) -> list[int]:
    """PEFT's groups: each of ``count`` targets (in module order) gets the v of group ⌊i / size⌋."""
    num_groups = max(1, round(count * (1.0 - weight_tying)))
    size = max(1, count // num_groups)
    return [min(i // size, num_groups - 1) for i in range(count)]


def prepare(gm, targets, config: TinyLoraConfig, adapter: str) -> None:
    """Every group's v (drawn in group order as PEFT draws them), then each site's frozen A, B, P and its gate.
    Done here rather than in ``create`` since a site's P seed and group follow from its index among the
    targets."""
    for other in gm.peft_config.values():  # PEFT's check, PEFT's words (and error type)
        if other.save_projection != config.save_projection:
            raise TypeError("TinyLoRA projection tensors must be saved for all adapters or none, but got multiple "
                            f"different values: {sorted({other.save_projection, config.save_projection})}")
    group_of = groups(len(targets), config.weight_tying)
    vectors = child_dict(child_dict(gm, "tinylora_v"), adapter, nn.ParameterDict)
    for index, (module, site, weight) in enumerate(targets):
        dtype = adapter_dtype(weight)
        key = str(group_of[index])
        if key not in vectors:
            v = torch.empty(config.u)
            if config.init_weights is True:
                v.zero_()
            elif config.init_weights == "uniform":
                v.uniform_(-config.init_v_bound, config.init_v_bound)
            vectors[key] = nn.Parameter(v.to(weight.device, dtype))
        matrix = weight_matrix(module, site)
        a, b = svd_factors(matrix, config.r)
        rank = a.shape[0]
        generator = torch.Generator().manual_seed(config.projection_seed + index)
        projections = torch.normal(mean=0.0, std=1.0 / (rank ** 0.5), size=(config.u, rank, rank), generator=generator)
        # PEFT holds them in the base weight's dtype; fxpeft in the adapter's (the same for float32 bases)
        for name, tensor in zip(FROZEN, (a, b, projections.to(matrix.dtype))):
            holder = child_dict(module, name, SharedTensors)  # a buffer dict per site
            holder.persistent = name != "tinylora_P" or bool(config.save_projection)
            holder[adapter] = tensor.to(weight.device, dtype)
        child_dict(module, "tinylora_gate")[adapter] = TinyGate(key, config.tinylora_dropout).to(weight.device)


class TinyGate(AdapterGate):
    """The form's gate (scale 1) and the key of the site's v among the adapter's groups."""

    def __init__(self, group: str, dropout: float):
        super().__init__(1.0, dropout)
        self.group = group

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group={self.group}"


def add_dropout(module: nn.Module, site: Site, weight, config: TinyLoraConfig, adapter: str) -> None:
    child_dict(module, "tinylora_dropout")[adapter] = nn.Dropout(config.tinylora_dropout) \
        if config.tinylora_dropout > 0 else nn.Identity()


def mix(v: torch.Tensor, projections: torch.Tensor) -> torch.Tensor:
    """PEFT's ``_compute_R``: R = Σ_i v_i P_i."""
    return torch.einsum("i,ijk->jk", v, projections.to(v.dtype))


def delta(lw, site: Site, module: nn.Module, adapter: str, x):
    path = f"{site.path}.{{}}.{adapter}"
    a, b = lw.attr(path.format("tinylora_A")), lw.attr(path.format("tinylora_B"))
    mixed = lw.call(mix, lw.attr(f"tinylora_v.{adapter}.{module.tinylora_gate[adapter].group}"),
                    lw.attr(path.format("tinylora_P")))
    if site.kind == "embedding":  # B's rows for the ids, through the dropout, then R and A
        hidden = lw.call(aten.embedding.default, b, x)
        if not isinstance(module.tinylora_dropout[adapter], nn.Identity):
            hidden = lw.call_module(path.format("tinylora_dropout"), hidden)
        return lw.call(aten.matmul.default, lw.call(aten.matmul.default, hidden, mixed), a)
    hidden = lw.call(aten.linear.default, lw.call(aten.linear.default, x, a), mixed)
    return lw.call(aten.linear.default, hidden, b)


def delta_weight(gm, site: Site, module: nn.Module, adapter: str) -> torch.Tensor:
    """PEFT's ``get_delta_weight``: B R A (in float32 for half-precision factors on the CPU, as PEFT), in the
    layout of the site's weight."""
    a, b = delta_factors(gm, site, module, adapter)
    weight = b @ a
    return weight.T if site.fan_in_fan_out else weight


def delta_factors(gm, site: Site, module: nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW as (out, in) = B' A': A' = R A, B' = B times the scale."""
    tensors = [module.tinylora_A[adapter], module.tinylora_B[adapter],
               mix(gm.tinylora_v[adapter][module.tinylora_gate[adapter].group], module.tinylora_P[adapter])]
    if tensors[0].device.type == "cpu" and tensors[0].dtype in (torch.float16, torch.bfloat16):
        tensors = [t.float() for t in tensors]
    a, b, mixed = tensors
    return mixed @ a, b * module.tinylora_gate[adapter].scale


def loaded_state(gm, adapter: str, tensors: dict) -> dict:
    """PEFT's warnings when config and file disagree about the projections; P the file holds for a config that
    does not save it is not loaded (it is drawn from the seed), a file without it for one that does keeps the
    drawn P."""
    saved = [key for key in tensors if key.endswith(".tinylora_P")]
    if gm.peft_config[adapter].save_projection and not saved:
        warnings.warn("Specified to load tinylora_P from state dictionary however it was not present! "
                      "Projection tensors will be regenerated from the projection_seed.")
        tensors.update({f"base_model.model.{path}.tinylora_P": module.tinylora_P[adapter]
                        for path, module in gm.named_modules()
                        if "tinylora_P" in module._modules and adapter in module.tinylora_P})
    elif not gm.peft_config[adapter].save_projection and saved:
        warnings.warn("Specified to not load tinylora_P from state dictionary however they are present in state"
                      " dictionary! Consider using them to ensure checkpoint loading is correct on all platforms using"
                      " `peft_config.save_projection = True`")
        tensors = {key: value for key, value in tensors.items() if key not in saved}
    elif not gm.peft_config[adapter].save_projection:
        warnings.warn("Specified to not load tinylora_P from state dictionary. This means we will be relying on"
                      " PRNG initialisation to restore these projections using `config.projection_seed`, which may"
                      " not be accurate on all system configurations.")
    return tensors


METHOD = register_method(additive(
    name="tinylora", config_type=TinyLoraConfig, create=add_dropout, delta=delta, delta_weight=delta_weight,
    delta_factors=delta_factors,
    containers=CONTAINERS, shared=SHARED, gates="tinylora_gate", dropouts="tinylora_dropout",
    kinds=("linear", "embedding"), dtype_of=lambda module, adapter: module.tinylora_A[adapter].dtype,
    prepare=prepare, loaded_state=loaded_state, default_targets=DEFAULT_LORA_TARGETS, heads=output_heads,
    describe=lambda module, adapter: f"r={module.tinylora_A[adapter].shape[0]}, "
                                     f"group={module.tinylora_gate[adapter].group}"))
