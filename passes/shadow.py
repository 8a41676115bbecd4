"""ShadowPEFT, PEFT's tuners/shadow: a small trainable network riding beside a frozen decoder.

A shadow backbone (the model's own backbone class, rebuilt smaller: ``shadow_num_hidden_layers`` layers,
optionally narrower) reads the model's input embeddings and gives the initial shadow state
``s⁰ = projection(backbone(x))``. Every wrapped decoder block ``l`` (contiguous blocks; by default all)
then sees its input corrected by the shadow state, and the state follows the block's output:

    h_in = h + α · W_up(dropout(h − s) · W_down)                          (PEFT's Eq. 2–4)
    h'   = block(h_in)
    s    = (1 − σ(G(h'))) ⊙ s + σ(G(h')) ⊙ T(h')       T, G: Linear–GELU–Linear  (Eq. 5–7)

With labels, the loss gains ``auxiliary_loss_weight`` times the shadow path's own loss on ``s⁰`` (the model's
output head for causal LMs, a trained copy of its classifier for SEQ_CLS), exposed unweighted as
``output.shadow_loss`` and ``gm.last_shadow_loss``.

Here: the backbone runs before the call, outside the graphs (``Method.fill_call_inputs``), and ``s⁰`` reaches
the top graph as the per-call input ``shadow_state`` (``gm(..., shadow_state=s)`` skips the backbone); the
rewrite (one rule on the module's own graph: around its block calls, or, in a graph left flat, around each
block's nodes by module path) adds the injections and updates. With a KV cache (generation), the backbone
keeps a cache of its own beside the model's, so each step runs it on the new tokens only. State, under PEFT's
names: ``<block>.shadow_down/up/update_transform/update_gate/dropout.<adapter>`` and, on the root,
``shadow_backbone/projection/head.<adapter>``, saved as PEFT saves them (its files name the containers'
tensors ``<container>.default.…`` whatever the adapter's name). No merging (the change depends on the input),
no per-sample adapters, one adapter acting at a time (as PEFT); ``gm.unload_shadow()`` gives the shadow
network alone.
"""
from __future__ import annotations

import copy
import functools
import inspect
import json
import os
from dataclasses import dataclass
from operator import getitem
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from fxpeft import generation
from fxpeft.canonical import innermost_module
from fxpeft.configs import PeftConfigBase
from fxpeft.forms import child_dict
from fxpeft.registry import Method, Rule, register_method, registry_of
from fxpeft.rewrite import Lowering, primary_lowering
from fxpeft.targets import is_targeted, unmatched_target_error

NAME = "shadow_state"  # the per-call input: s⁰, (batch, tokens, hidden)
LAYER_PARTS = ("shadow_down", "shadow_up", "shadow_update_transform", "shadow_update_gate", "shadow_dropout")
ROOT_PARTS = ("shadow_backbone", "shadow_projection", "shadow_head")
SAVED_AS = "default"  # the adapter name PEFT's files hold for every adapter
SHADOW_CACHE = "_fxpeft_shadow_cache"  # on a KV cache: (adapter, the backbone's own cache)


@dataclass
class ShadowConfig(PeftConfigBase):
    """PEFT's ShadowConfig: the same fields, defaults and checks."""

    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    r: int = 8
    shadow_alpha: float = 0.1
    shadow_dropout: float = 0.2
    init_weights: bool = True
    shadow_model: str = "mirror"
    shadow_num_hidden_layers: Optional[int] = None
    shadow_hidden_size: Optional[int] = None
    shadow_num_attention_heads: Optional[int] = None
    shadow_intermediate_size: Optional[int] = None
    share_embeddings: bool = True
    update_hidden_size: Optional[int] = None
    auxiliary_loss_weight: float = 0.05
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None

    peft_type = "SHADOW"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")
        mirror_only = [name for name in ("shadow_num_hidden_layers", "shadow_hidden_size",
                                         "shadow_num_attention_heads", "shadow_intermediate_size")
                       if getattr(self, name) is not None]
        if self.shadow_model != "mirror" and mirror_only:
            raise ValueError("Explicit `shadow_model` checkpoints define their architecture; unset these mirror-only "
                             f"overrides: {', '.join(mirror_only)}.")
        # PEFT raises this when it builds the first layer; a config that cannot build is refused at once
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {self.r}")


# ----------------------------------------------------------------------------- the model's backbone


