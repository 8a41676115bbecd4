"""The adapter lifecycle on a transformed module: transform, add / load / save / delete,
activate, disable, per-sample selection, parameter counts.

Every edit of an existing module runs in :func:`_transaction`: on error its adapters,
trainability and graphs are restored as they were.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn

from . import checkpoint as _checkpoint
from . import progress
from .canonical import find_sites
from .configs import PeftConfigBase
from .merging import unmerge_adapter
from .module import PeftGraphModule, _device_of, build
from .registry import DEFAULT, Registry, registry_of
from .state import BASE_ADAPTER, adapter_indices, check_known, merged_adapters, method_of

__all__ = ["adapter_indices"]  # re-exported: the public API imports it from here


def check_adapter_name(name) -> None:
    """An adapter name becomes a key of the ModuleDicts beside each adapted module (so part of
    parameter paths) and a checkpoint subfolder name: reject what breaks either."""
    fix = "Choose a plain name such as 'default' or 'task_a'."
    if not isinstance(name, str) or not name:
        raise ValueError(f"adapter_name must be a non-empty string, got {name!r}. {fix}")
    if name == BASE_ADAPTER:
        raise ValueError(f"adapter_name {name!r} is reserved: it selects no adapter in mixed batches "
                         f"(adapter_names=[...]). {fix}")
    if name in (".", "..") or "/" in name or "\\" in name or os.sep in name or os.path.isabs(name):
        raise ValueError(f"adapter_name {name!r} is a path or contains a path separator; non-default adapters are "
                         f"saved in a subfolder named after the adapter. {fix}")
    if "." in name:
        raise ValueError(f"adapter_name {name!r} contains '.', which separates the parts of a parameter's path "
                         f"(torch's ModuleDict rejects it). {fix}")
    if any(hasattr(container, name) for container in (nn.ModuleDict(), nn.ParameterDict())):
        raise ValueError(f"adapter_name {name!r} is an attribute of torch's ModuleDict/ParameterDict, which hold "
                         f"adapters by name, so it cannot be a key there. {fix}")


@contextlib.contextmanager
def _restore_on_error(*modules: nn.Module):
    """Undo what a failed transform changed on caller-visible tensors (their requires_grad)."""
    flags = {id(p): (p, p.requires_grad) for m in modules for p in m.parameters()}
    modes = {id(m): (m, m.training) for root in modules for m in root.modules()}
    try:
        yield
    except BaseException:
        for param, flag in flags.values():
            param.requires_grad_(flag)
        for module, mode in modes.values():
            module.training = mode
        raise


@contextlib.contextmanager
def _weights_kept_on_error(module: nn.Module, configs, registry: Registry):
    """Methods that rewrite base weights while attaching (``Method.changes_base``): on error the
    module's parameters get their values back (a copy of each, held only while the edit runs, and
    only for such configs), so a failed edit never leaves the caller's model changed."""
    changing = any((m := registry.method_for(c)).changes_base is not None and m.changes_base(c) for c in configs)
    saved = [(p, p.detach().clone()) for p in module.parameters()] if changing else []
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for param, value in saved:
                param.copy_(value)
        raise


def _set_bias_trainable(gm: PeftGraphModule, config, adapted_paths: Sequence[str]) -> None:
    """PEFT's ``bias``: "all" trains every bias, "<method>_only" ("lora_only" …) those of adapted layers."""
    bias_mode = getattr(config, "bias", "none")
    if bias_mode == "all":
        saved = [path + "." for path, m in gm.named_modules() if path and "modules_to_save" in m._modules]
        for name, param in gm.named_parameters():
            frozen_original = any(name.startswith(p) and ".modules_to_save." not in name for p in saved)
            if name.rsplit(".", 1)[-1] == "bias" and not frozen_original:
                param.requires_grad_(True)
    elif bias_mode.endswith("_only"):
        for path in adapted_paths:
            bias = getattr(gm.get_submodule(path), "bias", None)
            if isinstance(bias, nn.Parameter):
                bias.requires_grad_(True)


