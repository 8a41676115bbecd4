"""Prompt tuning and p-tuning: learned virtual-token embeddings in front of the token embeddings.

State (PEFT's names, at the root of the module):
    prompt_encoder.<adapter>.embedding.weight                 prompt tuning; any prompt method loaded for inference
    prompt_encoder.<adapter>.mlp_head.* / .lstm_head.*        p-tuning's encoder
Rewrite (phase 20), once per graph, while the adapter is active:
    - the token-id input (the one feeding the token embedding): every use reads it with
      ``num_virtual_tokens`` filler ids in front, so every size the model derives from it
      (positions, masks, cache positions) counts the virtual tokens;
    - the token embedding's output: its first rows replaced by the prompt (the encoder's output);
    - inputs along the sequence, by name (PEFT's choices): ``attention_mask`` gets ones,
      ``token_type_ids`` zeros, causal-LM ``labels`` -100, and ``position_ids`` become 0..n+S-1
      (reached only in graphs that cannot be called without them: symbolic traces).
    Outputs keep the virtual positions, as PEFT's do (causal-LM logits are n+S long).
Inputs PEFT drops (``dropped_inputs``; the dispatcher calls the model without them): ``position_ids``,
and ``token_type_ids`` for generative tasks.
Checkpoint: ``prompt_embeddings``, the encoder's output (PEFT's format).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fxpeft.configs import PromptEncoderConfig, PromptLearningConfig, PromptTuningConfig
from fxpeft.registry import DEFAULT, Method, Rule, register_method
from fxpeft.rewrite import Lowering, primary_lowering

aten = torch.ops.aten

CONTAINERS = ("prompt_encoder",)
# ops that pass token ids through unchanged in value (GPT-2 reads input_ids.view(-1, S))
ID_PASSTHROUGH = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.clone.default,
                  aten.contiguous.default, aten.alias.default}
IDS_INPUT = "input_ids"  # preferred when several inputs feed embeddings (T5: input_ids, decoder_input_ids)


# ----------------------------------------------------------------------------- encoders


class PromptEmbedding(nn.Module):
    """The prompt itself as a table: prompt tuning, and every prompt method loaded for inference
    (PEFT then keeps only the encoder's saved output)."""

    def __init__(self, total_tokens: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(total_tokens, dim)

    def forward(self) -> torch.Tensor:
        return self.embedding.weight


class BidirectionalLSTM(nn.Module):
    """``nn.LSTM(bidirectional=True)`` over one sequence (steps, features) with nn.LSTM's parameters
    (names, shapes, initialisation) and its forward written out in tensor ops: torch.compile cannot
    trace an nn.LSTM module (not even its attributes), so p-tuning's encoder would break fullgraph."""

    def __init__(self, features: int, hidden: int, layers: int, dropout: float):
        super().__init__()
        lstm = nn.LSTM(features, hidden, num_layers=layers, dropout=dropout, bidirectional=True)
        for name, param in lstm.named_parameters():  # weight_ih_l0, ..., bias_hh_l1_reverse
            self.register_parameter(name, param)
        self.layers, self.dropout = layers, dropout

    def _direction(self, inputs: torch.Tensor, suffix: str, reverse: bool) -> torch.Tensor:
        w_hh = getattr(self, f"weight_hh{suffix}")
        # input terms for every step at once; gates in nn.LSTM's order: input, forget, cell, output
        gates_in = inputs @ getattr(self, f"weight_ih{suffix}").T + getattr(self, f"bias_ih{suffix}") \
            + getattr(self, f"bias_hh{suffix}")
        h = c = inputs.new_zeros(w_hh.shape[1])
        outputs = []
        for step in (reversed(range(inputs.shape[0])) if reverse else range(inputs.shape[0])):
            i, f, g, o = (gates_in[step] + w_hh @ h).chunk(4)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        return torch.stack(outputs[::-1] if reverse else outputs)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        for layer in range(self.layers):
            if layer:  # nn.LSTM's dropout: between layers, in training
                inputs = F.dropout(inputs, self.dropout, self.training)
            inputs = torch.cat([self._direction(inputs, f"_l{layer}", False),
                                self._direction(inputs, f"_l{layer}_reverse", True)], dim=-1)
        return inputs


class PromptEncoder(nn.Module):
    """P-tuning's encoder, PEFT's layout: learned inputs through an MLP, or a bidirectional LSTM and an MLP."""

    def __init__(self, config: PromptEncoderConfig, total_tokens: int, dim: int):
        super().__init__()
        hidden = config.encoder_hidden_size
        self.lstm = config.encoder_reparameterization_type == "LSTM"
        self.embedding = nn.Embedding(total_tokens, dim)
        if self.lstm:
            self.lstm_head = BidirectionalLSTM(dim, hidden, config.encoder_num_layers, config.encoder_dropout)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, dim))

    def forward(self) -> torch.Tensor:
        inputs = self.embedding.weight
        if self.lstm:
            return self.mlp_head(self.lstm_head(inputs))
        return self.mlp_head(inputs)


