"""Read-only questions about a transformed module's adapters: which exist, where, which are
merged, which samples use which. Below module.py, lifecycle.py and merging.py, which all ask them.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from .canonical import find_sites
from .registry import registry_of

BASE_ADAPTER = "__base__"  # the name that selects no adapter in mixed batches (adapter_names=)


def method_of(gm, adapter: str):
    return registry_of(gm).method_for(gm.peft_config[adapter])


def check_known(gm, names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in gm.peft_config]
    if unknown:
        raise KeyError(f"Unknown adapter(s) {unknown}; existing adapters: {sorted(gm.peft_config)}.")


def sites_by_path(gm) -> dict:
    canonical = gm._fxpeft_signatures[gm._fxpeft_primary].canonical
    return {site.path: site for site in reversed(find_sites(canonical, gm, registry_of(gm)))}


def adapter_modules(gm, adapter_names: Iterable[str]):
    """(path, module, method, adapter) for every module holding one of the named adapters, in
    one walk over the tree."""
    names_by_method: dict = {}
    for name in adapter_names:
        names_by_method.setdefault(method_of(gm, name), []).append(name)
    names_by_method = {m: names for m, names in names_by_method.items() if m.adapters_at}
    for path, module in gm.named_modules():
        for method, names in names_by_method.items():
            present = method.adapters_at(module)
            for name in names if present else ():
                if name in present:
                    yield path, module, method, name


def site_of(gm, sites: dict, path: str, module, method):
    """The site adapter state at ``path`` folds into: a graph site, or what the method names for state
    on none (LoRA on a raw parameter: ``Method.state_site``)."""
    site = sites.get(path)
    if site is None and method.state_site is not None:
        site = method.state_site(gm, path, module)
    return sites[path] if site is None else site


def merged_adapters(gm) -> list[str]:
    """The merged adapters. Kept on the module between changes (merging.py refreshes it after every
    fold, a relower drops it): a mixed call asks on every call, and the walk grows with the adapters."""
    found = gm.__dict__.get("_fxpeft_merged")
    if found is None:
        found = remember_merged(gm)
    return list(found)


def remember_merged(gm) -> list[str]:
    found = []
    for _, module, method, name in adapter_modules(gm, list(gm.peft_config)):
        # a method without gates (no fold: adaption prompts) is never merged
        if method.gate is not None and method.gate(module, name).merged and name not in found:
            found.append(name)
    gm.__dict__["_fxpeft_merged"] = found
    return found


def adapter_indices(gm, adapter_names: Sequence[str], batch_size=None, device=None) -> torch.Tensor:
    """The per-sample index tensor a mixed batch uses (``"__base__"``: no adapter). Pass it as
    ``adapter_names=`` to a compiled module so that no Python list is specialised on. The tensor
    is checked here, not when passed (only its shape is): build it again after adding, deleting
    or merging adapters."""
    if not hasattr(gm, "_fxpeft_active"):
        raise TypeError(f"Expected the module returned by fxpeft.transform, got {type(gm).__name__}.")
    if isinstance(adapter_names, str):
        raise ValueError("adapter_names must be a list with one adapter name per sample, not a string.")
    order = list(gm.peft_config)
    names = list(adapter_names)
    if batch_size is not None and len(names) != batch_size:
        raise ValueError(f"adapter_names has {len(names)} entries but the batch has {batch_size} samples.")
    unknown = sorted({n for n in names if n != BASE_ADAPTER and n not in gm.peft_config})
    if unknown:
        raise ValueError(f"adapter_names contains unknown adapter(s) {unknown}; existing: {order} "
                         f"(use {BASE_ADAPTER!r} for no adapter).")
    unmixable = [n for n in order if not method_of(gm, n).mixed_batches]
    if unmixable:
        raise NotImplementedError(f"Mixed batches (adapter_names=...) are not supported with {method_of(gm, unmixable[0]).name} "
                                  f"adapter {unmixable[0]!r} on this module.")
    if merged_adapters(gm):
        raise ValueError("Cannot use adapter_names while adapters are merged; call fxpeft.unmerge_adapter first.")
    if gm.training and any(isinstance(d, nn.Dropout) for _, m, method, a in adapter_modules(gm, order)
                           for c in method.containers if c in m._modules and a in m._modules[c]
                           for d in [m._modules[c][a]] if isinstance(m._modules[c], nn.ModuleDict)):
        raise ValueError("Mixed batches skip adapter dropout: use them in eval mode (gm.eval()).")
    index = [len(order) if n == BASE_ADAPTER else order.index(n) for n in names]
    return torch.tensor(index, dtype=torch.long, device=device)
