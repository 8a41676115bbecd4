"""LoRA's ``target_parameters`` (PEFT's ``ParamWrapper``): LoRA on raw ``nn.Parameter``s that no
linear layer owns, such as the stacked expert weights of a mixture of experts.

A targeted parameter P of shape (out, in), or (experts, in, out) — PEFT's reading of a 3-D
parameter, (experts, out, in) for modules that say ``is_transposed`` — is read by the graph as

    P + s · ΔW,   ΔW = B A  (2-D),   ΔW[e] = B_e A_e  per expert (3-D; A (experts·r, in), B (out, experts·r))

which is PEFT's parametrization. State: LoRA's containers beside the module owning P; where several
parameters of one module are targeted, PEFT nests a wrapper per parameter, so the first (in the
module's parameter order) sits under ``<module>.base_layer.``, the next one level up and so on:
those are the keys here too (``experts.base_layer.lora_A.weight``, ``experts.lora_A.weight``).
The rewrite (phase 40) replaces every read of P (a ``get_attr``) with P + Σ gated deltas, so
switching adapters is data (PEFT parametrizes P only while the owning module's forward runs: code
outside that forward reading P gets P there, P + s·ΔW here); per-sample adapters (mixed batches) cannot pick a weight per sample
and raise. Merging adds s·ΔW to P (these holders answer ``Method.state_site`` with a site whose
weight is P).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional

import torch
from torch import nn

from fxpeft.canonical import Site
from fxpeft.configs import DEFAULT_LORA_TARGETS
from fxpeft.forms import AdapterGate, adapter_dtype, child_dict
from fxpeft.registry import DEFAULT, Method, Rule, registry_of
from fxpeft.targets import is_targeted, pattern_value

aten = torch.ops.aten

NESTED = "base_layer"  # PEFT's name of the wrapped module: one level per further targeted parameter


class ParamGate(AdapterGate):
    """The gate of one adapter on one parameter, with what its delta's layout needs."""

    def __init__(self, scale: float, parameter: str, experts: int, swapped: bool):
        super().__init__(scale)
        self.parameter, self.experts, self.swapped = parameter, experts, swapped

    def extra_repr(self) -> str:
        return f"parameter={self.parameter!r}, experts={self.experts}, {super().extra_repr()}"


def param_delta(a: torch.Tensor, b: torch.Tensor, experts: int, swapped: bool) -> torch.Tensor:
    """ΔW (unscaled) in the parameter's layout (PEFT's ``ParamWrapper.get_delta_weight``)."""
    if experts == 1:
        return b @ a
    a = a.reshape(experts, -1, a.shape[-1])  # (experts, r, in)
    b = b.reshape(b.shape[0], -1, experts)  # (out, r, experts)
    return torch.einsum("ore,eri->eoi" if swapped else "ore,eri->eio", b, a)


def targeted_parameters(gm, config) -> dict[str, list[str]]:
    """{module path: its targeted parameter names, in the module's order}, matched as PEFT does: the
    full ``<module>.<parameter>`` name or a dotted suffix of it."""
    names = sorted(set(config.target_parameters))
    registry = registry_of(gm)
    found: dict[str, list[str]] = {}
    for path, module in gm.named_modules():
        if path and registry.is_adapter_state(path) or path.split(".")[-1] == NESTED:
            continue
        for param in module._parameters:
            key = f"{path}.{param}" if path else param
            if key in names or any(key.endswith(f".{t}") for t in names):
                if not path:  # PEFT's error
                    raise ValueError(f"Targeting an nn.Parameter on the top-level module is not supported (parameter "
                                     f"'{param}').")
                found.setdefault(path, []).append(param)
    if not found:
        raise ValueError(f"target_parameters {config.target_parameters!r} matched no parameter of the model; name "
                         "them as '<module>.<parameter>' or a suffix of that, such as 'experts.gate_up_proj'.")
    return found


