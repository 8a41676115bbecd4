"""Trainable tokens: chosen rows of an embedding matrix are trained, the rest stays frozen.

PEFT's ``TrainableTokensConfig`` (a method of its own) and ``LoraConfig(trainable_token_indices=...)``
(LoRA plus trainable tokens on the embedding) share this state and rewrite. The weight-map form
(fxpeft/forms.py): the site computes what the op computes with

    W' = W with rows idx replaced by the adapter's rows    (``index_copy``, as PEFT's forward)

but from the op's own output, without copying W: an embedding's output gets the rows where the ids are
in idx, a tied head's outputs for idx are computed from the rows.

State (beside the embedding module, PEFT's names):
    <path>.trainable_tokens_delta.<adapter>     the rows (k, dim), trainable; PEFT's key
                                                ``<path>.trainable_tokens_delta`` (LoRA:
                                                ``<path>.token_adapter.trainable_tokens_delta``)
    <path>.trainable_tokens_gate.<adapter>      :class:`TokenGate`: the indices, the original rows
                                                (to unmerge), the gate; non-persistent
Tied weights: where the model ties its input embedding to other layers (``lm_head``) and its
config says ``tie_word_embeddings``, those layers compute with the same rows, as PEFT's tied
adapters: their gate points at the embedding's rows (``source``). The standalone method also saves
the tied layer's key (PEFT's tied layer shares the embedding's ParameterDict, so its state dict
holds it twice); LoRA's wrapper does not.
Merging writes the rows into the weight (``index_copy``); unmerging writes the originals back.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

from fxpeft.canonical import Site
from fxpeft.configs import PeftConfigBase
from fxpeft.forms import AdapterGate, chained, child_dict, weight_map
from fxpeft.registry import Method, register_method, registry_of
from fxpeft.rewrite import Lowering, samples_of
from fxpeft.targets import input_embedding_path, tied_to_embedding

aten = torch.ops.aten

DELTA, GATE = "trainable_tokens_delta", "trainable_tokens_gate"


@dataclass
class TrainableTokensConfig(PeftConfigBase):
    """PEFT's ``TrainableTokensConfig``: ``token_indices`` rows of the embedding(s) ``target_modules``
    (default: the model's input embedding, else ``embed_tokens``) become trainable.
    ``init_weights=False`` starts them random instead of at the embedding's rows."""

    token_indices: list[int] = field(default_factory=list)
    target_modules: Optional[Union[list[str], str]] = None
    init_weights: bool = True

    peft_type = "TRAINABLE_TOKENS"

    def __post_init__(self):
        super().__post_init__()
        self.token_indices = check_indices(self.token_indices, "TrainableTokensConfig.token_indices")


def check_indices(indices, what: str) -> list[int]:
    if isinstance(indices, (str, bytes)) or not hasattr(indices, "__iter__"):
        raise ValueError(f"{what} must be a list of token ids, got {indices!r}.")
    indices = list(indices)
    if not indices or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
        raise ValueError(f"{what} must be a non-empty list of token ids (ints >= 0), got {indices!r}.")
    return indices


class TokenGate(AdapterGate):
    """The gate of one adapter's rows at one site, with the row indices and the original rows (both
    non-persistent buffers). ``source``: the module path holding the rows (a tied layer reads the
    embedding's)."""

    def __init__(self, indices: list[int], original: torch.Tensor, source: str):
        super().__init__(1.0)
        self.source = source
        self.register_buffer("indices", torch.tensor(indices, dtype=torch.long, device=original.device),
                             persistent=False)
        self.register_buffer("original", original.detach().clone(), persistent=False)

    def extra_repr(self) -> str:
        return f"tokens={self.indices.numel()}, source={self.source!r}, merged={self.merged}"


def _rows_weight(module: nn.Module) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"Trainable tokens need a layer with a 2-D weight whose rows are tokens (nn.Embedding, or a "
                         f"linear output head tied to one), got {type(module).__name__}.")
    return weight


def add_tokens(module: nn.Module, path: str, indices: list[int], init_weights: bool, adapter: str) -> None:
    """The adapter's rows at the embedding ``module`` (PEFT's ``TrainableTokensLayer.update_layer``)."""
    weight = _rows_weight(module)
    if max(indices) >= weight.shape[0]:
        raise ValueError(f"Token indices {[i for i in indices if i >= weight.shape[0]]} are out of range for "
                         f"{path!r}, which has {weight.shape[0]} tokens; resize the embedding first.")
    original = weight.detach()[indices]
    values = original.clone() if init_weights else torch.randn(original.shape, dtype=weight.dtype, device=weight.device)
    child_dict(module, DELTA, nn.ParameterDict)[adapter] = nn.Parameter(values)
    child_dict(module, GATE)[adapter] = TokenGate(indices, original, path)


