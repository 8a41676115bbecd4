"""EVA (Explained Variance Adaptation): LoRA's A from the top right-singular vectors of each
layer's inputs, ranks redistributed across layers by explained variance; PEFT 0.21.2's API and
numerics (``peft.tuners.lora.eva`` with its ``IncrementalPCA``), without PEFT.

The API, as PEFT's::

    gm = fxpeft.transform(model, LoraConfig(init_lora_weights="eva", eva_config=EvaConfig(...), ...))
    fxpeft.initialize_lora_eva_weights(gm, dataloader)

``transform`` with init "eva" gives linear layers nn.Linear's init for A and a zero B (PEFT's
``update_layer``). ``initialize_lora_eva_weights`` runs the base model (adapters disabled) over the
data with forward hooks on the adapted layers (``fxpeft.site_hooks`` makes them fire on a
transformed module), one incremental SVD per distinct layer input, until every component a layer
is given has converged (``eva_state_dict``: ``{layer: A (rank × in)}``); the adapter is then built
again with the redistributed ranks (``rank_pattern``, ``alpha_pattern`` and ``target_modules``
rewritten as PEFT rewrites them; rank 0: no adapter on that layer) and each A copied in.
``get_eva_state_dict`` computes the state alone, from a transformed module or a plain model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from copy import deepcopy
from itertools import cycle
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fxpeft.configs import EvaConfig, LoraConfig
from fxpeft.registry import registry_of
from fxpeft.site_hooks import site_hooks
from fxpeft.targets import is_targeted, pattern_value

try:  # transformers' GPT-2 style linear
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()

__all__ = ["EvaConfig", "IncrementalSVD", "rank_distribution", "eva_state_dict", "eva_layer_inits",
           "get_eva_state_dict", "initialize_lora_eva_weights", "lm_token_mask", "lm_layer_tokens",
           "flat_layer_input", "forward_fn_dict", "linear_targets"]


# ---- which rows of a layer's input enter the SVD ----

def _first_tensor(layer_input, name: str) -> Tensor:
    if isinstance(layer_input, (tuple, list)):
        return layer_input[0]
    if not isinstance(layer_input, Tensor):
        raise TypeError(f"unsupported input type {type(layer_input)} for prepare_layer_inputs_fn in layer {name}, "
                        "please provide a custom prepare_layer_inputs_fn")
    return layer_input


def flat_layer_input(layer_input, model_input, name: str) -> Tensor:
    """Every position: the first positional input, flattened to (tokens, features)."""
    x = _first_tensor(layer_input, name)
    return x.view(-1, x.size(-1)) if x.ndim > 2 else x


def lm_token_mask(model_input, peft_config: LoraConfig) -> Tensor:
    """Language modelling (PEFT's ``prepare_model_inputs_fn_language_modeling``): the (batch,
    position) indices of real tokens: attention mask, and labels other than ``label_mask_value``
    when ``use_label_mask``."""
    if not isinstance(model_input, dict):
        raise TypeError("When using `prepare_model_inputs_fn_language_modeling` inputs must be a dictionary")
    config = peft_config.eva_config
    mask = model_input.get("attention_mask", torch.ones_like(model_input["input_ids"])).bool()
    if config.use_label_mask and "labels" in model_input:
        mask = torch.logical_and(mask, model_input["labels"] != config.label_mask_value)
    return mask.nonzero()


def lm_layer_tokens(layer_input, token_indices: Tensor, name: str) -> Tensor:
    """The layer input at the positions :func:`lm_token_mask` chose."""
    return _first_tensor(layer_input, name)[token_indices.T.unbind()]


# ---- one layer's incremental SVD ----

class IncrementalSVD:
    """Incremental PCA of a stream of (tokens × features) batches (PEFT's ``IncrementalPCA`` with
    ``lowrank=True, lowrank_seed=42``: sklearn's algorithm, ``torch.svd_lowrank`` with q = 2·k,
    4 iterations, seeded on each call), plus EVA's convergence test: a component has converged
    when its cosine similarity to the previous batch's is at least ``tau``."""

    def __init__(self, n_components: int, tau: float):
        self.n_components, self.tau = n_components, tau
        self.converged = torch.zeros((n_components,), dtype=torch.bool)
        self.components: Optional[Tensor] = None  # (k, features)
        self.singular_values: Optional[Tensor] = None
        self.explained_variance_ratio: Optional[Tensor] = None
        self._mean = self._var = None
        self._seen = None

    @torch.no_grad()
    def update(self, states: Tensor) -> None:
        if states.size(0) < self.n_components:  # too few rows this batch: PEFT skips it
            return
        previous = None if self.components is None else self.components.clone()
        self._partial_fit(states.to(torch.float32))
        if previous is None:
            return
        current = self.components
        if current.dim() == 1:
            current, previous = current.reshape(1, -1), previous.reshape(1, -1)
        self.converged = torch.nn.functional.cosine_similarity(current, previous) >= self.tau

    def _partial_fit(self, X: Tensor) -> None:
        X = X.clone()
        n_samples, n_features = X.shape
        if self.n_components > n_features:
            raise ValueError(f"n_components={self.n_components} invalid for n_features={n_features}, "
                             "need more rows than columns for IncrementalPCA processing.")
        first = self.components is None
        if first:
            self._seen = torch.tensor([0], device=X.device)
        mean, var, total = _mean_and_var(X, self._mean, self._var, self._seen)
        if first:
            X -= mean
        else:
            batch_mean = torch.mean(X, dim=0)
            X -= batch_mean
            correction = torch.sqrt((self._seen.double() / total) * n_samples) * (self._mean - batch_mean)
            X = torch.vstack((self.singular_values.view((-1, 1)) * self.components, X, correction))
        with torch.random.fork_rng(enabled=True):
            torch.manual_seed(42)
            U, S, V = torch.svd_lowrank(X, q=2 * self.n_components, niter=4)
        U, Vt = _flip_signs(U, V.mH)
        self._seen, self._mean, self._var = total, mean, var
        self.components = Vt[: self.n_components]
        self.singular_values = S[: self.n_components]
        self.explained_variance_ratio = (S**2 / torch.sum(var * total))[: self.n_components]


