"""LoRA's ``ensure_weight_tying``: where the model ties its output head to its input embedding
(``tie_word_embeddings``), the adapter on the embedding is tied too, as PEFT does:

- ``modules_to_save`` naming the embedding or the head: the embedding is saved (a trainable copy)
  and the tied head computes with that copy's weight (the same tensor: PEFT saves it under both
  names). The config is rewritten as PEFT rewrites it: the embedding's path added to
  ``modules_to_save``, the head's name removed, the head listed in ``modules_to_tie``.
- ``target_modules`` naming the embedding or the head: the embedding gets LoRA and the head a LoRA
  whose A and B are the embedding's B and A transposed (tensors sharing their storage, as PEFT's
  ``tied_adapter``), so the head's ΔW is the embedding's. The head listed in ``target_modules_to_tie``.
- ``trainable_token_indices``: passes/trainable_tokens.py (the head follows the embedding's rows).

Without ``ensure_weight_tying``, PEFT warns when a tied layer is part of the adapter; so does this.
"""
from __future__ import annotations

import dataclasses
import re
import warnings

from torch import nn

from fxpeft.registry import DEFAULT, Method
from fxpeft.targets import input_embedding_path, tied_to_embedding

from . import modules_to_save  # noqa: F401  its attach hook makes the copies this file's hook ties: registered first

EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # PEFT's names for "an embedding is part of the adapter"


def _names_embedding(names) -> bool:
    return any(str(n).split(".")[-1] in EMBEDDING_LAYER_NAMES for n in names or [])


def _targets_embedding(config) -> bool:
    targets = config.target_modules
    if isinstance(targets, str):
        return any(re.fullmatch(targets, name) for name in EMBEDDING_LAYER_NAMES)
    return _names_embedding(targets)


def _without_tied(names: list, tied: list[str]) -> list:
    """``names`` less, for each tied module, the first name that matches it (PEFT's loop)."""
    names = list(names)
    for key in tied:
        for name in names:
            if re.match(rf"(^|.*\.){name}($|\..*)", key):
                names.remove(name)
                break
    return names


def tie_config(gm, config):
    """The config as PEFT's ``_check_tied_modules`` leaves it (see the module docstring)."""
    tied = tied_to_embedding(gm)
    saving, targeting = _names_embedding(config.modules_to_save), _targets_embedding(config)
    if not config.ensure_weight_tying:
        if (saving or targeting) and tied:
            warnings.warn("Model has `tie_word_embeddings=True` and a tied layer is part of the adapter, but "
                          "`ensure_weight_tying` is not set to True. This can lead to complications, for example when "
                          "merging the adapter or converting your model to formats other than safetensors. Check the "
                          "discussion here: https://github.com/huggingface/peft/issues/2777")
        return config
    if not tied:
        warnings.warn("You have requested `ensure_weight_tying`, but no tied modules were found in the model")
        return config
    embedding = input_embedding_path(gm)
    if saving:
        saved = list(config.modules_to_save)
        if embedding not in saved:
            saved.append(embedding)
        config = dataclasses.replace(config, modules_to_save=_without_tied(saved, tied))
        config.modules_to_tie = set(tied)
    elif targeting:
        if config.use_dora:
            raise NotImplementedError("ensure_weight_tying with a tied embedding in target_modules is not implemented "
                                      "for DoRA (use_dora=True) in fxpeft.")
        targets = config.target_modules
        if isinstance(targets, str):
            targets = rf"(?:{targets}|^{re.escape(embedding)}$)"
        else:
            targets = _without_tied([*targets, embedding] if embedding not in targets else list(targets), tied)
        config = dataclasses.replace(config, target_modules=targets)
        config.target_modules_to_tie = set(tied)
    elif config.trainable_token_indices is None:
        warnings.warn("You have requested `ensure_weight_tying`, but no tied modules are added in either "
                      "`modules_to_save` or `target_modules`")
    return config


def tie_lora_targets(gm, config, adapter: str, add_lora) -> list[str]:
    """The tied heads get LoRA with the embedding's B and A, transposed (PEFT's ``tied_adapter``)."""
    tied = sorted(getattr(config, "target_modules_to_tie", None) or ())
    if not tied:
        return []
    embedding = gm.get_submodule(input_embedding_path(gm))
    if adapter not in (embedding._modules.get("lora_embedding_A") or {}):
        raise ValueError(f"ensure_weight_tying: the input embedding {input_embedding_path(gm)!r} did not get LoRA "
                         "(it is excluded or filtered out), so the tied layers have nothing to tie to.")
    from fxpeft.state import sites_by_path
    sites = sites_by_path(gm)
    for path in tied:
        module, site = gm.get_submodule(path), sites[path]
        add_lora(module, site, module.weight, config, adapter)
        a, b = embedding.lora_embedding_A[adapter], embedding.lora_embedding_B[adapter]
        module.lora_A[adapter].weight = nn.Parameter(b.detach().t())  # shares b's storage, as PEFT
        module.lora_B[adapter].weight = nn.Parameter(a.detach().t())
    return tied


def tie_saved_modules(gm, config, adapter: str) -> None:
    """The tied heads' saved copies compute with the embedding copy's tensors (an attach hook, after
    modules_to_save made the embedding's copy)."""
    tied = getattr(config, "modules_to_tie", None)
    if not tied:
        return
    embedding = gm.get_submodule(input_embedding_path(gm))
    source = embedding.modules_to_save[adapter]
    for path in sorted(tied):
        module = gm.get_submodule(path)
        holder = module._modules.get("modules_to_save") or nn.ModuleDict()
        twin = nn.Module()
        twin.weight = source.weight  # the copy's Parameter itself: one tensor, saved under both names (PEFT)
        holder[adapter] = twin
        module.add_module("modules_to_save", holder)


def with_tying(method: Method, add_lora) -> Method:
    """``method`` (serving LoraConfig) with ``ensure_weight_tying`` resolved and applied."""

    def resolve(gm, sites, config):
        return tie_config(gm, method.resolve_config(gm, sites, config))

    def attach(gm, sites, config, adapter):
        paths = method.attach(gm, sites, config, adapter)
        return paths + tie_lora_targets(gm, config, adapter, add_lora)

    return dataclasses.replace(method, resolve_config=resolve, attach=attach)


DEFAULT.add_attach_hook(tie_saved_modules, "modules_to_save")