# ----------------------------------------------------------------------------- finding the token embedding


def feeding_input(node) -> Optional[torch.fx.Node]:
    """The graph input whose values ``node`` carries unchanged, if any."""
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in ID_PASSTHROUGH:
        node = node.args[0]
    return node if isinstance(node, torch.fx.Node) and node.op == "placeholder" else None


def token_embedding(lowering: Lowering):
    """(embedding site, token-id placeholder): the embedding that reads a model input."""
    embeddings = [s for s in lowering.sites if s.kind == "embedding"]
    fed = [(s, feeding_input(s.input)) for s in embeddings]
    fed = [(s, p) for s, p in fed if p is not None]
    preferred = [(s, p) for s, p in fed if p.target == IDS_INPUT]
    if preferred or len(fed) == 1:
        return (preferred or fed)[0]
    inputs = [n.target for n in lowering.graph.nodes if n.op == "placeholder"]
    if not fed:
        raise ValueError(
            "Prompt tuning needs a token embedding that reads a model input, and none was found. Embedding "
            f"candidates: {[s.path for s in embeddings] or 'none'}; model inputs: {inputs}. Call the model on token "
            "ids fed to an nn.Embedding / F.embedding (or name that input 'input_ids').")
    raise ValueError(
        f"Several embeddings read model inputs: {[(s.path, p.target) for s, p in fed]}; prompt tuning cannot tell "
        f"which holds the tokens. Name the token-id input {IDS_INPUT!r}.")


# ----------------------------------------------------------------------------- attach


