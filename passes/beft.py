"""BEFT (bias-efficient fine-tuning), PEFT's tuners/beft, on the additive form:

    y = W x + b + Σ_a g_a β_a          merged: b ← b + β_a

a learned bias ``β`` (``<path>.beft_bias.<adapter>``, shape (1, out), PEFT's name and shape) added to
the output of an ``nn.Linear`` (quantized linears too: bitsandbytes' layers are nn.Linear subclasses,
which PEFT wraps as well). PEFT takes nothing else: transformers' Conv1D, convolutions and embeddings
raise. PEFT draws β ~ N(0, 1) in model order and zeroes it with ``init_weights`` (the default), so
the adapter starts as the identity. Merging adds β to the layer's bias; a layer without a bias
cannot be merged (PEFT warns when the adapter is made and raises on merging; so does fxpeft).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from fxpeft.canonical import Site, site_weight
from fxpeft.configs import PeftConfigBase
from fxpeft.forms import AdapterGate, adapter_dtype, additive, child_dict
from fxpeft.registry import register_method
from fxpeft.targets import output_heads

from .vera import out_in

# PEFT's TRANSFORMERS_MODELS_TO_BEFT_TARGET_MODULES_MAPPING: the value projections
DEFAULT_BEFT_TARGETS = {
    "t5": ["v"], "mt5": ["v"], "roberta": ["value"], "opt": ["v_proj"], "gptj": ["v_proj"], "gpt_neo": ["v_proj"],
    "bart": ["v_proj"], "llama": ["v_proj"], "llama4": ["v_proj"], "mistral": ["v_proj"], "mixtral": ["v_proj"],
    "bert": ["value"], "deberta-v2": ["value_proj"], "phi": ["v_proj"], "gemma": ["v_proj"], "gemma2": ["v_proj"],
    "gemma3_text": ["v_proj"], "qwen2": ["v_proj"], "qwen3": ["v_proj"],
}


@dataclass
class BeftConfig(PeftConfigBase):
    """PEFT's BeftConfig: ``target_modules``, ``modules_to_save`` and ``init_weights`` (True: β starts
    at zero). PEFT's BeftConfig has no ``exclude_modules``, layer filters or patterns."""

    target_modules: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None
    init_weights: bool = True

    peft_type = "BEFT"


def nn_linear_only(method_name: str):
    """A ``check_site`` for methods PEFT builds on ``torch.nn.Linear`` only (bitsandbytes' layers are
    subclasses; GPT-2's Conv1D raises TypeError there, ValueError here), before any adapter is made."""
    def check(module: nn.Module, site: Site, weight, config) -> None:
        if site.fan_in_fan_out:
            raise ValueError(f"{method_name} does not support transformers' Conv1D layers such as {site.path!r}: "
                             f"PEFT's {method_name} adapts torch.nn.Linear only. Leave it out of target_modules.")
    return check


def add_beft(module: nn.Module, site: Site, weight, config: BeftConfig, adapter: str) -> None:
    """PEFT's ``update_layer``: β ~ N(0, 1) (drawn in model order whatever the init), zero with init_weights."""
    out_f, _ = out_in(site, weight)
    if getattr(module, "bias", None) is None:
        warnings.warn(f"Detected that the base layer {site.path!r} has no bias term. Note you cannot merge the BEFT "
                      "adapter into the base layer.")
    bias = torch.randn((1, out_f))
    if config.init_weights:
        bias.zero_()
    child_dict(module, "beft_bias", nn.ParameterDict)[adapter] = nn.Parameter(
        bias.to(weight.device, adapter_dtype(weight)))
    child_dict(module, "beft_gate")[adapter] = AdapterGate(1.0).to(weight.device)


def bias_like(bias: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """β broadcast to the site's output: the form masks per sample in mixed batches, row by row."""
    return bias.reshape(-1).expand(output.shape)


def delta(lw, site: Site, module: nn.Module, adapter: str, x):
    return lw.call(bias_like, lw.attr(f"{site.path}.beft_bias.{adapter}"), site.output)


def delta_weight(gm, site: Site, module: nn.Module, adapter: str) -> torch.Tensor:
    weight = site_weight(gm, site)
    return torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)


def delta_bias(gm, site: Site, module: nn.Module, adapter: str) -> torch.Tensor:
    return module.beft_bias[adapter].detach().reshape(-1) * module.beft_gate[adapter].scale


METHOD = register_method(additive(
    name="beft", config_type=BeftConfig, create=add_beft, delta=delta, delta_weight=delta_weight,
    delta_bias=delta_bias, delta_factors=lambda gm, site, module, adapter: (),  # it changes the bias alone
    containers=("beft_bias",), gates="beft_gate", kinds=("linear",),
    check_site=nn_linear_only("BEFT"),
    dtype_of=lambda module, adapter: module.beft_bias[adapter].dtype,
    default_targets=DEFAULT_BEFT_TARGETS, heads=output_heads,
    describe=lambda module, adapter: f"bias ({module.beft_bias[adapter].shape[-1]},)"))