def _mean_and_var(X: Tensor, last_mean, last_var, last_count):
    """Running column mean and variance (float64), sklearn's ``_incremental_mean_and_var``."""
    if X.shape[0] == 0:
        return last_mean, last_var, last_count
    new_count = torch.tensor([X.shape[0]], device=X.device)
    count = last_count + new_count
    last_sum = torch.zeros(X.shape[1], dtype=torch.float64, device=X.device) if last_mean is None \
        else last_mean * last_count
    new_sum = X.sum(dim=0, dtype=torch.float64)
    mean = (last_sum + new_sum) / count
    centred = X - new_sum / new_count
    correction = centred.sum(dim=0, dtype=torch.float64).square()
    centred.square_()
    unnormalised = centred.sum(dim=0, dtype=torch.float64)
    unnormalised -= correction / new_count
    if last_var is None:
        return mean, unnormalised / count, count
    ratio = last_count.double() / new_count
    unnormalised = last_var * last_count + unnormalised + ratio / count * (last_sum / ratio - new_sum).square()
    return mean, unnormalised / count, count


def _flip_signs(u: Tensor, v: Tensor):
    """Deterministic signs: each right singular vector's largest-magnitude entry positive."""
    signs = torch.sign(v[range(v.shape[0]), torch.argmax(torch.abs(v), dim=1)])
    u *= signs[: u.shape[1]].view(1, -1)
    v *= signs.view(-1, 1)
    return u, v


# ---- ranks across layers ----

def rank_distribution(ratios: Mapping[str, Tensor], layer_svd: Mapping[str, str], same_input: Mapping[str, str],
                      budget: int, max_components: Mapping[str, int]) -> dict[str, int]:
    """The ``budget`` (sum of the configured ranks) largest explained-variance ratios across all
    layers, each layer getting as many as it holds; layers that share another's input read its
    ratios, and the layer that owns the SVD gets the larger count of the two."""
    keys, values = zip(*[(layer, c) for layer, owner in layer_svd.items()
                         for c in ratios[owner][: max_components[owner]]])
    order = torch.stack(values).argsort(descending=True)
    counts = Counter([keys[i] for i in order[:budget]])
    counts = {layer: counts.get(layer, 0) for layer in layer_svd}
    for layer, owner in same_input.items():
        if counts[owner] < counts[layer]:
            counts[owner], counts[layer] = counts[layer], counts[owner]
    return counts


