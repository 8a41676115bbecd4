"""Prefix tuning: learned keys and values in front of every attention's own.

State (PEFT's names, at the root): ``prompt_encoder.<adapter>.embedding.weight``, shape
(n, layers·2·kv_heads·head_dim), plus ``.transform.*`` with ``prefix_projection`` (a two-layer
MLP from (n, kv_heads·head_dim)). Layer l's key prefix is slice 2l, its value prefix 2l+1, as in
PEFT's ``past_key_values`` (seq2seq models: PEFT deals them out differently, see ``layer_slices``).

Rewrite (phase 20), while the adapter is active, at every ``scaled_dot_product_attention`` that
PEFT's cache reaches (all of a decoder-only model's; in an encoder-decoder transformers model only
the decoder's self-attentions, as PEFT hands the decoder an ``EncoderDecoderCache`` whose
cross-attention part it empties). Layers in graph order; key heads and head size read from the
graph, before any grouped-query repeat of the keys, so GQA prefixes have the key/value head count
and are repeated like the keys:
    key, value     -> cat(prefix, key / value) along the sequence
    attn_mask      -> the prefix columns visible to every query, in front of the mask; a mask
                      holding a relative position bias (T5) gets the bias of the prefix's key
                      positions there, computed by replaying the model's own bias code
    is_causal=True -> an explicit mask: prefix visible, causal among the real tokens
    positions      -> + n where the model computes them (rotary embeddings, learned absolute
                      position embeddings), as PEFT's cache of n past tokens makes them; positions
                      derived from the attention mask (OPT) move only where the mask is 1, as
                      they do from PEFT's mask with n ones in front.
Generative tasks are called without ``token_type_ids``, as PEFT calls them (``dropped_inputs``).
Checkpoint: ``prompt_embeddings``, the (projected) prefixes (PEFT's format).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fxpeft.canonical import ModeSwitch, innermost_module
from fxpeft.configs import PrefixTuningConfig
from fxpeft.passes.prompt import (CONTAINERS, PromptEmbedding, active_prompt_adapter, check_alone,
                                  dropped_token_types, load_prompt_embeddings, model_dims, prompt_embeddings)
from fxpeft.registry import Method, Rule, register_method
from fxpeft.rewrite import Lowering, primary_lowering

aten = torch.ops.aten

SDPA_OPS = (aten.scaled_dot_product_attention.default, F.scaled_dot_product_attention)
# ops between a key projection and attention that only rearrange or repeat heads (repeat_kv)
HEAD_REARRANGING = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
                    aten.unsqueeze.default, aten.slice.Tensor, aten.clone.default, aten.contiguous.default}
# ops between a projection and the attention's (batch, heads, seq, head_dim) operand
PROJECTION_LAYOUT = HEAD_REARRANGING | {aten.transpose.int, aten.permute.default}
# learned absolute position embeddings (GPT-2, BERT, OPT-like names); rotary modules are found by class
POSITION_EMBEDDINGS = ("wpe", "position_embeddings", "embed_positions")
ROTARY_CLASS = "RotaryEmbedding"
MASK_INPUTS = ("attention_mask", "decoder_attention_mask")  # positions derived from these skip padding
# A relative position bias (T5's) is an embedding looked up at buckets of (key − query) positions,
# then laid out as (…, heads, queries, keys): the subtraction and the layout ops after the lookup.
RELATIVE_POSITIONS = aten.sub.Tensor
BIAS_LAYOUT = {aten.permute.default, aten.transpose.int, aten.unsqueeze.default, aten.contiguous.default,
               aten.clone.default}


class PrefixEncoder(nn.Module):
    """PEFT's prefix encoder when training with ``prefix_projection``: embedding -> MLP."""

    def __init__(self, count: int, token_dim: int, hidden: int, width: int, zero: bool):
        super().__init__()
        self.embedding = nn.Embedding(count, token_dim)
        self.transform = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(), nn.Linear(hidden, width))
        if zero:
            nn.init.zeros_(self.transform[-1].weight)
            nn.init.zeros_(self.transform[-1].bias)

    def forward(self) -> torch.Tensor:
        return self.transform(self.embedding.weight)


# ----------------------------------------------------------------------------- attention in the graph


def is_attention(node: torch.fx.Node, root: nn.Module) -> bool:
    if node.op == "call_function":
        return node.target in SDPA_OPS
    if node.op == "call_module":  # canonical form of an attention with dropout
        module = root.get_submodule(node.target)
        return isinstance(module, ModeSwitch) and module.op is F.scaled_dot_product_attention
    return False