def _backbone_of(model: nn.Module) -> tuple[nn.Module, str]:
    """The module holding the decoder blocks and the attribute of their ModuleList (PEFT's search: ``model`` /
    ``transformer`` / ``base_model`` / ``decoder``, one ``decoder`` deeper for OPT)."""
    def stack(module):
        return next((attr for attr in ("layers", "h") if isinstance(getattr(module, attr, None), nn.ModuleList)), None)

    for attr in ("model", "transformer", "base_model", "decoder"):
        found = getattr(model, attr, None)
        if not isinstance(found, nn.Module):
            continue
        nested = getattr(found, "decoder", None)
        if isinstance(nested, nn.Module) and stack(nested):
            return nested, stack(nested)
        if stack(found):
            return found, stack(found)
        break
    if stack(model):
        return model, stack(model)
    raise ValueError("SHADOW found no decoder backbone (a module with a `layers` or `h` list of blocks) in "
                     f"{type(model).__name__}: set target_modules to the decoder blocks, e.g. r'.*\\.layers\\.\\d+$'.")


def _hidden_size(config) -> int:
    for attr in ("hidden_size", "n_embd", "d_model"):
        if hasattr(config, attr):
            return int(getattr(config, attr))
    raise ValueError(f"SHADOW cannot read the hidden size from {type(config).__name__}.")


def _set_first(config, names: tuple[str, ...], value: int) -> None:
    for attr in names:
        if hasattr(config, attr):
            setattr(config, attr, int(value))
            return
    raise ValueError(f"A mirrored shadow backbone sets one of {names} in {type(config).__name__}, which has none: "
                     "use a supported decoder architecture or set shadow_model to a saved model's folder.")


def _mirror(model: nn.Module, config: ShadowConfig) -> nn.Module:
    """The model's backbone class, built anew from a copy of its config with the shadow's sizes (PEFT's
    "mirror"; drawn from the global generator as PEFT draws it)."""
    backbone, _ = _backbone_of(model)
    mirrored = copy.deepcopy(backbone.config)
    _set_first(mirrored, ("num_hidden_layers", "n_layer", "num_layers"), config.shadow_num_hidden_layers or 1)
    for field, names in (("shadow_hidden_size", ("hidden_size", "n_embd", "d_model")),
                         ("shadow_intermediate_size", ("intermediate_size", "ffn_dim", "n_inner")),
                         ("shadow_num_attention_heads", ("num_attention_heads", "n_head", "num_heads"))):
        if getattr(config, field) is not None:
            _set_first(mirrored, names, getattr(config, field))
    layers = int(mirrored.num_hidden_layers) if hasattr(mirrored, "num_hidden_layers") else None
    if layers is not None and getattr(mirrored, "layer_types", None) is not None:  # per-layer lists fit the depth
        kinds = list(mirrored.layer_types) or ["full_attention"]
        mirrored.layer_types = (kinds + [kinds[-1]] * layers)[:layers]
    if layers is not None and getattr(mirrored, "max_window_layers", None) is not None:
        mirrored.max_window_layers = min(int(mirrored.max_window_layers), layers)
    return type(backbone)(mirrored)


def _saved_backbone(config: ShadowConfig) -> tuple[nn.Module, Optional[nn.Module]]:
    """A backbone saved by transformers in the folder ``shadow_model`` names, and the projection a "projected"
    shadow checkpoint (``model_type`` "causal_lm_with_hidden_projection") holds beside it, else None."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    path = config.shadow_model
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"shadow_model={path!r} is neither 'mirror' nor a folder holding a saved model (config.json); "
                         "fxpeft reads no hub ids at run time: download the model and pass its folder.")
    with open(os.path.join(path, "config.json")) as handle:
        raw = json.load(handle)
    if raw.get("model_type") != "causal_lm_with_hidden_projection":
        return AutoModel.from_pretrained(path), None
    inner = dict(raw["shadow_model_config"])
    backbone = AutoModel.from_config(AutoConfig.for_model(inner.pop("model_type"), **inner))
    weights = load_file(os.path.join(path, "model.safetensors"))
    backbone.load_state_dict({k.removeprefix("shadow_model."): v for k, v in weights.items()
                              if k.startswith("shadow_model.")}, strict=True)
    if "shadow_hidden_projection.weight" not in weights:
        raise ValueError(f"{path!r} is a projected shadow checkpoint but has no 'shadow_hidden_projection.weight'.")
    weight = weights["shadow_hidden_projection.weight"]
    projection = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        projection.weight.copy_(weight)
    return backbone, projection


def _takes(module: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


# ----------------------------------------------------------------------------- config and attach


def resolve_config(gm, sites, config: ShadowConfig) -> ShadowConfig:
    """PEFT's default targets (every decoder block), and what this model must be."""
    source = gm._fxpeft_source
    if getattr(source, "config", None) is None:
        raise ValueError("SHADOW builds its shadow backbone from a transformers decoder model (its backbone class "
                         f"and config); {type(source).__name__} has no config.")
    if getattr(source.config, "is_encoder_decoder", False):
        raise NotImplementedError("SHADOW adapts decoder-only models (PEFT's ShadowPEFT); "
                                  f"{type(source).__name__} is an encoder-decoder model.")
    held = [name for name, other in gm.peft_config.items() if isinstance(other, ShadowConfig)]
    if held and (config.task_type == "SEQ_CLS" or any(gm.peft_config[n].task_type == "SEQ_CLS" for n in held)):
        raise ValueError("ShadowPEFT does not support multiple adapters when any adapter uses sequence classification "
                         "because the sequence classification adapter requires both a classifier in "
                         "`modules_to_save` and a separate `shadow_head`.")
    if config.target_modules is None:
        backbone, attr = _backbone_of(source)
        # its path in the tree (found through a property, GPT-NeoX's base_model, the attribute is no path)
        path = next(name for name, module in source.named_modules() if module is backbone)
        config = copy.copy(config)
        config.target_modules = [f"{path}.{attr}.{i}" if path else f"{attr}.{i}"
                                 for i in range(len(getattr(backbone, attr)))]
    return config


