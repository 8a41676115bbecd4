"""LoRA's ``layer_replication`` (PEFT's ``replicate_layers``): the model's layer list is rebuilt from
ranges of its layers, ``[[0, 4], [2, 5]]`` turning layers 0..4 into 0, 1, 2, 3, 2, 3, 4; the copies
share the base weights, and each gets its own adapter (targeting sees 7 layers).

A tree pass (fxpeft/registry.py): it edits fxpeft's copy of the module tree before capture, so the
caller's model keeps its layers (PEFT rebuilds the caller's model in place); the model's config
(``num_hidden_layers``) is copied before it is changed. Merging is refused with PEFT's message (PEFT's
own check looks the option up in its dict of adapters and never fires): a merged delta would land
in the weight every copy of its layer shares.
"""
from __future__ import annotations

import copy
import dataclasses

from torch import nn

from fxpeft.configs import LoraConfig
from fxpeft.module import clone_tree
from fxpeft.registry import DEFAULT, Method

MARK = "_fxpeft_layer_replication"  # on the tree: the layer map it was built with


def _layer_list(model: nn.Module):
    """(owner, attribute) of the layer list, where PEFT looks for it: ``model(.model)*.layers``
    (Llama-like), ``.bert.encoder.layer`` / ``.encoder.layer`` (BERT-like) or ``.h`` (Falcon-like)."""
    while hasattr(model, "model"):
        model = model.model
    if hasattr(model, "bert"):
        model = model.bert
    for owner, name in ((model, "layers"), (getattr(model, "encoder", None), "layer"), (model, "h")):
        if owner is not None and isinstance(getattr(owner, name, None), nn.ModuleList):
            return model, owner, name
    raise ValueError("layer_replication: could not locate the layers attribute in the model. Expected Llama, Bert or "
                     "Falcon compatible architectures (a ModuleList at model(.model)*.layers, .encoder.layer or .h).")


def check_layer_map(layer_map, count: int) -> list[tuple[int, int]]:
    pairs = []
    for item in layer_map:
        if (not isinstance(item, (list, tuple)) or len(item) != 2
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in item)
                or not 0 <= item[0] < item[1] <= count):
            raise ValueError(f"layer_replication must be a list of [start, end) layer ranges within the model's {count} "
                             f"layers, such as [[0, 4], [2, 5]]; got {item!r} in {layer_map!r}.")
        pairs.append(tuple(item))
    return pairs


def replicate_tree(tree: nn.Module, configs) -> None:
    maps = [c.layer_replication for c in configs if isinstance(c, LoraConfig) and c.layer_replication]
    if not maps:
        return
    base, owner, name = _layer_list(tree)
    layers = getattr(owner, name)
    new_layers = []
    for start, end in check_layer_map(maps[0], len(layers)):
        for i in range(start, end):
            clone = clone_tree(layers[i])  # new modules, the same tensors
            for module in clone.modules():  # transformers' per-layer cache index, as PEFT resets it
                if hasattr(module, "layer_idx"):
                    module.layer_idx = len(new_layers)
            new_layers.append(clone)
    setattr(owner, name, nn.ModuleList(new_layers))
    config = getattr(base, "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):
        fresh = copy.deepcopy(config)  # the caller's model shares the config object: change a copy
        fresh.num_hidden_layers = len(new_layers)
        for module in tree.modules():
            if getattr(module, "config", None) is config:
                module.config = fresh
    setattr(tree, MARK, [list(pair) for pair in maps[0]])


def check_replicated(gm, config) -> None:
    """``layer_replication`` changes the base model, which only a transform does."""
    wanted = [list(p) for p in config.layer_replication] if config.layer_replication else None
    built = getattr(gm._fxpeft_source, MARK, None)
    if wanted != built and wanted is not None:
        raise ValueError(f"layer_replication={config.layer_replication!r} rebuilds the base model's layers, which "
                         f"this module was built {'with ' + repr(built) if built else 'without'}: pass the config to "
                         "fxpeft.transform (or fxpeft.from_pretrained) on the original model instead.")


def refuse_merge(gm, adapter: str) -> None:
    if getattr(gm.peft_config[adapter], "layer_replication", None):
        raise ValueError("Cannot merge LORA layers when base model layers are replicated")


DEFAULT.tree_passes.append(replicate_tree)


def with_replication(method: Method) -> Method:
    """``method`` (serving LoraConfig) refusing a layer map its module was not built with, and merging
    while layers are replicated."""

    def attach(gm, sites, config, adapter):
        check_replicated(gm, config)
        return method.attach(gm, sites, config, adapter)

    def fold(gm, site, module, adapter, weight, bias, sign):
        if sign > 0:
            refuse_merge(gm, adapter)
        return method.fold(gm, site, module, adapter, weight, bias, sign)

    return dataclasses.replace(method, attach=attach, fold=fold)