def _holder(module: nn.Module, steps) -> nn.Module:
    """The module under ``module`` reached by ``steps`` (child names), ModuleDicts created on the way:
    PEFT's wrapper layout (``base_layer``, ``base_layer.out_proj`` …), as adapter state."""
    for step in steps:
        if step not in module._modules:
            module.add_module(step, nn.ModuleDict())
        module = module._modules[step]
    return module


def _check(config) -> None:
    for field, bad in (("lora_dropout", config.lora_dropout), ("fan_in_fan_out", config.fan_in_fan_out),
                       ("lora_bias", config.lora_bias), ("use_dora", config.use_dora)):
        if bad:  # PEFT's ParamWrapper refuses them
            raise ValueError(f"target_parameters (LoRA on nn.Parameters) does not work with {field}={bad!r} (as in "
                             f"PEFT); leave {field} at its default.")


def add_parameter_lora(gm, config, adapter: str) -> list[str]:
    """LoRA on every targeted parameter; returns the holders' paths."""
    _check(config)
    paths = []
    for path, params in targeted_parameters(gm, config).items():
        module = gm.get_submodule(path)
        if any(not isinstance(g, ParamGate) for g in (module._modules.get("lora_scaling") or {}).values()):
            raise ValueError(f"Trying to wrap an `nn.Parameter` of layer '{path}' of type {type(module).__name__}, which "
                             "is also targeted with `target_modules`; target it one way (as PEFT).")
        for index, param in enumerate(params):
            depth = len(params) - 1 - index  # the first parameter is wrapped innermost, as PEFT nests them
            holder = _holder(module, [NESTED] * depth)
            _add(holder, getattr(module, param), param, getattr(module, "is_transposed", False), path, config, adapter)
            paths.append(f"{path}{('.' + NESTED) * depth}")
    return paths


def _add(holder: nn.Module, weight: torch.Tensor, param: str, transposed: bool, path: str, config, adapter: str):
    if weight.dim() not in (2, 3):
        raise ValueError(f"target_parameters: {path}.{param} has {weight.dim()} dimensions; LoRA on parameters takes "
                         "2-D and 3-D ones (as PEFT).")
    experts, (in_f, out_f) = (1, (weight.shape[1], weight.shape[0])) if weight.dim() == 2 else (
        weight.shape[0], (weight.shape[1], weight.shape[2]))
    swapped = weight.dim() == 3 and not transposed
    if swapped:
        in_f, out_f = out_f, in_f
    r = pattern_value(config.rank_pattern, path, config.r)
    alpha = pattern_value(config.alpha_pattern, path, config.lora_alpha)
    scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r
    a, b = nn.Linear(in_f, r * experts, bias=False), nn.Linear(r * experts, out_f, bias=False)
    init = config.init_lora_weights
    if init is True:
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
    elif isinstance(init, str) and init.lower() == "gaussian":
        nn.init.normal_(a.weight, std=1 / r)
    elif init is not False:
        raise NotImplementedError(f"init_lora_weights={init!r} with target_parameters is not implemented in fxpeft.")
    if init is not False:
        nn.init.zeros_(b.weight)
    dtype = adapter_dtype(weight)
    child_dict(holder, "lora_A")[adapter] = a.to(weight.device, dtype)
    child_dict(holder, "lora_B")[adapter] = b.to(weight.device, dtype)
    child_dict(holder, "lora_dropout")[adapter] = nn.Identity()
    child_dict(holder, "lora_scaling")[adapter] = ParamGate(scale, param, experts, swapped).to(weight.device)


def attention_targets(gm, config) -> list[str]:
    """The targeted ``nn.MultiheadAttention`` modules (PEFT wraps them whole)."""
    return [path for path, module in registry_of(gm).base_modules(gm, keep=(NESTED,))
            if path and isinstance(module, nn.MultiheadAttention) and is_targeted(config, path)]