def _targets(gm, config: ShadowConfig) -> list[str]:
    """The targeted modules in model order, together contiguous (the shadow state rides the decoder loop from
    the first to the last): where the result calls its blocks, each must be one of them; in a result left as
    one graph, the hidden states leaving each must enter the next (read from the graph)."""
    names = [path for path, _ in registry_of(gm).base_modules(gm)]
    targets = [path for path in names if path and is_targeted(config, path)]
    if not targets:
        raise unmatched_target_error(config, names)
    blocks = list(gm._fxpeft_block_paths)
    if not blocks:  # the same from the graph, before any module is made
        _check_chain(_flat_regions(primary_lowering(gm), targets, _hidden_size(gm._fxpeft_source.config)))
        return targets
    outside = [path for path in targets if path not in blocks]
    if outside:
        raise ValueError(f"SHADOW wraps whole decoder blocks, but target_modules names {outside[:4]}, which "
                         f"{'are' if len(outside) > 1 else 'is'} not one of the model's blocks "
                         f"({blocks[:2] + ['...'] if len(blocks) > 2 else blocks}): target the blocks, "
                         "e.g. r'.*\\.layers\\.\\d+$', or leave target_modules unset for all of them.")
    where = sorted(blocks.index(path) for path in targets)
    if where != list(range(where[0], where[0] + len(where))):
        raise ValueError(_NOT_CONTIGUOUS + f", but target_modules picks {sorted(targets, key=blocks.index)}.")
    return targets


_NOT_CONTIGUOUS = ("SHADOW's wrapped blocks must be contiguous (the shadow state rides the decoder loop from the first "
                   "to the last)")


def _head(gm, config: ShadowConfig) -> Optional[nn.Module]:
    """SEQ_CLS: a trained copy of the model's classifier (PEFT's ``shadow_head``); otherwise none (a causal LM's
    shadow loss reads the model's own output head)."""
    if config.task_type != "SEQ_CLS":
        return None
    found = next((getattr(gm, name) for name in ("score", "classifier") if isinstance(getattr(gm, name, None),
                                                                                    nn.Module)), None)
    if found is None:
        return None
    return copy.deepcopy(found)


def _layer_modules(width: int, config: ShadowConfig) -> dict[str, nn.Module]:
    """One block's modules, built in PEFT's order (so drawn in its order from the global generator)."""
    r, inner = config.r, config.update_hidden_size or config.r
    down, up = nn.Linear(width, r, bias=False), nn.Linear(r, width, bias=False)
    dropout = nn.Dropout(p=config.shadow_dropout) if config.shadow_dropout else nn.Identity()
    if config.init_weights:
        nn.init.zeros_(up.weight)
    transform = nn.Sequential(nn.Linear(width, inner), nn.GELU(), nn.Linear(inner, width))
    gate = nn.Sequential(nn.Linear(width, inner), nn.GELU(), nn.Linear(inner, width))
    return dict(zip(LAYER_PARTS, (down, up, transform, gate, dropout)))


