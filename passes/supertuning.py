"""Super-Tuning, PEFT's tuners/supertuning, on the additive form:

    Δ(x) = F.linear(x, S) + (α/r) · B(A(dropout x))          ΔW = S + (α/r) · B A

``S`` is zero but at a fixed sparse support: the ``int(out · in · (1 − sparsity))`` entries of the
largest (``select_top``) or smallest weight magnitudes (``torch.topk`` of ``|W|`` flattened, as PEFT
selects them when the adapter is made), holding the trained values. With ``r`` set ("Supra") a
LoRA pair adds its low-rank term (its dropout on the LoRA input only, as PEFT). Sites as PEFT:
``torch.nn.Linear`` only; GPT-2's Conv1D, convolutions and embeddings are refused. On a 4-bit base
the support is chosen from the dequantized weight (PEFT ranks the packed bytes and then fails).

State, PEFT's names: ``<path>.supertuning_values.<adapter>`` (zero with ``init_weights``, N(0, 1)
without), ``<path>.supertuning_indices.<adapter>`` (flat int32 positions: a buffer, saved with
``save_precomputed_indices`` and otherwise chosen again from the base weight when loading),
``supertuning_lora_A/B.<adapter>.weight`` and ``supertuning_lora_dropout.<adapter>`` in Supra mode.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from fxpeft.canonical import Site, float_weight, site_weight
from fxpeft.configs import PeftConfigBase
from fxpeft.forms import AdapterGate, SharedTensors, adapter_dtype, additive, child_dict
from fxpeft.registry import register_method
from fxpeft.targets import output_heads

from .beft import nn_linear_only
from .hira import DEFAULT_HIRA_TARGETS as DEFAULT_SUPERTUNING_TARGETS  # PEFT's tables are equal
from .lora import linear_pair
from .vera import out_in

aten = torch.ops.aten
CONTAINERS = ("supertuning_values", "supertuning_indices", "supertuning_lora_A", "supertuning_lora_B",
              "supertuning_lora_dropout")


@dataclass
class SupertuningConfig(PeftConfigBase):
    """PEFT's SupertuningConfig, its fields and defaults: ``sparsity`` (0.99: 1 % of the entries train),
    ``select_top``, ``r`` (None: sparse only), ``lora_alpha`` (2·r when r is set), ``lora_dropout``,
    ``init_weights``, ``save_precomputed_indices`` and ``target_modules`` / ``modules_to_save``."""

    target_modules: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None
    sparsity: float = 0.99
    select_top: bool = True
    r: Optional[int] = None
    lora_alpha: Optional[float] = None
    lora_dropout: float = 0.0
    init_weights: bool = True
    save_precomputed_indices: bool = True

    peft_type = "SUPERTUNING"

    def __post_init__(self):
        super().__post_init__()
        # PEFT's checks and warning, PEFT's words
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0.0, 1.0), got {self.sparsity}")
        if self.r is not None:
            if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
                raise ValueError(f"r must be a positive integer or None, got {self.r!r}")
            if self.lora_alpha is None:
                self.lora_alpha = 2 * self.r
        elif self.lora_alpha is not None:
            raise ValueError("lora_alpha is set but r is None — Supra mode requires an explicit r.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0.0, 1.0), got {self.lora_dropout}")
        if not self.save_precomputed_indices:
            warnings.warn("save_precomputed_indices=False: sparse-support indices will be recomputed from base weight "
                          "magnitudes at load time. This assumes the base model is identical to training time; "
                          "numerical drift can cause topk tie-breaks to differ.")


def entries(weight, config: SupertuningConfig) -> int:
    """PEFT's ``_num_trainable``: the trainable entries at this sparsity."""
    return int(math.prod(weight.shape) * (1 - config.sparsity))


def check_site(module: nn.Module, site: Site, weight, config: SupertuningConfig) -> None:
    """PEFT's checks, PEFT's words, before any adapter is made."""
    nn_linear_only("Super-Tuning")(module, site, weight, config)
    if entries(weight, config) < 1:
        raise ValueError(f"sparsity={config.sparsity} leaves no trainable entries for a weight with "
                         f"{math.prod(weight.shape)} elements — no parameter would be adapted ({site.path!r}). Lower "
                         "the sparsity so at least one entry is trainable.")


def prepare(gm, targets, config: SupertuningConfig, adapter: str) -> None:
    """PEFT's ``_check_new_adapter_config``: the indices are saved for every adapter or for none."""
    values = sorted({c.save_precomputed_indices for c in gm.peft_config.values()
                     if isinstance(c, SupertuningConfig)} | {config.save_precomputed_indices})
    if len(values) > 1:
        raise ValueError("Super-Tuning indices must be saved for all adapters or none, but got multiple different "
                         f"values: {values}")