def model_dims(gm) -> dict:
    """PEFT's reading of a transformers config (``_prepare_prompt_learning_config``), so saved
    configs carry the same numbers; empty for custom models."""
    config = getattr(gm._fxpeft_source, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return {}
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    values = config.to_dict()
    first = lambda *names: next((values[n] for n in names if values.get(n) is not None), None)  # noqa: E731
    return {"num_layers": getattr(config, "num_hidden_layers", None) or first("num_layers", "n_layer"),
            "token_dim": first("hidden_size", "n_embd", "d_model"),
            "num_attention_heads": first("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"),
            "num_key_value_heads": values.get("num_key_value_heads"), "head_dim": values.get("head_dim")}


def check_alone(gm, config, adapter: str) -> None:
    """Adapters of the config's own type may share the model, one active at a time (PEFT's add_adapter
    and set_adapter); any other adapter may not."""
    others = sorted(name for name, existing in gm.peft_config.items() if type(existing) is not type(config))
    if others:
        raise ValueError(
            f"Cannot add {type(config).__name__} adapter {adapter!r}: the model already has adapters "
            f"{others}. A prompt-learning adapter changes the sequence the model sees, so it must be the model's "
            "only adapter type (as in PEFT); transform a fresh model for it.")


def resolve_prompt_config(gm, sites, config: PromptLearningConfig) -> PromptLearningConfig:
    site, _ = token_embedding(primary_lowering(gm))
    dims = model_dims(gm)
    values = {"token_dim": config.token_dim or gm.get_parameter(site.weight).shape[1],
              "num_layers": config.num_layers or dims.get("num_layers"),
              "num_attention_heads": config.num_attention_heads or dims.get("num_attention_heads"),
              "num_transformer_submodules": config.num_transformer_submodules
              or (2 if config.task_type == "SEQ_2_SEQ_LM" else 1)}
    if isinstance(config, PromptEncoderConfig):
        values["encoder_hidden_size"] = config.encoder_hidden_size or values["token_dim"]
    return dataclasses.replace(config, **values)


def init_ids(config: PromptTuningConfig, total: int, vocab: int) -> Optional[torch.Tensor]:
    """Token ids whose embeddings initialise the prompt (PEFT's SAMPLE_VOCAB / TEXT), or None."""
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        return torch.randint(0, vocab, (total,))
    if config.prompt_tuning_init != "TEXT":
        return None
    tokenizer = config.tokenizer_name_or_path
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer
        kwargs = {k: v for k, v in (config.tokenizer_kwargs or {}).items() if k != "trust_remote_code"}
        tokenizer = AutoTokenizer.from_pretrained(tokenizer, **kwargs)
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ValueError("prompt_tuning_init_text tokenizes to no tokens; give a non-empty text.")
    return torch.tensor((ids * math.ceil(total / len(ids)))[:total])


def attach(gm, sites, config: PromptLearningConfig, adapter: str) -> list[str]:
    """``config`` arrives resolved (``resolve_prompt_config``)."""
    check_alone(gm, config, adapter)
    site, _ = token_embedding(primary_lowering(gm))
    word_embeddings = gm.get_parameter(site.weight)
    total = config.num_virtual_tokens * config.num_transformer_submodules
    if config.inference_mode or isinstance(config, PromptTuningConfig):
        encoder = PromptEmbedding(total, config.token_dim)
        ids = None if config.inference_mode else init_ids(config, total, word_embeddings.shape[0])
        if ids is not None:
            with torch.no_grad():
                encoder.embedding.weight.copy_(word_embeddings.detach()[ids.to(word_embeddings.device)].float())
    else:
        encoder = PromptEncoder(config, total, config.token_dim)
    if "prompt_encoder" not in gm._modules:
        gm.add_module("prompt_encoder", nn.ModuleDict())
    gm.prompt_encoder[adapter] = encoder.to(word_embeddings.device).train(gm.training)
    return []


# ----------------------------------------------------------------------------- rewrite (helpers the graph calls)


def with_virtual_positions(value: torch.Tensor, count: int, fill):
    """``value`` (batch, seq, ...) with ``count`` positions of ``fill`` in front."""
    return torch.cat([value.new_full((value.shape[0], count, *value.shape[2:]), fill), value], dim=1)


def restarted_positions(position_ids: torch.Tensor, count: int):
    """Positions 0..n+S-1 over the virtual and real tokens: for graphs that take position ids as
    an input they cannot be called without (symbolic traces of custom models)."""
    positions = torch.arange(position_ids.shape[-1] + count, device=position_ids.device, dtype=position_ids.dtype)
    return positions.expand(position_ids.shape[0], -1)


def with_prompt(embeds: torch.Tensor, prompt: torch.Tensor, count: int):
    """The embeddings of the extended ids with the virtual positions replaced by the prompt: one for
    the whole batch (tokens, dim), or one per sample (batch, tokens, dim: multitask prompt tuning)."""
    if prompt.dim() == 2:
        prompt = prompt.unsqueeze(0).expand(embeds.shape[0], -1, -1)
    prompt = prompt[:, :count].to(embeds.dtype)
    return torch.cat([prompt, embeds[:, count:]], dim=1)


# input name -> how it gets the virtual positions (None: left alone for this task)
SEQUENCE_INPUTS = {
    "attention_mask": lambda task: (with_virtual_positions, 1),
    "token_type_ids": lambda task: (with_virtual_positions, 0),
    "labels": lambda task: (with_virtual_positions, -100) if task == "CAUSAL_LM" else None,
    "position_ids": lambda task: (restarted_positions,),  # reached only where the dispatcher cannot drop them
}

# PEFT's ``_adjust_prompt_learning_kwargs``: generative tasks are called without token_type_ids under
# every prompt method (classification-like tasks keep them, extended above); prompt tuning and
# p-tuning also without position_ids (the model computes its own, over the virtual tokens too).
TOKEN_TYPES_DROPPED_FOR = ("CAUSAL_LM", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION")


def dropped_token_types(config) -> frozenset:
    return frozenset({"token_type_ids"} if config.task_type in TOKEN_TYPES_DROPPED_FOR else ())


def dropped_inputs(config) -> frozenset:
    return dropped_token_types(config) | {"position_ids"}


def active_prompt_adapter(lw: Lowering, config_types) -> Optional[str]:
    encoders = lw.root._modules.get("prompt_encoder")
    for adapter in getattr(lw.root, "_fxpeft_active", []):
        if encoders is not None and adapter in encoders and isinstance(lw.root.peft_config.get(adapter), config_types):
            return adapter
    return None


def match(lw: Lowering):
    adapter = active_prompt_adapter(lw, (PromptTuningConfig, PromptEncoderConfig))
    if adapter is not None and not lw.cached:  # a graph with a KV cache finds the prompt in it (prefill_prompt)
        yield adapter


def extend_input(lw: Lowering, placeholder: torch.fx.Node, fn, *args) -> torch.fx.Node:
    last_input = [n for n in lw.graph.nodes if n.op == "placeholder"][-1]
    with lw.graph.inserting_after(last_input):
        extended = lw.call(fn, placeholder, *args)
    placeholder.replace_all_uses_with(extended, delete_user_cb=lambda user: user is not extended)
    return extended


def rewrite(lw: Lowering, adapter: str) -> None:
    config = lw.root.peft_config[adapter]
    count = config.num_virtual_tokens
    site, ids = token_embedding(lw)
    lw.tag["fxpeft_site"] = site.path
    extend_input(lw, ids, with_virtual_positions, count, 0)
    embeds = site.output
    users = list(embeds.users)
    # an encoder may read per-call inputs (Method.call_inputs: multitask prompt tuning's task_ids)
    call_inputs = [lw.call_input(name) for name in lw.registry.method_for(config).call_inputs]
    with lw.graph.inserting_after(embeds):
        prompt = lw.call_module(f"prompt_encoder.{adapter}", *call_inputs)
    with lw.graph.inserting_after(prompt):
        replaced = lw.call(with_prompt, embeds, prompt, count)
    for user in users:
        user.replace_input_with(embeds, replaced)
    site.output = replaced
    for node in [n for n in lw.graph.nodes if n.op == "placeholder" and n.target in SEQUENCE_INPUTS]:
        how = SEQUENCE_INPUTS[node.target](config.task_type)
        if how is not None:
            fn, *fill = how
            extend_input(lw, node, fn, count, *fill)


# ----------------------------------------------------------------------------- generation


def prefill_prompt(gm, adapter: str, cache, encoder_outputs=None, attention_mask=None, **call_inputs) -> int:
    """The prompt's keys and values into every row of an empty KV cache: the model run on the prompt
    as input embeddings at positions 0..n-1 (causal attention: the virtual tokens see only each other,
    so their keys and values are the same for every sequence, as in PEFT's forward over the whole
    sequence). Graphs with a cache skip this method's rewrite; the real tokens follow in the cache.
    Encoder-decoder: nothing to write; PEFT prepends prompt and p-tuning tokens to the encoder's input
    alone (whatever ``num_transformer_submodules`` says), so they are in the encoder's outputs.
    ``call_inputs``: what the encoder reads per row (``Method.call_inputs``), passed to it and to the call."""
    if encoder_outputs is not None:
        return 0
    count = gm.peft_config[adapter].num_virtual_tokens
    rows = cache.layers[0].keys.shape[0]
    with torch.no_grad():
        prompt = gm.prompt_encoder[adapter](*call_inputs.values())
        prompt = prompt.unsqueeze(0).expand(rows, -1, -1) if prompt.dim() == 2 else prompt
        gm(inputs_embeds=prompt[:, :count].to(gm.get_input_embeddings().weight.dtype), cache=cache, use_cache=True,
           **call_inputs)
    return count


# ----------------------------------------------------------------------------- checkpoint


def prompt_embeddings(gm, adapter: str) -> dict[str, torch.Tensor]:
    """PEFT's ``prompt_embeddings``: the encoder's output, computed in eval mode (no dropout)."""
    encoder = gm.prompt_encoder[adapter]
    was_training = encoder.training
    try:
        with torch.no_grad():
            return {"prompt_embeddings": encoder.eval()().detach()}
    finally:
        encoder.train(was_training)


def load_prompt_embeddings(gm, adapter: str, weights: dict[str, torch.Tensor]) -> None:
    encoder = gm.prompt_encoder[adapter]
    if not isinstance(encoder, PromptEmbedding) or not gm.peft_config[adapter].inference_mode:
        raise ValueError(
            "A prompt-learning checkpoint holds the encoder's output, not the encoder: it loads for inference only "
            "(is_trainable=False), as in PEFT.")
    with torch.no_grad():
        encoder.embedding.weight.copy_(weights["prompt_embeddings"])


DEFAULT.add_rule(Rule(name="prompt_tuning", match=match, rewrite=rewrite, phase=20))  # both methods' prompts
for _name, _config_type in (("prompt_tuning", PromptTuningConfig), ("p_tuning", PromptEncoderConfig)):
    register_method(Method(name=_name, config_type=_config_type, attach=attach, containers=CONTAINERS,
                           resolve_config=resolve_prompt_config, exclusive=True, one_active=True,
                           activity_in_graph=True, mixed_batches=False, saved_tensors=prompt_embeddings,
                           load_saved=load_prompt_embeddings,
                           checkpoint_prefix="base_model.", dropped_inputs=dropped_inputs,
                           prefill_cache=prefill_prompt))