def add_attention_lora(gm, config, adapter: str, paths: list[str]) -> list[str]:
    """PEFT's ``lora.MultiheadAttention``: LoRA on the packed ``in_proj_weight`` (state beside the
    module) and on ``out_proj.weight`` (state under ``<module>.base_layer.out_proj``, PEFT's keys), both
    applied as weight deltas (PEFT merges them for each call: no LoRA dropout there). The attention
    must be captured by torch.export (transformers models are; a plain module needs ``example_inputs``):
    symbolic_trace keeps ``nn.MultiheadAttention`` as one opaque call."""
    holders = []
    canonical = gm._fxpeft_signatures[gm._fxpeft_primary].canonical
    opaque = [path for path in paths if any(n.op == "call_module" and n.target == path for n in canonical.nodes)]
    if opaque:
        raise NotImplementedError(f"LoRA on the nn.MultiheadAttention {opaque[0]!r} needs the attention's weights in the "
                                  "graph, and this capture (torch.fx.symbolic_trace) keeps it as one call: pass "
                                  "example_inputs=... to fxpeft.transform, which captures with torch.export.")
    for path in paths:
        module = gm.get_submodule(path)
        if not module._qkv_same_embed_dim:  # PEFT's errors
            raise ValueError(f"Only same embed for query/key/value is supported as of now for MultiheadAttention "
                             f"({path!r} has kdim/vdim other than embed_dim).")
        if config.use_dora:
            raise ValueError("MultiheadAttention does not support DoRA (yet), please set use_dora to False")
        _add(module, module.in_proj_weight, "in_proj_weight", False, path, config, adapter)
        out = _holder(module, [NESTED, "out_proj"])
        _add(out, module.out_proj.weight, "weight", False, path, config, adapter)
        # PEFT's MultiheadAttention.merge (which its forward runs on every call) adds out_proj's delta itself
        # and then merges out_proj's own LoRA layer too: out_proj computes with W + 2·s·B A. PEFT-trained
        # adapters were trained that way; the same factor keeps their outputs.
        gate = out.lora_scaling[adapter]
        gate.scale *= 2
        gate.refresh()
        holders += [path, f"{path}.{NESTED}.out_proj"]
    return holders


# ----------------------------------------------------------------------------- rewrite


def owner_path(holder_path: str) -> str:
    """The module whose parameter a holder adapts: its path without PEFT's ``base_layer`` steps."""
    return ".".join(part for part in holder_path.split(".") if part != NESTED)


def _holders(root: nn.Module) -> dict[str, list[tuple[str, str]]]:
    """{parameter path: [(holder path, adapter)]} for every parameter adapter under ``root``."""
    found: dict[str, list] = {}
    for path, module in registry_of(root).base_modules(root, keep=(NESTED,)):  # not into other adapter state
        for adapter, gate in (module._modules.get("lora_scaling") or {}).items():
            if isinstance(gate, ParamGate):
                owner = owner_path(path)
                found.setdefault(f"{owner}.{gate.parameter}" if owner else gate.parameter, []).append((path, adapter))
    return found


def match(lw):
    holders = _holders(lw.root)
    for node in list(lw.graph.nodes) if holders else ():
        if node.op == "get_attr" and node.target in holders:
            yield node, holders[node.target]


def rewrite(lw, candidate) -> None:
    node, entries = candidate
    if lw.mixed:
        raise NotImplementedError("Mixed batches (adapter_names=...) are not supported with LoRA on parameters "
                                  "(target_parameters, nn.MultiheadAttention): a weight cannot differ per sample.")
    lw.tag["fxpeft_site"] = owner_path(entries[0][0])
    users = list(node.users)
    owner, _, name = node.target.rpartition(".")
    weight = getattr(lw.module(owner) if owner else lw.root, name)
    value = node
    with lw.graph.inserting_before(node.next):
        for holder, adapter in entries:
            gate = lw.module(holder).lora_scaling[adapter]
            delta = lw.call(param_delta, lw.attr(f"{holder}.lora_A.{adapter}.weight"),
                            lw.attr(f"{holder}.lora_B.{adapter}.weight"), gate.experts, gate.swapped)
            on = lw.call(aten.mul.Tensor, lw.attr(f"{holder}.lora_scaling.{adapter}.value"), lw.gate(adapter))
            delta = lw.call(aten.mul.Tensor, delta, on)
            value = lw.call(aten.add.Tensor, value, lw.cast(delta, weight.dtype, adapter_dtype(weight)))
    for user in users:
        user.replace_input_with(node, value)