def node_arg(node: torch.fx.Node, index: int, name: str, default=None):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _set_arg(node: torch.fx.Node, index: int, name: str, value) -> None:
    if len(node.args) > index:
        node.args = (*node.args[:index], value, *node.args[index + 1:])
    else:
        node.kwargs = {**node.kwargs, name: value}


def node_shape(node) -> Optional[tuple]:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _key_heads(key: torch.fx.Node) -> tuple[int, int]:
    """(key/value heads, head size) of an attention's keys, before any repeat for grouped queries."""
    heads, head_dim = node_shape(key)[1], node_shape(key)[-1]
    node = key
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in HEAD_REARRANGING:
        node = node.args[0]
        shape = node_shape(node)
        if shape is not None and len(shape) == 4 and shape[-1] == head_dim and isinstance(shape[1], int) \
                and heads % shape[1] == 0:
            heads = min(heads, shape[1])
    return heads, head_dim


def _decoder_path(root: nn.Module) -> Optional[str]:
    """The decoder's module path in an encoder-decoder transformers model (PEFT passes its cache to
    the decoder alone), else None."""
    source = getattr(root, "_fxpeft_source", None)
    if not getattr(getattr(source, "config", None), "is_encoder_decoder", False):
        return None
    decoder = source.get_decoder()
    return next(path for path, module in source.named_modules() if module is decoder)


def _projected_from(node, projections: dict) -> Optional[torch.fx.Node]:
    """The states a query or key was projected from (back through head rearranging to a linear site)."""
    while isinstance(node, torch.fx.Node) and node not in projections:
        if node.op != "call_function" or node.target not in PROJECTION_LAYOUT:
            return None
        node = node.args[0]
    return projections.get(node)


def _takes_prefix(node: torch.fx.Node, decoder: Optional[str], projections: dict) -> bool:
    """Whether PEFT's cache reaches this attention: any, in a decoder-only model; in an encoder-decoder
    one the decoder's self-attentions (queries and keys projected from the same states), which read the
    cache's self-attention part — not the encoder's, and not cross-attention, whose cache PEFT empties."""
    if decoder is None:
        return True
    if not (innermost_module(node) or "").startswith(decoder + "."):
        return False
    query = _projected_from(node_arg(node, 0, "query"), projections)
    return query is not None and query is _projected_from(node_arg(node, 1, "key"), projections)


def prefix_layout(lw: Lowering) -> tuple[list[torch.fx.Node], int, int, int]:
    """(attentions that take prefixes, in layer order; layers in the prefix table; key/value heads;
    head size), or a ValueError saying why not. The table has a slice pair per attention, except in an
    encoder-decoder model, where PEFT sizes it by the model config's layer count (T5: the encoder's)."""
    graph, root = lw.graph, lw.root
    attentions = [n for n in graph.nodes if is_attention(n, root)]
    if not attentions:
        softmaxes = sum(1 for n in graph.nodes if n.op == "call_function" and "softmax" in str(n.target))
        written_out = (f" It has {softmaxes} softmax op(s): attention written out as matmul + softmax (e.g. a "
                       "transformers model loaded with attn_implementation='eager') is not supported; load it with "
                       "attn_implementation='sdpa'." if softmaxes else "")
        raise ValueError("Prefix tuning needs attention, and this model's graph has no scaled_dot_product_attention."
                         + written_out + " Or use prompt tuning (fxpeft.PromptTuningConfig) instead.")
    decoder = _decoder_path(root)
    projections = {s.node: s.input for s in lw.sites if s.kind == "linear"}
    attentions = [n for n in attentions if _takes_prefix(n, decoder, projections)]
    if not attentions:
        raise ValueError(f"Prefix tuning found no self-attention in this encoder-decoder model's decoder "
                         f"({decoder!r}): its queries and keys must be linear projections of the same states.")
    keys = [node_arg(n, 1, "key") for n in attentions]
    if any(node_shape(k) is None or len(node_shape(k)) != 4 for k in keys):
        raise ValueError("Prefix tuning reads heads and head size from the graph's tensor shapes, which a "
                         "symbolic trace does not record: pass example_inputs=... to fxpeft.transform.")
    layouts = {_key_heads(k) for k in keys}
    if len(layouts) != 1:
        raise ValueError(f"Prefix tuning needs one key layout (heads, head size) across attentions; found {layouts}.")
    heads, head_dim = layouts.pop()
    layers = len(attentions)
    if decoder is not None:
        layers = model_dims(root).get("num_layers") or layers
        if layers < len(attentions):
            raise ValueError(f"PEFT sizes prefix tuning's table by the model config's num_layers ({layers}), but the "
                             f"decoder has {len(attentions)} self-attentions; PEFT cannot run this model either.")
    return attentions, layers, heads, head_dim