def attach(gm, sites, config: ShadowConfig, adapter: str) -> list[str]:
    """``config`` arrives resolved. The backbone first (PEFT builds it at the first wrapped block), in the
    model's dtype and device; each block's modules in float32 (PEFT leaves them so: a block has no weight of
    its own to follow) on the block's device."""
    targets = _targets(gm, config)
    source = gm._fxpeft_source
    width = _hidden_size(source.config)
    if config.shadow_model == "mirror":
        backbone, projection = _mirror(source, config), None
    else:
        backbone, projection = _saved_backbone(config)
    shadow_width = _hidden_size(backbone.config)
    if projection is not None and (projection.in_features, projection.out_features) != (shadow_width, width):
        raise ValueError(f"The loaded shadow projection maps {projection.in_features}->{projection.out_features}, "
                         f"but the shadow/base hidden sizes are {shadow_width}/{width}.")
    if projection is None:
        projection = nn.Linear(shadow_width, width, bias=False) if shadow_width != width else nn.Identity()
    share = (config.share_embeddings and config.shadow_model == "mirror" and _takes(backbone, "inputs_embeds")
             and shadow_width == width)
    if share and isinstance(getattr(backbone, "embed_tokens", None), nn.Module):
        del backbone.embed_tokens  # fed the model's own embeddings (PEFT removes only this name)
    backbone._fxpeft_shares_embeddings, backbone._fxpeft_mirror = share, config.shadow_model == "mirror"
    # the keyword its forward takes its own KV cache under, read once here rather than on every decode step
    backbone._fxpeft_cache_name = next((n for n in generation.CACHE_NAMES if _takes(backbone, n)), "past_key_values")
    head = _head(gm, config)
    first = next(gm.parameters())
    for name, module in zip(ROOT_PARTS, (backbone, projection, head)):
        if module is not None:
            child_dict(gm, name)[adapter] = module.to(device=first.device, dtype=first.dtype)
    for path in targets:
        block = gm.get_submodule(path)
        device = next(block.parameters()).device
        for name, module in _layer_modules(width, config).items():
            child_dict(block, name)[adapter] = module.to(device)
    return targets


def frozen(gm, adapter: str) -> list[nn.Parameter]:
    """A pretrained backbone's embedding tables stay frozen (PEFT: training them is not parameter-efficient);
    a mirrored one's train."""
    backbones = gm._modules.get("shadow_backbone")
    backbone = backbones[adapter] if backbones is not None and adapter in backbones else None
    if backbone is None or backbone._fxpeft_mirror:
        return []
    tables = [getattr(backbone, getter, lambda: None)() for getter in ("get_input_embeddings", "get_output_embeddings")]
    return [param for table in tables if isinstance(table, nn.Module) for param in table.parameters()]


def adapters_at(module: nn.Module) -> list[str]:
    holder = module._modules.get("shadow_down")
    return list(holder.keys()) if holder is not None else []


# ----------------------------------------------------------------------------- the initial state (before a call)


def _two_d(mask, length: int) -> Optional[torch.Tensor]:
    """A 2-D padding mask over the first ``length`` positions, from the call's mask: 2-D as given, or read
    off the last query row of a 4-D one (a generation step's: that row sees every filled position)."""
    if isinstance(mask, dict):
        mask = mask.get("full_attention", next(iter(mask.values()), None))
    if not isinstance(mask, torch.Tensor) or mask.ndim == 2:
        return mask
    row = mask[:, 0, -1, :length]
    return (row if row.dtype == torch.bool else row == 0).long()


FOLLOWED = ("reorder_cache", "crop", "batch_repeat_interleave", "batch_select_indices", "reset")


def _own_cache(gm, adapter: str, cache, backbone: nn.Module):
    """The backbone's cache kept beside the model's ``cache`` (on the DynamicCache a static cache reads, if it
    reads one): new when the model's cache is empty, else the one kept. The row and length edits transformers
    makes on the model's cache (beam search's ``reorder_cache`` …) reach it too, and ``reset`` (a static
    cache reused by the next generate call) drops it."""
    from transformers import DynamicCache

    owner = getattr(cache, "_fxpeft_dynamic", (cache,))[0]
    kept = owner.__dict__.get(SHADOW_CACHE)
    # the model's length is read where it costs nothing or once per cache (on a GPU it waits for the device)
    filled = int(cache.get_seq_length()) if kept is None or _on_host(cache) else None
    if filled == 0:
        kept = owner.__dict__[SHADOW_CACHE] = (adapter, DynamicCache(config=backbone.config))
        for holder in {id(cache): cache, id(owner): owner}.values():
            for name in FOLLOWED:
                if name not in holder.__dict__ and hasattr(holder, name):
                    setattr(holder, name, AlsoShadow(holder, owner, name))
    elif kept is None or kept[0] != adapter or filled is not None and kept[1].get_seq_length() != filled:
        raise ValueError(f"This KV cache holds {filled} positions that the shadow backbone of adapter {adapter!r} did "
                         "not see (the cache was made without it, or by another adapter): pass the cache this module "
                         "returned for the tokens before, or start again without a cache.")
    return kept[1]


def _on_host(cache) -> bool:
    """Whether the cache's tensors are in host memory (reading its length waits for nothing)."""
    layer = next(iter(getattr(cache, "layers", None) or []), None)
    keys = getattr(layer, "keys", None)
    return not isinstance(keys, torch.Tensor) or keys.device.type == "cpu"