def _input_hash(x: Tensor) -> int:
    return hash(tuple(x.view(-1).tolist()))


LayerInputsFn = Union[Callable, Mapping[str, Callable], None]  # one for all layers, by layer name, or None
PEFT_PREFIX = "base_model.model."  # PEFT's module names on a PeftModel; fxpeft's are the base model's


def forward_fn_dict(model, inputs):
    return model(**inputs)


def _device(model: nn.Module):
    """Where the model's parameters are (meta ones aside): inputs are moved there, as PEFT does."""
    devices = list({p.device for p in model.parameters() if p.device.type != "meta"})
    if len(devices) > 1:
        warnings.warn(f"Could not determine device, model has multiple devices: {devices}")
        return None
    return devices[0] if devices else None


def _to_device(inputs, device):
    if device is None:
        return inputs
    if hasattr(inputs, "to"):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return type(inputs)({k: _to_device(v, device) for k, v in inputs.items()})
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to_device(v, device) for v in inputs)
    warnings.warn(f"input of type {type(inputs)} could not be moved to the correct device")
    return inputs


def _gathered(x: Tensor) -> Tensor:
    """Every rank's rows (PEFT's ``gather_layer_inputs``: padded to the largest count, all-gathered, cut)."""
    world = dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    sizes = [int(size) for size in sizes]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes)], dim=0)


def _layer_fns(prepare_layer_inputs_fn, names) -> dict[str, Callable]:
    """Each layer's ``prepare_layer_inputs_fn``: one for all, or PEFT's mapping by layer name (the
    layers it leaves out: every position)."""
    if not isinstance(prepare_layer_inputs_fn, Mapping):
        return dict.fromkeys(names, prepare_layer_inputs_fn or flat_layer_input)
    fns = {key.removeprefix(PEFT_PREFIX): fn for key, fn in prepare_layer_inputs_fn.items()}  # PEFT's names too
    unknown = [k for k in fns if k not in names]
    if unknown:
        raise ValueError("prepare_layer_inputs_fn is a mapping but the following module names were not found in the "
                         f"model: {unknown}")
    return {name: fns.get(name) or flat_layer_input for name in names}