# ----------------------------------------------------------------------------- attach


def resolve_kv_layout(gm, sites, config):
    """The layout read from the graph (PEFT's numbers for transformers models, GQA included), for any
    config served as per-layer keys and values; a config that states another layout (a checkpoint for
    another model) is an error."""
    _, layers, heads, head_dim = prefix_layout(primary_lowering(gm))
    found = {"num_layers": layers, "num_attention_heads": heads, "token_dim": heads * head_dim}
    name = type(config).__name__
    if _decoder_path(gm) is not None:  # PEFT's seq2seq cache: self- and cross-attention parts
        if config.task_type != "SEQ_2_SEQ_LM":  # PEFT lays other tasks' tables out differently
            raise NotImplementedError(
                f"{name} on encoder-decoder models needs task_type='SEQ_2_SEQ_LM' (PEFT's seq2seq table "
                f"layout), got {config.task_type!r}: other task types lay the table out differently and are not "
                "implemented. Set task_type='SEQ_2_SEQ_LM', or use PromptTuningConfig.")
        found["num_transformer_submodules"] = 2
    stated = {k: getattr(config, k) for k in found if getattr(config, k) is not None}
    wrong = {k: (v, found[k]) for k, v in stated.items() if v != found[k]}
    if wrong:
        raise ValueError(f"{name} does not fit this model (stated, found in the graph): "
                         + ", ".join(f"{k}={v}" for k, v in wrong.items())
                         + ". Was the config or checkpoint made for another model?")
    return dataclasses.replace(config, **{"num_transformer_submodules": config.num_transformer_submodules or 1,
                                          **found})


def resolve_prefix_config(gm, sites, config: PrefixTuningConfig) -> PrefixTuningConfig:
    config = resolve_kv_layout(gm, sites, config)
    return dataclasses.replace(config, encoder_hidden_size=config.encoder_hidden_size or config.token_dim)


def attach(gm, sites, config: PrefixTuningConfig, adapter: str) -> list[str]:
    """``config`` arrives resolved (``resolve_prefix_config``)."""
    check_alone(gm, config, adapter)
    width = config.num_layers * 2 * config.token_dim
    if config.prefix_projection and not config.inference_mode:
        encoder = PrefixEncoder(config.num_virtual_tokens, config.token_dim, config.encoder_hidden_size, width,
                                zero=config.init_weights == "zero")
    else:
        encoder = PromptEmbedding(config.num_virtual_tokens, width)
        if config.init_weights == "zero":
            nn.init.zeros_(encoder.embedding.weight)
    device = next(gm.parameters()).device
    if "prompt_encoder" not in gm._modules:
        gm.add_module("prompt_encoder", nn.ModuleDict())
    gm.prompt_encoder[adapter] = encoder.to(device).train(gm.training)
    return []


# ----------------------------------------------------------------------------- rewrite (helpers the graph calls)


def prefix_layers(prefixes: torch.Tensor, layers: int, heads: int, head_dim: int):
    """(n, layers·2·heads·head_dim) -> (layers·2, heads, n, head_dim): PEFT's past_key_values order."""
    return prefixes.view(prefixes.shape[0], layers * 2, heads, head_dim).permute(1, 2, 0, 3)


def layer_slices(layer: int, layers: int, submodules: int) -> tuple[int, int]:
    """The (key, value) slices of attention ``layer``, as PEFT's ``get_prompt`` deals them: with two
    transformer submodules (seq2seq) it concatenates the table with itself and gives each decoder
    layer four slices (self-attention key, value; cross-attention key, value, then discarded), so layer
    l reads slices 4l and 4l+1 modulo the table (a 2-layer T5 uses layer 0's slices in both layers)."""
    first = 2 * submodules * layer
    return first % (2 * layers), (first + 1) % (2 * layers)


def with_prefix(layers: torch.Tensor, index: int, states: torch.Tensor):
    """Keys or values (batch, heads, S, head_dim) with layer slice ``index`` in front; prefixes of
    fewer (grouped) heads are repeated as the model repeated its keys."""
    prefix = layers[index].to(states.dtype)
    repeat = states.shape[1] // prefix.shape[0]
    if repeat > 1:
        prefix = prefix.repeat_interleave(repeat, dim=0)
    return torch.cat([prefix.unsqueeze(0).expand(states.shape[0], -1, -1, -1), states], dim=2)