def tie_tokens(gm, source_path: str, adapter: str, save_tied: bool) -> list[str]:
    """Layers tied to the input embedding at ``source_path`` compute with its rows (PEFT ties them when
    the model ties its weights: ``tie_word_embeddings`` and ``_tied_weights_keys``)."""
    paths = tied_to_embedding(gm) if input_embedding_path(gm) == source_path else []
    source = gm.get_submodule(source_path)
    for path in paths:
        module = gm.get_submodule(path)
        gate = source._modules[GATE][adapter]
        child_dict(module, GATE)[adapter] = TokenGate(gate.indices.tolist(), gate.original, source_path)
        if save_tied:  # PEFT's tied standalone layer shares the ParameterDict: its state dict repeats the rows
            child_dict(module, DELTA, nn.ParameterDict)[adapter] = source._modules[DELTA][adapter]
    return paths


# ----------------------------------------------------------------------------- rewrite


def tokens_embedded(ids: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor, on: torch.Tensor,
                    padding_idx: int, scale_grad_by_freq: bool) -> torch.Tensor:
    """An embedding's output ``y`` with each token of ``indices`` given its row of ``rows`` where ``on`` (a
    0-dim gate) is nonzero: what the op computes on the weight with those rows replaced,
    without copying the weight. The rows' gradients are the op's too: none for ``padding_idx``, divided
    by the token's count in ``ids`` with ``scale_grad_by_freq``."""
    match = ids.unsqueeze(-1) == indices  # (..., k)
    row = match.int().argmax(-1).flatten()  # each position's row (any, where its token has none: masked below)
    value = rows.index_select(0, row).view(*ids.shape, rows.shape[-1]).to(y.dtype)
    if padding_idx >= 0:
        value = torch.where((ids == padding_idx).unsqueeze(-1), value.detach(), value)
    if scale_grad_by_freq:  # value stays, its gradient scales by 1 / the token's count (at least 1: finite)
        counts = match.flatten(0, -2).sum(0).clamp(min=1).index_select(0, row).view(*ids.shape, 1)
        value = value.detach() + (value - value.detach()) / counts.to(value.dtype)
    return torch.where(match.any(-1, keepdim=True) & (on > 0), value, y)


def tokens_projected(x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor, on: torch.Tensor,
                     bias: Optional[torch.Tensor]) -> torch.Tensor:
    """A linear layer's output ``y`` (its weight tied to the embedding) with the outputs of ``indices`` computed
    from ``rows`` where ``on`` is nonzero: the op on the weight with those rows replaced, without copying it."""
    value = torch.nn.functional.linear(x, rows.to(x.dtype), None if bias is None else bias.index_select(0, indices))
    return y.index_copy(-1, indices, torch.where(on > 0, value.to(y.dtype), y.index_select(-1, indices)))


def _rows(lw: Lowering, site: Site, module: nn.Module, adapter: str):
    source = module._modules[GATE][adapter].source
    return lw.attr(f"{source}.{DELTA}.{adapter}"), lw.attr(f"{site.path}.{GATE}.{adapter}.indices")


def _tokens(lw: Lowering, site: Site, module: nn.Module, adapter: str, y, on):
    """``y`` with the adapter's rows (where ``on``), from the op's input and output (the op runs as it is)."""
    rows, indices = _rows(lw, site, module, adapter)
    if site.kind == "embedding":  # aten.embedding(weight, ids, padding_idx=-1, scale_grad_by_freq=False, …)
        args, kwargs = site.node.args, site.node.kwargs
        padding_idx = args[2] if len(args) > 2 else kwargs.get("padding_idx", -1)
        by_freq = args[3] if len(args) > 3 else kwargs.get("scale_grad_by_freq", False)
        return lw.call(tokens_embedded, site.input, y, indices, rows, on, padding_idx, by_freq)
    if site.fan_in_fan_out:
        raise NotImplementedError(f"Trainable tokens at {site.path}: its weight is stored (in, out), not as an "
                                  "embedding's rows.")
    return lw.call(tokens_projected, site.input, y, indices, rows, on, lw.attr(site.bias) if site.bias else None)