def _attach(gm: PeftGraphModule, config, adapter_name: str) -> None:
    check_adapter_name(adapter_name)
    if adapter_name in gm.peft_config:
        raise ValueError(
            f"An adapter named {adapter_name!r} already exists (adapters: {sorted(gm.peft_config)}); "
            "choose another adapter_name or delete it first."
        )
    registry = registry_of(gm)
    method = registry.method_for(config)
    alone = [name for name in gm.peft_config if method_of(gm, name).exclusive and method_of(gm, name) is not method]
    if alone:
        raise ValueError(
            f"Cannot add adapter {adapter_name!r}: {method_of(gm, alone[0]).name} adapter {alone[0]!r} changes the "
            "sequence the model sees, so it must be the model's only adapter type (as in PEFT; adapters of its own "
            "type may be added and switched between). Transform a fresh model instead."
        )
    if method.whole_graph and gm._fxpeft_block_paths:
        raise ValueError(
            f"{type(config).__name__} rewrites the whole model as one graph, and this module was built with one graph "
            "per block: pass the config to fxpeft.transform (or fxpeft.from_pretrained) on the original model instead.")
    if not method.is_adapter:
        raise ValueError(
            f"{type(config).__name__} is not an adapter: it changes the base model, so it is applied by "
            f"fxpeft.transform(model, [{type(config).__name__}(...), LoraConfig(...)]), not to a transformed module."
        )
    kinds = {type(existing).peft_type for existing in gm.peft_config.values()}
    mixable = sorted({m.config_type.peft_type for m in registry.methods if m.mixable})
    if gm.__dict__.get("_fxpeft_mixed") and not method.mixable:
        raise ValueError(f"Adapter of type {config.peft_type} is not supported for mixed models: fxpeft's, as PEFT's, "
                         f"take {', '.join(mixable)} adapters"
                         + (f" ({method.name}, which this config asks for, is not mixed)" if config.peft_type in mixable
                            else "") + ".")
    if kinds and config.peft_type not in kinds and not gm.__dict__.get("_fxpeft_mixed"):
        raise ValueError(f"Cannot combine adapters with different peft types ({sorted(kinds)[0]} and "
                         f"{config.peft_type}), as in PEFT: transform another copy of the model for {adapter_name!r}, "
                         f"or make a mixed model (fxpeft.transform(..., mixed=True), PEFT's mixed=True) to combine "
                         f"{', '.join(mixable)} adapters.")
    sites = find_sites(gm._fxpeft_signatures[gm._fxpeft_primary].canonical, gm, registry)
    if method.resolve_config is not None:  # stored and saved as PEFT does: "all-linear" / None resolved
        config = method.resolve_config(gm, sites, config)
    existing = [m for _, m in registry.modules_but_adapters(gm, gm.peft_config)]
    before, known = {id(p) for m in existing for p in m._parameters.values()}, {id(m) for m in existing}
    adapted = method.attach(gm, sites, config, adapter_name)
    if gm.__dict__.get("_fxpeft_mixed") and method.mixable != "wraps":
        _check_nesting(gm, adapted, method, adapter_name)
    for hook in registry.attach_hooks:  # what every config may ask for besides its method (modules_to_save)
        hook(gm, config, adapter_name)
    trainable = not getattr(config, "inference_mode", False)
    # derived state (AdaLoRA's ranknum) and what a method keeps frozen (Cartridge's first tokens) never train
    constant = {*method.unsaved_containers, *method.untrained}
    frozen = {id(param) for param in method.frozen(gm, adapter_name)} if method.frozen is not None else set()
    for path, module in registry.modules_but_adapters(gm, gm.peft_config):  # the new adapter's state included
        if id(module) not in known:  # its dropouts follow the module's mode (an eval module stays deterministic)
            module.training = gm.training
        for name, param in module._parameters.items():
            if param is not None and id(param) not in before:
                parts = f"{path}.{name}".split(".")
                if adapter_name in parts:  # an adapter named like a frozen container ("embedding") still trains
                    parts.remove(adapter_name)
                param.requires_grad_(trainable and constant.isdisjoint(parts) and id(param) not in frozen)
    if trainable:
        _set_bias_trainable(gm, config, adapted)
    gm.peft_config[adapter_name] = config
    if len(gm.peft_config) == 1:  # the first adapter is active; later ones wait for set_adapter (PEFT)
        gm._fxpeft_active[:] = [adapter_name]