def add_supertuning(module: nn.Module, site: Site, weight, config: SupertuningConfig, adapter: str) -> None:
    """PEFT's ``update_layer``: the support from |W|, then the values, then (Supra) A and B."""
    base = float_weight(module).detach()
    count = entries(weight, config)
    _, indices = torch.topk(base.abs().flatten(), k=count, largest=config.select_top)
    if "supertuning_indices" not in module._modules:  # persistent or not for every adapter here, as PEFT's BufferDict
        module.add_module("supertuning_indices", SharedTensors(config.save_precomputed_indices))
    module.supertuning_indices[adapter] = indices.to(torch.int32)
    dtype = adapter_dtype(weight)
    values = torch.zeros(count) if config.init_weights else torch.randn(count)
    child_dict(module, "supertuning_values", nn.ParameterDict)[adapter] = nn.Parameter(values.to(weight.device, dtype))
    scale = 1.0
    if config.r is not None:
        out_f, in_f = out_in(site, weight)
        lora_a, lora_b = linear_pair(in_f, out_f, config.r, bool(config.init_weights))
        child_dict(module, "supertuning_lora_A")[adapter] = lora_a.to(weight.device, dtype)
        child_dict(module, "supertuning_lora_B")[adapter] = lora_b.to(weight.device, dtype)
        child_dict(module, "supertuning_lora_dropout")[adapter] = (
            nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity())
        scale = float(config.lora_alpha) / config.r
    gate = AdapterGate(1.0).to(weight.device)
    gate.lora_scale = scale  # α/r of the LoRA term; the sparse term is unscaled
    child_dict(module, "supertuning_gate")[adapter] = gate


def sparse_weight(values: torch.Tensor, indices: torch.Tensor, out_f: int, in_f: int) -> torch.Tensor:
    """S: the values scatter-added at their flat positions of an (out, in) zero matrix."""
    flat = torch.zeros(out_f * in_f, device=values.device, dtype=values.dtype)
    return flat.scatter_add(0, indices.long(), values).view(out_f, in_f)


def _supra(module: nn.Module, adapter: str) -> bool:
    return adapter in module._modules.get("supertuning_lora_A", ())


def delta(lw, site: Site, module: nn.Module, adapter: str, x):
    out_f, in_f = out_in(site, site_weight(lw.root, site))
    path = site.path
    weight = lw.call(sparse_weight, lw.attr(f"{path}.supertuning_values.{adapter}"),
                     lw.attr(f"{path}.supertuning_indices.{adapter}"), out_f, in_f)
    value = lw.call(aten.linear.default, x, weight)
    if not _supra(module, adapter):
        return value
    dropped = x
    if not isinstance(module.supertuning_lora_dropout[adapter], nn.Identity):
        dropped = lw.call_module(f"{path}.supertuning_lora_dropout.{adapter}", x)
    low = lw.call(aten.linear.default, dropped, lw.attr(f"{path}.supertuning_lora_A.{adapter}.weight"))
    low = lw.call(aten.linear.default, low, lw.attr(f"{path}.supertuning_lora_B.{adapter}.weight"))
    return lw.call(aten.add.Tensor, value, lw.call(aten.mul.Tensor, low, module.supertuning_gate[adapter].lora_scale))


def delta_weight(gm, site: Site, module: nn.Module, adapter: str) -> torch.Tensor:
    """PEFT's ``get_delta_weight``: S + (α/r) B A."""
    out_f, in_f = out_in(site, site_weight(gm, site))
    gate = module.supertuning_gate[adapter]
    weight = sparse_weight(module.supertuning_values[adapter], module.supertuning_indices[adapter], out_f, in_f)
    if _supra(module, adapter):
        weight = weight + gate.lora_scale * (module.supertuning_lora_B[adapter].weight
                                             @ module.supertuning_lora_A[adapter].weight)
    return weight * gate.scale


METHOD = register_method(additive(
    name="supertuning", config_type=SupertuningConfig, create=add_supertuning, delta=delta, delta_weight=delta_weight,
    containers=CONTAINERS, gates="supertuning_gate", kinds=("linear",), check_site=check_site, prepare=prepare,
    dtype_of=lambda module, adapter: module.supertuning_values[adapter].dtype,
    default_targets=DEFAULT_SUPERTUNING_TARGETS, heads=output_heads,
    describe=lambda module, adapter: f"{module.supertuning_values[adapter].numel()} entries" + (
        f", r={module.supertuning_lora_A[adapter].weight.shape[0]}" if _supra(module, adapter) else "")))