@torch.no_grad()
def eva_state_dict(model: nn.Module, dataloader: Iterable, ranks: Mapping[str, int], peft_config: LoraConfig,
                   forward_fn: Callable = forward_fn_dict,
                   prepare_model_inputs_fn: Optional[Callable] = lm_token_mask,
                   prepare_layer_inputs_fn: LayerInputsFn = lm_layer_tokens,
                   gather_distributed_inputs: bool = True, show_progress_bar: bool = False,
                   max_batches: Optional[int] = None) -> dict[str, Tensor]:
    """``{layer: A}`` for the layers named in ``ranks`` (name → configured rank; modules whose
    forward hooks fire when ``forward_fn(model, batch)`` runs), as PEFT's ``get_eva_state_dict``
    computes it with ``peft_config.eva_config``.

    The first batch is run once to find layers fed the same input (one SVD serves them); then
    batches cycle until all components each layer is currently given have converged.
    ``prepare_model_inputs_fn(batch, peft_config)`` and ``prepare_layer_inputs_fn(layer_input,
    prepared, name)`` choose the rows (defaults: language modelling's real tokens; ``None``:
    every position). ``max_batches``: give up (ValueError) after that many SVD batches; PEFT has
    no such bound and runs until convergence.
    """
    config = peft_config.eva_config or EvaConfig()
    if not isinstance(dataloader, Iterable) or not hasattr(dataloader, "__len__"):
        raise TypeError(f"dataloader must be a sized iterable of batches (a DataLoader or a list), got "
                        f"{type(dataloader).__name__}: EVA reads the first batch twice and cycles through the data.")
    if len(dataloader) == 0:
        raise ValueError("dataloader is empty")
    if not ranks:
        raise ValueError("EVA found no layer to initialise: no targeted nn.Linear / Conv1D layer (PEFT's EVA leaves "
                         "embedding and conv layers to the default init).")
    if dist.is_initialized() and gather_distributed_inputs:
        warnings.warn("torch.distributed is initialized and `gather_distributed_inputs` is True, therefore EVA "
                      "initialization will gather tensors from all ranks. Ensure the model does not receive the same "
                      "inputs on different ranks.")
    gather = dist.is_initialized() and gather_distributed_inputs
    # the model's module order, as PEFT walks it (it decides ties between equal ratios)
    ranks = {name: ranks[name] for name, _ in model.named_modules() if name in ranks}
    layer_fns = _layer_fns(prepare_layer_inputs_fn, list(ranks))

    def rows(name, args, marks):
        x = layer_fns[name](args, marks, name)
        return _gathered(x) if gather else x
    rho = config.rho
    if rho > 1000:  # PEFT's cap for unusually high rho
        rho = min(rho, max(max(p.shape) for p in model.parameters()) // peft_config.r)
    max_components = {name: round(r * rho) for name, r in ranks.items()}
    budget = sum(ranks.values())
    device = _device(model)

    def prepared(batch):
        return prepare_model_inputs_fn(batch, peft_config) if prepare_model_inputs_fn is not None else deepcopy(batch)

    with _evaluating(model):
        batch = _to_device(next(iter(dataloader)), device)
        marks, hashes = prepared(batch), {}

        def hashing(name):
            def hook(module, args, output):
                hashes.setdefault(name, _input_hash(rows(name, args, marks).cpu()))
            return hook
        handles = {name: model.get_submodule(name).register_forward_hook(hashing(name)) for name in ranks}
        try:
            forward_fn(model, batch)
        finally:
            for handle in handles.values():
                handle.remove()
        silent = [name for name in ranks if name not in hashes]
        if silent:
            raise ValueError(f"EVA: the layers {silent[:4]}{' …' if len(silent) > 4 else ''} received no input while "
                             "forward_fn ran the first batch; check forward_fn and the model's inputs.")
        groups = defaultdict(list)
        for name in ranks:
            groups[hashes[name]].append(name)
        same_input = {}
        for names in (g for g in groups.values() if len(g) > 1):
            same_input.update({name: names[0] for name in names[1:]})
            widest = max(max_components[n] for n in names)
            max_components.update({n: widest for n in names})

        svds = {name: IncrementalSVD(max_components[name], config.tau) for name in ranks if name not in same_input}
        current = {"marks": marks}

        def fitting(name):
            def hook(module, args, output):
                svds[name].update(rows(name, args, current["marks"]))
            return hook
        handles = {name: None for name in svds}
        layer_svd = {**{name: name for name in svds}, **same_input}
        converged = {name: False for name in svds}
        ranks_now = dict(max_components)
        progress = _progress(show_progress_bar)
        try:
            for name in svds:
                handles[name] = model.get_submodule(name).register_forward_hook(fitting(name))
            for step, batch in enumerate(cycle(dataloader)):
                batch = _to_device(batch, device)
                current["marks"] = prepared(batch)
                for name, svd in svds.items():
                    done = bool(torch.all(svd.converged[: ranks_now[name]]))
                    if done and not converged[name] and handles[name] is not None:
                        handles[name].remove()
                        handles[name], converged[name] = None, True
                    elif converged[name] and not done:
                        handles[name] = model.get_submodule(name).register_forward_hook(fitting(name))
                        converged[name] = False
                if progress is not None:
                    progress.set_description(f"{sum(converged.values())}/{len(converged)} layers have converged")
                    progress.update()
                if all(converged.values()):
                    break
                if max_batches is not None and step >= max_batches:
                    raise ValueError(f"EVA did not converge within {max_batches} batches")
                forward_fn(model, batch)
                if any(svd.components is None for svd in svds.values()):
                    continue
                ratios = {name: svd.explained_variance_ratio for name, svd in svds.items()}
                ranks_now = rank_distribution(ratios, layer_svd, same_input, budget, max_components)
        finally:
            for handle in handles.values():
                if handle is not None:
                    handle.remove()
            if progress is not None:
                progress.close()

    out = {}
    for name, rank in ranks_now.items():
        svd = svds[layer_svd[name]]
        if not torch.all(svd.converged[:rank]):
            raise ValueError(f"Layer {name} has not converged but was assigned rank {rank}.")
        a = svd.components[:rank]
        if config.whiten:
            # in place on a view, as PEFT does: layers sharing one SVD share these rows, each
            # divides them again, and all end up divided once per layer of the group
            a /= svd.singular_values[:rank].sqrt().reshape(-1, 1)
        out[name] = a if device is None else a.to(device)
    return out


@contextlib.contextmanager
def _evaluating(model: nn.Module):
    """The model in eval mode inside, in its own mode again after, whatever happens."""
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


def _progress(show: bool):
    if not show or (dist.is_initialized() and dist.get_rank() != 0):
        return None
    from tqdm import tqdm
    return tqdm(position=0, leave=False)


def eva_layer_inits(eva: Mapping[str, Tensor], ranks: Mapping[str, int], alphas: Mapping[str, float],
                    adjust_scaling_factors: bool = True) -> dict[str, tuple[int, float, Optional[Tensor]]]:
    """Per adapted layer: (rank, lora_alpha, A) as ``initialize_lora_eva_weights`` sets them. Rank
    0: no adapter on that layer. A layer missing from ``eva`` (PEFT: embedding, conv, attention)
    keeps its rank and gets the default init (A ``None`` here). Scaling: with
    ``adjust_scaling_factors``, alpha · new_rank / r, so alpha/r's scale follows the rank."""
    out = {}
    for name, r in ranks.items():
        alpha = alphas[name]
        if name not in eva:
            out[name] = (r, alpha, None)
            continue
        a = eva[name]
        rank = a.size(0)
        if rank != r and rank != 0 and adjust_scaling_factors:
            alpha *= rank / r
        out[name] = (rank, alpha, a)
    return out


# ---- the API: PEFT's get_eva_state_dict and initialize_lora_eva_weights ----


def _is_transformed(model) -> bool:
    from fxpeft.module import PeftGraphModule
    return isinstance(model, PeftGraphModule)


def linear_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """The nn.Linear / Conv1D layers of a model without adapters that ``config`` targets (PEFT's EVA
    and CorDA preprocessing read these on the plain model)."""
    targets = config.target_modules
    if targets is None or (isinstance(targets, str) and targets.lower() == "all-linear"):
        raise ValueError(f"target_modules={targets!r} cannot be resolved on a model fxpeft has not transformed: name "
                         "the layers (a list or a regex), or pass the module fxpeft.transform returned, where "
                         "None and 'all-linear' resolve as when adapting.")
    registry = registry_of(model)
    return [name for name, module in model.named_modules() if isinstance(module, (nn.Linear, Conv1D))
            and not registry.is_adapter_state(name) and is_targeted(config, name)]


def _lora_linear(module: nn.Module, adapter: str) -> bool:
    """A linear layer holding the adapter (PEFT's EVA skips embedding and conv LoRA layers; it takes
    every LoRA layer, whichever adapters it holds: the same while the model has one adapter)."""
    holder = module._modules.get("lora_A")
    return holder is not None and isinstance(holder._modules.get(adapter), nn.Linear)


def _eva_config_of(peft_config, who: str) -> LoraConfig:
    if not isinstance(peft_config, LoraConfig):
        raise TypeError(f"{who} takes an fxpeft.LoraConfig, got {type(peft_config).__name__}.")
    if peft_config.eva_config is None:
        raise ValueError(f"{who} reads peft_config.eva_config, which is None: pass a LoraConfig with "
                         "init_lora_weights='eva' (its eva_config defaults to EvaConfig()).")
    return peft_config


@torch.no_grad()
def get_eva_state_dict(model: nn.Module, dataloader: Iterable, peft_config: Optional[LoraConfig] = None,
                       forward_fn: Optional[Callable] = forward_fn_dict,
                       prepare_model_inputs_fn: Optional[Callable] = lm_token_mask,
                       prepare_layer_inputs_fn: LayerInputsFn = lm_layer_tokens,
                       adapter_name: str = "default", gather_distributed_inputs: bool = True,
                       show_progress_bar: bool = True, max_batches: Optional[int] = None) -> dict[str, Tensor]:
    """PEFT's ``get_eva_state_dict``: ``{layer name: A}`` from the layers' inputs over ``dataloader``.

    ``model``: a transformed module (every linear layer holding LoRA adapters, run with its adapters
    disabled; ``peft_config`` defaults to the adapter's) or a plain model with ``peft_config`` (its
    targeted nn.Linear / Conv1D layers). Names are the base model's, as fxpeft's module paths are.
    The other arguments are PEFT's (see its docs); ``max_batches`` bounds the loop, which PEFT
    runs until convergence.
    """
    transformed = _is_transformed(model)
    if peft_config is None:
        if not transformed:
            raise ValueError("peft_config is required if model is not a PeftModel (a module fxpeft.transform returned)")
        if adapter_name not in model.peft_config:
            raise ValueError(f"No adapter named {adapter_name!r} (adapters: {sorted(model.peft_config)}).")
        peft_config = model.peft_config[adapter_name]
    peft_config = _eva_config_of(peft_config, "get_eva_state_dict")
    names = ([name for name, module in model.named_modules() if _lora_linear(module, adapter_name)] if transformed
             else linear_targets(model, peft_config))
    ranks = {name: pattern_value(peft_config.rank_pattern, name, peft_config.r) for name in names}
    run = dict(forward_fn=forward_fn or forward_fn_dict, prepare_model_inputs_fn=prepare_model_inputs_fn,
               prepare_layer_inputs_fn=prepare_layer_inputs_fn, gather_distributed_inputs=gather_distributed_inputs,
               show_progress_bar=show_progress_bar, max_batches=max_batches)
    if not transformed:
        return eva_state_dict(model, dataloader, ranks, peft_config, **run)
    from fxpeft.lifecycle import disable_adapters
    with disable_adapters(model), site_hooks(model):
        return eva_state_dict(model, dataloader, ranks, peft_config, **run)


MIN_TARGETS_TO_SHORTEN = 20  # PEFT's MIN_TARGET_MODULES_FOR_OPTIMIZATION


def minimal_targets(targets: list[str], others: list[str]) -> set[str]:
    """PEFT's ``_find_minimal_target_modules``: the fewest dotted suffixes that match every name in
    ``targets`` and none in ``others`` (shortest suffix of each name first, names in sorted order).
    Unlike PEFT, which leaves them out of ``others``, the layers EVA gave rank 0 count as others
    here, so the suffixes never bring their adapters back on reload."""
    def suffixes(name):
        parts = name.split(".")
        return [".".join(parts[i:]) for i in range(len(parts))][::-1]
    taken = {suffix for name in others for suffix in suffixes(name)}
    chosen: set[str] = set()
    for name, candidates in sorted(((name, suffixes(name)) for name in set(targets)), key=lambda item: item[1]):
        for suffix in candidates:
            if suffix in chosen or suffix in taken:
                continue
            if not any(name.endswith("." + c) for c in chosen):
                chosen.add(suffix)
                break
    return chosen or set(targets)


@torch.no_grad()
def initialize_lora_eva_weights(model: nn.Module, dataloader: Optional[Iterable] = None,
                                eva_state_dict: Optional[dict] = None,
                                forward_fn: Optional[Callable] = forward_fn_dict,
                                prepare_model_inputs_fn: Optional[Callable] = lm_token_mask,
                                prepare_layer_inputs_fn: LayerInputsFn = lm_layer_tokens,
                                adapter_name: str = "default", gather_distributed_inputs: bool = True,
                                show_progress_bar: bool = True, max_batches: Optional[int] = None) -> None:
    """PEFT's ``initialize_lora_eva_weights`` on a module ``fxpeft.transform`` returned with
    ``LoraConfig(init_lora_weights="eva")``: computes ``get_eva_state_dict`` (or takes
    ``eva_state_dict``, keyed by the base model's names or PEFT's ``base_model.model.`` ones), then
    builds the adapter again with the redistributed ranks and copies each A in. The adapter's config
    gets PEFT's ``target_modules`` (the layers that keep an adapter), ``rank_pattern`` and
    ``alpha_pattern``. Linear layers missing from the state (and embeddings) keep their rank and the
    default init, with PEFT's warning. All or nothing: on error the module is as it was.
    """
    from fxpeft.lifecycle import _attach, delete_adapter, transaction
    if not _is_transformed(model):
        raise ValueError("model must be a PeftModel: pass the module fxpeft.transform returned (with "
                         "LoraConfig(init_lora_weights='eva')).")
    if adapter_name not in model.peft_config:
        raise ValueError(f"No adapter named {adapter_name!r} (adapters: {sorted(model.peft_config)}).")
    if len(model._fxpeft_active) > 1:
        raise ValueError("`initialize_lora_eva_weights` currently only works with a single active adapter")
    config = model.peft_config[adapter_name]
    if not isinstance(config, LoraConfig) or config.init_lora_weights != "eva":
        raise ValueError("`initialize_lora_eva_weights` can only be used with `init_lora_weights='eva'` (adapter "
                         f"{adapter_name!r} has init_lora_weights={getattr(config, 'init_lora_weights', None)!r}).")
    if eva_state_dict is None:
        if dataloader is None:
            raise ValueError("dataloader is required if eva_state_dict is not provided")
        eva_state_dict = get_eva_state_dict(model, dataloader, forward_fn=forward_fn,
                                            prepare_model_inputs_fn=prepare_model_inputs_fn,
                                            prepare_layer_inputs_fn=prepare_layer_inputs_fn, adapter_name=adapter_name,
                                            gather_distributed_inputs=gather_distributed_inputs,
                                            show_progress_bar=show_progress_bar, max_batches=max_batches)
    eva = {key.removeprefix(PEFT_PREFIX): value for key, value in eva_state_dict.items()}
    layers = {name: module for name, module in model.named_modules() if adapter_name in module._modules.get(
        "lora_A", {}) or adapter_name in module._modules.get("lora_embedding_A", {})}
    for name, a in eva.items():
        holder = layers[name]._modules.get("lora_A") if name in layers else None
        if holder is None or not isinstance(holder[adapter_name], nn.Linear):
            raise ValueError(f"eva_state_dict names {name!r}, which is no linear layer holding adapter "
                             f"{adapter_name!r}: compute it with get_eva_state_dict on this model and config.")
        if a.dim() != 2 or a.shape[1] != holder[adapter_name].in_features:
            raise ValueError(f"eva_state_dict[{name!r}] has shape {tuple(a.shape)}; that layer takes "
                             f"{holder[adapter_name].in_features} input features (rank × in expected).")
    ranks = {name: pattern_value(config.rank_pattern, name, config.r) for name in layers}
    alphas = {name: pattern_value(config.alpha_pattern, name, config.lora_alpha) for name in layers}
    inits = eva_layer_inits(eva, ranks, alphas, config.eva_config.adjust_scaling_factors)
    missing = [name for name, (_, _, a) in inits.items() if a is None]
    kept = [name for name, (rank, _, a) in inits.items() if a is not None and rank > 0] + missing
    if not kept:
        raise ValueError("EVA gave every layer rank 0: no adapter would remain.")
    stored = dataclasses.replace(  # what PEFT writes into the adapter's config
        config, target_modules=kept,
        rank_pattern={name: inits[name][0] for name in kept if inits[name][0] != config.r},
        alpha_pattern={name: inits[name][1] for name in kept if inits[name][1] != config.lora_alpha})
    attached = stored  # the exact list; the stored config may say it shorter, as PEFT's does
    if len(kept) >= MIN_TARGETS_TO_SHORTEN:
        registry = registry_of(model)
        others = [name for name, _ in model.named_modules()
                  if name and name not in kept and not registry.is_adapter_state(name)]
        stored = dataclasses.replace(stored, target_modules=sorted(minimal_targets(kept, others)))
    order, active = list(model.peft_config), list(model._fxpeft_active)
    with transaction(model):
        delete_adapter(model, adapter_name)
        _attach(model, attached, adapter_name)  # init "eva": nn.Linear's A (replaced below), zero B
        configs = {**model.peft_config, adapter_name: stored}
        model.peft_config.clear()
        model.peft_config.update({name: configs[name] for name in order})
        model._fxpeft_active[:] = active
        for name, (rank, _, a) in inits.items():
            if a is not None and rank > 0:
                model.get_submodule(name).lora_A[adapter_name].weight.copy_(a)
        model.relower()
    if missing:
        warnings.warn("the following layers were initialized with init_lora_weights=True because they were not found "
                      f"in the eva state_dict: {missing}\ncurrently the following lora modules are not supported by "
                      "EVA: embedding, convolution and nn.MultiheadAttention layers")
