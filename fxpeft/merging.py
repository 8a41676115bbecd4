"""Folding adapters into base weights, and the merged / unloaded base graph.

Merging adds each adapter's ``delta_weight`` to the base weight and switches the adapter's
gate off (its nodes stay in the graph but contribute 0: nothing recompiles). Unmerging
subtracts it again. An adapter held as a copy of a module that is no site (``Method.exchange``)
merges by exchanging values with the module's tensors, and unmerges by exchanging them back.
``merge_and_unload`` / ``unload`` build a new module over the same
canonical graphs with no adapter state, so its graph is the base graph and its state_dict has
exactly the base model's keys.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import torch
from torch import nn

from . import progress
from .canonical import is_quantized
from .generation import check_decodable, decoding_files
from .module import PeftGraphModule, build, clone_tree, own_block_extras
from .registry import registry_of
from .state import adapter_modules, check_known, merged_adapters, method_of, remember_merged, site_of, sites_by_path

ADAPTER_CHILDREN = ("modules_to_save",)


def _check_names(gm, names) -> list[str]:
    """The named adapters (default: the active ones), all known."""
    names = list(gm._fxpeft_active if names is None else ([names] if isinstance(names, str) else names))
    check_known(gm, names)
    return names


def _check_mergeable(gm, names) -> None:
    unmergeable = [n for n in names if method_of(gm, n).fold is None and method_of(gm, n).exchange is None]
    if unmergeable:
        raise ValueError(f"Adapter(s) {unmergeable} ({method_of(gm, unmergeable[0]).name}) change the model in a way "
                         "that is no change of its weights (virtual tokens, key/value prefixes, a network beside "
                         "it), so there is nothing to merge. Use fxpeft.unload for the base model.")


def _base_weight(gm, site, module) -> torch.Tensor:
    """The site's float weight: the parameter, or a quantized layer's dequantized weight."""
    return module.dequantize() if is_quantized(module) else gm.get_parameter(site.weight)


def _store_weight(gm, site, module, weight: torch.Tensor):
    """Write ``weight`` back in place (a quantized layer quantizes it again: rounding, as PEFT) and
    return what :func:`_restore_weight` needs to put the previous weight back exactly."""
    if is_quantized(module):  # requantize_ writes some packed tensors in place and replaces others
        saved = {name: (t, None if t is None else t.detach().clone())
                 for name, t in (*module._parameters.items(), *module._buffers.items())}
        module.requantize_(weight)
        return saved
    param = gm.get_parameter(site.weight)
    previous = param.detach().clone()
    param.copy_(weight)
    return previous


def _restore_weight(gm, site, module, saved) -> None:
    if not is_quantized(module):
        gm.get_parameter(site.weight).copy_(saved)
        return
    for name, (tensor, value) in saved.items():
        (module._parameters if name in module._parameters else module._buffers)[name] = tensor
        if tensor is not None:
            tensor.copy_(value)


def _bias(gm, site) -> Optional[torch.Tensor]:
    return None if site.bias is None else gm.get_submodule(site.bias.rpartition(".")[0])._parameters.get(
        site.bias.rpartition(".")[2])


def _weight_key(gm, site, module):
    """What a site's fold writes to: sites sharing one parameter (an embedding tied to the output
    head) fold into one tensor, each adapter's change on top of the others', as in PEFT."""
    return site.path if is_quantized(module) else id(gm.get_parameter(site.weight))


def _folded(gm, names, sign: int, safe_merge: bool = False):
    """{weight: (site, module, new weight, new bias or None if unchanged)} and the gates
    involved, for folding (sign 1) or unfolding (-1) the named adapters not yet (still) merged;
    nothing is written. A site's adapters fold in adapter order and unfold in reverse (weight maps
    need not commute)."""
    sites = sites_by_path(gm)
    states, exchanges = [], []
    for path, module, method, name in adapter_modules(gm, names):
        if method.exchange is None:
            states.append((site_of(gm, sites, path, module, method), module, method, name))
        elif method.gate(module, name).merged != (sign > 0):
            exchanges.append((path, module, method, name))
    results: dict[str, list] = {}
    gates = []
    for site, module, method, name in states if sign > 0 else reversed(states):
        gate = method.gate(module, name)
        if gate.merged == (sign > 0):
            continue
        key = _weight_key(gm, site, module)
        if key not in results:
            bias = _bias(gm, site)
            results[key] = [site, module, _base_weight(gm, site, module).detach().clone(), bias, bias]
        entry = results[key]
        entry[2], entry[3] = method.fold(gm, site, module, name, entry[2], entry[3], sign)
        if safe_merge and not (torch.isfinite(entry[2]).all() and (entry[3] is None or torch.isfinite(entry[3]).all())):
            raise ValueError(f"NaNs or infs found while merging adapter {name!r} into {site.path}; the adapter seems "
                             "broken. No weight was changed.")
        gates.append(gate)
    return {path: (site, module, weight, None if bias is original else bias)
            for path, (site, module, weight, bias, original) in results.items()}, gates, exchanges


def _exchange(module, method, name: str, sign: int) -> None:
    """Exchange the values of the module's tensors with the adapter's copy (Method.exchange): its
    own inverse, so folding and unfolding are the same writes."""
    gate = method.gate(module, name)
    for tensor_name, copy in method.exchange(module, name).items():
        own = getattr(module, tensor_name)
        previous = own.detach().clone()
        own.copy_(copy)
        copy.copy_(previous)
    gate.merged = sign > 0
    gate.refresh()


def _fold(gm, names, sign: int, safe_merge: bool = False) -> tuple:
    """Fold (sign 1) or unfold (-1) the named adapters into the site weights (and biases, where a
    method changes them), with :meth:`Method.fold`.

    All or nothing: on error every weight and gate is as before. Returns the record
    :func:`_unfold` takes to undo the fold exactly (the previous weights: as much memory as the
    new weights this fold computed anyway)."""
    with torch.no_grad():
        results, gates, exchanges = _folded(gm, names, sign, safe_merge)
        quantized = [path for path, (_, module, _, _) in results.items() if is_quantized(module)]
        if quantized:
            warnings.warn(f"Merging into {len(quantized)} quantized layers rounds the merged weights to their "
                          "quantized format; outputs change slightly (merge_and_unload() returns float weights).")
        record = ([(gate, gate.merged) for gate in gates], [], [])
        try:
            for path, module, method, name in exchanges:
                merged = method.gate(module, name).merged
                _exchange(module, method, name, sign)  # raises before it writes anything
                record[2].append((module, method, name, merged))
            for path in list(results):
                site, module, weight, bias = results.pop(path)  # popped once stored: the new weight's memory is freed
                previous_bias = None
                if bias is not None:
                    previous_bias = _bias(gm, site).detach().clone()
                    _bias(gm, site).copy_(bias)
                record[1].append((site, module, _store_weight(gm, site, module, weight), previous_bias))
            for gate in gates:
                gate.merged = sign > 0
                gate.refresh()
        except BaseException:
            _unfold(gm, record)  # refreshes the merged list too
            raise
        remember_merged(gm)
    return record


def _unfold(gm, record: tuple) -> None:
    """Undo a :func:`_fold` exactly: the previous weights and gates back."""
    gates, stored, exchanged = record
    with torch.no_grad():
        for module, method, name, merged in reversed(exchanged):
            _exchange(module, method, name, 1 if merged else -1)
        for site, module, saved, bias in reversed(stored):  # last stored first: tied weights end at the oldest value
            _restore_weight(gm, site, module, saved)
            if bias is not None:
                _bias(gm, site).copy_(bias)
        for gate, merged in gates:
            gate.merged = merged
            gate.refresh()
    remember_merged(gm)


def merge_adapter(gm: PeftGraphModule, adapter_names=None, safe_merge: bool = False) -> None:
    names = _check_names(gm, adapter_names)
    _check_mergeable(gm, names)
    _fold(gm, names, 1, safe_merge)


def unmerge_adapter(gm: PeftGraphModule) -> None:
    _fold(gm, list(gm.peft_config), -1)


def _base_module(gm: PeftGraphModule, merged_weights: dict[str, torch.Tensor], use_saved_copies: bool,
                 dequantize: bool = False) -> PeftGraphModule:
    """A new module over ``gm``'s canonical graphs with every adapter removed. With
    ``dequantize``, quantized layers become the float layers they replaced (merged weights where
    given) and the new tree is captured again (its graph has no quantized nodes)."""
    tree = clone_tree(gm._fxpeft_source)  # the model's own class over gm's modules, re-created
    containers = {c for name in gm.peft_config for c in method_of(gm, name).containers}
    active = set(gm._fxpeft_active)
    merged_weights = dict(merged_weights)
    replaced = 0
    for path, module in list(tree.named_modules()):
        saved = module._modules.get("modules_to_save")
        if saved is not None and use_saved_copies:
            chosen = next((n for n in saved.keys() if n in active), None)
            if chosen is not None:
                for name, tensor in saved[chosen].named_parameters(recurse=False):
                    module._parameters[name] = tensor
        for child in list(module._modules):
            if child in containers or child in ADAPTER_CHILDREN:
                del module._modules[child]
            elif dequantize and is_quantized(module._modules[child]):
                child_path = f"{path}.{child}" if path else child
                float_layer = module._modules[child].float_module(merged_weights.pop(f"{child_path}.weight", None))
                module._modules[child] = float_layer
                replaced += 1
    for fqn, tensor in merged_weights.items():
        owner_path, _, name = fqn.rpartition(".")
        tree.get_submodule(owner_path)._parameters[name] = nn.Parameter(tensor, requires_grad=False)
    if replaced:  # the canonical graphs read quantized nodes: capture the float tree
        result = build(tree, gm._fxpeft_signatures[gm._fxpeft_primary].example, registry=registry_of(gm))
    else:
        signatures = {key: sig.fresh(own_block_extras(gm)) for key, sig in gm._fxpeft_signatures.items()}
        result = PeftGraphModule(tree, signatures, gm._fxpeft_primary, tree, gm._fxpeft_arg_names,
                                 gm._fxpeft_block_paths, registry_of(gm))
    result.train(gm.training)
    return result


def merged_weights(gm, adapter_names=None) -> dict[str, torch.Tensor]:
    """New tensors for every site weight (and bias) the (active) adapters change, folded into W
    (of a quantized layer: its dequantized weight), keyed by the tensor's name; ``gm`` unchanged."""
    names = _check_names(gm, adapter_names)
    _check_mergeable(gm, names)
    totals: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        results, _, exchanges = _folded(gm, names, 1)
        for site, _, weight, bias in results.values():
            totals[site.weight] = weight
            if bias is not None:
                totals[site.bias] = bias
        for path, module, method, name in exchanges:  # the module computes with the copy's values
            for tensor_name, copy in method.exchange(module, name).items():
                totals[f"{path}.{tensor_name}" if path else tensor_name] = copy.detach().clone()
    return totals


