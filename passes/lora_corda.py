"""CorDA's preprocessing: PEFT 0.21.2's ``preprocess_corda`` (``peft.tuners.lora.corda``), without PEFT.

    fxpeft.preprocess_corda(model, config, run_model=lambda: [model(**batch) for batch in data])
    gm = fxpeft.transform(model, config)          # config: LoraConfig(init_lora_weights="corda", ...)

``run_model`` runs the model on calibration data while forward hooks on the targeted nn.Linear /
Conv1D layers add up each layer's input covariance (``lora_init.corda_covariance``: PEFT's hook,
which takes batches of one sequence); each layer's weight is then decomposed against its covariance
(``lora_init.corda_eigens``: "ipm" keeps the largest components, "kpm" the smallest) and the result
is left on the layer as ``eigens`` (PEFT's attribute), where ``transform`` (or ``add_adapter``)
with init "corda" reads it: A and B from the components, the base weight becomes the residual
(passes/lora.py, ``lora_init.init_weights``). ``corda_config.covariance_file`` /
``cache_file`` save what was computed and are read instead of computing it when they exist, in
PEFT's format (``torch.save`` of ``{layer: covariance}`` / ``{"<layer>.eigens.S_WC": …}``).

``model`` may also be a transformed module (then ``add_adapter`` with the CorDA config), whose
layers' hooks fire through ``fxpeft.site_hooks``.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch
from torch import nn

from fxpeft.configs import LoraConfig
from fxpeft.registry import registry_of
from fxpeft.site_hooks import site_hooks
from fxpeft.targets import pattern_value

from .lora_eva import _is_transformed, linear_targets
from .lora_init import CordaEigens, corda_covariance, corda_covariance_mean, corda_eigens

__all__ = ["preprocess_corda"]

_EIGEN_FIELDS = ("S_WC", "U_WC", "V_WC")


def _targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """The layers CorDA prepares: as ``transform`` resolves them on a transformed module, PEFT's
    rule (targeted nn.Linear / Conv1D) on a plain one."""
    if _is_transformed(model):
        from fxpeft.canonical import find_sites
        method = registry_of(model).method_for(config)
        if method.resolve_config is not None:
            sites = find_sites(model._fxpeft_signatures[model._fxpeft_primary].canonical, model, registry_of(model))
            config = method.resolve_config(model, sites, config)
    names = linear_targets(model, config)
    if not names:
        raise ValueError(f"preprocess_corda: target_modules {config.target_modules!r} matched no nn.Linear / Conv1D "
                         "layer of the model.")
    return names


def _linear_weight(module: nn.Module) -> tuple[torch.Tensor, bool]:
    """The weight in nn.Linear's (out × in) layout, and whether the layer stores it transposed (Conv1D)."""
    transposed = not isinstance(module, nn.Linear)
    return (module.weight.t() if transposed else module.weight), transposed


def _load(path: str, model: nn.Module) -> dict:
    device = next(iter(model.parameters())).device
    return torch.load(path, map_location=device)


def _save(path: str, data: dict) -> None:
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    torch.save(data, path)


def _exists(path: Optional[str]) -> bool:
    return path is not None and os.path.exists(path) and os.path.getsize(path) > 0


