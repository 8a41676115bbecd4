"""modules_to_save: a trainable copy of whole modules (classifier heads, embeddings).

State: ``<path>.modules_to_save.<adapter>`` is a deep copy of the module at ``<path>``; the
original keeps its keys and stays frozen. Rewrite (phase 10): every ``get_attr`` of a tensor
under ``<path>`` reads the copy of the active adapter instead. In the mixed graph (one adapter
per sample) the module's nodes are instead repeated once per copy, and each sample keeps the
outputs of its adapter's copy. Any config with a ``modules_to_save`` field gets this
(an attach hook: the driver calls it after the method's own attach); SEQ_CLS tasks add PEFT's head names
("classifier", "score"; whichever exists).
"""
from __future__ import annotations

import copy
from typing import Callable, Optional

import torch
from torch import nn

from fxpeft.canonical import submodule
from fxpeft.configs import SEQ_CLS_HEAD_NAMES
from fxpeft.registry import DEFAULT, Rule, registry_of
from fxpeft.rewrite import Lowering, samples_of
from fxpeft.targets import requested_names, saved_module_paths


def attach(gm, config, adapter: str) -> list[str]:
    names = requested_names(config)
    if not names:
        return []
    paths = saved_module_paths(names, (n for n, _ in registry_of(gm).base_modules(gm)))
    explicit = list(getattr(config, "modules_to_save", None) or [])
    missing = [n for n in explicit if not any(p.endswith(n) for p in paths) and n not in SEQ_CLS_HEAD_NAMES]
    if missing:
        raise ValueError(f"modules_to_save {missing} matched no module of the model; check the names.")
    for path in paths:
        module = gm.get_submodule(path)
        holder = module._modules.get("modules_to_save")
        if holder is None:
            holder = nn.ModuleDict()
        originals = {k: v for k, v in module._modules.items() if k != "modules_to_save"}
        holder[adapter] = copy.deepcopy(_without_children(module, originals))  # trainability: set by the caller
        module.add_module("modules_to_save", holder)
    return paths


def _without_children(module: nn.Module, keep: dict) -> nn.Module:
    """The module as it was before adapters: its own tensors and original children only."""
    shallow = copy.copy(module)
    shallow._modules = dict(keep)
    return shallow


def copies_rule(name: str, container: str, reads_copy: Optional[Callable] = None, phase: int = 10) -> Rule:
    """The rewrite for whole-module copies kept per adapter under ``<path>.<container>.<adapter>``
    (modules_to_save; LN tuning's ``ln_tuning_layers``): the module's tensors are read from the copy
    of the active adapter, a ``where`` chain on ``reads_copy(lw, path, adapter)`` (a 0-dim node, > 0
    where the copy is read; default: the adapter is active), so switching is data, not structure. In
    the mixed graph the module's nodes are repeated once per copy and each sample keeps its adapter's
    outputs."""
    reads_copy = reads_copy or (lambda lw, path, adapter: lw.gate(adapter))

    def copies(lw: Lowering) -> dict[str, list[str]]:
        """path -> the adapters holding a copy of the module at path."""
        found = {}
        for path, module in lw.registry.base_modules(lw.root):
            holder = module._modules.get(container)
            if path and holder is not None and len(holder):
                found[path] = list(holder.keys())
        return found

    def match(lw: Lowering):
        found = copies(lw)
        called = [n for n in lw.graph.nodes if n.op == "call_module" and n.target in found]
        for node in called:  # a module a symbolic trace kept whole (a LayerNorm): its copies are called instead
            yield "module", node, node.target, found[node.target]
        if lw.mixed:
            whole = {node.target for node in called}
            yield from (("region", path, adapters) for path, adapters in found.items() if path not in whole)
            return
        for node in list(lw.graph.nodes) if found else ():
            if node.op != "get_attr" or lw.registry.is_adapter_state(node.target):
                continue
            for path, adapters in found.items():
                rest = _local_name(lw.root, path, node.target)
                users = [u for u in node.users if _reads_for(u, path, node.target)] if rest is not None else []
                if users:
                    yield "tensor", node, path, adapters, rest, users

    def rewrite(lw: Lowering, candidate) -> None:
        kind, *rest = candidate
        if kind == "tensor":
            _read_active_copy(lw, *rest, container, reads_copy)
        elif kind == "module":
            _call_active_copy(lw, *rest, container, reads_copy)
        else:
            _per_sample_copies(lw, *rest, container)

    return Rule(name=name, match=match, rewrite=rewrite, phase=phase)


def _local_name(root: nn.Module, path: str, target: str):
    """The name, inside the module at ``path``, of the tensor ``target`` reads: its own name under
    ``path``, or, for a tensor of the module read under another module's name (tied weights: export
    keeps one name for an embedding and the output head sharing it), the module's name for it."""
    if target.startswith(path + "."):
        return target[len(path) + 1:]
    owner, _, leaf = target.rpartition(".")
    holder = submodule(root, owner) if owner else root
    tensor = None if holder is None else getattr(holder, leaf, None)
    module = submodule(root, path)
    if tensor is None or module is None:
        return None
    return next((name for name, t in (*module._parameters.items(), *module._buffers.items()) if t is tensor), None)