@progress.task("fxpeft.merge_and_unload")
def merge_and_unload(gm: PeftGraphModule, adapter_names=None, safe_merge: bool = False,
                     requantize: bool = False) -> PeftGraphModule:
    """Fold the active adapters into the base weights (in place, as PEFT does) and return the
    base graph over them: no adapter nodes, exactly the base model's state_dict keys.

    A quantized model gives float weights under the base keys (dequantized + merged deltas,
    ``gm`` unchanged); ``requantize=True`` instead merges into the quantized layers in place
    (rounding, as PEFT does) and keeps them quantized."""
    progress.step("folding adapters into weights")
    if not requantize and any(is_quantized(m) for m in gm.modules()):
        weights = merged_weights(gm, adapter_names)
        broken = [fqn for fqn, w in weights.items() if not torch.isfinite(w).all()]
        if safe_merge and broken:
            raise ValueError(f"NaNs or infs found while merging into {broken[:3]}; the adapter seems broken.")
        return _base_module(gm, weights, use_saved_copies=True, dequantize=True)
    names = _check_names(gm, adapter_names)
    _check_mergeable(gm, names)
    record = _fold(gm, names, 1, safe_merge)
    try:
        return _base_module(gm, {}, use_saved_copies=True)
    except BaseException:  # gm stays usable: its weights and gates as before the call
        _unfold(gm, record)
        raise