def prefix_mask(mask: Optional[torch.Tensor], query: torch.Tensor, key: torch.Tensor, count: int,
                bias: Optional[torch.Tensor] = None):
    """The mask over prefix + keys: the prefix visible to every query (additive masks holding a
    position bias get the prefix's ``bias`` there). No mask means SDPA's causal one (top-left
    aligned), made explicit since the keys are now longer than the queries."""
    if mask is None:
        mask = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
    if bias is not None:
        columns = bias.to(mask.dtype).expand(*mask.shape[:-1], count)
    else:
        columns = mask.new_full((*mask.shape[:-1], count), True if mask.dtype == torch.bool else 0.0)
    return torch.cat([columns, mask], dim=-1)


def prefix_relative_positions(relative: torch.Tensor, count: int):
    """Key − query positions of the prefix's keys. With n cached tokens the prefix sits at 0..n-1 and
    query i at n+i, so row i reads -n-i … -1-i; the model's row i starts at -i (its first key is 0)."""
    return relative[..., :1] + torch.arange(-count, 0, device=relative.device, dtype=relative.dtype)


def shifted_positions(positions: torch.Tensor, count: int):
    return positions + count


def shifted_real_positions(positions: torch.Tensor, mask: torch.Tensor, count: int):
    """Positions the model derives from the attention mask (OPT's cumsum), as it derives them from
    PEFT's mask with n ones in front: real tokens move by n, padding keeps its position."""
    return positions + count * (mask != 0).to(positions.dtype)


def _ancestors(node: torch.fx.Node, sizes: bool = True) -> set:
    """The nodes ``node`` is computed from; ``sizes=False`` leaves out those only its sizes come from
    (masks take their shape from the token embeddings' output in some models)."""
    seen, todo = set(), [node]
    while todo:
        for arg in todo.pop().all_input_nodes:
            if arg not in seen and (sizes or arg.target is not aten.sym_size.int):
                seen.add(arg)
                todo.append(arg)
    return seen


def _descendants(node: torch.fx.Node) -> set:
    seen, todo = set(), [node]
    while todo:
        for user in todo.pop().users:
            if user not in seen:
                seen.add(user)
                todo.append(user)
    return seen


def _prefix_bias(lw: Lowering, mask: torch.fx.Node, count: int, computed: dict) -> Optional[torch.fx.Node]:
    """The relative position bias of the prefix's keys for an attention whose ``mask`` holds one (T5),
    else None: the model's own bias code (bucketing, lookup, layout) replayed on the prefix's relative
    positions, inserted at the current point. ``computed`` keeps one per bias (T5's layers share it)."""
    above = _ancestors(mask, sizes=False)
    tables = [s for s in lw.sites if s.kind == "embedding" and s.node in above]
    if not tables:
        return None
    relative = [n for n in _ancestors(tables[0].input) if n.target is RELATIVE_POSITIONS]
    if len(tables) != 1 or len(relative) != 1:
        raise ValueError(f"An attention mask reads embeddings {[s.path for s in tables]} (a position bias?) that "
                         "prefix tuning cannot extend: it extends one T5-style relative position bias, an embedding "
                         "looked up at buckets of (key - query) positions.")
    end = tables[0].node  # follow the lookup's layout ops towards the mask: (..., queries, keys)
    while (following := [u for u in end.users if u in above and u.target in BIAS_LAYOUT]) and len(following) == 1:
        end = following[0]
    if end not in computed:
        code = _descendants(relative[0]) & (_ancestors(end) | {end})
        values = {relative[0]: lw.call(prefix_relative_positions, relative[0], count)}
        for node in [n for n in lw.graph.nodes if n in code]:
            values[node] = lw.copy(node, values)
        computed[end] = values[end]
    return computed[end]


def _position_inputs(lw: Lowering) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """(consumer, position-index input) pairs: learned position embeddings' indices, and the
    integer inputs of rotary-embedding regions; in an encoder-decoder model, the decoder's only."""
    decoder = _decoder_path(lw.root)
    found = [(s.node, s.input) for s in lw.sites
             if s.kind == "embedding" and s.path.rsplit(".", 1)[-1] in POSITION_EMBEDDINGS]
    rotary = {n for n in lw.graph.nodes if ROTARY_CLASS in str(list((n.meta.get("nn_module_stack") or {None: ("", "")})
                                                                   .values())[-1][1])}
    for node in rotary:
        for arg in node.all_input_nodes:
            value = arg.meta.get("val")
            if arg not in rotary and isinstance(value, torch.Tensor) and not value.is_floating_point():
                found.append((node, arg))
    return [(consumer, positions) for consumer, positions in found
            if decoder is None or (innermost_module(consumer) or "").startswith(decoder + ".")]