def lower_site(lw: Lowering, site: Site, module: nn.Module, adapters: list[str]):
    """Dense graph: every adapter's rows in turn (gated), a later adapter's over an earlier one's. Mixed
    graph: each sample its adapter's rows. Either way from the op's output: the weight is never copied
    (PEFT's layer copies it with the rows replaced at every call)."""
    out = site.output
    for adapter in adapters:
        on = lw.attr(f"{site.path}.{GATE}.{adapter}.value")
        if not lw.mixed:
            out = _tokens(lw, site, module, adapter, out, lw.call(aten.mul.Tensor, on, lw.gate(adapter)))
        else:
            chosen = _tokens(lw, site, module, adapter, out, on)
            out = lw.call(per_sample, lw.sample_index, lw.adapter_order.index(adapter), chosen, out)
    return out


def per_sample(index: torch.Tensor, slot: int, chosen: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    return torch.where(samples_of(index, slot, chosen), chosen, other)


def fold(gm, site: Site, module: nn.Module, adapter: str, weight, bias, sign):
    """Merging writes the rows into the weight, unmerging the original rows (PEFT's merge/unmerge)."""
    gate = module._modules[GATE][adapter]
    rows = gm.get_submodule(gate.source)._modules[DELTA][adapter] if sign > 0 else gate.original
    return weight.index_copy(0, gate.indices.to(weight.device), rows.detach().to(weight)), bias


def token_adapters(module: nn.Module) -> list[str]:
    holder = module._modules.get(GATE)
    return list(holder.keys()) if holder is not None else []


def describe(module: nn.Module, adapter: str) -> str:
    return f"tokens={module._modules[GATE][adapter].indices.numel()}"


# ----------------------------------------------------------------------------- the standalone method


def _resolve(gm, sites, config: TrainableTokensConfig) -> TrainableTokensConfig:
    if config.target_modules is not None:
        return config
    return dataclasses.replace(config, target_modules=input_embedding_path(gm) or "embed_tokens")


def _create(module: nn.Module, site: Site, weight, config: TrainableTokensConfig, adapter: str) -> None:
    add_tokens(module, site.path, config.token_indices, config.init_weights, adapter)


def _attach(base_attach):
    def attach(gm, sites, config, adapter):
        paths = base_attach(gm, sites, config, adapter)
        for path in list(paths):
            paths += [p for p in tie_tokens(gm, path, adapter, save_tied=True) if p not in paths]
        return paths
    return attach


_FORM = weight_map(name="trainable_tokens", config_type=TrainableTokensConfig, create=_create, lower_site=lower_site,
                   fold=fold, containers=(DELTA,), gates=GATE, kinds=("embedding",), phase=40, describe=describe,
                   resolve_config=_resolve, kept_kinds=("embedding", "linear"))  # linear: a head tied to the embedding
METHOD = register_method(dataclasses.replace(_FORM, attach=_attach(_FORM.attach)))


# ----------------------------------------------------------------------------- LoRA's trainable_token_indices


def lora_token_targets(gm, config) -> dict[str, list[int]]:
    """``trainable_token_indices`` as {module path: indices}: a list is for the input embedding
    (PEFT: ``get_input_embeddings``, else ``embed_tokens``); a dict's keys match module paths by
    suffix, as PEFT's ``_set_trainable``."""
    spec = config.trainable_token_indices
    if not isinstance(spec, dict):
        spec = {input_embedding_path(gm) or "embed_tokens": spec}
    found = {}
    for key, indices in spec.items():
        paths = [name for name, _ in gm.named_modules() if name and name.endswith(key)
                 and not registry_of(gm).is_adapter_state(name)]
        if not paths:
            raise ValueError(f"trainable_token_indices names {key!r}, which matches no module of the model; use a "
                             "module name such as 'embed_tokens' (the keys are module names, the values token ids).")
        for path in paths:
            found[path] = list(indices)
    return found


class _BothGates:
    """A module holding a LoRA adapter and that adapter's rows: merging flips both gates."""

    def __init__(self, *gates):
        self.gates = gates

    @property
    def merged(self) -> bool:
        return self.gates[0].merged

    @merged.setter
    def merged(self, value: bool) -> None:
        for gate in self.gates:
            gate.merged = value

    def refresh(self) -> None:
        for gate in self.gates:
            gate.refresh()


def with_tokens(method: Method) -> Method:
    """``method`` (one serving LoraConfig) plus PEFT's ``trainable_token_indices``: the rows live
    beside the embedding under the same adapter name, are saved under PEFT's wrapper names
    (``<path>.token_adapter.trainable_tokens_delta``) and merge with the adapter."""

    def attach(gm, sites, config, adapter):
        targets = lora_token_targets(gm, config) if config.trainable_token_indices is not None else {}
        _check_saved(gm, config)
        paths = method.attach(gm, sites, config, adapter)
        return paths + [p for p in _attach_lora_tokens(gm, config, targets, adapter) if p not in paths]

    def adapters_at(module):
        return list(dict.fromkeys([*method.adapters_at(module), *token_adapters(module)]))

    def gate(module, adapter):
        tokens = module._modules[GATE][adapter] if adapter in token_adapters(module) else None
        if adapter not in method.adapters_at(module):
            return tokens
        own = method.gate(module, adapter)
        return own if tokens is None else _BothGates(own, tokens)

    def both_fold(gm, site, module, adapter, weight, bias, sign):
        steps = []
        if adapter in token_adapters(module):
            steps.append(fold)
        if adapter in method.adapters_at(module):
            steps.append(method.fold)
        for step in steps if sign > 0 else reversed(steps):
            weight, bias = step(gm, site, module, adapter, weight, bias, sign)
        return weight, bias

    def both_describe(module, adapter):
        parts = [describe(module, adapter)] if adapter in token_adapters(module) else []
        if adapter in method.adapters_at(module) and method.describe is not None:
            parts.insert(0, method.describe(module, adapter))
        return " ".join(parts)

    # generation graphs read the rows when they run (a load between compiled generate calls: no recompile)
    return dataclasses.replace(
        method, attach=attach, adapters_at=adapters_at, gate=gate, fold=both_fold, describe=both_describe,
        lowered=chained(method.lowered, METHOD.lowered), prepare_call=chained(method.prepare_call, METHOD.prepare_call),
        containers=(*method.containers, DELTA, GATE),
        checkpoint_renames=(*method.checkpoint_renames, (f".{DELTA}", f".token_adapter.{DELTA}")))


def _check_saved(gm, config) -> None:
    saved = list(config.modules_to_save or [])
    spec = config.trainable_token_indices
    if spec is None:
        return
    for key in (spec if isinstance(spec, dict) else [input_embedding_path(gm) or "embed_tokens"]):
        if key in saved:  # PEFT's error
            raise ValueError("The embedding layer is already marked to be trained fully, either specify "
                             f'`modules_to_save=[..., "{key}", ...]` or `trainable_tokens={{\'{key}\': x}}` but not both.')


def _attach_lora_tokens(gm, config, targets: dict, adapter: str) -> list[str]:
    """PEFT's ``set_additional_trainable_modules`` for ``trainable_token_indices``: each named layer gets
    its rows; layers tied to the input embedding follow the embedding's rows where the model ties
    them, unless the config gives them other indices (then, with ``ensure_weight_tying``, an error)."""
    embedding = input_embedding_path(gm)
    source = gm._fxpeft_source
    weights_tied = bool(getattr(getattr(source, "config", None), "tie_word_embeddings", False))
    tied = set(tied_to_embedding(gm))
    mismatch, skip = False, set()
    if len(targets) > 1 and weights_tied and embedding in targets:
        tied_targets = [p for p in targets if p in tied]
        if tied_targets:
            mismatch = any(targets[p] != targets[embedding] for p in tied_targets)
            if mismatch and config.ensure_weight_tying:
                info = ", ".join(f"{p}: {targets[p]}" for p in [embedding, *tied_targets])
                raise ValueError(f"Cannot ensure weight tying when different token indices are specified for tied "
                                 f"layers. Conflicting layers: {info}. Please use the same indices for all tied layers "
                                 "or set ensure_weight_tying=False.")
            if not mismatch:
                skip = set(tied_targets)
    done = []
    for path, indices in targets.items():
        if path not in skip:
            add_tokens(gm.get_submodule(path), path, indices, True, adapter)
            done.append(path)
    if not weights_tied and config.ensure_weight_tying:
        warnings.warn("ensure_weight_tying=True but the model does not have tied weights (tie_word_embeddings=False). "
                      "Weight tying will not be applied for trainable_token_indices.")
    if embedding in done and weights_tied and (config.ensure_weight_tying or not mismatch):
        done += [p for p in tie_tokens(gm, embedding, adapter, save_tied=False) if p not in done]
    return done