def _check_nesting(gm: PeftGraphModule, adapted: Sequence[str], method, adapter_name: str) -> None:
    """In a mixed model PEFT nests each new adapter's layer around the layer it targets, so an adapter that
    changes a layer's input or weight ("wraps": OFT) acts on the adapters added before it and not on later
    ones; fxpeft's graphs give every added change the changed input. The later order is refused."""
    for path in adapted:
        module = gm.get_submodule(path)
        for name in gm.peft_config:
            other = method_of(gm, name)
            if other is not method and other.mixable == "wraps" and name in (other.adapters_at(module) or []):
                raise NotImplementedError(
                    f"{path} holds {other.name} adapter {name!r}, which changes the layer's input or weight; in a mixed "
                    f"model {method.name} adapter {adapter_name!r}, added after it, would act on the layer's original "
                    f"input (PEFT nests each new adapter around the layer), which fxpeft does not do yet: add the "
                    f"{other.name} adapter after the others.")


@progress.task("fxpeft.transform")
def transform(
    model: nn.Module,
    config: Union[PeftConfigBase, Iterable[PeftConfigBase]],
    *,
    example_inputs=None,
    adapter_name: str = "default",
    registry: Optional[Registry] = None,
    mixed: bool = False,
) -> PeftGraphModule:
    """Capture ``model`` into an FX graph, apply the passes for ``config`` (one or a list, in
    order) and return a GraphModule called exactly like ``model``. ``registry`` holds the methods
    (default: fxpeft's own, fxpeft/registry.py); the result keeps it for later edits. ``mixed``
    (PEFT's ``get_peft_model(..., mixed=True)``): adapters of different types may be added and act
    together (LoRA, LoHa, LoKr, AdaLoRA, OFT, SHiRA: the methods marked ``Method.mixable``).

    The base parameters are shared with ``model`` (no copy) and frozen, as PEFT does; on any
    error ``model`` is left exactly as it was.
    """
    configs = [config] if isinstance(config, PeftConfigBase) or not isinstance(config, (list, tuple)) else list(config)
    check_adapter_name(adapter_name)  # before the capture's work
    registry = registry or DEFAULT
    for item in configs:
        registry.method_for(item)  # unknown config types fail before any work
    with _restore_on_error(model), _weights_kept_on_error(model, configs, registry):
        gm = build(model, example_inputs, configs, registry)
        gm.__dict__["_fxpeft_mixed"] = bool(mixed)
        for param in gm.parameters():
            param.requires_grad_(False)
        for item in configs:
            if registry.method_for(item).is_adapter:  # the others (quantization) ran as tree passes in build
                progress.step(f"attaching {registry.method_for(item).name}")
                _attach(gm, item, adapter_name)
        gm.relower()
        gm.train(model.training)
    return gm


@contextlib.contextmanager
def transaction(gm: PeftGraphModule):
    """All-or-nothing edits of a transformed module: on error its adapters (children, parameters
    and buffers of every module, ParameterDict entries included), trainability and graphs are
    restored as they were."""
    # the adapters' own state is left out: an edit adds or removes adapters, it never changes another's
    # (so the snapshot does not grow with the adapters loaded). One exception is not restored: bias="all"
    # makes every bias trainable, as PEFT does, other adapters' LoRA biases (lora_bias) included
    modules = [m for _, m in registry_of(gm).modules_but_adapters(gm, gm.peft_config)]
    saved = {id(m): (m, dict(m._modules), dict(m._parameters), dict(m._buffers)) for m in modules}
    flags = {id(p): (p, p.requires_grad) for m in modules for p in m._parameters.values() if p is not None}
    configs, active = dict(gm.peft_config), list(gm._fxpeft_active)
    try:
        yield
    except BaseException:
        for module, children, params, buffers in saved.values():
            for store, content in ((module._modules, children), (module._parameters, params),
                                   (module._buffers, buffers)):
                store.clear()
                store.update(content)
        for param, flag in flags.values():
            param.requires_grad_(flag)
        gm.peft_config.clear()
        gm.peft_config.update(configs)
        gm._fxpeft_active[:] = active
        gm.relower()
        raise


def _require_transformed(gm) -> PeftGraphModule:
    if not isinstance(gm, PeftGraphModule):
        raise TypeError(f"Expected the module returned by fxpeft.transform, got {type(gm).__name__}.")
    return gm