class AlsoShadow:
    """``cache.<name>(...)`` that also applies to the shadow backbone's cache kept on ``owner`` (``reset`` drops
    it). An object, not a closure, so that the cache still copies (its copy's kept cache follows the copy)
    and pickles."""

    def __init__(self, cache, owner, name: str):
        self.cache, self.owner, self.name = cache, owner, name

    def __call__(self, *args, **kwargs):
        result = getattr(type(self.cache), self.name)(self.cache, *args, **kwargs)
        if self.name == "reset":
            self.owner.__dict__.pop(SHADOW_CACHE, None)
        elif SHADOW_CACHE in self.owner.__dict__:
            getattr(self.owner.__dict__[SHADOW_CACHE][1], self.name)(*args, **kwargs)
        return result


def fill_call_inputs(gm, adapter: str, args, kwargs, compiled: bool) -> dict:
    """s⁰ for the call's tokens: the backbone on the model's input embeddings (or its own, unless it shares
    them), the call's padding mask and positions, over its own cache where the call has one."""
    backbone = gm.shadow_backbone[adapter]
    ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    if embeds is None and ids is None:
        raise ValueError("A SHADOW adapter runs its shadow backbone on the call's input_ids or inputs_embeds; the "
                         "call has neither.")
    gm.__dict__["last_shadow_loss"] = None  # (set by call_loss when the call computes one)
    name, made = generation.cache_name_of(kwargs), None
    if name is None and not compiled:  # a loop's use_cache=True: its cache made now, to keep ours beside it
        trial = dict(kwargs)
        generation.cache_for_use_cache(gm, trial, warn=False)  # (the call warns where it gets none)
        name = generation.cache_name_of(trial)
        made = trial.get(name) if name is not None else None
    cache = made if made is not None else kwargs.get(name) if name is not None else None
    if embeds is None and backbone._fxpeft_shares_embeddings:
        embeds = _adapter_copy(gm.get_input_embeddings(), adapter)(ids)
    step = (ids if embeds is None else embeds).shape[1]
    call = {"return_dict": True, "use_cache": cache is not None}
    own = _own_cache(gm, adapter, cache, backbone) if cache is not None else None
    if own is not None:
        call[backbone._fxpeft_cache_name] = own
    call["attention_mask"] = _two_d(kwargs.get("attention_mask"), (own.get_seq_length() if own else 0) + step)
    if kwargs.get("position_ids") is not None:
        call["position_ids"] = kwargs["position_ids"]
    out = backbone(inputs_embeds=embeds, **call) if embeds is not None else backbone(input_ids=ids, **call)
    return {NAME: gm.shadow_projection[adapter](out.last_hidden_state), **({name: made} if made is not None else {})}


# ----------------------------------------------------------------------------- the rewrite