def _covariances(model: nn.Module, names: list[str], config: LoraConfig, run_model: Optional[Callable[[], None]],
                 hooked_model: Optional[nn.Module]) -> dict[str, torch.Tensor]:
    """Each layer's mean input covariance: read from ``covariance_file`` if it exists, else collected
    while ``run_model()`` runs ``hooked_model`` (default: ``model``), and written there if named."""
    corda = config.corda_config
    if _exists(corda.covariance_file):
        saved = _load(corda.covariance_file, model)
        absent = [name for name in names if name not in saved]
        if absent:
            raise ValueError(f"covariance_file {corda.covariance_file!r} has no covariance for {absent[:4]}: it was "
                             "built for other layers; delete it to collect the covariances again.")
        return {name: saved[name] for name in names}
    if run_model is None:
        raise ValueError("run_model must be specified when covariance file and cache file aren't built.")
    hooked = model if hooked_model is None else hooked_model
    sums: dict[str, tuple] = {}

    def collect(name):
        def hook(module, args, output):
            sums[name] = corda_covariance(*sums.get(name, (None, 0)), args[0], corda.use_float16_for_covariance)
        return hook
    # layers only the hooked model has are skipped (PEFT: modules used only in inference)
    present = {name for name, _ in hooked.named_modules()}
    handles = [hooked.get_submodule(name).register_forward_hook(collect(name)) for name in names if name in present]
    training = hooked.training
    hooked.eval()
    try:
        with site_hooks(hooked), torch.no_grad():
            run_model()
    finally:
        for handle in handles:
            handle.remove()
        hooked.train(training)
    silent = [name for name in names if name not in sums]
    if silent:
        raise ValueError(f"preprocess_corda: the layers {silent[:4]}{' …' if len(silent) > 4 else ''} received no "
                         "input while run_model ran: run_model must call the model (the hooked model, if given) on "
                         "the calibration data.")
    covariances = {name: corda_covariance_mean(*sums[name]) for name in names}
    if corda.covariance_file is not None:
        _save(corda.covariance_file, covariances)
    return covariances


@torch.no_grad()
def preprocess_corda(model: nn.Module, lora_config: LoraConfig, run_model: Optional[Callable[[], None]] = None,
                     hooked_model: Optional[nn.Module] = None) -> None:
    """PEFT's ``preprocess_corda``: give each layer ``lora_config`` targets its CorDA decomposition
    (the attribute ``eigens``), for ``fxpeft.transform(model, lora_config)`` to initialise from.
    ``run_model()`` runs the model on calibration data (batches of one sequence, as PEFT's hook
    requires); ``hooked_model`` is hooked instead of ``model`` if given. See the module docstring
    for ``corda_config``'s files."""
    if not isinstance(lora_config, LoraConfig):
        raise TypeError(f"preprocess_corda takes an fxpeft.LoraConfig, got {type(lora_config).__name__}.")
    if LoraConfig.init_family(lora_config.init_lora_weights) != "corda" or lora_config.corda_config is None:
        raise ValueError("preprocess_corda prepares LoraConfig(init_lora_weights='corda', corda_config=...), got "
                         f"init_lora_weights={lora_config.init_lora_weights!r}.")
    corda = lora_config.corda_config
    names = _targets(model, lora_config)
    if _exists(corda.cache_file):
        cache = _load(corda.cache_file, model)
        for name in names:
            keys = [f"{name}.eigens.{field}" for field in _EIGEN_FIELDS]
            if any(key not in cache for key in keys):
                raise ValueError(f"cache_file {corda.cache_file!r} has no decomposition for {name!r}: it was built for "
                                 "other layers; delete it to preprocess again.")
            model.get_submodule(name).eigens = CordaEigens(*(cache[key] for key in keys))
        return
    if corda.corda_method is None:
        raise ValueError("corda_method is required when cache_file is not provided.")
    covariances = _covariances(model, names, lora_config, run_model, hooked_model)
    found = {}
    for name in names:  # every layer computed before any is changed
        weight, transposed = _linear_weight(model.get_submodule(name))
        rank = pattern_value(lora_config.rank_pattern, name, lora_config.r)
        found[name] = corda_eigens(weight, covariances[name], rank, corda.corda_method, fan_in_fan_out=transposed)
    for name, eigens in found.items():
        model.get_submodule(name).eigens = eigens
    if corda.cache_file is not None:
        _save(corda.cache_file, {f"{name}.eigens.{field}": getattr(eigens, field)
                                 for name, eigens in found.items() for field in _EIGEN_FIELDS})