def _reads_for(user: torch.fx.Node, path: str, target: str) -> bool:
    """Whether ``user`` reads the tensor as part of the module at ``path``: a node another module's
    code runs (the other side of tied weights) keeps reading the original."""
    if target.startswith(path + ".") and not (user.meta.get("nn_module_stack") or {}):
        return True
    return _in_module(user, path)


def _read_active_copy(lw: Lowering, node: torch.fx.Node, path: str, adapters: list[str], rest: str,
                      users: list[torch.fx.Node], container: str, reads_copy: Callable) -> None:
    """Read the copy of the active adapter (the last active one holding a copy), else the
    original: a chain of ``where`` on the gates, so switching adapters is data, not structure."""
    lw.tag["fxpeft_site"] = path
    value = node
    with lw.graph.inserting_before(node.next):
        for adapter in [a for a in lw.adapter_order if a in adapters]:
            copy_value = lw.attr(f"{path}.{container}.{adapter}.{rest}")
            active = lw.call(torch.ops.aten.gt.Scalar, reads_copy(lw, path, adapter), 0)
            value = lw.call(torch.ops.aten.where.self, active, copy_value, value)
    for user in users:
        user.replace_input_with(node, value)


def _call_active_copy(lw: Lowering, node: torch.fx.Node, path: str, adapters: list[str], container: str,
                      reads_copy: Callable) -> None:
    """A call of the whole module: every copy is called on the same inputs and the active one's output
    kept (``where`` on the gates), or in the mixed graph each sample's adapter's output."""
    lw.tag["fxpeft_site"] = path
    users = list(node.users)
    value = node
    with lw.graph.inserting_before(node.next):
        for adapter in [a for a in lw.adapter_order if a in adapters]:
            twin = lw.copy(node, {})
            twin.target = f"{path}.{container}.{adapter}"
            if lw.mixed:
                value = lw.call(keep_samples, lw.sample_index, lw.adapter_order.index(adapter), twin, value)
            else:
                active = lw.call(torch.ops.aten.gt.Scalar, reads_copy(lw, path, adapter), 0)
                value = lw.call(torch.ops.aten.where.self, active, twin, value)
    for user in users:
        user.replace_input_with(node, value)
    for site in lw.sites:  # later site rewrites read what their op now reads
        if site.input is node:
            site.input = value


def _in_module(node: torch.fx.Node, path: str) -> bool:
    stack = node.meta.get("nn_module_stack") or {}
    return node.op in ("call_function", "call_module") and any(
        p == path or (isinstance(p, str) and p.startswith(path + ".")) for p, _ in stack.values())


def _per_sample_copies(lw: Lowering, path: str, adapters: list[str], container: str) -> None:
    """Repeat the module's nodes for each adapter's copy (reading the copy's tensors) and let
    every sample keep its own adapter's outputs: each copy runs on the whole batch, which costs
    little for the heads, embeddings and norms such copies usually hold."""
    lw.tag["fxpeft_site"] = path
    region = [n for n in lw.graph.nodes if _in_module(n, path)]
    if not region:
        return
    inside = set(region)
    outside_users = {n: [u for u in n.users if u not in inside] for n in region}
    outputs = [n for n in region if outside_users[n]]
    if any(u < region[-1] for users in outside_users.values() for u in users):
        raise NotImplementedError(f"Mixed batches: module {path!r} ({container}) runs more than once or "
                                  "interleaved with other code in this graph, which per-sample copies do not support.")
    picked = dict(zip(outputs, outputs))
    with lw.graph.inserting_before(region[-1].next):
        for adapter in [a for a in lw.adapter_order if a in adapters]:
            prefix = f"{path}.{container}.{adapter}."
            copies = {arg: lw.attr(prefix + _local_name(lw.root, path, arg.target))  # the copy's tensors ...
                      for node in region for arg in node.all_input_nodes
                      if arg.op == "get_attr" and _local_name(lw.root, path, arg.target) is not None}
            for node in region:  # ... read by the module's nodes, copied in order
                copies[node] = lw.copy(node, copies)
            slot = lw.adapter_order.index(adapter)
            for out in outputs:
                picked[out] = lw.call(keep_samples, lw.sample_index, slot, copies[out], picked[out])
    for out in outputs:
        for user in outside_users[out]:
            user.replace_input_with(out, picked[out])
    for site in lw.sites:  # later site rewrites (LoRA after the saved module) read what their op reads
        if site.node not in inside and site.input in picked:
            site.input = picked[site.input]


def keep_samples(index: torch.Tensor, slot: int, chosen: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``chosen`` for the samples whose adapter is ``slot``, else ``other``."""
    return torch.where(samples_of(index, slot, chosen), chosen, other)


DEFAULT.add_rule(copies_rule("modules_to_save", "modules_to_save"))
DEFAULT.add_attach_hook(attach, "modules_to_save")