def unload(gm: PeftGraphModule) -> PeftGraphModule:
    """The base model's graph and weights, adapters dropped without merging."""
    if merged_adapters(gm):
        unmerge_adapter(gm)
    return _base_module(gm, {}, use_saved_copies=False)


@progress.task("fxpeft.export_merged")
def export_merged(gm: PeftGraphModule, directory: str, example_inputs=None, generation: bool = False) -> dict[str, str]:
    """Write ``model.safetensors`` (base keys, loadable strict into the original class) and
    ``model.pt2`` (torch.export of the merged graph, every input dim dynamic where the model
    allows) without changing ``gm``. The program returns a transformers ``ModelOutput`` as a
    plain dict of its fields (``{"logits": ...}``): those classes cannot be serialised. The
    program takes exactly the keyword inputs it was exported with (for transformers models by
    default ``input_ids`` and ``attention_mask``; pass ``example_inputs`` to choose). With
    ``generation`` (causal LMs), also ``generate.pt2``, the merged model with a static KV cache written in
    place, and ``generate.py``, a greedy decoding loop over it that needs only torch; for seq2seq LMs
    ``encode.pt2``, ``generate_first.pt2`` and ``generate.pt2`` (the encoder, the first decoder step and
    the later ones) with their ``generate.py`` (``generation.decoding_files``)."""
    from safetensors.torch import save_file

    from . import capture as capture_mod
    from .checkpoint import _unshared, atomic_write

    if generation:
        check_decodable(gm)
    progress.step("merging")
    merged = _base_module(gm, merged_weights(gm), use_saved_copies=True, dequantize=True).eval()
    if example_inputs is None:
        primary = gm._fxpeft_signatures[gm._fxpeft_primary]
        if primary.example is None:
            raise ValueError("This module was captured by symbolic_trace: pass example_inputs to export_merged.")
        example_inputs = primary.example
    kwargs = capture_mod.normalize_inputs(gm._fxpeft_source, example_inputs)
    kwargs = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}  # the dispatcher adds the rest
    # ModelOutput classes cannot be serialised into a .pt2: deploy their fields as a dict
    progress.step("exporting the merged graph")
    program = capture_mod.export_program(merged, kwargs, lambda out: dict(out) if isinstance(out, dict) else out)
    files = {}
    if generation:
        progress.step("exporting the decoding program")
        files = decoding_files(merged._fxpeft_source)
    tensors = _unshared(merged.state_dict())
    atomic_write(directory, {
        "model.safetensors": lambda path: save_file(tensors, path, metadata={"format": "pt"}),
        "model.pt2": lambda path: torch.export.save(program, path),
        **files,
    })
    written = {"weights": os.path.join(directory, "model.safetensors"), "program": os.path.join(directory, "model.pt2")}
    if generation:
        written.update(decoding=os.path.join(directory, "generate.pt2"), loop=os.path.join(directory, "generate.py"))
        if "encode.pt2" in files:
            written.update(encoder=os.path.join(directory, "encode.pt2"),
                           first_step=os.path.join(directory, "generate_first.pt2"))
    return written
