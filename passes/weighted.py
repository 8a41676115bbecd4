"""add_weighted_adapter: a new LoRA adapter that combines existing ones, as PEFT's
``LoraModel.add_weighted_adapter`` does (same combination types, same math, same new config).

Combination types (``adapters`` / ``weights`` pair up; ``s_i`` is adapter i's scaling):

- ``cat``: ``A = concat_i(w_i * s_i * A_i)``, ``B = concat_i(B_i)`` -- exact, rank = sum of ranks;
- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the merge rule is
  applied to the A's (weights ``sign(w_i s_i) sqrt|w_i s_i|``) and to the B's (``sqrt|w_i s_i|``)
  separately -- a rough approximation, all ranks must be equal;
- ``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``: the merge
  rule is applied to the delta weights ``s_i B_i A_i`` and the result is factored back by a
  truncated SVD (rank ``svd_rank``, default the largest rank).

The new adapter gets ``r = lora_alpha = new rank`` (scaling 1), the other fields of
``adapters[0]``'s config, and PEFT's combined ``target_modules`` (string targets joined as
``(t1)|(t2)``, list targets united). As in PEFT it is neither activated nor trainable, and with
``use_rslora=True`` in ``adapters[0]``'s config its scaling is ``sqrt(r)`` instead of 1 (PEFT copies
the flag; we keep that for parity).

The ``dare_*`` types draw their random masks with ``torch.bernoulli`` after the new adapter has
been created and in PEFT's order (module order, then A before B, then adapter order), so a call
made after ``torch.manual_seed(s)`` gives the same masks as PEFT's after the same seed.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
import warnings
from typing import Optional

import torch

from fxpeft.state import sites_by_path

COMBINATION_TYPES = (
    "svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd",
    "magnitude_prune", "magnitude_prune_svd",
)
_FACTOR_WISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_SVD = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
_RULE = {  # combination type -> merge rule applied to the tensors
    "linear": "task_arithmetic", "svd": "task_arithmetic",
    "ties": "ties", "ties_svd": "ties",
    "dare_linear": "dare_linear", "dare_linear_svd": "dare_linear",
    "dare_ties": "dare_ties", "dare_ties_svd": "dare_ties",
    "magnitude_prune": "magnitude_prune", "magnitude_prune_svd": "magnitude_prune",
}
_NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
_NEEDS_SIGN = ("ties", "dare_ties")
_SVD_DRIVERS = (None, "gesvd", "gesvdj", "gesvda")


# ----------------------------------------------------------------------------- merge rules
# PEFT's peft/utils/merge_utils.py, same operations in the same order (results are bit-equal and
# the random masks consume the generator exactly as PEFT's do).


def _weights_like(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return weights.view(weights.shape + (1,) * (stacked.dim() - weights.dim()))


def _prune(tensor: torch.Tensor, density: float, method: str, rescale: bool = False) -> torch.Tensor:
    if density >= 1:
        warnings.warn(f"The density {density} is greater than or equal to 1, no pruning will be performed.")
        return tensor
    if method == "magnitude":
        mask = torch.zeros_like(tensor).reshape(-1)
        k = int(density * tensor.numel())
        top_k = torch.topk(tensor.abs().reshape(-1), k=k, largest=True)
        mask[top_k[1]] = 1
        return tensor * mask.reshape(tensor.shape)
    mask = torch.bernoulli(torch.full_like(input=tensor, fill_value=density))
    pruned = tensor * mask
    return pruned / density if rescale else pruned


def _majority_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    majority = torch.where(magnitude >= 0, 1, -1)
    return sign == majority


def _disjoint_merge(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mixed = (weighted * mask).sum(dim=0)
    return mixed / torch.clamp(mask.sum(dim=0), min=1.0)


def _merge(rule: str, tensors: list[torch.Tensor], weights: torch.Tensor, density, sign_method) -> torch.Tensor:
    if rule in ("ties", "magnitude_prune"):
        tensors = [_prune(t, density, "magnitude") for t in tensors]
    elif rule in ("dare_linear", "dare_ties"):
        tensors = [_prune(t, density, "random", rescale=True) for t in tensors]
    stacked = torch.stack(tensors, dim=0)
    if rule in ("ties", "dare_ties"):
        mask = _majority_sign_mask(stacked, sign_method)
        return _disjoint_merge(stacked * _weights_like(stacked, weights), mask)
    return (stacked * _weights_like(stacked, weights)).sum(dim=0)


# ----------------------------------------------------------------------------- LoRA state


def _lora_pair(module, adapter: str):
    """(A, B, is_embedding) of ``adapter`` at ``module``, or None where it has no LoRA."""
    lora_a = module._modules.get("lora_A")
    if lora_a is not None and adapter in lora_a:
        return lora_a[adapter].weight, module.lora_B[adapter].weight, False
    emb_a = module._modules.get("lora_embedding_A")
    if emb_a is not None and adapter in emb_a:
        return emb_a[adapter], module.lora_embedding_B[adapter], True
    return None


# ----------------------------------------------------------------------------- checks


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check(gm, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp, svd_driver, density,
           majority_sign_method):
    import fxpeft
    if not isinstance(gm, fxpeft.PeftGraphModule):
        raise TypeError(f"Expected the module returned by fxpeft.transform, got {type(gm).__name__}.")
    from fxpeft.lifecycle import check_adapter_name
    check_adapter_name(adapter_name)
    if adapter_name in gm.peft_config:
        raise ValueError(f"An adapter named {adapter_name!r} already exists (adapters: {sorted(gm.peft_config)}); "
                         "choose another adapter_name or delete it first.")
    if isinstance(adapters, str):
        raise TypeError(f"adapters must be a list of adapter names, got the string {adapters!r}.")
    adapters, weights = list(adapters), list(weights)
    if not adapters:
        raise ValueError("adapters is empty: give at least one adapter to combine.")
    missing = [a for a in adapters if a not in gm.peft_config]
    if missing:
        raise KeyError(f"Adapter(s) {missing} do not exist; existing adapters: {sorted(gm.peft_config)}.")
    not_lora = [a for a in adapters if not isinstance(gm.peft_config[a], fxpeft.LoraConfig)]
    if not_lora and len(not_lora) < len(adapters):
        raise ValueError(f"add_weighted_adapter combines adapters of one method; {not_lora} are not LoRA adapters "
                         f"but {sorted(set(adapters) - set(not_lora))} are.")
    if len(weights) != len(adapters):
        raise ValueError(f"Got {len(weights)} weights for {len(adapters)} adapters; give one weight per adapter.")
    for w in weights:
        if not _is_number(w) and not (isinstance(w, torch.Tensor) and w.numel() == 1):
            raise ValueError(f"weights must be real numbers, got {w!r}.")
    weights = [float(w) for w in weights]
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite, got {weights}.")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"Invalid combination_type: {combination_type!r}; expected one of {list(COMBINATION_TYPES)}.")
    # PEFT: with a single adapter only linear merging makes sense
    combination_type = "linear" if len(adapters) == 1 else combination_type
    base = combination_type.removesuffix("_svd")
    if base in _NEEDS_DENSITY:
        if not _is_number(density) or math.isnan(density) or density < 0:
            raise ValueError(f"combination_type {combination_type!r} needs a density in [0, 1], got {density!r}.")
        if base.startswith("dare") and density == 0:
            raise ValueError(f"combination_type {combination_type!r} rescales by 1 / density; density must be > 0.")
    if base in _NEEDS_SIGN and majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}.")
    if combination_type in _SVD:
        if svd_rank is not None and (not isinstance(svd_rank, int) or isinstance(svd_rank, bool) or svd_rank <= 0):
            raise ValueError(f"svd_rank must be a positive integer or None, got {svd_rank!r}.")
        if svd_clamp is not None and (not _is_number(svd_clamp) or not 0 <= svd_clamp <= 1):
            raise ValueError(f"svd_clamp must be a quantile in [0, 1] or None, got {svd_clamp!r}.")
        if svd_driver not in _SVD_DRIVERS:
            raise ValueError(f"svd_driver must be one of {list(_SVD_DRIVERS)}, got {svd_driver!r}.")
    return adapters, weights, combination_type


def _modules_to_save_conflicts(gm, adapters) -> int:
    count = 0
    for module in gm.modules():
        holder = module._modules.get("modules_to_save")
        if holder is not None and sum(a in holder for a in adapters) > 1:
            count += 1
    return count


# ----------------------------------------------------------------------------- plan


def _plan(gm, adapters, weights, combination_type, svd_rank, svd_driver):
    """Everything decided before the model is touched: new rank, configs, adapted paths."""
    import fxpeft
    from fxpeft.targets import is_targeted

    conflicts = _modules_to_save_conflicts(gm, adapters)
    if conflicts:
        raise ValueError("Cannot add weighted adapters if they target the same module with modules_to_save, but "
                         f"found {conflicts} such instance(s).")
    configs = [gm.peft_config[a] for a in adapters]
    ranks = [c.r if not c.rank_pattern else max(c.r, *c.rank_pattern.values()) for c in configs]
    if combination_type in _FACTOR_WISE:
        if len(set(ranks)) != 1:
            raise ValueError(f"All adapters must have the same r value when using combination_type "
                             f"{combination_type!r} (got ranks {dict(zip(adapters, ranks))}); use 'cat' or an "
                             "svd-based combination_type for adapters of different ranks.")
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = svd_rank or max(ranks)

    # every module path where at least one of the adapters has LoRA, in module order (PEFT's order)
    paths = [name for name, module in gm.named_modules()
             if name and any(_lora_pair(module, a) is not None for a in adapters)]
    if not paths:
        raise ValueError(f"Found no LoRA layers of the adapters {adapters}.")
    sites = sites_by_path(gm)
    lost = [p for p in paths if p not in sites]
    if lost:
        raise ValueError(f"The adapted modules {lost[:5]} are no longer layers of the captured graph.")
    if combination_type in _FACTOR_WISE:
        for path in paths:
            module = gm.get_submodule(path)
            shapes = {a: tuple(pair[0].shape) for a in adapters if (pair := _lora_pair(module, a)) is not None}
            if len(set(shapes.values())) != 1:
                raise ValueError(f"combination_type {combination_type!r} needs LoRA factors of one shape at every "
                                 f"module, but {path} has {shapes}; use 'cat' or an svd-based combination_type.")
    if svd_driver is not None and combination_type in _SVD:
        first = _present(gm.get_submodule(paths[0]), adapters, weights)[0]
        if first[2].device.type != "cuda":
            raise ValueError(f"svd_driver={svd_driver!r} only works when merging on CUDA (torch.linalg.svd); "
                             "leave it None on other devices.")

    targets = [c.target_modules for c in configs]  # stored resolved, as PEFT stores them
    kinds = {type(t) for t in targets}
    if len(kinds) > 1:
        raise ValueError("all adapter configs should follow the same target modules type. Combining adapters "
                         "with `target_modules` type being a mix of list and string is not supported.")
    if isinstance(targets[0], str):
        new_targets = "|".join(f"({t})" for t in targets)
    else:
        new_targets = sorted(set().union(*(set(t) for t in targets)))

    stored = dataclasses.replace(configs[0], r=new_rank, lora_alpha=new_rank, target_modules=new_targets,
                                 alpha_pattern={}, rank_pattern={})
    # inject exactly at `paths`: an anchored alternation of the escaped paths (str targets are fullmatched)
    inject = dataclasses.replace(stored, target_modules="(?:" + "|".join(re.escape(p) for p in paths) + ")",
                                 layers_to_transform=None, layers_pattern=None, exclude_modules=None)
    untargetable = [p for p in paths if not is_targeted(inject, p)]
    if untargetable:
        raise ValueError(f"The new adapter cannot be placed on {untargetable[:5]}: {adapters[0]!r}'s config saves "
                         "those modules whole (modules_to_save).")
    # keep PEFT's combined target_modules in the stored config when it names the same layers
    same = {p for p in sites if is_targeted(stored, p)} == set(paths)
    if not same:
        warnings.warn(f"The combined target_modules {new_targets!r} would not target exactly the layers the "
                      "adapters adapt; the new adapter's config lists those layers instead.")
    assert isinstance(stored, fxpeft.LoraConfig)
    return new_rank, paths, sites, inject, (stored if same else inject)


# ----------------------------------------------------------------------------- combination


def _present(module, adapters, weights):
    return [(a, w, *pair) for a, w in zip(adapters, weights) if (pair := _lora_pair(module, a)) is not None]


def _cat(module, present):
    loras_a = [a.data * w * module.lora_scaling[name].scale for name, w, a, _b, _e in present]
    loras_b = [b.data for _n, _w, _a, b, _e in present]
    return torch.cat(loras_a, dim=0), torch.cat(loras_b, dim=1)


def _factor_wise(rule, module, present, density, sign_method):
    weights_a, weights_b = [], []
    for name, w, *_ in present:
        scaled = w * module.lora_scaling[name].scale
        sign = 1 if scaled >= 0 else -1
        # the sign goes on one factor only, else it would cancel out
        weights_a.append(math.sqrt(abs(scaled)) * sign)
        weights_b.append(math.sqrt(abs(scaled)))
    factors_a = [a.data for _n, _w, a, _b, _e in present]
    factors_b = [b.data for _n, _w, _a, b, _e in present]
    dtype = factors_a[0].dtype
    new_a = _merge(rule, factors_a, torch.tensor(weights_a).to(factors_a[0].device), density, sign_method)
    new_b = _merge(rule, factors_b, torch.tensor(weights_b).to(factors_b[0].device), density, sign_method)
    return new_a.to(dtype), new_b.to(dtype)


def _svd(gm, rule, site, module, present, new_rank, density, sign_method, clamp, full_matrices, driver):
    from fxpeft.passes.lora import delta_weight
    is_embedding = any(e for *_, e in present)
    # s * B A in the layout of the base weight (PEFT's get_delta_weight)
    deltas = [delta_weight(gm, site, module, name) for name, *_ in present]
    weights = torch.tensor([w for _n, w, *_ in present]).to(deltas[0].device)
    delta = _merge(rule, deltas, weights, density, sign_method)
    a0, b0 = present[0][2], present[0][3]
    conv = site.kind == "conv"
    if conv:
        delta = delta.flatten(start_dim=1)
    if site.fan_in_fan_out or is_embedding:
        delta = delta.T
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    k = min(new_rank, s.shape[0])  # PEFT fails when svd_rank exceeds min(out, in); keep all there is
    u = u[:, :k] @ torch.diag(s[:k])
    vh = vh[:k, :]
    if clamp is not None:
        dist = torch.cat([u.flatten(), vh.flatten()])
        hi_val = torch.quantile(dist, clamp)
        u = u.clamp(-hi_val, hi_val)
        vh = vh.clamp(-hi_val, hi_val)
    if conv:
        u = u.reshape(b0.shape[0], k, *b0.shape[2:])
        vh = vh.reshape(k, *a0.shape[1:])
    return vh, u


def _combine(gm, path, site, adapters, weights, combination_type, new_rank, density, sign_method,
             svd_clamp, svd_full_matrices, svd_driver):
    module = gm.get_submodule(path)
    present = _present(module, adapters, weights)
    if combination_type == "cat":
        return _cat(module, present)
    if combination_type in _FACTOR_WISE:
        return _factor_wise(_RULE[combination_type], module, present, density, sign_method)
    return _svd(gm, _RULE[combination_type], site, module, present, new_rank, density, sign_method,
                svd_clamp, svd_full_matrices, svd_driver)


# ----------------------------------------------------------------------------- entry point


def add_weighted_adapter(
    gm,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: Optional[int] = None,
    svd_clamp: Optional[float] = None,
    svd_full_matrices: bool = True,
    svd_driver: Optional[str] = None,
    density: Optional[float] = None,
    majority_sign_method: str = "total",
) -> None:
    """Add ``adapter_name``, a combination of the LoRA ``adapters`` with ``weights``, to ``gm``
    (PEFT's ``add_weighted_adapter``; see the module docstring for the combination types). IA3
    adapters combine as PEFT combines them: their vectors summed with the weights (the
    combination options do not apply).

    ``density`` (fraction of values kept, in [0, 1]) is needed by the ties / dare /
    magnitude_prune types; ``majority_sign_method`` ("total" or "frequency") by the ties types;
    ``svd_rank``, ``svd_clamp`` (a quantile), ``svd_full_matrices`` and ``svd_driver`` (CUDA only)
    by the svd types. Unknown adapters raise KeyError; bad arguments, an existing
    ``adapter_name`` or incompatible adapters raise ValueError. On any error ``gm`` is unchanged.
    """
    import fxpeft
    from fxpeft.lifecycle import transaction

    adapters, weights, combination_type = _check(gm, adapters, weights, adapter_name, combination_type, svd_rank,
                                                 svd_clamp, svd_driver, density, majority_sign_method)
    if not isinstance(gm.peft_config[adapters[0]], fxpeft.LoraConfig):  # (IA)³ vectors: a weighted sum
        from fxpeft.passes import ia3
        if not isinstance(gm.peft_config[adapters[0]], ia3.IA3Config):
            raise ValueError(f"add_weighted_adapter combines LoRA or IA3 adapters; {adapters[0]!r} is a "
                             f"{type(gm.peft_config[adapters[0]]).__name__}.")
        return ia3.add_weighted_adapter(gm, adapters, weights, adapter_name)
    new_rank, paths, sites, inject, stored = _plan(gm, adapters, weights, combination_type, svd_rank, svd_driver)

    active = list(gm._fxpeft_active)
    with transaction(gm):
        # The adapter is created first, as PEFT does: creating LoRA layers draws from the random
        # generator, so the dare masks drawn afterwards match PEFT's for the same seed.
        fxpeft.add_adapter(gm, inject, adapter_name)
        gm.peft_config[adapter_name] = stored
        if gm._fxpeft_active != active:  # add_adapter activates a first adapter; PEFT activates nothing here
            gm._fxpeft_active[:] = active
            gm.sync_gates()
        with torch.no_grad():
            for path in paths:
                new_a, new_b = _combine(gm, path, sites[path], adapters, weights, combination_type, new_rank,
                                        density, majority_sign_method, svd_clamp, svd_full_matrices, svd_driver)
                target_a, target_b, _ = _lora_pair(gm.get_submodule(path), adapter_name)
                rank = new_a.shape[0]
                if rank > target_a.shape[0] or new_b.shape[1] != rank:
                    raise RuntimeError(f"Combined LoRA factors of rank {rank} do not fit the rank-{new_rank} "
                                       f"adapter at {path}.")
                target_a.zero_()
                target_b.zero_()
                target_a[:rank].copy_(new_a)
                target_b[:, :rank].copy_(new_b)
        # PEFT freezes the combined adapter (_freeze_adapter); it is not made active either
        for path in paths:
            target_a, target_b, _ = _lora_pair(gm.get_submodule(path), adapter_name)
            target_a.requires_grad_(False)
            target_b.requires_grad_(False)