def add_adapter(gm: PeftGraphModule, config: PeftConfigBase, adapter_name: str) -> None:
    """Add another adapter to a transformed module; the others keep their weights and trainability."""
    _require_transformed(gm)
    if isinstance(config, str) and not isinstance(adapter_name, str):
        raise TypeError(f"fxpeft.add_adapter takes (gm, config, adapter_name); got a {type(config).__name__} as "
                        "the config. (The method gm.add_adapter takes PEFT's order: adapter_name, then config.)")
    with transaction(gm), _weights_kept_on_error(gm, [config], registry_of(gm)):
        _attach(gm, config, adapter_name)
        gm.relower()


def trainable_parameters(gm: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, as PEFT's get_nb_trainable_parameters (a quantized
    layer's weight counts as its logical out x in parameters, stored packed as a buffer)."""
    trainable = total = 0
    for _, param in gm.named_parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    for module in gm.modules():
        spec = getattr(module, "weight_spec", None)
        total += spec.shape.numel() if spec is not None else 0
    return trainable, total


def print_trainable_parameters(gm: nn.Module) -> None:
    trainable, total = trainable_parameters(gm)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")


@progress.task("fxpeft.save_pretrained")
def save_pretrained(gm: PeftGraphModule, directory: str, adapter_names=None, safe_serialization: bool = True,
                    state_dict=None, path_initial_model_for_weight_conversion: Optional[str] = None,
                    save_embedding_layers: Union[str, bool] = "auto") -> None:
    """Write PEFT's checkpoint layout: "default" at ``directory``, other adapters in subfolders.
    A ``state_dict`` (the module's keys) supplies the adapter values instead of the module.
    ``path_initial_model_for_weight_conversion``: the folder the adapter was saved to right after it
    was created, before training; the adapter is then written as its method converts it against
    that initial state (LoRA with PiSSA, OLoRA …: a plain LoRA adapter of twice the rank for the
    original base weights, as PEFT writes it; methods without a conversion raise).
    ``save_embedding_layers`` (PEFT's): also write the base weights of targeted embedding layers;
    "auto": when ``target_modules`` names ``embed_tokens`` or ``lm_head``."""
    _require_transformed(gm)
    names = list(gm.peft_config) if adapter_names is None else list(adapter_names)
    check_known(gm, names)
    if path_initial_model_for_weight_conversion is not None:  # every adapter before writing any
        for name in names:
            _checkpoint.check_initial_conversion(gm, name)
    for name in names:
        _checkpoint.save_adapter(gm, _checkpoint.adapter_dir(directory, name), name, safe_serialization,
                                 state_dict=state_dict, initial_directory=path_initial_model_for_weight_conversion,
                                 save_embedding_layers=save_embedding_layers)


@progress.task("fxpeft.from_pretrained")
def from_pretrained(model: nn.Module, directory: str, adapter_name: str = "default", is_trainable: bool = False,
                    example_inputs=None, quantization_config=None, registry: Optional[Registry] = None,
                    mixed: bool = False) -> PeftGraphModule:
    """Transform ``model`` with the adapter stored in ``directory`` (written by PEFT or fxpeft),
    quantizing the base first when a ``quantization_config`` (BnbConfig) is given (QLoRA); ``mixed``:
    a mixed model (PEFT's ``PeftMixedModel.from_pretrained``), see :func:`transform`."""
    check_adapter_name(adapter_name)  # before reading files
    progress.step("reading checkpoint")
    config = _checkpoint.load_config(directory, registry or DEFAULT)
    weights = _checkpoint.load_weights(directory, _device_of(model))
    config.inference_mode = not is_trainable
    configs = [config] if quantization_config is None else [quantization_config, config]
    with _restore_on_error(model), _weights_kept_on_error(model, configs, registry or DEFAULT):
        gm = transform(model, configs, example_inputs=example_inputs, adapter_name=adapter_name, registry=registry,
                       mixed=mixed)
        progress.step("copying adapter weights")
        _checkpoint.check_and_copy(gm, adapter_name, weights)
    return gm


@progress.task("fxpeft.load_adapter")
def load_adapter(gm: PeftGraphModule, directory: str, adapter_name: str, is_trainable: bool = False) -> None:
    """Add the adapter stored in ``directory`` to a transformed module under ``adapter_name``."""
    _require_transformed(gm)
    check_adapter_name(adapter_name)  # before reading files
    progress.step("reading checkpoint")
    config = _checkpoint.load_config(directory, registry_of(gm))
    weights = _checkpoint.load_weights(directory, _device_of(gm))
    config.inference_mode = not is_trainable
    with transaction(gm), _weights_kept_on_error(gm, [config], registry_of(gm)):
        _attach(gm, config, adapter_name)
        _checkpoint.check_and_copy(gm, adapter_name, weights)
        gm.relower()


# --------------------------------------------------------------------------- which adapters act


def active_adapters(gm: PeftGraphModule) -> list[str]:
    return list(_require_transformed(gm)._fxpeft_active)


def set_adapter(gm: PeftGraphModule, adapter_name: Union[str, Sequence[str]]) -> None:
    """Make these adapters the active ones (several add up, as in PEFT). Only a buffer the graph
    reads changes: no recompile, and no parameter's ``requires_grad`` changes. Merged adapters are
    unmerged first, with PEFT's warning: their deltas would otherwise stay in the base weights."""
    _require_transformed(gm)
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    check_known(gm, names)
    single = [name for name in names if method_of(gm, name).one_active]
    if len(names) > 1 and single:
        raise ValueError(f"{method_of(gm, single[0]).name} adapters act one at a time (as in PEFT), but set_adapter "
                         f"was given {names}: pass one adapter name.")
    if merged_adapters(gm):
        warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.")
        unmerge_adapter(gm)
    gm._fxpeft_active[:] = names
    _sync_activity(gm)


@contextlib.contextmanager
def disable_adapters(gm: PeftGraphModule):
    """Run the base model inside the block; the previous active adapters come back on exit,
    whatever happens inside. Merged adapters are unmerged on entry (their deltas sit in the base
    weights) and stay unmerged after the block, as in PEFT (which unmerges at the layers' next
    forward inside the block and never merges again)."""
    _require_transformed(gm)
    if merged_adapters(gm):
        unmerge_adapter(gm)
    previous = list(gm._fxpeft_active)
    gm._fxpeft_active[:] = []
    _sync_activity(gm)
    try:
        yield gm
    finally:
        gm._fxpeft_active[:] = previous
        _sync_activity(gm)


def _sync_activity(gm: PeftGraphModule) -> None:
    """Which adapters act is buffer data, except for methods where it changes the graph (an
    inactive prompt shortens the sequence, which only another graph can express)."""
    if any(method_of(gm, name).activity_in_graph for name in gm.peft_config):
        gm.relower()
    else:
        gm.sync_gates()


def delete_adapter(gm: PeftGraphModule, adapter_name: str) -> None:
    """Remove an adapter's parameters and nodes. If it was active, the other active adapters stay
    active; if none is left, the first remaining adapter becomes active (PEFT's choice), and with
    no adapter left the module computes the base model."""
    _require_transformed(gm)
    check_known(gm, [adapter_name])
    if adapter_name in merged_adapters(gm):  # its delta would stay in the shared base weights for good
        raise ValueError(f"Cannot delete adapter(s) {[adapter_name]} while they are merged. Please unmerge them "
                         "first (fxpeft.unmerge_adapter(gm)), as in PEFT.")
    method = method_of(gm, adapter_name)
    with transaction(gm):
        for module in gm.modules():
            for container in (*method.containers, *registry_of(gm).hook_containers):
                holder = module._modules.get(container)
                if holder is not None and adapter_name in holder:
                    del holder[adapter_name]
                    if not len(holder):
                        del module._modules[container]
        for name in method.shared:  # a shared container may group its tensors by a key (FRoD: by category)
            group = gm._modules.get(name)
            if not isinstance(group, nn.ModuleDict):
                continue
            for key, holder in list(group._modules.items()):
                if key in gm.peft_config:  # an adapter's own entry (SHADOW's backbone), not a group of entries
                    continue
                if adapter_name in holder:
                    del holder[adapter_name]
                if not len(holder):
                    del group._modules[key]
            if not len(group._modules):
                del gm._modules[name]
        del gm.peft_config[adapter_name]
        remaining = [n for n in gm._fxpeft_active if n != adapter_name]
        if not remaining and gm.peft_config:
            remaining = [next(iter(gm.peft_config))]
        gm._fxpeft_active[:] = remaining
        gm.relower()