def rewrite(lw: Lowering, adapter: str) -> None:
    config = lw.root.peft_config[adapter]
    count = config.num_virtual_tokens
    attentions, layers, heads, head_dim = prefix_layout(lw)
    if layers != config.num_layers:
        raise ValueError(f"Adapter {adapter!r} has prefixes for {config.num_layers} attention layers but this call's "
                         f"graph has {layers}.")
    masks = [n for n in lw.graph.nodes if n.op == "placeholder" and n.target in MASK_INPUTS]
    for consumer, positions in _position_inputs(lw):
        above = _ancestors(positions, sizes=False)
        mask = next((m for m in masks if m in above and node_shape(m) == node_shape(positions)), None)
        with lw.graph.inserting_before(consumer):
            shifted = (lw.call(shifted_positions, positions, count) if mask is None
                       else lw.call(shifted_real_positions, positions, mask, count))
            consumer.replace_input_with(positions, shifted)
    with lw.graph.inserting_before(attentions[0]):
        prefixes = lw.call_module(f"prompt_encoder.{adapter}")
        table = lw.call(prefix_layers, prefixes, layers, heads, head_dim)
    biases = {}
    for layer, node in enumerate(attentions):
        lw.tag["fxpeft_site"] = innermost_module(node) or ""  # the attention module (inspection reads it)
        key_slice, value_slice = layer_slices(layer, layers, config.num_transformer_submodules)
        query, key, value = node_arg(node, 0, "query"), node_arg(node, 1, "key"), node_arg(node, 2, "value")
        mask, causal = node_arg(node, 3, "attn_mask"), node_arg(node, 5, "is_causal", False)
        with lw.graph.inserting_before(node):
            _set_arg(node, 1, "key", lw.call(with_prefix, table, key_slice, key))
            _set_arg(node, 2, "value", lw.call(with_prefix, table, value_slice, value))
            if mask is not None or causal:
                bias = _prefix_bias(lw, mask, count, biases) if mask is not None else None
                _set_arg(node, 3, "attn_mask", lw.call(prefix_mask, mask, query, key, count, bias))
                _set_arg(node, 5, "is_causal", False)


def prefill_prefixes(gm, adapter: str, cache, **encoder) -> int:
    """The prefixes into every row of an empty KV cache, layer l's from its (key, value) slices, as PEFT
    hands them to the model as n past tokens (an encoder-decoder's decoder self-attention cache: PEFT
    discards the cross-attention part); graphs with a cache skip this method's rewrite."""
    config = gm.peft_config[adapter]
    count, heads = config.num_virtual_tokens, config.num_attention_heads
    layers = cache.self_attention_cache.layers if encoder else cache.layers
    with torch.no_grad():
        table = prefix_layers(gm.prompt_encoder[adapter](), config.num_layers, heads, config.token_dim // heads)
        for index, layer in enumerate(layers):
            key, value = layer_slices(index, config.num_layers, config.num_transformer_submodules)
            layer.keys[:, :, :count] = table[key].to(layer.keys.dtype)
            layer.values[:, :, :count] = table[value].to(layer.values.dtype)
            layer.cumulative_length += count
    return count


def kv_prefix_method(name: str, config_type: type, **hooks) -> Method:
    """A method served like prefix tuning: ``prompt_encoder.<adapter>()`` gives the (n, layers·2·token_dim)
    table (``attach`` puts it there, ``resolve_config`` resolves the layout), which this file's rewrite
    puts in front of every attention's keys and values and ``prefill_prefixes`` writes into a KV cache."""
    def match(lw: Lowering):
        adapter = active_prompt_adapter(lw, config_type)
        if adapter is not None and not lw.cached:  # a graph with a KV cache finds the prefixes in it (prefill)
            yield adapter

    return Method(name=name, config_type=config_type, containers=CONTAINERS,
                  rules=(Rule(name=name, match=match, rewrite=rewrite, phase=20),), exclusive=True, one_active=True,
                  activity_in_graph=True, mixed_batches=False, saved_tensors=prompt_embeddings,
                  checkpoint_prefix="base_model.", dropped_inputs=dropped_token_types, whole_graph=True,
                  prefill_cache=prefill_prefixes, **hooks)


register_method(kv_prefix_method("prefix_tuning", PrefixTuningConfig, attach=attach,
                                 resolve_config=resolve_prefix_config, load_saved=load_prompt_embeddings))
