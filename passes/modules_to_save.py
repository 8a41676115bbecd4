"""modules_to_save: a trainable copy of whole modules (classifier heads, embeddings).

State: ``<path>.modules_to_save.<adapter>`` is a deep copy of the module at ``<path>``; the
original keeps its keys and stays frozen. Rewrite (phase 10): every ``get_attr`` of a tensor
under ``<path>`` reads the copy instead. Any config with a ``modules_to_save`` field gets this
(called by the driver after the method's own attach); SEQ_CLS tasks add PEFT's head names
("classifier", "score"; whichever exists).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from fxpeft.configs import SEQ_CLS_HEAD_NAMES
from fxpeft.rewrite import Lowering, Rule, is_adapter_state, register_rule
from fxpeft.targets import saved_module_paths


def requested_names(config) -> list[str]:
    names = list(getattr(config, "modules_to_save", None) or [])
    if getattr(config, "task_type", None) == "SEQ_CLS":
        names += [n for n in SEQ_CLS_HEAD_NAMES if n not in names]
    return names


def attach(gm, config, adapter: str) -> list[str]:
    names = requested_names(config)
    if not names:
        return []
    paths = [p for p in saved_module_paths(names, (n for n, _ in gm.named_modules()))
             if not is_adapter_state(p)]
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


def _saved_copies(root: nn.Module) -> dict[str, list[str]]:
    """path -> the adapters holding a copy of the module at path."""
    found = {}
    for path, module in root.named_modules():
        holder = module._modules.get("modules_to_save")
        if path and holder is not None and len(holder):
            found[path] = list(holder.keys())
    return found


def match(lw: Lowering):
    copies = _saved_copies(lw.root)
    if not copies:
        return
    for node in list(lw.graph.nodes):
        if node.op != "get_attr":
            continue
        for path, adapters in copies.items():
            if node.target.startswith(path + ".") and ".modules_to_save." not in node.target:
                yield node, path, adapters
                break


def rewrite(lw: Lowering, candidate) -> None:
    """Read the copy of the active adapter (the last active one holding a copy), else the
    original: a chain of ``where`` on the gates, so switching adapters is data, not structure."""
    node, path, adapters = candidate
    lw.tag["fxpeft_site"] = path
    rest = node.target[len(path) + 1:]
    users = list(node.users)
    value = node
    with lw.graph.inserting_before(node.next):
        for adapter in [a for a in lw.adapter_order if a in adapters]:
            copy_value = lw.attr(f"{path}.modules_to_save.{adapter}.{rest}")
            active = lw.call(torch.ops.aten.gt.Scalar, lw.gate(adapter), 0)
            value = lw.call(torch.ops.aten.where.self, active, copy_value, value)
    for user in users:
        user.replace_input_with(node, value)


register_rule(Rule(name="modules_to_save", match=match, rewrite=rewrite, phase=10))
