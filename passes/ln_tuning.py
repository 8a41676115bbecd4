"""LN tuning, PEFT's tuners/ln_tuning: a trainable copy of each targeted module (LayerNorm, RMSNorm,
or any module a config names) per adapter, computed with in place of the module while the adapter
is active, as PEFT's LNTuningLayer.

State, PEFT's names: ``<path>.ln_tuning_layers.<adapter>`` is the copy (its tensors are what trains
and what checkpoints hold); ``<path>.ln_tuning_gate.<adapter>`` (not saved) says whether it is
merged. The module's own tensors keep their keys. Rewrite: the module's tensors are read from the
active adapter's copy (a ``where`` on the gates: switching is data), or per sample in mixed batches
(passes/modules_to_save.py's copies rule). Merging exchanges the values of the module's tensors with
the copy's (PEFT swaps the layers): the module then computes with the tuned values and the copy
holds the originals until unmerging exchanges them back; one adapter at a time, as PEFT.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from fxpeft.configs import PeftConfigBase
from fxpeft.forms import AdapterGate, child_dict, resolve_targets
from fxpeft.registry import Method, register_method, registry_of
from fxpeft.targets import is_targeted, unmatched_target_error

from .modules_to_save import _without_children, copies_rule

aten = torch.ops.aten

# PEFT's TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING
DEFAULT_LN_TARGETS = {
    "llama": ["input_layernorm", "post_attention_layernorm", "norm"],
    "bloom": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "llava": ["multi_modal_projector", "input_layernorm", "post_attention_layernorm", "norm", "embed_tokens", "lm_head"],
    "t5": ["layer_norm", "final_layer_norm"], "mt5": ["layer_norm", "final_layer_norm"],
    "bart": ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"],
    "gpt2": ["ln_1", "ln_2", "ln_f"], "blip-2": ["layernorm", "LayerNorm", "final_layer_norm", "self_attn_layer_norm"],
    "gptj": ["ln_1", "ln_f"], "falcon": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "mistral": ["input_layernorm", "post_attention_layernorm", "norm"], "phi": ["input_layernorm", "final_layernorm"],
    "gemma": ["input_layernorm", "post_attention_layernorm", "norm"],
    "gemma2": ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm",
               "norm"],
    "gemma3_text": ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                    "post_feedforward_layernorm", "norm"],
    "qwen2": ["post_attention_layernorm"], "qwen3": ["post_attention_layernorm"],
}
COPIES, GATES = "ln_tuning_layers", "ln_tuning_gate"


@dataclass
class LNTuningConfig(PeftConfigBase):
    """PEFT's LNTuningConfig: ``target_modules`` (None: PEFT's per-architecture norms),
    ``exclude_modules``, ``modules_to_save``."""

    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[Union[list[str], str]] = None

    peft_type = "LN_TUNING"


def attach(gm, sites, config: LNTuningConfig, adapter: str) -> list[str]:
    """A copy of every targeted module (any type, as PEFT), in module order."""
    registry = registry_of(gm)
    modules = [(path, module) for path, module in registry.base_modules(gm) if path]
    paths = [path for path, _ in modules if is_targeted(config, path)]
    if not paths:
        raise unmatched_target_error(config, [path for path, _ in modules])
    containers = registry.containers()
    for path in paths:
        module = gm.get_submodule(path)
        own = {k: v for k, v in module._modules.items() if k not in containers}
        child_dict(module, COPIES)[adapter] = copy.deepcopy(_without_children(module, own))
        device = next((t.device for t in (*module.parameters(), *module.buffers())), None)
        child_dict(module, GATES)[adapter] = AdapterGate(1.0).to(device)
    return paths


def exchange(module: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """The module's own tensors and the copy's, for merging by exchanging their values."""
    merged = [a for a, gate in module._modules[GATES].items() if gate.merged and a != adapter]
    if merged:  # PEFT's rule (PEFT's words for two adapters merged in one call)
        raise ValueError(f"Trying to merge {len(merged) + 1} adapters, but LN tuning does not allow merging more than "
                         f"one adapter at a time ({merged[0]!r} is merged: unmerge it first).")
    twin = module._modules[COPIES][adapter]
    own = [*module._parameters, *(n for n in module._buffers if n not in module._non_persistent_buffers_set)]
    return {name: getattr(twin, name) for name in own if getattr(module, name) is not None}


def reads_copy(lw, path: str, adapter: str):
    """The copy is read while the adapter is active and not merged (its gate's value: 1, 0 merged)."""
    return lw.call(aten.mul.Tensor, lw.attr(f"{path}.{GATES}.{adapter}.value"), lw.gate(adapter))


def adapters_at(module: nn.Module) -> list[str]:
    holder = module._modules.get(GATES)
    return list(holder.keys()) if holder is not None else []


METHOD = register_method(Method(
    name="ln_tuning", config_type=LNTuningConfig, attach=attach,
    resolve_config=lambda gm, sites, config: resolve_targets(gm, sites, config, DEFAULT_LN_TARGETS),
    containers=(COPIES, GATES), adapters_at=adapters_at, gate=lambda module, adapter: module._modules[GATES][adapter],
    exchange=exchange, rules=(copies_rule("ln_tuning", COPIES, reads_copy),),
    describe=lambda module, adapter: f"copy of {type(module).__name__}"))
