"""EVA (Explained Variance Adaptation): LoRA's A from the top right-singular vectors of each
layer's inputs, ranks redistributed across layers by explained variance; PEFT 0.21.2's numerics
(``peft.tuners.lora.eva`` with its ``IncrementalPCA``), without PEFT.

``eva_state_dict(model, dataloader, ranks, config)`` runs forwards over the data with hooks on the
named layers' inputs, one incremental SVD per distinct input, until every component a layer is
given has converged; it returns ``{layer name: A (rank × in)}``. ``eva_layer_inits`` then says, per
layer, which rank and alpha the adapter gets (``initialize_lora_eva_weights``' rewrite of the
config: rank 0 drops the adapter; B starts at zero).

Not here: gathering inputs across ranks under torch.distributed (PEFT's ``gather_distributed_inputs``).
"""
from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from copy import deepcopy
from itertools import cycle
from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["EvaConfig", "IncrementalSVD", "rank_distribution", "eva_state_dict", "eva_layer_inits",
           "lm_token_mask", "lm_layer_tokens", "flat_layer_input"]


@dataclasses.dataclass
class EvaConfig:
    """PEFT's ``EvaConfig``."""
    rho: float = 2.0  # a layer may get up to round(r · rho) components
    tau: float = 0.99  # cosine similarity between successive components that counts as converged
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_scaling_factors: bool = True

    def __post_init__(self):
        if self.rho < 1.0:
            raise ValueError("`rho` must be >= 1.0")
        if self.tau < 0.0 or self.tau > 1.0:
            raise ValueError("`tau` must be between 0.0 and 1.0.")


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


def lm_token_mask(model_input, config: EvaConfig) -> Tensor:
    """Language modelling: the (batch, position) indices of real tokens: attention mask, and labels
    other than ``label_mask_value`` when ``use_label_mask``."""
    if not isinstance(model_input, dict):
        raise TypeError("When using `prepare_model_inputs_fn_language_modeling` inputs must be a dictionary")
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


def _forward_fn_dict(model, inputs):
    return model(**inputs)


@torch.no_grad()
def eva_state_dict(model: nn.Module, dataloader: Iterable, ranks: Mapping[str, int], config: EvaConfig,
                   forward_fn: Callable = _forward_fn_dict,
                   prepare_model_inputs_fn: Optional[Callable] = lm_token_mask,
                   prepare_layer_inputs_fn: Optional[Callable] = lm_layer_tokens,
                   r: Optional[int] = None, max_batches: Optional[int] = None) -> dict[str, Tensor]:
    """``{layer: A}`` for the layers named in ``ranks`` (name → configured rank; PEFT's targets are
    ``nn.Linear`` / ``Conv1D`` modules), as PEFT's ``get_eva_state_dict`` computes it.

    The first batch is run once to find layers fed the same input (one SVD serves them); then
    batches cycle until all components each layer is currently given have converged.
    ``prepare_model_inputs_fn(batch, config)`` and ``prepare_layer_inputs_fn(layer_input,
    prepared, name)`` choose the rows (defaults: language modelling's real tokens; ``None``:
    every position). ``r``: the config's rank, for PEFT's cap on rho above 1000 (default: the
    smallest in ``ranks``). ``max_batches``: give up (ValueError) after that many SVD batches;
    PEFT has no such bound and runs until convergence.
    """
    if len(dataloader) == 0:
        raise ValueError("dataloader is empty")
    # the model's module order, as PEFT walks it (it decides ties between equal ratios)
    ranks = {name: ranks[name] for name, _ in model.named_modules() if name in ranks}
    layer_fn = prepare_layer_inputs_fn or flat_layer_input
    rho = config.rho
    if rho > 1000:  # PEFT's cap for unusually high rho
        rho = min(rho, max(max(p.shape) for p in model.parameters()) // (r or min(ranks.values())))
    max_components = {name: round(r * rho) for name, r in ranks.items()}
    budget = sum(ranks.values())
    training = model.training
    model.eval()

    def prepared(batch):
        return prepare_model_inputs_fn(batch, config) if prepare_model_inputs_fn is not None else deepcopy(batch)

    batch = next(iter(dataloader))
    marks, hashes = prepared(batch), {}

    def hashing(name):
        def hook(module, args, output):
            hashes.setdefault(name, _input_hash(layer_fn(args, marks, name).cpu()))
        return hook
    handles = [model.get_submodule(name).register_forward_hook(hashing(name)) for name in ranks]
    forward_fn(model, batch)
    for handle in handles:
        handle.remove()
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
            svds[name].update(layer_fn(args, current["marks"], name))
        return hook
    handles = {name: None for name in svds}
    layer_svd = {**{name: name for name in svds}, **same_input}
    converged = {name: False for name in svds}
    ranks_now = dict(max_components)
    try:
        for name in svds:
            handles[name] = model.get_submodule(name).register_forward_hook(fitting(name))
        for step, batch in enumerate(cycle(dataloader)):
            current["marks"] = prepared(batch)
            for name, svd in svds.items():
                done = bool(torch.all(svd.converged[: ranks_now[name]]))
                if done and not converged[name] and handles[name] is not None:
                    handles[name].remove()
                    handles[name], converged[name] = None, True
                elif converged[name] and not done:
                    handles[name] = model.get_submodule(name).register_forward_hook(fitting(name))
                    converged[name] = False
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
    model.train(training)

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
        out[name] = a
    return out


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
