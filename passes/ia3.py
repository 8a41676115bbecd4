"""(IA)³: a learned vector rescales a site's activations, the scaling form (fxpeft/forms.py).

    feed-forward sites (``feedforward_modules``):  y = W (l ⊙ x) + b
    other sites:                                    y = l ⊙ (W x + b)

on linear (nn.Linear, Conv1D) and Conv2d/Conv3d sites, as PEFT's IA3. State, PEFT's names:
``<path>.ia3_l.<adapter>`` of shape (1, in) for feed-forward linear sites, (out, 1) for the others,
(1, C, 1, …) for convolutions; ``<path>.ia3_gate.<adapter>`` is the form's gate (not saved).
Merging multiplies the weight's input or output axis (and an output-scaled site's bias).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from fxpeft.configs import PeftConfigBase
from fxpeft.forms import AdapterGate, adapter_dtype, child_dict, resolve_targets, scaling
from fxpeft.registry import register_method

# PEFT's per-architecture defaults (peft.utils.constants)
DEFAULT_IA3_TARGETS = {
    "t5": ["k", "v", "wo"], "mt5": ["k", "v", "wi_1"], "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"], "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"], "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"], "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"], "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"], "llama4": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"], "mixtral": ["k_proj", "v_proj", "w2"],
    "bert": ["key", "value", "output.dense"], "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"], "RefinedWebModel": ["query_key_value", "dense_4h_to_h"],
    "RefinedWeb": ["query_key_value", "dense_4h_to_h"], "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"], "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"], "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"], "qwen3": ["q_proj", "v_proj", "down_proj"],
}
DEFAULT_IA3_FEEDFORWARD = {
    "t5": ["wo"], "mt5": [], "gpt2": ["mlp.c_proj"], "bloom": ["mlp.dense_4h_to_h"], "roberta": ["output.dense"],
    "opt": ["fc2"], "gptj": ["fc_out"], "gpt_neox": ["dense_4h_to_h"], "gpt_neo": ["c_proj"], "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"], "llama": ["down_proj"], "llama4": ["down_proj"], "mistral": ["down_proj"],
    "mixtral": ["w2"], "bert": ["output.dense"], "deberta-v2": ["output.dense"], "deberta": ["output.dense"],
    "RefinedWeb": ["dense_4h_to_h"], "RefinedWebModel": ["dense_4h_to_h"], "falcon": ["dense_4h_to_h"],
    "phi": ["fc2"], "gemma": ["down_proj"], "gemma2": ["down_proj"], "gemma3_text": ["down_proj"],
    "qwen2": ["down_proj"], "qwen3": ["down_proj"],
}


@dataclass
class IA3Config(PeftConfigBase):
    """PEFT's IA3Config: ``feedforward_modules`` (a subset of ``target_modules``) scale their
    input, the other targets their output; ``init_ia3_weights`` starts every vector at 1."""

    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    feedforward_modules: Optional[Union[list[str], str]] = None
    fan_in_fan_out: bool = False
    modules_to_save: Optional[list[str]] = None
    init_ia3_weights: bool = True

    peft_type = "IA3"

    def __post_init__(self):
        super().__post_init__()
        if (isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list)
                and not set(self.feedforward_modules) <= set(self.target_modules)):
            raise ValueError(f"IA3Config.feedforward_modules {self.feedforward_modules} should be a subset of "
                             f"target_modules {self.target_modules} (as in PEFT): add them to target_modules.")


def is_feedforward(config: IA3Config, path: str) -> bool:
    """PEFT's test: a regex fullmatch, or a path ending with one of the names."""
    spec = config.feedforward_modules
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path.endswith(name) for name in spec or ())


def resolve(gm, sites, config: IA3Config) -> IA3Config:
    config = resolve_targets(gm, sites, config, DEFAULT_IA3_TARGETS)
    if config.feedforward_modules is None:
        model_type = getattr(getattr(gm._fxpeft_source, "config", None), "model_type", None)
        if model_type not in DEFAULT_IA3_FEEDFORWARD:
            raise ValueError(f"feedforward_modules is None and fxpeft has no default for model type {model_type!r}; "
                             "set IA3Config(feedforward_modules=[...]) ([] for none).")
        config = dataclasses.replace(config, feedforward_modules=list(DEFAULT_IA3_FEEDFORWARD[model_type]))
    return config


def add_ia3(module: nn.Module, site, weight, config: IA3Config, adapter: str) -> None:
    feedforward = is_feedforward(config, site.path)
    if site.kind == "conv":
        if not isinstance(module, (nn.Conv2d, nn.Conv3d)):
            raise ValueError(f"Target module {site.path!r} ({type(module).__name__}) is not supported by IA3: PEFT adapts "
                             "nn.Linear, Conv1D, nn.Conv2d and nn.Conv3d. Leave it out of target_modules.")
        channels = module.in_channels if feedforward else module.out_channels
        shape = (1, channels) + (1,) * (module.weight.dim() - 2)
    else:
        out_f, in_f = weight.shape[::-1] if site.fan_in_fan_out else weight.shape
        shape = (1, in_f) if feedforward else (out_f, 1)
    vector = torch.randn(shape)
    if config.init_ia3_weights:
        nn.init.constant_(vector, 1.0)
    child_dict(module, "ia3_l", nn.ParameterDict)[adapter] = nn.Parameter(
        vector.to(weight.device, adapter_dtype(weight)))
    gate = AdapterGate(1.0).to(weight.device)
    gate.feedforward = feedforward
    child_dict(module, "ia3_gate")[adapter] = gate


METHOD = register_method(scaling(
    name="ia3", config_type=IA3Config, create=add_ia3, containers=("ia3_l",), gates="ia3_gate",
    vector=lambda module, adapter: module.ia3_l[adapter],
    scales_input=lambda module, adapter: module.ia3_gate[adapter].feedforward,
    kinds=("linear", "conv"), resolve_config=resolve,
    describe=lambda module, adapter: "input" if module.ia3_gate[adapter].feedforward else "output"))


def add_weighted_adapter(gm, adapters: list[str], weights: list[float], adapter_name: str) -> None:
    """PEFT's IA3 ``add_weighted_adapter``: a new adapter over the union of the adapters' targets
    (and feed-forward modules) whose vectors are ``Σ w_i l_i`` where an adapter has one (else 0)."""
    from fxpeft.lifecycle import add_adapter, transaction

    configs = [gm.peft_config[a] for a in adapters]
    kinds = {type(c.target_modules) for c in configs}, {type(c.feedforward_modules) for c in configs}
    if any(len(k) > 1 for k in kinds):
        raise ValueError("All adapter configs should have the same type for target and feedforward modules "
                         "(all lists or all regex strings), as PEFT requires.")

    def union(field):
        values = [getattr(c, field) for c in configs]
        if isinstance(values[0], str):
            return "|".join(f"({v})" for v in values)
        return sorted(set().union(*values))

    config = dataclasses.replace(configs[0], target_modules=union("target_modules"),
                                 feedforward_modules=union("feedforward_modules"))
    with transaction(gm):
        add_adapter(gm, config, adapter_name)
        with torch.no_grad():
            for module in gm.modules():
                vectors = module._modules.get("ia3_l")
                if vectors is None or adapter_name not in vectors:
                    continue
                target = vectors[adapter_name]
                target.zero_()
                for adapter, weight in zip(adapters, weights):
                    if adapter in vectors:
                        target.add_(vectors[adapter] * weight)