def shadow_difference(hidden: torch.Tensor, shadow: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (hidden - shadow).to(dtype)


def shadow_injected(hidden: torch.Tensor, correction: torch.Tensor, alpha: float) -> torch.Tensor:
    return hidden + (alpha * correction).to(hidden.dtype)


def shadow_advanced(shadow: torch.Tensor, candidate: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
    gate = torch.sigmoid(gate_logits)
    return ((1.0 - gate) * shadow.to(candidate.dtype) + gate * candidate).to(shadow.dtype)


@dataclass
class Region:
    """Where one wrapped block sits in a graph: the hidden states entering it, the nodes of the block reading
    them, and the hidden states leaving it."""

    path: str
    entering: torch.fx.Node
    readers: list
    leaving: Optional[torch.fx.Node]  # (None: not known, where nothing reads it)


def _width(node) -> Optional[int]:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return value.shape[-1] if isinstance(value, torch.Tensor) and value.ndim == 3 else None


def _called_regions(calls: list[torch.fx.Node], paths: list[str], width: int) -> list[Region]:
    """A graph calling the blocks (a top graph): between two calls, the value the later takes from the earlier
    (its argument, the earlier's output) carries the hidden states; at the ends, the one argument or output of
    the hidden width (or the neighbour's position). Blocks' outputs may differ: the first block's graph of a
    signature may return more than the others'."""
    positions: list = [None] * len(calls)  # where the hidden states enter each call
    leaving: list = [None] * len(calls)  # the node carrying them out of it
    for i, (before, after) in enumerate(zip(calls, calls[1:])):
        for position, arg in enumerate(after.args):
            if arg is before or isinstance(arg, torch.fx.Node) and arg.target is getitem and arg.args[0] is before:
                positions[i + 1], leaving[i] = position, arg
                break
    for i, call in enumerate(calls):
        wide = [p for p, arg in enumerate(call.args) if _width(arg) == width]
        if positions[i] is None and (len(wide) == 1 or i + 1 < len(calls) and positions[i + 1] is not None):
            positions[i] = wide[0] if len(wide) == 1 else positions[i + 1]
        outs = [u for u in call.users if u.target is getitem and _width(u) == width]
        if leaving[i] is None and len(outs) == 1:
            leaving[i] = outs[0]
    regions = []
    for i, call in enumerate(calls):
        if call.target in paths:
            if positions[i] is None:
                raise ValueError(f"SHADOW could not tell which input of {call.target!r} carries the hidden states.")
            regions.append(Region(call.target, call.args[positions[i]], [call], leaving[i]))
    return regions


def _flat_regions(lw: Lowering, paths: list[str], width: int) -> list[Region]:
    """A graph computing the blocks itself (a model left as one graph, the inspection's whole-model graph): each
    block's nodes by their module paths; one value of the hidden width must enter and one leave."""
    regions = []
    for path in paths:
        inside = [n for n in lw.graph.nodes if (innermost_module(n) or "").startswith(path + ".")
                  or innermost_module(n) == path]
        members = set(inside)
        entering = list(dict.fromkeys(a for n in inside for a in n.all_input_nodes
                                      if a not in members and _width(a) == width))
        leaving = [n for n in inside if _width(n) == width and any(u not in members for u in n.users)]
        if len(entering) != 1 or len(leaving) != 1:
            raise ValueError(f"SHADOW wraps modules the hidden states pass through whole, but {len(entering)} values "
                             f"of the hidden width enter {path!r} in the graph and {len(leaving)} leave it.")
        regions.append(Region(path, entering[0], [n for n in inside if entering[0] in n.all_input_nodes], leaving[0]))
    order = {node: i for i, node in enumerate(lw.graph.nodes)}
    return sorted(regions, key=lambda region: order[region.readers[0]])


def _regions(lw: Lowering, adapter: str) -> list[Region]:
    """The adapter's wrapped blocks in the graph, in model order (none: the graph computes none of them)."""
    paths = [path for path, module in lw.registry.base_modules(lw.root) if adapter in adapters_at(module)]
    width = _hidden_size(lw.root._fxpeft_source.config)
    calls = [n for n in lw.graph.nodes if n.op == "call_module" and n.meta.get("fxpeft_block")]
    if calls:
        return _called_regions(calls, paths, width)
    computed = {innermost_module(n) or "" for n in lw.graph.nodes}
    paths = [p for p in paths if any(m == p or m.startswith(p + ".") for m in computed)]
    return _flat_regions(lw, paths, width) if paths else []


def _check_chain(regions: list[Region]) -> None:
    """The hidden states leaving each wrapped block are those entering the next."""
    for before, after in zip(regions, regions[1:]):
        if before.leaving is None:
            raise ValueError(f"SHADOW could not tell which output of {before.path!r} carries the hidden states.")
        if after.entering is not before.leaving:
            raise ValueError(_NOT_CONTIGUOUS + f", but the hidden states leaving {before.path!r} are not those "
                             f"entering {after.path!r}.")


def match(lw: Lowering):
    """The acting SHADOW adapter, in the module's own graphs (a block's graph has no adapters to read: its
    block is rewritten where it is called)."""
    for adapter in getattr(lw.root, "_fxpeft_active", ()):
        if isinstance(lw.root.peft_config.get(adapter), ShadowConfig):
            yield adapter


def rewrite(lw: Lowering, adapter: str) -> None:
    if lw.mixed:  # the mixed graph fails to lower (calls with adapter_names= are refused: Method.mixed_batches)
        raise NotImplementedError("SHADOW adapters cannot be picked per sample (PEFT has no adapter_names for them).")
    regions = _regions(lw, adapter)
    if not regions:
        return
    _check_chain(regions)
    shadow = lw.call_input(NAME)
    alpha = lw.root.peft_config[adapter].shadow_alpha
    for number, region in enumerate(regions):
        parts = {name: f"{region.path}.{name}.{adapter}" for name in LAYER_PARTS}
        dtype = lw.module(parts["shadow_down"]).weight.dtype
        lw.tag["fxpeft_site"] = region.path
        hidden = region.entering
        with lw.graph.inserting_before(region.readers[0]):
            correction = lw.call(shadow_difference, hidden, shadow, dtype)
            for name in ("shadow_dropout", "shadow_down", "shadow_up"):
                correction = lw.call_module(parts[name], correction)
            injected = lw.call(shadow_injected, hidden, correction, alpha)
        for reader in region.readers:
            reader.replace_input_with(hidden, injected)
        if number == len(regions) - 1:
            break  # the last state is read by nothing (PEFT computes it and drops it)
        value = region.leaving.meta.get("val")
        with lw.graph.inserting_after(region.leaving):  # (a copy only where the dtypes differ, or are not known)
            seen = region.leaving if getattr(value, "dtype", None) == dtype else \
                lw.call(torch.ops.aten._to_copy.default, region.leaving, dtype=dtype)
        with lw.graph.inserting_after(seen):
            candidate = lw.call_module(parts["shadow_update_transform"], seen)
        with lw.graph.inserting_after(candidate):
            logits = lw.call_module(parts["shadow_update_gate"], seen)
        with lw.graph.inserting_after(logits):
            shadow = lw.call(shadow_advanced, shadow, candidate, logits)


# ----------------------------------------------------------------------------- the shadow loss


def _pooled_last(hidden: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Each row's last non-padding position (left or right padding)."""
    if mask is None:
        return hidden[:, -1, :]
    positions = torch.arange(mask.shape[-1], device=mask.device)
    last = (mask.ne(0) * positions).argmax(dim=-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def _classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' sequence-classification loss: regression, single- or multi-label."""
    classes = logits.shape[-1]
    if classes == 1:
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).view(-1))
    if labels.dtype in (torch.long, torch.int):
        return F.cross_entropy(logits.view(-1, classes), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits, labels)


def _adapter_copy(module: nn.Module, adapter: str) -> nn.Module:
    """``module``, or the adapter's trained copy of it (``modules_to_save=["lm_head"]``, ``["embed_tokens"]``)."""
    copies = module._modules.get("modules_to_save")
    return copies[adapter] if copies is not None and adapter in copies else module


def shadow_loss(gm, adapter: str, state: torch.Tensor, labels: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """The shadow path's own loss on s⁰ (unweighted): next-token cross entropy through the model's output head
    (causal LM), or the classification loss of the trained head on the last real token (SEQ_CLS)."""
    config = gm.peft_config[adapter]
    if config.task_type == "SEQ_CLS":
        if adapter not in getattr(gm, "shadow_head", {}):
            return None
        logits = gm.shadow_head[adapter](_pooled_last(state, attention_mask))
        return _classification_loss(logits, labels)
    if config.task_type != "CAUSAL_LM":
        return None
    logits = _adapter_copy(gm.get_output_embeddings(), adapter)(state)
    return F.cross_entropy(logits[..., :-1, :].reshape(-1, logits.shape[-1]), labels[..., 1:].reshape(-1),
                           ignore_index=-100)


def call_loss(gm, adapter: str, output, inputs: dict) -> torch.Tensor:
    """The model's loss plus ``auxiliary_loss_weight`` × the shadow loss; the shadow loss, detached, is also
    ``output.shadow_loss`` and ``gm.last_shadow_loss`` (as PEFT)."""
    labels, state = inputs.get("labels"), inputs.get(NAME)
    if labels is None or state is None:
        return output.loss
    loss = shadow_loss(gm, adapter, state, labels, inputs.get("attention_mask"))
    if loss is None:
        return output.loss
    gm.__dict__["last_shadow_loss"] = output.shadow_loss = loss.detach()
    weight = gm.peft_config[adapter].auxiliary_loss_weight
    return output.loss + weight * loss if weight > 0 else output.loss


# ----------------------------------------------------------------------------- the shadow network alone


@functools.lru_cache(maxsize=None)
def shadow_network_class():
    """The class of :func:`unload_shadow`'s result, made on first use (transformers imported then)."""
    from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutputWithPast, SequenceClassifierOutput

    class ShadowNetwork(PreTrainedModel, GenerationMixin):
        """head(projection(backbone(x))) without the model (PEFT's DetachedShadowModel): a causal LM that
        generates, or a classifier of each row's last real token. With embeddings shared from the model, they
        are held by reference, not as a child (not saved: unload with ``copy=True`` to save it)."""

        main_input_name = "input_ids"
        base_model_prefix = "backbone"
        _supports_cache_class = _supports_sdpa = _supports_flash_attn = _supports_flex_attn = True
        _supports_attention_backend = True

        def __init__(self, backbone, projection, head, classifies: bool, embeddings=None):
            super().__init__(backbone.config)
            self.backbone, self.shadow_hidden_projection, self.head = backbone, projection, head
            self.classifies = classifies
            self._embeddings = [embeddings]  # a list: not a child module
            self.generation_config = getattr(backbone, "generation_config", None) or \
                GenerationConfig.from_model_config(self.config)

        def can_generate(self) -> bool:  # (called by PreTrainedModel.__init__ before the attributes exist)
            return getattr(self, "head", None) is not None and not getattr(self, "classifies", False)

        def get_input_embeddings(self):
            return self._embeddings[0] if self._embeddings[0] is not None else self.backbone.get_input_embeddings()

        def get_output_embeddings(self):
            return None if self.classifies else self.head

        def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
            for name in ("logits_to_keep", "num_logits_to_keep"):  # a causal LM's: the backbone takes none
                kwargs.pop(name, None)
            if self._embeddings[0] is not None and kwargs.get("inputs_embeds") is None:
                kwargs["inputs_embeds"], input_ids = self._embeddings[0](input_ids), None
            kwargs["return_dict"] = True
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            hidden = self.shadow_hidden_projection(out.last_hidden_state)
            if self.head is None:
                return hidden
            if self.classifies:
                logits = self.head(_pooled_last(hidden, attention_mask))
                return SequenceClassifierOutput(loss=None if labels is None else _classification_loss(logits, labels),
                                                logits=logits)
            logits = self.head(hidden)
            loss = None if labels is None else F.cross_entropy(
                logits[..., :-1, :].reshape(-1, logits.shape[-1]), labels[..., 1:].reshape(-1), ignore_index=-100)
            return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=getattr(out, "past_key_values", None))

    return ShadowNetwork


def unload_shadow(gm, adapter_name: Optional[str] = None, copy: bool = False) -> nn.Module:
    """``gm.unload_shadow(adapter_name=None, copy=False)``, PEFT's: the adapter's shadow network as a model of its
    own, head(projection(backbone(x))) (the per-block updates need the model and are not in it), for the
    shadow path's own evaluation or deployment. ``copy=False`` shares its modules with ``gm``; ``copy=True``
    copies them (and the shared embeddings, so that it saves whole)."""
    import copy as copying

    adapter = adapter_name if adapter_name is not None else next(
        (name for name in gm._fxpeft_active if isinstance(gm.peft_config[name], ShadowConfig)), None)
    if adapter is None or adapter not in getattr(gm, "shadow_backbone", {}):
        raise ValueError(f"No shadow backbone found for adapter {adapter!r} (SHADOW adapters: "
                         f"{[n for n, c in gm.peft_config.items() if isinstance(c, ShadowConfig)]}).")
    take = copying.deepcopy if copy else (lambda module: module)
    backbone = take(gm.shadow_backbone[adapter])
    projection = take(gm.shadow_projection[adapter])
    classifies = gm.peft_config[adapter].task_type == "SEQ_CLS"
    head = gm.shadow_head[adapter] if classifies and adapter in getattr(gm, "shadow_head", {}) else None
    if not classifies and gm.peft_config[adapter].task_type == "CAUSAL_LM":
        head = _adapter_copy(gm.get_output_embeddings(), adapter)
    head = take(head) if head is not None else None
    embeddings = None
    if backbone._fxpeft_shares_embeddings:
        embeddings = _adapter_copy(gm.get_input_embeddings(), adapter)
        if copy:
            backbone.embed_tokens, embeddings = copying.deepcopy(embeddings), None
    return shadow_network_class()(backbone, projection, head, classifies, embeddings)


# ----------------------------------------------------------------------------- checkpoints


def _renamed(tensors: dict, before: str, after: str) -> dict:
    """Checkpoint keys with ``before`` after their container's name (``.shadow_down.`` …) replaced by ``after``."""
    out = {}
    for key, value in tensors.items():
        for part in LAYER_PARTS + ROOT_PARTS:
            at = key.find(f".{part}.{before}")
            if at >= 0:
                start = at + len(part) + 2
                key = key[:start] + after + key[start + len(before):]
                break
        out[key] = value
    return out


def saved_state(gm, adapter: str, tensors: dict) -> dict:
    """PEFT's keys: its files keep an adapter name after each container's, ``default`` whatever the adapter's
    (``...layers.0.shadow_down.default.weight``, ``base_model.shadow_backbone.default.norm.weight``)."""
    return _renamed(tensors, "", SAVED_AS + ".")


def loaded_state(gm, adapter: str, weights: dict) -> dict:
    return _renamed(weights, SAVED_AS + ".", "")


METHOD = register_method(Method(
    name="shadow", config_type=ShadowConfig, attach=attach, resolve_config=resolve_config,
    containers=LAYER_PARTS + ROOT_PARTS, shared=ROOT_PARTS, adapters_at=adapters_at,
    mixed_batches=False, one_active=True, activity_in_graph=True,
    rules=(Rule(name="shadow", match=match, rewrite=rewrite, phase=20),),
    call_inputs=(NAME,), fill_call_inputs=fill_call_inputs, call_loss=call_loss,
    saved_state=saved_state, loaded_state=loaded_state, frozen=frozen,
    module_methods=(("unload_shadow", unload_shadow),),
    describe=lambda module, adapter: f"r={module._modules['shadow_down'][adapter].out_features}"))

