"""Cartridge: a trained KV cache, served as prefix tuning serves its prefixes.

State (PEFT's names, at the root): ``prompt_encoder.<adapter>.frozen_embedding`` (the first
``num_frozen_tokens`` virtual tokens, never trained: an attention sink) and ``.trainable_embedding``
(the rest), together the (n, layers·2·token_dim) table prefix tuning computes, in its layout
(layer l's keys are slice 2l, its values 2l+1). No projection: the table is the parameter.
Rewrite, generation and layout resolution are prefix tuning's (passes/prefix.py, ``kv_prefix_method``).
Checkpoint: ``prompt_embeddings``, the whole table (PEFT's format); unlike prefix tuning's projected
table it loads for training too, split back into the frozen and trainable parts.

Initialisation helpers (PEFT's ``peft/tuners/cartridge/utils.py``): ``initialize_kv_prefix_from_past_key_values``
(a cache's first n positions as the table), ``initialize_kv_prefix_from_text`` (the base model's cache
of a text) and ``compose_cartridge_adapters`` (saved cartridges concatenated into one).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from fxpeft.checkpoint import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME, load_config, load_weights, write_json
from fxpeft.configs import PrefixTuningConfig, PromptLearningConfig
from fxpeft.passes.prefix import kv_prefix_method, resolve_kv_layout
from fxpeft.passes.prompt import check_alone
from fxpeft.registry import register_method


@dataclass
class CartridgeConfig(PromptLearningConfig):
    """PEFT's CartridgeConfig: ``num_frozen_tokens`` (1) leading virtual tokens get no gradient (the paper
    keeps the first as an attention sink). Its tokens start as ``torch.nn.init.normal_`` draws, as in PEFT;
    ``initialize_kv_prefix_from_text`` / ``..._from_past_key_values`` set them from a cache instead."""

    num_frozen_tokens: int = 1

    peft_type = "CARTRIDGE"

    def __post_init__(self):
        super().__post_init__()
        if self.num_frozen_tokens < 0:
            raise ValueError(f"`num_frozen_tokens` must be >= 0, got {self.num_frozen_tokens}.")
        if self.num_frozen_tokens > self.num_virtual_tokens:
            raise ValueError(
                f"`num_frozen_tokens` must be <= `num_virtual_tokens`, got num_frozen_tokens={self.num_frozen_tokens} "
                f"and num_virtual_tokens={self.num_virtual_tokens}.")


class CartridgeEncoder(nn.Module):
    """The table as two parameters (PEFT's): the frozen leading tokens and the trainable rest."""

    def __init__(self, count: int, width: int, frozen: int):
        super().__init__()
        self.num_frozen_tokens = frozen
        # PEFT's draw order (frozen, then trainable), so one seed gives PEFT's table
        self.frozen_embedding = nn.Parameter(nn.init.normal_(torch.empty(frozen, width)), requires_grad=False) \
            if frozen else None
        self.trainable_embedding = nn.Parameter(nn.init.normal_(torch.empty(count - frozen, width)))

    def forward(self) -> torch.Tensor:
        if self.frozen_embedding is None:
            return self.trainable_embedding
        return torch.cat([self.frozen_embedding, self.trainable_embedding], dim=0)

    def load_prompt_embeddings(self, prompt_embeddings: torch.Tensor) -> None:
        """The whole (n, width) table into the two parts (PEFT's name and check)."""
        count = self.num_frozen_tokens + self.trainable_embedding.shape[0]
        if prompt_embeddings.ndim != 2 or prompt_embeddings.shape[0] != count:
            raise ValueError(f"Invalid `prompt_embeddings` shape. Expected ({count}, hidden), got "
                             f"{tuple(prompt_embeddings.shape)}.")
        with torch.no_grad():
            if self.frozen_embedding is not None:
                self.frozen_embedding.copy_(prompt_embeddings[:self.num_frozen_tokens])
            self.trainable_embedding.copy_(prompt_embeddings[self.num_frozen_tokens:])


def attach(gm, sites, config: CartridgeConfig, adapter: str) -> list[str]:
    """``config`` arrives resolved (``resolve_kv_layout``)."""
    check_alone(gm, config, adapter)
    encoder = CartridgeEncoder(config.num_virtual_tokens, config.num_layers * 2 * config.token_dim,
                               config.num_frozen_tokens)
    if "prompt_encoder" not in gm._modules:
        gm.add_module("prompt_encoder", nn.ModuleDict())
    gm.prompt_encoder[adapter] = encoder.to(next(gm.parameters()).device).train(gm.training)
    return []


def load_saved(gm, adapter: str, weights: dict[str, torch.Tensor]) -> None:
    gm.prompt_encoder[adapter].load_prompt_embeddings(weights["prompt_embeddings"])


register_method(kv_prefix_method("cartridge", CartridgeConfig, attach=attach, resolve_config=resolve_kv_layout,
                                 load_saved=load_saved, untrained=("frozen_embedding",)))


# ----------------------------------------------------------------------------- initialisation (PEFT's utils.py)


def _legacy_layers(past_key_values: Any):
    """[(keys, values), ...] per layer from a legacy tuple/list, a cache with ``to_legacy_cache``, or
    an iterable of (keys, values, ...) (PEFT's ``_to_legacy_past_key_values``)."""
    if isinstance(past_key_values, (tuple, list)):
        return past_key_values
    if callable(getattr(past_key_values, "to_legacy_cache", None)):
        return past_key_values.to_legacy_cache()
    if hasattr(past_key_values, "__iter__"):
        legacy = list(past_key_values)
        if legacy and isinstance(legacy[0], (tuple, list)) and len(legacy[0]) >= 2:
            return [(layer[0], layer[1]) for layer in legacy]
    raise TypeError("Unsupported `past_key_values` type. Expected a legacy tuple/list, an object with "
                    "`to_legacy_cache()`, or an iterable of (key, value) tuples.")


def prompt_embeddings_from_past_key_values(past_key_values: Any, *, num_virtual_tokens: int) -> torch.Tensor:
    """A single-sequence cache's first n positions as the flattened (n, layers·2·heads·head_dim) table."""
    legacy = _legacy_layers(past_key_values)
    if len(legacy) == 0:
        raise ValueError("Empty `past_key_values`.")
    key0 = legacy[0][0]
    if key0.ndim != 4:
        raise ValueError(f"Expected key/value tensors with rank 4, got key.ndim={key0.ndim}.")
    if key0.shape[0] != 1:
        raise ValueError("This helper expects `past_key_values` from a single-sequence prefill (batch=1). "
                         f"Got batch={key0.shape[0]}.")
    _, heads, length, head_dim = key0.shape
    if length < num_virtual_tokens:
        raise ValueError(f"Need at least {num_virtual_tokens} cached tokens, got {length}.")
    slices = []  # layer l's keys, then its values: the table's slices 2l, 2l+1, each (n, heads, head_dim)
    for keys, values in legacy:
        for states in (keys, values):
            if states.shape[:2] != (1, heads) or states.shape[3] != head_dim:
                raise ValueError("Inconsistent head shapes across layers in `past_key_values`.")
            if states.shape[2] < num_virtual_tokens:
                raise ValueError("Not enough cached tokens in `past_key_values` for the requested cartridge length.")
            slices.append(states[0, :, :num_virtual_tokens].transpose(0, 1))
    return torch.stack(slices, dim=1).reshape(num_virtual_tokens, -1)


def _kv_prefix_adapter(gm, adapter_name: Optional[str]):
    adapter = adapter_name if adapter_name is not None else gm.active_adapter
    config = gm.peft_config[adapter]
    if not isinstance(config, (CartridgeConfig, PrefixTuningConfig)):
        raise ValueError(f"Adapter '{adapter}' must be a CARTRIDGE or PREFIX_TUNING adapter (got {config.peft_type}).")
    if getattr(config, "prefix_projection", False):
        raise ValueError("Initialization from KV cache is not supported for prefix tuning with `prefix_projection=True`.")
    return adapter, config


@torch.no_grad()
def initialize_kv_prefix_from_past_key_values(gm, *, adapter_name: Optional[str] = None, past_key_values: Any,
                                              num_virtual_tokens: Optional[int] = None) -> torch.Tensor:
    """Set a cartridge's (or unprojected prefix tuning's) table from a cache's first n positions; returns
    the table loaded (PEFT's function)."""
    adapter, config = _kv_prefix_adapter(gm, adapter_name)
    table = prompt_embeddings_from_past_key_values(past_key_values,
                                                   num_virtual_tokens=num_virtual_tokens or config.num_virtual_tokens)
    encoder = gm.prompt_encoder[adapter]
    if isinstance(encoder, CartridgeEncoder):
        encoder.load_prompt_embeddings(table)
    else:  # prefix tuning's table is an embedding's weight
        weight = encoder.embedding.weight
        if table.shape != weight.shape:
            raise ValueError(f"Invalid `prompt_embeddings` shape. Expected {tuple(weight.shape)}, got "
                             f"{tuple(table.shape)}.")
        weight.copy_(table)
    return table


def _token_ids(tokenizer, text: str, use_chat_template: bool, max_length: Optional[int]) -> torch.Tensor:
    """PEFT's tokenization: the text as a system message through the chat template where the tokenizer
    has one, else plain (truncated to ``max_length`` either way)."""
    if use_chat_template and hasattr(tokenizer, "apply_chat_template"):
        try:
            ids = tokenizer.apply_chat_template([{"role": "system", "content": text}], tokenize=True,
                                                add_generation_prompt=False, return_dict=False, return_tensors="pt")
        except (TypeError, ValueError):  # no chat template, or an older signature
            pass
        else:
            return ids if max_length is None else ids[:, :max_length]
    return tokenizer(text, return_tensors="pt", truncation=max_length is not None, max_length=max_length)["input_ids"]


@torch.no_grad()
def initialize_kv_prefix_from_text(gm, tokenizer, *, text: str, adapter_name: Optional[str] = None,
                                   num_virtual_tokens: Optional[int] = None, use_chat_template: bool = True,
                                   max_length: Optional[int] = None) -> torch.Tensor:
    """Run the base model (adapters disabled) on ``text`` with a KV cache and set the table from the
    cache's first n positions (PEFT's function)."""
    from transformers import DynamicCache

    adapter, _ = _kv_prefix_adapter(gm, adapter_name)
    ids = _token_ids(tokenizer, text, use_chat_template, max_length).to(next(gm.parameters()).device)
    cache = DynamicCache(config=gm._fxpeft_source.config)
    with gm.disable_adapter():
        gm(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache, use_cache=True)
    return initialize_kv_prefix_from_past_key_values(gm, adapter_name=adapter, past_key_values=cache,
                                                     num_virtual_tokens=num_virtual_tokens)


def compose_cartridge_adapters(adapter_paths: Sequence[str | os.PathLike], *, output_path: str | os.PathLike,
                               safe_serialization: bool = True) -> None:
    """Saved cartridges concatenated along the tokens into one saved cartridge (the paper's composition),
    keeping the first's ``num_frozen_tokens`` (PEFT's function; files only, no model)."""
    paths = [str(p) for p in adapter_paths]
    if len(paths) < 2:
        raise ValueError("Need at least 2 adapters to compose.")
    configs = [load_config(p) for p in paths]
    for path, config in zip(paths, configs):
        if not isinstance(config, CartridgeConfig):
            raise ValueError(f"Adapter at '{path}' is not a CARTRIDGE adapter (got {config.peft_type}).")
    for config in configs[1:]:
        for attr in ("task_type", "token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules"):
            if getattr(config, attr) != getattr(configs[0], attr):
                raise ValueError(f"Incompatible CARTRIDGE configs for attribute '{attr}'.")
    table = torch.cat([load_weights(p)["prompt_embeddings"] for p in paths], dim=0)
    composed = dataclasses.replace(configs[0], num_virtual_tokens=table.shape[0])
    os.makedirs(output_path, exist_ok=True)
    write_json(os.path.join(output_path, CONFIG_NAME), composed.to_dict())
    if safe_serialization:
        from safetensors.torch import save_file
        save_file({"prompt_embeddings": table}, os.path.join(output_path, SAFETENSORS_NAME), metadata={"format": "pt"})
    else:
        torch.save({"prompt_embeddings": table}, os.path.join(output_path, BIN_NAME))