DEFAULT.add_rule(Rule(name="lora_parameters", match=match, rewrite=rewrite, phase=40))


# ----------------------------------------------------------------------------- LoRA with target_parameters


def state_site(gm, path: str, module: nn.Module) -> Optional[Site]:
    """The holder at ``path`` as a site whose weight is its parameter (for merging)."""
    gates = module._modules.get("lora_scaling") or {}
    gate = next((g for g in gates.values() if isinstance(g, ParamGate)), None)
    if gate is None:
        return None
    owner = owner_path(path)
    return Site(node=None, kind="parameter", path=path, input=None, weight=f"{owner}.{gate.parameter}", bias=None)


def fold(gm, site: Site, module: nn.Module, adapter: str, weight, bias, sign):
    gate = module.lora_scaling[adapter]
    delta = param_delta(module.lora_A[adapter].weight, module.lora_B[adapter].weight, gate.experts, gate.swapped)
    return weight + sign * (delta * gate.scale).to(weight.dtype), bias


def with_parameters(method: Method) -> Method:
    """``method`` (LoRA) with ``target_parameters``: an empty ``target_modules`` then adapts no layer."""

    def attach(gm, sites, config, adapter):
        attention = attention_targets(gm, config)
        layers = config
        if attention:  # the layers inside them are no sites of their own here
            layers = dataclasses.replace(config, exclude_modules=_excluding(config.exclude_modules, attention))
        paths = []
        if any(is_targeted(layers, path) for path, _ in registry_of(gm).base_modules(gm, keep=(NESTED,)) if path) or not (
                attention or config.target_parameters):
            paths = method.attach(gm, sites, layers, adapter)
        paths += add_attention_lora(gm, config, adapter, attention)
        if config.target_parameters:
            paths += add_parameter_lora(gm, config, adapter)
        return paths

    def resolve(gm, sites, config):
        model_type = getattr(getattr(gm._fxpeft_source, "config", None), "model_type", None)
        if config.target_parameters and config.target_modules is None and model_type not in DEFAULT_LORA_TARGETS:
            config = dataclasses.replace(config, target_modules=[])  # PEFT: the model type's defaults, if it has any
        return method.resolve_config(gm, sites, config)

    def both_fold(gm, site, module, adapter, weight, bias, sign):
        return (fold if site.kind == "parameter" else method.fold)(gm, site, module, adapter, weight, bias, sign)

    def adapters_at(module):  # the method's own (its rule's) and those on parameters
        gates = module._modules.get("lora_scaling") or {}
        return list(dict.fromkeys([*method.adapters_at(module), *(a for a, g in gates.items()
                                                                   if isinstance(g, ParamGate))]))

    def gate(module, adapter):
        gates = module._modules.get("lora_scaling") or {}
        own = gates[adapter] if adapter in gates else None
        return own if isinstance(own, ParamGate) else method.gate(module, adapter)

    return dataclasses.replace(method, attach=attach, resolve_config=resolve, fold=both_fold, state_site=state_site,
                               adapters_at=adapters_at, gate=gate, containers=(*method.containers, NESTED))


def _excluding(exclude, paths: list[str]):
    """``exclude_modules`` plus exactly ``paths``, in the form it has (list or regex)."""
    if isinstance(exclude, str):
        return f"(?:{exclude})|(?:{'|'.join(re.escape(p) for p in paths)})"
    return [*(exclude or []), *paths]
